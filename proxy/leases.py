"""Leases: what a worker may do with a job it holds, and what happens when it
stops holding it.

A claim (scheduler.py) gives a worker a job under a lease: the job is
`running` with that worker's id, an attempt number and `lease_expires_at`,
which the worker's heartbeats extend (workers.py). Under the lease the worker
downloads the job's inputs (`held_job`), streams its output (`append_log`)
and posts one result (`record_result`). A lease that runs out, or whose
worker is lost or retired, is requeued (`requeue`) until the job used its
`max_attempts`; a job that ends here ends through store.finish_job, the one
final transition.

Every change is a compare-and-set that restates the lease it expects (worker,
attempt, state), so a late or repeated call from an old holder never changes
a job that moved on: it gets 404 (no lease) or 409 (stale lease).
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, replace

from . import retries, store, wakeups
from .blobs import StoredBlob
from .errors import Conflict, NotFound, ValidationError
from .models import FINAL_VALUES, JobState, is_lookup_key

log = logging.getLogger(__name__)

WORKER_LOST_REASON = "worker lost"
LOG_STREAMS = ("stdout", "stderr")
# Slack on the lease's elapsed time when bounding reported usage: the worker's
# clock starts after the claim, but a second's rounding or a slow answer on
# the way must not flag an honest worker.
USAGE_SLACK_S = 5.0


@dataclass(frozen=True)
class Result:
    """A worker's validated final result for one attempt (worker_api.parse_result)."""

    attempt: int
    state: JobState
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
    # The job filled its disk quota (got ENOSPC).
    disk_full: bool = False
    # What output collection kept and left out, by reason (parse_outputs_report).
    outputs_report: dict | None = None
    # The job's requirements environment (worker/pyenv.py): seconds its build
    # took, and whether the worker had it cached; None without requirements.
    env_build_s: float | None = None
    env_cached: bool | None = None


# ----------------------------------------------------------------- holding a job

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


def extend(conn, worker_id: str, job_ids: list[str], until: float) -> None:
    """Extend the leases `worker_id` holds on `job_ids` (a heartbeat) to `until`."""
    for chunk in (job_ids[i:i + 500] for i in range(0, len(job_ids), 500)):
        conn.execute(
            "UPDATE jobs SET lease_expires_at = ? WHERE worker_id = ? AND state = ?"
            f" AND id IN ({', '.join('?' for _ in chunk)})",
            (until, worker_id, JobState.RUNNING.value, *chunk))


def held_by(conn, worker_id: str) -> list[dict]:
    """The jobs `worker_id` holds now: id and whether their owner asked to cancel."""
    return conn.query("SELECT id, cancel_requested FROM jobs WHERE worker_id = ? AND state = ?",
                      (worker_id, JobState.RUNNING.value))


def cancel_requested(conn, worker_id: str) -> list[str]:
    """Ids of the jobs `worker_id` holds whose owner asked to cancel them."""
    return sorted(r["id"] for r in held_by(conn, worker_id) if r["cancel_requested"])


# ------------------------------------------------------------------------- logs

def append_log(conn, worker: dict, job_id: str, attempt: int, stream: str, offset: int, data: str,
               *, log_max_bytes: int) -> dict:
    """Store one chunk of a running job's output; repeated chunks are ignored.

    Raises:
        ValidationError: an unknown stream.
        NotFound: the worker does not hold this attempt of the job.
    """
    if stream not in LOG_STREAMS:
        raise ValidationError("stream must be stdout or stderr", code="invalid_stream")
    held_job(conn, worker, job_id, attempt)
    data = storable_text(data)
    size = len(data.encode("utf-8"))
    over = offset + size > log_max_bytes
    with conn.transaction():
        if over:
            conn.execute(f"UPDATE jobs SET {stream}_truncated = 1 WHERE id = ?", (job_id,))
        else:
            conn.execute(
                "INSERT INTO job_logs (job_id, attempt, stream, byte_offset, data)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                (job_id, attempt, stream, offset, data))
        wakeups.notify(conn, wakeups.job_topic(job_id))   # the job's live streams
    return {"stored": not over, "truncated": over}


def storable_text(text: str) -> str:
    """`text` with what neither database can store replaced, byte for byte.

    PostgreSQL TEXT refuses NUL, and a lone surrogate (valid in JSON, not in
    UTF-8) cannot be encoded at all. Each becomes a one-byte "?", so the byte
    offsets the worker counted for later log chunks still line up.
    """
    return text.encode("utf-8", "replace").decode("utf-8").replace("\x00", "?")


# ---------------------------------------------------------------------- results

def lease_ran_out(job: dict, now: float) -> bool:
    """Whether a running job's lease expired (not yet requeued: nobody reaped since)."""
    return (job["state"] == JobState.RUNNING.value and job["lease_expires_at"] is not None
            and job["lease_expires_at"] < now)


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
        raise _stale()
    return job


def record_result(conn, worker: dict, job_id: str, result: Result, output: StoredBlob | None,
                  now: float | None = None) -> tuple[dict, bool]:
    """Store a job's final result under the worker's lease.

    Args:
        output: the stored output archive, or None.

    Returns:
        (job, applied): applied is False when this exact result was already stored.

    Raises:
        Conflict: the lease is stale (another attempt or another worker).
        NotFound: no such job.
    """
    now = time.time() if now is None else now
    with conn.transaction():
        held = conn.query_one("SELECT cpus, memory_mb, gpus, started_at, worker_id, attempt"
                              " FROM jobs WHERE id = ?", (job_id,))
        clamped: list[str] = []
        if held is not None and (held["worker_id"], held["attempt"]) == (worker["id"], result.attempt):
            result, clamped = bound_usage(result, held, now)
        gpu_s = result.gpu_seconds
        # A retryable failure with retries left requeues the job (retries.py):
        # no final state, no webhook, the try kept in the job's history.
        if retries.retry(conn, job_id, (worker["id"], result.attempt), result, now):
            return conn.query_one("SELECT * FROM jobs WHERE id = ?", (job_id,)), True
        applied = store.finish_job(
            conn, job_id, result.state, now, expect=JobState.RUNNING,
            holder=(worker["id"], result.attempt),
            exit_code=result.exit_code, failure_reason=result.failure_reason,
            stdout_tail=result.stdout, stderr_tail=result.stderr,
            stdout_truncated=int(result.stdout_truncated),
            stderr_truncated=int(result.stderr_truncated),
            output_blob=output and output.name, output_sha256=output and output.sha256,
            output_size=output and output.size, cpu_seconds=result.cpu_seconds,
            peak_memory_bytes=result.peak_memory_bytes, wall_seconds=result.wall_seconds,
            gpu_seconds=gpu_s, usage_clamped=",".join(clamped) or None,
            disk_full=int(result.disk_full),
            outputs_report=json.dumps(result.outputs_report) if result.outputs_report else None,
            env_build_s=result.env_build_s,
            env_cached=None if result.env_cached is None else int(result.env_cached))
        job = conn.query_one("SELECT * FROM jobs WHERE id = ?", (job_id,))
    if job is None:
        raise NotFound(f"no job {job_id!r}", code="job_not_found")
    if applied:
        if clamped:
            log.warning("worker %s (%s) reported usage beyond its lease for job %s; clamped: %s",
                        worker["name"], worker["id"], job_id, ", ".join(clamped))
        return job, True
    same_lease = job["worker_id"] == worker["id"] and job["attempt"] == result.attempt
    if same_lease and job["state"] in FINAL_VALUES:
        return job, False  # a retry of a result we already have: harmless
    raise _stale()


def bound_usage(result: Result, held: dict, now: float) -> tuple[Result, list[str]]:
    """The result's usage bounded by what the proxy observed of the lease.

    Usage is the worker's word, and it is billed: a rogue or buggy worker must
    not bill time nobody held. Wall time is at most the lease's elapsed time
    (claim to now), CPU time at most the job's CPUs for that long (Docker caps
    the container at them), each with USAGE_SLACK_S; peak memory at most the
    job's limit; GPU time at most its GPUs since the claim, without slack (0
    for a CPU job).

    Returns:
        (the bounded result, the names of the fields that were over, sorted).
    """
    elapsed = max(0.0, now - (held["started_at"] or now))
    bounds = {"cpu_seconds": held["cpus"] * (elapsed + USAGE_SLACK_S),
              "wall_seconds": elapsed + USAGE_SLACK_S,
              "peak_memory_bytes": held["memory_mb"] * 1024 * 1024}
    over = {k: type(getattr(result, k))(bound) for k, bound in bounds.items()
            if getattr(result, k) is not None and getattr(result, k) > bound}
    gpu_s = result.gpu_seconds
    if gpu_s is not None:
        # Not flagged: a worker rounding a GPU job's wall time up, or reporting
        # the devices it saw for a CPU job, is not a sign of a rogue worker.
        gpu_s = min(gpu_s, held["gpus"] * elapsed)
    return replace(result, gpu_seconds=gpu_s, **over), sorted(over)


def _stale() -> Conflict:
    return Conflict("stale lease: this job is held by another attempt or worker", code="stale_lease")


# ------------------------------------------------------------------- requeueing

def requeue_expired(conn, now: float, max_attempts: int) -> int:
    """Requeue (or end) every running job whose lease ran out. Returns how many."""
    expired = conn.query("SELECT id FROM jobs WHERE state = ? AND lease_expires_at < ?",
                         (JobState.RUNNING.value, now))
    for job in expired:
        requeue(conn, job["id"], now, max_attempts)
    return len(expired)


def requeue_held(conn, worker_id: str, now: float, max_attempts: int) -> None:
    """Requeue (or end) every job `worker_id` holds: it was retired or replaced."""
    for job in held_by(conn, worker_id):
        requeue(conn, job["id"], now, max_attempts)


def requeue(conn, job_id: str, now: float, max_attempts: int) -> None:
    """A running job lost its lease: queue it again, or end it when it must not run again.

    It ends `cancelled` when its owner asked to cancel it, `failed` (worker
    lost) after `max_attempts` attempts.
    """
    job = conn.query_one("SELECT attempt, retries_used, cancel_requested FROM jobs"
                         " WHERE id = ? AND state = ?", (job_id, JobState.RUNNING.value))
    if job is None:
        return
    # Kept in the job's history as a lost-worker try, apart from policy retries.
    retries.worker_lost(conn, job_id, now)
    if job["cancel_requested"]:
        final, reason = JobState.CANCELLED, "cancelled by user (worker lost)"
    elif retries.lost_attempts(job) >= max_attempts:
        final, reason = JobState.FAILED, WORKER_LOST_REASON
    elif conn.execute(
            "UPDATE jobs SET state = ?, worker_id = NULL, reserved_at = NULL, lease_expires_at = NULL,"
            " started_at = NULL WHERE id = ? AND state = ? AND cancel_requested = 0",
            (JobState.QUEUED.value, job_id, JobState.RUNNING.value)):
        wakeups.notify_jobs(conn, [job_id])
        return
    else:
        # Asked to stop since the read above (PostgreSQL: an array's cancel
        # all, arrays.cancel, committed in between): it must not queue again.
        final, reason = JobState.CANCELLED, "cancelled by user (worker lost)"
    # worker_id is cleared: no worker posted this outcome, so a late result
    # from the old holder is stale (409), not a harmless duplicate.
    store.finish_job(conn, job_id, final, now, expect=JobState.RUNNING, failure_reason=reason,
                     worker_id=None)
