"""Wake-ups: a request that waits (a claim long-poll, a live stream) sleeps
until a committed change concerns it, instead of reading the store every few
milliseconds.

Topics name what changed:
  ``w:<worker id>``  a job was reserved for the worker, one of its jobs was
                     cancelled, it was drained, resumed or retired;
  ``j:<job id>``     the job's state or its output changed;
  ``u:<user id>``    one of the user's jobs changed.

Publishing (`notify`, `notify_jobs`) happens inside the writing transaction,
so a waiter is woken only by what was committed, and a rolled-back change
wakes nobody. Waiters in the committing process are woken right after the
commit (Connection.on_commit); the others hear it through the database:
- PostgreSQL: ``pg_notify``; the server delivers it at commit to every
  listening process of every proxy instance.
- SQLite (one host): a row in ``wakeups``, and after the commit the writer
  touches a signal file beside the database (``<db>-wake``). Each process has
  one watcher that sleeps on that file with inotify (inotify.py) and, when it
  is touched, asks ``PRAGMA data_version`` (changed by any other connection's
  commit; no disk read) and reads the new rows. It also looks every
  `SIGNAL_SAFETY_S` (or `wakeup_poll_s` if longer) in case a touch was lost (a writer killed between its
  commit and the touch). Without inotify (not Linux) it looks every
  `wakeup_poll_s` instead.

Listening: one `Listener` per process owns the only listening connection or
watcher and fans a topic out, in memory, to the `Subscription`s waiting on it.
Idle waiters cost nothing: no query per waiter, one cheap look per process.
The watcher starts with the first subscription and stops when nobody has
waited for a while. A waiter subscribes before it reads the store, so a change
committed between its read and its wait still wakes it. When the listener may
have missed something (a reconnect, rows pruned before it read them) it wakes
every waiter, which then reads the store again: a spurious wake-up costs one
read, a missed one would cost a whole wait.
"""
from __future__ import annotations

import logging
import random
import sqlite3
import threading
import time

from . import inotify

log = logging.getLogger(__name__)

CHANNEL = "jobcloud"
# How often a SQLite watcher looks for other processes' commits where inotify
# is missing (the wakeup_poll_s setting): each look is a few microseconds.
SQLITE_POLL_S = 0.004
# With inotify, how often it looks anyway (a touch lost to a killed writer).
SIGNAL_SAFETY_S = 1.0
# Rows kept in `wakeups`: a watcher more than this far behind wakes everyone.
SQLITE_KEEP_ROWS = 20_000
# A listener with no waiters for this long stops (a process that serves no
# long requests keeps no watcher).
IDLE_STOP_S = 30.0
# Between two tries to reconnect a lost PostgreSQL listening connection.
RECONNECT_S = 1.0


def worker_topic(worker_id: str) -> str:
    return f"w:{worker_id}"


def job_topic(job_id: str) -> str:
    return f"j:{job_id}"


def user_topic(user_id: str) -> str:
    return f"u:{user_id}"


# -------------------------------------------------------------------- publishing

def notify(conn, *topics: str) -> None:
    """Wake the waiters on `topics` once the current transaction commits."""
    if not topics:
        return
    if conn.db is not None:
        conn.on_commit(lambda: conn.db.deliver_locally(topics))
        if conn.dialect == "sqlite":
            conn.on_commit(conn.db.signal_wakeups)   # once per transaction
    if conn.dialect == "postgresql":
        for topic in dict.fromkeys(topics):
            conn.execute("SELECT pg_notify(?, ?)", (CHANNEL, topic))
        return
    conn.execute(f"INSERT INTO wakeups (topic) VALUES {', '.join('(?)' for _ in topics)}",
                 tuple(topics))
    _prune_now_and_then(conn)


def notify_jobs(conn, job_ids, *, holder: bool = False) -> None:
    """Wake the waiters on these jobs and on their owners (and, with `holder`,
    on the worker holding each), as they are in the jobs table now."""
    job_ids = list(job_ids)
    if not job_ids:
        return
    rows = conn.query(f"SELECT id, owner_id, worker_id FROM jobs WHERE id IN"
                      f" ({', '.join('?' for _ in job_ids)})", tuple(job_ids))
    topics = [t for r in rows for t in (job_topic(r["id"]), user_topic(r["owner_id"]))]
    if holder:
        topics += [worker_topic(r["worker_id"]) for r in rows if r["worker_id"]]
    notify(conn, *topics)


def _prune_now_and_then(conn) -> None:
    # About one write in 500 trims the table; watchers read only new rows by id.
    if random.random() < 0.002:
        conn.execute("DELETE FROM wakeups WHERE id < (SELECT MAX(id) FROM wakeups) - ?",
                     (SQLITE_KEEP_ROWS,))


# --------------------------------------------------------------------- listening

class Subscription:
    """One waiter's interest in some topics; use as a context manager."""

    def __init__(self, listener: "Listener", topics: tuple[str, ...]):
        self.listener = listener
        self.topics = topics
        self._event = threading.Event()

    def wait(self, timeout: float) -> bool:
        """Sleep until a topic fires (True, and re-armed) or `timeout` passes (False)."""
        woken = self._event.wait(max(0.0, timeout))
        if woken:   # (a fire right after a timeout stays set for the next wait)
            self._event.clear()
        return woken

    def fire(self) -> None:
        self._event.set()

    def __enter__(self) -> "Subscription":
        return self

    def __exit__(self, *exc) -> None:
        self.listener._remove(self)


class Listener:
    """The process's one listener on the database's wake-ups.

    Args:
        db: the proxy's Database (its dialect and where it is).
    """

    def __init__(self, db, *, poll_s: float = SQLITE_POLL_S):
        self.db = db
        self.poll_s = poll_s
        db.local_wakeups = self._deliver
        self._waiters: dict[str, set[Subscription]] = {}
        self._lock = None
        self._thread = None
        self._source = None
        self._idle_since = time.monotonic()
        self.closed = False

    def subscribe(self, *topics: str) -> Subscription:
        """Start waiting on `topics`; the listener is listening when this returns.

        Raises:
            StoreUnavailable: the database cannot be reached to listen.
        """
        sub = Subscription(self, topics)
        with self._guard():
            for topic in topics:
                self._waiters.setdefault(topic, set()).add(sub)
            try:
                self._ensure_started()
            except BaseException:
                self._remove_locked(sub)
                raise
        return sub

    def wake_all(self) -> None:
        """Wake every waiter (a shutdown, or changes that may have been missed).

        Takes no lock, so a signal handler may call it: it only sets events.
        """
        while True:
            try:
                subs = {s for subs in list(self._waiters.values()) for s in list(subs)}
                break
            except RuntimeError:  # changed while copied: copy again
                continue
        for sub in subs:
            sub.fire()

    def close(self) -> None:
        self.closed = True
        self.wake_all()

    # -- internals

    def _guard(self):
        # Made on first use: after gunicorn's gevent worker patched threading.
        if self._lock is None:
            self._lock = threading.Lock()
        return self._lock

    def _remove(self, sub: Subscription) -> None:
        with self._guard():
            self._remove_locked(sub)

    def _remove_locked(self, sub: Subscription) -> None:
        for topic in sub.topics:
            subs = self._waiters.get(topic)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self._waiters[topic]
        if not self._waiters:
            self._idle_since = time.monotonic()

    def _deliver(self, topics) -> None:
        with self._guard():
            subs = {s for t in topics for s in self._waiters.get(t, ())}
        for sub in subs:
            sub.fire()

    def _ensure_started(self) -> None:
        """Called with the lock held: open the source now (so nothing committed
        after this returns is missed), and run the loop if it is not running."""
        if self._thread is not None:
            return
        self._source = (_PostgresSource if self.db.dialect == "postgresql" else _SQLiteSource)(
            self.db, self.poll_s)
        self._thread = threading.Thread(target=self._run, name="wakeups", daemon=True)
        self._thread.start()

    def _should_stop(self) -> bool:
        with self._guard():
            if self.closed or self.db.closed or (not self._waiters
                               and time.monotonic() - self._idle_since > IDLE_STOP_S):
                self._thread = None
                return True
            return False

    def _run(self) -> None:
        source = self._source
        try:
            while not self._should_stop():
                try:
                    topics = source.poll(self.poll_s)
                except Exception as e:  # the loop boundary: reconnect, wake all
                    if self._should_stop():
                        return
                    log.warning("wake-ups: %s; listening again", e)
                    self.wake_all()
                    time.sleep(RECONNECT_S)
                    try:
                        source.reopen()
                    except Exception as again:
                        log.warning("wake-ups: cannot listen yet: %s", again)
                        continue
                    self.wake_all()  # what was committed while not listening
                    continue
                if topics is None:
                    self.wake_all()   # something may have been missed
                elif topics:
                    self._deliver(topics)
        finally:
            source.close()


class _SQLiteSource:
    """Commits seen through PRAGMA data_version, topics read from `wakeups`,
    looked at when the signal file is touched (or every poll_s without inotify)."""

    def __init__(self, db, poll_s: float):
        self.path = db.path
        self.poll_s = poll_s
        self.signal = None
        if db.wake_signal_path and inotify.available():
            self.signal = inotify.FileSignal(db.wake_signal_path)
        self.reopen()

    def reopen(self) -> None:
        if self.signal is not None:
            try:
                self.signal.watch()   # before reading: a later touch is not missed
            except OSError as e:
                log.warning("wake-ups: cannot watch %s (%s); looking every %s s instead",
                            self.signal.path, e, self.poll_s)
                self.signal.close()
                self.signal = None
        # Reads only, which WAL mode almost never makes wait; a short timeout
        # keeps SQLite's busy handler (it sleeps in C) from stopping the process.
        self.raw = sqlite3.connect(self.path, timeout=0.05, isolation_level=None,
                                   check_same_thread=False)
        self.version = self._version()
        self.last_id = self.raw.execute("SELECT COALESCE(MAX(id), 0) FROM wakeups").fetchone()[0]

    def _version(self) -> int:
        return self.raw.execute("PRAGMA data_version").fetchone()[0]

    def poll(self, interval: float):
        """The topics committed since the last poll ([] for none), or None when
        some may have been pruned before this read them."""
        if self.signal is None:
            time.sleep(interval)
        else:
            # Touched, replaced or timed out: look.
            self.signal.wait(max(SIGNAL_SAFETY_S, interval))
        version = self._version()
        if version == self.version:
            return []
        self.version = version
        rows = self.raw.execute("SELECT id, topic FROM wakeups WHERE id > ? ORDER BY id",
                                (self.last_id,)).fetchall()
        if not rows:
            return []
        # More rows since the last read than the table keeps: some may have
        # been pruned unread. (A gap alone proves nothing: rolled-back ids.)
        missed = rows[-1][0] - self.last_id > SQLITE_KEEP_ROWS
        self.last_id = rows[-1][0]
        return None if missed else {topic for _, topic in rows}

    def close(self) -> None:
        self.raw.close()
        if self.signal is not None:
            self.signal.close()


class _PostgresSource:
    """LISTEN on one connection of its own (outside the pool)."""

    def __init__(self, db, poll_s: float = 0):
        self.url = db.url
        self.raw = None
        self.reopen()

    def reopen(self) -> None:
        import psycopg

        from .errors import StoreUnavailable

        self.close()
        try:
            self.raw = psycopg.connect(self.url, autocommit=True)
            self.raw.execute(f"LISTEN {CHANNEL}")
        except psycopg.OperationalError as e:
            raise StoreUnavailable(f"the database is unavailable: {e}") from e

    def poll(self, interval: float):
        if self.raw is None:
            self.reopen()
        # Wait up to a second for the first notice, then take what is queued.
        topics = set()
        for notice in self.raw.notifies(timeout=1.0, stop_after=1):
            topics.add(notice.payload)
        for notice in self.raw.notifies(timeout=0, stop_after=10_000):
            topics.add(notice.payload)
        return topics

    def close(self) -> None:
        if self.raw is not None:
            try:
                self.raw.close()
            except Exception:  # already broken: nothing to close
                pass
            self.raw = None
