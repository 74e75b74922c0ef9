"""Job dependencies: a job submitted with `after` starts only once every parent
succeeded, reads their outputs, and is cancelled when one of them fails.

submission: `resolve` checks the `after` field (ids of the submitter's own
jobs) before anything is stored, and `check_edges` the edges it would make
(every job of an array waits on every parent: jobs x parents rows); the job's
own transaction first `lock_parents` (a parent that failed since `resolve`
refuses the submission), then `attach` records the edges and sets
`deps_pending`, the number of parents not yet succeeded.
dispatch: scheduler.py hands out only queued jobs with `deps_pending = 0`, a
column on the queue index, so a claim never joins the edges.
a parent ends (store.finish_job calls `job_finished`, once per job):
  succeeded -> each child's `deps_pending` goes down by one; a child that
               reaches 0 is dispatched at the next claim, and the live workers
               are woken for it;
  failed, timed out, cancelled -> its queued dependents end `cancelled`, and
               theirs, transitively, each through store.finish_job (webhook,
               live update), with the reason ("parent j... failed").
the child runs: its claim lists each parent with a worker URL of the parent's
  output archive (`claimed_parents`), which only the worker holding the
  child's lease may fetch (`parent_outputs`); the worker unpacks each, read-only,
  at /job/input/after/<name>/. Retention keeps the outputs of a job that a
  queued or running child still needs (`NEEDED_BY_CHILD_SQL`).

Edges are made only with a new job, whose parents exist before it, so the
graph has no cycles; `attach` still refuses a job named as its own parent.
"""
from __future__ import annotations

import re

from . import store, wakeups
from .errors import Gone, NotFound, ValidationError
from .models import FINAL_VALUES, JobState, WorkerState, is_lookup_key

# Ids one `after` may name: a pipeline step has a handful; the bound keeps one
# submission's checks small. An array id stands for all its jobs, so the jobs
# in all are bounded apart (the max_parent_jobs setting: the claim answer
# lists each with its URL), and so are the edges (max_dependency_edges).
MAX_PARENTS = 32
# The form field's length: MAX_PARENTS ids with their separators, and room.
AFTER_MAX_CHARS = MAX_PARENTS * 80
# Parents and children listed in a job's JSON and page (the counts are given in full).
MAX_SHOWN = 100
# A parent's directory name under /job/input/after: a plain path component.
DIR_NAME_MAX = 64
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_SEPARATORS = re.compile(r"[\s,]+")
# How a failed parent is said in its dependents' failure_reason.
_ENDED = {JobState.FAILED: "failed", JobState.TIMED_OUT: "timed out",
          JobState.CANCELLED: "was cancelled"}

# A WHERE condition on jobs `j`: a queued or running child still needs j's
# outputs (retention.expire_due keeps them).
NEEDED_BY_CHILD_SQL = (
    "EXISTS (SELECT 1 FROM job_deps d JOIN jobs c ON c.id = d.child_id"
    f" WHERE d.parent_id = j.id AND c.state IN ('{JobState.QUEUED.value}',"
    f" '{JobState.RUNNING.value}'))")


# ------------------------------------------------------------------ submission

def resolve(conn, owner_id: str, raw: str | None, *, max_parent_jobs: int) -> list[str]:
    """The parent job ids the `after` field names, checked before anything is stored.

    Args:
        raw: job or array ids separated by commas or spaces; empty or None
            for none. An array id means every job of the array.
        max_parent_jobs: the most parent jobs in all, arrays counted by their jobs.

    Returns:
        The distinct parent ids, in the order given.

    Raises:
        ValidationError: too many ids or parent jobs; an id that is not one of the owner's
            jobs or arrays (an unknown and another user's read the same); a parent
            that already failed (the job could never start) or whose outputs
            expired (it would run without them).
    """
    refs = list(dict.fromkeys(r for r in _SEPARATORS.split(raw or "") if r))
    if len(refs) > MAX_PARENTS:
        raise ValidationError(f"after names {len(refs)} jobs; at most {MAX_PARENTS}",
                              code="too_many_parents")
    parents: list[str] = []
    for ref in refs:
        jobs = _named_jobs(conn, owner_id, ref)
        if not jobs:
            raise ValidationError(f"after: no job or array of yours has the id {ref[:80]!r}",
                                  code="unknown_parent")
        for job in jobs:
            if job["state"] in FINAL_VALUES and job["state"] != JobState.SUCCEEDED.value:
                raise ValidationError(f"after: job {job['id']} already {job['state']}: this job "
                                      "could never start", code="parent_failed")
            if job["expired_at"] is not None:
                raise ValidationError(f"after: the outputs of job {job['id']} expired "
                                      "(retention): this job would run without them",
                                      code="parent_expired")
        parents += [j["id"] for j in jobs]
    parents = list(dict.fromkeys(parents))
    if len(parents) > max_parent_jobs:
        raise ValidationError(f"after names {len(parents)} jobs in all (an array counts each of"
                              f" its jobs); at most max_parent_jobs = {max_parent_jobs}",
                              code="too_many_parents")
    return parents


def check_edges(n_parents: int, n_jobs: int, *, max_edges: int) -> None:
    """Refuse a submission of `n_jobs` jobs (an array's size, or 1) after
    `n_parents` parent jobs whose edges, one per job and parent, pass `max_edges`.

    Raises:
        ValidationError: too_many_dependencies, naming the numbers.
    """
    if n_parents * n_jobs > max_edges:
        raise ValidationError(
            f"{n_jobs} jobs each after {n_parents} parent jobs make {n_parents * n_jobs}"
            f" dependencies; at most max_dependency_edges = {max_edges} (submit fewer jobs,"
            " or run them after one job that waits on the parents)",
            code="too_many_dependencies")


def _named_jobs(conn, owner_id: str, ref: str) -> list[dict]:
    """The owner's job with id `ref`, or all the jobs of their array `ref`
    (arrays.py); [] for anything else, another user's included."""
    if not is_lookup_key(ref):
        return []
    job = conn.query_one("SELECT id, owner_id, state, expired_at FROM jobs WHERE id = ?", (ref,))
    if job is not None:
        return [job] if job["owner_id"] == owner_id else []
    array = conn.query_one("SELECT owner_id FROM job_arrays WHERE id = ?", (ref,))
    if array is None or array["owner_id"] != owner_id:
        return []
    return conn.query("SELECT id, owner_id, state, expired_at FROM jobs WHERE array_id = ?"
                      " ORDER BY array_index", (ref,))


def lock_parents(conn, parents: list[str]) -> list[dict]:
    """The parents' ids and states, read first in the submission's transaction
    (before its files are put in place) and held until it commits.

    FOR SHARE on PostgreSQL: a parent ending at the same moment either
    commits first (and is read as ended here) or waits for this commit (and
    then finds the new jobs among its children). SQLite's write transactions
    are serial already.

    Raises:
        ValidationError: parent_failed, a parent ended unsuccessfully since
            `resolve` checked it; the submission is refused whole, as
            `resolve` would have refused it a moment later (an array's
            copies are never made of a cancelled job).
    """
    if not parents:
        return []
    share = " FOR SHARE" if conn.dialect == "postgresql" else ""
    rows = []
    for start in range(0, len(parents), 500):
        chunk = parents[start:start + 500]
        marks = ", ".join("?" for _ in chunk)
        rows += conn.query(f"SELECT id, state FROM jobs WHERE id IN ({marks}) ORDER BY id{share}",
                           tuple(chunk))
    for row in rows:
        if row["state"] in FINAL_VALUES and row["state"] != JobState.SUCCEEDED.value:
            raise ValidationError(f"after: job {row['id']} {_ENDED.get(JobState(row['state']))}"
                                  " while this job was submitted: it could never start",
                                  code="parent_failed")
    return rows


def attach(conn, child_id: str, parents: list[str]) -> None:
    """Record that `child_id` (a job just created, still queued) runs after `parents`.

    Runs in the transaction that created the child, before dispatch sees it,
    after `lock_parents` (which it calls again, a no-op for rows this
    transaction already holds).

    Raises:
        ValidationError: the child is named among its own parents; a parent failed.
    """
    if not parents:
        return
    if child_id in parents:
        raise ValidationError(f"job {child_id} cannot run after itself", code="dependency_cycle")
    rows = lock_parents(conn, parents)
    for parent in parents:
        conn.execute("INSERT INTO job_deps (child_id, parent_id) VALUES (?, ?)", (child_id, parent))
    pending = [r for r in rows if r["state"] != JobState.SUCCEEDED.value]
    conn.execute("UPDATE jobs SET deps_pending = ? WHERE id = ?", (len(pending), child_id))


# ------------------------------------------------------------- a parent ends

def job_finished(conn, job_id: str, final: JobState, now: float) -> None:
    """A job became final (store.finish_job, in its transaction): release or
    cancel its dependents."""
    if final == JobState.SUCCEEDED:
        _release_children(conn, job_id)
    else:
        _cancel_dependents(conn, job_id, final, now)


def _release_children(conn, parent_id: str) -> None:
    """One parent fewer for each queued child; wake the workers when one may start."""
    children = [r["child_id"] for r in conn.query(
        "SELECT child_id FROM job_deps WHERE parent_id = ?", (parent_id,))]
    if not children:
        return
    ready = []
    for chunk in (children[i:i + 500] for i in range(0, len(children), 500)):
        marks = ", ".join("?" for _ in chunk)
        conn.execute(f"UPDATE jobs SET deps_pending = deps_pending - 1 WHERE id IN ({marks})"
                     " AND state = ? AND deps_pending > 0", (*chunk, JobState.QUEUED.value))
        ready += [r["id"] for r in conn.query(
            f"SELECT id FROM jobs WHERE id IN ({marks}) AND state = ? AND deps_pending = 0",
            (*chunk, JobState.QUEUED.value))]
        wakeups.notify_jobs(conn, chunk)   # their pages say the wait moved on
    if ready:
        # A worker long-polling its claim hears of reserved jobs only; the
        # next claim of any of them dispatches the ready children.
        workers = conn.query("SELECT id FROM workers WHERE state = ?", (WorkerState.ACTIVE.value,))
        wakeups.notify(conn, *(wakeups.worker_topic(w["id"]) for w in workers))


def _cancel_dependents(conn, parent_id: str, final: JobState, now: float) -> None:
    """End every queued dependent of `parent_id`, transitively, as cancelled.

    A loop rather than a recursion through finish_job: a pipeline may be
    longer than Python's stack is deep.
    """
    cause = f"parent {parent_id} {_ENDED.get(final, final.value)}"
    todo: list[tuple[str, str]] = [(parent_id, cause)]
    while todo:
        parent, reason = todo.pop()
        children = [r["child_id"] for r in conn.query(
            "SELECT child_id FROM job_deps WHERE parent_id = ? ORDER BY child_id", (parent,))]
        for child in children:
            if store.finish_job(conn, child, JobState.CANCELLED, now, expect=JobState.QUEUED,
                                dependents=False, failure_reason=reason, worker_id=None,
                                reserved_at=None):
                todo.append((child, f"parent {child} was cancelled: {cause}"))


# ----------------------------------------------------------------- the worker

def claimed_parents(conn, job: dict, presign=None) -> list[dict]:
    """The claim answer's `after`: each parent of a claimed job, the directory
    its outputs go to, and the worker URL of its output archive (None: it
    left no outputs); with `presign` (the S3 store's presign_get), also the
    archive's presigned `direct_url`."""
    parents = conn.query(
        "SELECT j.id, j.name, j.output_blob, j.output_sha256, j.output_size FROM job_deps d"
        " JOIN jobs j ON j.id = d.parent_id WHERE d.child_id = ? ORDER BY j.id", (job["id"],))
    names = dir_names(parents)
    base = f"/api/v1/worker/jobs/{job['id']}/after"
    def outputs(p: dict) -> dict | None:
        if not p["output_blob"]:
            return None
        entry = {"sha256": p["output_sha256"], "size": p["output_size"],
                 "url": f"{base}/{p['id']}/outputs"}
        if presign is not None:
            entry["direct_url"] = presign(p["output_blob"])
        return entry

    return [{"id": p["id"], "name": names[p["id"]], "outputs": outputs(p)} for p in parents]


def dir_names(parents: list[dict]) -> dict[str, str]:
    """Parent id -> its directory under /job/input/after: its job name made a
    safe path component when that is unique among the parents, else its id."""
    safe = {p["id"]: _UNSAFE.sub("_", p["name"] or "").strip("._-")[:DIR_NAME_MAX]
            for p in parents}
    taken = [n.lower() for n in safe.values()]
    ids = {p["id"].lower() for p in parents}
    return {pid: name if name and taken.count(name.lower()) == 1 and
            (name.lower() not in ids or name == pid) else pid
            for pid, name in safe.items()}


def parent_outputs(conn, child: dict, parent_id: str) -> dict:
    """The parent whose outputs the worker holding `child` may download.

    Raises:
        NotFound: `parent_id` is not a parent of `child`, or it left no outputs.
        Gone: its outputs expired (retention); the child fails with this.
    """
    parent = conn.query_one(
        "SELECT j.id, j.output_blob, j.expired_at FROM job_deps d JOIN jobs j ON j.id = d.parent_id"
        " WHERE d.child_id = ? AND d.parent_id = ?",
        (child["id"], parent_id)) if is_lookup_key(parent_id) else None
    if parent is None:
        raise NotFound(f"job {parent_id[:80]!r} is not a parent of this job", code="no_parent")
    if parent["expired_at"] is not None:
        raise Gone(f"the outputs of parent job {parent_id} expired (retention) before this "
                   "job could read them", code="parent_expired")
    if not parent["output_blob"]:
        raise NotFound(f"parent job {parent_id} left no outputs", code="no_outputs")
    return parent


# ------------------------------------------------------------- what users see

def relations(conn, job: dict) -> dict:
    """A job's `parents` and `children` with their states, for its JSON and
    page: the first MAX_SHOWN of each (an array stands for many), and how
    many there are in all."""
    parents = conn.query(
        "SELECT j.id, j.name, j.state FROM job_deps d JOIN jobs j ON j.id = d.parent_id"
        " WHERE d.child_id = ? ORDER BY j.id", (job["id"],))
    children = conn.query(
        "SELECT j.id, j.name, j.state FROM job_deps d JOIN jobs j ON j.id = d.child_id"
        " WHERE d.parent_id = ? ORDER BY j.id LIMIT ?", (job["id"], MAX_SHOWN + 1))
    n_children = len(children)
    if n_children > MAX_SHOWN:
        n_children = conn.query_one("SELECT COUNT(*) AS n FROM job_deps WHERE parent_id = ?",
                                    (job["id"],))["n"]
    # Named among all the parents, as the claim names them.
    names = dir_names(parents)
    return {"parents": [_related(p, input_dir=f"/job/input/after/{names[p['id']]}/")
                        for p in parents[:MAX_SHOWN]],
            "parents_total": len(parents),
            "children": [_related(c) for c in children[:MAX_SHOWN]],
            "children_total": n_children}


def _related(job: dict, **extra) -> dict:
    return {"id": job["id"], "name": job["name"], "state": job["state"], **extra,
            "links": {"self": f"/api/v1/jobs/{job['id']}", "page": f"/jobs/{job['id']}"}}


def waiting_on(conn, job: dict) -> list[dict]:
    """The parents of a queued job that have not succeeded yet: id, name, state."""
    return conn.query(
        "SELECT j.id, j.name, j.state FROM job_deps d JOIN jobs j ON j.id = d.parent_id"
        " WHERE d.child_id = ? AND j.state <> ? ORDER BY j.id",
        (job["id"], JobState.SUCCEEDED.value))
