"""Retry policies: a job that fails may run again, by its owner's rules.

A submission may ask for `retries` (0 to the max_retries setting), the exit
codes that count as retryable (`retry_exit_codes`) and the back-off's base
(`retry_backoff_s`). When a try ends `failed` with a retryable exit code and
retries remain, the job does not end: it goes back to the queue with a
not-before time, now + min(base x 2^(k-1), retry_backoff_max_s) for the k-th
retry, and the dispatcher leaves it alone until then (`due_filter`).

What counts as retryable, and why:
- with exit codes given: a `failed` try whose exit code is one of them (list
  137 to retry a try the kernel killed for memory);
- without: any `failed` try with a non-zero exit code, except an OOM kill: the
  same memory limit would kill it again, so a retry only costs the cluster;
- never a timeout (timeout_s bounds one try; a retry would multiply it), a
  cancel, a try that failed without an exit code (the sandbox or the worker
  failed, not the script), nor a job whose owner asked to cancel it.

A policy retry is not the requeue after a lost worker (leases.requeue): that
one reruns the same try, counts against max_attempts, and is recorded as a
`worker_lost` try. Both show in the job's history (`tries_json`): every try
that ended without ending the job is a row of job_tries, with its exit code,
times, usage and log tails; its streamed logs stay in job_logs under its
attempt, readable with ?attempt=N. The try that ends the job is the job row
itself, so webhooks (store._job_finished) fire once, for the final state; its
cost (usage.record_cost) prices every try, each having held a worker's slot.
"""
from __future__ import annotations

from datetime import UTC, datetime

from . import wakeups
from .errors import NotFound, ValidationError
from .models import JobState, iso

# The back-off's base when a submission asks for retries without one: long
# enough for a flaky service or a full disk to recover, short next to a job.
DEFAULT_BACKOFF_S = 10
# Exit codes a policy may list: a process's exit status is 1..255 (0 is success).
EXIT_CODE_MIN, EXIT_CODE_MAX = 1, 255
# How the worker says a try was killed for memory (worker/sandbox.py OOM_REASON).
OOM_REASON = "memory limit exceeded"
# The form's and the API's fields (multipart text fields, like the resources).
FORM_FIELDS = ("retries", "retry_exit_codes", "retry_backoff_s")
# Waiting claims listen here too: a job entering its back-off makes them
# look again for when the next one is due (worker_api._claim_waiting).
RETRY_TOPIC = "retries"

RETRIED = "retried"            # a policy retry followed this try
WORKER_LOST = "worker_lost"    # its worker was lost; the same try was requeued (or failed)


# ---------------------------------------------------------------- submission

def parse_policy(fields: dict, *, max_retries: int, backoff_max_s: int) -> dict:
    """The retry columns of a new job from its form fields.

    Args:
        fields: the submission's text fields (strings).

    Returns:
        {"retries", "retry_exit_codes" (e.g. "3,4", or None), "retry_backoff_s",
        "retry_backoff_max_s"}.

    Raises:
        ValidationError: a field is not a whole number in range, or exit codes
            without retries.
    """
    retries = _whole(fields, "retries", 0, 0, max_retries)
    codes = parse_exit_codes(fields.get("retry_exit_codes", ""))
    backoff = _whole(fields, "retry_backoff_s", DEFAULT_BACKOFF_S, 0, backoff_max_s)
    if codes and not retries:
        raise ValidationError("retry_exit_codes needs retries of at least 1", code="invalid_retry")
    return {"retries": retries, "retry_exit_codes": ",".join(map(str, codes)) or None,
            "retry_backoff_s": backoff, "retry_backoff_max_s": backoff_max_s}


def parse_exit_codes(raw: str) -> list[int]:
    """"3,4" or "3 4" -> [3, 4] (sorted, unique); "" -> [] (any non-zero exit).

    Raises:
        ValidationError: not whole numbers from 1 to 255.
    """
    parts = (raw or "").replace(",", " ").split()
    codes = set()
    for part in parts:
        try:
            code = int(part)
        except ValueError:
            raise ValidationError(f"retry_exit_codes must be whole numbers separated by commas "
                                  f"(got {part[:40]!r})", code="invalid_retry") from None
        if not EXIT_CODE_MIN <= code <= EXIT_CODE_MAX:
            raise ValidationError(f"retry_exit_codes must be between {EXIT_CODE_MIN} and "
                                  f"{EXIT_CODE_MAX} (got {code})", code="invalid_retry")
        codes.add(code)
    return sorted(codes)


def _whole(fields: dict, key: str, default: int, lo: int, hi: int) -> int:
    raw = (fields.get(key) or "").strip()
    if raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValidationError(f"{key} must be a whole number (got {raw[:40]!r})",
                              code="invalid_retry") from None
    if not lo <= value <= hi:
        raise ValidationError(f"{key} must be between {lo} and {hi} (got {value})",
                              code="invalid_retry")
    return value


def store_policy(conn, job_id: str, policy: dict) -> None:
    """Set a just-created job's policy (inside its submission's transaction)."""
    if not policy["retries"]:
        return   # the columns' defaults: no retries
    conn.execute("UPDATE jobs SET retries = ?, retry_exit_codes = ?, retry_backoff_s = ?,"
                 " retry_backoff_max_s = ? WHERE id = ?",
                 (policy["retries"], policy["retry_exit_codes"], policy["retry_backoff_s"],
                  policy["retry_backoff_max_s"], job_id))


# ---------------------------------------------------------------- a try ends

def exit_codes(job: dict) -> list[int]:
    return [int(c) for c in (job.get("retry_exit_codes") or "").split(",") if c]


def is_retryable(job: dict, state: JobState, exit_code: int | None,
                 failure_reason: str | None) -> bool:
    """Whether a try that ended this way is retried under the job's policy (module doc)."""
    if (job.get("retries_used") or 0) >= (job.get("retries") or 0) or job["cancel_requested"]:
        return False
    if state != JobState.FAILED or not exit_code:
        return False
    codes = exit_codes(job)
    if codes:
        return exit_code in codes
    return failure_reason != OOM_REASON


def backoff_s(job: dict, k: int) -> float:
    """The back-off before the k-th retry (k >= 1): base x 2^(k-1), capped."""
    base, cap = job["retry_backoff_s"] or 0, job["retry_backoff_max_s"] or 0
    return float(min(base * 2 ** min(k - 1, 62), cap))


def retry(conn, job_id: str, holder: tuple[str, int], result, now: float) -> bool:
    """Requeue a job whose try ended retryably, instead of ending it.

    Inside the result's transaction (leases.record_result), a compare-and-set
    on the lease like store.finish_job: of a result and a lease expiry, one
    applies.

    Args:
        holder: (worker_id, attempt) of the try that ended.
        result: the worker's (bounded) leases.Result.

    Returns:
        Whether the job was requeued; False: the try ends the job.
    """
    if result.state != JobState.FAILED or not result.exit_code:
        return False   # never retried: no read on the path of every successful result
    job = conn.query_one("SELECT * FROM jobs WHERE id = ? AND state = ? AND worker_id = ?"
                         " AND attempt = ?", (job_id, JobState.RUNNING.value, *holder))
    if job is None or not is_retryable(job, result.state, result.exit_code, result.failure_reason):
        return False
    retry_at = now + backoff_s(job, job["retries_used"] + 1)
    # The job shows its last try's exit while it waits; the claim clears both.
    # cancel_requested = 0 again here: a cancel (an array's cancel all,
    # arrays.cancel) committed since the read above must keep it out of the queue.
    n = conn.execute(
        "UPDATE jobs SET state = ?, worker_id = NULL, reserved_at = NULL, lease_expires_at = NULL,"
        " started_at = NULL, retries_used = retries_used + 1, not_before = ?, exit_code = ?,"
        " failure_reason = ?, stdout_truncated = 0, stderr_truncated = 0"
        " WHERE id = ? AND state = ? AND worker_id = ? AND attempt = ? AND cancel_requested = 0",
        (JobState.QUEUED.value, retry_at, result.exit_code, result.failure_reason, job_id,
         JobState.RUNNING.value, *holder))
    if not n:
        return False
    _record_try(conn, job, RETRIED, now, state=result.state.value, exit_code=result.exit_code,
                failure_reason=result.failure_reason, stdout_tail=result.stdout,
                stderr_tail=result.stderr,
                stdout_truncated=int(result.stdout_truncated or job["stdout_truncated"]),
                stderr_truncated=int(result.stderr_truncated or job["stderr_truncated"]),
                cpu_seconds=result.cpu_seconds, peak_memory_bytes=result.peak_memory_bytes,
                wall_seconds=result.wall_seconds, gpu_seconds=result.gpu_seconds,
                retry_at=retry_at)
    wakeups.notify_jobs(conn, [job_id])
    wakeups.notify(conn, RETRY_TOPIC)
    return True


def worker_lost(conn, job_id: str, now: float) -> None:
    """Record the running try of a job whose worker was lost (leases.requeue),
    before the job is requeued or ended: a lost-worker rerun, not a policy retry."""
    job = conn.query_one("SELECT * FROM jobs WHERE id = ? AND state = ?",
                         (job_id, JobState.RUNNING.value))
    if job is not None:
        _record_try(conn, job, WORKER_LOST, now, failure_reason="worker lost",
                    stdout_truncated=job["stdout_truncated"],
                    stderr_truncated=job["stderr_truncated"])


def lost_attempts(job: dict) -> int:
    """The job's attempts that ended (or run) without a policy retry after them:
    what max_attempts bounds."""
    return job["attempt"] - (job.get("retries_used") or 0)


def _record_try(conn, job: dict, outcome: str, now: float, **columns) -> None:
    values = {"job_id": job["id"], "attempt": job["attempt"],
              "try_number": (job.get("retries_used") or 0) + 1, "outcome": outcome,
              "worker_id": job["worker_id"], "started_at": job["started_at"], "ended_at": now,
              **columns}
    conn.execute(f"INSERT INTO job_tries ({', '.join(values)}) VALUES"
                 f" ({', '.join('?' for _ in values)}) ON CONFLICT DO NOTHING",
                 tuple(values.values()))


# ------------------------------------------------------------ the dispatcher

def due_filter(conn, now: float) -> tuple[str, tuple]:
    """What to AND to a read of the unreserved queue so jobs in their back-off
    are left out: ("", ()) when none is (one probe of jobs_not_before), so
    the usual dispatch reads stay as they were."""
    if conn.query_one("SELECT 1 AS x FROM jobs WHERE not_before > ? LIMIT 1", (now,)) is None:
        return "", ()
    return " AND (not_before IS NULL OR not_before <= ?)", (now,)


def seconds_to_next(conn, now: float) -> float | None:
    """Seconds until the next back-off ends (a claim's long-poll ends then), or None."""
    row = conn.query_one("SELECT MIN(not_before) AS t FROM jobs WHERE not_before > ? AND state = ?",
                         (now, JobState.QUEUED.value))
    return None if row is None or row["t"] is None else row["t"] - now


# -------------------------------------------------------------- what users see

def waiting_detail(job: dict, now: float) -> tuple[str, float] | None:
    """(sentence, retry_at) for a queued job in its back-off (waiting.py), else None."""
    retry_at = job.get("not_before")
    if retry_at is None or retry_at <= now or job.get("worker_id") is not None:
        return None
    last = f"exit code {job['exit_code']}" if job.get("exit_code") is not None else "a failure"
    at = datetime.fromtimestamp(retry_at, tz=UTC).strftime("%H:%M:%S")
    used = job.get("retries_used") or 0
    detail = (f"Retry back-off: try {used + 1} of {(job.get('retries') or 0) + 1} starts after "
              f"{at} UTC (try {used} ended with {last}).")
    return detail, retry_at


def policy_json(job: dict) -> dict | None:
    """The job's `retry_policy`; None when it asked for no retries."""
    if not job.get("retries"):
        return None
    return {"retries": job["retries"], "exit_codes": exit_codes(job) or None,
            "backoff_s": job["retry_backoff_s"], "backoff_max_s": job["retry_backoff_max_s"],
            "used": job.get("retries_used") or 0}


def tries_json(conn, job: dict) -> list[dict]:
    """Every try of the job, oldest first: the ended ones (job_tries) and the
    current or final one (the job row), each with links to its own logs."""
    rows = conn.query("SELECT * FROM job_tries WHERE job_id = ? ORDER BY attempt", (job["id"],))
    tries = [_try_json(job, r) for r in rows]
    recorded = {r["attempt"] for r in rows}
    if job["attempt"] and job["attempt"] not in recorded and job["state"] != JobState.QUEUED.value:
        tries.append(_try_json(job, {
            "attempt": job["attempt"], "try_number": (job.get("retries_used") or 0) + 1,
            "outcome": "running" if job["state"] == JobState.RUNNING.value else "final",
            "state": job["state"], "exit_code": job["exit_code"],
            "failure_reason": job["failure_reason"], "started_at": job["started_at"],
            "ended_at": job["finished_at"], "retry_at": None, "cpu_seconds": job["cpu_seconds"],
            "peak_memory_bytes": job["peak_memory_bytes"], "wall_seconds": job["wall_seconds"],
            "gpu_seconds": job.get("gpu_seconds")}))
    return tries


def all_tries_usage(tries: list[dict] | None) -> dict | None:
    """The job's `usage_all_tries`: its tries' usage summed (the peak: the
    highest), what its cost prices (usage.billed_usage); None without tries
    (lists) or before one started."""
    if not tries:
        return None
    usages = [t["usage"] for t in tries]

    def total(key, combine=sum):
        values = [u[key] for u in usages if u[key] is not None]
        return combine(values) if values else None
    return {"tries": len(tries), "cpu_seconds": total("cpu_seconds"),
            "peak_memory_bytes": total("peak_memory_bytes", max),
            "wall_seconds": total("wall_seconds"), "gpu_seconds": total("gpu_seconds")}


def _try_json(job: dict, t: dict) -> dict:
    logs = f"/api/v1/jobs/{job['id']}/logs?attempt={t['attempt']}&stream="
    return {"try": t["try_number"], "attempt": t["attempt"], "outcome": t["outcome"],
            "state": t["state"], "exit_code": t["exit_code"], "failure_reason": t["failure_reason"],
            "started_at": iso(t["started_at"]), "ended_at": iso(t["ended_at"]),
            "retry_at": iso(t["retry_at"]),
            "usage": {"cpu_seconds": t["cpu_seconds"], "peak_memory_bytes": t["peak_memory_bytes"],
                      "wall_seconds": t["wall_seconds"], "gpu_seconds": t["gpu_seconds"]},
            "logs": {"stdout": logs + "stdout", "stderr": logs + "stderr"}}


def logs_view(conn, job: dict, attempt: int | None) -> dict:
    """The job as store.read_logs reads it for one attempt: its own streamed
    chunks, else the tails its result left (kept in job_tries).

    Raises:
        NotFound: the job has no such attempt.
    """
    if attempt is None or attempt == job["attempt"]:
        return job
    row = conn.query_one("SELECT * FROM job_tries WHERE job_id = ? AND attempt = ?",
                         (job["id"], attempt)) if 1 <= attempt < job["attempt"] else None
    if row is None:
        raise NotFound(f"job {job['id']} has no attempt {attempt}", code="attempt_not_found")
    return dict(job, attempt=attempt, stdout_tail=row["stdout_tail"],
                stderr_tail=row["stderr_tail"], stdout_truncated=row["stdout_truncated"],
                stderr_truncated=row["stderr_truncated"])

