"""The jobs table: create, read, list, cancel, logs, and the one transition
of a job to a final state (`finish_job`).

What happens to a job once a worker is involved is in scheduler.py (who gets
it) and leases.py (holding it, its output and result, requeueing it).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass

from . import arrays, dependencies, jobenv, retries, usage, wakeups, webhooks
from .errors import Conflict, NotFound, ValidationError
from .blobs import StoredBlob
from .models import FINAL_STATES, JobState, id_floor, is_lookup_key, iso, new_id

# A job row as users see it: its owner's name and its webhook delivery, if any.
_JOB_SELECT = ("SELECT j.*, u.name AS owner" + webhooks.JOB_COLUMNS +
               " FROM jobs j JOIN users u ON u.id = j.owner_id" + webhooks.JOB_JOIN)

# Where a worker's output archive lists the files it left out (worker/outputs.py MANIFEST).
OUTPUTS_MANIFEST = ".jobcloud/left-out.json"
# Columns a final transition may set besides state, finished_at and the lease.
FINAL_COLUMNS = frozenset({
    "exit_code", "failure_reason", "stdout_tail", "stderr_tail", "stdout_truncated",
    "stderr_truncated", "output_blob", "output_sha256", "output_size", "cpu_seconds",
    "peak_memory_bytes", "wall_seconds", "gpu_seconds", "worker_id", "reserved_at",
    "disk_full", "outputs_report", "usage_clamped", "env_build_s", "env_cached"})


@dataclass(frozen=True)
class NewJob:
    owner_id: str
    name: str
    script_name: str
    script: StoredBlob
    image: str
    cpus: float
    memory_mb: int
    timeout_s: int
    gpus: int
    dataset_name: str | None = None
    dataset: StoredBlob | None = None
    webhook_url: str | None = None
    disk_mb: int | None = None
    # Why the job was accepted without a capacity check (capacity.check_job).
    capacity_note: str | None = None
    # Its normalised requirements.txt (proxy/requirements.py), if any.
    requirements: StoredBlob | None = None


def create_job(conn, job: NewJob, now: float | None = None) -> dict:
    """Insert a queued job (its files are already durable); returns the stored row."""
    now = time.time() if now is None else now
    job_id = new_id("j")
    dataset = job.dataset
    conn.execute(
        "INSERT INTO jobs (id, owner_id, name, script_name, script_blob, script_sha256, script_size,"
        " dataset_name, dataset_blob, dataset_sha256, dataset_size, image, cpus, memory_mb,"
        " timeout_s, gpus, state, attempt, submitted_at, webhook_url, disk_mb, capacity_note)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, ?, ?, ?, ?)",
        (job_id, job.owner_id, job.name, job.script_name, *_blob_columns(job.script),
         job.dataset_name, *_blob_columns(dataset), job.image, job.cpus, job.memory_mb, job.timeout_s, job.gpus, JobState.QUEUED.value, now,
         job.webhook_url, job.disk_mb, job.capacity_note))
    if job.requirements is not None:
        conn.execute("UPDATE jobs SET requirements_blob = ?, requirements_sha256 = ?,"
                     " requirements_size = ? WHERE id = ?", (*_blob_columns(job.requirements), job_id))
    wakeups.notify_jobs(conn, [job_id])
    return get_job(conn, job_id)


def _blob_columns(blob: StoredBlob | None) -> tuple:
    """(*_blob, *_sha256, *_size) of a stored blob: where it is, what it is, its size."""
    return (None, None, None) if blob is None else (blob.name, blob.sha256, blob.size)


def get_job(conn, job_id: str) -> dict | None:
    return conn.query_one(_JOB_SELECT + " WHERE j.id = ?", (job_id,))


def jobs_by_subquery(conn, ids_sql: str, params) -> list[dict]:
    """The jobs whose ids the SELECT `ids_sql` gives, read in full in one query."""
    return conn.query(f"{_JOB_SELECT} WHERE j.id IN ({ids_sql})", params)


def changed_jobs(conn, owner_id: str, since: float | None, limit: int) -> list[dict]:
    """The user's jobs that may have changed since `since`, full rows, in one query
    (the live user stream's read: see changed_ids_query)."""
    return jobs_by_subquery(conn, *changed_ids_query(owner_id, since, limit))


def changed_ids_query(owner_id: str, since: float | None, limit: int) -> tuple[str, list]:
    """A SELECT of the ids of the user's jobs that may have changed since `since`.

    Every change of a job either leaves it active (queued, running, requeued,
    cancel requested) or sets finished_at, so these show every job whose state
    changed since `since`. One indexed read each, joined by UNION (an OR of
    them would scan all of the user's jobs): running and queued jobs by
    jobs_owner_state, the finished by jobs_owner_finished, the submitted by
    jobs_owner (ids are time-ordered). Queued, finished and submitted ones are
    each capped at `limit`, so a deep queue never hides the running and
    finished ones.

    Returns:
        (sql, params)
    """
    running, queued = JobState.RUNNING.value, JobState.QUEUED.value
    parts = ["SELECT id FROM jobs WHERE owner_id = ? AND state = ?",
             "SELECT id FROM (SELECT id FROM jobs WHERE owner_id = ? AND state = ?"
             " ORDER BY id DESC LIMIT ?) queued"]
    params: list = [owner_id, running, owner_id, queued, limit]
    if since is not None:
        parts += ["SELECT id FROM (SELECT id FROM jobs WHERE owner_id = ? AND finished_at >= ?"
                  " ORDER BY finished_at DESC LIMIT ?) finished",
                  "SELECT id FROM (SELECT id FROM jobs WHERE owner_id = ? AND id >= ?"
                  " ORDER BY id DESC LIMIT ?) submitted"]
        params += [owner_id, since, limit, owner_id, id_floor("j", since), limit]
    return " UNION ".join(parts), params


def get_visible_job(conn, job_id: str, viewer: dict) -> dict:
    """The job if `viewer` owns it or is an admin.

    Raises:
        NotFound: no such job, or not the viewer's (indistinguishable on purpose).
    """
    job = get_job(conn, job_id) if is_lookup_key(job_id) else None
    if job is None or (job["owner_id"] != viewer["id"] and not viewer["is_admin"]):
        raise NotFound(f"no job {job_id!r}", code="job_not_found")
    return job


def list_jobs(conn, owner_id: str, *, before: str | None = None, limit: int = 50,
              state: str | None = None) -> tuple[list[dict], str | None]:
    """A page of a user's jobs, newest first (keyset pagination on the time-ordered id).

    Returns:
        (jobs, cursor for the next page or None).
    """
    where, params = ["j.owner_id = ?"], [owner_id]
    if before and not is_lookup_key(before):
        raise ValidationError("before must be a job id", code="invalid_parameter")
    if before:
        where.append("j.id < ?")
        params.append(before)
    if state:
        where.append("j.state = ?")
        params.append(state)
    rows = conn.query(
        f"{_JOB_SELECT} WHERE {' AND '.join(where)} ORDER BY j.id DESC LIMIT ?",
        (*params, limit + 1))
    cursor = rows[limit - 1]["id"] if len(rows) > limit else None
    return rows[:limit], cursor


def cancel_job(conn, job: dict, now: float | None = None) -> dict:
    """Cancel a job: at once when queued, via its worker when running.

    Raises:
        Conflict: the job already reached a final state.
    """
    now = time.time() if now is None else now
    with conn.transaction():
        n = finish_job(conn, job["id"], JobState.CANCELLED, now, expect=JobState.QUEUED,
                       failure_reason="cancelled by user", worker_id=None, reserved_at=None)
        if not n:
            n = conn.execute(
                "UPDATE jobs SET cancel_requested = 1 WHERE id = ? AND state = ?",
                (job["id"], JobState.RUNNING.value))
            # Its worker hears at once, on a waiting claim's answer.
            wakeups.notify_jobs(conn, [job["id"]], holder=True)
        if not n:
            current = get_job(conn, job["id"])
            raise Conflict(f"job {job['id']} is already {current['state']}", code="job_finished")
    return get_job(conn, job["id"])


def finish_job(conn, job_id: str, final: JobState, now: float, *, expect: JobState,
               holder: tuple[str, int] | None = None, dependents: bool = True,
               **columns) -> bool:
    """Move a job to a final state: the only place where that happens.

    A compare-and-set: the job must still be in state `expect` (and, with
    `holder`, held by that worker under that attempt), so of two racing
    endings (a result and a lease expiry, a cancel and a claim) exactly one
    applies. The one that does fixes the job's cost and queues its webhook,
    inside the caller's transaction, so both happen once per job.

    Args:
        holder: (worker_id, attempt) for a worker's result; None when no lease is checked.
        dependents: release or cancel the jobs that run after this one
            (dependencies.py); False only for that module's own cascade.
        columns: what else the ending sets (FINAL_COLUMNS), e.g. exit_code.

    Returns:
        Whether this call made the job final.
    """
    if final not in FINAL_STATES or not columns.keys() <= FINAL_COLUMNS:
        raise ValueError(f"not a final transition: {final}, {sorted(columns)}")
    sets = ", ".join(f"{name} = ?" for name in columns)
    where, params = "id = ? AND state = ?", [job_id, expect.value]
    if holder is not None:
        where += " AND worker_id = ? AND attempt = ?"
        params += list(holder)
    n = conn.execute(
        f"UPDATE jobs SET state = ?, finished_at = ?, lease_expires_at = NULL"
        f"{', ' + sets if sets else ''} WHERE {where}",
        (final.value, now, *columns.values(), *params))
    if n:
        _job_finished(conn, job_id, now)
        wakeups.notify_jobs(conn, [job_id])
        if dependents:
            dependencies.job_finished(conn, job_id, final, now)
    return bool(n)


def _job_finished(conn, job_id: str, now: float) -> None:
    """Once per job, inside the transaction that made it final: fix its cost, queue its webhook."""
    if usage.record_cost(conn, job_id)["webhook_url"]:
        job = get_job(conn, job_id)
        webhooks.enqueue(conn, job, job_json(job, tries=retries.tries_json(conn, job)), now)


def read_logs(conn, job: dict, stream: str, offset: int = 0, limit: int = 1024 * 1024) -> dict:
    """Logs of the job's latest attempt from byte `offset`: streamed chunks, else the result's tail."""
    rows = conn.query(
        "SELECT byte_offset, data FROM job_logs WHERE job_id = ? AND attempt = ? AND stream = ?"
        " AND byte_offset >= ? ORDER BY byte_offset LIMIT 1000",
        (job["id"], job["attempt"], stream, offset))
    if not rows and offset == 0:
        text = job[f"{stream}_tail"] or ""
        return {"stream": stream, "offset": 0, "next_offset": len(text.encode()), "data": text,
                "truncated": bool(job[f"{stream}_truncated"]), "source": "tail"}
    parts, size, next_offset = [], 0, offset
    for row in rows:
        if row["byte_offset"] != next_offset or size >= limit:
            break  # a gap (chunk not arrived yet) or enough for one answer
        parts.append(row["data"])
        chunk_bytes = len(row["data"].encode())
        size += chunk_bytes
        next_offset += chunk_bytes
    return {"stream": stream, "offset": offset, "next_offset": next_offset, "data": "".join(parts),
            "truncated": bool(job[f"{stream}_truncated"]), "source": "stream"}


def outputs_report(job: dict) -> dict:
    """What the worker kept in the output archive and what it left out, by
    reason (worker/outputs.py REASONS); the archive's manifest lists the files
    left out. None values for a job finished before workers reported this."""
    report = json.loads(job["outputs_report"]) if job.get("outputs_report") else {}
    left_out = report.get("left_out")
    return {"files": report.get("files"), "left_out": left_out,
            "left_out_bytes": report.get("left_out_bytes"), "left_out_reasons": report.get("reasons"),
            "manifest": OUTPUTS_MANIFEST if left_out else None}


# How the warnings name the reasons a file was left out (worker/outputs.py REASONS).
LEFT_OUT_LABELS = {"size_cap": "over the size cap", "file_cap": "over the file cap",
                   "special_file": "special files", "symlink": "symlinks",
                   "bad_name": "names no archive can hold", "unreadable": "unreadable",
                   "reserved_name": f"named {OUTPUTS_MANIFEST}"}


def job_warnings(job: dict) -> list[str]:
    """Sentences on what the job's outputs lack: files left out of the
    archive (by reason), a disk quota filled."""
    warnings = []
    report = outputs_report(job)
    if report["left_out"]:
        parts = ", ".join(f"{n} {LEFT_OUT_LABELS.get(reason, reason)}"
                          for reason, n in sorted((report["left_out_reasons"] or {}).items()))
        warnings.append(f"{report['left_out']} output file(s) left out of the archive ({parts}); "
                        f"the archive lists them in {OUTPUTS_MANIFEST}.")
    if job.get("expired_at") is not None:
        warnings.append(f"Outputs expired: this job's files and logs were deleted on "
                        f"{iso(job['expired_at'])} (retention).")
    if job.get("disk_full"):
        warnings.append(f"The job filled its disk quota of {job.get('disk_mb') or '?'} MB: "
                        "writes past it failed (no space left on device).")
    return warnings


def job_json(job: dict, waiting: dict | None = None, tries: list | None = None) -> dict:
    """The public JSON shape of a job (no internal paths, leases or worker secrets).

    Args:
        waiting: why a queued job waits (waiting.explain): computed only where
            one job is read (its JSON, page and stream), null in lists.
        tries: its history (retries.tries_json), likewise only where one job is read.
    """
    return {
        "id": job["id"],
        "owner": job.get("owner"),
        "name": job["name"],
        "state": job["state"],
        "image": job["image"],
        "resources": {"cpus": job["cpus"], "memory_mb": job["memory_mb"],
                      "timeout_s": job["timeout_s"], "gpus": job["gpus"],
                      "disk_mb": job.get("disk_mb")},
        "script": {"name": job["script_name"], "sha256": job["script_sha256"],
                   "size": job["script_size"]},
        "dataset": ({"name": job["dataset_name"], "sha256": job["dataset_sha256"],
                     "size": job["dataset_size"]} if job["dataset_blob"] else None),
        # The normalised requirements.txt the worker installs (wheels only) before the script.
        "requirements": ({"sha256": job["requirements_sha256"], "size": job["requirements_size"]}
                         if job.get("requirements_blob") else None),
        # The array it belongs to and its index there (arrays.py); null for a lone job.
        "array": arrays.job_array_json(job),
        # Its own environment variables' names; the values only to its owner,
        # on request (GET .../env): they may be secrets (jobenv.py).
        "env_names": jobenv.names(job),
        "attempt": job["attempt"],
        # Its retry policy (retries.py), its try under it (a lost worker's rerun
        # keeps the number), and every try's exit, times and logs.
        "retry_policy": retries.policy_json(job),
        "try": (job.get("retries_used") or 0) + 1,
        "tries": tries,
        "worker_id": job["worker_id"] if job["state"] == JobState.RUNNING.value else None,
        "cancel_requested": bool(job["cancel_requested"]),
        "submitted_at": iso(job["submitted_at"]),
        "started_at": iso(job["started_at"]),
        "finished_at": iso(job["finished_at"]),
        "exit_code": job["exit_code"],
        "failure_reason": job["failure_reason"],
        "waiting": waiting,
        # Why it was accepted without a capacity check (capacity.check_job), if it was.
        "capacity_note": job.get("capacity_note"),
        "outputs": ({"sha256": job["output_sha256"], "size": job["output_size"],
                     **outputs_report(job)}
                    if job["output_blob"] and job.get("expired_at") is None else None),
        # The job filled its disk quota (resources.disk_mb): it got ENOSPC.
        "disk_full": bool(job.get("disk_full")),
        # Retention (retention.py): a pinned job's files are kept; an expired
        # job's files and logs were deleted (its downloads answer 410).
        "pinned": bool(job.get("pinned")),
        "outputs_expired": job.get("expired_at") is not None,
        "expired_at": iso(job.get("expired_at")),
        # What the owner should know of the outputs, as the page and the CLI show it.
        "warnings": job_warnings(job),
        "usage": {"cpu_seconds": job["cpu_seconds"], "peak_memory_bytes": job["peak_memory_bytes"],
                  "wall_seconds": job["wall_seconds"], "gpu_seconds": job.get("gpu_seconds"),
                  # Fields the proxy bounded by what it observed (leases.bound_usage).
                  "clamped": sorted(filter(None, (job.get("usage_clamped") or "").split(","))),
                  # Building its requirements' environment, apart from the run's wall time;
                  # env_cached: the worker had it already (null: no requirements).
                  "env_build_s": job.get("env_build_s"),
                  "env_cached": None if job.get("env_cached") is None else bool(job["env_cached"])},
        # `usage` is the last try's; its cost prices every try (retries.py), summed here.
        "usage_all_tries": retries.all_tries_usage(tries),
        "cost": usage.cost_json(job),
        "webhook": webhooks.webhook_json(job),
        "links": {"self": f"/api/v1/jobs/{job['id']}", "logs": f"/api/v1/jobs/{job['id']}/logs",
                  "outputs": f"/api/v1/jobs/{job['id']}/outputs", "page": f"/jobs/{job['id']}"},
    }
