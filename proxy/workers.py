"""The worker registry: registration, heartbeats, admin states, and reaping
workers that went silent.

A worker is `active` (gets jobs) or `draining` (finishes its jobs, gets no
new ones) while it heartbeats; it ends `lost` (silent past the lease timeout:
it may register again, with its enrollment token or its own secret), `gone`
(deregistered, retired by an admin, or replaced by a registration that proved
to be the same worker) or `revoked` (by an admin). A worker told why it is no
longer live (`refusal`) knows whether to rejoin (lost) or to end (retired,
revoked). Whenever a worker leaves the live
states, the jobs reserved for it go back to the queue and the jobs it held
are requeued (leases.py).

How a change stays atomic on both databases: every change to who holds a job
happens inside a write transaction that takes the dispatch lock (SQLite:
BEGIN IMMEDIATE, which serializes writers; PostgreSQL: a transaction-scoped
advisory lock), and every state change is a compare-and-set UPDATE whose
WHERE clause restates the state it expects. Nothing lives in process memory,
so any number of gunicorn processes and proxy instances can serve workers.
"""
from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass

from . import accounts, leases, scheduler, wakeups
from .db import PG_DISPATCH_LOCK
from .errors import Conflict, NotFound, Unauthorized, ValidationError
from .models import LIVE_WORKER_STATES, JobState, WorkerState, iso, new_id


@dataclass(frozen=True)
class Capacity:
    """What a worker offers (worker_api.parse_capacity validates it)."""

    cpus: float
    memory_mb: int
    gpus: int
    slots: int
    images: tuple[str, ...]
    disk_mb: int | None = None


@dataclass(frozen=True)
class Orders:
    """What a worker must do, told on every heartbeat and claim answer.

    cancel: jobs it holds whose owner asked to cancel them; unknown: jobs it
    says it runs but no longer holds (stop them, no result); drain: finish
    what it holds, claim nothing new.
    """

    cancel: list[str]
    drain: bool
    unknown: list[str] | None = None

    def json(self) -> dict:
        answer = {"cancel": self.cancel, "drain": self.drain}
        if self.unknown is not None:
            answer["unknown"] = self.unknown
        return answer


# ----------------------------------------------------------------- registration

def register_worker(conn, enrollment: dict, name: str, cap: Capacity, *, lease_timeout_s: float,
                    max_attempts: int, now: float | None = None,
                    proven: dict | None = None) -> tuple[dict, str]:
    """Register a worker; a live worker of the same name is replaced only when
    the newcomer proves to be it (it restarted, or rejoins after a partition).

    Args:
        enrollment: the enrollment the worker joins under.
        proven: the earlier registration whose secret the newcomer presented
            (`rejoining`), or None for a registration with an enrollment token.

    Returns:
        (worker row, the worker's secret, shown once).

    Raises:
        ValidationError: the name is not 1-64 printable characters.
        Conflict: a live worker of another enrollment holds the name (name_in_use).
    """
    now = time.time() if now is None else now
    if not isinstance(name, str) or not 1 <= len(name) <= 64 or not name.isprintable():
        raise ValidationError("name must be 1-64 printable characters", code="invalid_name")
    secret = accounts.new_secret(accounts.WORKER_SECRET_PREFIX)
    worker_id = new_id("w")
    with conn.transaction(lock=PG_DISPATCH_LOCK):
        if proven is not None:
            # Checked again under the lock: an admin's retire or revoke, or a use
            # of the successor, may have committed since `rejoining` looked.
            proven = get_worker(conn, proven["id"])
            why = rejoin_refusal(conn, proven)
            if why is not None:
                raise why
        for old in conn.query("SELECT id, enrollment_id, state FROM workers WHERE name = ?"
                              " AND state IN (?, ?, ?)",
                              (name, *LIVE_WORKER_STATES, WorkerState.LOST.value)):
            mine = old["enrollment_id"] == enrollment["id"] or (proven is not None
                                                                and proven["id"] == old["id"])
            if old["state"] == WorkerState.LOST.value and not mine:
                continue   # another enrollment's lost worker holds nothing
            # Proof that it is the same worker: its own secret, or the enrollment
            # it joined with. Anyone else holding some enrollment token would
            # otherwise retire a live worker and be handed its running jobs. An
            # earlier registration of the same worker (live or lost) is replaced,
            # so its secret rejoins no more once this one is used.
            if not mine:
                raise Conflict(f"a live worker is registered as {name!r} under another enrollment; an "
                               "admin can retire it first (POST /api/v1/admin/workers/<id>/retire)",
                               code="name_in_use")
            _retire(conn, old["id"], WorkerState.GONE, now, max_attempts)
            conn.execute("UPDATE workers SET replaced_by = ? WHERE id = ?", (worker_id, old["id"]))
        if proven is not None:
            # The registration whose secret was presented is replaced by this one.
            conn.execute("UPDATE workers SET state = ?, retired_at = COALESCE(retired_at, ?),"
                         " replaced_by = ? WHERE id = ?",
                         (WorkerState.GONE.value, now, worker_id, proven["id"]))
        # A newcomer joins the round-robin turn next to the longest waiting.
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
    """The live worker whose secret this is, or None."""
    if not secret.startswith(accounts.WORKER_SECRET_PREFIX):
        return None
    return conn.query_one("SELECT * FROM workers WHERE secret_hash = ? AND state IN (?, ?)",
                          (accounts.hash_token(secret), *LIVE_WORKER_STATES))


def any_worker_for_secret(conn, secret: str) -> dict | None:
    """The worker whose secret this is, in whatever state, or None."""
    if not secret.startswith(accounts.WORKER_SECRET_PREFIX):
        return None
    return conn.query_one("SELECT * FROM workers WHERE secret_hash = ?", (accounts.hash_token(secret),))


def refusal(worker: dict | None) -> Unauthorized:
    """What a worker that is no longer live is told: whether it may rejoin.

    Lost (silent past its lease: a partition, a frozen proxy) and unknown (a
    proxy that forgot it) register again; retired and revoked are an admin's
    word (or its own deregistration) and end the worker (worker/errors.py
    EXIT_RETIRED, EXIT_REVOKED).
    """
    state = worker and worker["state"]
    if state == WorkerState.LOST.value:
        return Unauthorized("this worker was marked lost (silent past its lease) and its jobs were "
                            "requeued; register again", code="worker_lost")
    if state == WorkerState.REVOKED.value:
        return Unauthorized("this worker was revoked by an admin", code="worker_revoked")
    if state == WorkerState.GONE.value and worker.get("replaced_by"):
        return Unauthorized("this registration was replaced by a later registration of the same "
                            "worker; register again with this secret", code="worker_replaced")
    if state == WorkerState.GONE.value:
        return Unauthorized("this worker was retired (by an admin, by its own deregistration, or "
                            "replaced by a later registration of the same worker)",
                            code="worker_retired")
    return Unauthorized("the worker secret is not valid (unknown or not a worker secret)",
                        code="invalid_worker_secret")


def rejoining(conn, secret: str, name: str) -> tuple[dict, dict]:
    """A registration with a worker's own secret instead of an enrollment token.

    A lost worker (or a live one that restarted) rejoins with the secret it
    was given, so a partition longer than its enrollment token's validity
    does not end it; an enrollment an admin revoked stops it all the same.

    Returns:
        (the earlier registration, its enrollment).

    Raises:
        Unauthorized: the secret is unknown, retired or revoked (`refusal`),
            or its enrollment was revoked.
        Conflict: the secret belongs to a worker of another name (name_mismatch).
    """
    worker = any_worker_for_secret(conn, secret)
    why = rejoin_refusal(conn, worker)
    if why is not None:
        raise why
    if worker["name"] != name:
        raise Conflict(f"this secret belongs to the worker {worker['name']!r}", code="name_mismatch")
    enrollment = accounts.enrollment_by_id(conn, worker["enrollment_id"])
    if enrollment is None:
        raise Unauthorized("the enrollment this worker joined with was revoked",
                           code="invalid_enrollment_token")
    return worker, enrollment


def rejoin_refusal(conn, worker: dict | None) -> Unauthorized | None:
    """Why this registration's secret may not register again, or None.

    A live or lost registration may. A replaced one may only while none of its
    replacements was ever used (each still has last_seen_at == registered_at):
    then the successor's secret never reached the worker (an answer lost to a
    killed proxy or a cut link). Once a successor has made a call, the old
    secret is a retired one; and the latest registration must not have been
    ended by an admin.
    """
    live = (WorkerState.LOST.value, *LIVE_WORKER_STATES)
    if worker is not None and worker["state"] in live:
        return None
    if worker is None or worker["state"] != WorkerState.GONE.value or not worker["replaced_by"]:
        return refusal(worker)
    row = worker
    for _ in range(1000):   # a chain is as long as the lost answers of one worker
        following = row["replaced_by"] and get_worker(conn, row["replaced_by"])
        if not following:
            break
        if following["last_seen_at"] != following["registered_at"]:
            return refusal({**worker, "replaced_by": None})   # retired: its successor is in use
        row = following
    if row["state"] in live or row["replaced_by"]:
        return None
    return refusal(row)


def get_worker(conn, worker_id: str) -> dict | None:
    return conn.query_one("SELECT * FROM workers WHERE id = ?", (worker_id,))


def list_workers(conn, include_gone: bool = False) -> list[dict]:
    rows = conn.query(
        "SELECT w.*, (SELECT COUNT(*) FROM jobs j WHERE j.worker_id = w.id AND j.state = ?)"
        " AS running, (SELECT COUNT(*) FROM jobs j WHERE j.worker_id = w.id"
        " AND j.usage_clamped IS NOT NULL) AS usage_clamped FROM workers w ORDER BY w.name, w.id",
        (JobState.RUNNING.value,))
    return [r for r in rows if include_gone or r["state"] in LIVE_WORKER_STATES]


def worker_json(w: dict) -> dict:
    return {"id": w["id"], "name": w["name"], "state": w["state"], "cpus": w["cpus"],
            "memory_mb": w["memory_mb"], "gpus": w["gpus"], "slots": w["slots"],
            "disk_mb": w.get("disk_mb"),
            "images": json.loads(w["images"]), "running": w.get("running"),
            # Results of this worker whose usage the proxy had to clamp: a
            # buggy or rogue worker (leases.bound_usage).
            "usage_clamped": w.get("usage_clamped"),
            "registered_at": iso(w["registered_at"]), "last_seen_at": iso(w["last_seen_at"])}


def set_worker_state(conn, worker_id: str, state: WorkerState, *, lease_timeout_s: float,
                     max_attempts: int, now: float | None = None) -> dict:
    """Admin actions: drain, resume, revoke, or a worker deregistering itself.

    The worker is woken (a waiting claim answers with the change), and the
    queue is dispatched again: a drain or a retirement frees jobs, a resume
    adds capacity.

    Raises:
        NotFound: no live worker with that id.
    """
    now = time.time() if now is None else now
    with conn.transaction(lock=PG_DISPATCH_LOCK):
        worker = get_worker(conn, worker_id)
        # A lost worker can be retired or revoked too (its secret could rejoin);
        # only a live one can be drained or resumed.
        states = LIVE_WORKER_STATES if state in (WorkerState.ACTIVE, WorkerState.DRAINING) \
            else (*LIVE_WORKER_STATES, WorkerState.LOST.value)
        if worker is None or worker["state"] not in states:
            raise NotFound(f"no live worker {worker_id!r}", code="worker_not_found")
        if state in (WorkerState.ACTIVE, WorkerState.DRAINING):
            conn.execute("UPDATE workers SET state = ? WHERE id = ?", (state.value, worker_id))
            release_reservations(conn, worker_id)
        else:
            _retire(conn, worker_id, state, now, max_attempts)
        wakeups.notify(conn, wakeups.worker_topic(worker_id))
        scheduler.dispatch(conn, now, lease_timeout_s)
    return get_worker(conn, worker_id)


# ------------------------------------------------------------------- heartbeats

def heartbeat(conn, worker: dict, running_ids: list[str], *, lease_timeout_s: float,
              max_attempts: int, now: float | None = None) -> Orders:
    """Record that a worker is alive and extend the leases of the jobs it holds.

    Returns:
        The worker's orders, with `unknown`: the jobs it says it runs but
        does not hold.

    Raises:
        Unauthorized: the worker is no longer live (`refusal`).
    """
    now = time.time() if now is None else now
    with worker_call(conn, worker, now, lease_timeout_s, max_attempts):
        # Only the jobs the worker says it runs: one it holds without knowing
        # (the answer to a claim was lost on the way) then expires and is
        # requeued, instead of being kept alive for ever by heartbeats.
        leases.extend(conn, worker["id"], running_ids, now + lease_timeout_s)
        held = leases.held_by(conn, worker["id"])
        draining = is_draining(conn, worker["id"])
    return Orders(cancel=sorted(r["id"] for r in held if r["cancel_requested"]),
                  drain=draining,
                  unknown=sorted(set(running_ids) - {r["id"] for r in held}))


def orders(conn, worker_id: str) -> Orders:
    """The worker's orders now, for a claim answer (no `unknown`: a claim does
    not say what the worker runs)."""
    return Orders(cancel=leases.cancel_requested(conn, worker_id), drain=is_draining(conn, worker_id))


def is_draining(conn, worker_id: str) -> bool:
    row = get_worker(conn, worker_id)
    return row is not None and row["state"] == WorkerState.DRAINING.value


@contextlib.contextmanager
def worker_call(conn, worker: dict, now: float, lease_timeout_s: float, max_attempts: int):
    """The transaction of a heartbeat or a claim: lost workers reaped, this one marked seen.

    Not durable: a claim or heartbeat lost in a power cut costs a rerun of the
    job (its lease is gone, so the late result is refused), never the job.

    Raises:
        Unauthorized: this worker is no longer live (`refusal`).
    """
    with conn.transaction(lock=PG_DISPATCH_LOCK, durable=False):
        reap(conn, lease_timeout_s=lease_timeout_s, max_attempts=max_attempts, now=now)
        if _touch(conn, worker["id"], now):
            yield
            return
    # Committed first: when this very call found the worker silent past its
    # lease (its first call after a partition), the reap stands, and the
    # answer says "lost", which the worker recovers from by rejoining.
    raise refusal(get_worker(conn, worker["id"]))


def _touch(conn, worker_id: str, now: float) -> bool:
    return bool(conn.execute("UPDATE workers SET last_seen_at = ? WHERE id = ? AND state IN (?, ?)",
                             (now, worker_id, *LIVE_WORKER_STATES)))


def is_active(conn, worker_id: str) -> bool:
    """Whether the worker may still get jobs (a waiting claim's look after a wake-up)."""
    row = conn.query_one("SELECT state FROM workers WHERE id = ?", (worker_id,))
    return row is not None and row["state"] == WorkerState.ACTIVE.value


# ------------------------------------------------------------------------ claims

def claim(conn, worker: dict, max_jobs: int, *, lease_timeout_s: float, max_attempts: int,
          now: float | None = None) -> list[dict]:
    """Give `worker` up to `max_jobs` jobs, in round-robin turn with the other live workers.

    Returns:
        The jobs now running under the worker's lease (possibly none).

    Raises:
        Unauthorized: the worker is no longer live (`refusal`).
    """
    now = time.time() if now is None else now
    with worker_call(conn, worker, now, lease_timeout_s, max_attempts):
        scheduler.dispatch(conn, now, lease_timeout_s)
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
        wakeups.notify_jobs(conn, taken)
        return [conn.query_one("SELECT * FROM jobs WHERE id = ?", (i,)) for i in taken]


# ------------------------------------------------------------------ lost workers

def reap(conn, *, lease_timeout_s: float, max_attempts: int, now: float | None = None) -> int:
    """Mark silent workers lost and requeue the jobs whose lease ran out.

    Called at the start of every claim and heartbeat (and by `jobcloud-proxy
    reap`), inside their transaction, so no background thread is needed.

    Returns:
        The number of jobs requeued or failed.
    """
    now = time.time() if now is None else now
    lost = conn.query("SELECT id FROM workers WHERE state IN (?, ?) AND last_seen_at < ?",
                      (*LIVE_WORKER_STATES, now - lease_timeout_s))
    for w in lost:
        conn.execute("UPDATE workers SET state = ?, retired_at = ? WHERE id = ? AND state IN (?, ?)",
                     (WorkerState.LOST.value, now, w["id"], *LIVE_WORKER_STATES))
        release_reservations(conn, w["id"])
    requeued = leases.requeue_expired(conn, now, max_attempts)
    if lost or requeued:
        # Jobs went back to the queue: hand them to waiting workers now, not
        # at the next claim.
        wakeups.notify(conn, *(wakeups.worker_topic(w["id"]) for w in lost))
        scheduler.dispatch(conn, now, lease_timeout_s)
    return requeued


def reap_now(conn, *, lease_timeout_s: float, max_attempts: int) -> int:
    """`reap` in a transaction of its own (a result whose lease ran out)."""
    with conn.transaction(lock=PG_DISPATCH_LOCK):
        return reap(conn, lease_timeout_s=lease_timeout_s, max_attempts=max_attempts)


def _retire(conn, worker_id: str, state: WorkerState, now: float, max_attempts: int) -> None:
    conn.execute("UPDATE workers SET state = ?, retired_at = ? WHERE id = ?",
                 (state.value, now, worker_id))
    release_reservations(conn, worker_id)
    leases.requeue_held(conn, worker_id, now, max_attempts)


def release_reservations(conn, worker_id: str) -> None:
    """Put the queued jobs reserved for `worker_id` (not yet claimed) back in the queue."""
    conn.execute("UPDATE jobs SET worker_id = NULL, reserved_at = NULL WHERE worker_id = ? AND state = ?",
                 (worker_id, JobState.QUEUED.value))
