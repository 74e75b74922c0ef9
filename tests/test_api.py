"""The user REST API (/api/v1): jobs, logs, outputs, cancel, scoped to their owner;
who may call what (users, workers, admins); /healthz and /metrics.

Jobs are driven through their life by `ProtocolWorker`, which speaks the real
worker protocol to the real app (register, claim, post a result); nothing in
the proxy is mocked.
"""
import io
import json
import zipfile

import pytest
from prometheus_client.parser import text_string_to_metric_families


class ProtocolWorker:
    """A worker that speaks the real HTTP worker protocol through a Flask test client."""

    def __init__(self, client, enrollment_token: str, name: str = "w1"):
        self.client = client
        r = client.post("/api/v1/workers/register", headers=_bearer(enrollment_token),
                        json={"name": name, "cpus": 4, "memory_mb": 4096, "gpus": 0, "slots": 4,
                              "images": ["jobcloud/python"]})
        assert r.status_code == 201, r.get_data(as_text=True)
        self.secret = r.json["secret"]
        self.headers = _bearer(self.secret)

    def claim(self, max_jobs: int = 1) -> list[dict]:
        r = self.client.post("/api/v1/worker/claim", headers=self.headers, json={"max_jobs": max_jobs})
        assert r.status_code == 200, r.get_data(as_text=True)
        return r.json["jobs"]

    def finish(self, job: dict, *, stdout: str = "", outputs: bytes | None = None,
               state: str = "succeeded", exit_code: int = 0) -> dict:
        """Post the final result of a claimed job, with an output archive when given."""
        result = {"attempt": job["attempt"], "state": state, "exit_code": exit_code,
                  "stdout": stdout, "wall_seconds": 0.5}
        url = f"/api/v1/worker/jobs/{job['id']}/result"
        if outputs is None:
            r = self.client.post(url, headers=self.headers, json=result)
        else:
            r = self.client.post(url, headers=self.headers, content_type="multipart/form-data",
                                 data={"result": json.dumps(result),
                                       "outputs": (io.BytesIO(outputs), "outputs.zip")})
        assert r.status_code == 200, r.get_data(as_text=True)
        return r.json


def _bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def submit(client, headers: dict, code: str = "print(1)", **fields) -> dict:
    r = client.post("/api/v1/jobs", headers=headers, content_type="multipart/form-data",
                    data={"code": code, **fields})
    assert r.status_code == 201, r.get_data(as_text=True)
    return r.json


def make_zip(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    return buf.getvalue()


@pytest.fixture
def alice(users):
    return users.create("alice")


@pytest.fixture
def bob(users):
    return users.create("bob")


@pytest.fixture
def worker(client, users):
    return ProtocolWorker(client, users.enrollment())


# ------------------------------------------------------------- the owner's view

def test_owner_submits_lists_reads_and_cancels_a_job(client, alice):
    job = submit(client, alice["headers"], name="first")
    assert job["state"] == "queued" and job["owner"] == "alice" and job["name"] == "first"
    assert client.get(job["links"]["self"], headers=alice["headers"]).json["id"] == job["id"]

    listed = client.get("/api/v1/jobs", headers=alice["headers"]).json
    assert [j["id"] for j in listed["jobs"]] == [job["id"]] and listed["next"] is None

    r = client.post(f"/api/v1/jobs/{job['id']}/cancel", headers=alice["headers"])
    assert r.status_code == 200 and r.json["state"] == "cancelled"
    r = client.post(f"/api/v1/jobs/{job['id']}/cancel", headers=alice["headers"])
    assert r.status_code == 409 and r.json["error"] == "job_finished"
    assert client.get("/api/v1/jobs?state=cancelled", headers=alice["headers"]).json["jobs"][0]["id"] \
        == job["id"]
    assert client.get("/api/v1/jobs?state=queued", headers=alice["headers"]).json["jobs"] == []


def test_cancel_of_a_running_job_is_passed_to_its_worker(client, alice, worker):
    job = submit(client, alice["headers"])
    [claimed] = worker.claim()
    r = client.post(f"/api/v1/jobs/{job['id']}/cancel", headers=alice["headers"])
    assert r.status_code == 200
    assert r.json["state"] == "running" and r.json["cancel_requested"] is True
    worker.finish(claimed, state="cancelled", exit_code=None)
    assert client.get(f"/api/v1/jobs/{job['id']}", headers=alice["headers"]).json["state"] == "cancelled"


def test_logs_and_outputs_of_a_finished_job(client, alice, worker):
    job = submit(client, alice["headers"])
    archive = make_zip({"model.txt": b"weights"})
    worker.finish(worker.claim()[0], stdout="epoch 1\nloss 0.1\n", outputs=archive)

    got = client.get(f"/api/v1/jobs/{job['id']}", headers=alice["headers"]).json
    assert got["state"] == "succeeded" and got["exit_code"] == 0
    assert got["outputs"]["size"] == len(archive)
    logs = client.get(f"/api/v1/jobs/{job['id']}/logs", headers=alice["headers"]).json
    assert logs["data"] == "epoch 1\nloss 0.1\n" and logs["state"] == "succeeded"
    assert client.get(f"/api/v1/jobs/{job['id']}/logs?stream=stderr",
                      headers=alice["headers"]).json["data"] == ""
    assert client.get(f"/api/v1/jobs/{job['id']}/logs?stream=env",
                      headers=alice["headers"]).status_code == 400

    r = client.get(f"/api/v1/jobs/{job['id']}/outputs", headers=alice["headers"])
    assert r.status_code == 200 and r.data == archive
    assert r.headers["Content-Type"] == "application/zip"
    assert r.headers["Content-Disposition"].startswith("attachment;")
    assert r.headers["X-Content-Type-Options"] == "nosniff"


def test_outputs_of_a_job_without_archive_are_404(client, alice):
    job = submit(client, alice["headers"])
    r = client.get(f"/api/v1/jobs/{job['id']}/outputs", headers=alice["headers"])
    assert r.status_code == 404 and r.json["error"] == "no_outputs"


def test_job_list_pages_with_limit_and_next(client, alice):
    ids = [submit(client, alice["headers"])["id"] for _ in range(5)]
    seen, url = [], "/api/v1/jobs?limit=2"
    while url:
        page = client.get(url, headers=alice["headers"]).json
        assert len(page["jobs"]) <= 2
        seen += [j["id"] for j in page["jobs"]]
        url = page["next"]
    assert sorted(seen) == sorted(ids) and len(seen) == len(set(seen))
    assert client.get("/api/v1/jobs?limit=0", headers=alice["headers"]).status_code == 400
    assert client.get("/api/v1/jobs?state=lost", headers=alice["headers"]).status_code == 400


# ---------------------------------------------------------- authorization matrix

def _job_endpoints(job_id: str) -> list[tuple[str, str]]:
    return [("GET", f"/api/v1/jobs/{job_id}"), ("GET", f"/api/v1/jobs/{job_id}/logs"),
            ("GET", f"/api/v1/jobs/{job_id}/outputs"), ("POST", f"/api/v1/jobs/{job_id}/cancel")]


def test_other_users_jobs_are_invisible(client, alice, bob, worker):
    job = submit(client, alice["headers"])
    worker.finish(worker.claim()[0], outputs=make_zip({"a": b"1"}))
    for method, url in _job_endpoints(job["id"]):
        r = client.open(url, method=method, headers=bob["headers"])
        assert r.status_code == 404, (method, url)
        assert r.json["error"] == "job_not_found"
    assert client.get("/api/v1/jobs", headers=bob["headers"]).json["jobs"] == []
    # Still there and untouched for its owner.
    assert client.get(f"/api/v1/jobs/{job['id']}", headers=alice["headers"]).json["state"] == "succeeded"


def test_admin_sees_and_cancels_any_job(client, users, alice):
    admin = users.create("root", admin=True)
    job = submit(client, alice["headers"])
    assert client.get(f"/api/v1/jobs/{job['id']}", headers=admin["headers"]).json["owner"] == "alice"
    r = client.post(f"/api/v1/jobs/{job['id']}/cancel", headers=admin["headers"])
    assert r.status_code == 200 and r.json["state"] == "cancelled"


USER_ENDPOINTS = [("GET", "/api/v1/me"), ("GET", "/api/v1/jobs"), ("POST", "/api/v1/jobs"),
                  ("GET", "/api/v1/tokens"), ("POST", "/api/v1/tokens"),
                  ("DELETE", "/api/v1/tokens/t1"), ("GET", "/api/v1/admin/users")]


@pytest.fixture
def bad_credentials(client, users, worker):
    """Authorization headers that must never pass as a user: name -> header value."""
    carol = users.create("carol")
    token_id = client.get("/api/v1/tokens", headers=carol["headers"]).json["tokens"][0]["id"]
    assert client.delete(f"/api/v1/tokens/{token_id}", headers=carol["headers"]).status_code == 200
    return {
        "none": None,
        "basic scheme": "Basic YWxpY2U6cGFzc3dvcmQ=",
        "bearer without token": "Bearer ",
        "bare token": carol["token"],
        "wrong token": "Bearer jcu_" + "x" * 43,
        "revoked token": f"Bearer {carol['token']}",
        "worker secret": f"Bearer {worker.secret}",
        "enrollment token": f"Bearer {users.enrollment()}",
    }


def test_user_endpoints_refuse_missing_or_invalid_credentials(client, alice, bad_credentials):
    job = submit(client, alice["headers"])
    for name, header in bad_credentials.items():
        headers = {"Authorization": header} if header is not None else {}
        for method, url in USER_ENDPOINTS + _job_endpoints(job["id"]):
            r = client.open(url, method=method, headers=headers)
            assert r.status_code == 401, (name, method, url, r.status_code)
            assert set(r.json) == {"error", "detail"}


def test_worker_endpoints_refuse_user_and_enrollment_tokens(client, users, alice, worker):
    job = submit(client, alice["headers"])
    [claimed] = worker.claim()
    enrollment = users.enrollment()
    endpoints = [("POST", "/api/v1/worker/heartbeat"), ("POST", "/api/v1/worker/claim"),
                 ("GET", f"/api/v1/worker/jobs/{job['id']}/script"),
                 ("GET", f"/api/v1/worker/jobs/{job['id']}/dataset"),
                 ("POST", f"/api/v1/worker/jobs/{job['id']}/logs"),
                 ("POST", f"/api/v1/worker/jobs/{job['id']}/result"),
                 ("POST", "/api/v1/worker/deregister")]
    for header in (None, f"Bearer {alice['token']}", f"Bearer {enrollment}", "Bearer jcw_wrong"):
        headers = {"Authorization": header} if header else {}
        for method, url in endpoints:
            body = {"attempt": claimed["attempt"], "state": "succeeded", "stream": "stdout",
                    "offset": 0, "data": "x"}
            r = client.open(url, method=method, headers=headers, json=body)
            assert r.status_code == 401, (header, method, url, r.status_code)
    # Registration takes an enrollment token, or a worker's own secret to
    # register that same worker again: never a user token, never another name.
    capacity = {"name": "w2", "cpus": 1, "memory_mb": 512, "gpus": 0, "slots": 1,
                "images": ["jobcloud/python"]}
    r = client.post("/api/v1/workers/register", headers=_bearer(alice["token"]), json=capacity)
    assert r.status_code == 401
    r = client.post("/api/v1/workers/register", headers=_bearer(worker.secret), json=capacity)
    assert r.status_code == 409 and r.json["error"] == "name_mismatch"
    # None of that disturbed the real lease.
    assert client.get(f"/api/v1/jobs/{job['id']}", headers=alice["headers"]).json["state"] == "running"


def test_admin_endpoints_refuse_non_admins(client, users, alice, worker):
    admin = users.create("root", admin=True)
    enrollment_id = client.get("/api/v1/admin/enrollment-tokens",
                               headers=admin["headers"]).json["enrollment_tokens"][0]["id"]
    worker_id = client.get("/api/v1/admin/workers", headers=admin["headers"]).json["workers"][0]["id"]
    endpoints = [("GET", "/api/v1/admin/users", None), ("POST", "/api/v1/admin/users", {"name": "eve"}),
                 ("GET", "/api/v1/admin/enrollment-tokens", None),
                 ("POST", "/api/v1/admin/enrollment-tokens", {}),
                 ("DELETE", f"/api/v1/admin/enrollment-tokens/{enrollment_id}", None),
                 ("GET", "/api/v1/admin/workers", None),
                 ("POST", f"/api/v1/admin/workers/{worker_id}/drain", None)]
    for method, url, body in endpoints:
        r = client.open(url, method=method, headers=alice["headers"], json=body)
        assert r.status_code == 403 and r.json["error"] == "admin_only", (method, url)
    names = [u["name"] for u in client.get("/api/v1/admin/users", headers=admin["headers"]).json["users"]]
    assert "eve" not in names
    r = client.post(f"/api/v1/admin/workers/{worker_id}/drain", headers=admin["headers"])
    assert r.status_code == 200 and r.json["state"] == "draining"


# --------------------------------------------------------------- ops endpoints

def test_healthz(client):
    r = client.get("/healthz")
    assert r.status_code == 200 and r.json == {"status": "ok"}


def _metrics(client) -> dict:
    r = client.get("/metrics")
    assert r.status_code == 200 and r.mimetype == "text/plain"
    samples = {}
    for family in text_string_to_metric_families(r.get_data(as_text=True)):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def test_metrics_follow_the_queue(client, alice, worker):
    before = _metrics(client)
    assert before[("jobcloud_jobs", (("state", "queued"),))] == 0
    assert before[("jobcloud_queue_depth", ())] == 0
    assert before[("jobcloud_workers", (("state", "active"),))] == 1
    assert before[("jobcloud_job_duration_seconds_count", ())] == 0

    for _ in range(3):
        submit(client, alice["headers"])
    queued = _metrics(client)
    assert queued[("jobcloud_jobs", (("state", "queued"),))] == 3
    assert queued[("jobcloud_queue_depth", ())] == 3

    worker.finish(worker.claim()[0])
    after = _metrics(client)
    assert after[("jobcloud_jobs", (("state", "queued"),))] == 2
    assert after[("jobcloud_jobs", (("state", "succeeded"),))] == 1
    assert after[("jobcloud_queue_depth", ())] == 2
    assert after[("jobcloud_job_duration_seconds_count", ())] == 1
    assert after[("jobcloud_job_duration_seconds_bucket", (("le", "+Inf"),))] == 1
    assert after[("jobcloud_job_duration_seconds_sum", ())] >= 0


METRICS_TOKEN = "m" * 40


@pytest.fixture
def metrics_app(make_config):
    from proxy import close_app, create_app

    application = create_app(make_config(metrics_token=METRICS_TOKEN))
    yield application
    close_app(application)


@pytest.mark.parametrize("authorization", [None, "Bearer " + "x" * 40, "Bearer " + METRICS_TOKEN[:-1],
                                           "Basic " + METRICS_TOKEN, METRICS_TOKEN])
def test_metrics_with_a_token_configured_refuse_a_missing_or_wrong_one(metrics_app, authorization):
    headers = {"Authorization": authorization} if authorization else {}
    # Loopback included: with a token set, the token is the only way in.
    r = metrics_app.test_client().get("/metrics", headers=headers)
    assert r.status_code == 401
    assert r.json["error"] == "metrics_token_required" and "metrics_token" in r.json["detail"]
    assert r.headers["WWW-Authenticate"].startswith("Bearer")


def test_metrics_with_a_token_configured_answer_it_from_anywhere(metrics_app):
    r = metrics_app.test_client().get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"},
                                      environ_base={"REMOTE_ADDR": "192.0.2.7"})
    assert r.status_code == 200 and "jobcloud_queue_depth" in r.get_data(as_text=True)


@pytest.mark.parametrize("address, status", [("127.0.0.1", 200), ("::1", 200), ("127.8.9.1", 200),
                                             ("192.0.2.7", 403), ("10.1.2.3", 403),
                                             ("::ffff:192.0.2.7", 403)])
def test_metrics_without_a_token_answer_loopback_clients_only(client, address, status):
    r = client.get("/metrics", environ_base={"REMOTE_ADDR": address})
    assert r.status_code == status
    if status == 403:
        assert r.json["error"] == "metrics_loopback_only"


def test_a_request_gunicorn_cannot_parse_gets_the_json_error_the_schema_documents(live_server):
    """A malformed header is refused by gunicorn's parser before any route: the
    answer is still `{"error", "detail"}` JSON and a status every operation
    documents (the fuzzer found gunicorn's HTML page here)."""
    import socket
    from urllib.parse import urlsplit

    from proxy.openapi import build_document
    host, port = urlsplit(live_server.url).hostname, urlsplit(live_server.url).port
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(b"GET /api/v1/jobs HTTP/1.1\r\nHost: x\r\ncontent-length: zMwB,U\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 "), head
    assert b"Content-Type: application/json" in head, head
    error = json.loads(body)
    assert error["error"] == "bad_request" and "CONTENT-LENGTH" in error["detail"].upper()
    spec = build_document()
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            assert "400" in operation["responses"], f"{method.upper()} {path}"
