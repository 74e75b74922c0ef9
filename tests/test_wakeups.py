"""Long-lived connections without a thread each, and wake-ups pushed (issue 11).

In-process tests drive the real app (Flask test client, one thread per
request) to show causality: a waiting claim is answered because of the change
that concerns it, with the SQLite watcher's poll set to a minute and no
polling at all on PostgreSQL, and it reads nothing while it waits. The
gunicorn tests run the real server (gevent workers) on SQLite and PostgreSQL:
hundreds of idle long-polls and open live pages while pages still answer,
two instances sharing one PostgreSQL, and slow clients cut off.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time

import pytest
import requests

from proxy import accounts, wakeups, workers
from proxy.db import PG_DISPATCH_LOCK, Connection, open_database
from tests.conftest import LiveServer, Users, free_port, start_gunicorn, stop_gunicorn, wait_until
from tests.test_api import ProtocolWorker, submit

WAIT_S = 20          # how long the claims below may long-poll
PROMPT_S = 5         # an answer this soon came from a wake-up, not the deadline


# ------------------------------------------------------------------ in process

@pytest.fixture
def wapp(make_app):
    # A watcher that looks once a minute: anything faster than that was pushed.
    # Jobs no worker here can run must queue (issue 14 refuses them otherwise).
    return make_app(wakeup_poll_s=60, queue_unmet_capacity=True)


@pytest.fixture
def users(wapp):
    return Users(wapp)


class Claimer(threading.Thread):
    """One worker's claim long-poll in a thread of its own; records every query
    it runs, so a test can show the wait itself reads nothing."""

    def __init__(self, app, worker: ProtocolWorker, **body):
        super().__init__(daemon=True)
        self.client = app.test_client()
        self.worker = worker
        self.body = {"max_jobs": 1, "wait_s": WAIT_S, **body}
        self.answer = None
        self.answered_at = None
        self.queries = 0

    def run(self):
        r = self.client.post("/api/v1/worker/claim", headers=self.worker.headers, json=self.body)
        self.answered_at = time.monotonic()
        self.answer = (r.status_code, r.get_json())


@pytest.fixture
def query_counter(monkeypatch):
    """Counts the queries each thread runs (all of them go through Connection)."""
    counts: dict[int, int] = {}
    for name in ("query", "query_one", "execute"):
        original = getattr(Connection, name)

        def counting(self, *args, _original=original, **kwargs):
            ident = threading.get_ident()
            counts[ident] = counts.get(ident, 0) + 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(Connection, name, counting)
    return counts


@pytest.fixture(autouse=True)
def waiting_threads(monkeypatch):
    """The threads now inside a wake-up wait (their claim has read what it reads)."""
    inside: set[int] = set()
    original = wakeups.Subscription.wait

    def wait(self, timeout):
        inside.add(threading.get_ident())
        try:
            return original(self, timeout)
        finally:
            inside.discard(threading.get_ident())

    monkeypatch.setattr(wakeups.Subscription, "wait", wait)
    return inside


def worker_id_of(app, worker: ProtocolWorker) -> str:
    with app.extensions["jobcloud"].db.connection() as conn:
        return conn.query_one("SELECT id FROM workers WHERE secret_hash = ?",
                              (accounts.hash_token(worker.secret),))["id"]


def start_claim(app, worker, inside: set, **body) -> Claimer:
    """Start a claim and return once it waits (its first claim found nothing)."""
    claimer = Claimer(app, worker, **body)
    claimer.start()
    wait_until(lambda: claimer.ident in inside, timeout=10, what="the claim to wait")
    return claimer


def test_a_waiting_claim_is_answered_by_the_submission_and_reads_nothing_while_waiting(
        wapp, users, query_counter, waiting_threads):
    alice = users.create("alice")
    client = wapp.test_client()
    worker = ProtocolWorker(client, users.enrollment())
    claimer = start_claim(wapp, worker, waiting_threads)
    first_claim = query_counter[claimer.ident]

    # A job nobody here can run is dispatched to nobody and wakes nobody.
    submit(client, alice["headers"], gpus="1")
    assert claimer.answer is None
    assert query_counter[claimer.ident] == first_claim, "the waiting claim read the store"

    submitted = time.monotonic()
    job = submit(client, alice["headers"])
    claimer.join(WAIT_S + 5)
    status, answer = claimer.answer
    assert status == 200 and [j["id"] for j in answer["jobs"]] == [job["id"]]
    assert claimer.answered_at - submitted < PROMPT_S   # not the 20 s deadline, nor a 60 s poll


def test_a_cancel_reaches_the_waiting_claim_of_the_worker_that_runs_the_job(wapp, users,
                                                                            waiting_threads):
    alice = users.create("alice")
    client = wapp.test_client()
    worker = ProtocolWorker(client, users.enrollment())
    job = submit(client, alice["headers"])
    [held] = worker.claim()
    claimer = start_claim(wapp, worker, waiting_threads)   # a free slot: it waits for more

    asked = time.monotonic()
    r = client.post(f"/api/v1/jobs/{held['id']}/cancel", headers=alice["headers"])
    assert r.status_code == 200
    claimer.join(WAIT_S + 5)
    status, answer = claimer.answer
    assert status == 200 and answer["cancel"] == [job["id"]] and answer["jobs"] == []
    assert claimer.answered_at - asked < PROMPT_S


def test_a_drain_ends_the_waiting_claim_with_the_order(wapp, users, waiting_threads):
    admin = users.create("root", admin=True)
    client = wapp.test_client()
    worker = ProtocolWorker(client, users.enrollment())
    claimer = start_claim(wapp, worker, waiting_threads)
    wid = worker_id_of(wapp, worker)

    asked = time.monotonic()
    r = client.post(f"/api/v1/admin/workers/{wid}/drain", headers=admin["headers"])
    assert r.status_code == 200
    claimer.join(WAIT_S + 5)
    status, answer = claimer.answer
    assert status == 200 and answer["drain"] is True and answer["jobs"] == []
    assert claimer.answered_at - asked < PROMPT_S


def test_a_requeued_job_wakes_a_waiting_worker(wapp, users, waiting_threads):
    """A worker found lost (by any worker's heartbeat or claim, or `jobcloud-proxy
    reap`): its job goes at once to the worker that is waiting, not at that
    worker's next claim."""
    alice = users.create("alice")
    client = wapp.test_client()
    lost = ProtocolWorker(client, users.enrollment(), name="lost")
    job = submit(client, alice["headers"])
    assert [j["id"] for j in lost.claim()] == [job["id"]]
    waiter = ProtocolWorker(client, users.enrollment(), name="waiter")
    claimer = start_claim(wapp, waiter, waiting_threads)

    cfg = wapp.extensions["jobcloud"].config
    asked = time.monotonic()
    late = cfg.lease_timeout_s + 1
    with wapp.extensions["jobcloud"].db.connection() as conn, conn.transaction(lock=PG_DISPATCH_LOCK):
        # `lost` went silent a lease ago (the waiter did not).
        conn.execute("UPDATE workers SET last_seen_at = last_seen_at - ? WHERE name = 'lost'", (late,))
        conn.execute("UPDATE jobs SET lease_expires_at = lease_expires_at - ? WHERE id = ?",
                     (late, job["id"]))
        assert workers.reap(conn, lease_timeout_s=cfg.lease_timeout_s,
                            max_attempts=cfg.max_attempts) == 1
    claimer.join(WAIT_S + 5)
    status, answer = claimer.answer
    assert status == 200 and [(j["id"], j["attempt"]) for j in answer["jobs"]] == [(job["id"], 2)]
    assert claimer.answered_at - asked < PROMPT_S


def test_a_rolled_back_change_wakes_nobody_and_a_committed_one_does(wapp, users, waiting_threads):
    client = wapp.test_client()
    worker = ProtocolWorker(client, users.enrollment())
    claimer = start_claim(wapp, worker, waiting_threads)
    listener = wapp.extensions["jobcloud"].wakeups
    topic = wakeups.worker_topic(worker_id_of(wapp, worker))
    [subscription] = listener._waiters[topic]

    with pytest.raises(RuntimeError), listener.db.connection() as conn, conn.transaction():
        wakeups.notify(conn, topic)
        raise RuntimeError("rolled back")
    assert not subscription._event.is_set() and claimer.answer is None

    with listener.db.connection() as conn, conn.transaction():
        wakeups.notify(conn, topic)
    claimer.join(WAIT_S + 5)
    assert claimer.answer[0] == 200


# --------------------------------------------------------------------- gunicorn

def _server(tmp_path, name: str, database_url: str, workers: int = 2, **settings) -> LiveServer:
    port = free_port()
    data = tmp_path / name
    env = dict(os.environ, JOBCLOUD_DATA_DIR=str(data), JOBCLOUD_BIND=f"127.0.0.1:{port}",
               JOBCLOUD_LOG_LEVEL="WARNING", JOBCLOUD_DATABASE_URL=database_url,
               **{f"JOBCLOUD_{k.upper()}": str(v) for k, v in settings.items()})
    env.pop("JOBCLOUD_CONFIG", None)
    return LiveServer(f"http://127.0.0.1:{port}", start_gunicorn(env, port, workers=workers),
                      env, data)


def _accounts(database_url: str, name: str = "alice") -> tuple[str, str, str]:
    """(user id, user token, enrollment token), straight in the store."""
    db = open_database(database_url)
    try:
        with db.connection() as conn, conn.transaction():
            user = accounts.create_user(conn, name, "correct-horse-1")
            _, token = accounts.create_token(conn, user["id"], "tests")
            _, enrollment = accounts.create_enrollment(conn, "tests", "tests")
    finally:
        db.close()
    return user["id"], token, enrollment


def _register(url: str, enrollment: str, name: str, images=("jobcloud/python",)) -> str:
    r = requests.post(f"{url}/api/v1/workers/register", headers={"Authorization": f"Bearer {enrollment}"},
                      json={"name": name, "cpus": 2, "memory_mb": 4096, "gpus": 0, "slots": 1,
                            "images": list(images)}, timeout=30)
    assert r.status_code == 201, r.text
    return r.json()["secret"]


def _open_request(url: str, head: str, body: bytes = b"") -> socket.socket:
    """Send one whole HTTP request on a new connection and leave it waiting for its answer."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(head.encode() + body)
    return sock


@pytest.fixture
def pg_or_sqlite_url(database_url, tmp_path):
    if database_url.startswith("sqlite"):
        return f"sqlite:///{tmp_path}/shared.db"
    return database_url


@pytest.mark.live
def test_hundreds_of_idle_long_polls_and_live_pages_leave_pages_answering(tmp_path, pg_or_sqlite_url):
    """200 idle workers long-polling and 200 open live pages: with a thread each
    (the gthread model: 2 processes x 8 threads) not one more request would be
    served; here a person's page and the API answer as usual."""
    url_db = pg_or_sqlite_url
    # The idle workers run no image the job asks: it must queue (issue 14 refuses it otherwise).
    server = _server(tmp_path, "a", url_db, queue_unmet_capacity="true")
    held: list[socket.socket] = []
    try:
        _, token, enrollment = _accounts(url_db)
        host = server.url.removeprefix("http://")
        body = json.dumps({"max_jobs": 1, "wait_s": 30}).encode()
        for i in range(200):
            secret = _register(server.url, enrollment, f"idle-{i}", images=("bench/none",))
            held.append(_open_request(server.url, (
                f"POST /api/v1/worker/claim HTTP/1.1\r\nHost: {host}\r\n"
                f"Authorization: Bearer {secret}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n"), body))
        for _ in range(200):
            held.append(_open_request(server.url, (
                f"GET /api/v1/users/alice/events HTTP/1.1\r\nHost: {host}\r\n"
                f"Authorization: Bearer {token}\r\nAccept: text/event-stream\r\n\r\n")))
        user = {"Authorization": f"Bearer {token}"}
        r = requests.post(f"{server.url}/api/v1/jobs", headers=user, files={"code": (None, "print(1)")},
                          timeout=10)
        assert r.status_code == 201, r.text
        for _ in range(20):
            page = requests.get(f"{server.url}/job-status/alice", headers={**user, "Accept": "application/json"},
                                timeout=5)
            assert page.status_code == 200 and page.json()["jobs"][0]["id"] == r.json()["id"]
        assert requests.get(f"{server.url}/healthz", timeout=5).status_code == 200
        # The long-polls are still waiting (none answered, none refused).
        for sock in held[:200]:
            sock.setblocking(False)
            with pytest.raises(BlockingIOError):
                sock.recv(1)
    finally:
        for sock in held:
            sock.close()
        stop_gunicorn(server.proc)


@pytest.mark.live
def test_a_job_submitted_at_one_instance_wakes_a_worker_waiting_at_another(tmp_path, pg_url):
    """Two proxy instances, separate processes, one PostgreSQL: pg_notify carries the wake-up."""
    _submit_at_a_wakes_claim_at_b(tmp_path, pg_url)


@pytest.mark.live
def test_on_sqlite_a_commit_in_another_process_wakes_the_waiter_without_polling(tmp_path):
    """Two servers on one host sharing one SQLite file, each process looking for
    others' commits only once a minute: the submission at A still reaches the
    claim waiting at B at once, through the signal file's inotify watch."""
    _submit_at_a_wakes_claim_at_b(tmp_path, f"sqlite:///{tmp_path}/shared.db", wakeup_poll_s=60)


def _submit_at_a_wakes_claim_at_b(tmp_path, url: str, **settings) -> None:
    pg_url = url
    a = _server(tmp_path, "a", pg_url, **settings)
    b = _server(tmp_path, "b", pg_url, **settings)
    try:
        _, token, enrollment = _accounts(pg_url)
        secret = _register(b.url, enrollment, "at-b")
        answer = {}

        def claim_at_b():
            r = requests.post(f"{b.url}/api/v1/worker/claim", headers={"Authorization": f"Bearer {secret}"},
                              json={"max_jobs": 1, "wait_s": WAIT_S}, timeout=WAIT_S + 10)
            answer.update(r.json(), at=time.monotonic())

        # The first claim finds nothing and waits; a second claim after it has
        # started cannot be told apart from the outside, so submit after the
        # worker's row shows the claim's touch.
        claimer = threading.Thread(target=claim_at_b, daemon=True)
        claimer.start()
        wait_until(lambda: _last_seen(pg_url, "at-b") is not None, what="the claim at B")
        submitted = time.monotonic()
        r = requests.post(f"{a.url}/api/v1/jobs", headers={"Authorization": f"Bearer {token}"},
                          files={"code": (None, "print(1)")}, timeout=10)
        assert r.status_code == 201, r.text
        claimer.join(WAIT_S + 15)
        assert [j["id"] for j in answer["jobs"]] == [r.json()["id"]]
        assert answer["at"] - submitted < PROMPT_S
    finally:
        stop_gunicorn(a.proc)
        stop_gunicorn(b.proc)


def _last_seen(database_url: str, name: str):
    db = open_database(database_url)
    try:
        with db.connection() as conn:
            row = conn.query_one("SELECT last_seen_at, registered_at FROM workers WHERE name = ?", (name,))
    finally:
        db.close()
    return row and (row["last_seen_at"] > row["registered_at"] or None)


@pytest.mark.live
def test_slow_clients_are_cut_off_and_do_not_starve_healthz(live_server):
    """300 clients sending their headers a byte at a time: /healthz still answers,
    and each is cut off once the head of its request took longer than keepalive (5 s)."""
    host = live_server.url.removeprefix("http://")
    slow = []
    try:
        for _ in range(300):
            sock = _open_request(live_server.url, f"GET /healthz HTTP/1.1\r\nHost: {host}\r\nX-Slow: ")
            slow.append(sock)
        started = time.monotonic()
        for _ in range(20):
            assert requests.get(f"{live_server.url}/healthz", timeout=5).status_code == 200

        def all_cut():
            for sock in slow:
                try:
                    sock.sendall(b"a")
                except OSError:
                    continue   # the server closed it
                sock.setblocking(False)
                try:
                    if sock.recv(1) != b"":
                        return False
                except BlockingIOError:
                    return False
                except OSError:
                    pass
                finally:
                    sock.setblocking(True)
            return True

        wait_until(all_cut, timeout=30, interval=0.5, what="the slow clients to be cut off")
        assert time.monotonic() - started < 30
    finally:
        for sock in slow:
            sock.close()
