"""Webhooks: a signed POST when a job finishes, to allow-listed hosts only, retried
with backoff, delivered at least once and never sent twice by two processes.

Jobs are completed through the real worker protocol (test_dispatch's Hub); the
receiver is a real HTTP server on 127.0.0.1 in a thread. Every test runs on
SQLite and on PostgreSQL.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests

from proxy import webhooks
from proxy.config import load_config
from proxy.db import open_database
from proxy.errors import ConfigError, ValidationError
from tests.conftest import (LiveServer, free_port, require, start_gunicorn, stop_gunicorn,
                            wait_until)
from tests.test_dispatch import make_hub  # noqa: F401  (fixture)

JOBCLOUD = str(Path(sys.executable).parent / "jobcloud")
FAST = {"webhook_allowed_hosts": "127.0.0.1", "webhook_backoff_s": 0.05, "webhook_poll_s": 0.02}


class Receiver:
    """A loopback HTTP server that records every POST and answers from a script of statuses."""

    def __init__(self, statuses=(), delay_s: float = 0.0, location: str | None = None,
                 on_post=None, tls: ssl.SSLContext | None = None):
        self.requests: list[dict] = []
        self.statuses = list(statuses)
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                request = {"path": self.path, "headers": dict(self.headers), "body": body}
                if on_post is not None:
                    on_post(request)
                receiver.requests.append(request)
                time.sleep(delay_s)  # the receiver at work: what a slow receiver looks like
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                self.send_response(status)
                if location:
                    self.send_header("Location", location)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.server.server_address[1]}/hook"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receivers():
    made = []

    def make(**kwargs) -> Receiver:
        made.append(Receiver(**kwargs))
        return made[-1]

    yield make
    for r in made:
        r.close()


@pytest.fixture
def whub(make_hub):  # noqa: F811
    hub = make_hub(**FAST)
    yield hub
    hub.app.extensions["jobcloud_webhooks"].stop()


def run_job(hub, webhook_url: str, worker=None) -> str:
    """Submit a job with a webhook and complete it through the worker API."""
    job_id = hub.submit(webhook_url=webhook_url)
    worker = worker or hub.register("w1")
    [job] = worker.claim()
    r = worker.result(job_id, job["attempt"], cpu_seconds=1.5, wall_seconds=2.0,
                      peak_memory_bytes=1000)
    assert r.status_code == 200, r.get_json()
    return job_id


def webhook_state(hub, job_id: str) -> dict:
    return hub.job(job_id)["webhook"]


def admin_view(hub, job_id: str) -> dict:
    """The job's delivery as the admin API shows it, with why its last attempt failed."""
    r = hub.client.get(f"/api/v1/admin/webhook-deliveries?job={job_id}",
                       headers=hub.admin["headers"])
    assert r.status_code == 200, r.get_json()
    [delivery] = r.get_json()["deliveries"]
    return delivery


def expected_signature(secret: str, request: dict) -> str:
    signed = request["headers"]["X-Jobcloud-Timestamp"].encode() + b"." + request["body"]
    return "sha256=" + hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()


def user_secret(hub) -> str:
    r = hub.client.get("/api/v1/webhook-secret", headers=hub.alice["headers"])
    assert r.status_code == 200
    return r.get_json()["secret"]


def test_a_finished_job_is_posted_once_with_a_valid_signature(whub, receivers):
    receiver = receivers()
    job_id = run_job(whub, receiver.url)

    done = wait_until(lambda: webhook_state(whub, job_id)["state"] == "delivered"
                      and webhook_state(whub, job_id), what="delivery")
    assert done["attempts"] == 1 and done["last_status"] == 200
    assert len(receiver.requests) == 1
    request = receiver.requests[0]
    headers = request["headers"]
    assert headers["X-Jobcloud-Signature"] == expected_signature(user_secret(whub), request)
    assert abs(int(headers["X-Jobcloud-Timestamp"]) - time.time()) < 60
    assert headers["X-Jobcloud-Delivery"] == done["delivery_id"]
    assert headers["Content-Type"] == "application/json"
    body = json.loads(request["body"])
    assert body["event"] == "job.finished" and body["delivery_id"] == done["delivery_id"]
    assert body["job"]["id"] == job_id and body["job"]["state"] == "succeeded"
    assert body["job"]["usage"]["cpu_seconds"] == 1.5
    # A signature made with another secret does not match: the check is real.
    assert headers["X-Jobcloud-Signature"] != expected_signature("whsec_other", request)


def test_a_host_not_on_the_allow_list_is_refused_at_submission(whub, receivers):
    receiver = receivers()
    port = receiver.server.server_address[1]
    for url in ("http://example.com/hook", f"http://localhost:{port}/hook",
                "http://10.0.0.1/hook", f"http://127.0.0.1.example.com:{port}/"):
        r = whub.client.post("/api/v1/jobs", headers=whub.alice["headers"],
                             data={"code": "print(1)", "webhook_url": url},
                             content_type="multipart/form-data")
        assert r.status_code == 400, url
        assert r.get_json()["error"] == "webhook_not_allowed"
        assert "webhook_allowed_hosts" in r.get_json()["detail"]
    for url in ("ftp://127.0.0.1/hook", "file:///etc/passwd", "http://user:pw@127.0.0.1/h",
                "not a url"):
        r = whub.client.post("/api/v1/jobs", headers=whub.alice["headers"],
                             data={"code": "print(1)", "webhook_url": url},
                             content_type="multipart/form-data")
        assert r.status_code == 400 and r.get_json()["error"] == "webhook_not_allowed", url
    listed = whub.client.get("/api/v1/jobs", headers=whub.alice["headers"]).get_json()
    assert listed["jobs"] == []
    assert receiver.requests == []


def test_webhooks_are_refused_when_no_host_is_allow_listed(make_hub):  # noqa: F811
    hub = make_hub()
    r = hub.client.post("/api/v1/jobs", headers=hub.alice["headers"],
                        data={"code": "print(1)", "webhook_url": "http://127.0.0.1:9/hook"},
                        content_type="multipart/form-data")
    assert r.status_code == 400
    assert "webhook_allowed_hosts is empty" in r.get_json()["detail"]
    assert "jobcloud_webhooks" not in hub.app.extensions


def test_a_failing_receiver_gets_the_same_notice_again_until_it_accepts(whub, receivers):
    receiver = receivers(statuses=[500])
    job_id = run_job(whub, receiver.url)

    done = wait_until(lambda: webhook_state(whub, job_id)["state"] == "delivered"
                      and webhook_state(whub, job_id), what="delivery after a retry")
    assert done["attempts"] == 2 and done["last_status"] == 200
    first, second = receiver.requests
    assert first["body"] == second["body"]
    assert first["headers"]["X-Jobcloud-Delivery"] == second["headers"]["X-Jobcloud-Delivery"]
    secret = user_secret(whub)
    for request in (first, second):
        assert request["headers"]["X-Jobcloud-Signature"] == expected_signature(secret, request)


def test_redirects_are_not_followed_and_attempts_are_bounded(make_hub, receivers):  # noqa: F811
    target = receivers()
    redirecting = receivers(statuses=[302, 302], location=target.url)
    hub = make_hub(**dict(FAST, webhook_max_attempts=2))
    try:
        job_id = run_job(hub, redirecting.url)
        done = wait_until(lambda: webhook_state(hub, job_id)["state"] == "failed"
                          and webhook_state(hub, job_id), what="delivery given up")
    finally:
        hub.app.extensions["jobcloud_webhooks"].stop()
    assert done["attempts"] == 2 and done["last_error"] == webhooks.DELIVERY_FAILED
    assert (admin_view(hub, job_id)["last_status"], admin_view(hub, job_id)["last_error_detail"]) \
        == (302, "HTTP 302")
    assert len(redirecting.requests) == 2 and target.requests == []


def test_a_pending_notice_survives_a_restart_and_two_processes_send_it_once(
        whub, receivers, database_url, make_config):
    # The first process stops before the job ends: its notice waits in the database.
    whub.app.extensions["jobcloud_webhooks"].stop()
    receiver = receivers(delay_s=0.3)
    job_id = run_job(whub, receiver.url)
    assert webhook_state(whub, job_id)["state"] == "pending"

    # Two new processes on the same database pass over it at the same moment.
    cfg = make_config(database_url=database_url, **FAST)
    dbs = [open_database(cfg.resolved_database_url) for _ in range(2)]
    deliverers = [webhooks.Deliverer.from_config(db, cfg) for db in dbs]
    start = threading.Barrier(2)
    sent = []

    def pass_over(d):
        start.wait()
        sent.append(d.run_once())

    threads = [threading.Thread(target=pass_over, args=(d,)) for d in deliverers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for d, db in zip(deliverers, dbs):
        d.stop()
        db.close()

    assert sorted(sent) == [0, 1]
    assert len(receiver.requests) == 1
    assert webhook_state(whub, job_id)["state"] == "delivered"


def complete_over_http(api: requests.Session, url: str, enrollment: str, job_id: str) -> None:
    """Register a worker, claim the job and report it succeeded, over the worker HTTP API."""
    r = api.post(f"{url}/api/v1/workers/register",
                 headers={"Authorization": f"Bearer {enrollment}"},
                 json={"name": "w", "cpus": 2, "memory_mb": 4096, "gpus": 0, "slots": 1,
                       "images": ["jobcloud/python"]})
    assert r.status_code == 201, r.text
    worker = {"Authorization": f"Bearer {r.json()['secret']}"}
    [claimed] = api.post(f"{url}/api/v1/worker/claim", headers=worker,
                         json={"max_jobs": 1, "wait_s": 0}).json()["jobs"]
    assert claimed["id"] == job_id
    r = api.post(f"{url}/api/v1/worker/jobs/{job_id}/result", headers=worker,
                 json={"attempt": claimed["attempt"], "state": "succeeded", "exit_code": 0,
                       "cpu_seconds": 0.2, "wall_seconds": 0.5})
    assert r.status_code == 200, r.text


def live_proxy(tmp_path, workers: int = 2) -> LiveServer:
    """The real proxy under gunicorn on a loopback port, webhooks to 127.0.0.1 allowed."""
    port = free_port()
    env = dict(os.environ, JOBCLOUD_DATA_DIR=str(tmp_path / "live"),
               JOBCLOUD_BIND=f"127.0.0.1:{port}", JOBCLOUD_LOG_LEVEL="WARNING",
               JOBCLOUD_WEBHOOK_ALLOWED_HOSTS="127.0.0.1", JOBCLOUD_WEBHOOK_POLL_S="0.05")
    env.pop("JOBCLOUD_CONFIG", None)
    env.pop("JOBCLOUD_DATABASE_URL", None)
    proc = start_gunicorn(env, port, workers=workers)
    return LiveServer(f"http://127.0.0.1:{port}", proc, env, tmp_path / "live")


def test_cli_submit_with_webhook_under_gunicorn_is_delivered_once(tmp_path, receivers):
    """`jobcloud submit --webhook` against the real proxy (2 gunicorn processes, each
    with its delivery thread); the job completed through the worker HTTP API."""
    receiver = receivers()
    server = live_proxy(tmp_path)
    try:
        server.admin("user", "add", "dana")
        token = re.search(r"jcu_\S+", server.admin("token", "create", "--user", "dana")).group(0)
        enrollment = server.admin("enroll", "create")
        client_env = dict(os.environ, JOBCLOUD_CLIENT_CONFIG=str(tmp_path / "client.json"))

        def jobcloud(*args):
            return subprocess.run([JOBCLOUD, *args], env=client_env, capture_output=True,
                                  text=True, timeout=60, cwd=tmp_path)

        assert jobcloud("login", server.url, "--token", token).returncode == 0
        (tmp_path / "job.py").write_text("print('hi')\n")
        refused = jobcloud("submit", "job.py", "--webhook", "http://example.com/hook")
        assert refused.returncode != 0 and "webhook_allowed_hosts" in refused.stderr
        out = jobcloud("submit", "job.py", "--webhook", receiver.url, "--json")
        assert out.returncode == 0, out.stderr
        job = json.loads(out.stdout)
        assert job["webhook"] == {"url": receiver.url, "state": "waiting_for_job"}

        api = requests.Session()
        complete_over_http(api, server.url, enrollment, job["id"])

        def delivered():
            j = api.get(f"{server.url}/api/v1/jobs/{job['id']}",
                        headers={"Authorization": f"Bearer {token}"}).json()
            return j["webhook"]["state"] == "delivered" and j

        final = wait_until(delivered, what="the webhook delivered")
        # Once every process has stopped (each stops its sender first), nothing
        # more can be sent: the receiver's count is then final.
        stop_gunicorn(server.proc)
        assert len(receiver.requests) == 1
        assert receiver.requests[0]["headers"]["X-Jobcloud-Delivery"] == \
            final["webhook"]["delivery_id"]
    finally:
        stop_gunicorn(server.proc)


@pytest.mark.parametrize("hosts", ["http://example.org", "example.org/hook", "example.org:8080",
                                   "*.", "*.*.example.org", "exa mple.org", "*.10.0.0.1"])
def test_the_allow_list_takes_only_host_names_and_addresses(hosts):
    with pytest.raises(ConfigError, match="webhook_allowed_hosts"):
        load_config(env={}, overrides={"webhook_allowed_hosts": hosts})


def test_the_allow_list_matches_names_case_insensitively_and_subdomains_by_pattern():
    cfg = load_config(env={}, overrides={
        "webhook_allowed_hosts": "Hooks.Example.org, *.lab.example, 127.0.0.1, ::1"})
    assert cfg.webhook_allowed_hosts == ("hooks.example.org", "*.lab.example", "127.0.0.1", "::1")
    allowed = cfg.webhook_allowed_hosts
    for url in ("https://HOOKS.example.org/x", "http://a.lab.example:8080/x",
                "http://b.c.lab.example/", "http://127.0.0.1:9/", "http://[::1]:9/"):
        assert webhooks.check_url(url, allowed) == url
    for url in ("https://lab.example/x", "https://evil-lab.example/", "http://127.0.0.2/",
                "https://hooks.example.org.evil.test/"):
        with pytest.raises(ValidationError):
            webhooks.check_url(url, allowed)


# ------------------------------------------------- claims, deadlines, addresses

def deliverer(hub, allowed_hosts=("127.0.0.1",), **settings) -> webhooks.Deliverer:
    """A delivery pass of its own on the hub's database (the hub's thread stopped first)."""
    hub.app.extensions["jobcloud_webhooks"].stop()
    settings = dict(dict(max_attempts=3, backoff_s=0.05, timeout_s=2.0, poll_s=1.0), **settings)
    return webhooks.Deliverer(hub.app.extensions["jobcloud"].db, allowed_hosts=allowed_hosts,
                              **settings)


def test_in_a_slow_pass_every_notice_stays_claimed_while_it_is_sent(whub, receivers):
    """A pass sends its notices one after another: each claim must cover its own
    send, or another process could take the notice mid-send and post it again."""
    db = whub.app.extensions["jobcloud"].db
    claim_live = []

    def check_claim(request):
        with db.connection() as conn:
            row = conn.query_one("SELECT claimed_until FROM webhook_deliveries WHERE id = ?",
                                 (request["headers"]["X-Jobcloud-Delivery"],))
        claim_live.append(row["claimed_until"] > time.time())

    receiver = receivers(delay_s=0.4, on_post=check_claim)
    passer = deliverer(whub, timeout_s=0.8, claim_grace_s=0.05)
    worker = whub.register("w1")
    jobs = [run_job(whub, receiver.url, worker) for _ in range(4)]

    assert passer.run_once() == 4
    assert claim_live == [True] * 4
    assert [webhook_state(whub, j)["state"] for j in jobs] == ["delivered"] * 4
    assert len(receiver.requests) == 4


def test_a_claimer_whose_claim_expired_does_not_overwrite_the_next_attempts_outcome(
        whub, receivers):
    receiver = receivers(statuses=[200, 500])
    late, other = deliverer(whub), deliverer(whub)
    job_id = run_job(whub, receiver.url)
    delivery_id = webhook_state(whub, job_id)["delivery_id"]
    with whub.app.extensions["jobcloud"].db.connection() as conn:
        stale = late._claim(conn, delivery_id, due_by=time.time())
        # Its claim runs out before it sends (a stalled process) ...
        conn.execute("UPDATE webhook_deliveries SET claimed_until = 0 WHERE id = ?", (delivery_id,))
        # ... so another process takes the next attempt and delivers it ...
        assert other.run_once() == 1
        # ... and the stale attempt, answered 500, must not turn it back to pending.
        late._attempt(conn, stale)
    state = webhook_state(whub, job_id)
    assert (state["state"], state["attempts"], state["last_status"]) == ("delivered", 2, 200)
    assert len(receiver.requests) == 2


class Trickler:
    """A receiver that reads the request, then sends its answer one byte every 50 ms."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}/hook"
        self.hung_up = threading.Event()  # the sender closed the connection
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        conn, _ = self.listener.accept()
        with conn:
            conn.recv(65536)
            try:
                conn.sendall(b"HTTP/1.1 200 OK\r\nX-Slow: ")
                while not self.done.wait(0.05):
                    conn.sendall(b"a")
            except OSError:
                self.hung_up.set()

    def close(self):
        self.done.set()
        self.thread.join(5)
        self.listener.close()


def test_an_attempt_ends_at_its_deadline_however_slowly_the_receiver_answers(whub):
    trickler = Trickler()
    try:
        passer = deliverer(whub, timeout_s=0.5)
        job_id = run_job(whub, trickler.url)
        started = time.monotonic()
        assert passer.run_once() == 1
        elapsed = time.monotonic() - started
        wait_until(trickler.hung_up.is_set, timeout=5, what="the connection to be closed")
    finally:
        trickler.close()
    assert elapsed < 1.5, f"the attempt took {elapsed:.1f}s with a 0.5s deadline"
    state = webhook_state(whub, job_id)
    assert (state["state"], state["last_error"], state["last_status"]) == \
        ("pending", webhooks.DELIVERY_FAILED, None)
    assert admin_view(whub, job_id)["last_error_detail"].startswith("timeout")


class Silent:
    """A port that accepts connections (the kernel's backlog) and never answers: what a
    filtered port or a stuck service looks like to the sender, but for the handshake."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}/hook"

    def close(self):
        self.listener.close()


class Banner:
    """A port whose service answers with its own banner, not HTTP (an SSH server, say)."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}/hook"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return  # closed without a connection
        with conn:
            conn.sendall(b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n")
            conn.recv(65536)

    def close(self):
        self.listener.close()
        self.thread.join(5)


def test_users_see_one_category_whichever_way_a_port_fails_and_admins_see_why(whub, receivers):
    """Closed, filtered, a banner, an HTTP server's 404: four answers that would map an
    allowed host's ports. The job's owner reads the same for each; the admin reads why."""
    silent, banner, web = Silent(), Banner(), receivers(statuses=[404])
    try:
        passer = deliverer(whub, max_attempts=1, timeout_s=0.3)
        worker = whub.register("w1")
        jobs = {"closed": run_job(whub, f"http://127.0.0.1:{free_port()}/hook", worker),
                "filtered": run_job(whub, silent.url, worker),
                "banner": run_job(whub, banner.url, worker),
                "http 404": run_job(whub, web.url, worker)}
        assert passer.run_once() == 4
    finally:
        silent.close()
        banner.close()
    seen = {}
    for port, job_id in jobs.items():
        state = webhook_state(whub, job_id)
        seen[port] = (state["state"], state["attempts"], state["last_error"], state["last_status"])
        text = json.dumps(state).lower()
        # \b404\b: the URL's random port may hold the digits 404 (e.g. 34045).
        assert not re.search(r"refused|timeout|timed out|invalid|\b404\b|ssh|tls", text), text
    assert set(seen.values()) == {("failed", 1, webhooks.DELIVERY_FAILED, None)}, seen

    details = {port: admin_view(whub, job_id)["last_error_detail"] for port, job_id in jobs.items()}
    assert details["closed"].startswith("connection refused: ConnectionRefusedError")
    assert details["filtered"].startswith("timeout")
    assert details["banner"].startswith("invalid HTTP response")
    assert details["http 404"] == "HTTP 404"
    assert admin_view(whub, jobs["http 404"])["last_status"] == 404
    # The admin API is the admin's: the job's owner gets 403.
    r = whub.client.get("/api/v1/admin/webhook-deliveries", headers=whub.alice["headers"])
    assert r.status_code == 403


@pytest.mark.parametrize("query", ["state=lost", "job=" + "x" * 65])
def test_the_admin_delivery_list_refuses_bad_filters(whub, query):
    r = whub.client.get(f"/api/v1/admin/webhook-deliveries?{query}", headers=whub.admin["headers"])
    assert r.status_code == 400 and r.get_json()["error"] in ("invalid_state", "invalid_job")


def test_a_name_resolving_to_loopback_is_reached_only_when_that_address_is_listed(
        make_hub, receivers):  # noqa: F811
    """The allow-list names a host, but its DNS decides the address: a listed name
    pointing at a non-public address is refused unless the admin listed that address."""
    receiver = receivers()
    port = receiver.server.server_address[1]
    hub = make_hub(**dict(FAST, webhook_allowed_hosts="localhost"))
    job_id = run_job(hub, f"http://localhost:{port}/hook")  # the name passes at submission

    assert deliverer(hub, allowed_hosts=("localhost",)).run_once() == 1
    state = webhook_state(hub, job_id)
    assert (state["state"], state["last_error"]) == ("pending", webhooks.DELIVERY_FAILED)
    assert admin_view(hub, job_id)["last_error_detail"].startswith("address not allowed")
    assert receiver.requests == []

    assert deliverer(hub, allowed_hosts=("localhost", "127.0.0.1")).run_once(
        now=time.time() + 60) == 1
    assert webhook_state(hub, job_id)["state"] == "delivered"
    # Sent to the checked address, addressed to the name in the URL.
    [request] = receiver.requests
    assert request["headers"]["Host"] == f"localhost:{port}"


def test_https_goes_to_the_checked_address_and_checks_the_names_certificate(
        make_hub, receivers, tmp_path, monkeypatch):  # noqa: F811
    require(shutil.which("openssl") is not None, "the openssl command (apt-get install openssl)")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key,
                    "-out", cert, "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost"], check=True, capture_output=True)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    receiver = receivers(tls=tls)
    url = f"https://localhost:{receiver.server.server_address[1]}/hook"
    hub = make_hub(**dict(FAST, webhook_allowed_hosts="localhost, 127.0.0.1"))
    passer = deliverer(hub, allowed_hosts=hub.config.webhook_allowed_hosts, max_attempts=1)
    worker = hub.register("w1")

    untrusted = run_job(hub, url, worker)
    assert passer.run_once() == 1
    assert webhook_state(hub, untrusted)["last_error"] == webhooks.DELIVERY_FAILED
    assert admin_view(hub, untrusted)["last_error_detail"].startswith("TLS error")
    assert receiver.requests == []

    # Trusted, the certificate is checked for the URL's name although the
    # connection goes to the address it resolved to.
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    trusted = run_job(hub, url, worker)
    assert passer.run_once() == 1
    assert webhook_state(hub, trusted)["state"] == "delivered"
    assert [r["headers"]["Host"] for r in receiver.requests] == [url.split("/")[2]]


@pytest.mark.parametrize("address", [
    "127.0.0.1", "127.1.2.3", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254",
    "100.64.0.1", "0.0.0.0", "224.0.0.1", "240.0.0.1", "255.255.255.255", "::1", "::",
    "fe80::1", "fc00::1", "ff02::1", "::ffff:127.0.0.1", "::ffff:169.254.169.254"])
def test_non_public_addresses_need_an_exact_entry(address):
    names = ("hooks.example.org", "*.example.org")
    assert not webhooks.address_allowed(address, names)
    assert webhooks.address_allowed(address, names + (address,))
    assert not webhooks.address_allowed(address, names + ("10.9.9.9",))


def test_public_addresses_are_allowed_for_listed_names():
    for address in ("93.184.215.14", "2606:4700:4700::1111", "::ffff:93.184.215.14"):
        assert webhooks.address_allowed(address, ("hooks.example.org",))


def test_a_graceful_shutdown_waits_for_the_post_in_flight(tmp_path, receivers):
    # Longer than gunicorn takes to stop a worker, within webhook_timeout_s (10 s).
    receiver = receivers(delay_s=4)
    server = live_proxy(tmp_path, workers=1)
    try:
        server.admin("user", "add", "erin")
        token = re.search(r"jcu_\S+", server.admin("token", "create", "--user", "erin")).group(0)
        api = requests.Session()
        r = api.post(f"{server.url}/api/v1/jobs", headers={"Authorization": f"Bearer {token}"},
                     files={"code": (None, "print(1)"), "webhook_url": (None, receiver.url)})
        assert r.status_code == 201, r.text
        complete_over_http(api, server.url, server.admin("enroll", "create"), r.json()["id"])
        wait_until(lambda: receiver.requests, what="the POST to start")
    finally:
        stop_gunicorn(server.proc)  # SIGTERM while the receiver is still answering
    assert server.proc.returncode == 0

    db = open_database(load_config(env=server.env).resolved_database_url)
    try:
        with db.connection() as conn:
            delivery = conn.query_one("SELECT state, attempts, last_status FROM webhook_deliveries")
    finally:
        db.close()
    assert delivery == {"state": "delivered", "attempts": 1, "last_status": 200}
    assert len(receiver.requests) == 1


def test_close_app_stops_the_sender_and_sweeper_and_the_store_stays_closed(
        make_config, database_url):
    from proxy import close_app, create_app
    app = create_app(make_config(database_url=database_url, **FAST))
    threads = [app.extensions[name]._thread for name in ("jobcloud_webhooks", "jobcloud_retention")]
    assert all(t.is_alive() for t in threads)

    close_app(app)

    assert [t.is_alive() for t in threads] == [False, False]
    assert app.extensions["jobcloud"].db.closed   # nothing opened it again


def test_a_sender_whose_store_was_closed_stops_by_itself(make_config, tmp_path):
    from proxy import close_app, create_app
    app = create_app(make_config(database_url=f"sqlite:///{tmp_path}/store.db"))
    db = app.extensions["jobcloud"].db
    sender = webhooks.Deliverer(db, allowed_hosts=("127.0.0.1",), max_attempts=1, backoff_s=1,
                                timeout_s=1, poll_s=0.02)
    try:
        sender.start()
        db.close()
        wait_until(lambda: not sender._thread.is_alive(), timeout=10,
                   what="the sender to stop once its store was closed")
    finally:
        sender.stop()
        close_app(app)
