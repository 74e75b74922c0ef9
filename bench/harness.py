"""A proxy under test: its own data dir and SQLite store (or a database on a
throwaway PostgreSQL server), seeded straight through the store's own
functions, and the real gunicorn (default proxy/gunicorn_conf.py) on a free
loopback port. Also: the machine a run happened on.
"""
from __future__ import annotations

import os
import platform
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import requests

from proxy import accounts
from proxy.blobs import BlobStore, StoredBlob
from proxy.config import load_config
from proxy.db import open_database
from proxy.models import JobState
from proxy.store import NewJob, create_job

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "bench-password-1"
# Rows per transaction when seeding: one transaction per batch keeps seeding
# at tens of thousands of jobs a second without one huge WAL.
SEED_BATCH = 10_000
START_TIMEOUT_S = 60


class BenchError(Exception):
    """Raised when the proxy under test misbehaves (refuses, crashes, answers wrongly)."""


@dataclass(frozen=True)
class Account:
    id: str
    name: str
    token: str

    @property
    def auth(self) -> dict:
        return {"Authorization": f"Bearer {self.token}"}


class Proxy:
    """One proxy instance for one benchmark; use as a context manager.

    Args:
        tmp_root: where the temp data dir is made (default: the system temp dir).
        database_url: a PostgreSQL database (PostgresServer.new_database) instead
            of SQLite in the data dir.
        data_dir: another instance's data dir, shared as two proxy instances on
            one host share one PostgreSQL (blobs written at one are read at the other).
    """

    def __init__(self, tmp_root: str | None = None, *, database_url: str = "",
                 data_dir: str | None = None):
        self.dir = Path(tempfile.mkdtemp(prefix="jobcloud-bench-", dir=tmp_root))
        self.config = load_config(env={}, overrides={
            "data_dir": data_dir or str(self.dir / "data"), "database_url": database_url})
        self.db = open_database(self.config.resolved_database_url)
        self.db.migrate()
        self.blobs = BlobStore(self.config.data_dir)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log = None

    def __enter__(self) -> "Proxy":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ----------------------------------------------------------------- the store

    def add_user(self, name: str) -> Account:
        with self.db.connection() as conn, conn.transaction():
            user = accounts.create_user(conn, name, PASSWORD)
            _, token = accounts.create_token(conn, user["id"], "bench")
        return Account(user["id"], name, token)

    def enrollment_token(self) -> str:
        with self.db.connection() as conn, conn.transaction():
            _, token = accounts.create_enrollment(conn, "bench", "bench")
        return token

    def store_script(self, text: str = "print('hello from a benchmark job')\n") -> StoredBlob:
        """Commit one script blob."""
        upload = self.blobs.new_upload(self.config.max_script_bytes, "the script")
        upload.write(text.encode())
        return self.blobs.commit(upload)

    def seed_jobs(self, owner: Account, count: int, *, queued_one_in: int = 0,
                  gpus: int = 0, finished: bool = False) -> None:
        """Insert `count` queued jobs for `owner` with the store's own create_job.

        Args:
            queued_one_in: when > 0, about one job in n stays queued and the
                rest are marked succeeded: a user's history is mostly finished.
            gpus: GPUs each job asks for.
            finished: every job is marked succeeded: a history with nothing
                left for a worker to take.
        """
        job = NewJob(owner_id=owner.id, name="seeded", script_name="main.py",
                     script=self.store_script(), image=self.config.default_image, cpus=1.0,
                     memory_mb=512, timeout_s=600, gpus=gpus)
        left = count
        with self.db.connection() as conn:
            while left > 0:
                n = min(SEED_BATCH, left)
                with conn.transaction():
                    for _ in range(n):
                        create_job(conn, job)
                left -= n
            if queued_one_in or finished:
                some = "" if finished else " AND ABS(random() % ?) != 0"
                with conn.transaction():
                    conn.execute(
                        "UPDATE jobs SET state = ?, attempt = 1, started_at = submitted_at,"
                        " finished_at = submitted_at + 1, exit_code = 0, wall_seconds = 1"
                        " WHERE owner_id = ? AND state = ?" + some,
                        (JobState.SUCCEEDED.value, owner.id, JobState.QUEUED.value)
                        + (() if finished else (queued_one_in,)))

    def count_jobs(self, state: str | None = None) -> int:
        with self.db.connection() as conn:
            if state is None:
                return conn.query_one("SELECT COUNT(*) AS n FROM jobs")["n"]
            return conn.query_one("SELECT COUNT(*) AS n FROM jobs WHERE state = ?", (state,))["n"]

    # ---------------------------------------------------------------- the server

    def start(self, settings: dict | None = None, root: Path | None = None) -> None:
        """Start gunicorn with the default config and wait for /healthz.

        Args:
            settings: JOBCLOUD_* environment for the proxy on top of the defaults.
            root: another tree of the code to run (bench warm-start's baseline:
                an earlier commit, extracted), instead of this one.
        """
        env = dict(os.environ, JOBCLOUD_DATA_DIR=self.config.data_dir,
                   JOBCLOUD_BIND=f"127.0.0.1:{self.port}")
        for key in ("JOBCLOUD_CONFIG", "JOBCLOUD_DATABASE_URL", "JOBCLOUD_GUNICORN_WORKERS",
                    "JOBCLOUD_GUNICORN_CONNECTIONS", "JOBCLOUD_ACCESS_LOG"):
            env.pop(key, None)
        if self.config.database_url:
            env["JOBCLOUD_DATABASE_URL"] = self.config.database_url
        env.update(settings or {})
        if root is not None:
            env["PYTHONPATH"] = str(root)
        # The access log stays on (the default config logs every request to
        # stdout); it goes to a file in the temp dir, as it would to journald.
        self.log = open(self.dir / "gunicorn.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "python:proxy.gunicorn_conf",
             "proxy:create_app()"],
            cwd=root or ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT,
            start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._answers():
            if self.proc.poll() is not None:
                raise BenchError(f"gunicorn exited at start:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise BenchError(f"gunicorn did not answer /healthz in {START_TIMEOUT_S}s")
            time.sleep(0.1)
        # Every worker process must be up, or the first seconds measure forking.
        want = int(env.get("JOBCLOUD_GUNICORN_WORKERS") or self.gunicorn_settings()["workers"])
        while len(self.processes()) < want + 1 and time.monotonic() < deadline:
            time.sleep(0.1)

    def _answers(self) -> bool:
        try:
            return requests.get(self.url + "/healthz", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    def processes(self) -> list[psutil.Process]:
        """The gunicorn master and its worker processes."""
        if self.proc is None or self.proc.poll() is not None:
            return []
        try:
            master = psutil.Process(self.proc.pid)
            return [master, *master.children()]
        except psutil.NoSuchProcess:
            return []

    def cpu_seconds(self) -> float:
        """User+system CPU used so far by the server's processes."""
        total = 0.0
        for p in self.processes():
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
        return total

    @staticmethod
    def gunicorn_settings() -> dict:
        """The settings the default config resolves to on this machine."""
        import proxy.gunicorn_conf as conf

        return {"workers": conf.workers, "worker_class": conf.worker_class,
                "worker_connections": conf.worker_connections, "keepalive": conf.keepalive}

    def log_tail(self, n: int = 3000) -> str:
        try:
            return (self.dir / "gunicorn.log").read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self.log is not None:
            self.log.close()

    def kill(self) -> None:
        """kill -9 the master and its workers: requests in flight are cut."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        if self.log is not None:
            self.log.close()

    def close(self) -> None:
        try:
            self.stop()
        finally:
            self.db.close()
            if os.environ.get("JOBCLOUD_BENCH_KEEP"):   # to look at its logs and store after
                print(f"kept {self.dir}", file=sys.stderr)
            else:
                shutil.rmtree(self.dir, ignore_errors=True)


class PostgresServer:
    """A throwaway PostgreSQL cluster on a loopback port (as tests/conftest.py
    starts one); use as a context manager, then `new_database()` per proxy.

    Args:
        tmp_root: where its data dir is made (default: the system temp dir).

    Raises:
        BenchError: the server binaries are missing or it does not start.
    """

    def __init__(self, tmp_root: str | None = None):
        self.bin = pg_bin()
        if self.bin is None:
            raise BenchError("PostgreSQL server binaries (initdb, pg_ctl) not installed:"
                             " apt-get install postgresql")
        self.dir = Path(tempfile.mkdtemp(prefix="jobcloud-bench-pg-", dir=tmp_root))
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}"
        # PostgreSQL refuses to run as root: then it runs as the postgres system user.
        self.run_as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    def __enter__(self) -> "PostgresServer":
        if self.run_as:
            shutil.chown(self.dir, user="postgres")
        data = self.dir / "data"
        # fsync stays on (unlike the tests' server): commits cost what they would in use.
        opts = (f"-c listen_addresses=127.0.0.1 -c port={self.port}"
                f" -c unix_socket_directories={self.dir} -c max_connections=300"
                " -c shared_buffers=128MB")
        try:
            self._pg("initdb", "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
            self._pg("pg_ctl", "-D", str(data), "-o", opts, "-w", "-l", str(self.dir / "log"),
                     "start")
        except subprocess.CalledProcessError as e:
            self.__exit__()
            raise BenchError(f"PostgreSQL did not start: {e.stderr or e}") from e
        return self

    def __exit__(self, *exc) -> None:
        subprocess.run([*self.run_as, str(self.bin / "pg_ctl"), "-D", str(self.dir / "data"),
                        "-m", "immediate", "stop"], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        shutil.rmtree(self.dir, ignore_errors=True)

    def _pg(self, program: str, *args: str) -> None:
        subprocess.run([*self.run_as, str(self.bin / program), *args], check=True, text=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def new_database(self) -> str:
        """An empty database on this server; returns its URL."""
        import psycopg

        name = "bench_" + secrets.token_hex(6)
        with psycopg.connect(self.url + "/postgres", autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return f"{self.url}/{name}"


def pg_bin() -> Path | None:
    """Where PostgreSQL's initdb and pg_ctl are (newest Debian version first), or None."""
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: p.parent.name)
    for path in reversed(candidates):
        if (path / "initdb").exists() and (path / "pg_ctl").exists():
            return path
    found = shutil.which("pg_ctl")
    return Path(found).parent if found else None


class RssSampler:
    """Samples the resident memory of a proxy's processes in a thread.

    `growth()` is the largest rise of any one process over its RSS when
    sampling began, so a request that buffers a body shows up in full.
    """

    def __init__(self, proxy: Proxy, interval_s: float = 0.02):
        self.proxy = proxy
        self.interval_s = interval_s
        self.baseline: dict[int, int] = {}
        self.peak: dict[int, int] = {}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "RssSampler":
        self.baseline = self._sample()
        self.peak = dict(self.baseline)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> dict[int, int]:
        found = {}
        for p in self.proxy.processes():
            try:
                found[p.pid] = p.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return found

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            for pid, rss in self._sample().items():
                self.peak[pid] = max(self.peak.get(pid, 0), rss)
            self.samples += 1

    def growth(self) -> tuple[int, int]:
        """(largest growth in bytes, pid of that process)."""
        best = max(self.peak, key=lambda pid: self.peak[pid] - self.baseline.get(pid, self.peak[pid]))
        return self.peak[best] - self.baseline.get(best, self.peak[best]), best


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def machine() -> dict:
    """What the figures were measured on."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": model or platform.processor() or "unknown",
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "commit": _git_commit(),
    }


def _git_commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                              capture_output=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "proxy", "worker"], cwd=ROOT,
                               text=True, capture_output=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+local changes" if dirty else "")
