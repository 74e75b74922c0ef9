"""Fuzz the live proxy against its own OpenAPI document (schemathesis).

One real gunicorn on a loopback port serves the whole module; schemathesis
reads GET /api/v1/openapi.json from it and sends generated requests to every
operation, as a user, as a worker and as an admin. Each answer must not be a
5xx, and its status code, content type and JSON body must be the ones the
document declares. Bounded and reproducible: a fixed number of examples per
operation, derandomized.

The store is seeded first so the generated requests find something to act on:
queued jobs, jobs a worker holds, a registered worker, tokens. The known ids
are mixed into the generated path parameters (a schema hook), so
`/api/v1/worker/jobs/{job_id}/...` reaches real held jobs, not only 404s.
"""
from __future__ import annotations

import io
import json
import os
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

from proxy import accounts, create_app
from proxy.config import load_config
from tests.conftest import free_port, login, start_gunicorn, stop_gunicorn

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, Phase, assume, given, settings  # noqa: E402  (after the importorskip)
from hypothesis import strategies as st  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance, response_schema_conformance, status_code_conformance)

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]

# Examples per operation and role: enough to reach each field's edge cases
# (wrong types, empty, huge, unicode), few enough that the module stays
# well under two minutes.
FUZZ = settings(max_examples=20, derandomize=True, deadline=None, database=None,
                phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))

IMAGE = "jobcloud/python"
CAPACITY = {"cpus": 4, "memory_mb": 8192, "gpus": 0, "slots": 4, "images": [IMAGE]}


@dataclass
class Seeded:
    """What the fuzzer is given: the server, credentials of each role, known ids."""

    url: str
    user_token: str
    admin_token: str
    enrollment_token: str
    worker_secret: str
    session_cookie: str
    known: dict = field(default_factory=dict)

    def bearer(self, token: str) -> dict:
        return {"Authorization": f"Bearer {token}"}

    def register_worker(self, name: str) -> dict:
        response = requests.post(f"{self.url}/api/v1/workers/register", json=dict(CAPACITY, name=name),
                                 headers=self.bearer(self.enrollment_token), timeout=10)
        assert response.status_code == 201, response.text
        return response.json()


@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("fuzz") / "data"
    port = free_port()
    # Long-polls are capped at half a second: a generated wait_s may ask for
    # the maximum on every example, and the run must stay bounded. A generated
    # requirements file is checked for syntax only: the fuzz run needs no network.
    env = dict(os.environ, JOBCLOUD_DATA_DIR=str(data_dir), JOBCLOUD_BIND=f"127.0.0.1:{port}",
               JOBCLOUD_LOG_LEVEL="WARNING", JOBCLOUD_CLAIM_WAIT_MAX_S="0.5",
               JOBCLOUD_PACKAGE_INDEX_CHECK="false")
    env.pop("JOBCLOUD_CONFIG", None)
    env.pop("JOBCLOUD_DATABASE_URL", None)
    proc = start_gunicorn(env, port, workers=2)
    try:
        yield _seed(f"http://127.0.0.1:{port}", data_dir)
    finally:
        stop_gunicorn(proc)


def _seed(url: str, data_dir: Path) -> Seeded:
    app = create_app(load_config(env={}, overrides={"data_dir": str(data_dir)}))
    db = app.extensions["jobcloud"].db
    try:
        with db.connection() as conn, conn.transaction():
            alice = accounts.create_user(conn, "alice", "correct-horse-1")
            root = accounts.create_user(conn, "root", "correct-horse-2", admin=True)
            _, user_token = accounts.create_token(conn, alice["id"], "fuzz")
            spare, _ = accounts.create_token(conn, alice["id"], "spare")
            _, admin_token = accounts.create_token(conn, root["id"], "fuzz")
            enrollment, enrollment_token = accounts.create_enrollment(conn, "fuzz", "root")
            spare_enrollment, _ = accounts.create_enrollment(conn, "spare", "root")
    finally:
        db.close()
    seeded = Seeded(url, user_token, admin_token, enrollment_token, "", _session_cookie(url))
    jobs = [_submit(seeded, f"job-{i}", with_dataset=i % 2 == 0) for i in range(6)]
    # A job array (proxy/arrays.py), so its routes meet a real one, not only 404s.
    array = _submit(seeded, "sweep", with_dataset=False, array="0-2%1")
    worker = seeded.register_worker("fuzz-worker")
    seeded.worker_secret = worker["secret"]
    claimed = requests.post(f"{url}/api/v1/worker/claim", json={"max_jobs": 3},
                            headers=seeded.bearer(worker["secret"]), timeout=10).json()["jobs"]
    assert len(claimed) == 3, claimed
    # A second worker for the admin actions (drain, resume, revoke) to act on,
    # so revoking it does not take the fuzzing worker's secret away.
    target = seeded.register_worker("admin-target")
    seeded.known = {
        "job_id": [j["id"] for j in jobs],
        "array_id": [array["id"]],
        "token_id": [spare["id"]],
        "enrollment_id": [spare_enrollment["id"]],
        "worker_id": [target["worker_id"]],
        "user": ["alice", "root"],
    }
    return seeded


def _submit(seeded: Seeded, name: str, with_dataset: bool, **fields: str) -> dict:
    files = {"script": ("main.py", b"print('hello')\n", "text/x-python")}
    if with_dataset:
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as archive:
            archive.writestr("data.csv", "a,b\n1,2\n")
        files["dataset"] = ("data.zip", buffer.getvalue(), "application/zip")
    response = requests.post(f"{seeded.url}/api/v1/jobs", files=files,
                             data={"name": name, "image": IMAGE, "cpus": "1", "memory_mb": "256",
                                   **fields},
                             headers=seeded.bearer(seeded.user_token), timeout=10)
    assert response.status_code == 201, response.text
    return response.json()


def _session_cookie(url: str) -> str:
    with requests.Session() as browser:
        page = browser.get(f"{url}/login", timeout=10).text
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
        response = browser.post(f"{url}/login", data={"username": "alice", "password": "correct-horse-1",
                                                       "csrf_token": csrf},
                                allow_redirects=False, timeout=10)
        assert response.status_code == 302, response.text
        return browser.cookies["jobcloud_session"]


@pytest.fixture(scope="module")
def api_schema(seeded):
    schema = schemathesis.openapi.from_url(f"{seeded.url}/api/v1/openapi.json")

    @schema.hook
    def before_generate_path_parameters(context, strategy):
        # Valid cases get known ids half of the time: random ids only ever
        # meet 404. Negative cases (wrapped values) keep their mutations.
        names = [p.name for p in context.operation.path_parameters if p.name in seeded.known]
        if not names:
            return strategy
        known = st.fixed_dictionaries({n: st.sampled_from(seeded.known[n]) for n in names})

        def mix(params):
            if not isinstance(params, dict):
                return st.just(params)
            return st.one_of(st.just(params), known.map(lambda ids: {**params, **ids}))

        return strategy.flatmap(mix)

    # Server-Sent Event streams stay open for about 25 s by design: each case
    # would wait that long. tests/test_live.py covers them, their errors included.
    return schema.exclude(path_regex=r"/events$")


def _credentials(case, seeded: Seeded, user_token: str) -> tuple[dict, dict]:
    """Headers and cookies for `case`, by the security scheme its operation declares."""
    security = case.operation.definition.raw.get("security") or []
    schemes = {name for requirement in security for name in requirement}
    if "workerSecret" in schemes:
        return seeded.bearer(seeded.worker_secret), {}
    if "enrollmentToken" in schemes:
        return seeded.bearer(seeded.enrollment_token), {}
    if "userToken" in schemes:
        return seeded.bearer(user_token), {}
    if "session" in schemes:
        return {}, {"jobcloud_session": seeded.session_cookie}
    return {}, {}


def fuzz(schema, credentials) -> None:
    """Run every operation's generated cases; fail with every operation that broke.

    schemathesis's own pytest integration (`from_fixture` + `parametrize`)
    reads a private pytest attribute that pytest 9.2 removed, so each
    operation is driven here with hypothesis directly, one `@given` per
    operation and generation mode.
    """
    failures = []
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            strategy = operation.as_strategy(generation_mode=mode, hooks=schema.hooks)

            @FUZZ
            @given(case=strategy)
            def run(case):
                headers, cookies = credentials(case)
                assert case.operation.base_url.startswith("http://127.0.0.1:")
                case.call_and_validate(headers=headers, cookies=cookies, checks=CHECKS,
                                       allow_redirects=False, timeout=15)

            try:
                run()
            except Unsatisfiable:
                # Nothing to mutate: the operation takes no input at all.
                assert mode is GenerationMode.NEGATIVE, operation.label
            except (Exception, BaseExceptionGroup) as e:  # noqa: BLE001 - reported below
                failures.append(f"{operation.label} [{mode.value}]: {e}")
    if failures:
        pytest.fail("\n\n".join(failures), pytrace=False)


@pytest.mark.live
def test_fuzz_as_user(api_schema, seeded):
    fuzz(api_schema, lambda case: _credentials(case, seeded, seeded.user_token))


@pytest.mark.live
def test_fuzz_as_worker(api_schema, seeded):
    def credentials(case):
        if case.operation.path == "/api/v1/worker/deregister":
            # Each deregistration retires its worker: give it a fresh one, so
            # the fuzzing worker keeps its secret for the other operations.
            worker = seeded.register_worker("short-lived")
            return seeded.bearer(worker["secret"]), {}
        return _credentials(case, seeded, seeded.user_token)

    fuzz(api_schema.include(tag="worker"), credentials)


@pytest.mark.live
def test_fuzz_as_admin(api_schema, seeded):
    fuzz(api_schema, lambda case: _credentials(case, seeded, seeded.admin_token))


# ------------------------------------------------- regressions the fuzzer found
# Kept as plain tests on the in-process app: fast, and they do not depend on
# the fuzzer drawing the same example again.

def test_non_ascii_csrf_token_is_a_403_not_a_500(client, users):
    alice = users.create("alice")
    login(client, alice["name"], alice["password"])
    r = client.post("/account/password", data={"csrf_token": "\x00\U000fc80a"})
    assert r.status_code == 403


@pytest.mark.parametrize("expires", ["1e300", "NaN", "Infinity", "-5", "0"])
def test_enrollment_expiry_out_of_range_is_refused_and_listing_still_works(client, users, expires):
    root = users.create("root", admin=True)
    r = client.post("/api/v1/admin/enrollment-tokens", data='{"expires_in_s": %s}' % expires,
                    content_type="application/json", headers=root["headers"])
    assert r.status_code == 400 and r.json["error"] == "invalid_enrollment"
    assert client.get("/api/v1/admin/enrollment-tokens", headers=root["headers"]).status_code == 200


@pytest.mark.parametrize("key, value", [
    ("exit_code", "100000000000000000000000"), ("cpu_seconds", "Infinity"), ("cpu_seconds", "NaN"),
    ("peak_memory_bytes", "Infinity"), ("peak_memory_bytes", "1e300"), ("wall_seconds", "1e308"),
])
def test_result_out_of_range_is_a_400_and_the_job_stays_valid_json(client, users, key, value):
    alice = users.create("alice")
    r = client.post("/api/v1/jobs", data={"code": "print(1)", "image": IMAGE},
                    content_type="multipart/form-data", headers=alice["headers"])
    assert r.status_code == 201, r.json
    job_id = r.json["id"]
    registered = client.post("/api/v1/workers/register", json=dict(CAPACITY, name="w1"),
                             headers={"Authorization": f"Bearer {users.enrollment()}"})
    worker = {"Authorization": f"Bearer {registered.json['secret']}"}
    [held] = client.post("/api/v1/worker/claim", json={"max_jobs": 1}, headers=worker).json["jobs"]
    assert held["id"] == job_id
    r = client.post(f"/api/v1/worker/jobs/{job_id}/result", content_type="application/json",
                    data='{"attempt": 1, "state": "succeeded", "%s": %s}' % (key, value),
                    headers=worker)
    assert r.status_code == 400 and r.json["error"] == "invalid_result"
    job = client.get(f"/api/v1/jobs/{job_id}", headers=alice["headers"])
    json.loads(job.get_data(as_text=True), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert job.json["state"] == "running"
