"""The worker protocol end to end: round-robin claims, capacity matching, leases,
heartbeats, results, cancel, drain, logs and input downloads.

Every test runs on SQLite and on a real PostgreSQL (`database_url`). Users and
workers talk to the real Flask app through its test client; where a test needs
time to pass (a lease running out) it calls the proxy's scheduler and workers with `now=` instead
of sleeping, or uses a lease of one second and waits on the condition.
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
import random
import threading
import time
import zipfile

import pytest

from proxy import (accounts, begin_shutdown, close_app, create_app, scheduler, store, worker_api,
                   workers)
from proxy.blobs import StoredBlob
from proxy.models import WorkerState
from tests.conftest import Users, wait_until

ALL_IMAGES = ["jobcloud/python", "jobcloud/ml"]
CODE = "print('hello from jobcloud')\n"


class Worker:
    """One registered worker, speaking the worker protocol with its secret."""

    def __init__(self, hub: "Hub", name: str, worker_id: str, secret: str):
        self.hub, self.name, self.id, self.secret = hub, name, worker_id, secret
        self.headers = {"Authorization": f"Bearer {secret}"}

    def post(self, path: str, body: dict | None = None):
        return self.hub.client.post(f"/api/v1/worker/{path}", headers=self.headers,
                                    json=body if body is not None else {})

    def get(self, url: str):
        return self.hub.client.get(url, headers=self.headers)

    def claim(self, max_jobs: int = 1) -> list[dict]:
        r = self.post("claim", {"max_jobs": max_jobs, "wait_s": 0})
        assert r.status_code == 200, r.get_json()
        return r.get_json()["jobs"]

    def heartbeat(self, running=()) -> dict:
        r = self.post("heartbeat", {"running": list(running)})
        assert r.status_code == 200, r.get_json()
        return r.get_json()

    def result(self, job_id: str, attempt: int, state: str = "succeeded", **extra):
        return self.post(f"jobs/{job_id}/result", dict(
            {"attempt": attempt, "state": state, "exit_code": 0 if state == "succeeded" else 1},
            **extra))

    def log(self, job_id: str, attempt: int, offset: int, data: str, stream: str = "stdout"):
        return self.post(f"jobs/{job_id}/logs", {"attempt": attempt, "stream": stream,
                                                 "offset": offset, "data": data})

    def row(self) -> dict:
        return self.hub.call(workers.get_worker, self.id)


class Hub:
    """The proxy under test: users submit through the API, workers poll it."""

    def __init__(self, app):
        self.app = app
        self.config = app.extensions["jobcloud"].config
        self.client = app.test_client()
        self.users = Users(app)
        self.alice = self.users.create("alice")
        self.enrollment = self.users.enrollment()

    # Made on first use: hashing a password is the slowest part of a setup.
    @functools.cached_property
    def bob(self) -> dict:
        return self.users.create("bob")

    @functools.cached_property
    def admin(self) -> dict:
        return self.users.create("root", admin=True)

    @property
    def lease(self) -> dict:
        return {"lease_timeout_s": self.config.lease_timeout_s,
                "max_attempts": self.config.max_attempts}

    def call(self, fn, *args, **kwargs):
        """Run a proxy function on a fresh connection of the app's store."""
        with self.app.extensions["jobcloud"].db.connection() as conn:
            return fn(conn, *args, **kwargs)

    def submit(self, user: dict | None = None, code: str = CODE, **fields) -> str:
        data = {"code": code, **{k: v if isinstance(v, tuple) else str(v) for k, v in fields.items()}}
        r = self.client.post("/api/v1/jobs", headers=(user or self.alice)["headers"], data=data,
                             content_type="multipart/form-data")
        assert r.status_code == 201, r.get_json()
        return r.get_json()["id"]

    def job(self, job_id: str, user: dict | None = None) -> dict:
        r = self.client.get(f"/api/v1/jobs/{job_id}", headers=(user or self.alice)["headers"])
        assert r.status_code == 200, r.get_json()
        return r.get_json()

    def row(self, job_id: str) -> dict:
        return self.call(store.get_job, job_id)

    def cancel(self, job_id: str, user: dict | None = None):
        return self.client.post(f"/api/v1/jobs/{job_id}/cancel",
                                headers=(user or self.alice)["headers"])

    def logs(self, job_id: str, stream: str = "stdout", offset: int = 0) -> dict:
        r = self.client.get(f"/api/v1/jobs/{job_id}/logs?stream={stream}&offset={offset}",
                            headers=self.alice["headers"])
        assert r.status_code == 200, r.get_json()
        return r.get_json()

    def admin_action(self, worker: Worker, action: str, user: dict | None = None):
        return self.client.post(f"/api/v1/admin/workers/{worker.id}/{action}",
                                headers=(user or self.admin)["headers"])

    def register(self, name: str, **capacity) -> Worker:
        r = self.client.post("/api/v1/workers/register",
                             headers={"Authorization": f"Bearer {self.enrollment}"},
                             json=_capacity(name, **capacity))
        assert r.status_code == 201, r.get_json()
        body = r.get_json()
        return Worker(self, name, body["worker_id"], body["secret"])

    def register_at(self, name: str, now: float, **capacity) -> Worker:
        """Register a worker as if at time `now` (for tests that move the clock)."""
        with self.app.extensions["jobcloud"].db.connection() as conn:
            enrollment = accounts.enrollment_for_token(conn, self.enrollment, now)
            row, secret = workers.register_worker(
                conn, enrollment, name, worker_api.parse_capacity(_capacity(name, **capacity)),
                now=now, **self.lease)
        return Worker(self, name, row["id"], secret)

    def claimed_at(self, name: str, now: float) -> tuple[str, Worker]:
        """A new job, claimed at time `now` by a new worker `name` (attempt 1)."""
        job_id = self.submit()
        worker = self.register_at(name, now)
        assert [(j["id"], j["attempt"]) for j in self.claim_at(worker, now)] == [(job_id, 1)]
        return job_id, worker

    def claim_at(self, worker: Worker, now: float, max_jobs: int = 1) -> list[dict]:
        return self.call(workers.claim, worker.row(), max_jobs, now=now, **self.lease)

    def heartbeat_at(self, worker: Worker, running, now: float) -> dict:
        return self.call(workers.heartbeat, worker.row(), list(running), now=now, **self.lease).json()


def _capacity(name: str, cpus: float = 4, memory_mb: int = 8192, gpus: int = 0, slots: int = 4,
              images=tuple(ALL_IMAGES)) -> dict:
    return {"name": name, "cpus": cpus, "memory_mb": memory_mb, "gpus": gpus, "slots": slots,
            "images": list(images)}


def ids(jobs) -> list[str]:
    return sorted(j["id"] for j in jobs)


def zip_bytes(**members: str) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, text in members.items():
            zf.writestr(name, text)
    return buf.getvalue()


@pytest.fixture
def make_hub(database_url, make_config):
    apps = []

    def make(**config) -> Hub:
        app = create_app(make_config(database_url=database_url, log_level="WARNING", **config))
        apps.append(app)
        return Hub(app)

    yield make
    for app in apps:
        close_app(app)


@pytest.fixture
def hub(make_hub) -> Hub:
    return make_hub()


# ------------------------------------------------------------------ round-robin

def test_jobs_go_round_robin_whatever_order_the_workers_poll_in(hub):
    workers = [hub.register(f"w{i}", slots=8) for i in range(3)]
    jobs = [hub.submit() for _ in range(9)]

    # w0 polls five times before anyone else; then the others, out of order.
    got = {w.name: [] for w in workers}
    for i in [0, 0, 0, 0, 0, 2, 2, 1, 1, 1, 1, 2, 2]:
        got[workers[i].name] += workers[i].claim(max_jobs=1)

    assert {name: len(js) for name, js in got.items()} == {"w0": 3, "w1": 3, "w2": 3}
    holder = {j["id"]: name for name, js in got.items() for j in js}
    assert sorted(holder) == sorted(jobs)
    rotation = [holder[j] for j in sorted(jobs)]  # the dispatcher serves jobs in id order
    assert len(set(rotation[:3])) == 3 and rotation == rotation[:3] * 3

    # A second round, polled in a random order with random batch sizes, goes on
    # with the same rotation.
    for name, js in got.items():
        w = next(w for w in workers if w.name == name)
        for j in js:
            assert w.result(j["id"], j["attempt"]).status_code == 200
    second = [hub.submit() for _ in range(9)]
    rng = random.Random(7)
    holder2 = {}
    for _ in range(200):
        if len(holder2) == 9:
            break
        w = rng.choice(workers)
        for j in w.claim(max_jobs=rng.randint(1, 3)):
            assert j["id"] not in holder2
            holder2[j["id"]] = w.name
    assert sorted(holder2) == sorted(second)
    assert [holder2[j] for j in sorted(second)] == rotation[:3] * 3


def test_a_job_only_goes_to_a_worker_that_can_run_it(make_hub):
    # Jobs no live worker can run yet must be accepted to queue (issue 14 refuses them).
    hub = make_hub(queue_unmet_capacity=True)
    small = hub.register("small", cpus=2, memory_mb=2048, gpus=0, slots=8,
                         images=["jobcloud/python"])
    # The head of the queue: jobs `small` cannot run, each for another reason.
    blocked = {
        "gpu": hub.submit(gpus=1),
        "image": hub.submit(image="jobcloud/ml"),
        "cpus": hub.submit(cpus=4),
        "memory": hub.submit(memory_mb=4096),
    }
    runnable = [hub.submit() for _ in range(3)]

    assert ids(small.claim(max_jobs=8)) == sorted(runnable)
    assert small.claim(max_jobs=8) == []
    for job_id in blocked.values():
        job = hub.job(job_id)
        assert (job["state"], job["attempt"]) == ("queued", 0)

    gpu = hub.register("gpu", cpus=2, memory_mb=2048, gpus=1, images=["jobcloud/python"])
    assert ids(gpu.claim(max_jobs=8)) == [blocked["gpu"]]
    big = hub.register("big", cpus=8, memory_mb=8192, gpus=0, images=ALL_IMAGES)
    assert ids(big.claim(max_jobs=8)) == sorted([blocked["image"], blocked["cpus"],
                                                 blocked["memory"]])
    assert small.claim(max_jobs=8) == [] and gpu.claim(max_jobs=8) == []


def test_an_unrunnable_head_longer_than_one_dispatch_batch_does_not_block_the_queue(make_hub):
    # Jobs no live worker can run yet must be accepted to queue (issue 14 refuses them).
    hub = make_hub(queue_unmet_capacity=True)
    # Each job fits the free workers' combined limits (one has the GPU, the
    # other the memory) but neither worker alone.
    gpu_small = hub.register("gpu-small", gpus=1, memory_mb=2048)
    big = hub.register("big-no-gpu", gpus=0, memory_mb=16384)
    template = hub.row(hub.submit(gpus=1, memory_mb=8192))
    with hub.app.extensions["jobcloud"].db.connection() as conn, conn.transaction():
        for _ in range(scheduler.DISPATCH_BATCH + 10):
            store.create_job(conn, store.NewJob(
                owner_id=hub.alice["id"], name="needs-both", script_name="main.py",
                script=StoredBlob(template["script_sha256"], template["script_size"]),
                image="jobcloud/python", cpus=1, memory_mb=8192, timeout_s=60, gpus=1))
    runnable = hub.submit()

    assert ids(gpu_small.claim(max_jobs=4) + big.claim(max_jobs=4)) == [runnable]


def test_a_worker_without_images_gets_nothing_and_breaks_nothing(make_hub):
    # Jobs no live worker can run yet must be accepted to queue (issue 14 refuses them).
    hub = make_hub(queue_unmet_capacity=True)
    bare = hub.register("bare", images=[])
    hub.submit()
    assert bare.claim(max_jobs=4) == []
    full = hub.register("full")
    assert len(full.claim(max_jobs=4)) == 1


# ----------------------------------------------------------------------- leases

def test_a_silent_worker_is_lost_and_its_job_requeued_until_max_attempts(hub):
    T = hub.config.lease_timeout_s
    assert hub.config.max_attempts == 3
    t = time.time()
    job_id, a = hub.claimed_at("a", t)

    # Just inside a's lease nobody else gets the job.
    b = hub.register_at("b", t + T - 2)
    assert hub.claim_at(b, t + T - 1) == []
    assert a.row()["state"] == WorkerState.ACTIVE.value

    # Past it, the next poll marks a lost and hands the job on as attempt 2.
    assert [(j["id"], j["attempt"]) for j in hub.claim_at(b, t + T + 1)] == [(job_id, 2)]
    assert a.row()["state"] == WorkerState.LOST.value
    job = hub.job(job_id)
    assert (job["state"], job["attempt"], job["worker_id"]) == ("running", 2, b.id)

    c = hub.register_at("c", t + 2 * T)
    assert [j["attempt"] for j in hub.claim_at(c, t + 2 * T + 2)] == [3]
    assert b.row()["state"] == WorkerState.LOST.value

    d = hub.register_at("d", t + 3 * T + 2)
    assert hub.claim_at(d, t + 3 * T + 3) == []
    job = hub.job(job_id)
    assert (job["state"], job["failure_reason"], job["attempt"]) == ("failed", "worker lost", 3)
    assert job["finished_at"] is not None

    # A lost worker's secret is dead, and the answer says why: it must register again.
    r = a.post("heartbeat", {"running": [job_id]})
    assert (r.status_code, r.get_json()["error"]) == (401, "worker_lost")


def test_a_revoked_worker_is_not_invited_to_register_again(hub):
    a = hub.register("a")
    r = hub.admin_action(a, "revoke")
    assert r.status_code == 200 and r.get_json()["state"] == "revoked"
    r = a.post("heartbeat", {"running": []})
    assert (r.status_code, r.get_json()["error"]) == (401, "worker_revoked")


def test_lease_expiry_through_the_api_with_a_short_lease(make_hub):
    hub = make_hub(lease_timeout_s=1.0, heartbeat_interval_s=0.2, max_attempts=2)
    job_id = hub.submit()
    a = hub.register("a")
    assert [j["attempt"] for j in a.claim()] == [1]

    b = hub.register("b")
    # b keeps polling; a says nothing, so its lease runs out and b gets the job.
    taken = wait_until(lambda: b.claim(), timeout=10, what="b to get silent a's job")
    assert [(j["id"], j["attempt"]) for j in taken] == [(job_id, 2)]
    assert a.post("heartbeat", {"running": [job_id]}).status_code == 401

    c = hub.register("c")

    def settled():
        assert c.claim() == [], "a job past max_attempts was handed out again"
        return hub.job(job_id)["state"] != "running"

    wait_until(settled, timeout=10, what="b's lease to run out")
    job = hub.job(job_id)
    assert (job["state"], job["failure_reason"]) == ("failed", "worker lost")


def test_a_cancelled_job_of_a_lost_worker_is_cancelled_not_requeued(hub):
    T = hub.config.lease_timeout_s
    t = time.time()
    job_id, a = hub.claimed_at("a", t)
    assert hub.cancel(job_id).get_json()["cancel_requested"] is True
    b = hub.register_at("b", t + T)
    assert hub.claim_at(b, t + T + 1) == []
    job = hub.job(job_id)
    assert (job["state"], job["attempt"]) == ("cancelled", 1)


def test_registering_again_under_the_same_name_replaces_the_old_worker(hub):
    old = hub.register("node-1")
    job_id = hub.submit()
    assert [j["attempt"] for j in old.claim()] == [1]

    new = hub.register("node-1")  # the daemon restarted and lost its secret
    assert old.post("heartbeat", {"running": [job_id]}).status_code == 401
    assert old.row()["state"] == WorkerState.GONE.value
    assert [(j["id"], j["attempt"]) for j in new.claim()] == [(job_id, 2)]


def test_heartbeats_extend_the_lease(hub):
    T = hub.config.lease_timeout_s
    t = time.time()
    job_id, a = hub.claimed_at("a", t)
    for k in (1, 2, 3):
        assert hub.heartbeat_at(a, [job_id], t + k * (T - 5)) == \
            {"cancel": [], "unknown": [], "drain": False}
    last = t + 3 * (T - 5)
    assert hub.row(job_id)["lease_expires_at"] == pytest.approx(last + T)

    # Long past the lease the claim gave, the job is still a's.
    b = hub.register_at("b", last)
    assert hub.claim_at(b, last + T - 1) == []
    job = hub.job(job_id)
    assert (job["state"], job["attempt"], job["worker_id"]) == ("running", 1, a.id)


def test_a_job_the_worker_never_learned_of_expires_despite_heartbeats(hub):
    # The answer to a claim was lost on the way: the proxy thinks a holds the
    # job, a does not know it. a's heartbeats (which list what it runs) must
    # not keep that job alive; it is requeued when its lease runs out.
    T = hub.config.lease_timeout_s
    t = time.time()
    job_id, a = hub.claimed_at("a", t)
    for late in (10, 5):
        hub.heartbeat_at(a, [], t + T - late)
    assert hub.row(job_id)["lease_expires_at"] == pytest.approx(t + T)
    # The claim's lease ran out: requeued, and handed out again as attempt 2.
    assert [(j["id"], j["attempt"]) for j in hub.claim_at(a, t + T + 1)] == [(job_id, 2)]


def test_a_result_can_claim_the_next_job_in_the_same_request(hub):
    a = hub.register("a", slots=1)
    first, second = hub.submit(), hub.submit()
    [job] = a.claim()
    assert job["id"] == first
    r = a.result(first, job["attempt"], claim_next=1)
    assert r.status_code == 200, r.get_json()
    body = r.get_json()
    assert (body["state"], body["applied"]) == ("succeeded", True)
    assert [(j["id"], j["attempt"]) for j in body["jobs"]] == [(second, 1)]
    assert hub.job(second)["state"] == "running"
    # Nothing left: the answer says so, and a bad value is refused before anything is stored.
    r = a.result(second, 1, claim_next=1)
    assert r.get_json()["jobs"] == []
    third = hub.submit()
    [job] = a.claim()
    r = a.result(third, job["attempt"], claim_next=-1)
    assert (r.status_code, r.get_json()["error"]) == (400, "invalid_result")
    assert hub.job(third)["state"] == "running"


def test_heartbeat_reports_jobs_the_worker_does_not_hold(hub):
    a = hub.register("a", slots=1)
    mine = hub.submit()
    assert ids(a.claim()) == [mine]
    b = hub.register("b")
    theirs = hub.submit()
    assert ids(b.claim()) == [theirs]

    answer = a.heartbeat([mine, theirs, "j-never-existed"])
    assert answer == {"cancel": [], "unknown": sorted([theirs, "j-never-existed"]), "drain": False}


# ---------------------------------------------------------------------- results

def test_stale_results_are_refused_and_duplicates_are_harmless(hub):
    T = hub.config.lease_timeout_s
    t = time.time()
    job_id, a = hub.claimed_at("a", t)
    # a keeps polling but its heartbeats for the job stop arriving: the lease
    # runs out, the job is requeued and a itself gets it again as attempt 2.
    assert hub.claim_at(a, t + T - 1, max_jobs=0) == []
    assert [j["attempt"] for j in hub.claim_at(a, t + T + 1)] == [2]

    r = a.result(job_id, attempt=1)
    assert (r.status_code, r.get_json()["error"]) == (409, "stale_lease")
    assert (hub.job(job_id)["state"], hub.job(job_id)["attempt"]) == ("running", 2)

    b = hub.register("b")
    r = b.result(job_id, attempt=2)
    assert (r.status_code, r.get_json()["error"]) == (409, "stale_lease")
    assert hub.job(job_id)["state"] == "running"

    r = a.result(job_id, attempt=2, stdout="done\n", wall_seconds=1.5)
    assert r.status_code == 200 and r.get_json() == {"job_id": job_id, "state": "succeeded",
                                                     "applied": True}
    before = hub.job(job_id)
    # The same result again (a retry after a lost answer) changes nothing.
    r = a.result(job_id, attempt=2, stdout="done\n", wall_seconds=1.5)
    assert r.status_code == 200 and r.get_json()["applied"] is False
    r = a.result(job_id, attempt=2, state="failed", failure_reason="second thoughts")
    assert r.status_code == 200 and r.get_json() == {"job_id": job_id, "state": "succeeded",
                                                     "applied": False}
    assert hub.job(job_id) == before
    assert (before["state"], before["exit_code"]) == ("succeeded", 0)

    assert a.result(job_id, attempt=1).status_code == 409
    assert b.result(job_id, attempt=2).status_code == 409
    r = a.result("j-never-existed", attempt=1)
    assert (r.status_code, r.get_json()["error"]) == (404, "job_not_found")
    assert a.result(job_id, attempt=2, state="exploded").status_code == 400


def test_a_result_after_the_proxy_gave_the_job_up_is_stale(make_hub):
    hub = make_hub(max_attempts=1)
    T = hub.config.lease_timeout_s
    t = time.time()
    job_id, a = hub.claimed_at("a", t)
    # a stays alive (it polls) but never heartbeats the job: the lease runs out
    # and, with no attempts left, the job fails.
    hub.claim_at(a, t + T - 1, max_jobs=0)
    hub.claim_at(a, t + T + 1, max_jobs=0)
    assert (hub.job(job_id)["state"], hub.job(job_id)["failure_reason"]) == ("failed", "worker lost")

    r = a.result(job_id, attempt=1)
    # Not "a duplicate, applied: false": the worker must learn its result was not kept.
    assert (r.status_code, r.get_json()["error"]) == (409, "stale_lease")
    assert hub.job(job_id)["state"] == "failed"


def test_outputs_are_stored_and_only_the_owner_can_download_them(hub):
    job_id = hub.submit()
    a = hub.register("a")
    [job] = a.claim()
    blobs = hub.app.extensions["jobcloud"].blobs

    def post(worker, outputs: bytes, attempt=job["attempt"]):
        return worker.hub.client.post(
            f"/api/v1/worker/jobs/{job_id}/result", headers=worker.headers,
            content_type="multipart/form-data",
            data={"result": json.dumps({"attempt": attempt, "state": "succeeded", "exit_code": 0}),
                  "outputs": (io.BytesIO(outputs), "outputs.zip", "application/zip")})

    r = post(a, b"this is not a zip archive")
    assert (r.status_code, r.get_json()["error"]) == (400, "invalid_outputs")
    assert hub.job(job_id)["state"] == "running"

    b = hub.register("b")
    stale = zip_bytes(**{"model.txt": "from the wrong worker"})
    assert post(b, stale).status_code == 409
    assert not blobs.path(hashlib.sha256(stale).hexdigest()).exists()

    archive = zip_bytes(**{"model.txt": "weights", "metrics.json": '{"acc": 0.9}'})
    r = post(a, archive)
    assert r.status_code == 200 and r.get_json()["applied"] is True
    outputs = hub.job(job_id)["outputs"]
    assert (outputs["sha256"], outputs["size"]) == (hashlib.sha256(archive).hexdigest(), len(archive))
    assert outputs["left_out"] is None  # this result reported nothing of what was left out
    assert list(blobs.tmp.iterdir()) == []

    r = hub.client.get(f"/api/v1/jobs/{job_id}/outputs", headers=hub.alice["headers"])
    assert r.status_code == 200 and r.data == archive
    assert r.headers["Content-Disposition"].startswith("attachment")
    assert r.headers["X-Content-Type-Options"] == "nosniff"
    assert r.mimetype == "application/zip"
    r = hub.client.get(f"/api/v1/jobs/{job_id}/outputs", headers=hub.bob["headers"])
    assert r.status_code == 404


# ----------------------------------------------------------------------- cancel

def test_cancelling_a_queued_job_is_immediate_and_it_is_never_claimed(hub):
    a = hub.register("a", slots=4)
    first, second, third = hub.submit(), hub.submit(), hub.submit()
    # `second` is reserved for a (a poll that took nothing) but not claimed yet.
    assert a.claim(max_jobs=0) == []
    assert hub.row(second)["worker_id"] == a.id

    for job_id in (first, second):
        r = hub.cancel(job_id)
        assert r.status_code == 200, r.get_json()
        assert (r.get_json()["state"], r.get_json()["finished_at"] is not None) == ("cancelled", True)
    assert ids(a.claim(max_jobs=4)) == [third]
    for job_id in (first, second):
        job = hub.job(job_id)
        assert (job["state"], job["attempt"]) == ("cancelled", 0)
    r = hub.cancel(first)
    assert (r.status_code, r.get_json()["error"]) == (409, "job_finished")
    assert hub.cancel(third, user=hub.bob).status_code == 404


def test_cancelling_a_running_job_goes_through_its_worker(hub):
    a = hub.register("a")
    job_id = hub.submit()
    [job] = a.claim()
    assert a.heartbeat([job_id])["cancel"] == []

    r = hub.cancel(job_id)
    assert r.status_code == 200
    assert (r.get_json()["state"], r.get_json()["cancel_requested"]) == ("running", True)
    assert a.heartbeat([job_id]) == {"cancel": [job_id], "unknown": [], "drain": False}
    # The claim answer carries it too, for a worker that claims before it heartbeats.
    r = a.post("claim", {"max_jobs": 1, "wait_s": 0})
    assert r.get_json()["cancel"] == [job_id] and r.get_json()["jobs"] == []

    r = a.result(job_id, job["attempt"], state="cancelled", exit_code=None)
    assert r.status_code == 200 and r.get_json()["applied"] is True
    job = hub.job(job_id)
    assert (job["state"], job["cancel_requested"]) == ("cancelled", True)
    assert a.heartbeat([]) == {"cancel": [], "unknown": [], "drain": False}


# ------------------------------------------------------------- drain, deregister

def test_a_drained_worker_keeps_its_job_and_gets_no_new_ones(hub):
    a = hub.register("a", slots=4)
    running = hub.submit()
    [held] = a.claim()
    b = hub.register("b", slots=4)
    queued = [hub.submit() for _ in range(4)]
    assert b.claim(max_jobs=0) == []  # reserves two of them for a, two for b

    assert hub.admin_action(a, "drain", user=hub.alice).status_code == 403
    r = hub.admin_action(a, "drain")
    assert r.status_code == 200 and r.get_json()["state"] == "draining"

    r = a.post("claim", {"max_jobs": 4})
    assert r.status_code == 200
    assert r.get_json()["jobs"] == [] and r.get_json()["drain"] is True
    assert a.heartbeat([running]) == {"cancel": [], "unknown": [], "drain": True}
    # What had been reserved for a goes to b.
    assert ids(b.claim(max_jobs=4)) == sorted(queued)
    assert (hub.job(running)["state"], hub.job(running)["worker_id"]) == ("running", a.id)
    assert a.result(running, held["attempt"]).get_json()["applied"] is True

    assert hub.admin_action(a, "resume").get_json()["state"] == "active"
    later = hub.submit()
    assert ids(a.claim()) == [later]


@pytest.mark.parametrize("leave", ["deregister", "drain", "process shutdown"])
def test_a_waiting_claim_ends_when_its_worker_stops_being_active(hub, leave):
    """A worker's long-poll answers as soon as the worker deregisters or is
    drained, or the proxy process begins a graceful shutdown, instead of holding
    a server thread (and a gunicorn restart) until its deadline."""
    a = hub.register("a")
    # Back-date the worker's last contact a little: the claim touches it when it
    # starts, which tells the test the long-poll is under way.
    marker = time.time() - 1
    hub.call(lambda conn: conn.execute("UPDATE workers SET last_seen_at = ? WHERE id = ?",
                                       (marker, a.id)))
    answers = []
    poll = threading.Thread(target=lambda: answers.append(
        a.post("claim", {"max_jobs": 1, "wait_s": 30})))
    started = time.monotonic()
    poll.start()
    wait_until(lambda: a.row()["last_seen_at"] > marker, what="the claim to start")
    if leave == "deregister":
        assert a.post("deregister").status_code == 200
    elif leave == "drain":
        assert hub.admin_action(a, "drain").status_code == 200
    else:
        begin_shutdown(hub.app)
    poll.join(timeout=25)
    assert not poll.is_alive(), "the long-poll went on after its worker left"
    assert time.monotonic() - started < 25
    [r] = answers
    assert r.status_code == 200 and r.get_json()["jobs"] == []
    assert r.get_json()["drain"] is (leave == "drain")


def test_deregistering_requeues_the_running_jobs(hub):
    a = hub.register("a")
    job_id = hub.submit()
    assert [j["attempt"] for j in a.claim()] == [1]

    r = a.post("deregister")
    assert r.status_code == 200 and r.get_json() == {"worker_id": a.id, "state": "gone"}
    job = hub.job(job_id)
    assert (job["state"], job["attempt"], job["worker_id"]) == ("queued", 1, None)
    assert a.post("claim", {"max_jobs": 1}).status_code == 401

    b = hub.register("b")
    assert [(j["id"], j["attempt"]) for j in b.claim()] == [(job_id, 2)]
    assert hub.admin_action(a, "drain").status_code == 404


# ------------------------------------------------------------------------- logs

def test_log_chunks_are_idempotent_bounded_and_only_from_the_lease_holder(make_hub):
    hub = make_hub(log_max_bytes=1024, log_tail_bytes=1024)
    a = hub.register("a")
    job_id = hub.submit()
    [job] = a.claim()
    n = job["attempt"]

    assert a.log(job_id, n, 0, "hello\n").get_json() == {"stored": True, "truncated": False}
    assert a.log(job_id, n, 6, "wörld\n").status_code == 200  # 7 bytes
    assert a.log(job_id, n, 0, "hello\n").status_code == 200  # a retried chunk
    assert a.log(job_id, n, 0, "HIJACK").status_code == 200   # never overwrites
    assert a.log(job_id, n, 0, "oops\n", stream="stderr").status_code == 200

    out = hub.logs(job_id)
    assert (out["data"], out["next_offset"], out["truncated"]) == ("hello\nwörld\n", 13, False)
    assert hub.logs(job_id, offset=6)["data"] == "wörld\n"
    assert hub.logs(job_id, stream="stderr")["data"] == "oops\n"

    # Up to log_max_bytes is kept; past it the stream is marked truncated.
    assert a.log(job_id, n, 13, "x" * (1024 - 13)).get_json()["stored"] is True
    assert a.log(job_id, n, 1024, "y").get_json() == {"stored": False, "truncated": True}
    out = hub.logs(job_id)
    assert (out["next_offset"], out["truncated"]) == (1024, True)
    assert out["data"] == "hello\nwörld\n" + "x" * 1011
    assert hub.logs(job_id, stream="stderr")["truncated"] is False

    b = hub.register("b")
    assert b.log(job_id, n, 1024, "from b").status_code == 404
    assert a.log(job_id, n + 1, 0, "wrong attempt").status_code == 404
    assert a.log(job_id, n, 0, "x", stream="stdin").status_code == 400
    assert a.log(job_id, n, -1, "x").status_code == 400
    assert hub.client.get(f"/api/v1/jobs/{job_id}/logs", headers=hub.bob["headers"]).status_code == 404

    assert a.result(job_id, n).status_code == 200
    assert a.log(job_id, n, 2000, "after the end").status_code == 404


def test_text_no_database_can_store_is_replaced_not_a_server_error(hub):
    # PostgreSQL TEXT refuses NUL; a lone surrogate is valid JSON but not UTF-8.
    a = hub.register("a")
    job_id = hub.submit()
    [job] = a.claim()
    n = job["attempt"]
    assert a.log(job_id, n, 0, "a\x00b\n").status_code == 200
    assert a.log(job_id, n, 4, "c\ud800d\n").status_code == 200
    assert a.log(job_id, n, 8, "e\n").status_code == 200
    out = hub.logs(job_id)
    # One byte each, so the offsets the worker counted still line up.
    assert (out["data"], out["next_offset"]) == ("a?b\nc?d\ne\n", 10)

    r = a.result(job_id, n, state="failed", stdout="tail\x00end", stderr="\ud800",
                 failure_reason="bad\x00reason")
    assert r.status_code == 200, r.get_json()
    job = hub.job(job_id)
    assert (job["state"], job["failure_reason"]) == ("failed", "bad?reason")
    r = a.get("/api/v1/worker/jobs/j%00x/script")
    assert r.status_code == 404, r.get_json()


# -------------------------------------------------------------------- downloads

def test_a_worker_downloads_inputs_only_of_jobs_it_holds(hub):
    dataset = zip_bytes(**{"train.csv": "x,y\n1,2\n"})
    with_data = hub.submit(dataset=(io.BytesIO(dataset), "data.zip"))
    without = hub.submit()
    a = hub.register("a")
    claimed = {j["id"]: j for j in a.claim(max_jobs=2)}
    assert sorted(claimed) == sorted([with_data, without])

    r = a.get(claimed[with_data]["script"]["url"])
    assert r.status_code == 200 and r.get_data(as_text=True) == CODE
    assert r.headers["Content-Disposition"].startswith("attachment")
    assert r.headers["X-Content-Type-Options"] == "nosniff"
    assert hashlib.sha256(r.data).hexdigest() == claimed[with_data]["script"]["sha256"]
    r = a.get(claimed[with_data]["dataset"]["url"])
    assert r.status_code == 200 and r.data == dataset
    assert claimed[without]["dataset"] is None
    r = a.get(f"/api/v1/worker/jobs/{without}/dataset")
    assert (r.status_code, r.get_json()["error"]) == (404, "no_dataset")

    b = hub.register("b")
    queued = hub.submit()
    for url in (f"/api/v1/worker/jobs/{with_data}/script", f"/api/v1/worker/jobs/{with_data}/dataset",
                f"/api/v1/worker/jobs/{queued}/script", "/api/v1/worker/jobs/j-never-existed/script"):
        r = b.get(url)
        assert (r.status_code, r.get_json()["error"]) == (404, "no_lease"), url
    assert hub.client.get(f"/api/v1/worker/jobs/{with_data}/script").status_code == 401
    assert hub.client.get(f"/api/v1/worker/jobs/{with_data}/script",
                          headers=hub.alice["headers"]).status_code == 401

    assert a.result(with_data, claimed[with_data]["attempt"]).status_code == 200
    assert a.get(f"/api/v1/worker/jobs/{with_data}/script").status_code == 404


def test_workers_report_free_disk_and_bad_capacity_is_refused(hub):
    r = hub.client.post("/api/v1/workers/register",
                        headers={"Authorization": f"Bearer {hub.enrollment}"},
                        json=dict(_capacity("disky"), disk_mb=51200))
    assert r.status_code == 201
    r = hub.client.get("/api/v1/admin/workers", headers=hub.admin["headers"])
    [listed] = [w for w in r.get_json()["workers"] if w["name"] == "disky"]
    assert listed["disk_mb"] == 51200
    for bad in ({"disk_mb": -1}, {"disk_mb": "lots"}, {"slots": 0}, {"images": "jobcloud/python"}):
        r = hub.client.post("/api/v1/workers/register",
                            headers={"Authorization": f"Bearer {hub.enrollment}"},
                            json=dict(_capacity("bad"), **bad))
        assert (r.status_code, r.get_json()["error"]) == (400, "invalid_capacity"), bad


# ------------------------------------------------------------------ fair share

def test_one_users_long_queue_does_not_starve_another(hub):
    # The case: user A queues 200 jobs, then user B queues 2; B's jobs
    # must start within the next few free slots, not after A's 200.
    w1, w2 = hub.register("w1", slots=1), hub.register("w2", slots=1)
    a_jobs = {hub.submit() for _ in range(200)}
    held = {w1: w1.claim(), w2: w2.claim()}
    assert {j["id"] for jobs in held.values() for j in jobs} <= a_jobs
    b_jobs = {hub.submit(user=hub.bob) for _ in range(2)}
    started = []
    for w in (w1, w2, w1, w2):
        [job] = held[w]
        r = w.result(job["id"], job["attempt"], claim_next=1)
        held[w] = r.get_json()["jobs"]
        started += [j["id"] for j in held[w]]
    assert b_jobs <= set(started[:3]), started


def test_free_slots_alternate_between_users_with_queued_jobs(hub):
    w = hub.register("w", slots=1)
    a_jobs = [hub.submit() for _ in range(4)]
    b_jobs = [hub.submit(user=hub.bob) for _ in range(4)]
    order = []
    for _ in range(8):
        [job] = w.claim()
        order.append("a" if job["id"] in a_jobs else "b")
        assert w.result(job["id"], job["attempt"]).status_code == 200
    # Each user's jobs in submission order, users taking turns (A queued first).
    assert order == ["a", "b"] * 4


def test_keys_with_a_nul_are_not_found_on_either_database(hub):
    # PostgreSQL refuses a NUL in a query parameter; every lookup by a key from
    # the URL answers as for any unknown key instead of failing.
    json_headers = dict(hub.alice["headers"], Accept="application/json")
    assert hub.client.get("/job-status/al%00ice", headers=json_headers).status_code == 404
    assert hub.client.get("/api/v1/jobs/j%00x", headers=hub.alice["headers"]).status_code == 404
    assert hub.client.get("/api/v1/admin/users/al%00ice/limits",
                          headers=hub.admin["headers"]).status_code == 404
    r = hub.client.get("/api/v1/jobs?before=j%00x", headers=hub.alice["headers"])
    assert (r.status_code, r.get_json()["error"]) == (400, "invalid_parameter")
    w = hub.register("w")
    assert w.post("jobs/j%00x/logs", {"attempt": 1, "stream": "stdout", "offset": 0,
                                       "data": "x"}).status_code == 404
