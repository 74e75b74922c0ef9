"""Workers and the jobs they hold: registration, heartbeats, round-robin claims,
leases, results, and requeueing the jobs of lost workers.

How a claim stays atomic on both databases: every change to who holds a job
happens inside a write transaction that takes the dispatch lock (SQLite:
BEGIN IMMEDIATE, which serializes writers; PostgreSQL: a transaction-scoped
advisory lock), and every state change is a compare-and-set UPDATE whose
WHERE clause restates the state it expects. Nothing lives in process memory,
so any number of gunicorn processes and proxy instances can serve workers.

Round-robin: a claim first runs `_dispatch`, which reserves queued jobs for
live workers with free slots and the capacity each job needs, always giving
the next job to the eligible worker that was served longest ago (`rr_seq`).
Then the claiming worker takes the jobs reserved for it. Jobs therefore go
around the workers in turn, whichever worker happens to poll first.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass

from . import accounts, store
from .db import PG_DISPATCH_LOCK
from .errors import Conflict, NotFound, ValidationError
from .models import (FINAL_STATES, LIVE_WORKER_STATES, JobState, WorkerState, is_lookup_key, iso,
                     new_id)

# How many queued jobs one dispatch query reads at most; a pass reads further
# batches only while free slots remain and the previous batch was full. A
# batch is sized from the free slots: most claims reserve one job, and
# building hundreds of rows for that was most of a claim's cost (bench/claim).
DISPATCH_BATCH = 256
DISPATCH_BATCH_PER_SLOT = 4
WORKER_LOST_REASON = "worker lost"


@dataclass(frozen=True)
class Capacity:
    cpus: float
    memory_mb: int
    gpus: int
    slots: int
    images: tuple[str, ...]
    disk_mb: int | None = None


def parse_capacity(data: dict) -> Capacity:
    """Validate a worker's reported capacity.

    Raises:
        ValidationError: a field is missing, of the wrong type or out of range.
    """
    try:
        cap = Capacity(
            cpus=_num(data, "cpus", float, 0.01, 4096),
            memory_mb=_num(data, "memory_mb", int, 16, 64 * 1024 * 1024),
            gpus=_num(data, "gpus", int, 0, 1024),
            slots=_num(data, "slots", int, 1, 1024),
            images=tuple(_images(data.get("images"))),
            disk_mb=(_num(data, "disk_mb", int, 0, 2**53) if data.get("disk_mb") is not None
                     else None),
        )
    except (TypeError, AttributeError):
        raise ValidationError("capacity must be a JSON object", code="invalid_capacity") from None
    return cap


def _num(data, key, kind, lo, hi):
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            (kind is int and not float(value).is_integer()):
        raise ValidationError(f"{key} must be a number", code="invalid_capacity")
    if not lo <= value <= hi:
        raise ValidationError(f"{key} must be between {lo} and {hi}", code="invalid_capacity")
    return kind(value)


def _images(value):
    if not isinstance(value, list) or not all(isinstance(i, str) and 0 < len(i) <= 200 for i in value):
        raise ValidationError("images must be a list of image names", code="invalid_capacity")
    if len(value) > 100:
        raise ValidationError("at most 100 images", code="invalid_capacity")
    return value


# ----------------------------------------------------------------- registration

def register_worker(conn, enrollment: dict, name: str, cap: Capacity, *, lease_timeout_s: float,
                    max_attempts: int, now: float | None = None) -> tuple[dict, str]:
    """Register a worker; a live worker of the same name is replaced (it restarted).

    Returns:
        (worker row, the worker's secret, shown once).
    """
    now = time.time() if now is None else now
    if not isinstance(name, str) or not 1 <= len(name) <= 64 or not name.isprintable():
        raise ValidationError("name must be 1-64 printable characters", code="invalid_name")
    secret = accounts.new_secret(accounts.WORKER_SECRET_PREFIX)
    worker_id = new_id("w")
    with conn.transaction(lock=PG_DISPATCH_LOCK):
        for old in conn.query("SELECT id FROM workers WHERE name = ? AND state IN (?, ?)",
                              (name, *LIVE_WORKER_STATES)):
            _retire_worker(conn, old["id"], WorkerState.GONE, now, max_attempts)
        rr = conn.query_one("SELECT COALESCE(MIN(rr_seq), 0) AS m FROM workers WHERE state IN (?, ?)",
                            LIVE_WORKER_STATES)["m"]
        conn.execute(
            "INSERT INTO workers (id, name, secret_hash, enrollment_id, state, cpus, memory_mb,"
            " gpus, slots, images, registered_at, last_seen_at, rr_seq, disk_mb)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (worker_id, name, accounts.hash_token(secret), enrollment["id"],
             WorkerState.ACTIVE.value, cap.cpus, cap.memory_mb, cap.gpus, cap.slots,
             json.dumps(list(cap.images)), now, now, rr, cap.disk_mb))
    return get_worker(conn, worker_id), secret


def worker_for_secret(conn, secret: str) -> dict | None:
    if not secret.startswith(accounts.WORKER_SECRET_PREFIX):
        return None
    return conn.query_one("SELECT * FROM workers WHERE secret_hash = ? AND state IN (?, ?)",
                          (accounts.hash_token(secret), *LIVE_WORKER_STATES))


def is_lost_worker_secret(conn, secret: str) -> bool:
    """True when `secret` belongs to a worker the proxy marked lost (it may register again)."""
    if not secret.startswith(accounts.WORKER_SECRET_PREFIX):
        return False
    return conn.query_one("SELECT id FROM workers WHERE secret_hash = ? AND state = ?",
                          (accounts.hash_token(secret), WorkerState.LOST.value)) is not None


def get_worker(conn, worker_id: str) -> dict | None:
    return conn.query_one("SELECT * FROM workers WHERE id = ?", (worker_id,))


def list_workers(conn, include_gone: bool = False) -> list[dict]:
    rows = conn.query(
        "SELECT w.*, (SELECT COUNT(*) FROM jobs j WHERE j.worker_id = w.id AND j.state = ?)"
        " AS running FROM workers w ORDER BY w.name, w.id", (JobState.RUNNING.value,))
    return [r for r in rows if include_gone or r["state"] in LIVE_WORKER_STATES]


def worker_json(w: dict) -> dict:
    return {"id": w["id"], "name": w["name"], "state": w["state"], "cpus": w["cpus"],
            "memory_mb": w["memory_mb"], "gpus": w["gpus"], "slots": w["slots"],
            "disk_mb": w.get("disk_mb"),
            "images": json.loads(w["images"]), "running": w.get("running"),
            "registered_at": iso(w["registered_at"]), "last_seen_at": iso(w["last_seen_at"])}


def set_worker_state(conn, worker_id: str, state: WorkerState, *, max_attempts: int,
                     now: float | None = None) -> dict:
    """Admin actions: drain, resume, revoke, or a worker deregistering itself."""
    now = time.time() if now is None else now
    with conn.transaction(lock=PG_DISPATCH_LOCK):
        worker = get_worker(conn, worker_id)
        if worker is None or worker["state"] not in LIVE_WORKER_STATES:
            raise NotFound(f"no live worker {worker_id!r}", code="worker_not_found")
        if state in (WorkerState.ACTIVE, WorkerState.DRAINING):
            conn.execute("UPDATE workers SET state = ? WHERE id = ?", (state.value, worker_id))
            _release_reservations(conn, worker_id)
        else:
            _retire_worker(conn, worker_id, state, now, max_attempts)
    return get_worker(conn, worker_id)


# ------------------------------------------------------------------- heartbeats

def heartbeat(conn, worker: dict, running_ids: list[str], *, lease_timeout_s: float,
              max_attempts: int, now: float | None = None) -> dict:
    """Record that a worker is alive and extend the leases of the jobs it holds.

    Returns:
        {"cancel": [...], "unknown": [...], "drain": bool}: jobs to stop because
        their owner cancelled, jobs the worker should stop because it no longer
        holds them, and whether the worker is draining.
    """
    now = time.time() if now is None else now
    with _worker_call(conn, worker, now, lease_timeout_s, max_attempts):
        # Only the jobs the worker says it runs: one it holds without knowing
        # (the answer to a claim was lost on the way) then expires and is
        # requeued, instead of being kept alive for ever by heartbeats.
        for chunk in (running_ids[i:i + 500] for i in range(0, len(running_ids), 500)):
            conn.execute(
                "UPDATE jobs SET lease_expires_at = ? WHERE worker_id = ? AND state = ?"
                f" AND id IN ({', '.join('?' for _ in chunk)})",
                (now + lease_timeout_s, worker["id"], JobState.RUNNING.value, *chunk))
        held = conn.query("SELECT id, cancel_requested FROM jobs WHERE worker_id = ? AND state = ?",
                          (worker["id"], JobState.RUNNING.value))
        state = get_worker(conn, worker["id"])["state"]
    held_ids = {r["id"] for r in held}
    return {
        "cancel": sorted(r["id"] for r in held if r["cancel_requested"]),
        "unknown": sorted(set(running_ids) - held_ids),
        "drain": state == WorkerState.DRAINING.value,
    }


@contextlib.contextmanager
def _worker_call(conn, worker: dict, now: float, lease_timeout_s: float, max_attempts: int):
    """The transaction of a heartbeat or a claim: lost workers reaped, this one marked seen.

    Not durable: a claim or heartbeat lost in a power cut costs a rerun of the
    job (its lease is gone, so the late result is refused), never the job.
    """
    with conn.transaction(lock=PG_DISPATCH_LOCK, durable=False):
        reap(conn, lease_timeout_s=lease_timeout_s, max_attempts=max_attempts, now=now)
        if not _touch(conn, worker["id"], now):
            raise NotFound("this worker was retired; register again", code="worker_retired")
        yield


def _touch(conn, worker_id: str, now: float) -> bool:
    return bool(conn.execute("UPDATE workers SET last_seen_at = ? WHERE id = ? AND state IN (?, ?)",
                             (now, worker_id, *LIVE_WORKER_STATES)))


# ------------------------------------------------------------------------ claims

def claim(conn, worker: dict, max_jobs: int, *, lease_timeout_s: float, max_attempts: int,
          now: float | None = None) -> list[dict]:
    """Give `worker` up to `max_jobs` jobs, in round-robin turn with the other live workers.

    Returns:
        The jobs now running under the worker's lease (possibly none).
    """
    now = time.time() if now is None else now
    with _worker_call(conn, worker, now, lease_timeout_s, max_attempts):
        _dispatch(conn, now, lease_timeout_s)
        mine = conn.query(
            "SELECT id FROM jobs WHERE state = ? AND worker_id = ? ORDER BY id LIMIT ?",
            (JobState.QUEUED.value, worker["id"], max(0, max_jobs)))
        taken = []
        for row in mine:
            n = conn.execute(
                "UPDATE jobs SET state = ?, attempt = attempt + 1, started_at = ?,"
                " lease_expires_at = ?, reserved_at = NULL, exit_code = NULL,"
                " failure_reason = NULL WHERE id = ? AND state = ? AND worker_id = ?",
                (JobState.RUNNING.value, now, now + lease_timeout_s, row["id"],
                 JobState.QUEUED.value, worker["id"]))
            if n:
                taken.append(row["id"])
        return [conn.query_one("SELECT * FROM jobs WHERE id = ?", (i,)) for i in taken]


def _dispatch(conn, now: float, lease_timeout_s: float) -> int:
    """Reserve queued jobs for live workers with free slots. Returns how many.

    Fair across users: each free slot goes to the user with the fewest jobs
    running or reserved now, divided by their priority weight (user_limits);
    ties go to the user served longest ago (`users.rr_seq`), then to the oldest
    queued job. A user at their max_running gets nothing more. So one user's thousand
    queued jobs cannot starve another's one, and users take turns. Within a
    user, jobs go in submission order; the job goes to the eligible worker that
    was served longest ago (round-robin across workers).
    """
    workers = conn.query(
        "SELECT w.id, w.cpus, w.memory_mb, w.gpus, w.slots, w.images, w.rr_seq,"
        " (SELECT COUNT(*) FROM jobs j WHERE j.worker_id = w.id AND j.state IN (?, ?)) AS used"
        " FROM workers w WHERE w.state = ? AND w.last_seen_at >= ?",
        (JobState.QUEUED.value, JobState.RUNNING.value, WorkerState.ACTIVE.value,
         now - lease_timeout_s))
    # A worker that lists no images can run nothing (and would make `IN ()`,
    # which PostgreSQL refuses).
    free = [w for w in (dict(w, images=set(json.loads(w["images"]))) for w in workers)
            if w["used"] < w["slots"] and w["images"]]
    if not free:
        return 0
    owners = _queued_owners(conn)
    if not owners:
        return 0
    load = _owner_load(conn, [w["id"] for w in workers])
    next_seq = conn.query_one("SELECT COALESCE(MAX(rr_seq), 0) AS m FROM workers")["m"] + 1
    user_seq = conn.query_one("SELECT COALESCE(MAX(rr_seq), 0) AS m FROM users")["m"] + 1
    slots = sum(w["slots"] - w["used"] for w in free)
    batch = min(DISPATCH_BATCH, max(16, DISPATCH_BATCH_PER_SLOT * slots))
    pending: dict[str, list[dict]] = {}   # owner -> fetched, not yet placed jobs
    after: dict[str, str] = {}            # owner -> id the next fetch starts after
    reserved = 0
    while owners and any(w["used"] < w["slots"] for w in free):
        owner = min(owners, key=lambda o: (load.get(o, 0) / owners[o]["weight"],
                                           owners[o]["rr_seq"], owners[o]["head"]))
        cap = owners[owner]["max_running"]
        if cap is not None and load.get(owner, 0) >= cap:
            del owners[owner]   # at their max_running: their jobs wait
            continue
        job, w = _next_placeable(conn, owner, free, pending, after, batch)
        if job is None:
            del owners[owner]   # nothing of theirs fits a free worker now
            continue
        n = conn.execute(
            "UPDATE jobs SET worker_id = ?, reserved_at = ? WHERE id = ? AND state = ?"
            " AND worker_id IS NULL", (w["id"], now, job["id"], JobState.QUEUED.value))
        if n:
            w["used"] += 1
            w["rr_seq"] = next_seq
            conn.execute("UPDATE workers SET rr_seq = ? WHERE id = ?", (next_seq, w["id"]))
            next_seq += 1
            reserved += 1
            load[owner] = load.get(owner, 0) + 1
            owners[owner]["rr_seq"] = user_seq
            conn.execute("UPDATE users SET rr_seq = ? WHERE id = ?", (user_seq, owner))
            user_seq += 1
        if pending.get(owner):
            owners[owner]["head"] = pending[owner][0]["id"]
    return reserved


def _next_placeable(conn, owner: str, free: list[dict], pending: dict, after: dict,
                    batch: int) -> tuple[dict | None, dict | None]:
    """The owner's oldest queued job some free worker can run now, with that worker."""
    while True:
        if not pending.get(owner):
            if after.get(owner) == "":
                return None, None  # read to the end already
            jobs = _queued_batch(conn, free, after.get(owner, ""), batch, owner)
            # A whole batch can fit the free workers' combined limits and yet
            # none of them alone (a GPU on one, the memory on another): the
            # next call reads on, so such a head cannot block what is behind it.
            after[owner] = jobs[-1]["id"] if len(jobs) == batch else ""
            pending[owner] = jobs
            if not jobs:
                return None, None
        job = pending[owner].pop(0)
        fits = [w for w in free if w["used"] < w["slots"] and _fits(job, w)]
        if fits:
            return job, min(fits, key=lambda w: (w["rr_seq"], w["id"]))


def _queued_owners(conn) -> dict[str, dict]:
    """Users with unreserved queued jobs -> their oldest job's id ("head"), their
    place in the turn ("rr_seq"), weight and max_running.

    A loose index scan (one index probe per user on jobs_queue), so its cost
    grows with the number of users waiting, not with the queue's length.
    """
    q = JobState.QUEUED.value
    rows = conn.query(
        "WITH RECURSIVE owners(owner_id) AS ("
        " SELECT MIN(owner_id) FROM jobs WHERE worker_id IS NULL AND state = ?"
        " UNION ALL"
        " SELECT (SELECT MIN(j.owner_id) FROM jobs j WHERE j.worker_id IS NULL AND j.state = ?"
        " AND j.owner_id > owners.owner_id) FROM owners WHERE owners.owner_id IS NOT NULL)"
        " SELECT owner_id, (SELECT MIN(j.id) FROM jobs j WHERE j.worker_id IS NULL"
        " AND j.state = ? AND j.owner_id = owners.owner_id) AS head,"
        " (SELECT u.rr_seq FROM users u WHERE u.id = owners.owner_id) AS rr_seq,"
        " (SELECT l.weight FROM user_limits l WHERE l.user_id = owners.owner_id) AS weight,"
        " (SELECT l.max_running FROM user_limits l WHERE l.user_id = owners.owner_id) AS max_running"
        " FROM owners WHERE owner_id IS NOT NULL", (q, q, q))
    return {r["owner_id"]: {"head": r["head"], "rr_seq": r["rr_seq"], "weight": r["weight"] or 1.0,
                            "max_running": r["max_running"]} for r in rows}


def _owner_load(conn, live_worker_ids: list[str]) -> dict[str, int]:
    """Jobs each user has running, or reserved on a live worker, right now."""
    load: dict[str, int] = {}
    for r in conn.query("SELECT owner_id, COUNT(*) AS n FROM jobs WHERE state = ? GROUP BY owner_id",
                        (JobState.RUNNING.value,)):
        load[r["owner_id"]] = r["n"]
    if live_worker_ids:
        marks = ", ".join("?" for _ in live_worker_ids)
        for r in conn.query(
                f"SELECT owner_id, COUNT(*) AS n FROM jobs WHERE worker_id IN ({marks})"
                " AND state = ? GROUP BY owner_id", (*live_worker_ids, JobState.QUEUED.value)):
            load[r["owner_id"]] = load.get(r["owner_id"], 0) + r["n"]
    return load


def _queued_batch(conn, free: list[dict], after: str, limit: int, owner: str) -> list[dict]:
    """The owner's next unreserved queued jobs after id `after` that a free worker could run."""
    # Filtering on the free workers' combined limits keeps a head of jobs no
    # one can run (say gpus=1 with no GPU worker) out of the scan altogether.
    images = sorted(set().union(*(w["images"] for w in free)))
    placeholders = ", ".join("?" for _ in images)
    return conn.query(
        "SELECT id, cpus, memory_mb, gpus, image FROM jobs WHERE worker_id IS NULL AND state = ?"
        f" AND owner_id = ? AND gpus <= ? AND cpus <= ? AND memory_mb <= ? AND image IN ({placeholders})"
        " AND id > ? ORDER BY id LIMIT ?",
        (JobState.QUEUED.value, owner, max(w["gpus"] for w in free), max(w["cpus"] for w in free),
         max(w["memory_mb"] for w in free), *images, after, limit))


def _fits(job: dict, worker: dict) -> bool:
    return (job["gpus"] <= worker["gpus"] and job["cpus"] <= worker["cpus"]
            and job["memory_mb"] <= worker["memory_mb"] and job["image"] in worker["images"])


# ------------------------------------------------------------------ lost workers

def reap(conn, *, lease_timeout_s: float, max_attempts: int, now: float | None = None) -> int:
    """Mark silent workers lost and requeue the jobs whose lease ran out.

    Called at the start of every claim and heartbeat (and by `jobcloud-proxy
    reap`), inside their transaction, so no background thread is needed.

    Returns:
        The number of jobs requeued or failed.
    """
    now = time.time() if now is None else now
    for w in conn.query("SELECT id FROM workers WHERE state IN (?, ?) AND last_seen_at < ?",
                        (*LIVE_WORKER_STATES, now - lease_timeout_s)):
        conn.execute("UPDATE workers SET state = ?, retired_at = ? WHERE id = ? AND state IN (?, ?)",
                     (WorkerState.LOST.value, now, w["id"], *LIVE_WORKER_STATES))
        _release_reservations(conn, w["id"])
    expired = conn.query("SELECT id FROM jobs WHERE state = ? AND lease_expires_at < ?",
                         (JobState.RUNNING.value, now))
    for job in expired:
        _requeue(conn, job["id"], now, max_attempts)
    return len(expired)


def _retire_worker(conn, worker_id: str, state: WorkerState, now: float, max_attempts: int) -> None:
    conn.execute("UPDATE workers SET state = ?, retired_at = ? WHERE id = ?",
                 (state.value, now, worker_id))
    _release_reservations(conn, worker_id)
    for job in conn.query("SELECT id FROM jobs WHERE worker_id = ? AND state = ?",
                          (worker_id, JobState.RUNNING.value)):
        _requeue(conn, job["id"], now, max_attempts)


def _release_reservations(conn, worker_id: str) -> None:
    conn.execute("UPDATE jobs SET worker_id = NULL, reserved_at = NULL WHERE worker_id = ? AND state = ?",
                 (worker_id, JobState.QUEUED.value))


def _requeue(conn, job_id: str, now: float, max_attempts: int) -> None:
    job = conn.query_one("SELECT attempt, cancel_requested FROM jobs WHERE id = ? AND state = ?",
                         (job_id, JobState.RUNNING.value))
    if job is None:
        return
    if job["cancel_requested"]:
        final, reason = JobState.CANCELLED, "cancelled by user (worker lost)"
    elif job["attempt"] >= max_attempts:
        final, reason = JobState.FAILED, WORKER_LOST_REASON
    else:
        conn.execute(
            "UPDATE jobs SET state = ?, worker_id = NULL, reserved_at = NULL, lease_expires_at = NULL,"
            " started_at = NULL WHERE id = ? AND state = ?",
            (JobState.QUEUED.value, job_id, JobState.RUNNING.value))
        return
    # worker_id is cleared: no worker posted this outcome, so a late result
    # from the old holder is stale (409), not a harmless duplicate.
    conn.execute(
        "UPDATE jobs SET state = ?, failure_reason = ?, finished_at = ?, lease_expires_at = NULL,"
        " worker_id = NULL WHERE id = ? AND state = ?",
        (final.value, reason, now, job_id, JobState.RUNNING.value))
    store.job_finished(conn, job_id, now)


# ------------------------------------------------------------ inputs, logs, results

def held_job(conn, worker: dict, job_id: str, attempt: int | None = None) -> dict:
    """The job if `worker` holds its lease (for `attempt`, when given).

    Raises:
        NotFound: the worker does not hold this job (never held it, or lost it).
    """
    job = _get_job(conn, job_id)
    if (job is None or job["worker_id"] != worker["id"] or job["state"] != JobState.RUNNING.value
            or (attempt is not None and job["attempt"] != attempt)):
        raise NotFound("this worker holds no lease on that job", code="no_lease")
    return job


def _get_job(conn, job_id: str) -> dict | None:
    if not is_lookup_key(job_id):
        return None
    return conn.query_one("SELECT * FROM jobs WHERE id = ?", (job_id,))


def append_log(conn, worker: dict, job_id: str, attempt: int, stream: str, offset: int, data: str,
               *, log_max_bytes: int) -> dict:
    """Store one chunk of a running job's output; repeated chunks are ignored."""
    if stream not in ("stdout", "stderr"):
        raise ValidationError("stream must be stdout or stderr", code="invalid_stream")
    if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
        raise ValidationError("offset must be a non-negative integer", code="invalid_offset")
    if not isinstance(data, str):
        raise ValidationError("data must be a string", code="invalid_data")
    held_job(conn, worker, job_id, attempt)
    data = storable_text(data)
    size = len(data.encode("utf-8"))
    if offset + size > log_max_bytes:
        conn.execute(f"UPDATE jobs SET {stream}_truncated = 1 WHERE id = ?", (job_id,))
        return {"stored": False, "truncated": True}
    conn.execute(
        "INSERT INTO job_logs (job_id, attempt, stream, byte_offset, data) VALUES (?, ?, ?, ?, ?)"
        " ON CONFLICT DO NOTHING", (job_id, attempt, stream, offset, data))
    return {"stored": True, "truncated": False}


def storable_text(text: str) -> str:
    """`text` with what neither database can store replaced, byte for byte.

    PostgreSQL TEXT refuses NUL, and a lone surrogate (valid in JSON, not in
    UTF-8) cannot be encoded at all. Each becomes a one-byte "?", so the byte
    offsets the worker counted for later log chunks still line up.
    """
    return text.encode("utf-8", "replace").decode("utf-8").replace("\x00", "?")


RESULT_STATES = {s.value for s in FINAL_STATES}


@dataclass(frozen=True)
class Result:
    attempt: int
    state: str
    exit_code: int | None
    failure_reason: str | None
    stdout: str
    stderr: str
    stdout_truncated: bool
    stderr_truncated: bool
    cpu_seconds: float | None
    peak_memory_bytes: int | None
    wall_seconds: float | None
    gpu_seconds: float | None = None


# Largest usage figure a result may report: 2**53 is exact as a JSON number
# and as a 64-bit INTEGER, and far above any real byte count or second count.
MAX_USAGE = 2**53


def parse_result(data: dict, tail_bytes: int) -> Result:
    """Validate a worker's result document.

    Raises:
        ValidationError: a field is missing or invalid.
    """
    if not isinstance(data, dict):
        raise ValidationError("the result must be a JSON object", code="invalid_result")
    attempt = data.get("attempt")
    if not isinstance(attempt, int) or isinstance(attempt, bool) or attempt < 1:
        raise ValidationError("attempt must be a positive integer", code="invalid_result")
    state = data.get("state")
    if state not in RESULT_STATES:
        raise ValidationError(f"state must be one of {sorted(RESULT_STATES)}", code="invalid_result")
    exit_code = data.get("exit_code")
    if exit_code is not None and (not isinstance(exit_code, int) or isinstance(exit_code, bool)
                                  or not -2**31 <= exit_code < 2**31):
        raise ValidationError("exit_code must be a 32-bit integer or null", code="invalid_result")
    reason = data.get("failure_reason")
    if reason is not None and not isinstance(reason, str):
        raise ValidationError("failure_reason must be a string or null", code="invalid_result")

    def opt_num(key, kind):
        v = data.get(key)
        if v is None:
            return None
        # Bounded and finite: Python's JSON reads Infinity and NaN, which the
        # job's JSON would then carry (invalid JSON), and a larger integer
        # overflows the database's 64-bit INTEGER (a 500).
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                or not 0 <= v <= MAX_USAGE:
            raise ValidationError(f"{key} must be a number between 0 and {MAX_USAGE}",
                                  code="invalid_result")
        return kind(v)

    def text(key):
        v = data.get(key) or ""
        if not isinstance(v, str):
            raise ValidationError(f"{key} must be a string", code="invalid_result")
        raw = storable_text(v).encode("utf-8")
        return raw[-tail_bytes:].decode("utf-8", "ignore"), len(raw) > tail_bytes

    stdout, out_cut = text("stdout")
    stderr, err_cut = text("stderr")
    return Result(
        attempt=attempt, state=state, exit_code=exit_code,
        failure_reason=(reason or None) and storable_text(reason[:1000]),
        stdout=stdout, stderr=stderr,
        stdout_truncated=bool(data.get("stdout_truncated")) or out_cut,
        stderr_truncated=bool(data.get("stderr_truncated")) or err_cut,
        cpu_seconds=opt_num("cpu_seconds", float),
        peak_memory_bytes=opt_num("peak_memory_bytes", int),
        wall_seconds=opt_num("wall_seconds", float),
        gpu_seconds=opt_num("gpu_seconds", float),
    )


def check_lease(conn, worker: dict, job_id: str, attempt: int) -> dict:
    """The job if this worker holds (or held, for a finished job) the lease of `attempt`.

    Raises:
        NotFound: no such job.
        Conflict: another attempt or another worker holds it.
    """
    job = _get_job(conn, job_id)
    if job is None:
        raise NotFound(f"no job {job_id!r}", code="job_not_found")
    if job["worker_id"] != worker["id"] or job["attempt"] != attempt or \
            job["state"] == JobState.QUEUED.value:
        raise Conflict("stale lease: this job is held by another attempt or worker",
                       code="stale_lease")
    return job


def record_result(conn, worker: dict, job_id: str, result: Result, output: tuple | None,
                  now: float | None = None) -> tuple[dict, bool]:
    """Store a job's final result under the worker's lease.

    Args:
        output: (blob, sha256, size) of the stored output archive, or None.

    Returns:
        (job, applied): applied is False when this exact result was already stored.

    Raises:
        Conflict: the lease is stale (another attempt or another worker).
        NotFound: no such job.
    """
    now = time.time() if now is None else now
    blob, sha, size = output or (None, None, None)
    with conn.transaction():
        # GPU time is the worker's word, and it is billed: bound it by what the
        # lease gave (the job's GPUs since the claim, 0 for a CPU job), so a
        # rogue or buggy worker cannot bill GPU time nobody held.
        held = conn.query_one("SELECT gpus, started_at FROM jobs WHERE id = ?", (job_id,))
        gpu_s = result.gpu_seconds
        if gpu_s is not None and held is not None:
            gpu_s = min(gpu_s, held["gpus"] * max(0.0, now - (held["started_at"] or now)))
        n = conn.execute(
            "UPDATE jobs SET state = ?, exit_code = ?, failure_reason = ?, stdout_tail = ?,"
            " stderr_tail = ?, stdout_truncated = ?, stderr_truncated = ?, output_blob = ?,"
            " output_sha256 = ?, output_size = ?, cpu_seconds = ?, peak_memory_bytes = ?,"
            " wall_seconds = ?, gpu_seconds = ?, finished_at = ?, lease_expires_at = NULL"
            " WHERE id = ? AND state = ? AND worker_id = ? AND attempt = ?",
            (result.state, result.exit_code, result.failure_reason, result.stdout, result.stderr,
             int(result.stdout_truncated), int(result.stderr_truncated), blob, sha, size,
             result.cpu_seconds, result.peak_memory_bytes, result.wall_seconds, gpu_s,
             now, job_id, JobState.RUNNING.value, worker["id"], result.attempt))
        if n:
            store.job_finished(conn, job_id, now)
        job = conn.query_one("SELECT * FROM jobs WHERE id = ?", (job_id,))
    if job is None:
        raise NotFound(f"no job {job_id!r}", code="job_not_found")
    if n:
        return job, True
    same_lease = job["worker_id"] == worker["id"] and job["attempt"] == result.attempt
    if same_lease and job["state"] in RESULT_STATES:
        return job, False  # a retry of a result we already have: harmless
    raise Conflict("stale lease: this job is held by another attempt or worker", code="stale_lease")
