"""Retention and storage quotas: how long a finished job's files are kept, and
how much a user may keep.

A finished job's script, dataset, output archive and logs expire
`retention_days` after it finished (the configuration's default, or the
user's `retention_days` limit), unless its owner pinned it. The job row stays,
with `expired_at` set: its page and JSON say "outputs expired", downloads
answer 410 `expired`.

Blobs are content-addressed (blobs.py), so one file may serve many jobs (the
same dataset submitted again, by its owner or anyone else). A blob is deleted
only when no unexpired job refers to it: queued and running jobs are never
expired, so a blob a live job needs is never deleted. Nor is a finished job
expired while a queued or running child (dependencies.py) still needs its outputs.

The sweep (`sweep`, run by a `Sweeper` thread in every proxy process and by
`jobcloud-proxy sweep`) is safe with any number of processes and instances on
one database, in two steps:

1. Expire: in one transaction (serialized between sweepers), each due job is
   claimed with a compare-and-set UPDATE (so a job expires once, and never
   after its owner pinned it), its logs are deleted, and each of its blobs
   that no unexpired job refers to any more is queued in `blob_deletions`.
2. Delete, after that commit: each queued blob is claimed by deleting its row
   (one sweeper wins), checked again, and unlinked, all under the blob lock.
   Every transaction that makes a job refer to a blob (a submission, a result
   with outputs) holds the same lock and puts the file in place under it
   (`hold_blobs`), so a blob is never unlinked between a new job's check that
   the file exists and the commit of its row. A file already gone is fine.
   A result's archive that its job did not keep (a retried try's outputs)
   is queued the same way, in the result's transaction
   (`release_if_unreferenced`).

Storage: a user is charged the size of each distinct blob their unexpired
jobs refer to, once however many of their jobs share it. A blob two users
share is charged to each in full: either one's jobs alone keep it on disk, and
a user's usage must not jump when someone else's jobs expire. Logs live in the
database and are bounded per job (log_max_bytes); they are not counted.
"""
from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import dataclass, field

from . import dependencies
from .blobs import BlobStore, human_size
from .db import PG_BLOB_LOCK, PG_SWEEP_LOCK
from .errors import Gone, StorageQuotaExceeded
from .models import iso

log = logging.getLogger(__name__)

DAY_S = 86400
MiB = 1024 * 1024
# Jobs expired, or blobs deleted, per transaction: each is short, so a sweep
# never holds the write lock (SQLite) or the blob lock long.
BATCH = 200
# An S3 object no job names is an orphan once it is this old (queue_orphans):
# far past any submission or result in flight, and past the longest presigned
# PUT a worker may still be using (blob_presign_ttl_s is at most 7 days).
ORPHAN_AGE_S = 8 * DAY_S
# How often one proxy process lists the store for orphans (a listing reads
# every object's name: cheap, but not every few minutes in every process).
ORPHAN_EVERY_S = 6 * 3600
# "Keep for ever" (retention_days = 0) as a number of days the SQL can subtract.
FOREVER_DAYS = 10 ** 7
# A job's stored files; a requirements.txt (requirements.py) is kept like its script.
BLOB_COLUMNS = ("script", "dataset", "output", "requirements")


# ------------------------------------------------------------ per-user settings

def retention_days(default_days: int, user_limits: dict) -> int:
    """Days a user's finished jobs are kept; 0 is for ever."""
    override = user_limits.get("retention_days")
    return default_days if override is None else override


def quota_bytes(default_mb: int, user_limits: dict) -> int | None:
    """The user's storage quota in bytes, None for no quota."""
    override = user_limits.get("max_storage_mb")
    if override is not None:
        return override * MiB
    return default_mb * MiB if default_mb else None


def expires_at(job: dict, days: int) -> float | None:
    """When a finished, unpinned, unexpired job's files expire; None otherwise."""
    if not job.get("finished_at") or job.get("pinned") or job.get("expired_at") or not days:
        return None
    return job["finished_at"] + days * DAY_S


# ------------------------------------------------------------------------ pins

def set_pinned(conn, job: dict, pinned: bool) -> None:
    """Pin a job (its files are kept until unpinned) or unpin it.

    Raises:
        Gone: pinning a job whose files already expired.
    """
    with conn.transaction():
        n = conn.execute("UPDATE jobs SET pinned = ? WHERE id = ? AND expired_at IS NULL",
                         (int(pinned), job["id"]))
    if not n and pinned:
        raise Gone(f"the files of job {job['id']} already expired; nothing is left to keep")


# --------------------------------------------------------------------- storage

def _blobs_sql(where: str) -> str:
    """The distinct (owner, blob, size) of unexpired jobs; `where` filters them further."""
    return " UNION ".join(
        f"SELECT owner_id, {c}_blob AS blob, {c}_size AS size FROM jobs"
        f" WHERE expired_at IS NULL AND {c}_blob IS NOT NULL{where}" for c in BLOB_COLUMNS)


def storage_by_user(conn, user_id: str | None = None) -> dict[str, dict]:
    """Stored bytes and blobs per user id (every user with some, or only `user_id`).

    Returns:
        {user_id: {"bytes": n, "blobs": n}}
    """
    where, params = ("", ()) if user_id is None else (" AND owner_id = ?", (user_id,) * len(BLOB_COLUMNS))
    rows = conn.query(f"SELECT owner_id, SUM(size) AS bytes, COUNT(*) AS blobs"
                      f" FROM ({_blobs_sql(where)}) b GROUP BY owner_id", params)
    # PostgreSQL sums BIGINT as NUMERIC (a Decimal here).
    return {r["owner_id"]: {"bytes": int(r["bytes"] or 0), "blobs": int(r["blobs"])} for r in rows}


def storage_of(conn, user_id: str) -> int:
    return storage_by_user(conn, user_id).get(user_id, {"bytes": 0})["bytes"]


def storage_report(conn, *, default_days: int, default_quota_mb: int) -> list[dict]:
    """Every user's storage, quota and retention, for /usage, the dashboard and /metrics."""
    used = storage_by_user(conn)
    pinned = {r["owner_id"]: int(r["n"]) for r in conn.query(
        "SELECT owner_id, COUNT(*) AS n FROM jobs WHERE pinned = 1 AND expired_at IS NULL"
        " GROUP BY owner_id")}
    rows = conn.query("SELECT u.id, u.name, l.retention_days, l.max_storage_mb FROM users u"
                      " LEFT JOIN user_limits l ON l.user_id = u.id ORDER BY u.name")
    return [user_storage(r["name"], used.get(r["id"], {}).get("bytes", 0),
                         pinned.get(r["id"], 0), r, default_days, default_quota_mb) for r in rows]


def user_storage(name: str, used: int, pinned: int, user_limits: dict, default_days: int,
                 default_quota_mb: int) -> dict:
    """One user's storage figures as JSON."""
    quota = quota_bytes(default_quota_mb, user_limits)
    return {"user": name, "bytes": used, "human": human_size(used), "quota_bytes": quota,
            "quota_human": human_size(quota) if quota is not None else None,
            "pinned_jobs": pinned, "retention_days": retention_days(default_days, user_limits)}


def storage_of_user(conn, user: dict, user_limits: dict, *, default_days: int,
                    default_quota_mb: int) -> dict:
    """`user_storage` of one user, read from the store."""
    pinned = conn.query_one("SELECT COUNT(*) AS n FROM jobs WHERE owner_id = ? AND pinned = 1"
                            " AND expired_at IS NULL", (user["id"],))["n"]
    return user_storage(user["name"], storage_of(conn, user["id"]), int(pinned), user_limits,
                        default_days, default_quota_mb)


def check_quota(conn, user_id: str, user_limits: dict, incoming, *, default_quota_mb: int,
                default_days: int) -> None:
    """Refuse a submission that would take the user's storage past their quota.

    Args:
        incoming: the submission's files (objects with sha256 and size); one the
            user's kept jobs already store adds nothing.

    Raises:
        StorageQuotaExceeded: 413 naming the quota, the usage and what the job adds.
    """
    quota = quota_bytes(default_quota_mb, user_limits)
    if quota is None:
        return
    # Most submissions are far below the quota: the sum with repeats (one
    # index-only read) settles them; the exact, de-duplicated sum reads every
    # kept job of the user (130 ms for 20,000 jobs on SQLite, against 9).
    if _storage_bound(conn, user_id) + sum(f.size for f in incoming) <= quota:
        return
    used = storage_of(conn, user_id)
    adds = sum(f.size for f in {f.sha256: f for f in incoming}.values()
               if not _user_has(conn, user_id, f.sha256))
    if used + adds <= quota:
        return
    days = retention_days(default_days, user_limits)
    expiry = (f"finished jobs' files expire {days} days after they finish unless pinned"
              if days else "finished jobs' files are kept until deleted")
    raise StorageQuotaExceeded(
        f"storage quota exceeded: your kept jobs store {human_size(used)} of your storage quota "
        f"of {human_size(quota)}, and this job adds {human_size(adds)}. Unpin jobs you no "
        f"longer need ({expiry}), or ask an admin for a larger quota (max_storage_mb)")


def _storage_bound(conn, user_id: str) -> int:
    """The user's stored bytes counting a blob once per job that uses it: at least `storage_of`."""
    row = conn.query_one(
        "SELECT COALESCE(SUM(script_size), 0) + COALESCE(SUM(dataset_size), 0)"
        " + COALESCE(SUM(output_size), 0) + COALESCE(SUM(requirements_size), 0) AS n"
        " FROM jobs WHERE owner_id = ? AND expired_at IS NULL",
        (user_id,))
    return int(row["n"])


def _user_has(conn, user_id: str, blob: str) -> bool:
    return conn.query_one(" UNION ALL ".join(
        f"SELECT 1 AS x FROM jobs WHERE {c}_blob = ? AND expired_at IS NULL AND owner_id = ?"
        for c in BLOB_COLUMNS), (blob, user_id) * len(BLOB_COLUMNS)) is not None


# ------------------------------------------------------------------- the sweep

def hold_blobs(conn) -> None:
    """Inside a transaction that makes a job refer to blobs: keep the sweep
    from unlinking any blob until it commits. Put the files in place (or find
    them there) after this call, so the row and its files commit together.

    SQLite: every write transaction holds the database's one write lock
    already (BEGIN IMMEDIATE). PostgreSQL: the blob lock, shared, so
    submissions and results never wait for each other, only for a sweep.
    """
    if conn.dialect == "postgresql":
        conn.execute("SELECT pg_advisory_xact_lock_shared(?)", (PG_BLOB_LOCK,))


def is_referenced(conn, blob: str) -> bool:
    """Whether any unexpired job (queued, running, or finished and kept) refers to `blob`."""
    return conn.query_one(" UNION ALL ".join(
        f"SELECT 1 AS x FROM jobs WHERE {c}_blob = ? AND expired_at IS NULL"
        for c in BLOB_COLUMNS), (blob,) * len(BLOB_COLUMNS)) is not None


def release_if_unreferenced(conn, blob: str, now: float) -> bool:
    """Inside the transaction that stored `blob` for a job that did not keep
    it (a retried try's outputs, retries.retry): queue it for the sweep's
    delete step when no unexpired job refers to it.

    Queued, not unlinked here: the blob lock this transaction holds is shared
    on PostgreSQL, so a submission or result storing the same content may be
    between its check and its commit; the delete step checks again under the
    exclusive lock. A blob another job refers to (content-addressed: the
    final try may write the same archive) is left alone.

    Returns:
        Whether it was queued.
    """
    if is_referenced(conn, blob):
        return False
    conn.execute("INSERT INTO blob_deletions (blob, queued_at) VALUES (?, ?)"
                 " ON CONFLICT DO NOTHING", (blob, now))
    return True


@dataclass
class SweepResult:
    """What one sweep did: the jobs it expired and the blobs it unlinked (name -> size)."""

    expired_jobs: list[str] = field(default_factory=list)
    deleted: dict[str, int] = field(default_factory=dict)
    # S3 objects no job named, queued for deletion (queue_orphans).
    orphans: int = 0

    @property
    def deleted_bytes(self) -> int:
        return sum(self.deleted.values())


def sweep(conn, blobs: BlobStore, *, default_days: int, now: float | None = None,
          batch: int = BATCH, stop: threading.Event | None = None,
          orphans: bool = True) -> SweepResult:
    """Expire every job that is due at `now`, then delete the blobs no job needs.

    Args:
        default_days: the configuration's retention_days (0: for ever, unless
            a user's own retention_days says otherwise).
        stop: ends the sweep between two batches when set.
        orphans: also queue the S3 store's objects no job names that are
            older than ORPHAN_AGE_S (queue_orphans).
    """
    now = time.time() if now is None else now
    result = SweepResult()
    if orphans and blobs.direct:
        result.orphans = queue_orphans(conn, blobs, now=now)
    while not (stop and stop.is_set()):
        expired = expire_due(conn, default_days=default_days, now=now, batch=batch)
        result.expired_jobs += expired
        if len(expired) < batch:
            break
    while not (stop and stop.is_set()):
        deleted = delete_unneeded(conn, blobs, batch=batch)
        result.deleted.update(deleted)
        if not deleted and not conn.query_one("SELECT 1 AS x FROM blob_deletions LIMIT 1"):
            break
    return result


def queue_orphans(conn, blobs, *, now: float, batch: int = BATCH) -> int:
    """Queue for deletion the S3 store's objects that no job names and that are
    older than ORPHAN_AGE_S: an output archive a worker PUT and never posted
    the result of (it crashed, its lease ran out), or a submission's upload
    whose row never committed and whose clean-up failed (the store was down).

    Names there are random (s3blobs.py): an object no job names is never
    named later, except by a submission or result in flight, which is seconds
    old, not a day. Queued, not deleted: the delete step checks again under
    the blob lock like any other.

    Returns:
        How many it queued.
    """
    queued = 0
    names = list(blobs.names_older_than(now - ORPHAN_AGE_S))
    for start in range(0, len(names), batch):
        with conn.transaction():
            for name in names[start:start + batch]:
                if not is_referenced(conn, name) and conn.execute(
                        "INSERT INTO blob_deletions (blob, queued_at) VALUES (?, ?)"
                        " ON CONFLICT DO NOTHING", (name, now)):
                    queued += 1
    if queued:
        log.info("retention: queued %d object(s) no job names", queued)
    return queued


def expire_due(conn, *, default_days: int, now: float, batch: int = BATCH) -> list[str]:
    """Step 1: expire up to `batch` due jobs and queue their unneeded blobs for deletion.

    Returns:
        The ids of the jobs this call expired (a job another sweeper expired first is not among them).
    """
    default = default_days or FOREVER_DAYS
    expired: list[str] = []
    # Serialized between sweepers: two sweepers expiring the last two jobs of a
    # shared blob at once would each still see the other's job and neither queue it.
    with conn.transaction(lock=PG_SWEEP_LOCK):
        shortest = conn.query_one("SELECT MIN(retention_days) AS d FROM user_limits")["d"]
        shortest = min(default, shortest) if shortest is not None else default
        due = conn.query(
            "SELECT j.id, " + ", ".join(f"j.{c}_blob" for c in BLOB_COLUMNS) + " FROM jobs j"
            " LEFT JOIN user_limits l ON l.user_id = j.owner_id"
            # The first bound uses jobs_retention; the second is each user's own.
            " WHERE j.expired_at IS NULL AND j.finished_at < ? AND j.pinned = 0"
            " AND j.finished_at < ? - COALESCE(l.retention_days, ?) * 86400.0"
            # A parent's outputs stay while a queued or running child still needs them.
            f" AND NOT {dependencies.NEEDED_BY_CHILD_SQL}"
            " ORDER BY j.finished_at, j.id LIMIT ?",
            (now - shortest * DAY_S, now, default, batch))
        candidates: set[str] = set()
        for job in due:
            if not conn.execute(
                    "UPDATE jobs SET expired_at = ?, stdout_tail = NULL, stderr_tail = NULL"
                    " WHERE id = ? AND expired_at IS NULL AND pinned = 0", (now, job["id"])):
                continue   # pinned since it was read
            conn.execute("DELETE FROM job_logs WHERE job_id = ?", (job["id"],))
            # Earlier tries' log tails (retries.py) go with the logs; their exits stay.
            conn.execute("UPDATE job_tries SET stdout_tail = NULL, stderr_tail = NULL"
                         " WHERE job_id = ?", (job["id"],))
            expired.append(job["id"])
            candidates.update(job[f"{c}_blob"] for c in BLOB_COLUMNS if job[f"{c}_blob"])
        for blob in sorted(candidates):
            if not is_referenced(conn, blob):
                conn.execute("INSERT INTO blob_deletions (blob, queued_at) VALUES (?, ?)"
                             " ON CONFLICT DO NOTHING", (blob, now))
    if expired:
        log.info("retention: expired the files of %d job(s)", len(expired))
    return expired


def delete_unneeded(conn, blobs: BlobStore, *, batch: int = BATCH) -> dict[str, int]:
    """Step 2: unlink up to `batch` queued blobs that no unexpired job refers to.

    Each is claimed by deleting its queue row (of several sweepers one gets
    it), checked again (a submission may have referred to it since), and
    unlinked, under the exclusive blob lock: no transaction that adds a
    reference runs meanwhile (hold_blobs). A failed commit leaves the row to
    the next sweep, which finds the file gone: harmless.

    Returns:
        {blob: size} of the files this call unlinked.
    """
    names = [r["blob"] for r in conn.query(
        "SELECT blob FROM blob_deletions ORDER BY blob LIMIT ?", (batch,))]
    deleted: dict[str, int] = {}
    if not names:
        return deleted
    with conn.transaction(lock=PG_BLOB_LOCK):
        for name in names:
            if not conn.execute("DELETE FROM blob_deletions WHERE blob = ?", (name,)):
                continue   # another sweeper took it
            if is_referenced(conn, name):
                continue   # submitted again since it was queued: kept
            size = blobs.remove(name)
            if size is not None:
                deleted[name] = size
    if deleted:
        log.info("retention: deleted %d file(s), %s", len(deleted), human_size(sum(deleted.values())))
    return deleted


def gone(job: dict, what: str = "files") -> Gone:
    """The 410 for a download of an expired job."""
    return Gone(f"the {what} of job {job['id']} expired on {iso(job['expired_at'])} "
                "(retention); pin a job to keep its outputs", code="expired")


class Sweeper:
    """Runs the sweep every `interval_s` in a proxy process, on its own thread.

    One per process, like webhooks.Deliverer: nothing extra to deploy, and any
    number of them is safe (see the module docstring). `run_once(now=...)` is
    one pass, so tests drive it without the thread.
    """

    def __init__(self, db, blobs: BlobStore, *, default_days: int, interval_s: float):
        self.db = db
        self.blobs = blobs
        self.default_days = default_days
        self.interval_s = interval_s
        self._orphans_due = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def from_config(cls, db, blobs: BlobStore, cfg) -> Sweeper:
        return cls(db, blobs, default_days=cfg.retention_days, interval_s=cfg.retention_sweep_s)

    def start(self) -> Sweeper:
        self._thread = threading.Thread(target=self._loop, name="retention", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Stop after the batch in progress (only the flag when timeout is 0: signal handlers)."""
        self._stop.set()
        if self._thread is not None and timeout != 0:
            self._thread.join(timeout)

    def _loop(self) -> None:
        # The first pass after a random part of the interval: the processes of
        # an instance start together and would otherwise all sweep at once.
        delay = self.interval_s * random.uniform(0.1, 1.0)
        while not self._stop.wait(delay):
            if self.db.closed:
                return   # the app was closed (tests make many): nothing left to sweep for
            try:
                self.run_once()
            except Exception:  # the loop boundary: log, sweep again next time
                log.exception("retention sweep failed")
            delay = self.interval_s

    def run_once(self, now: float | None = None) -> SweepResult:
        orphans = time.monotonic() >= self._orphans_due
        if orphans:
            self._orphans_due = time.monotonic() + ORPHAN_EVERY_S
        with self.db.connection() as conn:
            return sweep(conn, self.blobs, default_days=self.default_days, now=now,
                         stop=self._stop, orphans=orphans)
