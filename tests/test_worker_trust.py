"""What the proxy trusts a worker with (issue 12): a worker's name is taken over
only with proof that it is the same worker, a worker dropped after a partition
rejoins with its own secret, a result whose lease ran out is refused, and the
usage a worker reports is bounded by what the proxy observed.

Through the real worker API (test_dispatch's Hub), on SQLite and PostgreSQL;
where time must pass, the proxy functions' `now` moves the clock.
"""
from __future__ import annotations

import time

import pytest

from proxy import leases, worker_api
from proxy.errors import Unauthorized
from proxy.models import WorkerState
from tests.conftest import wait_until
from tests.test_dispatch import Worker, _capacity, make_hub  # noqa: F401  (fixture)


@pytest.fixture
def hub(make_hub):  # noqa: F811
    return make_hub()


def register_with(hub, token: str, name: str):
    return hub.client.post("/api/v1/workers/register", headers={"Authorization": f"Bearer {token}"},
                           json=_capacity(name))


# ------------------------------------------------------------------ name takeover

def test_another_enrollment_cannot_take_a_live_workers_name(hub):
    a = hub.register("gpu-box-1")
    job_id = hub.submit()
    [job] = a.claim()

    r = register_with(hub, hub.users.enrollment(), "gpu-box-1")
    assert r.status_code == 409, r.get_json()
    assert r.get_json()["error"] == "name_in_use" and "retire" in r.get_json()["detail"]

    # The live worker keeps its job, its lease and its secret.
    assert a.heartbeat([job_id])["unknown"] == []
    row = hub.row(job_id)
    assert (row["state"], row["worker_id"], row["attempt"]) == ("running", a.id, job["attempt"])
    assert a.row()["state"] == WorkerState.ACTIVE.value


def test_the_same_enrollment_or_the_workers_own_secret_may_replace_it(hub):
    a = hub.register("w")
    again = hub.register("w")            # the same enrollment: a restart of the same worker
    assert a.row()["state"] == WorkerState.GONE.value
    r = register_with(hub, again.secret, "w")   # its own secret: proof enough
    assert r.status_code == 201, r.get_json()
    assert again.row()["state"] == WorkerState.GONE.value
    # A secret proves only its own name.
    r = register_with(hub, r.get_json()["secret"], "other")
    assert (r.status_code, r.get_json()["error"]) == (409, "name_mismatch")


def test_an_admin_retire_frees_the_name_and_ends_the_old_worker(hub):
    a = hub.register("w")
    job_id = hub.submit()
    a.claim()
    assert hub.admin_action(a, "retire", user=hub.alice).status_code == 403
    r = hub.admin_action(a, "retire")
    assert r.status_code == 200 and r.get_json()["state"] == "gone", r.get_json()
    assert hub.row(job_id)["state"] == "queued"
    r = register_with(hub, hub.users.enrollment(), "w")
    assert r.status_code == 201, r.get_json()
    # The old worker is told it was retired (not lost): it must not come back.
    r = a.post("heartbeat", {"running": []})
    assert (r.status_code, r.get_json()["error"]) == (401, "worker_retired")
    r = register_with(hub, a.secret, "w")
    assert (r.status_code, r.get_json()["error"]) == (401, "worker_retired")


# ------------------------------------------------------------ after a partition

def test_a_worker_that_reaps_itself_is_told_lost_and_rejoins_with_its_secret(hub):
    T = hub.config.lease_timeout_s
    t = time.time()
    job_id, a = hub.claimed_at("a", t)
    # Its first call after a silence longer than the lease (the proxy frozen, a
    # cut link) reaps the worker itself: the answer must say "lost", which the
    # worker recovers from, not "retired", which ends it.
    with pytest.raises(Unauthorized) as e:
        hub.heartbeat_at(a, [job_id], t + T + 1)
    assert e.value.code == "worker_lost"
    assert a.row()["state"] == WorkerState.LOST.value
    assert hub.row(job_id)["state"] == "queued"

    # It rejoins with its own secret (its enrollment token may have expired),
    # under its name, and the job it lost runs again as attempt 2.
    r = register_with(hub, a.secret, "a")
    assert r.status_code == 201, r.get_json()
    back = Worker(hub, "a", r.get_json()["worker_id"], r.get_json()["secret"])
    assert back.row()["enrollment_id"] == a.row()["enrollment_id"]
    assert [(j["id"], j["attempt"]) for j in back.claim()] == [(job_id, 2)]
    # Its successor is in use: the old secret is a retired one, and cannot
    # take the name (and the running job) back.
    r = register_with(hub, a.secret, "a")
    assert (r.status_code, r.get_json()["error"]) == (401, "worker_retired")
    assert back.row()["state"] == "active"


def test_a_secret_whose_rejoin_answer_was_lost_rejoins_until_the_successor_is_used(hub):
    a = hub.register("a")
    # Rejoins whose answers never reached the worker (a proxy killed after the
    # commit): the successors' secrets were never used, so the old one is told
    # "replaced" (not "retired", which would end the worker) and rejoins again.
    for _ in range(2):
        r = register_with(hub, a.secret, "a")
        assert r.status_code == 201, r.get_json()
    with pytest.raises(Unauthorized) as e:
        hub.heartbeat_at(a, [], time.time())
    assert e.value.code == "worker_replaced"
    r = register_with(hub, a.secret, "a")
    assert r.status_code == 201, r.get_json()
    latest = Worker(hub, "a", r.get_json()["worker_id"], r.get_json()["secret"])
    assert latest.row()["state"] == "active"
    # Once an admin retires the latest registration, the chain's secrets are refused.
    assert hub.admin_action(latest, "retire").status_code == 200
    r = register_with(hub, a.secret, "a")
    assert (r.status_code, r.get_json()["error"]) == (401, "worker_retired")


def test_a_used_successor_retires_every_earlier_secret_of_its_worker(hub):
    a = hub.register("a")
    r = register_with(hub, a.secret, "a")
    b = Worker(hub, "a", r.get_json()["worker_id"], r.get_json()["secret"])
    hub.heartbeat_at(b, [], time.time())     # b's secret reached the worker
    r = register_with(hub, a.secret, "a")
    assert (r.status_code, r.get_json()["error"]) == (401, "worker_retired")
    assert b.row()["state"] == "active"


def test_an_admin_can_retire_a_lost_worker_so_its_secret_cannot_rejoin(hub):
    T = hub.config.lease_timeout_s
    a = hub.register("a")
    with pytest.raises(Unauthorized):
        hub.heartbeat_at(a, [], time.time() + T + 1)
    assert a.row()["state"] == WorkerState.LOST.value
    assert hub.admin_action(a, "retire").status_code == 200
    r = register_with(hub, a.secret, "a")
    assert (r.status_code, r.get_json()["error"]) == (401, "worker_retired")


def test_a_revoked_worker_cannot_rejoin(hub):
    a = hub.register("a")
    assert hub.admin_action(a, "revoke").status_code == 200
    r = register_with(hub, a.secret, "a")
    assert (r.status_code, r.get_json()["error"]) == (401, "worker_revoked")


def test_a_result_whose_lease_ran_out_is_refused_and_the_job_runs_again(make_hub):  # noqa: F811
    hub = make_hub(lease_timeout_s=1.0, heartbeat_interval_s=0.2, max_attempts=3)
    job_id = hub.submit()
    a = hub.register("a")
    [job] = a.claim()
    expires = hub.row(job_id)["lease_expires_at"]
    wait_until(lambda: time.time() > expires + 0.05, timeout=5, what="the lease to run out")
    # Nobody reaped yet: the job still says running under a's lease. The
    # result comes too late all the same: applied now, it would race the rerun.
    r = a.result(job_id, job["attempt"])
    assert (r.status_code, r.get_json()["error"]) == (409, "stale_lease")
    row = hub.row(job_id)
    assert (row["state"], row["attempt"]) == ("queued", 1)


# -------------------------------------------------------------------- usage

def test_usage_beyond_what_the_lease_allows_is_clamped_and_flagged(hub):
    worker = hub.register("w", cpus=4)
    honest, greedy = hub.submit(cpus=2, memory_mb=512), hub.submit(cpus=2, memory_mb=512)
    claimed = {j["id"]: j for j in worker.claim(max_jobs=2)}
    for job_id, cpu, wall, mem in ((honest, 15.0, 9.5, 100 * 2**20),
                                   (greedy, 10.0**12, 10.0**12, 2**50)):
        started = hub.row(job_id)["started_at"]
        result = worker_api.parse_result(
            {"attempt": claimed[job_id]["attempt"], "state": "succeeded", "exit_code": 0,
             "cpu_seconds": cpu, "wall_seconds": wall, "peak_memory_bytes": mem},
            hub.config.log_tail_bytes)
        hub.call(leases.record_result, worker.row(), job_id, result, None, now=started + 10)

    ok = hub.row(honest)
    assert (ok["cpu_seconds"], ok["wall_seconds"], ok["peak_memory_bytes"]) == (15.0, 9.5, 100 * 2**20)
    assert hub.job(honest)["usage"]["clamped"] == []
    row = hub.row(greedy)
    # 2 CPUs for 10 s of lease, plus the slack; never the 10^12 reported.
    slack = leases.USAGE_SLACK_S
    assert row["cpu_seconds"] <= 2 * (10 + slack)
    assert row["wall_seconds"] <= 10 + slack
    assert row["peak_memory_bytes"] == 512 * 2**20
    job = hub.job(greedy, user=hub.admin)
    assert job["usage"]["clamped"] == ["cpu_seconds", "peak_memory_bytes", "wall_seconds"]
    assert job["cost"] == hub.job(greedy)["cost"]
    # And the bill is the clamped usage's: cents, not billions.
    assert float(job["cost"]["amount"]) < 1, job["cost"]


def test_a_result_through_the_api_reporting_a_trillion_cpu_seconds_costs_seconds(hub):
    worker = hub.register("w")
    job_id = hub.submit()
    [job] = worker.claim()
    r = worker.result(job_id, job["attempt"], cpu_seconds=10**12, wall_seconds=1.0)
    assert r.status_code == 200, r.get_json()
    got = hub.job(job_id)
    assert got["usage"]["cpu_seconds"] <= job["cpus"] * (leases.USAGE_SLACK_S + 60)
    assert got["usage"]["clamped"] == ["cpu_seconds"]
    assert float(got["cost"]["amount"]) < 1, got["cost"]
    admin_view = hub.client.get("/api/v1/admin/workers", headers=hub.admin["headers"]).get_json()
    assert admin_view["workers"][0]["usage_clamped"] == 1
