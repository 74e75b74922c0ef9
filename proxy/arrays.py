"""Job arrays: one submission, N ordinary jobs.

A submission with `array` ("0-99", "5", optionally "%8": at most 8 running at
once) or a parameters file `params` (CSV with a header, or JSON lines; one
job per row) makes an array row and N job rows that share the one stored
script and dataset blob (blobs are content-addressed: stored once, counted
once in storage, deleted only when no job needs them, retention.py). The rows
are inserted in batches inside the submission's transaction, so an array is
all there or not at all.

Each job is an ordinary job: fair share, per-user max_running and usage count
it like any other. What an array adds:
- its index (and its parameters row) in the claim answer, which the worker
  turns into JOBCLOUD_ARRAY_INDEX, JOBCLOUD_ARRAY_ID, JOBCLOUD_PARAMS and
  /job/input/params.json;
- the cap (`%N`), held by the dispatcher (`Caps`, used by scheduler.dispatch)
  across all workers: a job of an array with N reserved or running is not
  handed out;
- the array's JSON and page (counts per state, jobs by index), cancel all,
  and every job's outputs as one zip streamed by index.
"""
from __future__ import annotations

import csv
import io
import json
import re
import time
import zipfile
from dataclasses import dataclass

from flask import Response

from . import store, wakeups
from .errors import BlobStoreUnavailable, NotFound, TooManyRequests, ValidationError
from .models import JobState, is_lookup_key, iso, new_id

# "A-B" or "N", then optionally "%K". Indices are bounded so a range is never
# a number the database cannot hold.
RANGE = re.compile(r"^(?:(\d{1,9})(?:-(\d{1,9}))?)?(?:%(\d{1,9}))?$")
# Job rows per INSERT: 4 parameters each stays far below SQLite's 32766
# bound on parameters, and few round trips make 10,000 rows quick.
INSERT_BATCH = 1000
# Largest parameters row, as JSON: it travels in every claim answer and env.
MAX_ROW_BYTES = 64 * 1024
# Jobs cancelled per transaction by cancel all: each is short, so a big
# array's cancel never holds the write lock long.
CANCEL_BATCH = 500
# Jobs the array's page lists (and keeps current); its JSON pages through all.
PAGE_JOBS = 1000


@dataclass(frozen=True)
class Plan:
    """What a submission asks for, checked before anything is stored.

    indices: the jobs' array indices; rows: each one's parameters (None for a range).
    """
    spec: str
    indices: range
    max_running: int | None
    rows: list[dict] | None = None
    params_name: str | None = None

    @property
    def size(self) -> int:
        return len(self.indices)


def plan(fields: dict, params_upload, params_name: str | None, *, max_size: int) -> Plan | None:
    """The array a submission's `array` field and `params` file ask for; None for a single job.

    Raises:
        ValidationError: a malformed range, %0, too many jobs, an empty or
            malformed parameters file (naming the line), or a range and a
            parameters file together.
    """
    spec = (fields.get("array") or "").strip()
    if not spec and params_upload is None:
        return None
    first = last = cap = None
    if spec:
        m = RANGE.match(spec)
        if m is None:
            raise ValidationError(
                f"array must be a range A-B or an index N, optionally with %K (at most K running"
                f" at once), e.g. 0-99%8 (got {spec[:40]!r})", code="invalid_array")
        first, last, cap = (int(g) if g is not None else None for g in m.groups())
        if cap is not None and cap < 1:
            raise ValidationError("array: %K must be at least 1 (%0 would run nothing)",
                                  code="invalid_array")
        if first is not None and last is not None and last < first:
            raise ValidationError(f"array: the range {first}-{last} is empty (end before start)",
                                  code="invalid_array")
    if params_upload is not None:
        if first is not None:
            raise ValidationError(
                "give an array range or a parameters file, not both (the file's rows are the"
                " range; add %K alone in array to cap how many run at once)",
                code="array_and_params")
        name = _file_name(params_name)
        rows = parse_params(params_upload.path, name, max_size)
        return Plan(spec=name, indices=range(len(rows)), max_running=cap, rows=rows,
                    params_name=name)
    if first is None:
        raise ValidationError("array: %K alone needs a parameters file; give a range, e.g. 0-9%2",
                              code="invalid_array")
    last = first if last is None else last
    size = last - first + 1
    if size > max_size:
        raise ValidationError(f"array: {size} jobs is more than max_array_size = {max_size}",
                              code="array_too_large")
    return Plan(spec=spec, indices=range(first, last + 1), max_running=cap)


def _file_name(raw: str | None) -> str:
    """The parameters file's name as shown (its last path component, printable, bounded)."""
    name = (raw or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(c for c in name if c.isprintable())[:100].strip()
    return name or "params"


def parse_params(path, name: str, max_rows: int) -> list[dict]:
    """The rows of a parameters file: JSON lines (one object a line) or CSV with a header.

    JSON lines when the name ends in .jsonl/.ndjson/.json, or, for another
    name, when the first non-blank character is "{"; CSV otherwise.

    Raises:
        ValidationError: not UTF-8, no rows, a malformed line (named), a row
            larger than MAX_ROW_BYTES, more rows than `max_rows`.
    """
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            text = f.read()
    except UnicodeDecodeError:
        raise ValidationError("the parameters file is not UTF-8 text", code="invalid_params") from None
    lower = name.lower()
    jsonl = lower.endswith((".jsonl", ".ndjson", ".json")) or (
        not lower.endswith(".csv") and text.lstrip().startswith("{"))
    rows = _jsonl_rows(text, max_rows) if jsonl else _csv_rows(text, max_rows)
    if not rows:
        raise ValidationError("the parameters file has no rows (one job per row: JSON lines,"
                              " or CSV with a header line)", code="invalid_params")
    return rows


def _jsonl_rows(text: str, max_rows: int) -> list[dict]:
    rows = []
    # "\n" only: str.splitlines would also split at U+2028, which a JSON string may hold.
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line, parse_constant=_not_json)
        except (ValueError, RecursionError) as e:   # RecursionError: nested past Python's stack
            raise ValidationError(f"parameters file, line {number}: not JSON"
                                  f" ({getattr(e, 'msg', e)})",
                                  code="invalid_params") from None
        if not isinstance(row, dict):
            raise ValidationError(f"parameters file, line {number}: each line must be a JSON"
                                  f" object, got {type(row).__name__}", code="invalid_params")
        _add_row(rows, row, number, max_rows)
    return rows


def _not_json(constant: str):
    # NaN and Infinity: Python reads them, JSON (and every browser) does not.
    raise ValueError(f"{constant} is not a JSON value")


def _csv_rows(text: str, max_rows: int) -> list[dict]:
    reader = csv.reader(io.StringIO(text, newline=""))
    rows: list[dict] = []
    header = None
    try:
        for record in reader:
            number = reader.line_num
            if not any(cell.strip() for cell in record):
                continue
            if header is None:
                header = [cell.strip() for cell in record]
                if any(not h for h in header) or len(set(header)) != len(header):
                    raise ValidationError(f"parameters file, line {number}: the CSV header needs"
                                          " distinct, non-empty column names",
                                          code="invalid_params")
                continue
            if len(record) != len(header):
                raise ValidationError(f"parameters file, line {number}: {len(record)} fields,"
                                      f" the header has {len(header)}", code="invalid_params")
            _add_row(rows, dict(zip(header, record)), number, max_rows)
    except csv.Error as e:
        raise ValidationError(f"parameters file, line {reader.line_num}: not CSV ({e})",
                              code="invalid_params") from None
    return rows


def _add_row(rows: list, row: dict, number: int, max_rows: int) -> None:
    if len(rows) >= max_rows:
        raise ValidationError(f"parameters file: more than max_array_size = {max_rows} rows",
                              code="array_too_large")
    if len(json.dumps(row)) > MAX_ROW_BYTES:
        raise ValidationError(f"parameters file, line {number}: the row is larger than"
                              f" {MAX_ROW_BYTES // 1024} KiB as JSON", code="invalid_params")
    rows.append(row)


def check_queued(conn, user_id: str, user_limits: dict, size: int) -> None:
    """Refuse an array that would put the user past max_queued (429), counting all its jobs."""
    cap = user_limits.get("max_queued")
    if cap is None:
        return
    queued = conn.query_one("SELECT COUNT(*) AS n FROM jobs WHERE owner_id = ? AND state = ?",
                            (user_id, JobState.QUEUED.value))["n"]
    if queued + size > cap:
        raise TooManyRequests(f"an array of {size} jobs with {queued} queued already is past your"
                              f" limit max_queued = {cap}")


# ------------------------------------------------------------------ creating

def expand(conn, array_plan: Plan, first: dict, now: float | None = None) -> dict:
    """Make the just-created job `first` the array's first job, and add the rest.

    Runs in the submission's transaction, after every hook that made `first`
    (store.create_job and the columns other features set on it): the other
    jobs are copies of its row, column for column, with their own id, name,
    index and parameters, so a field some feature adds to a job is an array
    job's too without a line here. The copies' rows go in INSERT_BATCH at a
    time. `first`'s parents (dependencies.py) are every copy's parents.

    Returns:
        The first job's row, now carrying its array and index.
    """
    now = time.time() if now is None else now
    array_id = new_id("a")
    conn.execute(
        "INSERT INTO job_arrays (id, owner_id, name, spec, size, max_running, params_name,"
        " submitted_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (array_id, first["owner_id"], first["name"], array_plan.spec, array_plan.size,
         array_plan.max_running, array_plan.params_name, now))
    rows = array_plan.rows
    values = [(f"{first['name']}[{index}]", index,
               json.dumps(rows[n]) if rows is not None else None)
              for n, index in enumerate(array_plan.indices)]
    conn.execute("UPDATE jobs SET array_id = ?, array_max_running = ?, name = ?, array_index = ?,"
                 " array_params = ? WHERE id = ?",
                 (array_id, array_plan.max_running, *values[0], first["id"]))
    # Ids are made in index order, so the array's jobs queue in index order.
    copies = [(new_id("j"), *v) for v in values[1:]]
    own = {"id": "v.new_id", "name": "v.new_name", "array_index": "v.new_index",
           "array_params": "v.new_params"}
    columns = list(conn.query_one("SELECT * FROM jobs WHERE id = ?", (first["id"],)))
    picks = ", ".join(own.get(c, f"t.{c}") for c in columns)
    for start in range(0, len(copies), INSERT_BATCH):
        batch = copies[start:start + INSERT_BATCH]
        conn.execute(
            f"WITH v (new_id, new_name, new_index, new_params) AS (VALUES"
            f" {', '.join('(?, ?, ?, ?)' for _ in batch)})"
            f" INSERT INTO jobs ({', '.join(columns)}) SELECT {picks} FROM jobs t, v"
            f" WHERE t.id = ?", (*(x for row in batch for x in row), first["id"]))
        conn.execute(
            "INSERT INTO job_deps (child_id, parent_id) SELECT v.id, d.parent_id FROM job_deps d,"
            f" (SELECT id FROM jobs WHERE id IN ({', '.join('?' for _ in batch)})) v"
            " WHERE d.child_id = ?", (*(row[0] for row in batch), first["id"]))
    # The owner's live pages hear of the new jobs; nobody follows them yet.
    wakeups.notify(conn, wakeups.user_topic(first["owner_id"]))
    return conn.query_one("SELECT * FROM jobs WHERE id = ?", (first["id"],))


# ------------------------------------------------------------------ reading

def get_visible_array(conn, array_id: str, viewer: dict) -> dict:
    """The array if `viewer` owns it or is an admin.

    Raises:
        NotFound: no such array, or not the viewer's (indistinguishable on purpose).
    """
    row = conn.query_one("SELECT a.*, u.name AS owner FROM job_arrays a JOIN users u"
                         " ON u.id = a.owner_id WHERE a.id = ?",
                         (array_id,)) if is_lookup_key(array_id) else None
    if row is None or (row["owner_id"] != viewer["id"] and not viewer["is_admin"]):
        raise NotFound(f"no array {array_id!r}", code="array_not_found")
    return row


def counts(conn, array_id: str) -> dict[str, int]:
    """How many of the array's jobs are in each state (every state present)."""
    found = {r["state"]: r["n"] for r in conn.query(
        "SELECT state, COUNT(*) AS n FROM jobs WHERE array_id = ? GROUP BY state", (array_id,))}
    return {s.value: int(found.get(s.value, 0)) for s in JobState}


def jobs_page(conn, array_id: str, after: int | None, limit: int) -> tuple[list[dict], int | None]:
    """The array's jobs by index from after `after`: (jobs, the last index if more follow)."""
    if limit <= 0:
        return [], None
    rows = conn.query(
        "SELECT id, array_index, state, exit_code, started_at, finished_at, output_blob,"
        " expired_at FROM jobs WHERE array_id = ? AND array_index > ? ORDER BY array_index LIMIT ?",
        (array_id, -1 if after is None else after, limit + 1))
    more = len(rows) > limit
    rows = rows[:limit]
    return rows, (rows[-1]["array_index"] if more else None)


def array_json(conn, array: dict, *, after: int | None = None, limit: int = 1000) -> dict:
    """The public JSON of an array: counts per state and a page of its jobs by index."""
    jobs, last = jobs_page(conn, array["id"], after, limit)
    n = counts(conn, array["id"])
    base = f"/api/v1/arrays/{array['id']}"
    return {
        "id": array["id"], "owner": array.get("owner"), "name": array["name"],
        "spec": array["spec"], "size": array["size"], "max_running": array["max_running"],
        "params": array["params_name"], "submitted_at": iso(array["submitted_at"]),
        "counts": n,
        "done": n[JobState.QUEUED.value] == 0 and n[JobState.RUNNING.value] == 0,
        "jobs": [{"index": j["array_index"], "id": j["id"], "state": j["state"],
                  "exit_code": j["exit_code"], "started_at": iso(j["started_at"]),
                  "finished_at": iso(j["finished_at"]),
                  "has_outputs": bool(j["output_blob"]) and j["expired_at"] is None}
                 for j in jobs],
        "next": f"{base}?after={last}&limit={limit}" if last is not None else None,
        "links": {"self": base, "cancel": f"{base}/cancel", "outputs": f"{base}/outputs",
                  "page": f"/arrays/{array['id']}"},
    }


def job_array_json(job: dict) -> dict | None:
    """The `array` member of a job's JSON: which array it belongs to, at which index."""
    if not job.get("array_id"):
        return None
    return {"id": job["array_id"], "index": job["array_index"],
            "params": json.loads(job["array_params"]) if job.get("array_params") else None,
            "links": {"self": f"/api/v1/arrays/{job['array_id']}",
                      "page": f"/arrays/{job['array_id']}"}}


def claim_json(job: dict) -> dict | None:
    """What a worker needs of a claimed job's array: its id, index and parameters row."""
    if not job.get("array_id"):
        return None
    return {"id": job["array_id"], "index": job["array_index"],
            "params": json.loads(job["array_params"]) if job.get("array_params") else None}


# ------------------------------------------------------------------ cancel all

def cancel(conn, array: dict, now: float | None = None) -> dict[str, int]:
    """Cancel every job of the array that has not ended: the queued at once,
    the running through their workers (as store.cancel_job does for one).

    The two steps run in separate short transactions, so a running job may
    fail and be retried (retries.retry: back to the queue) after the queued
    step read the queue: the steps repeat until one statement sees no job
    of the array queued and none running unmarked. From then on none can
    come back to the queue (a job asked to stop is never retried, nor
    requeued when its worker is lost: leases.requeue), so no job of the
    array runs again. Each repeat needs a try to end in between; a job's
    retries are bounded, so the loop ends.

    Returns:
        {"cancelled": queued jobs cancelled, "stopping": running jobs told to stop}
    """
    now = time.time() if now is None else now
    cancelled = stopping = 0
    while True:
        cancelled += _cancel_queued(conn, array["id"], now)
        stopping += _stop_running(conn, array["id"])
        if conn.query_one(
                "SELECT 1 AS x FROM jobs WHERE array_id = ? AND (state = ? OR (state = ?"
                " AND cancel_requested = 0)) LIMIT 1",
                (array["id"], JobState.QUEUED.value, JobState.RUNNING.value)) is None:
            return {"cancelled": cancelled, "stopping": stopping}


def _cancel_queued(conn, array_id: str, now: float) -> int:
    """End the array's queued jobs as cancelled, CANCEL_BATCH per transaction."""
    cancelled = 0
    while True:
        with conn.transaction():
            ids = [r["id"] for r in conn.query(
                "SELECT id FROM jobs WHERE array_id = ? AND state = ? ORDER BY array_index LIMIT ?",
                (array_id, JobState.QUEUED.value, CANCEL_BATCH))]
            for job_id in ids:
                cancelled += store.finish_job(conn, job_id, JobState.CANCELLED, now,
                                              expect=JobState.QUEUED,
                                              failure_reason="cancelled by user (array cancelled)",
                                              worker_id=None, reserved_at=None)
        if len(ids) < CANCEL_BATCH:
            return cancelled


def _stop_running(conn, array_id: str) -> int:
    """Ask the workers of the array's running jobs to stop them."""
    with conn.transaction():
        running = [r["id"] for r in conn.query(
            "SELECT id FROM jobs WHERE array_id = ? AND state = ? AND cancel_requested = 0",
            (array_id, JobState.RUNNING.value))]
        if running:
            marks = ", ".join("?" for _ in running)
            conn.execute(f"UPDATE jobs SET cancel_requested = 1 WHERE id IN ({marks})"
                         " AND state = ?", (*running, JobState.RUNNING.value))
            # Their workers hear at once, on a waiting claim's answer.
            wakeups.notify_jobs(conn, running, holder=True)
    return len(running)


# ------------------------------------------------------------------ the cap

class Caps:
    """The `%N` caps during one dispatch pass: which arrays already have N
    jobs reserved or running, kept up to date as the pass reserves more.

    Each job of a capped array carries its cap (jobs.array_max_running), so
    the pass needs no lookup per array. The counts are read once per pass
    from the running jobs and the jobs reserved on live workers, as the
    users' max_running is (scheduler._owner_load): both bounded by the
    cluster's slots, never by the queue's length. A full array's queued jobs
    are stepped over in one index probe (`last_queued`), not read one by
    one, so a deep capped array does not slow claims: an array's jobs are
    made in one transaction under the dispatch lock with time-ordered ids
    (models.new_id), so no other job's id falls between its first and last,
    but for a proxy whose clock is behind (docs/ARCHITECTURE.md: such a job
    read in the same batch is placed; one further on waits).
    """

    def __init__(self, conn, live_worker_ids: list[str]):
        self.conn = conn
        self.active: dict[str, int] = {}
        self._last: dict[str, str] = {}
        rows = conn.query(
            "SELECT array_id, COUNT(*) AS n FROM jobs WHERE state = ?"
            " AND array_max_running IS NOT NULL GROUP BY array_id", (JobState.RUNNING.value,))
        if live_worker_ids:
            marks = ", ".join("?" for _ in live_worker_ids)
            rows += conn.query(
                f"SELECT array_id, COUNT(*) AS n FROM jobs WHERE worker_id IN ({marks})"
                " AND state = ? AND array_max_running IS NOT NULL GROUP BY array_id",
                (*live_worker_ids, JobState.QUEUED.value))
        for r in rows:
            self.active[r["array_id"]] = self.active.get(r["array_id"], 0) + int(r["n"])

    def allows(self, job: dict) -> bool:
        """Whether `job` (a queued row with array_id and array_max_running) may be reserved now."""
        cap = job.get("array_max_running")
        return cap is None or self.active.get(job["array_id"], 0) < cap

    def last_queued(self, array_id: str) -> str:
        """The id of the array's last unreserved queued job (jobs_array_state's last entry)."""
        if array_id not in self._last:
            self._last[array_id] = self.conn.query_one(
                "SELECT MAX(id) AS m FROM jobs WHERE array_id = ? AND state = ?"
                " AND worker_id IS NULL", (array_id, JobState.QUEUED.value))["m"] or ""
        return self._last[array_id]

    def took(self, job: dict) -> None:
        if job.get("array_max_running") is not None:
            self.active[job["array_id"]] = self.active.get(job["array_id"], 0) + 1


def at_cap(conn, job: dict) -> int | None:
    """How many of the array's jobs run or are reserved, when that is its cap
    (the queued `job` waits for one to end: waiting.explain); None otherwise."""
    cap = job.get("array_max_running")
    if cap is None or job.get("worker_id") is not None:
        return None
    n = conn.query_one(
        "SELECT (SELECT COUNT(*) FROM jobs WHERE array_id = ? AND state = ?)"
        " + (SELECT COUNT(*) FROM jobs WHERE array_id = ? AND state = ? AND worker_id IS NOT NULL)"
        " AS n", (job["array_id"], JobState.RUNNING.value, job["array_id"],
                  JobState.QUEUED.value))["n"]
    return int(n) if n >= cap else None


# ------------------------------------------------------------------ fetch all

@dataclass(frozen=True)
class ArchiveEntry:
    index: int
    job_id: str
    state: str
    output_blob: str | None
    expired: bool


def archive_entries(conn, array_id: str) -> list[ArchiveEntry]:
    """What the array's archive holds, read before streaming starts (the
    stream runs after the request's connection is given back)."""
    return [ArchiveEntry(r["array_index"], r["id"], r["state"], r["output_blob"],
                         r["expired_at"] is not None)
            for r in conn.query("SELECT id, array_index, state, output_blob, expired_at FROM jobs"
                                " WHERE array_id = ? ORDER BY array_index", (array_id,))]


def send_archive(conn, array: dict, blobs):
    """The response of "fetch all": a zip attachment streamed as it is made."""
    entries = archive_entries(conn, array["id"])
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", array["name"])[:80] or "array"
    # The generator needs no request context: everything it reads was read above.
    return Response(stream_archive(entries, blobs), mimetype="application/zip",
                    headers={"Content-Disposition":
                             f'attachment; filename="{name}-{array["id"]}-outputs.zip"',
                             "X-Content-Type-Options": "nosniff",
                             "Content-Security-Policy": "default-src 'none'; sandbox"})


class _Chunks(io.RawIOBase):
    """A write-only, unseekable sink: zipfile writes into it, the generator drains it."""

    def __init__(self):
        self.parts: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.parts.append(bytes(data))
        return len(data)

    def drain(self) -> bytes:
        data, self.parts = b"".join(self.parts), []
        return data


def stream_archive(entries: list[ArchiveEntry], blobs, chunk: int = 256 * 1024):
    """Every job's outputs as one zip, `<index>/<path>`, produced as it is sent.

    Members are copied from each job's stored archive a chunk at a time, so
    memory stays at a chunk whatever the outputs weigh. Jobs without outputs
    (not finished, none written, expired) and any member whose name would
    leave its index directory are listed in MISSING.txt at the end.
    """
    sink = _Chunks()
    missing = []
    with zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as out:
        for entry in entries:
            why = _why_missing(entry)
            if why is None:
                try:
                    with blobs.open(entry.output_blob) as stored, \
                            zipfile.ZipFile(stored) as inner:
                        for info in inner.infolist():
                            if info.is_dir():
                                continue
                            name = _safe_member(info.filename)
                            if name is None:
                                missing.append(f"{entry.index}\t{entry.job_id}\t{entry.state}\t"
                                               f"left out {info.filename[:200]!r}: unsafe name")
                                continue
                            # Zip64 for a member past 2 GiB: its size is not known before it is written.
                            with inner.open(info) as src, out.open(
                                    f"{entry.index}/{name}", "w",
                                    force_zip64=info.file_size >= 2**31) as dst:
                                for block in iter(lambda: src.read(chunk), b""):
                                    dst.write(block)
                                    yield sink.drain()
                except (OSError, zipfile.BadZipFile, BlobStoreUnavailable) as e:
                    why = f"outputs unreadable ({type(e).__name__})"
            if why is not None:
                missing.append(f"{entry.index}\t{entry.job_id}\t{entry.state}\t{why}")
            yield sink.drain()
        if missing:
            out.writestr("MISSING.txt", "index\tjob\tstate\twhy\n" + "\n".join(missing) + "\n")
    yield sink.drain()


def _why_missing(entry: ArchiveEntry) -> str | None:
    if entry.expired:
        return "outputs expired (retention)"
    if entry.output_blob:
        return None
    if entry.state in (JobState.QUEUED.value, JobState.RUNNING.value):
        return "not finished"
    return "no outputs"


def _safe_member(name: str) -> str | None:
    """A member name that stays under its index directory when unpacked; None otherwise."""
    parts = name.replace("\\", "/").split("/")
    if name.startswith("/") or any(p in ("..",) for p in parts) or "\x00" in name:
        return None
    cleaned = "/".join(p for p in parts if p not in ("", "."))
    return cleaned or None
