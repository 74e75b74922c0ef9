"""Live updates over Server-Sent Events (proxy/live.py): a job's state and
output as the worker appends it, a user's job states, resuming from
Last-Event-ID without duplicates or gaps (also across a requeue), the same
visibility rules as the pages and the API, and 400 for ids the server never
gave out. On SQLite and PostgreSQL, through the Flask test client and a live
gunicorn.
"""
from __future__ import annotations

import json
import os
import re
import signal
import time

import pytest
import requests

from proxy import begin_shutdown, close_app, create_app, live, store, workers
from tests.conftest import (LiveServer, Users, free_port, login, register_worker, start_gunicorn,
                            stop_gunicorn)
from tests.test_api import ProtocolWorker, alice, submit  # noqa: F401  (fixture)

JSON = {"Accept": "application/json"}


@pytest.fixture
def app(make_app):
    return make_app()


@pytest.fixture
def worker(client, users):
    return ProtocolWorker(client, users.enrollment())


class Events:
    """Reads an SSE response one event at a time (a stream of a running job
    never ends by itself within a test, so it is read only as far as needed)."""

    def __init__(self, response):
        assert response.status_code == 200, response.get_data(as_text=True)
        assert response.mimetype == "text/event-stream"
        self.response = response
        self.chunks = iter(response.response)
        self.comments: list[str] = []

    def next(self) -> dict | None:
        """The next event as {"id", "event", "data"}; None when the stream ended."""
        for chunk in self.chunks:
            text = chunk.decode() if isinstance(chunk, bytes) else chunk
            event = parse_event(text)
            if event is None:
                self.comments.append(text)
                continue
            return event
        return None

    def take(self, n: int) -> list[dict]:
        return [self.next() for _ in range(n)]

    def rest(self) -> list[dict]:
        events = []
        while (event := self.next()) is not None:
            events.append(event)
        return events

    def close(self):
        self.response.close()


def parse_event(text: str) -> dict | None:
    fields = dict(line.split(": ", 1) for line in text.strip().splitlines()
                  if ": " in line and not line.startswith(":"))
    if "event" not in fields:
        return None
    return {"id": fields.get("id"), "event": fields["event"], "data": json.loads(fields["data"])}


def stream(client, path: str, headers: dict, last_id: str | None = None) -> Events:
    if last_id is not None:
        headers = {**headers, "Last-Event-ID": last_id}
    return Events(client.get(path, headers=headers, buffered=False))


def output(events: list[dict], name: str = "stdout") -> str:
    return "".join(e["data"]["text"] for e in events if e["event"] == "log" and e["data"]["stream"] == name)


def append(client, worker, job: dict, stream_name: str, offset: int, text: str) -> None:
    r = client.post(f"/api/v1/worker/jobs/{job['id']}/logs", headers=worker.headers,
                    json={"attempt": job["attempt"], "stream": stream_name, "offset": offset,
                          "data": text})
    assert r.status_code == 200 and r.json["stored"], r.get_data(as_text=True)


def finished_job(client, worker, headers, out_chunks, err_chunks=()):
    """A job that ran, shipped its output in these chunks, and succeeded."""
    job = submit(client, headers)
    [claimed] = worker.claim()
    for name, chunks in (("stdout", out_chunks), ("stderr", err_chunks)):
        offset = 0
        for chunk in chunks:
            append(client, worker, claimed, name, offset, chunk)
            offset += len(chunk.encode())
    worker.finish(claimed, stdout="".join(out_chunks))
    return job


# ------------------------------------------------------------------- one job

def test_finished_job_stream_sends_everything_then_ends(client, worker, alice):
    out = ["line 1\n", "line 2 ünïcode\n", "line 3\n"]
    job = finished_job(client, worker, alice["headers"], out, ["warning\n"])

    events = stream(client, f"/api/v1/jobs/{job['id']}/events", alice["headers"]).rest()

    assert [e["event"] for e in events][0] == "state" and events[-1]["event"] == "end"
    assert output(events) == "".join(out) and output(events, "stderr") == "warning\n"
    assert events[-1]["data"]["state"] == "succeeded" and events[-1]["data"]["exit_code"] == 0
    # The last id is the whole position: attempt 1, every byte of both streams.
    assert events[-1]["id"] == f"1-{len(''.join(out).encode())}-8"


def test_running_job_streams_output_as_it_arrives_then_the_final_state(client, worker, alice):
    job = submit(client, alice["headers"])
    [claimed] = worker.claim()
    append(client, worker, claimed, "stdout", 0, "epoch 1\n")
    events = stream(client, f"/api/v1/jobs/{job['id']}/events", alice["headers"])
    try:
        first = events.take(2)
        assert first[0]["event"] == "state" and first[0]["data"]["state"] == "running"
        assert first[1]["data"] == {"stream": "stdout", "attempt": 1, "offset": 0, "text": "epoch 1\n",
                                    "truncated": False}

        append(client, worker, claimed, "stdout", 8, "epoch 2\n")
        append(client, worker, claimed, "stderr", 0, "careful\n")
        more = events.take(2)
        assert [(e["data"]["stream"], e["data"]["offset"], e["data"]["text"]) for e in more] == \
            [("stdout", 8, "epoch 2\n"), ("stderr", 0, "careful\n")]
        assert more[-1]["id"] == "1-16-8"

        worker.finish(claimed, stdout="epoch 1\nepoch 2\n")
        rest = events.rest()
        assert [e["event"] for e in rest] == ["state", "end"]
        assert rest[-1]["data"]["state"] == "succeeded"
    finally:
        events.close()


def test_resume_from_any_event_id_has_no_duplicates_and_no_gaps(client, worker, alice):
    out = [f"step {i}\n" for i in range(6)]
    err = ["e1\n", "e2\n"]
    job = finished_job(client, worker, alice["headers"], out, err)
    path = f"/api/v1/jobs/{job['id']}/events"
    full = stream(client, path, alice["headers"]).rest()
    ids = [e["id"] for e in full]

    for last_id in ids:
        seen = full[:ids.index(last_id) + 1]
        resumed = stream(client, path, alice["headers"], last_id).rest()
        assert output(seen) + output(resumed) == "".join(out), last_id
        assert output(seen, "stderr") + output(resumed, "stderr") == "".join(err), last_id
        assert resumed[-1]["event"] == "end"
    # ?from= resumes the same way (a page that already shows the output).
    page_resume = stream(client, f"{path}?from={ids[-1]}", alice["headers"]).rest()
    assert output(page_resume) == "" and page_resume[-1]["event"] == "end"


def test_resume_across_a_requeue_restarts_with_the_new_attempt(app, client, users, worker, alice):
    job = submit(client, alice["headers"])
    [first] = worker.claim()
    append(client, worker, first, "stdout", 0, "attempt one\n")
    events = stream(client, f"/api/v1/jobs/{job['id']}/events", alice["headers"])
    seen = events.take(2)
    events.close()
    assert seen[-1]["id"] == "1-12-0"

    # The first worker goes silent: its lease runs out and the job is requeued.
    with app.extensions["jobcloud"].db.connection() as conn, conn.transaction():
        assert workers.reap(conn, lease_timeout_s=1, max_attempts=3, now=time.time() + 60) == 1
    second_worker = ProtocolWorker(client, users.enrollment(), name="w2")
    [second] = second_worker.claim()
    assert second["attempt"] == 2
    append(client, second_worker, second, "stdout", 0, "attempt two\n")
    second_worker.finish(second, stdout="attempt two\n")

    resumed = stream(client, f"/api/v1/jobs/{job['id']}/events", alice["headers"],
                     seen[-1]["id"]).rest()
    assert resumed[0] == {"id": "2-0-0", "event": "attempt", "data": {"attempt": 2}}
    assert output(resumed) == "attempt two\n"
    assert resumed[-1]["event"] == "end" and resumed[-1]["data"]["attempt"] == 2


def test_job_stream_needs_the_owner_or_an_admin(app, client, users, worker, alice):
    job = finished_job(client, worker, alice["headers"], ["secret output\n"])
    bob, root = users.create("bob"), users.create("root", admin=True)
    for path in (f"/api/v1/jobs/{job['id']}/events", f"/jobs/{job['id']}/events"):
        r = client.get(path, headers={**bob["headers"], **JSON})
        assert r.status_code == 404 and r.json["error"] == "job_not_found"
        assert "secret" not in r.get_data(as_text=True)
        r = app.test_client().get(path, headers=JSON)
        assert r.status_code == 401 and set(r.json) == {"error", "detail"}
        assert output(stream(client, path, root["headers"]).rest()) == "secret output\n"
    # The page's stream with the browser's session cookie.
    browser = app.test_client()
    login(browser, "alice", alice["password"])
    events = stream(browser, f"/jobs/{job['id']}/events", {}).rest()
    assert output(events) == "secret output\n"
    page = browser.get(f"/jobs/{job['id']}").get_data(as_text=True)
    assert f'data-events="/jobs/{job["id"]}/events" data-from="1-14-0"' in page


BAD_IDS = ["nonsense", "1-2", "-1-0-0", "1-0-0-0", "1-0-x", "1-99999999999999999-0", "1 - 0 - 0",
           "t12.5", "1-0-0\u00e9"]


def test_bad_last_event_id_is_400(client, alice):
    job = submit(client, alice["headers"])
    path = f"/api/v1/jobs/{job['id']}/events"
    for bad in BAD_IDS:
        r = client.get(path, headers={**alice["headers"], "Last-Event-ID": bad.encode().decode("latin-1")})
        assert r.status_code == 400 and r.json["error"] == "invalid_event_id", (bad, r.get_data())
        r = client.get(path, headers=alice["headers"], query_string={"from": bad})
        assert r.status_code == 400 and r.json["error"] == "invalid_event_id", bad
        # The page's stream answers like the pages do: an HTML error for a browser.
        r = client.get(f"/jobs/{job['id']}/events",
                       headers={**alice["headers"], "Last-Event-ID": bad.encode().decode("latin-1"),
                                "Accept": "text/html"})
        body = r.get_data(as_text=True)
        assert r.status_code == 400 and "<html" in body and "ATTEMPT-STDOUT-STDERR" in body, bad


def test_unknown_job_ids_are_404(client, alice):
    for job_id in ["nope", "j" + "0" * 30, "x" * 300, "j\x00", "j%00"]:
        r = client.get(f"/api/v1/jobs/{job_id}/events", headers=alice["headers"])
        assert r.status_code == 404 and r.json["error"] == "job_not_found", job_id


# ----------------------------------------------------------- a user's jobs

def test_user_stream_follows_state_changes(client, worker, alice):
    job = submit(client, alice["headers"], name="watched")
    events = stream(client, "/job-status/alice/events", alice["headers"])
    try:
        [queued] = events.take(1)
        assert queued["event"] == "job" and queued["data"]["id"] == job["id"]
        assert queued["data"]["state"] == "queued" and re.fullmatch(r"t\d+\.\d{3}", queued["id"])

        [claimed] = worker.claim()
        assert events.next()["data"]["state"] == "running"
        worker.finish(claimed)
        done = events.next()["data"]
        assert done["id"] == job["id"] and done["state"] == "succeeded" and done["exit_code"] == 0
        assert done["cost"] is not None  # final jobs carry their cost (usage.py)
    finally:
        events.close()


def test_user_stream_resumes_with_what_changed_since_its_last_event(client, worker, alice):
    job = submit(client, alice["headers"])
    [claimed] = worker.claim()
    first = stream(client, "/api/v1/users/alice/events", alice["headers"])
    [running] = first.take(1)
    first.close()
    worker.finish(claimed)  # happens while the client is away
    fresh = submit(client, alice["headers"])

    again = stream(client, "/api/v1/users/alice/events", alice["headers"], running["id"])
    try:
        got = {e["data"]["id"]: e["data"]["state"] for e in again.take(2)}
        assert got == {job["id"]: "succeeded", fresh["id"]: "queued"}
    finally:
        again.close()


def test_user_stream_is_for_the_user_and_admins(client, users, alice):
    bob, root = users.create("bob"), users.create("root", admin=True)
    submit(client, alice["headers"])
    for path in ("/job-status/alice/events", "/api/v1/users/alice/events"):
        r = client.get(path, headers={**bob["headers"], **JSON})
        assert r.status_code == 404 and r.json["error"] == "user_not_found"
        assert client.get(path.replace("alice", "nobody"), headers=bob["headers"]).status_code == 404
        events = stream(client, path, root["headers"])
        assert events.next()["data"]["owner"] == "alice"
        events.close()
        r = client.get(path, headers={**alice["headers"], **JSON, "Last-Event-ID": "1-0-0"})
        assert r.status_code == 400 and r.json["error"] == "invalid_event_id"


def user_events(db, owner_id: str, since: float | None) -> list[dict]:
    """The events of a user stream's first read."""
    text = "".join(live.user_stream(db, owner_id, since, live.Timing(max_s=0)))
    return [e for e in map(parse_event, text.split("\n\n")) if e]


def test_user_stream_marks_only_jobs_submitted_since_as_new(app, client, alice):
    """A page adds rows for `new` jobs only: a (re)connection also sends the user's
    older active jobs, which a page may not show (another page, or past its first)."""
    old = submit(client, alice["headers"], name="old")
    with app.extensions["jobcloud"].db.connection() as conn:
        conn.execute("UPDATE jobs SET submitted_at = submitted_at - 60 WHERE id = ?", (old["id"],))
    page_made = time.time()
    events = stream(client, "/api/v1/users/alice/events", alice["headers"], f"t{page_made:.3f}")
    try:
        [first] = events.take(1)
        assert first["data"]["id"] == old["id"] and first["data"]["new"] is False
        fresh = submit(client, alice["headers"], name="fresh")
        second = events.next()["data"]
        assert second["id"] == fresh["id"] and second["new"] is True
    finally:
        events.close()
    # Without a time to compare with, nothing is new.
    assert [e["data"]["new"] for e in user_events(app.extensions["jobcloud"].db, alice["id"], None)] \
        == [False, False]


def test_user_stream_follows_running_jobs_behind_a_deep_queue(app, client, worker, alice,
                                                               monkeypatch):
    """Queued jobs are capped (USER_STREAM_JOBS) apart from the running and the finished."""
    monkeypatch.setattr(live, "USER_STREAM_JOBS", 3)
    running = submit(client, alice["headers"], name="running")
    worker.claim()
    done = submit(client, alice["headers"], name="done")
    client.post(f"/api/v1/jobs/{done['id']}/cancel", headers=alice["headers"])
    queued = [submit(client, alice["headers"], name=f"q{i}")["id"] for i in range(5)]
    db = app.extensions["jobcloud"].db

    got = {e["data"]["id"]: e["data"]["state"] for e in user_events(db, alice["id"], None)}
    assert got == {running["id"]: "running", **{q: "queued" for q in queued[-3:]}}
    since = time.time() - 60
    got = {e["data"]["id"]: e["data"]["state"] for e in user_events(db, alice["id"], since)}
    assert got[running["id"]] == "running" and got[done["id"]] == "cancelled"
    assert set(got) == {running["id"], done["id"], *queued[-3:]}  # the newest submitted, capped


def test_user_stream_reads_through_indexes_in_one_query(make_config):
    """The user stream polls every half second: each read is an index search (no
    scan of the user's jobs), and the rows come in full from the same query."""
    app = create_app(make_config())  # SQLite: its EXPLAIN QUERY PLAN is stable
    with app.extensions["jobcloud"].db.connection() as conn:
        for since in (None, time.time()):
            sql, params = store.changed_ids_query("u1", since, live.USER_STREAM_JOBS)
            plan = [r["detail"] for r in conn.query(
                f"EXPLAIN QUERY PLAN SELECT * FROM jobs WHERE id IN ({sql})", params)]
            reads = [d for d in plan if re.match(r"(SCAN|SEARCH) jobs\b", d)]
            assert reads and all(" USING " in d for d in reads), plan
            indexes = {re.search(r"INDEX (\w+)", d).group(1) for d in reads}
            expected = {"jobs_owner_state"}
            if since is not None:
                expected |= {"jobs_owner_finished", "jobs_owner"}
            assert expected <= indexes, plan
            assert not any(d.startswith("SCAN jobs") for d in plan), plan
    close_app(app)


# ------------------------------------------------------- bounded lifetime

def test_streams_end_after_their_lifetime_with_keepalives(app, client, worker, alice):
    """A stream holds a server thread: it ends by itself (the browser reconnects)."""
    job = submit(client, alice["headers"])
    worker.claim()
    db = app.extensions["jobcloud"].db
    timing = live.Timing(max_s=0.8, poll_s=0.05, keepalive_s=0.2)
    for events in (live.job_stream(db, job["id"], None, timing),
                   live.user_stream(db, alice["id"], None, timing)):
        started = time.monotonic()
        text = "".join(events)
        assert 0.8 <= time.monotonic() - started < 3
        assert text.startswith(f"retry: {live.RETRY_MS}\n\n") and ": keep-alive\n\n" in text
        assert "event: end" not in text  # not final: the client is meant to reconnect


def test_the_server_ends_streams_after_live_stream_s(make_config):
    """The stream of a job that is not final ends after live_stream_s (the config setting)."""
    app = create_app(make_config(live_stream_s=1))
    client = app.test_client()
    carol = Users(app).create("carol")
    job = submit(client, carol["headers"])
    started = time.monotonic()
    events = stream(client, f"/api/v1/jobs/{job['id']}/events", carol["headers"]).rest()
    assert 1 <= time.monotonic() - started < 3
    assert [e["event"] for e in events] == ["state"]  # queued: no end, the client reconnects
    close_app(app)


def test_head_answers_at_once(client, alice):
    job = submit(client, alice["headers"])
    started = time.monotonic()
    r = client.head(f"/api/v1/jobs/{job['id']}/events", headers=alice["headers"])
    assert r.status_code == 200 and r.mimetype == "text/event-stream"
    assert time.monotonic() - started < 1


@pytest.mark.parametrize("one_stream", [{"live_streams_max": 1},
                                        {"live_streams_max": 4, "gunicorn_connections": 2}])
def test_past_live_streams_max_a_stream_answers_once_and_the_client_polls(make_config, one_stream):
    """Held streams take gunicorn threads: past the limit, no thread is held."""
    app = create_app(make_config(**one_stream))
    client = app.test_client()
    carol = Users(app).create("carol")
    job = submit(client, carol["headers"])
    path = f"/api/v1/jobs/{job['id']}/events"
    held = stream(client, path, carol["headers"])
    try:
        assert held.next()["event"] == "state"  # this one holds the process's only slot
        started = time.monotonic()
        busy = client.get(path, headers=carol["headers"]).get_data(as_text=True)
        assert time.monotonic() - started < 1
        assert busy.startswith(f"retry: {live.BUSY_RETRY_MS}\n\n")
        assert [parse_event(block)["event"] for block in busy.split("\n\n")[1:] if block] == ["state"]
    finally:
        held.close()
    # Given back when the client goes: the next stream is held again.
    again = stream(client, path, carol["headers"])
    assert again.next()["event"] == "state"
    assert again.comments == [f"retry: {live.RETRY_MS}\n\n"]
    again.close()
    slots = app.extensions["jobcloud_live"].held
    assert slots.acquire(blocking=False)  # closed streams gave their slots back
    slots.release()
    close_app(app)


def test_streams_per_process_are_at_most_half_of_gunicorns_connections(make_config):
    """live_streams_max counts against the process's connections (JOBCLOUD_GUNICORN_CONNECTIONS)."""
    assert live.streams_per_process(make_config(gunicorn_connections=2, live_streams_max=4)) == 1
    assert live.streams_per_process(make_config()) == 1000  # 2000 connections, max 2000
    assert live.streams_per_process(make_config(gunicorn_connections=4, live_streams_max=1)) == 1
    assert live.streams_per_process(make_config(gunicorn_connections=3)) == 1


def test_streams_end_at_once_when_the_process_stops(app, client, alice):
    """A graceful restart does not wait out live_stream_s (gunicorn_conf.py sets the flag)."""
    job = submit(client, alice["headers"])
    path = f"/api/v1/jobs/{job['id']}/events"
    events = stream(client, path, alice["headers"])
    assert events.next()["event"] == "state"
    begin_shutdown(app)
    started = time.monotonic()
    assert events.rest() == [] and time.monotonic() - started < 1
    # A stream opened meanwhile answers what it has and ends too, without
    # waiting out a keep-alive interval (25 s) first.
    started = time.monotonic()
    assert [e["event"] for e in stream(client, path, alice["headers"]).rest()] == ["state"]
    assert time.monotonic() - started < live.KEEPALIVE_S / 5


def test_truncation_shows_in_state_and_log_events(make_config):
    """The page's "(truncated)" follows the events: a log cut at log_max_bytes says so live."""
    app = create_app(make_config(log_max_bytes=1024, log_tail_bytes=1024))
    client = app.test_client()
    users = Users(app)
    carol = users.create("carol")
    worker = ProtocolWorker(client, users.enrollment())
    job = submit(client, carol["headers"])
    [claimed] = worker.claim()
    append(client, worker, claimed, "stdout", 0, "hello\n")
    events = stream(client, f"/api/v1/jobs/{job['id']}/events", carol["headers"])
    try:
        state, log = events.take(2)
        assert state["data"]["truncated"] == {"stdout": False, "stderr": False}
        assert log["data"]["text"] == "hello\n" and log["data"]["truncated"] is False
        r = client.post(f"/api/v1/worker/jobs/{job['id']}/logs", headers=worker.headers,
                        json={"attempt": 1, "stream": "stdout", "offset": 6, "data": "x" * 2000})
        assert r.json == {"stored": False, "truncated": True}
        changed = events.next()
        assert changed["event"] == "state"
        assert changed["data"]["truncated"] == {"stdout": True, "stderr": False}
    finally:
        events.close()
    close_app(app)


def test_job_page_sends_times_as_utc_iso_for_the_browser_to_show(client, worker, alice):
    job = finished_job(client, worker, alice["headers"], ["x\n"])
    login(client, "alice", alice["password"])
    page = client.get(f"/jobs/{job['id']}").get_data(as_text=True)
    job = client.get(f"/api/v1/jobs/{job['id']}", headers=alice["headers"]).json
    for name in ("submitted", "started", "finished"):
        iso = job[f"{name}_at"]
        assert iso.endswith("Z")
        assert f'<time id="{name}" datetime="{iso}">{iso}</time>' in page
    listing = client.get("/job-status/alice").get_data(as_text=True)
    assert f'<time datetime="{job["submitted_at"]}">{job["submitted_at"]}</time>' in listing


# -------------------------------------------------------------- live server

@pytest.fixture
def gunicorn_server(tmp_path, database_url):
    """The real proxy under gunicorn (2 processes) on SQLite or PostgreSQL."""
    port = free_port()
    env = dict(os.environ, JOBCLOUD_DATA_DIR=str(tmp_path / "live"), JOBCLOUD_BIND=f"127.0.0.1:{port}",
               JOBCLOUD_LOG_LEVEL="WARNING", JOBCLOUD_DATABASE_URL=database_url)
    env.pop("JOBCLOUD_CONFIG", None)
    proc = start_gunicorn(env, port, workers=2)
    yield LiveServer(f"http://127.0.0.1:{port}", proc, env, tmp_path / "live")
    stop_gunicorn(proc)


@pytest.mark.live
def test_sse_through_gunicorn(gunicorn_server):
    """The real server: the stream flushes each event as it happens (no buffering)."""
    live_server = gunicorn_server
    url = live_server.url
    live_server.admin("user", "add", "alice")
    token = re.search(r"jcu_\S+", live_server.admin("token", "create", "--user", "alice")).group(0)
    enrollment = re.search(r"jce_\S+", live_server.admin("enroll", "create")).group(0)
    user = {"Authorization": f"Bearer {token}"}
    r = requests.post(f"{url}/api/v1/jobs", headers=user, files={"code": (None, "print(1)")}, timeout=10)
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    w = register_worker(url, enrollment)
    [claimed] = requests.post(f"{url}/api/v1/worker/claim", headers=w, json={"max_jobs": 1},
                              timeout=40).json()["jobs"]

    def log(offset, text):
        r = requests.post(f"{url}/api/v1/worker/jobs/{job_id}/logs", headers=w, timeout=10,
                          json={"attempt": 1, "stream": "stdout", "offset": offset, "data": text})
        assert r.status_code == 200

    with requests.get(f"{url}/api/v1/jobs/{job_id}/events", headers=user, stream=True,
                      timeout=10) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        lines = r.iter_lines(decode_unicode=True)

        def next_event():
            block = []
            for line in lines:
                if line == "" and block:
                    event = parse_event("\n".join(block))
                    block = []
                    if event:
                        return event
                elif line:
                    block.append(line)
            return None

        assert next_event()["event"] == "state"
        started = time.monotonic()
        log(0, "first line\n")
        event = next_event()
        assert event["data"]["text"] == "first line\n" and time.monotonic() - started < 3
        log(11, "second line\n")
        assert next_event()["data"]["text"] == "second line\n"
        r2 = requests.post(f"{url}/api/v1/worker/jobs/{job_id}/result", headers=w, timeout=10,
                           json={"attempt": 1, "state": "succeeded", "exit_code": 0,
                                 "stdout": "first line\nsecond line\n", "wall_seconds": 1})
        assert r2.status_code == 200, r2.text
        assert [next_event()["event"], next_event()["event"]] == ["state", "end"]
        assert next_event() is None  # the server closed the stream


@pytest.mark.live
def test_a_graceful_stop_ends_open_streams_at_once(tmp_path):
    """gunicorn waits for open requests when it stops (graceful_timeout, 30 s): a
    stream ends at its next poll instead of holding the restart for live_stream_s."""
    port = free_port()
    env = dict(os.environ, JOBCLOUD_DATA_DIR=str(tmp_path / "live"), JOBCLOUD_BIND=f"127.0.0.1:{port}",
               JOBCLOUD_LOG_LEVEL="WARNING", JOBCLOUD_LIVE_STREAM_S="120")
    for name in ("JOBCLOUD_CONFIG", "JOBCLOUD_DATABASE_URL"):
        env.pop(name, None)
    proc = start_gunicorn(env, port, workers=1)
    try:
        server = LiveServer(f"http://127.0.0.1:{port}", proc, env, tmp_path / "live")
        server.admin("user", "add", "alice")
        token = re.search(r"jcu_\S+", server.admin("token", "create", "--user", "alice")).group(0)
        user = {"Authorization": f"Bearer {token}"}
        r = requests.post(f"{server.url}/api/v1/jobs", headers=user, files={"code": (None, "print(1)")},
                          timeout=10)
        assert r.status_code == 201, r.text
        with requests.get(f"{server.url}/api/v1/jobs/{r.json()['id']}/events", headers=user,
                          stream=True, timeout=10) as events:
            lines = events.iter_lines(decode_unicode=True)
            assert next(line for line in lines if line.startswith("event:")) == "event: state"
            started = time.monotonic()
            os.kill(proc.pid, signal.SIGTERM)  # the arbiter: it stops its workers gracefully
            assert [line for line in lines if line.startswith("event:")] == []  # ends, no `end`
            assert time.monotonic() - started < 5
        proc.wait(timeout=10)
        assert time.monotonic() - started < 10
    finally:
        stop_gunicorn(proc)
