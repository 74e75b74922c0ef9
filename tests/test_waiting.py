"""Issue 14, items 1 and 2: a job no live worker and no scaler VM shape can run is
refused at submission (400 `no_capacity`, naming the resource and what exists),
and every queued job says why it waits and when it may start (`waiting`).

Every situation is made for real through the HTTP API: users submit, workers
register and claim over the worker protocol, the scaler reports over the admin
API, admins drain workers and set limits. SQLite and PostgreSQL.
"""
from __future__ import annotations

import re
import time

import pytest
from markupsafe import escape

from client.cli import _describe as describe
from proxy import capacity, vms
from proxy.models import iso
from tests.conftest import login
from tests.test_dispatch import make_hub  # noqa: F401 (a fixture)
from tests.test_limits import set_limits
from tests.test_vm_scaler import config, host, proxy, scaler, template  # noqa: F401 (fixtures)

PYTHON = "jobcloud/python"
ML = "jobcloud/ml"


@pytest.fixture
def hub(make_hub):
    return make_hub()


def post_job(hub, user=None, **fields):
    data = {"code": "print(1)", **{k: str(v) for k, v in fields.items()}}
    return hub.client.post("/api/v1/jobs", headers=(user or hub.alice)["headers"], data=data,
                           content_type="multipart/form-data")


def report(hub, vm_list=(), shapes=None, now=None):
    """The scaler's report, over the admin API (or at time `now`, straight to the store)."""
    body = {"vms": list(vm_list), "events": []}
    if shapes is not None:
        body["shapes"] = shapes
    if now is not None:
        return hub.call(vms.record_report, body, now=now)
    r = hub.client.put("/api/v1/admin/scaler/report", json=body, headers=hub.admin["headers"])
    assert r.status_code == 200, r.get_json()
    return r.get_json()


SMALL_SHAPE = {"cpus": 2, "memory_mb": 4096, "gpus": 0, "images": [PYTHON]}
BIG_SHAPE = {"cpus": 8, "memory_mb": 32768, "gpus": 0, "images": [PYTHON, ML]}
SMALL_WORKER = {"cpus": 2, "memory_mb": 4096, "gpus": 0, "images": [PYTHON]}


def waiting(hub, job_id, user=None) -> dict:
    """The job's `waiting`, checked to read the same on its page and in `jobcloud status JOB`."""
    job = hub.job(job_id, user)
    why = job["waiting"]
    if why is not None:
        page = _page_client(hub, user or hub.alice).get(f"/jobs/{job_id}").get_data(as_text=True)
        assert f'data-reason="{why["reason"]}"' in page
        assert f'<span id="waiting-detail">{escape(why["detail"])}</span>' in page
        # (An estimate counts from when it is read: the page's is its own.)
        shown = re.search(r'id="waiting-estimate"( hidden)?>.*?id="waiting-earliest" datetime="([^"]*)"',
                          page, re.S)
        assert (shown.group(1) is None and shown.group(2) != "") == bool(why["estimate"])
        described = describe(job)
        assert f"waiting:   {why['reason']}: {why['detail']}" in described
        assert ("estimate:  start between" in described) == bool(why["estimate"])
    return why


def _page_client(hub, user):
    """A browser session of `user` (logged in once per test)."""
    clients = hub.__dict__.setdefault("page_clients", {})
    if user["name"] not in clients:
        clients[user["name"]] = hub.app.test_client()
        login(clients[user["name"]], user["name"], user["password"])
    return clients[user["name"]]


# ------------------------------------------------------------ refused at submission

# resource asked, what the small worker has, what the small shape has
IMPOSSIBLE = {
    "cpus": ({"cpus": 4}, "asks 4 CPUs; the only worker has 2", "the scaler's VM shape has 2"),
    "memory_mb": ({"memory_mb": 30000}, "asks 30000 MiB; the only worker has 4096",
                  "the scaler's VM shape has 4096"),
    "gpus": ({"gpus": 1}, "asks 1 GPU; the only worker has 0", "the scaler's VM shape has 0"),
    "image": ({"image": ML}, f"asks image {ML}; live workers have {PYTHON}",
              f"the scaler's VM shape has {PYTHON}"),
}


@pytest.mark.parametrize("resource", sorted(IMPOSSIBLE))
def test_impossible_job_is_refused_naming_the_resource(hub, resource):
    fields, workers_say, shape_says = IMPOSSIBLE[resource]
    hub.register("w1", **SMALL_WORKER)
    r = post_job(hub, **fields)
    assert (r.status_code, r.get_json()["error"]) == (400, "no_capacity"), r.get_json()
    detail = r.get_json()["detail"]
    assert workers_say in detail and "the scaler reported no VM shape" in detail

    # With the scaler's shape reported: it is named too, and still too small.
    report(hub, shapes=[SMALL_SHAPE])
    r = post_job(hub, **fields)
    assert (r.status_code, r.get_json()["error"]) == (400, "no_capacity")
    assert workers_say in r.get_json()["detail"] and shape_says in r.get_json()["detail"]

    # A shape that can run it: accepted, and the job says no live worker can run it yet.
    report(hub, shapes=[SMALL_SHAPE, dict(BIG_SHAPE, gpus=1)])
    r = post_job(hub, **fields)
    assert r.status_code == 201, r.get_json()
    job = r.get_json()
    assert job["capacity_note"] is None
    assert job["waiting"]["reason"] == "no_capable_worker"
    assert job["waiting"]["resource"] == resource
    assert "The scaler can start a VM that runs it." in job["waiting"]["detail"]
    # Nothing of the refused submissions was kept.
    assert [j["id"] for j in hub.client.get("/api/v1/jobs", headers=hub.alice["headers"])
            .get_json()["jobs"]] == [job["id"]]


def test_a_shape_alone_counts_and_a_stale_one_is_gone(hub):
    report(hub, shapes=[SMALL_SHAPE])
    r = post_job(hub, cpus=4)
    assert (r.status_code, r.get_json()["error"]) == (400, "no_capacity")
    assert ("asks 4 CPUs; no worker is live, the scaler's VM shape has 2"
            in r.get_json()["detail"])
    assert post_job(hub, cpus=2).status_code == 201

    # Reported eleven minutes ago and not since: the scaler stopped, its shape is gone,
    # and with no worker either nothing is known: accepted, with the note.
    report(hub, shapes=[SMALL_SHAPE], now=time.time() - 660)
    r = post_job(hub, cpus=4)
    assert r.status_code == 201
    assert "no worker was live and the scaler reported no VM shape" in r.get_json()["capacity_note"]


def test_a_job_no_single_machine_can_run_is_refused(hub):
    hub.register("gpu-box", cpus=4, memory_mb=2048, gpus=1, images=[PYTHON])
    hub.register("big-box", cpus=4, memory_mb=65536, gpus=0, images=[PYTHON])
    assert post_job(hub, gpus=1, memory_mb=2048).status_code == 201
    assert post_job(hub, memory_mb=60000).status_code == 201
    r = post_job(hub, gpus=1, memory_mb=60000)
    assert (r.status_code, r.get_json()["error"]) == (400, "no_capacity")
    assert "which no single machine has" in r.get_json()["detail"]
    assert "worker gpu-box has 4 CPUs, 2048 MiB, 1 GPU" in r.get_json()["detail"]


def test_fresh_cluster_accepts_and_says_so_on_the_job(hub):
    r = post_job(hub, cpus=16, gpus=8)
    assert r.status_code == 201
    job = r.get_json()
    assert "Accepted without a capacity check" in job["capacity_note"]
    assert job["waiting"]["reason"] == "no_workers"
    assert hub.job(job["id"])["capacity_note"] == job["capacity_note"]


def test_queue_unmet_capacity_lets_impossible_jobs_queue(make_hub):
    hub = make_hub(queue_unmet_capacity=True)
    hub.register("w1", **SMALL_WORKER)
    r = post_job(hub, cpus=4)
    assert r.status_code == 201, r.get_json()
    job = r.get_json()
    assert "queue_unmet_capacity" in job["capacity_note"]
    assert "asks 4 CPUs; the only worker has 2" in job["capacity_note"]
    assert job["waiting"]["reason"] == "no_capable_worker"
    assert job["waiting"]["resource"] == "cpus"
    assert "No live worker can run it: asks 4 CPUs; the only worker has 2." in job["waiting"]["detail"]
    assert job["waiting"]["estimate"] is None


def test_queue_unmet_capacity_is_off_unless_set(tmp_path):
    from proxy.config import load_config

    assert load_config(env={}).queue_unmet_capacity is False
    assert load_config(env={"JOBCLOUD_QUEUE_UNMET_CAPACITY": "true"}).queue_unmet_capacity is True
    assert load_config(env={"JOBCLOUD_QUEUE_UNMET_CAPACITY": "0"}).queue_unmet_capacity is False
    toml = tmp_path / "proxy.toml"
    toml.write_text("[proxy]\nqueue_unmet_capacity = true\n")
    assert load_config(env={"JOBCLOUD_CONFIG": str(toml)}).queue_unmet_capacity is True


def test_a_malformed_shape_is_refused(hub):
    for shape in ({"cpus": 0, "memory_mb": 1, "gpus": 0, "images": [PYTHON]},
                  {"cpus": 1, "memory_mb": 1, "gpus": 0, "images": []},
                  {"cpus": 1, "memory_mb": 1.5, "gpus": 0, "images": [PYTHON]}):
        r = hub.client.put("/api/v1/admin/scaler/report", json={"vms": [], "shapes": [shape]},
                           headers=hub.admin["headers"])
        assert (r.status_code, r.get_json()["error"]) == (400, "invalid_report"), shape


# ------------------------------------------------------------------- why it waits

def test_no_workers(hub):
    job_id = hub.submit()
    w = waiting(hub, job_id)
    assert w["reason"] == "no_workers" and "no live workers" in w["detail"]
    assert w["position"] is None and w["estimate"] is None


def test_starting_free_slot_positions_and_estimates_in_order(hub):
    w = hub.register("w1", slots=1)
    first, second, third = hub.submit(), hub.submit(), hub.submit()
    assert waiting(hub, first) == {"reason": "starting", "worker": "w1", "position": None,
                                   "estimate": None, "detail": "Starting on worker w1: it was "
                                   "handed to that worker, which takes it at its next claim."}
    two, three = waiting(hub, second), waiting(hub, third)
    assert (two["reason"], two["position"]) == ("free_slot", {"overall": 1, "yours": 1})
    assert (three["reason"], three["position"]) == ("free_slot", {"overall": 2, "yours": 2})
    assert "position 2 in the queue, 2 among your queued jobs" in three["detail"]
    for later, earlier in ((three, two),):
        assert later["estimate"]["is_estimate"] is True
        assert later["estimate"]["earliest"] >= earlier["estimate"]["earliest"]
        assert later["estimate"]["latest"] >= earlier["estimate"]["latest"]
        assert earlier["estimate"]["earliest"] <= earlier["estimate"]["latest"]
    # The running job's time limit (600 s) bounds when the slot frees at the latest.
    [claimed] = w.claim()
    submitted = hub.job(first)["started_at"]
    assert claimed["id"] == first
    assert waiting(hub, second)["estimate"]["latest"] <= iso(
        time.time() + hub.job(first)["resources"]["timeout_s"] + 1)
    assert submitted is not None


def test_estimate_learns_from_finished_runtimes(hub):
    w = hub.register("w1", slots=1)
    done = hub.submit()
    [job] = w.claim()
    assert w.result(done, job["attempt"], wall_seconds=30.0, cpu_seconds=1.0).status_code == 200
    hub.submit()
    [running] = w.claim()
    waits = [waiting(hub, hub.submit()) for _ in range(3)]
    assert [x["position"]["overall"] for x in waits] == [1, 2, 3]
    assert all("median runtime" in x["estimate"]["basis"] for x in waits)
    earliest = [x["estimate"]["earliest"] for x in waits]
    latest = [x["estimate"]["latest"] for x in waits]
    assert earliest == sorted(earliest) and latest == sorted(latest)
    assert all(e <= lt for e, lt in zip(earliest, latest))
    assert running


def test_fair_share_puts_other_users_first(hub):
    hub.register("w1", slots=1)
    alice_first = hub.submit()          # takes the only slot
    alice_second = hub.submit()
    bob_job = hub.submit(user=hub.bob)  # bob has nothing running: his job goes first
    assert waiting(hub, alice_first)["reason"] == "starting"
    # Read in queue order: an estimate counts from the time it is read.
    theirs = waiting(hub, bob_job, user=hub.bob)
    mine = waiting(hub, alice_second)
    assert mine["reason"] == "fair_share"
    assert mine["position"] == {"overall": 2, "yours": 1}
    assert "1 of their queued job(s) go before it" in mine["detail"]
    assert (theirs["reason"], theirs["position"]) == ("free_slot", {"overall": 1, "yours": 1})
    assert theirs["estimate"]["earliest"] <= mine["estimate"]["earliest"]
    assert theirs["estimate"]["latest"] <= mine["estimate"]["latest"]


def test_max_running_holds_the_job(hub):
    set_limits(hub, "alice", max_running=1)
    hub.register("w1", slots=4)
    first, second, third = hub.submit(), hub.submit(), hub.submit()
    assert waiting(hub, first)["reason"] == "starting"
    held = waiting(hub, second)
    assert held["reason"] == "max_running"
    assert "you have 1 job(s) running or starting and max_running is 1" in held["detail"]
    assert held["estimate"]["is_estimate"] is True
    later = waiting(hub, third)
    assert later["reason"] == "max_running" and "1 of your queued jobs go first" in later["detail"]
    assert later["estimate"]["latest"] >= held["estimate"]["latest"]


def test_no_live_worker_has_what_it_asks(hub):
    hub.register("w1", **SMALL_WORKER)
    report(hub, shapes=[BIG_SHAPE])
    for fields, resource in (({"cpus": 4}, "cpus"), ({"memory_mb": 8000}, "memory_mb"),
                             ({"image": ML}, "image")):
        w = waiting(hub, hub.submit(**fields))
        assert (w["reason"], w["resource"]) == ("no_capable_worker", resource)
        assert w["detail"].startswith("No live worker can run it: asks ")


def test_draining_workers(hub):
    w = hub.register("w1", slots=2)
    assert hub.admin_action(w, "drain").status_code == 200
    job_id = hub.submit()
    why = waiting(hub, job_id)
    assert why["reason"] == "draining"
    assert "(w1) are draining" in why["detail"]
    assert hub.admin_action(w, "resume").status_code == 200
    assert waiting(hub, job_id)["reason"] == "starting"


def test_vm_booting_with_since_and_typical_boot_time(hub):
    hub.register("w1", **SMALL_WORKER)
    created = time.time() - 30
    vm = {"name": "jc-vm-0001", "host_uri": "qemu:///system", "state": "booting",
          "worker_name": "jc-vm-0001", "created_at": created}
    report(hub, [vm], shapes=[BIG_SHAPE])
    job_id = hub.submit(cpus=4)
    why = waiting(hub, job_id)
    assert why["reason"] == "vm_booting"
    assert why["vm"]["name"] == "jc-vm-0001" and why["vm"]["booting_since"] == iso(created)
    assert "typical boot time unknown" in why["detail"] and why["estimate"] is None

    # The VM's worker joined: the scaler reports it ready, and its boot time is kept.
    report(hub, [dict(vm, state="ready")], shapes=[BIG_SHAPE])
    nxt = {**vm, "name": "jc-vm-0002", "worker_name": "jc-vm-0002", "created_at": time.time()}
    report(hub, [dict(vm, state="ready"), nxt], shapes=[BIG_SHAPE])
    why = waiting(hub, job_id)
    assert why["reason"] == "vm_booting" and why["vm"]["name"] == "jc-vm-0002"
    assert 29 <= why["vm"]["typical_boot_s"] < 300
    assert "a boot typically takes" in why["detail"]
    assert why["estimate"]["earliest"] <= why["estimate"]["latest"]


def test_dashboard_explains_each_queued_job(hub):
    hub.register("w1", slots=1)
    first, second = hub.submit(), hub.submit()
    bob_job = hub.submit(user=hub.bob)
    body = hub.client.get("/api/v1/admin/dashboard", headers=hub.admin["headers"]).get_json()
    reasons = {q["id"]: q["waiting"]["reason"] for q in body["queued_jobs"]}
    assert reasons == {first: "starting", second: "fair_share", bob_job: "free_slot"}
    # The same as each job's own JSON.
    for q in body["queued_jobs"]:
        owner = hub.bob if q["owner"] == "bob" else hub.alice
        assert q["waiting"]["detail"] == waiting(hub, q["id"], owner)["detail"]
    # And on the page, a row per queued job with its reason and sentence.
    login(hub.client, "root", hub.admin["password"])
    page = hub.client.get("/admin").get_data(as_text=True)
    table = page[page.index('id="queued-jobs"'):]
    for q in body["queued_jobs"]:
        row = table[table.index(f'data-job="{q["id"]}"'):]
        row = row[:row.index("</tr>")]
        assert f"<td>{q['waiting']['reason']}</td>" in row
        assert escape(q["waiting"]["detail"]) in row


def test_the_job_stream_follows_the_reason_and_a_running_job_has_none(hub):
    """The job page's stream: a queued job's reason changes with the cluster, which
    wakes no topic of the job, so the stream reads it again while the job is queued."""
    from tests.test_live import stream

    job_id = hub.submit()
    events = stream(hub.client, f"/api/v1/jobs/{job_id}/events", hub.alice["headers"])
    try:
        first = events.next()
        assert first["event"] == "state" and first["data"]["waiting"]["reason"] == "no_workers"
        w = hub.register("w1", slots=1)
        changed = events.next()
        assert changed["event"] == "state"
        assert changed["data"]["waiting"]["reason"] in ("starting", "free_slot")
    finally:
        events.close()
    w.claim()
    assert hub.job(job_id)["waiting"] is None
    listed = hub.client.get("/api/v1/jobs", headers=hub.alice["headers"]).get_json()["jobs"]
    assert [j["waiting"] for j in listed] == [None]


# ------------------------------------------------------------ the real scaler reports

def test_the_scaler_reports_its_shape_and_a_job_waits_for_its_booting_vm(scaler, proxy, config):
    """The scaler's VM shape reaches the proxy with its report: a job no VM (and no
    worker) could run is refused, and one that waits for the VM it started says so."""
    job_id = proxy.hub.submit()
    [decision] = scaler.run_once()
    assert decision.action.value == "create"
    with proxy.hub.app.extensions["jobcloud"].db.connection() as conn:
        [shape] = capacity.scaler_shapes(conn, time.time())
    assert (shape["cpus"], shape["memory_mb"], shape["gpus"]) == (config.vcpus, config.memory_mb, 0)
    assert shape["images"] == {PYTHON, ML}

    why = proxy.hub.job(job_id)["waiting"]
    assert (why["reason"], why["vm"]["name"]) == ("vm_booting", decision.vm)

    r = post_job(proxy.hub, cpus=config.vcpus + 1)
    assert (r.status_code, r.get_json()["error"]) == (400, "no_capacity")
    assert (f"asks {config.vcpus + 1} CPUs; no worker is live, the scaler's VM shape has "
            f"{config.vcpus}") in r.get_json()["detail"]
