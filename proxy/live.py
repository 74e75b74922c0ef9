"""Live updates as Server-Sent Events: one job's state and output, and the
states of one user's jobs.

Every stream is a loop of short, separate reads of the store (a job row and
the log chunks past the position already sent), each done when the stream's
topic fires (wakeups.py: a state change, a log chunk), so it works the same
with any number of proxy processes and instances. Between reads it holds no
database connection and, under gunicorn's gevent workers, no thread: a waiting
stream is a greenlet and a socket.

A stream lives at most the `live_stream_s` setting (less when the process is
stopping: see proxy.begin_shutdown); the browser's EventSource then reconnects
by itself and sends the id of the last event it got as ``Last-Event-ID``, from
which the stream resumes: no output is sent twice or skipped. A job's stream
ends with an ``end`` event once the job is final and all its output was sent.
At most `live_streams_max` streams per process are held open, and never more
than half of gunicorn's connections per process (`gunicorn_connections`); past
that a stream answers once and the client polls every few seconds, so streams
never take the connections workers and pages need.

Job stream events (``data`` is JSON; ``id`` is the position ``ATTEMPT-OUT-ERR``,
the attempt and the stdout/stderr byte offsets already sent):
  ``state``    the job (as in the API) with ``truncated`` ({"stdout", "stderr"}: whether
               the stored log was cut at log_max_bytes) when it changes, and first on
               every connection;
  ``attempt``  the job was requeued: output starts again for this new attempt;
  ``log``      {"stream", "attempt", "offset", "text", "truncated"}: output from byte `offset`;
  ``end``      the final job; nothing follows.
User stream events: ``job`` (a job of the user, as in the API, with ``new``: true
for a job submitted since the client's last event, which a page adds as a row;
false for a change of a job the client may or may not show); ``id`` is the
time of the read it comes from.
"""
from __future__ import annotations

import functools
import json
import re
import threading
import time
from dataclasses import dataclass

from flask import Blueprint, Response, current_app, request

from . import accounts, store, waiting, wakeups
from .appstate import app_state
from .auth import api_user
from .db import get_conn
from .errors import StoreUnavailable, ValidationError
from .models import FINAL_VALUES, JobState
from .wakeups import Listener

bp = Blueprint("live", __name__)

# Without a listener (a stream driven directly, in tests): read this often.
POLL_S = 0.5
# A comment line now and then keeps idle connections from being cut by
# intermediaries (nginx's proxy_read_timeout is 60 s by default), and lets the
# server notice a client that went away.
KEEPALIVE_S = 25.0
# How long the browser waits before reconnecting after the server ends a stream.
RETRY_MS = 500
# ... and when every long stream of the process was taken (live_streams_max):
# the page then polls at this pace instead of holding a thread.
BUSY_RETRY_MS = 5000
# Largest text in one `log` event; more is sent as several events.
EVENT_TEXT_BYTES = 256 * 1024
# State changes of a user's jobs are found by time (finished_at, submitted_at):
# clocks of several proxy instances may differ a little, and a re-sent job
# costs nothing (the page replaces its row), so look back this much further.
CLOCK_MARGIN_S = 5.0
# A user stream follows at most this many of the user's queued jobs, and as
# many of those submitted or finished since its last read (the page shows
# fewer): it bounds each poll's work for a deep queue. Running jobs are always
# all followed (the cluster's slots bound them).
USER_STREAM_JOBS = 500
# A queued job's reason and estimate change with the rest of the cluster (a
# worker joins, another job ends), which wakes no topic of this job: its
# stream reads them again this often while it is queued (waiting.py).
WAITING_REFRESH_S = 5.0
STREAMS = ("stdout", "stderr")

_POSITION = re.compile(r"^(\d{1,9})-(\d{1,15})-(\d{1,15})$")
_SINCE = re.compile(r"^t(\d{1,12}(?:\.\d{1,6})?)$")


@dataclass
class Position:
    """Where a job stream stands: the attempt and how many bytes of each stream were sent."""

    attempt: int
    stdout: int = 0
    stderr: int = 0

    def event_id(self) -> str:
        return f"{self.attempt}-{self.stdout}-{self.stderr}"


@dataclass(frozen=True)
class Timing:
    """How a stream paces itself: at most `max_s` long (the live_stream_s setting)."""

    max_s: float
    poll_s: float = POLL_S
    keepalive_s: float = KEEPALIVE_S


@dataclass(frozen=True)
class Slots:
    """One process's long streams: how many may be held, whether the process
    is stopping (then every stream ends at once), and the wake-ups they wait on."""

    held: threading.BoundedSemaphore
    stopping: threading.Event
    wakeups: Listener


# ---------------------------------------------------------------------- routes

@bp.route("/jobs/<job_id>/events", methods=["GET"])
@bp.route("/api/v1/jobs/<job_id>/events", methods=["GET"], endpoint="api_job_events")
def job_events(job_id):
    """One job's state and output (browser session or API token)."""
    job = store.get_visible_job(get_conn(), job_id, api_user())
    position = parse_position(_resume_from())
    explain = functools.partial(waiting.explain, lease_timeout_s=app_state().config.lease_timeout_s)
    return _sse(job_stream(_db(), job["id"], position, _timing(), _slots(), explain=explain))


@bp.route("/job-status/<user>/events", methods=["GET"])
@bp.route("/api/v1/users/<user>/events", methods=["GET"], endpoint="api_user_events")
def user_events(user):
    """State changes of a user's jobs, for that user and admins only."""
    owner = accounts.visible_owner(get_conn(), user, api_user())
    since = parse_since(_resume_from())
    return _sse(user_stream(_db(), owner["id"], since, _timing(), _slots()))


def _db():
    return app_state().db


def _timing() -> Timing:
    return Timing(max_s=app_state().config.live_stream_s)


def _slots() -> Slots:
    return current_app.extensions["jobcloud_live"]


def streams_per_process(config) -> int:
    """live_streams_max, but at most half of gunicorn's connections per process:
    the other half stay free for workers' claims, uploads and pages."""
    return min(config.live_streams_max, max(1, config.gunicorn_connections // 2))


@bp.record_once
def _make_slots(setup):
    # Per process: it counts this process's threads, nothing shared.
    limit = streams_per_process(setup.app.extensions["jobcloud"].config)
    # The process's own shutdown flag (proxy.begin_shutdown sets it): open streams
    # end at their next poll and clients resume elsewhere from their last event.
    state = setup.app.extensions["jobcloud"]
    setup.app.extensions["jobcloud_live"] = Slots(threading.BoundedSemaphore(limit),
                                                  state.stopping, state.wakeups)


def _resume_from() -> str | None:
    """The position to resume from: the browser's Last-Event-ID on a reconnect,
    else ?from= (a page that already shows some output, or a client reopening)."""
    return request.headers.get("Last-Event-ID") or request.args.get("from") or None


def _sse(events) -> Response:
    if request.method == "HEAD":
        events = ()  # a server still runs the body it does not send: do not start the loop
    response = Response(events, mimetype="text/event-stream")
    response.headers["Cache-Control"] = "no-cache"
    # Tells a buffering front proxy (nginx) to pass events through at once.
    response.headers["X-Accel-Buffering"] = "no"
    return response


def parse_position(raw: str | None) -> Position | None:
    """A job stream position from an event id, or None to start from the beginning.

    Raises:
        ValidationError: not an id this server gives out.
    """
    m = _match_event_id(raw, _POSITION, "ATTEMPT-STDOUT-STDERR, e.g. 1-2048-0")
    return Position(*(int(g) for g in m.groups())) if m else None


def parse_since(raw: str | None) -> float | None:
    """A user stream's resume time from an event id (``t<unix time>``), or None.

    Raises:
        ValidationError: not an id this server gives out.
    """
    m = _match_event_id(raw, _SINCE, "t<unix time>, e.g. t1767225600.5")
    return float(m.group(1)) if m else None


def _match_event_id(raw: str | None, pattern: re.Pattern, shape: str) -> re.Match | None:
    if raw is None:
        return None
    m = pattern.match(raw.strip())
    if not m:
        raise ValidationError(f"Last-Event-ID (or ?from=) must look like {shape}",
                              code="invalid_event_id")
    return m


# ---------------------------------------------------------------- pacing

def _paced(step, timing: Timing, slots: Slots | None, topic: str, refresh=None):
    """Yield `step()`'s events each time `topic` fires, until it says done or
    the stream's time is up.

    `step` reads the store under a connection and returns (SSE texts, done);
    the texts are written after the connection is given back, so a slow
    client never holds a pooled connection. Between steps the stream waits on
    its topic (wakeups.py), holding no connection and reading nothing; it is
    subscribed before the first step, so no change is missed between a read
    and the wait.

    Args:
        slots: the process's long streams. When none is free, the stream
            sends what is new once and ends, and the client comes back after
            BUSY_RETRY_MS. None (tests driving a stream directly): no limit,
            and the store is read every `timing.poll_s` instead of waiting.
        refresh: returns True while `step` should also run every
            WAITING_REFRESH_S without a wake-up (a queued job's `waiting`).
    """
    stopping = threading.Event() if slots is None else slots.stopping
    # Taken here, not in the view: a generator that never starts (the client
    # left first) never runs its `finally`, so it must not hold a slot.
    held = slots is None or slots.held.acquire(blocking=False)
    wake = None
    try:
        if held and slots is not None:
            try:
                wake = slots.wakeups.subscribe(topic)
            except StoreUnavailable:
                return  # the client reconnects and resumes from its last event
        yield f"retry: {RETRY_MS if held else BUSY_RETRY_MS}\n\n"
        started = last_sent = time.monotonic()
        woken = True   # the first step reads what is there already
        while True:
            if woken:  # a wait that merely timed out has nothing new to read
                try:
                    events, done = step()
                except StoreUnavailable:
                    return  # the client reconnects and resumes from its last event
                for text in events:
                    yield text
                    last_sent = time.monotonic()
            if (done or not held or stopping.is_set()
                    or time.monotonic() - started >= timing.max_s):
                return
            if time.monotonic() - last_sent >= timing.keepalive_s:
                yield ": keep-alive\n\n"
                last_sent = time.monotonic()
            if wake is None:
                if stopping.wait(timing.poll_s):
                    return
                continue
            now = time.monotonic()
            again = refresh is not None and refresh()
            woken = wake.wait(min(timing.keepalive_s - (now - last_sent),
                                  timing.max_s - (now - started),
                                  WAITING_REFRESH_S if again else timing.max_s)) or again
            if stopping.is_set():
                return
    finally:
        if wake is not None:
            wake.__exit__(None, None, None)
        if held and slots is not None:
            slots.held.release()


# ------------------------------------------------------------------ job stream

def job_stream(db, job_id: str, position: Position | None, timing: Timing,
               slots: Slots | None = None, explain=None):
    """Yield the SSE text of one job's stream until it ends (final job) or times out.

    Args:
        position: what the client already has; None for everything.
        slots: the process's long streams (see _paced); None: no limit.
        explain: (conn, job) -> the job's `waiting` (waiting.explain); None: not sent.
    """
    last_state = None
    queued = False

    def step():
        nonlocal position, last_state, queued
        with db.connection() as conn:
            job, position, events, last_state = _job_changes(conn, job_id, position, last_state,
                                                             explain)
        queued = explain is not None and job["state"] == JobState.QUEUED.value
        final = job["state"] in FINAL_VALUES
        if final:
            events.append(_event("end", last_state, position.event_id()))
        return events, final

    return _paced(step, timing, slots, wakeups.job_topic(job_id), refresh=lambda: queued)


def _job_changes(conn, job_id: str, position: Position | None, last_state: dict | None,
                 explain=None):
    """What happened to the job since `position`: (job, new position, SSE events, its state)."""
    # The state is read before the output: a job seen final here had all
    # its output stored already (the worker flushes it before the result,
    # and the proxy refuses chunks of a job that is no longer running).
    job = store.get_job(conn, job_id)
    why = explain(conn, job) if explain is not None else None
    events = []
    if position is None or position.attempt != job["attempt"]:
        if position is not None:
            events.append(_event("attempt", {"attempt": job["attempt"]},
                                 Position(job["attempt"]).event_id()))
        position = Position(job["attempt"])
    state = _job_state(job, why)
    if state != last_state:
        events.append(_event("state", state, position.event_id()))
    events.extend(_new_output(conn, job, position))
    return job, position, events, state


def _job_state(job: dict, why: dict | None = None) -> dict:
    return {**store.job_json(job, why),
            "truncated": {stream: bool(job[f"{stream}_truncated"]) for stream in STREAMS}}


def _new_output(conn, job: dict, position: Position):
    """`log` events for everything stored past `position`, which they advance."""
    for stream in STREAMS:
        while True:
            offset = getattr(position, stream)
            logs = store.read_logs(conn, job, stream, offset, limit=EVENT_TEXT_BYTES)
            if logs["next_offset"] <= offset:
                break
            setattr(position, stream, logs["next_offset"])
            yield _event("log", {"stream": stream, "attempt": job["attempt"], "offset": offset,
                                 "text": logs["data"], "truncated": logs["truncated"]},
                         position.event_id())


def _event(name: str, data: dict, event_id: str) -> str:
    # JSON has no raw newlines, so the payload is a single data: line.
    return f"id: {event_id}\nevent: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


# ----------------------------------------------------------------- user stream

def user_stream(db, owner_id: str, since: float | None, timing: Timing,
                slots: Slots | None = None):
    """Yield the SSE text of a user's job changes until it times out.

    Args:
        since: the time of the client's last event (its page or its last
            `job` event): jobs that may have changed since are sent again,
            those submitted since marked ``new``. None: only the jobs that
            are active now.
        slots: the process's long streams (see _paced); None: no limit.
    """
    look_back = None if since is None else since - CLOCK_MARGIN_S
    sent: dict[str, tuple] = {}

    def step():
        nonlocal look_back
        read_at = time.time()
        with db.connection() as conn:
            jobs = [job for job in store.changed_jobs(conn, owner_id, look_back, USER_STREAM_JOBS)
                    if sent.get(job["id"]) != _mark(job)]
        events = []
        for job in sorted(jobs, key=lambda j: j["id"]):
            sent[job["id"]] = _mark(job)
            new = look_back is not None and job["submitted_at"] >= look_back
            events.append(_event("job", {**store.job_json(job), "new": new}, f"t{read_at:.3f}"))
        look_back = read_at - CLOCK_MARGIN_S
        return events, False

    return _paced(step, timing, slots, wakeups.user_topic(owner_id))


def _mark(job: dict) -> tuple:
    return (job["state"], job["attempt"], job["cancel_requested"], job["started_at"],
            job["finished_at"])
