"""Per-user limits and priority weights: set by admins, enforced at intake (400/429
naming the limit) and by the dispatcher (max_running, weight). SQLite and PostgreSQL."""
import pytest

from tests.test_dispatch import Hub


@pytest.fixture
def hub(database_url, make_config):
    from proxy import close_app, create_app

    app = create_app(make_config(database_url=database_url))
    yield Hub(app)
    close_app(app)


def set_limits(hub, name, user=None, **changes):
    return hub.client.put(f"/api/v1/admin/users/{name}/limits", json=changes,
                          headers=(user or hub.admin)["headers"])


def submit(hub, user=None, **fields):
    data = {"code": "print(1)", **{k: str(v) for k, v in fields.items()}}
    return hub.client.post("/api/v1/jobs", headers=(user or hub.alice)["headers"], data=data,
                           content_type="multipart/form-data")


def test_admins_set_and_read_limits_others_cannot(hub):
    r = set_limits(hub, "alice", max_cpus=2, max_queued=5, weight=2)
    assert r.status_code == 200
    body = hub.client.get("/api/v1/admin/users/alice/limits", headers=hub.admin["headers"]).get_json()
    assert (body["max_cpus"], body["max_queued"], body["weight"], body["max_running"]) == (2, 5, 2, None)
    # null clears one limit and leaves the others
    set_limits(hub, "alice", max_cpus=None)
    body = hub.client.get("/api/v1/admin/users/alice/limits", headers=hub.admin["headers"]).get_json()
    assert (body["max_cpus"], body["max_queued"]) == (None, 5)
    assert set_limits(hub, "alice", user=hub.alice, max_queued=100).status_code == 403
    assert set_limits(hub, "nobody", max_queued=1).status_code == 404


@pytest.mark.parametrize("changes", [{"max_cpus": -1}, {"max_queued": 1.5}, {"weight": 0},
                                     {"max_running": "4"}, {"max_gpu": 1}, {"weight": True}])
def test_bad_limits_are_refused(hub, changes):
    r = set_limits(hub, "alice", **changes)
    assert (r.status_code, r.get_json()["error"]) == (400, "invalid_limits")


def test_per_job_limits_answer_400_naming_the_limit(hub):
    set_limits(hub, "alice", max_cpus=2, max_memory_mb=512, max_gpus=0, max_timeout_s=60)
    within = {"cpus": 2, "memory_mb": 512, "gpus": 0, "timeout_s": 60}
    for field, value, limit in (("cpus", 4, "max_cpus = 2"), ("memory_mb", 1024, "max_memory_mb = 512"),
                                ("gpus", 1, "max_gpus = 0"), ("timeout_s", 120, "max_timeout_s = 60")):
        r = submit(hub, **dict(within, **{field: value}))
        assert (r.status_code, r.get_json()["error"]) == (400, "limit_exceeded"), field
        assert limit in r.get_json()["detail"]
    assert submit(hub, **within).status_code == 201
    # other users keep the proxy-wide limits
    assert submit(hub, user=hub.bob, cpus=4).status_code == 201


def test_queued_and_rate_limits_answer_429(hub):
    assert set_limits(hub, "alice", max_queued=2).status_code == 200
    assert [submit(hub).status_code for _ in range(2)] == [201, 201]
    r = submit(hub)
    assert r.status_code == 429 and "max_queued is 2" in r.get_json()["detail"]

    assert hub.bob  # created on first use
    assert set_limits(hub, "bob", max_submissions_per_minute=3).status_code == 200
    assert [submit(hub, user=hub.bob).status_code for _ in range(3)] == [201, 201, 201]
    r = submit(hub, user=hub.bob)
    assert r.status_code == 429 and "max_submissions_per_minute is 3" in r.get_json()["detail"]


def test_max_running_holds_jobs_back_and_others_get_the_slots(hub):
    set_limits(hub, "alice", max_running=1)
    w = hub.register("w", slots=4)
    a_jobs = {submit(hub).get_json()["id"] for _ in range(3)}
    b_jobs = {submit(hub, user=hub.bob).get_json()["id"] for _ in range(3)}
    taken = {j["id"] for j in w.claim(max_jobs=4)}
    assert len(taken & a_jobs) == 1 and taken & b_jobs == b_jobs
    # when alice's job finishes, her next one may start
    [done] = taken & a_jobs
    assert w.result(done, 1).status_code == 200
    assert len({j["id"] for j in w.claim(max_jobs=4)} & a_jobs) == 1


def test_weight_gives_a_larger_share_of_the_slots(hub):
    set_limits(hub, "alice", weight=2)
    # Queued before any slot is free (a free slot takes a job as it arrives):
    # the shares are decided when the slots come.
    a_jobs = {submit(hub).get_json()["id"] for _ in range(5)}
    for _ in range(5):
        submit(hub, user=hub.bob)
    w = hub.register("w", slots=3)
    taken = {j["id"] for j in w.claim(max_jobs=3)}
    assert len(taken & a_jobs) == 2


def test_admin_cli_sets_limits_that_the_api_enforces(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from proxy import close_app, create_app
    from proxy.config import load_config
    from tests.conftest import Users

    env = dict(os.environ, JOBCLOUD_DATA_DIR=str(tmp_path))
    env.pop("JOBCLOUD_DATABASE_URL", None)
    app = create_app(load_config(env={}, overrides={"data_dir": str(tmp_path)}))
    try:
        carol = Users(app).create("carol")
        cli = [str(Path(sys.executable).parent / "jobcloud"), "user", "limits", "carol"]
        out = subprocess.run(cli + ["--max-cpus", "1.5"], env=env, capture_output=True, text=True)
        assert out.returncode == 0 and "max_cpus\t1.5" in out.stdout
        bad = subprocess.run(cli + ["--weight", "0"], env=env, capture_output=True, text=True)
        assert bad.returncode == 1 and "weight must be between" in bad.stderr
        r = app.test_client().post("/api/v1/jobs", headers=carol["headers"],
                                   data={"code": "print(1)", "cpus": "2"},
                                   content_type="multipart/form-data")
        assert r.status_code == 400 and "max_cpus = 1.5" in r.get_json()["detail"]
    finally:
        close_app(app)
