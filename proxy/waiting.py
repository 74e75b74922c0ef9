"""Why a queued job waits, and when it may start.

Every queued job gets a reason code and a sentence (`waiting` in its JSON, its
page, `jobcloud status`, the dashboard), in this order of precedence:

  ``dependency``         a parent it runs after has not succeeded yet (dependencies.py);
  ``starting``           reserved for a worker, which takes it at its next claim;
  ``retry_backoff``      its last try failed retryably: the next waits out its back-off (retries.py);
  ``vm_booting``         no live worker can take it, and the scaler is booting a VM
                         of a shape that can (since when, the typical boot time);
  ``no_workers``         the cluster has no live worker;
  ``no_capable_worker``  no live worker has its image / CPUs / memory / GPUs;
  ``draining``           the only workers that can run it are draining;
  ``max_running``        its owner's running jobs are at their max_running limit;
  ``fair_share``         other users' jobs get the next slots (fair share, scheduler.py);
  ``free_slot``          it is next in its owner's turn, waiting for a slot to free.

Its position is computed the way scheduler.dispatch hands out slots: each
free slot goes to the user with the fewest jobs running or reserved (divided
by their weight). So another user's jobs that come before this one are those
placed while that user's load stays below this one's owner's load at this
job's turn; a closed formula per user, no simulation of the queue. The
position ignores which worker each of those jobs fits: it is an estimate.

The estimated start is a range from recent history: the slots of the workers
that can run the job free up when their jobs end, at the earliest after the
median runtime of the cluster's recently finished jobs, at the latest at their
time limits; the jobs ahead then take a slot each for as long.

It is read, never stored: computed for one job when its JSON or page is asked
for (a few indexed reads), and for the dashboard's queued list in one pass
(`explain_queue`). Dispatch and claims do none of this.
"""
from __future__ import annotations

import heapq
import math
import statistics
import time
from dataclasses import dataclass

from . import arrays, capacity, dependencies, retries
from .models import JobState, WorkerState, iso

# Runtimes of the last this many finished jobs of the last week make "typical".
RECENT_RUNS = 100
RECENT_RUNS_S = 7 * 24 * 3600
# Boots the typical boot time is taken from (vms.record_report keeps as many).
RECENT_BOOTS = 50
_EPS = 1e-9


@dataclass
class Cluster:
    """What every explanation of one pass reads once."""

    now: float
    workers: list[dict]           # capacity.live_workers
    shapes: list[dict]            # capacity.scaler_shapes
    booting: list[dict]           # VMs the scaler reports booting: name, created_at
    boot_s: list[float]           # recent boot durations
    owners: dict[str, dict]       # owner -> queued, head, rr_seq, weight, max_running
    load: dict[str, int]          # owner -> jobs running or reserved
    held: list[dict]              # jobs running or reserved: worker_id, owner_id, since, timeout_s
    runtimes: list[float]         # wall seconds of recently finished jobs


def explain(conn, job: dict, *, lease_timeout_s: float, now: float | None = None) -> dict | None:
    """The `waiting` object of one job; None unless it is queued."""
    if job["state"] != JobState.QUEUED.value:
        return None
    if job.get("deps_pending"):
        return _dependency(dependencies.waiting_on(conn, job))
    capped = _array_cap(conn, job)
    if capped is not None:
        return capped
    cluster = load_cluster(conn, lease_timeout_s, now)
    return reason(cluster, job, _own_ahead(conn, cluster, job), _worker_name(conn, cluster, job))


def explain_queue(conn, *, lease_timeout_s: float, limit: int = 50,
                  now: float | None = None) -> list[tuple[dict, dict]]:
    """The oldest `limit` queued jobs with their `waiting`, in one pass (the dashboard).

    The jobs are the oldest of the whole queue, so each one's place among its
    owner's queued jobs is counted from the list itself.
    """
    cluster = load_cluster(conn, lease_timeout_s, now)
    jobs = conn.query(
        "SELECT j.id, j.owner_id, j.name, j.image, j.cpus, j.memory_mb, j.gpus, j.timeout_s,"
        " j.state, j.worker_id, j.submitted_at, j.deps_pending, j.not_before, j.retries,"
        " j.retries_used, j.exit_code, j.array_id, j.array_max_running, u.name AS owner FROM jobs j"
        " JOIN users u ON u.id = j.owner_id WHERE j.state = ? ORDER BY j.id LIMIT ?",
        (JobState.QUEUED.value, limit))
    names = {w["id"]: w["name"] for w in cluster.workers}
    active = _active(cluster)
    seen: dict[str, int] = {}
    out = []
    for job in jobs:
        if job["deps_pending"]:
            out.append((job, _dependency(dependencies.waiting_on(conn, job))))
            continue
        capped = _array_cap(conn, job)
        if capped is not None:
            out.append((job, capped))
            continue
        ahead = seen.get(job["owner_id"], 0)
        if job["worker_id"] is None and any(capacity.fits(job, w) for w in active):
            seen[job["owner_id"]] = ahead + 1
        out.append((job, reason(cluster, job, ahead, names.get(job["worker_id"]))))
    return out


def load_cluster(conn, lease_timeout_s: float, now: float | None = None) -> Cluster:
    """What every explanation of one pass needs: a handful of reads, none per queued job."""
    now = time.time() if now is None else now
    queued, running = JobState.QUEUED.value, JobState.RUNNING.value
    # Counted on the covering jobs_queue index alone, then joined per user: no job row
    # is read (a few ms for 20,000 queued jobs on SQLite; joined first, five times that).
    owners = {r["owner_id"]: dict(r, weight=float(r["weight"] or 1.0)) for r in conn.query(
        "SELECT g.owner_id, g.queued, g.head, u.rr_seq, l.weight, l.max_running FROM"
        " (SELECT owner_id, COUNT(*) AS queued, MIN(id) AS head FROM jobs"
        " WHERE worker_id IS NULL AND state = ? GROUP BY owner_id) g"
        " JOIN users u ON u.id = g.owner_id LEFT JOIN user_limits l ON l.user_id = g.owner_id",
        (queued,))}
    live = capacity.live_workers(conn, now, lease_timeout_s)
    # Reserved jobs by worker (jobs_worker), as scheduler._owner_load counts them: by
    # state alone would read the whole queue.
    marks = ", ".join("?" for _ in live) or "NULL"
    held = conn.query(
        "SELECT worker_id, owner_id, COALESCE(started_at, reserved_at) AS since, timeout_s"
        " FROM jobs WHERE state = ? UNION ALL"
        " SELECT worker_id, owner_id, reserved_at AS since, timeout_s FROM jobs"
        f" WHERE worker_id IN ({marks}) AND state = ?", (running, *(w["id"] for w in live), queued))
    load: dict[str, int] = {}
    for h in held:
        load[h["owner_id"]] = load.get(h["owner_id"], 0) + 1
    runtimes = [r["wall_seconds"] for r in conn.query(
        "SELECT wall_seconds FROM jobs WHERE finished_at >= ? AND wall_seconds IS NOT NULL"
        " AND state IN (?, ?, ?) ORDER BY finished_at DESC LIMIT ?",
        (now - RECENT_RUNS_S, JobState.SUCCEEDED.value, JobState.FAILED.value,
         JobState.TIMED_OUT.value, RECENT_RUNS))]
    return Cluster(
        now=now, workers=live,
        shapes=capacity.scaler_shapes(conn, now),
        booting=conn.query("SELECT name, created_at FROM vms WHERE state = ? ORDER BY created_at, name",
                           ("booting",)),
        boot_s=[r["boot_s"] for r in conn.query(
            "SELECT boot_s FROM vm_boots ORDER BY ready_at DESC LIMIT ?", (RECENT_BOOTS,))],
        owners=owners, load=load, held=held, runtimes=runtimes)


def _active(cluster: Cluster) -> list[dict]:
    return [w for w in cluster.workers if w["state"] == WorkerState.ACTIVE.value]


def _own_ahead(conn, cluster: Cluster, job: dict) -> int:
    """The owner's unreserved queued jobs older than `job` that an active worker
    could run: a job no worker can run holds no place in the line."""
    active = _active(cluster)
    if job["worker_id"] is not None or not active:
        return 0
    images = sorted(set().union(*(w["images"] for w in active)))
    if not images:
        return 0
    # The workers' combined limits, as scheduler._queued_batch filters (a bound, not exact).
    return conn.query_one(
        "SELECT COUNT(*) AS n FROM jobs WHERE owner_id = ? AND state = ? AND id < ?"
        " AND worker_id IS NULL AND cpus <= ? AND memory_mb <= ? AND gpus <= ?"
        f" AND image IN ({', '.join('?' for _ in images)})",
        (job["owner_id"], JobState.QUEUED.value, job["id"], max(w["cpus"] for w in active),
         max(w["memory_mb"] for w in active), max(w["gpus"] for w in active), *images))["n"]


def _worker_name(conn, cluster: Cluster, job: dict) -> str | None:
    if job["worker_id"] is None:
        return None
    for w in cluster.workers:
        if w["id"] == job["worker_id"]:
            return w["name"]
    row = conn.query_one("SELECT name FROM workers WHERE id = ?", (job["worker_id"],))
    return row["name"] if row else None


# ------------------------------------------------------------------- reasons

def reason(cluster: Cluster, job: dict, own_ahead: int, worker_name: str | None = None) -> dict:
    """The `waiting` object of a queued job.

    Args:
        own_ahead: the owner's unreserved queued jobs older than this one.
        worker_name: the worker it is reserved for, if it is.
    """
    if job["worker_id"] is not None:
        return _waiting("starting", f"Starting on worker {worker_name or job['worker_id']}: it was "
                        "handed to that worker, which takes it at its next claim.",
                        worker=worker_name)
    backoff = retries.waiting_detail(job, cluster.now)
    if backoff is not None:
        detail, retry_at = backoff
        return _waiting("retry_backoff", detail, retry_at=iso(retry_at),
                        estimate=_range(retry_at, retry_at, "from its retry back-off: it starts "
                                        "no earlier, then as a slot frees"))
    capable = [w for w in cluster.workers if capacity.fits(job, w)]
    active = [w for w in capable if w["state"] == WorkerState.ACTIVE.value]
    shape_fits = any(capacity.fits(job, s) for s in cluster.shapes)
    if not active and shape_fits and cluster.booting:
        return _vm_booting(cluster)
    scaler = " The scaler can start a VM that runs it." if shape_fits else ""
    if not cluster.workers:
        return _waiting("no_workers", "The cluster has no live workers: it starts when a worker "
                        "that can run it joins." + scaler)
    if not capable:
        resource = capacity.missing_resource(job, cluster.workers) or "combination"
        return _waiting("no_capable_worker", "No live worker can run it: "
                        f"{capacity.unmet(job, cluster.workers, None)}." + scaler,
                        resource=resource)
    if not active:
        names = ", ".join(w["name"] for w in capable)
        return _waiting("draining", f"The worker(s) that can run it ({names}) are draining: they "
                        "finish their jobs and take no new ones." + scaler)
    return _queue_turn(cluster, job, own_ahead, active)


def _queue_turn(cluster: Cluster, job: dict, own_ahead: int, active: list[dict]) -> dict:
    """max_running, fair_share or free_slot, with the position and the estimate."""
    owner = job["owner_id"]
    mine = cluster.owners.get(owner) or {"weight": 1.0, "max_running": None, "rr_seq": 0,
                                         "head": job["id"]}
    load = cluster.load.get(owner, 0)
    cap = mine["max_running"]
    others = _others_ahead(cluster, owner, mine, load + own_ahead)
    position = {"overall": own_ahead + others + 1, "yours": own_ahead + 1}
    where = (f"position {position['overall']} in the queue, {position['yours']} among your "
             "queued jobs")
    if cap is not None and load + own_ahead >= cap:
        mine_held = [h for h in cluster.held if h["owner_id"] == owner]
        return _waiting(
            "max_running", f"Held by your max_running limit: you have {load} job(s) running or "
            f"starting and max_running is {cap}"
            + (f"; {own_ahead} of your queued jobs go first." if own_ahead else "."),
            position=position,
            estimate=_estimate(cluster, [[h] for h in mine_held] + [[]] * max(0, cap - load),
                               own_ahead, job["timeout_s"]))
    slots: list[list[dict]] = []
    for w in active:
        on_it = [h for h in cluster.held if h["worker_id"] == w["id"]]
        slots += [[h] for h in on_it] + [[]] * max(0, w["slots"] - len(on_it))
    free = sum(max(0, w["slots"] - w["used"]) for w in active)
    estimate = _estimate(cluster, slots, position["overall"] - 1,
                         _mean_timeout(cluster) or job["timeout_s"])
    if others:
        return _waiting("fair_share", f"Other users first by fair share: {others} of their queued "
                        f"job(s) go before it (you have {load} running or starting); {where}.",
                        position=position, estimate=estimate)
    busy = ("a slot is free: it should start within moments" if free and not own_ahead else
            f"all {sum(w['slots'] for w in active)} slot(s) of the workers that can run it are busy"
            if not free else "your older queued jobs go first")
    return _waiting("free_slot", f"Waiting for a free slot: {where}; {busy}.",
                    position=position, estimate=estimate)


def _others_ahead(cluster: Cluster, owner: str, mine: dict, level_jobs: int) -> int:
    """Queued jobs of other users that get a slot before the owner's job that is
    placed when the owner has `level_jobs` running or reserved (scheduler.dispatch's order)."""
    level = level_jobs / mine["weight"]
    total = 0
    for other, o in cluster.owners.items():
        if other == owner:
            continue
        load = cluster.load.get(other, 0)
        room = o["weight"] * level - load
        first = (o["rr_seq"], o["head"]) < (mine["rr_seq"], mine["head"])
        # Their i-th job goes first while (load + i) / weight < level (<= when they win the tie).
        n = math.floor(room + _EPS) + 1 if first else math.ceil(room - _EPS)
        n = min(max(0, n), o["queued"])
        if o["max_running"] is not None:
            n = min(n, max(0, o["max_running"] - load))
        total += n
    return total


def _vm_booting(cluster: Cluster) -> dict:
    vm = cluster.booting[0]
    typical = statistics.median(cluster.boot_s) if cluster.boot_s else None
    more = f" (and {len(cluster.booting) - 1} more)" if len(cluster.booting) > 1 else ""
    detail = (f"A VM is being started for it: {vm['name']}{more}, booting since "
              f"{iso(vm['created_at'])}; "
              + (f"a boot typically takes {typical:.0f} s." if typical is not None
                 else "typical boot time unknown (no boot seen yet)."))
    estimate = None
    if typical is not None:
        earliest = max(cluster.now, vm["created_at"] + min(cluster.boot_s))
        latest = max(earliest, vm["created_at"] + max(cluster.boot_s))
        estimate = _range(earliest, latest, f"from the last {len(cluster.boot_s)} VM boot(s)")
    return _waiting("vm_booting", detail, estimate=estimate,
                    vm={"name": vm["name"], "booting_since": iso(vm["created_at"]),
                        "typical_boot_s": typical})


# ------------------------------------------------------------------ estimate

def _estimate(cluster: Cluster, slots: list[list[dict]], ahead: int, ahead_timeout: float) -> dict:
    """When `ahead` more jobs have each taken a slot, the next one starts.

    Each slot is free now or frees when its job ends: earliest after the typical
    runtime (capped by the job's time limit), latest at its time limit. The
    jobs ahead then take the typical runtime, or the running jobs' mean time limit.
    """
    if not slots:
        return None
    typical = statistics.median(cluster.runtimes) if cluster.runtimes else 0.0
    now = cluster.now
    early, late = [], []
    for held in slots:
        if not held:
            early.append(now)
            late.append(now)
            continue
        since, limit = held[0]["since"] or now, held[0]["timeout_s"]
        early.append(max(now, since + min(typical, limit)))
        late.append(max(now, since + limit))
    earliest = _start_after(early, ahead, typical)
    latest = max(earliest, _start_after(late, ahead, ahead_timeout))
    basis = ("from the time limits of the jobs running and queued ahead"
             + (f" and the median runtime ({typical:.0f} s) of the last {len(cluster.runtimes)}"
                " finished job(s)" if cluster.runtimes else "; no finished job to learn runtimes from"))
    return _range(earliest, latest, basis)


def _start_after(free_at: list[float], ahead: int, each_s: float) -> float:
    """When a slot is free for the next job, once `ahead` jobs of `each_s` seconds took
    the slots that free at `free_at`, each the first one free."""
    heap = list(free_at)
    heapq.heapify(heap)
    if each_s <= 0:
        return heap[0]
    top = max(heap)
    while ahead and top - heap[0] > each_s:
        top = max(top, heap[0] + each_s)
        heapq.heapreplace(heap, heap[0] + each_s)
        ahead -= 1
    # Every slot now frees within one job of the others: they take turns in this
    # order, so a deep position needs no step per job ahead.
    turns = sorted(heap)
    return turns[ahead % len(turns)] + (ahead // len(turns)) * each_s


def _mean_timeout(cluster: Cluster) -> float | None:
    """The time limit the jobs ahead are taken to have: the running jobs' mean
    (they are few, and read anyway; the queue's own would read every queued row)."""
    if not cluster.held:
        return None
    return sum(h["timeout_s"] for h in cluster.held) / len(cluster.held)


def _range(earliest: float, latest: float, basis: str) -> dict:
    return {"earliest": iso(earliest), "latest": iso(latest), "is_estimate": True,
            "basis": f"An estimate {basis}."}


def _array_cap(conn, job: dict) -> dict | None:
    """A job of a job array at its %N cap (arrays.py): it waits for one of the array's to end."""
    active = arrays.at_cap(conn, job)
    if active is None:
        return None
    return _waiting("array_cap", f"{active} jobs of its array {job['array_id']} are running or"
                    f" starting, its cap (%{job['array_max_running']}): it starts when one of"
                    " them ends.", array={"id": job["array_id"], "active": active,
                                          "max_running": job["array_max_running"]})


def _dependency(parents: list[dict]) -> dict:
    """A job waiting for its parents (dependencies.py): the first one named, with its state."""
    if not parents:   # the last one succeeded since the job was read
        return _waiting("dependency", "Its parents have succeeded: it is queued for a slot.",
                        parents=[])
    first = parents[0]
    more = f" and {len(parents) - 1} more" if len(parents) > 1 else ""
    return _waiting("dependency", f"Waiting for job {first['name']} ({first['id']}, "
                    f"{first['state']}){more}: it starts once every job it runs after succeeded.",
                    parents=[{"id": p["id"], "state": p["state"]} for p in parents[:20]])


def _waiting(code: str, detail: str, *, position: dict | None = None, estimate: dict | None = None,
             **extra) -> dict:
    return {"reason": code, "detail": detail, "position": position, "estimate": estimate, **extra}
