"""`jobcloud-proxy serve` (what `make run` starts), its access log, the admin
commands' search for the store, the package build, and the store's migrations."""
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from proxy.accesslog import is_worker_protocol
from proxy.db import open_database
from tests.conftest import free_port, register_worker, wait_until

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parent.parent


def _serve(data_dir, port, **settings):
    env = dict(os.environ, JOBCLOUD_DATA_DIR=str(data_dir), JOBCLOUD_LOG_LEVEL="WARNING",
               JOBCLOUD_ACCESS_LOG="/dev/null", JOBCLOUD_GUNICORN_WORKERS="2")
    env.update(settings)
    env.pop("JOBCLOUD_DATABASE_URL", None)
    env.pop("JOBCLOUD_CONFIG", None)
    return subprocess.Popen([str(BIN / "jobcloud-proxy"), "serve", "--bind", f"127.0.0.1:{port}"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _read_banner(proc) -> str:
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "one-time password:" in line or "Log in with your account" in line:
            return "".join(lines)
    raise AssertionError("serve exited before printing how to log in:\n" + "".join(lines))


def _stop(proc):
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=20)


def _up(url):
    try:
        return requests.get(url + "/healthz", timeout=2).status_code == 200
    except requests.RequestException:
        return False


def test_first_start_creates_admin_with_one_time_password(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _serve(tmp_path / "data", port)
    try:
        banner = _read_banner(proc)
        assert url in banner
        password = re.search(r"one-time password:\s+(\S+)", banner).group(1)
        assert len(password) >= 16
        wait_until(lambda: _up(url), timeout=30, what="the proxy to answer")

        s = requests.Session()
        page = s.get(url + "/login").text
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
        r = s.post(url + "/login", data={"username": "admin", "password": password,
                                         "csrf_token": csrf}, allow_redirects=False)
        assert r.status_code == 302
        # A one-time password must be replaced before anything else.
        r = s.get(url + "/", allow_redirects=False)
        assert r.status_code == 302 and r.headers["Location"].endswith("/account/password")
    finally:
        _stop(proc)

    # Second start: no new account, no password printed; the way to a new one
    # works as printed from any directory, without the proxy's settings.
    proc = _serve(tmp_path / "data", port)
    try:
        banner = _read_banner(proc)
        assert "one-time password:" not in banner
    finally:
        _stop(proc)
    hint = re.search(r"A new one-time password for admin: (.+)$", banner, re.MULTILINE).group(1)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = subprocess.run(["bash", "-c", hint], cwd=elsewhere, env=_without_settings(),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert re.search(r"new one-time password for 'admin': \S+", out.stdout)
    assert list(elsewhere.iterdir()) == []


def test_two_starts_never_print_the_same_password(tmp_path):
    passwords = []
    for name in ("a", "b"):
        port = free_port()
        proc = _serve(tmp_path / name, port)
        try:
            passwords.append(re.search(r"one-time password:\s+(\S+)", _read_banner(proc)).group(1))
        finally:
            _stop(proc)
    assert passwords[0] != passwords[1]


def test_serve_refuses_bad_configuration(tmp_path):
    env = dict(os.environ, JOBCLOUD_DATA_DIR=str(tmp_path), JOBCLOUD_MAX_CPUS="many")
    out = subprocess.run([str(BIN / "jobcloud-proxy"), "serve"], env=env, capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 1
    assert "max_cpus" in out.stderr


def test_migrations_apply_once(database_url):
    shipped = sorted(int(p.name[:4]) for p in (ROOT / "proxy" / "migrations").glob("*.sql"))
    assert shipped[:5] == [1, 2, 3, 4, 5]
    db = open_database(database_url)
    try:
        assert db.migrate() == shipped
        assert db.migrate() == []
        with db.connection() as conn:
            versions = [r["version"] for r in
                        conn.query("SELECT version FROM schema_migrations ORDER BY version")]
        assert versions == shipped
    finally:
        db.close()


# ------------------------------------------------------ the admin commands' store

def _without_settings() -> dict:
    """The environment of a shell on the proxy host that has none of the proxy's settings."""
    return {k: v for k, v in os.environ.items() if not k.startswith("JOBCLOUD_")}


ADMIN_COMMANDS = [["jobcloud", "token", "create", "--user", "admin"],
                  ["jobcloud", "user", "passwd", "admin"],
                  ["jobcloud-proxy", "user", "passwd", "admin"],
                  ["jobcloud-proxy", "reap"]]


@pytest.mark.parametrize("command", ADMIN_COMMANDS, ids=" ".join)
def test_an_admin_command_elsewhere_refuses_instead_of_creating_a_database(tmp_path, command):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = subprocess.run([str(BIN / command[0]), *command[1:]], cwd=elsewhere,
                         env=_without_settings(), capture_output=True, text=True, timeout=60)
    assert out.returncode == 1, out.stdout
    assert f"no jobcloud database at {elsewhere / 'var' / 'jobcloud.db'}" in out.stderr
    assert "the default data_dir ./var, relative to the current directory" in out.stderr
    assert list(elsewhere.iterdir()) == []


def test_an_admin_command_names_the_setting_that_pointed_it_away(tmp_path):
    missing = tmp_path / "not-the-proxys"
    env = dict(_without_settings(), JOBCLOUD_DATA_DIR=str(missing))
    out = subprocess.run([str(BIN / "jobcloud"), "user", "list"], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 1
    assert f"no jobcloud database at {missing / 'jobcloud.db'} (data_dir from JOBCLOUD_DATA_DIR)" \
        in out.stderr
    assert not missing.exists()

    conf = tmp_path / "proxy.toml"
    conf.write_text(f'[proxy]\ndata_dir = "{missing}"\n')
    out = subprocess.run([str(BIN / "jobcloud"), "user", "list"], capture_output=True, text=True,
                         env=dict(_without_settings(), JOBCLOUD_CONFIG=str(conf)), timeout=60)
    assert out.returncode == 1
    assert f"(data_dir in {conf} (JOBCLOUD_CONFIG))" in out.stderr
    assert not missing.exists()

    # `migrate` is the way to a new one; then the same command finds it.
    assert subprocess.run([str(BIN / "jobcloud-proxy"), "migrate"], env=env,
                          capture_output=True, timeout=60).returncode == 0
    out = subprocess.run([str(BIN / "jobcloud"), "user", "list"], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def test_an_admin_command_refuses_an_empty_postgresql_database(pg_url, tmp_path):
    env = dict(_without_settings(), JOBCLOUD_DATABASE_URL=pg_url,
               JOBCLOUD_DATA_DIR=str(tmp_path / "data"))
    out = subprocess.run([str(BIN / "jobcloud"), "token", "create", "--user", "admin"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert f"no jobcloud database at {pg_url} (database_url from JOBCLOUD_DATABASE_URL)" \
        in out.stderr
    db = open_database(pg_url)
    try:
        assert not db.has_schema()   # nothing was migrated into it
    finally:
        db.close()


# ------------------------------------------------------------------ access log

def _log_lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def _worker_protocol_calls(url: str, enrollment: str) -> None:
    worker = register_worker(url, enrollment)
    assert requests.post(f"{url}/api/v1/worker/heartbeat", headers=worker, json={"running": []},
                         timeout=30).status_code == 200
    assert requests.post(f"{url}/api/v1/worker/claim", headers=worker,
                         json={"max_jobs": 1, "wait_s": 0}, timeout=30).status_code == 200


@pytest.mark.parametrize("worker_protocol", [False, True], ids=["default", "setting-on"])
def test_the_access_log_leaves_out_the_worker_protocol_unless_asked(tmp_path, worker_protocol):
    """Real gunicorn in one process (so its lines are written in request order): the
    worker's register, heartbeat and claim are not logged by default; people's are."""
    data, log = tmp_path / "data", tmp_path / "access.log"
    settings = {"JOBCLOUD_ACCESS_LOG": str(log), "JOBCLOUD_GUNICORN_WORKERS": "1"}
    if worker_protocol:
        settings["JOBCLOUD_ACCESS_LOG_WORKER_PROTOCOL"] = "true"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _serve(data, port, **settings)
    try:
        _read_banner(proc)
        wait_until(lambda: _up(url), timeout=30, what="the proxy to answer")
        env = dict(_without_settings(), JOBCLOUD_DATA_DIR=str(data))
        enrollment = subprocess.run([str(BIN / "jobcloud"), "enroll", "create"], env=env,
                                    capture_output=True, text=True, check=True).stdout.strip()
        _worker_protocol_calls(url, enrollment)
        assert requests.get(f"{url}/login", timeout=10).status_code == 200
        lines = wait_until(lambda: [ln for ln in _log_lines(log) if '"GET /login ' in ln],
                           timeout=20, what="the page request in the access log")
        assert lines
    finally:
        _stop(proc)
    logged = "\n".join(_log_lines(log))
    assert '"GET /healthz ' in logged
    for path in ("/api/v1/workers/register", "/api/v1/worker/heartbeat", "/api/v1/worker/claim"):
        assert (f'"POST {path} ' in logged) is worker_protocol, logged


def test_the_worker_protocol_is_what_the_worker_api_serves(app):
    """The access log's filter matches every route of proxy/worker_api.py and nothing else."""
    rules = list(app.url_map.iter_rules())
    assert any(r.endpoint.startswith("worker_api.") for r in rules)
    for rule in rules:
        assert is_worker_protocol(rule.rule) is rule.endpoint.startswith("worker_api."), rule.rule


# ------------------------------------------------------------------- packaging

def test_the_package_builds_without_packaging_warnings(tmp_path):
    """setuptools' build of the package (what `make run`'s pip install runs), in a copy
    of the sources: no "absent from the packages configuration" (or, in older
    setuptools, "installing ... as data is deprecated") for the data directories,
    and their files are in the build."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md", "jobcloud_config.py",
                 "jobcloud_datadir.py", "jobcloud_archive.py"):
        shutil.copy(ROOT / name, src / name)
    for package in ("proxy", "worker", "client", "vm_provisioning"):
        shutil.copytree(ROOT / package, src / package,
                        ignore=shutil.ignore_patterns("node_modules", "__pycache__"))
    out = subprocess.run([sys.executable, "-W", "always", "-c",
                          "from setuptools import setup; setup()",
                          "build_py", "--build-lib", str(tmp_path / "lib")],
                         cwd=src, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    said = out.stdout + out.stderr
    assert "Warning:" not in said, said
    lib = tmp_path / "lib"
    for shipped in ("proxy/migrations/0001_initial.sql", "proxy/templates/base.html",
                    "proxy/static/live.js", "proxy/job_templates/sklearn_csv.py"):
        assert (lib / shipped).is_file(), shipped
    assert not (lib / "proxy" / "editor").exists()
