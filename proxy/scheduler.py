"""The scheduler: which queued job goes to which worker.

`dispatch` reserves queued jobs for live workers with free slots and the
capacity each job needs (a reservation is the job's worker_id set while it is
still queued) and wakes those workers (wakeups.py); a worker's claim
(workers.claim) then takes the jobs reserved for it: they become `running`
under its lease (leases.py). Dispatch runs wherever the queue or the capacity
changes: a submission, a claim, a requeue, a drain lifted.

Fair share across users, round-robin across workers: each free slot goes to
the user with the fewest jobs running or reserved (divided by their priority
weight), ties to the user served longest ago; the job goes to the eligible
worker that was served longest ago (`rr_seq`). So jobs go around the workers
in turn, whichever worker happens to poll first. It all runs inside the
caller's transaction under the dispatch lock, so two passes never reserve
the same job.
"""
from __future__ import annotations

import json

from . import arrays, retries, wakeups
from .models import JobState, WorkerState

# How many queued jobs one dispatch query reads at most; a pass reads further
# batches only while free slots remain and the previous batch was full. A
# batch is sized from the free slots: most claims reserve one job, and
# building hundreds of rows for that was most of a claim's cost (bench/claim).
DISPATCH_BATCH = 256
DISPATCH_BATCH_PER_SLOT = 4


def dispatch(conn, now: float, lease_timeout_s: float) -> int:
    """Reserve queued jobs for live workers with free slots, and wake each
    worker that got one. Returns how many.

    Runs inside the caller's write transaction under the dispatch lock: a
    claim, a submission, and whatever put jobs back in the queue or added
    capacity (a requeue, a drain lifted).

    Fair across users: each free slot goes to the user with the fewest jobs
    running or reserved now, divided by their priority weight (user_limits);
    ties go to the user served longest ago (`users.rr_seq`), then to the oldest
    queued job. A user at their max_running gets nothing more. So one user's thousand
    queued jobs cannot starve another's one, and users take turns. Within a
    user, jobs go in submission order; the job goes to the eligible worker that
    was served longest ago (round-robin across workers).
    """
    # Most passes of an idle cluster find nothing to place: one index probe
    # (jobs_queue) saves the per-worker read below, which grows with the workers.
    runnable = _runnable(conn, now)
    if conn.query_one(f"SELECT 1 AS x FROM jobs WHERE worker_id IS NULL AND state = ?{runnable[0]}"
                      " LIMIT 1", (JobState.QUEUED.value, *runnable[1])) is None:
        return 0
    live = conn.query(
        "SELECT w.id, w.cpus, w.memory_mb, w.gpus, w.slots, w.images, w.rr_seq,"
        " (SELECT COUNT(*) FROM jobs j WHERE j.worker_id = w.id AND j.state IN (?, ?)) AS used"
        " FROM workers w WHERE w.state = ? AND w.last_seen_at >= ?",
        (JobState.QUEUED.value, JobState.RUNNING.value, WorkerState.ACTIVE.value,
         now - lease_timeout_s))
    # A worker that lists no images can run nothing (and would make `IN ()`,
    # which PostgreSQL refuses).
    free = [w for w in (dict(w, images=set(json.loads(w["images"]))) for w in live)
            if w["used"] < w["slots"] and w["images"]]
    if not free:
        return 0
    owners = _queued_owners(conn, runnable)
    if not owners:
        return 0
    # Job arrays' %N caps (arrays.py): an array with N reserved or running gets no more.
    caps = arrays.Caps(conn, [w["id"] for w in live])
    load = _owner_load(conn, [w["id"] for w in live])
    next_seq = conn.query_one("SELECT COALESCE(MAX(rr_seq), 0) AS m FROM workers")["m"] + 1
    user_seq = conn.query_one("SELECT COALESCE(MAX(rr_seq), 0) AS m FROM users")["m"] + 1
    slots = sum(w["slots"] - w["used"] for w in free)
    batch = min(DISPATCH_BATCH, max(16, DISPATCH_BATCH_PER_SLOT * slots))
    pending: dict[str, list[dict]] = {}   # owner -> fetched, not yet placed jobs
    after: dict[str, str] = {}            # owner -> id the next fetch starts after
    reserved = 0
    woken: set[str] = set()
    while owners and any(w["used"] < w["slots"] for w in free):
        owner = min(owners, key=lambda o: (load.get(o, 0) / owners[o]["weight"],
                                           owners[o]["rr_seq"], owners[o]["head"]))
        cap = owners[owner]["max_running"]
        if cap is not None and load.get(owner, 0) >= cap:
            del owners[owner]   # at their max_running: their jobs wait
            continue
        job, w = _next_placeable(conn, owner, free, pending, after, batch, runnable, caps)
        if job is None:
            del owners[owner]   # nothing of theirs fits a free worker now
            continue
        n = conn.execute(
            "UPDATE jobs SET worker_id = ?, reserved_at = ? WHERE id = ? AND state = ?"
            " AND worker_id IS NULL", (w["id"], now, job["id"], JobState.QUEUED.value))
        if n:
            caps.took(job)
            woken.add(wakeups.worker_topic(w["id"]))
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
    wakeups.notify(conn, *sorted(woken))
    return reserved


def _runnable(conn, now: float) -> tuple[str, tuple]:
    """What to AND to a read of the unreserved queue, with its parameters, so
    it finds only jobs that may start now: every parent succeeded
    (deps_pending = 0, dependencies.py; on the jobs_queue index) and no retry
    back-off holds it (retries.due_filter: nothing while no job is in one)."""
    due_sql, due_params = retries.due_filter(conn, now)
    return " AND deps_pending = 0" + due_sql, due_params


def _next_placeable(conn, owner: str, free: list[dict], pending: dict, after: dict,
                    batch: int, runnable: tuple,
                    caps: arrays.Caps) -> tuple[dict | None, dict | None]:
    """The owner's oldest queued job some free worker can run now, with that worker."""
    while True:
        if not pending.get(owner):
            if after.get(owner) == "":
                return None, None  # read to the end already
            jobs = _queued_batch(conn, free, after.get(owner, ""), batch, owner, runnable)
            # A whole batch can fit the free workers' combined limits and yet
            # none of them alone (a GPU on one, the memory on another): the
            # next call reads on, so such a head cannot block what is behind it.
            after[owner] = jobs[-1]["id"] if len(jobs) == batch else ""
            pending[owner] = jobs
            if not jobs:
                return None, None
        job = pending[owner].pop(0)
        if not caps.allows(job):
            # Its array is at its %N cap: the array's queued jobs follow this
            # one in id order (arrays.Caps.last_queued), so read on after the
            # last of them instead of through them all. Of the jobs already
            # read, only the array's are dropped: another job whose id fell
            # in its range (a proxy whose clock is behind) is still placed.
            last = caps.last_queued(job["array_id"])
            pending[owner] = [j for j in pending[owner]
                              if j["id"] > last or j["array_id"] != job["array_id"]]
            if after.get(owner) and after[owner] < last:
                after[owner] = last
            continue
        fits = [w for w in free if w["used"] < w["slots"] and _fits(job, w)]
        if fits:
            return job, min(fits, key=lambda w: (w["rr_seq"], w["id"]))


def _queued_owners(conn, runnable: tuple) -> dict[str, dict]:
    """Users with unreserved queued jobs -> their oldest job's id ("head"), their
    place in the turn ("rr_seq"), weight and max_running.

    A loose index scan (one index probe per user on jobs_queue), so its cost
    grows with the number of users waiting, not with the queue's length.
    """
    q = JobState.QUEUED.value
    rows = conn.query(
        "WITH RECURSIVE owners(owner_id) AS ("
        f" SELECT MIN(owner_id) FROM jobs WHERE worker_id IS NULL AND state = ?{runnable[0]}"
        " UNION ALL"
        " SELECT (SELECT MIN(j.owner_id) FROM jobs j WHERE j.worker_id IS NULL AND j.state = ?"
        f"{runnable[0]} AND j.owner_id > owners.owner_id) FROM owners"
        " WHERE owners.owner_id IS NOT NULL)"
        " SELECT owner_id, (SELECT MIN(j.id) FROM jobs j WHERE j.worker_id IS NULL"
        f" AND j.state = ?{runnable[0]} AND j.owner_id = owners.owner_id) AS head,"
        " (SELECT u.rr_seq FROM users u WHERE u.id = owners.owner_id) AS rr_seq,"
        " (SELECT l.weight FROM user_limits l WHERE l.user_id = owners.owner_id) AS weight,"
        " (SELECT l.max_running FROM user_limits l WHERE l.user_id = owners.owner_id) AS max_running"
        " FROM owners WHERE owner_id IS NOT NULL", (q, *runnable[1], q, *runnable[1], q, *runnable[1]))
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


def _queued_batch(conn, free: list[dict], after: str, limit: int, owner: str,
                  runnable: tuple) -> list[dict]:
    """The owner's next unreserved queued jobs after id `after` that a free worker could run."""
    # Filtering on the free workers' combined limits keeps a head of jobs no
    # one can run (say gpus=1 with no GPU worker) out of the scan altogether.
    images = sorted(set().union(*(w["images"] for w in free)))
    placeholders = ", ".join("?" for _ in images)
    return conn.query(
        "SELECT id, cpus, memory_mb, gpus, image, array_id, array_max_running FROM jobs"
        " WHERE worker_id IS NULL AND state = ?"
        f"{runnable[0]} AND owner_id = ? AND gpus <= ? AND cpus <= ? AND memory_mb <= ? AND image IN ({placeholders})"
        " AND id > ? ORDER BY id LIMIT ?",
        (JobState.QUEUED.value, *runnable[1], owner, max(w["gpus"] for w in free), max(w["cpus"] for w in free),
         max(w["memory_mb"] for w in free), *images, after, limit))


def _fits(job: dict, worker: dict) -> bool:
    return (job["gpus"] <= worker["gpus"] and job["cpus"] <= worker["cpus"]
            and job["memory_mb"] <= worker["memory_mb"] and job["image"] in worker["images"])
