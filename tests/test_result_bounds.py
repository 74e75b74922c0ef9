"""GPU time in a worker's result is bounded by what the lease gave: the job's
GPUs since the claim, 0 for a CPU job, whatever the worker claims. It is billed,
so a rogue worker must not be able to bill GPU time nobody held.

Through the real worker API (test_dispatch's Hub), on SQLite and PostgreSQL;
where time must pass, leases.record_result(now=...) moves the clock.
"""
from __future__ import annotations

import pytest

from proxy import leases, worker_api
from tests.test_dispatch import make_hub  # noqa: F401  (fixture)


@pytest.fixture
def hub(make_hub):  # noqa: F811
    return make_hub()


def test_gpu_time_claimed_for_a_cpu_job_records_zero(hub):
    worker = hub.register("w1", gpus=2)
    job_id = hub.submit()  # gpus=0
    [job] = worker.claim()
    r = worker.result(job_id, job["attempt"], wall_seconds=5.0, gpu_seconds=3600.0)
    assert r.status_code == 200, r.get_json()
    assert hub.job(job_id)["usage"]["gpu_seconds"] == 0
    assert hub.row(job_id)["gpu_seconds"] == 0


def test_gpu_time_is_bounded_by_the_gpus_held_since_the_claim(hub):
    worker = hub.register("gpu-box", gpus=2)
    honest, greedy = hub.submit(gpus=2), hub.submit(gpus=2)
    claimed = {j["id"]: j for j in worker.claim(max_jobs=2)}
    for job_id, reported in ((honest, 15.5), (greedy, 10**6)):
        started = hub.row(job_id)["started_at"]
        result = worker_api.parse_result({"attempt": claimed[job_id]["attempt"], "state": "succeeded",
                                        "exit_code": 0, "gpu_seconds": reported},
                                       hub.config.log_tail_bytes)
        hub.call(leases.record_result, worker.row(), job_id, result, None, now=started + 10)
    # 2 GPUs for 10 s: 20 GPU-seconds at most.
    assert hub.row(honest)["gpu_seconds"] == 15.5
    assert hub.row(greedy)["gpu_seconds"] == 20.0


def test_unknown_gpu_time_stays_unknown(hub):
    worker = hub.register("w1")
    job_id = hub.submit()
    [job] = worker.claim()
    assert worker.result(job_id, job["attempt"]).status_code == 200
    assert hub.row(job_id)["gpu_seconds"] is None
