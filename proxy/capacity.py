"""What the cluster can run: its live workers and the VM shapes the scaler can create.

A job no live worker and no scaler shape could ever run would wait for ever,
so intake refuses it (400 `no_capacity`) with a sentence that names the
resource and what exists. Two cases are accepted with a note on the job
instead: nothing is known yet (no live worker, no shape: a fresh cluster, or
one whose workers are all away), and an admin's `queue_unmet_capacity`, for
capacity that will be added by hand.

The scaler (vm_provisioning) reports its shapes with its VM list
(vms.record_report); a shape not reported for SHAPE_FRESH_S is gone, since a
scaler that stopped reporting creates nothing.
"""
from __future__ import annotations

import json
import time

from .errors import ValidationError
from .models import LIVE_WORKER_STATES, JobState

# A scaler reports every pass (a minute at most, docs/SCALER.md): a shape not
# reported for ten is from a scaler that stopped.
SHAPE_FRESH_S = 600.0
RESOURCES = ("image", "cpus", "memory_mb", "gpus")


def live_workers(conn, now: float, lease_timeout_s: float) -> list[dict]:
    """Workers active or draining and heard from within the lease timeout
    (as scheduler.dispatch counts them), with their slots used (running or reserved)."""
    rows = conn.query(
        "SELECT w.id, w.name, w.state, w.cpus, w.memory_mb, w.gpus, w.slots, w.images,"
        " (SELECT COUNT(*) FROM jobs j WHERE j.worker_id = w.id AND j.state IN (?, ?)) AS used"
        " FROM workers w WHERE w.state IN (?, ?) AND w.last_seen_at >= ? ORDER BY w.name, w.id",
        (JobState.QUEUED.value, JobState.RUNNING.value, *LIVE_WORKER_STATES, now - lease_timeout_s))
    return [dict(w, images=set(json.loads(w["images"]))) for w in rows]


def scaler_shapes(conn, now: float) -> list[dict]:
    """The VM shapes the scaler reported within SHAPE_FRESH_S."""
    rows = conn.query("SELECT cpus, memory_mb, gpus, images, reported_at FROM scaler_shapes"
                      " WHERE reported_at >= ? ORDER BY position", (now - SHAPE_FRESH_S,))
    return [dict(s, images=set(json.loads(s["images"]))) for s in rows]


def store_shapes(conn, shapes: list[dict], now: float) -> None:
    """Replace the scaler's shapes (inside the caller's transaction)."""
    conn.execute("DELETE FROM scaler_shapes")
    for i, s in enumerate(shapes):
        conn.execute("INSERT INTO scaler_shapes (position, cpus, memory_mb, gpus, images, reported_at)"
                     " VALUES (?, ?, ?, ?, ?, ?)",
                     (i, s["cpus"], s["memory_mb"], s["gpus"], json.dumps(sorted(s["images"])), now))


def fits(job: dict, machine: dict) -> bool:
    """Whether a worker or a VM shape could run the job (scheduler._fits, for sets of images)."""
    return (job["gpus"] <= machine["gpus"] and job["cpus"] <= machine["cpus"]
            and job["memory_mb"] <= machine["memory_mb"] and job["image"] in machine["images"])


def check_job(conn, fields: dict, *, lease_timeout_s: float, queue_unmet: bool,
              now: float | None = None) -> str | None:
    """Refuse a job no live worker and no scaler shape can run.

    Args:
        fields: the job's image, cpus, memory_mb and gpus.
        queue_unmet: the queue_unmet_capacity setting: accept such a job with a note.

    Returns:
        None when some worker or shape can run it; else the note to keep on
        the accepted job (nothing is known of the cluster, or queue_unmet).

    Raises:
        ValidationError: `no_capacity`, naming the resource and what exists.
    """
    now = time.time() if now is None else now
    workers = live_workers(conn, now, lease_timeout_s)
    shapes = scaler_shapes(conn, now)
    if not workers and not shapes:
        return ("Accepted without a capacity check: no worker was live and the scaler reported "
                "no VM shape when it was submitted. It waits until a worker that can run it joins.")
    if any(fits(fields, m) for m in workers + shapes):
        return None
    why = unmet(fields, workers, shapes)
    if queue_unmet:
        return f"Queued for capacity that does not exist yet (queue_unmet_capacity): {why}."
    raise ValidationError(f"no worker can run this job: {why}", code="no_capacity")


def unmet(job: dict, workers: list[dict], shapes: list[dict] | None) -> str:
    """A sentence on what no worker or shape offers, e.g. "asks 4 CPUs; the largest
    worker has 2, the scaler's VM shape has 2". shapes=None: the workers only."""
    resource = missing_resource(job, workers + (shapes or []))
    if resource is not None:
        return f"{asks(job, resource)}; {_what_exists(resource, workers, shapes)}"
    shapes = shapes or []
    # Each resource exists somewhere, never all on one machine (a GPU on one, the memory on another).
    asked = ", ".join(asks(job, r)[5:] for r in RESOURCES)
    return (f"asks {asked}, which no single machine has; "
            + "; ".join([f"worker {w['name']} has {_machine(w)}" for w in workers]
                        + [f"the scaler's VM shape has {_machine(s)}" for s in shapes]))


def missing_resource(job: dict, machines: list[dict]) -> str | None:
    """The first of RESOURCES no machine offers the job; None when each is offered by some."""
    for resource in RESOURCES:
        if not any(_offers(m, job, resource) for m in machines):
            return resource
    return None


def asks(job: dict, resource: str) -> str:
    """"asks 4 CPUs", "asks image jobcloud/ml"."""
    if resource == "image":
        return f"asks image {job['image']}"
    return f"asks {_amount(resource, job[resource])}"


def _offers(machine: dict, job: dict, resource: str) -> bool:
    if resource == "image":
        return job["image"] in machine["images"]
    return job[resource] <= machine[resource]


def _what_exists(resource: str, workers: list[dict], shapes: list[dict] | None) -> str:
    parts = []
    if workers:
        if resource == "image":
            images = sorted(set().union(*(w["images"] for w in workers)))
            parts.append(f"live workers have {', '.join(images) or 'no image'}")
        else:
            best = max(w[resource] for w in workers)
            parts.append(f"the largest worker has {_number(best)}" if len(workers) > 1
                         else f"the only worker has {_number(best)}")
    else:
        parts.append("no worker is live")
    for s in shapes or []:
        if resource == "image":
            parts.append(f"the scaler's VM shape has {', '.join(sorted(s['images']))}")
        else:
            parts.append(f"the scaler's VM shape has {_number(s[resource])}")
    if shapes == []:
        parts.append("the scaler reported no VM shape")
    return ", ".join(parts)


UNITS = {"cpus": ("CPU", "CPUs"), "memory_mb": ("MiB", "MiB"), "gpus": ("GPU", "GPUs")}


def _amount(resource: str, value) -> str:
    one, many = UNITS[resource]
    return f"{_number(value)} {one if value == 1 else many}"


def _number(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _machine(m: dict) -> str:
    return (f"{_amount('cpus', m['cpus'])}, {_amount('memory_mb', m['memory_mb'])}, "
            f"{_amount('gpus', m['gpus'])}, images {', '.join(sorted(m['images']))}")
