"""`jobcloud-proxy serve` (what `make run` starts) and the store's migrations."""
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import requests

from proxy.db import open_database
from tests.conftest import free_port, wait_until

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parent.parent


def _serve(data_dir, port):
    env = dict(os.environ, JOBCLOUD_DATA_DIR=str(data_dir), JOBCLOUD_LOG_LEVEL="WARNING",
               JOBCLOUD_ACCESS_LOG="/dev/null", JOBCLOUD_GUNICORN_WORKERS="2")
    env.pop("JOBCLOUD_DATABASE_URL", None)
    env.pop("JOBCLOUD_CONFIG", None)
    return subprocess.Popen([str(BIN / "jobcloud-proxy"), "serve", "--bind", f"127.0.0.1:{port}"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _read_banner(proc) -> str:
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "one-time password" in line or "Log in with your account" in line:
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
        password = re.search(r"one-time password: (\S+)", banner).group(1)
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

    # Second start: no new account, no password printed.
    proc = _serve(tmp_path / "data", port)
    try:
        banner = _read_banner(proc)
        assert "one-time password:" not in banner
    finally:
        _stop(proc)


def test_two_starts_never_print_the_same_password(tmp_path):
    passwords = []
    for name in ("a", "b"):
        port = free_port()
        proc = _serve(tmp_path / name, port)
        try:
            passwords.append(re.search(r"one-time password: (\S+)", _read_banner(proc)).group(1))
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
