"""Database access: one interface, SQLite and PostgreSQL backends.

SQL is written once with ``?`` placeholders and portable types; the backends
differ only where they must: how a write transaction takes its lock
(``BEGIN IMMEDIATE`` on SQLite, a transaction-scoped advisory lock on
PostgreSQL) and how connections are made. Driver errors are translated here
into `StoreUnavailable`.
"""
from __future__ import annotations

import contextlib
import logging
import re
import sqlite3
import threading
import time
from importlib import resources
from pathlib import Path

from .errors import ConfigError, StoreUnavailable
from .inotify import FileSignal

log = logging.getLogger(__name__)

# One advisory lock id serializes writers that must see a consistent queue
# (claim/dispatch, migrations) across all proxy processes on PostgreSQL.
PG_DISPATCH_LOCK = 7_100_001
PG_MIGRATE_LOCK = 7_100_002
# Blob references (retention.py): transactions that make a job refer to a blob
# hold it shared, the sweep's unlinking holds it exclusively; sweeps' expiry
# passes serialize on the second.
PG_BLOB_LOCK = 7_100_003
PG_SWEEP_LOCK = 7_100_004
SQLITE_BUSY_TIMEOUT_S = 30.0
# Open SQLite connections kept for reuse per process: about the requests one
# process serves at once; more are opened when needed and closed after.
SQLITE_IDLE_CONNECTIONS = 16


def open_database(url: str) -> "Database":
    """Return the backend for a database URL (sqlite:///path or postgresql://...)."""
    if url.startswith("sqlite:///"):
        return SQLiteDatabase(url[len("sqlite:///"):])
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresDatabase(url)
    raise ConfigError(f"unsupported database URL {url!r}")


class Database:
    """A handle on the store; `connection()` yields a `Connection` for one unit of work."""

    dialect = "?"
    closed = False
    # Called with the topics of each wake-up this process commits
    # (wakeups.Listener registers here): waiters in the same process are woken
    # at the commit, without waiting for the database to tell them.
    local_wakeups = None

    def connection(self):  # pragma: no cover - interface
        raise NotImplementedError

    def deliver_locally(self, topics) -> None:
        if self.local_wakeups is not None:
            self.local_wakeups(topics)

    def close(self):
        self.closed = True

    def has_schema(self) -> bool:  # pragma: no cover - interface
        """Whether migrations ever ran here: a proxy's database, not a new or empty one."""
        raise NotImplementedError

    def migrate(self) -> list[int]:
        """Apply the numbered SQL files in proxy/migrations not applied yet.

        Returns:
            The versions applied now (empty when the schema was current).
        """
        applied_now = []
        with self.connection() as conn:
            with conn.transaction(lock=PG_MIGRATE_LOCK):
                conn.execute(
                    "CREATE TABLE IF NOT EXISTS schema_migrations ("
                    " version INTEGER PRIMARY KEY, applied_at DOUBLE PRECISION NOT NULL)"
                )
                done = {r["version"] for r in conn.query("SELECT version FROM schema_migrations")}
                for version, sql in _migration_files():
                    if version in done:
                        continue
                    for statement in _split_sql(sql):
                        conn.execute(statement)
                    conn.execute(
                        "INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)",
                        (version, _now()),
                    )
                    applied_now.append(version)
        if applied_now:
            log.info("applied migrations %s", applied_now)
        return applied_now


class Connection:
    """One database connection. `query` returns dicts; `execute` returns the rowcount."""

    def __init__(self, raw, dialect: str, db: "Database | None" = None):
        self.raw = raw
        self.dialect = dialect
        self.db = db
        self.in_transaction = False
        self._on_commit: list = []

    def on_commit(self, fn) -> None:
        """Call `fn()` once the current transaction commits (at once outside one);
        never when it rolls back. The same `fn` (==) registered twice runs once."""
        if self.in_transaction:
            if fn not in self._on_commit:
                self._on_commit.append(fn)
        else:
            fn()

    def _sql(self, sql: str) -> str:
        return sql

    def query(self, sql: str, params=()) -> list[dict]:
        cur = self._run(sql, params)
        return [dict(r) for r in cur.fetchall()]

    def query_one(self, sql: str, params=()) -> dict | None:
        cur = self._run(sql, params)
        row = cur.fetchone()
        return dict(row) if row is not None else None

    def execute(self, sql: str, params=()) -> int:
        return self._run(sql, params).rowcount

    def _run(self, sql, params):  # pragma: no cover - interface
        raise NotImplementedError

    @contextlib.contextmanager
    def transaction(self, lock: int | None = None, durable: bool = True):
        """A write transaction.

        Args:
            lock: serializes it against other transactions holding the same lock.
            durable: False lets the commit return before it is on disk (it stays
                atomic and ordered). Only for writes whose loss in a power cut
                costs a retry, never an accepted job: claims and heartbeats.
        """
        if self.in_transaction:
            yield self
            return
        self._begin(lock, durable)
        self.in_transaction = True
        self._on_commit = []
        try:
            yield self
        except BaseException:
            self.in_transaction = False
            self._on_commit = []
            self._rollback()
            raise
        self.in_transaction = False
        self._commit()
        hooks, self._on_commit = self._on_commit, []
        for fn in hooks:
            fn()


# --------------------------------------------------------------------------- SQLite

class SQLiteConnection(Connection):
    def __init__(self, raw, dialect: str, db, write_lock):
        super().__init__(raw, dialect, db)
        self.write_lock = write_lock

    def _run(self, sql, params):
        # SQLite's own busy handler sleeps in C, which under gevent stops every
        # request of this process while another process holds the write lock:
        # the connection fails at once instead (timeout 0) and the wait happens
        # here, in sleeps that let the other requests run. Only where a retry is
        # safe: a statement outside a transaction (not applied when refused),
        # or the BEGIN that takes the lock.
        deadline = None
        delay = 0.001
        while True:
            try:
                return self.raw.execute(sql, params)
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) and "busy" not in str(e):
                    raise
                now = time.monotonic()
                deadline = deadline or now + SQLITE_BUSY_TIMEOUT_S
                if self.raw.in_transaction or now >= deadline:
                    raise StoreUnavailable("the database is busy; try again") from e
                time.sleep(min(delay, deadline - now))
                delay = min(delay * 2, 0.02)

    def _begin(self, lock, durable):
        # The fsync of a commit happens while the write lock is held, so it
        # bounds how many writers per second SQLite serves; NORMAL (in WAL
        # mode) leaves it to the next checkpoint. Set per transaction: it
        # cannot change inside one.
        # One writer per process at a time, queued here rather than in SQLite's
        # busy handler: under gevent that handler sleeps in C and would stop the
        # whole process, including the greenlet holding the lock (a deadlock
        # until the busy timeout). Across processes SQLite's own lock decides.
        self.write_lock.acquire()
        try:
            self.relaxed = not durable
            if self.relaxed:
                self.raw.execute("PRAGMA synchronous=NORMAL")
            # IMMEDIATE takes the write lock up front, so two claimers can never
            # both read the same queued job and then both update it.
            self._run("BEGIN IMMEDIATE", ())
        except BaseException:
            self._restore()
            self.write_lock.release()
            raise

    def _commit(self):
        try:
            self._run("COMMIT", ())
        finally:
            self._restore()
            self.write_lock.release()

    def _rollback(self):
        try:
            self.raw.execute("ROLLBACK")
        except sqlite3.Error:
            pass
        self._restore()
        self.write_lock.release()

    def _restore(self):
        if getattr(self, "relaxed", False):
            self.raw.execute("PRAGMA synchronous=FULL")
            self.relaxed = False


class SQLiteDatabase(Database):
    dialect = "sqlite"

    def __init__(self, path: str):
        self.path = path
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        # Touched after each commit that publishes wake-ups: other processes'
        # wakeups.Listener sleep on it (inotify) instead of polling.
        self.wake_signal_path = "" if path == ":memory:" else f"{path}-wake"
        self._wake_signal = None
        self._idle: list[sqlite3.Connection] = []
        # Made on first use, i.e. after gunicorn's gevent worker patched
        # threading: then they are greenlet locks.
        self._locks = None

    def has_schema(self) -> bool:
        # Looked at before connecting: a connection would create the file.
        if self.path == ":memory:" or not Path(self.path).is_file():
            return False
        with self.connection() as conn:
            return conn.query_one("SELECT name FROM sqlite_master WHERE type = 'table'"
                                  " AND name = 'schema_migrations'") is not None

    def _new(self) -> sqlite3.Connection:
        # timeout=0: a busy database is waited for in SQLiteConnection._run.
        raw = sqlite3.connect(self.path, timeout=0, isolation_level=None, check_same_thread=False)
        raw.row_factory = sqlite3.Row
        conn = SQLiteConnection(raw, self.dialect, self, None)
        conn._run("PRAGMA journal_mode=WAL", ())
        # FULL: a commit is on disk before we answer 201 ("durable").
        conn._run("PRAGMA synchronous=FULL", ())
        conn._run("PRAGMA foreign_keys=ON", ())
        return raw

    def signal_wakeups(self) -> None:
        """Tell the other processes' wake-up watchers that a commit published
        wake-ups. After the commit: a failure here loses no data (they still
        look every wakeups.SIGNAL_SAFETY_S), so it is logged, not raised."""
        if not self.wake_signal_path:
            return
        if self._wake_signal is None:
            self._wake_signal = FileSignal(self.wake_signal_path)
        try:
            self._wake_signal.touch()
        except OSError as e:
            log.warning("cannot touch the wake-up signal %s: %s", self.wake_signal_path, e)

    def _lock(self):
        if self._locks is None:
            self._locks = (threading.Lock(), threading.RLock())
        return self._locks

    @contextlib.contextmanager
    def connection(self):
        # Connections are reused from a small per-process pool: opening one and
        # setting PRAGMAs costs more than most of our queries, and one per
        # thread would mean one per greenlet (thousands) under gevent.
        self.closed = False   # used again after close(): open again
        pool_lock, write_lock = self._lock()
        with pool_lock:
            raw = self._idle.pop() if self._idle else None
        if raw is None:
            raw = self._new()
        try:
            yield SQLiteConnection(raw, self.dialect, self, write_lock)
        finally:
            if raw.in_transaction:
                raw.execute("ROLLBACK")
            with pool_lock:
                keep = len(self._idle) < SQLITE_IDLE_CONNECTIONS
                if keep:
                    self._idle.append(raw)
            if not keep:
                raw.close()

    def close(self):
        self.closed = True
        pool_lock, _ = self._lock()
        with pool_lock:
            idle, self._idle = self._idle, []
        for raw in idle:
            raw.close()


# ----------------------------------------------------------------------- PostgreSQL

_PLACEHOLDER = re.compile(r"\?")


class PostgresConnection(Connection):
    def _run(self, sql, params):
        import psycopg

        sql = _PLACEHOLDER.sub("%s", sql.replace("%", "%%"))
        try:
            return self.raw.execute(sql, params)
        except psycopg.OperationalError as e:
            raise StoreUnavailable(f"the database is unavailable: {e}") from e

    def _begin(self, lock, durable):
        self._run("BEGIN", ())
        if not durable:
            # PostgreSQL's own form of the same trade: the commit is not
            # waited for on disk, and a crash can lose it, never corrupt.
            self._run("SET LOCAL synchronous_commit = off", ())
        if lock is not None:
            self._run("SELECT pg_advisory_xact_lock(?)", (lock,))

    def _commit(self):
        self._run("COMMIT", ())

    def _rollback(self):
        try:
            self.raw.execute("ROLLBACK")
        except Exception:  # connection may be broken; the pool discards it
            pass


class PostgresDatabase(Database):
    dialect = "postgresql"

    def __init__(self, url: str):
        try:
            import psycopg  # noqa: F401
            import psycopg_pool  # noqa: F401
        except ImportError:
            raise ConfigError(
                "PostgreSQL support needs the postgres extra: pip install 'jobcloud[postgres]'"
            ) from None
        self.url = url
        self._pool = None
        self._pool_lock = threading.Lock()

    def _get_pool(self):
        # Created on first use, i.e. after gunicorn has forked: a pool made in
        # the master would share sockets between processes.
        if self._pool is None:
            with self._pool_lock:
                if self._pool is None:
                    from psycopg.rows import dict_row
                    from psycopg_pool import ConnectionPool

                    self._pool = ConnectionPool(
                        self.url, min_size=1, max_size=16, open=True, timeout=30,
                        kwargs={"autocommit": True, "row_factory": dict_row},
                    )
        return self._pool

    def has_schema(self) -> bool:
        with self.connection() as conn:
            found = conn.query_one("SELECT to_regclass('schema_migrations') IS NOT NULL AS found")
            return found["found"]

    @contextlib.contextmanager
    def connection(self):
        import psycopg
        import psycopg_pool

        self.closed = False   # used again after close(): open again
        try:
            cm = self._get_pool().connection()
            raw = cm.__enter__()
        except (psycopg.OperationalError, psycopg_pool.PoolTimeout) as e:
            raise StoreUnavailable(f"the database is unavailable: {e}") from e
        try:
            yield PostgresConnection(raw, self.dialect, self)
        except BaseException as e:
            cm.__exit__(type(e), e, e.__traceback__)
            raise
        else:
            cm.__exit__(None, None, None)

    def close(self):
        self.closed = True
        if self._pool is not None:
            self._pool.close()
            self._pool = None


# ------------------------------------------------------------------------ helpers

def _migration_files() -> list[tuple[int, str]]:
    files = []
    for entry in resources.files("proxy").joinpath("migrations").iterdir():
        m = re.match(r"^(\d{4})_.*\.sql$", entry.name)
        if m:
            files.append((int(m.group(1)), entry.read_text(encoding="utf-8")))
    return sorted(files)


def _split_sql(sql: str) -> list[str]:
    lines = [ln for ln in sql.splitlines() if not ln.strip().startswith("--")]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


def _now() -> float:
    import time

    return time.time()


# ------------------------------------------------------------ per-request access

def get_conn() -> Connection:
    """The request's connection, opened on first use and closed at teardown."""
    from flask import current_app, g

    if "db_conn" not in g:
        cm = current_app.extensions["jobcloud"].db.connection()
        g.db_conn = cm.__enter__()
        g.db_cm = cm
    return g.db_conn


def close_conn(exc=None) -> None:
    from flask import g

    cm = g.pop("db_cm", None)
    g.pop("db_conn", None)
    if cm is not None:
        cm.__exit__(None, None, None)
