"""The worker protocol as one contract: the real `WorkerClient` against the
real proxy app served on a loopback port.

- The contract: the keys the proxy answers to a registration, a heartbeat, a
  claim and a result (with and without claim_next) are exactly the fields of
  the worker's answer dataclasses (worker/protocol.py), so a key the proxy
  adds and the worker ignores fails here. The claim answer's `cancel` and
  `drain` were ignored that way until issue 10.
- The orders ride on claim answers: a real worker daemon (real Sandbox, real
  Docker) whose heartbeats are ten minutes apart stops a cancelled job, and
  starts draining, within a claim round trip. Each test also checks that the
  worker's only heartbeat was the one at start, so nothing else told it.
- An answer that does not match the protocol raises the worker's
  ProtocolError (MalformedAnswer), never a KeyError or TypeError.
- With the S3 store (issue 17), a claimed job's inputs carry presigned
  `direct_url`s, the job says `outputs_upload: "direct"`, and the
  outputs-upload answer is exactly the worker's UploadTicket; with the local
  store, neither (tests/test_worker_s3.py moves the bytes).
"""
from __future__ import annotations

import dataclasses
import json
import os
import secrets
import threading
import typing
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import pytest
import requests
from werkzeug.serving import make_server

from proxy import close_app, create_app
from tests.conftest import Users, require, wait_until
from tests.test_worker_sandbox import IMAGE, docker_ready
from worker.client import Archive, ProtocolError, WorkerClient
from worker.config import load_config
from worker.daemon import Worker
from worker.errors import MalformedAnswer, WorkerError
from worker.protocol import ClaimAnswer, HeartbeatAnswer, RegisterAnswer, ResultAnswer, UploadTicket
from worker.sandbox import Policy, Sandbox

HEARTBEAT = "/api/v1/worker/heartbeat"


# ------------------------------------------------------------------ helpers

class Proxy:
    """The real proxy app served by werkzeug on a loopback port, with a user
    (alice) and an admin (root) who act on it over HTTP."""

    def __init__(self, app):
        self.app = app
        users = Users(app)
        self.alice = users.create("alice")
        self.root = users.create("root", admin=True)
        self.enrollment = users.enrollment
        self.server = make_server("127.0.0.1", 0, app, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       name="proxy", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.thread.join()
        self.server.server_close()
        close_app(self.app)

    def call(self, method: str, path: str, user: dict | None = None, **kwargs) -> dict:
        r = requests.request(method, self.url + path, headers=(user or self.alice)["headers"],
                             timeout=30, **kwargs)
        assert r.status_code in (200, 201), (path, r.status_code, r.text)
        return r.json()

    def submit(self, code: str) -> str:
        fields = {"code": code, "image": IMAGE, "timeout_s": 600, "memory_mb": 256}
        # Always multipart, as the API requires, even without a dataset.
        return self.call("POST", "/api/v1/jobs", files={k: (None, str(v)) for k, v in fields.items()})["id"]

    def job(self, job_id: str) -> dict:
        return self.call("GET", f"/api/v1/jobs/{job_id}")

    def stdout(self, job_id: str) -> str:
        return self.call("GET", f"/api/v1/jobs/{job_id}/logs", params={"stream": "stdout"})["data"]

    def cancel(self, job_id: str) -> dict:
        return self.call("POST", f"/api/v1/jobs/{job_id}/cancel")

    def worker_action(self, worker_id: str, action: str) -> dict:
        return self.call("POST", f"/api/v1/admin/workers/{worker_id}/{action}", user=self.root)


class Recorder(requests.Session):
    """A requests session that keeps every JSON answer with its path, so a
    test sees what the proxy said next to what the client made of it."""

    def __init__(self):
        super().__init__()
        self.answers: list[tuple[str, object]] = []
        self.hooks["response"].append(self._keep)

    def _keep(self, response, *args, **kwargs) -> None:
        # Only JSON: reading a blob download here would consume its stream.
        is_json = response.headers.get("Content-Type", "").startswith("application/json")
        self.answers.append((urlsplit(response.url).path, response.json() if is_json else None))

    def last(self) -> dict:
        return self.answers[-1][1]

    def calls(self, path: str) -> list:
        return [answer for p, answer in self.answers if p == path]


def wire_keys(cls, inline: bool = True) -> set[str]:
    """The JSON keys a protocol dataclass reads: its fields, with an inline
    field (a part of the answer read by a dataclass of its own) replaced by
    that dataclass's keys, or left out when `inline` is False (the answer
    came without that part)."""
    hints = typing.get_type_hints(cls)
    keys = set()
    for f in dataclasses.fields(cls):
        if not f.metadata.get("inline"):
            keys.add(f.name)
        elif inline:
            [part] = [t for t in typing.get_args(hints[f.name]) if dataclasses.is_dataclass(t)]
            keys |= wire_keys(part)
    return keys


def assert_same_keys(answer: dict, cls, inline: bool = True) -> None:
    read = wire_keys(cls, inline)
    ignored, missing = set(answer) - read, read - set(answer)
    assert not ignored and not missing, (
        f"{cls.__name__}: the proxy answers {sorted(ignored)} that the worker ignores, "
        f"and the worker reads {sorted(missing)} that the proxy does not answer")


@pytest.fixture
def make_proxy(make_config):
    started = []

    def make(**config) -> Proxy:
        proxy = Proxy(create_app(make_config(**config)))
        started.append(proxy)
        return proxy

    yield make
    for proxy in started:
        proxy.stop()


# ------------------------------------------------------------- the contract

def test_every_key_the_proxy_answers_is_a_field_the_worker_reads(make_proxy):
    proxy = make_proxy()
    session = Recorder()
    client = WorkerClient(proxy.url, session=session, timeout=10)

    registered = client.register(proxy.enrollment(), "contract", cpus=2, memory_mb=2048, gpus=0,
                                 slots=2, images=[IMAGE])
    assert_same_keys(session.last(), RegisterAnswer)
    assert (registered.worker_id, registered.secret) == (client.worker_id, client.secret)
    assert registered.heartbeat_interval_s == proxy.app.extensions["jobcloud"].config.heartbeat_interval_s

    first = proxy.submit("print(1)")
    second = proxy.submit("print(2)")
    assert client.heartbeat([]) == HeartbeatAnswer(cancel=(), unknown=(), drain=False)
    assert_same_keys(session.last(), HeartbeatAnswer)

    claimed = client.claim(max_jobs=1)
    assert_same_keys(session.last(), ClaimAnswer)
    assert [j["id"] for j in claimed.jobs] == [first] and (claimed.cancel, claimed.drain) == ((), False)
    held = claimed.jobs[0]
    # The local store: bytes through the proxy, both ways.
    assert held["outputs_upload"] == "proxy" and "direct_url" not in held["script"]

    # The orders, as both answers carry them.
    proxy.cancel(first)
    beat = client.heartbeat([first, "j-not-held"])
    assert_same_keys(session.last(), HeartbeatAnswer)
    assert (beat.cancel, beat.unknown, beat.drain) == ((first,), ("j-not-held",), False)
    assert client.claim(max_jobs=0) == ClaimAnswer(jobs=(), cancel=(first,), drain=False)
    assert_same_keys(session.last(), ClaimAnswer)
    proxy.worker_action(client.worker_id, "drain")
    assert client.heartbeat([first]).drain is True
    assert client.claim(max_jobs=0).drain is True
    assert_same_keys(session.last(), ClaimAnswer)
    proxy.worker_action(client.worker_id, "resume")

    # A result that claims its successor: the claim part has the claim's keys.
    done = client.post_result(first, {"attempt": held["attempt"], "state": "cancelled",
                                      "claim_next": 1})
    assert_same_keys(session.last(), ResultAnswer)
    assert (done.job_id, done.state, done.applied) == (first, "cancelled", True)
    assert done.claim is not None and [j["id"] for j in done.claim.jobs] == [second]
    assert (done.claim.cancel, done.claim.drain) == ((), False)

    # A result alone: no claim part.
    done = client.post_result(second, {"attempt": done.claim.jobs[0]["attempt"],
                                       "state": "succeeded", "exit_code": 0})
    assert_same_keys(session.last(), ResultAnswer, inline=False)
    assert (done.job_id, done.state, done.applied, done.claim) == (second, "succeeded", True, None)
    client.deregister()


def test_the_s3_stores_transfer_fields_are_fields_the_worker_reads(make_proxy, s3_settings,
                                                                   tmp_path):
    proxy = make_proxy(**s3_settings)
    session = Recorder()
    client = WorkerClient(proxy.url, session=session, timeout=10)
    client.register(proxy.enrollment(), "contract-s3", cpus=2, memory_mb=2048, gpus=0, slots=1,
                    images=[IMAGE])
    archive = tmp_path / "outputs.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("model.txt", "weights")
    job_id = proxy.call("POST", "/api/v1/jobs", files={
        "code": (None, "print(1)"), "image": (None, IMAGE),
        "dataset": ("data.zip", archive.read_bytes(), "application/zip")})["id"]

    [held] = client.claim(max_jobs=1).jobs
    assert held["id"] == job_id and held["outputs_upload"] == "direct"
    for key in ("script", "dataset"):
        # Presigned on the store itself; the proxy's route stays the way to a fresh one.
        assert held[key]["direct_url"].startswith(s3_settings["s3_endpoint_url"] + "/"), held[key]
        assert "X-Amz-Signature=" in held[key]["direct_url"]
        assert held[key]["url"] == f"/api/v1/worker/jobs/{job_id}/{key}"

    ticket = client.outputs_upload(job_id, held["attempt"], Archive.of(archive))
    assert_same_keys(session.last(), UploadTicket)
    assert ticket.method == "PUT" and ticket.url.startswith(s3_settings["s3_endpoint_url"] + "/")
    assert "x-amz-checksum-sha256" in ticket.headers and ticket.expires_in_s > 0


# ------------------------------------------------- orders on the claim answer

class Daemon:
    def __init__(self, proxy: Proxy, worker: Worker, session: Recorder):
        self.proxy = proxy
        self.worker = worker
        self.session = session

    def heartbeats(self) -> int:
        return len(self.session.calls(HEARTBEAT))


@pytest.fixture
def daemon(make_proxy, tmp_path):
    """A real worker daemon (2 slots, 1 s claim long-polls) in this process,
    against a proxy whose heartbeats are ten minutes apart: within a test, the
    heartbeat at start is the only one."""
    ok, reason = docker_ready()
    require(ok, reason)
    import docker

    proxy = make_proxy(heartbeat_interval_s=600, lease_timeout_s=1200)
    # Its own name: the sandbox removes containers labelled with it at start.
    name = f"protocol-{os.getpid()}-{secrets.token_hex(3)}"
    config = load_config(["--data-dir", str(tmp_path / "worker")], env={
        "JOBCLOUD_WORKER_PROXY_URL": proxy.url, "JOBCLOUD_WORKER_ENROLLMENT_TOKEN": proxy.enrollment(),
        "JOBCLOUD_WORKER_NAME": name, "JOBCLOUD_WORKER_SLOTS": "2", "JOBCLOUD_WORKER_IMAGES": IMAGE,
        "JOBCLOUD_WORKER_CLAIM_WAIT_S": "1", "JOBCLOUD_WORKER_GRACE_S": "5",
        "JOBCLOUD_WORKER_BACKOFF_MAX_S": "1"})
    engine = docker.from_env(timeout=60)
    sandbox = Sandbox(engine, owner=name, policy=Policy(
        pids_limit=config.pids_limit, tmpfs_mb=config.tmpfs_mb, nofile=config.nofile,
        fsize_bytes=config.fsize_bytes))
    session = Recorder()
    worker = Worker(config, WorkerClient(proxy.url, session=session), sandbox)
    exit_codes = []
    thread = threading.Thread(target=lambda: exit_codes.append(worker.work()), name="worker", daemon=True)
    thread.start()
    try:
        wait_until(lambda: session.calls(HEARTBEAT) or not thread.is_alive(), timeout=30,
                   what="the worker's first heartbeat")
        assert thread.is_alive(), f"the worker stopped at start: exit code {exit_codes}"
        yield Daemon(proxy, worker, session)
    finally:
        worker.request_stop(now=True)
        thread.join(timeout=60)
        sandbox.remove_leftovers()  # whatever a failed test left running
        engine.close()
    assert not thread.is_alive(), "the worker did not stop"


def test_a_cancel_reaches_a_busy_worker_on_the_claim_answer(daemon):
    proxy = daemon.proxy
    job_id = proxy.submit("import time\nprint('started', flush=True)\ntime.sleep(600)")
    wait_until(lambda: "started" in proxy.stdout(job_id), timeout=60, what="the job to run")
    proxy.cancel(job_id)
    # The free slot's claim long-poll answers within a second or so; the next
    # heartbeat is ten minutes away.
    job = wait_until(lambda: (j := proxy.job(job_id))["state"] != "running" and j, timeout=20,
                     what="the cancel to reach the worker")
    assert job["state"] == "cancelled", job
    assert daemon.heartbeats() == 1, "a heartbeat, not the claim answer, carried the cancel"


def test_a_drain_reaches_a_worker_on_the_claim_answer(daemon):
    assert daemon.worker.draining is False
    daemon.proxy.worker_action(daemon.worker.client.worker_id, "drain")
    # The drain ends the waiting claim at once; its answer says drain.
    wait_until(lambda: daemon.worker.draining, timeout=10, what="the worker to drain")
    assert daemon.heartbeats() == 1, "a heartbeat, not the claim answer, carried the drain"


# --------------------------------------------------------- malformed answers

JOB = {"id": "j1", "attempt": 1, "image": IMAGE}
ORDERS = {"cancel": [], "drain": False}
WHO = {"worker_id": "w1", "secret": "s"}
DONE = {"job_id": "j1", "state": "succeeded"}
SOURCE = {"url": "/api/v1/worker/jobs/j1/dataset", "sha256": "0" * 64}
TICKET = {"url": "http://127.0.0.1:8333/b/o?X-Amz-Signature=s", "method": "PUT",
          "headers": {"x-amz-checksum-sha256": "c"}, "expires_in_s": 900}


@pytest.mark.parametrize("cls, answer, problem", [
    (RegisterAnswer, {**WHO, "heartbeat_interval_s": 10}, "missing 'lease_timeout_s'"),
    (RegisterAnswer, {**WHO, "heartbeat_interval_s": True, "lease_timeout_s": 45}, "positive number"),
    (RegisterAnswer, {**WHO, "heartbeat_interval_s": 0, "lease_timeout_s": 45}, "positive number"),
    (HeartbeatAnswer, [], "a JSON object"),
    (HeartbeatAnswer, {"cancel": [], "drain": False}, "missing 'unknown'"),
    (HeartbeatAnswer, {"cancel": "j1", "unknown": [], "drain": False}, "list of job ids"),
    (HeartbeatAnswer, {"cancel": [1], "unknown": [], "drain": False}, "list of job ids"),
    (HeartbeatAnswer, {"cancel": [], "unknown": [], "drain": "yes"}, "true or false"),
    (ClaimAnswer, {"jobs": []}, "missing 'cancel'"),
    (ClaimAnswer, {"jobs": None, **ORDERS}, "must be a list"),
    (ClaimAnswer, {"jobs": ["j1"], **ORDERS}, "a JSON object"),
    (ClaimAnswer, {"jobs": [{"id": "j1", "image": IMAGE}], **ORDERS}, "missing 'attempt'"),
    (ClaimAnswer, {"jobs": [dict(JOB, attempt=True)], **ORDERS}, "must be an integer"),
    (ClaimAnswer, {"jobs": [dict(JOB, id=7)], **ORDERS}, "must be a string"),
    (ResultAnswer, DONE, "missing 'applied'"),
    (ResultAnswer, {**DONE, "applied": 1}, "true or false"),
    # A claim part without its orders.
    (ResultAnswer, {**DONE, "applied": True, "jobs": [JOB]}, "missing 'cancel'"),
    # Where a job's bytes come from and go to (issue 17).
    (ClaimAnswer, {"jobs": [dict(JOB, outputs_upload="elsewhere")], **ORDERS}, "outputs_upload"),
    (ClaimAnswer, {"jobs": [dict(JOB, script={"url": "/s"})], **ORDERS}, "missing 'sha256'"),
    (ClaimAnswer, {"jobs": [dict(JOB, script={"url": "/s", "sha256": "AB"})], **ORDERS},
     "64 hex digits"),
    (ClaimAnswer, {"jobs": [dict(JOB, dataset=dict(SOURCE, direct_url="/not/absolute"))],
                   **ORDERS}, "absolute http"),
    (ClaimAnswer, {"jobs": [dict(JOB, requirements=dict(SOURCE, direct_url="file:///etc/passwd"))],
                   **ORDERS}, "absolute http"),
    (ClaimAnswer, {"jobs": [dict(JOB, after=[{"outputs": dict(SOURCE, direct_url=7)}])],
                   **ORDERS}, r"after\[0\].outputs: 'direct_url' must be a string"),
    (UploadTicket, {**TICKET, "method": "POST"}, "must be PUT"),
    (UploadTicket, {**TICKET, "url": "/relative"}, "absolute http"),
    (UploadTicket, {**TICKET, "headers": {"x-amz-checksum-sha256": 1}}, "map names to strings"),
    (UploadTicket, {**TICKET, "headers": {"Authorization": "Bearer x"}}, "Authorization"),
    (UploadTicket, {k: v for k, v in TICKET.items() if k != "expires_in_s"},
     "missing 'expires_in_s'"),
])
def test_a_malformed_answer_is_a_protocol_error(cls, answer, problem):
    with pytest.raises(MalformedAnswer, match=problem) as info:
        cls.from_json(answer)
    assert isinstance(info.value, ProtocolError) and isinstance(info.value, WorkerError)


def test_well_formed_answers_parse():
    assert ClaimAnswer.from_json({"jobs": [JOB], "cancel": ["j0"], "drain": True}) == \
        ClaimAnswer(jobs=(JOB,), cancel=("j0",), drain=True)
    direct = dict(JOB, outputs_upload="direct", script=dict(SOURCE, direct_url=TICKET["url"]),
                  dataset=None, after=[{"outputs": None}, {"outputs": SOURCE}])
    assert ClaimAnswer.from_json({"jobs": [direct], **ORDERS}).jobs == (direct,)
    assert UploadTicket.from_json(TICKET) == UploadTicket(
        url=TICKET["url"], method="PUT", headers=TICKET["headers"], expires_in_s=900.0)
    assert ResultAnswer.from_json({"job_id": "j1", "state": "failed", "applied": False}).claim is None


class _Answers(BaseHTTPRequestHandler):
    """POST answers 200 with the body the server was given."""

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body, kind = self.server.body
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.mark.parametrize("body, kind, problem", [
    (b"<html>a gateway's page</html>", "text/html", "not JSON"),
    (json.dumps({"cancel": [], "drain": False}).encode(), "application/json", "missing 'unknown'"),
])
def test_the_client_turns_a_malformed_answer_into_a_protocol_error(body, kind, problem):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Answers)
    server.body = (body, kind)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client = WorkerClient(f"http://127.0.0.1:{server.server_address[1]}", secret="s", timeout=10)
        with pytest.raises(MalformedAnswer, match=problem):
            client.heartbeat([])
    finally:
        server.shutdown()
        server.server_close()
