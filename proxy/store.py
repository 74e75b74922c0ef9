"""Jobs as users see them: create, read, list, cancel, logs.

What happens to a job once a worker is involved (claims, leases, results) is
in dispatch.py.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from . import usage, webhooks
from .errors import Conflict, NotFound, ValidationError
from .models import JobState, is_lookup_key, iso, new_id

# A job row as users see it: its owner's name and its webhook delivery, if any.
_JOB_SELECT = ("SELECT j.*, u.name AS owner" + webhooks.JOB_COLUMNS +
               " FROM jobs j JOIN users u ON u.id = j.owner_id" + webhooks.JOB_JOIN)

@dataclass(frozen=True)
class NewJob:
    owner_id: str
    name: str
    script_name: str
    script_blob: str
    script_size: int
    image: str
    cpus: float
    memory_mb: int
    timeout_s: int
    gpus: int
    dataset_name: str | None = None
    dataset_blob: str | None = None
    dataset_size: int | None = None
    webhook_url: str | None = None


def create_job(conn, job: NewJob, now: float | None = None) -> dict:
    """Insert a queued job (its files are already durable); returns the stored row."""
    now = time.time() if now is None else now
    job_id = new_id("j")
    conn.execute(
        "INSERT INTO jobs (id, owner_id, name, script_name, script_blob, script_sha256, script_size,"
        " dataset_name, dataset_blob, dataset_sha256, dataset_size, image, cpus, memory_mb,"
        " timeout_s, gpus, state, attempt, submitted_at, webhook_url)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, ?, ?)",
        (job_id, job.owner_id, job.name, job.script_name, job.script_blob, job.script_blob,
         job.script_size, job.dataset_name, job.dataset_blob, job.dataset_blob, job.dataset_size,
         job.image, job.cpus, job.memory_mb, job.timeout_s, job.gpus, JobState.QUEUED.value, now,
         job.webhook_url))
    return get_job(conn, job_id)


def get_job(conn, job_id: str) -> dict | None:
    return conn.query_one(_JOB_SELECT + " WHERE j.id = ?", (job_id,))


def jobs_by_subquery(conn, ids_sql: str, params) -> list[dict]:
    """The jobs whose ids the SELECT `ids_sql` gives, read in full in one query."""
    return conn.query(f"{_JOB_SELECT} WHERE j.id IN ({ids_sql})", params)


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
        n = conn.execute(
            "UPDATE jobs SET state = ?, finished_at = ?, worker_id = NULL, reserved_at = NULL,"
            " failure_reason = ? WHERE id = ? AND state = ?",
            (JobState.CANCELLED.value, now, "cancelled by user", job["id"], JobState.QUEUED.value))
        if n:
            job_finished(conn, job["id"], now)
        else:
            n = conn.execute(
                "UPDATE jobs SET cancel_requested = 1 WHERE id = ? AND state = ?",
                (job["id"], JobState.RUNNING.value))
        if not n:
            current = get_job(conn, job["id"])
            raise Conflict(f"job {job['id']} is already {current['state']}", code="job_finished")
    return get_job(conn, job["id"])


def job_finished(conn, job_id: str, now: float) -> None:
    """Once per job, inside the transaction that made it final: fix its cost, queue its webhook."""
    if usage.record_cost(conn, job_id)["webhook_url"]:
        job = get_job(conn, job_id)
        webhooks.enqueue(conn, job, job_json(job), now)


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


def job_json(job: dict) -> dict:
    """The public JSON shape of a job (no internal paths, leases or worker secrets)."""
    return {
        "id": job["id"],
        "owner": job.get("owner"),
        "name": job["name"],
        "state": job["state"],
        "image": job["image"],
        "resources": {"cpus": job["cpus"], "memory_mb": job["memory_mb"],
                      "timeout_s": job["timeout_s"], "gpus": job["gpus"]},
        "script": {"name": job["script_name"], "sha256": job["script_sha256"],
                   "size": job["script_size"]},
        "dataset": ({"name": job["dataset_name"], "sha256": job["dataset_sha256"],
                     "size": job["dataset_size"]} if job["dataset_blob"] else None),
        "attempt": job["attempt"],
        "worker_id": job["worker_id"] if job["state"] == JobState.RUNNING.value else None,
        "cancel_requested": bool(job["cancel_requested"]),
        "submitted_at": iso(job["submitted_at"]),
        "started_at": iso(job["started_at"]),
        "finished_at": iso(job["finished_at"]),
        "exit_code": job["exit_code"],
        "failure_reason": job["failure_reason"],
        "outputs": ({"sha256": job["output_sha256"], "size": job["output_size"]}
                    if job["output_blob"] else None),
        "usage": {"cpu_seconds": job["cpu_seconds"], "peak_memory_bytes": job["peak_memory_bytes"],
                  "wall_seconds": job["wall_seconds"], "gpu_seconds": job.get("gpu_seconds")},
        "cost": usage.cost_json(job),
        "webhook": webhooks.webhook_json(job),
        "links": {"self": f"/api/v1/jobs/{job['id']}", "logs": f"/api/v1/jobs/{job['id']}/logs",
                  "outputs": f"/api/v1/jobs/{job['id']}/outputs", "page": f"/jobs/{job['id']}"},
    }
