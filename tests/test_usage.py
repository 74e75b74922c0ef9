"""Usage and cost: prices set by admins, each job's cost fixed when it ends, and
/usage totals per day and month that are exactly the sum of the jobs' costs.

Jobs run through the real worker protocol (test_dispatch's Hub). Jobs that must
finish on another day are finished with leases.record_result(now=...), the
same function the result endpoint calls, with the clock moved instead of waiting.
Every test runs on SQLite and on PostgreSQL.
"""
from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from proxy import leases, worker_api
from proxy import usage as usage_mod
from worker.runner import gpu_seconds
from worker.sandbox import Outcome
from tests.test_dispatch import make_hub  # noqa: F401  (fixture)

PRICES = {"currency": "EUR", "cpu_hour": "3.6", "gb_hour": "0.36", "gpu_hour": 36}


@pytest.fixture
def hub(make_hub):  # noqa: F811
    return make_hub()


def set_prices(hub, body: dict, user: dict | None = None):
    return hub.client.put("/api/v1/admin/prices", headers=(user or hub.admin)["headers"], json=body)


def finish(hub, worker, user=None, **usage) -> dict:
    """Submit a job as `user`, let `worker` claim it and post its result with `usage`.

    The proxy bills at most the usage the lease allows (leases.bound_usage), so
    the result is recorded as if the job had run for the wall time it reports.
    """
    fields = {k: usage.pop(k) for k in ("memory_mb", "gpus") if k in usage}
    job_id = hub.submit(user, **fields)
    [job] = worker.claim()
    assert job["id"] == job_id
    result = worker_api.parse_result({"attempt": job["attempt"], "state": "succeeded",
                                      "exit_code": 0, **usage}, hub.config.log_tail_bytes)
    hub.call(leases.record_result, worker.row(), job_id, result, None,
             now=time.time() + (usage.get("wall_seconds") or 0))
    return hub.job(job_id, user or hub.alice)


def finish_gpu_job(hub, worker, **usage) -> dict:
    """A one-GPU job of alice's that `worker` claims now and finishes 30 s later.

    The proxy bills at most the GPU time since the claim, so the job must have held
    its GPU longer than the gpu_seconds reported: the clock is moved, as in _finish_at.
    """
    job_id = hub.submit(memory_mb=512, gpus=1)
    [job] = worker.claim()
    assert job["id"] == job_id
    result = worker_api.parse_result({"attempt": job["attempt"], "state": "succeeded",
                                    "exit_code": 0, **usage}, hub.config.log_tail_bytes)
    hub.call(leases.record_result, worker.row(), job_id, result, None, now=time.time() + 30)
    return hub.job(job_id)


def usage(hub, caller: dict, **params):
    return hub.client.get("/api/v1/usage", headers=caller["headers"], query_string=params)


# ---------------------------------------------------------------------- prices

def test_prices_are_validated_and_admin_only(hub):
    assert set_prices(hub, PRICES, user=hub.alice).status_code == 403
    assert hub.client.get("/api/v1/admin/prices", headers=hub.alice["headers"]).status_code == 403
    for bad in ({"cpu_hour": -1}, {"cpu_hour": "abc"}, {"cpu_hour": "0.0000001"},
                {"gb_hour": 1e7}, {"gpu_hour": True}, {"gpu_hour": "NaN"}, {"gpu_hour": "Infinity"},
                {"gpu_hour": None}, {"gpu_hour": "1e999999"}, {"gpu_hour": 1e308}, {"currency": ""}, {"currency": "<b>EUR</b>"},
                {"currency": 5}, {"cpu": 1}, [1, 2]):
        r = set_prices(hub, bad)
        assert r.status_code == 400, bad
        assert r.get_json()["error"] in ("invalid_prices", "invalid_json"), bad
    # Nothing was changed by the refusals.
    assert hub.client.get("/api/v1/admin/prices", headers=hub.admin["headers"]).get_json()[
        "cpu_hour"] == "0.000000"

    r = set_prices(hub, PRICES)
    assert r.status_code == 200, r.get_json()
    got = hub.client.get("/api/v1/admin/prices", headers=hub.admin["headers"]).get_json()
    assert (got["currency"], got["cpu_hour"], got["gb_hour"], got["gpu_hour"]) == \
        ("EUR", "3.600000", "0.360000", "36.000000")
    assert got["updated_by"] == "root"
    # A partial change keeps the other prices.
    assert set_prices(hub, {"gpu_hour": "0.000001"}).get_json()["cpu_hour"] == "3.600000"


def test_two_admins_changing_different_prices_at_once_both_keep_their_change(hub):
    db = hub.app.extensions["jobcloud"].db
    start = threading.Barrier(2)
    seen = {}

    def change(field: str):
        start.wait()
        with db.connection() as conn:
            seen[field] = [getattr(usage_mod.set_prices(conn, {field: i}, "root"),
                                   f"{field}_micros") for i in range(1, 31)]

    threads = [threading.Thread(target=change, args=(f,)) for f in ("cpu_hour", "gpu_hour")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Each change, as returned and as stored, holds every value its admin set: the
    # other admin's concurrent writes never put back an older one.
    for field in ("cpu_hour", "gpu_hour"):
        assert seen[field] == [i * 1_000_000 for i in range(1, 31)], field
    got = hub.client.get("/api/v1/admin/prices", headers=hub.admin["headers"]).get_json()
    assert (got["cpu_hour"], got["gpu_hour"]) == ("30.000000", "30.000000")


def test_a_job_costs_the_prices_in_force_when_it_finished(hub):
    assert set_prices(hub, PRICES).status_code == 200
    worker = hub.register("gpu-box", gpus=1)
    job = finish_gpu_job(hub, worker, cpu_seconds=2.5, wall_seconds=10.0, gpu_seconds=10.0,
                         peak_memory_bytes=10**6)
    # cpu: 2.5 s at 3.6/h = 0.0025; memory: 0.5 GB reserved x 10 s at 0.36/h = 0.0005;
    # gpu: 10 s at 36/h = 0.1.
    assert job["usage"]["gpu_seconds"] == 10.0
    assert job["cost"] == {"amount": "0.103000", "amount_micros": 103000, "currency": "EUR",
                           "breakdown": {"cpu": "0.002500", "memory": "0.000500",
                                         "gpu": "0.100000"}}

    # New prices apply to jobs finishing from now on, never to finished ones.
    assert set_prices(hub, {"currency": "USD", "cpu_hour": "7.2"}).status_code == 200
    assert hub.job(job["id"])["cost"]["amount"] == "0.103000"
    later = finish_gpu_job(hub, worker, cpu_seconds=2.5, wall_seconds=10.0, gpu_seconds=10.0)
    assert later["cost"]["amount"] == "0.105500" and later["cost"]["currency"] == "USD"

    # A job cancelled while queued is final too: it costs nothing.
    queued = hub.submit(gpus=1)
    assert hub.cancel(queued).status_code == 200
    assert hub.job(queued)["cost"]["amount_micros"] == 0


def test_gpu_seconds_from_a_worker_are_validated(hub):
    worker = hub.register("w1")
    job_id = hub.submit()
    [job] = worker.claim()
    for bad in (-1, "10", True, 2**60):
        r = worker.result(job_id, job["attempt"], gpu_seconds=bad)
        assert r.status_code == 400 and r.get_json()["error"] == "invalid_result", bad
    assert hub.job(job_id)["state"] == "running"


# ----------------------------------------------------------------------- usage

def _finish_at(hub, name: str, when: float, **usage) -> dict:
    """A job of alice's that ran on worker `name` and finished at time `when`."""
    job_id, worker = hub.claimed_at(name, when - 60)
    result = worker_api.parse_result({"attempt": 1, "state": "succeeded", "exit_code": 0, **usage},
                                   hub.config.log_tail_bytes)
    hub.call(leases.record_result, worker.row(), job_id, result, None, now=when)
    return hub.job(job_id)


def test_usage_totals_are_the_sum_of_the_jobs_costs_per_day_and_month(hub):
    # Prices and usage chosen so every job's cost has a rounded last digit.
    assert set_prices(hub, {"currency": "EUR", "cpu_hour": "0.333333", "gb_hour": "0.071111",
                            "gpu_hour": "1.7"}).status_code == 200
    # Two of alice's jobs finished in an earlier month (first: no live worker may take them).
    old_day = time.time() - 40 * 86400
    mine = [_finish_at(hub, "old", old_day, cpu_seconds=123.4, wall_seconds=99.9),
            _finish_at(hub, "old2", old_day + 3600, cpu_seconds=0.01, wall_seconds=0.02)]
    worker = hub.register("w1", slots=8)
    mine += [finish(hub, worker, cpu_seconds=1.1 + i / 7, wall_seconds=3.3 + i / 3,
                    memory_mb=100 + 37 * i) for i in range(7)]
    theirs = [finish(hub, worker, user=hub.bob, cpu_seconds=0.7 * i, wall_seconds=1.9 * i)
              for i in range(1, 4)]
    since = datetime.fromtimestamp(old_day, tz=timezone.utc).date().isoformat()

    def day_of(job):
        return job["finished_at"][:10]

    for period, key in (("day", day_of), ("month", lambda j: j["finished_at"][:7])):
        r = usage(hub, hub.alice, period=period, since=since)
        assert r.status_code == 200, r.get_json()
        data = r.get_json()
        assert data["user"] == "alice"
        [total] = data["totals"]
        assert total["cost_micros"] == sum(j["cost"]["amount_micros"] for j in mine)
        assert total["jobs"] == len(mine)
        assert total["cpu_hours"] == pytest.approx(
            sum(j["usage"]["cpu_seconds"] for j in mine) / 3600, abs=1e-6)
        expected = {}
        for j in mine:
            expected[key(j)] = expected.get(key(j), 0) + j["cost"]["amount_micros"]
        assert {row["period"]: row["cost_micros"] for row in data["rows"]} == expected
        assert sum(row["cost_micros"] for row in data["rows"]) == total["cost_micros"]
        assert {row["user"] for row in data["rows"]} == {"alice"}

        # The CSV download carries the same rows and figures.
        r = hub.client.get("/api/v1/usage.csv", headers=hub.alice["headers"],
                           query_string={"period": period, "since": since})
        assert r.status_code == 200 and r.mimetype == "text/csv"
        assert "attachment" in r.headers["Content-Disposition"]
        rows = list(csv.DictReader(io.StringIO(r.get_data(as_text=True))))
        assert [(c["period"], c["user"], int(c["jobs"]), c["cost"], c["currency"],
                 float(c["cpu_hours"])) for c in rows] == \
            [(j["period"], j["user"], j["jobs"], j["cost"], j["currency"], j["cpu_hours"])
             for j in data["rows"]]

    # Admins see everyone (and each user's share adds up); users only themselves.
    everyone = usage(hub, hub.admin, period="month", since=since).get_json()
    by_user = {}
    for row in everyone["rows"]:
        by_user[row["user"]] = by_user.get(row["user"], 0) + row["cost_micros"]
    assert by_user == {"alice": sum(j["cost"]["amount_micros"] for j in mine),
                       "bob": sum(j["cost"]["amount_micros"] for j in theirs)}
    assert everyone["totals"][0]["cost_micros"] == sum(by_user.values())
    only_bob = usage(hub, hub.admin, user="bob").get_json()
    assert only_bob["user"] == "bob" and only_bob["totals"][0]["jobs"] == len(theirs)
    assert usage(hub, hub.bob).get_json()["totals"][0]["jobs"] == len(theirs)
    assert usage(hub, hub.bob, user="alice").status_code == 404


def test_usage_query_parameters_are_validated(hub):
    for params in ({"period": "week"}, {"since": "2026-13-01"}, {"until": "yesterday"},
                   {"since": "2026-05-02", "until": "2026-05-01"},
                   {"since": "2020-01-01", "until": "2026-01-01"},
                   {"period": "month", "since": "2020-01-01", "until": "2026-01-01"},
                   {"since": "2026-1-1"}, {"until": "0001-01-10"}, {"since": "9999-12-31"},
                   {"period": "month", "until": "0001-01-01"}):
        r = usage(hub, hub.alice, **params)
        assert r.status_code == 400, params
        assert r.get_json()["error"] == "invalid_parameter", params
    assert usage(hub, hub.admin, user="nobody").status_code == 404
    assert hub.client.get("/api/v1/usage").status_code == 401


def test_usage_page_shows_totals_a_chart_and_a_csv_link(hub):
    from tests.conftest import login

    assert set_prices(hub, PRICES).status_code == 200
    worker = hub.register("w1")
    job = finish(hub, worker, cpu_seconds=3600.0, wall_seconds=3600.0, memory_mb=1024)
    login(hub.client, "alice", hub.alice["password"])
    page = hub.client.get("/usage")
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    assert "<svg" in html and "<rect" in html
    assert job["cost"]["amount"] == "3.960000" and "3.960000" in html
    assert "/api/v1/usage.csv" in html
    # The job's own page shows its cost too.
    assert "3.960000 EUR" in hub.client.get(f"/jobs/{job['id']}").get_data(as_text=True)
    bad = hub.client.get("/usage?period=week", headers={"Accept": "text/html"})
    assert bad.status_code == 400 and "period must be day or month" in bad.get_data(as_text=True)
    assert bad.mimetype == "text/html"


def test_without_prices_the_pages_show_usage_only_and_chart_hours(hub):
    """No "0.000000 USD" on any page until an admin sets prices; the usage charts are
    CPU-hours and GB-hours, with the cost chart and columns once something costs."""
    from tests.conftest import login

    worker = hub.register("w1")
    job = finish(hub, worker, cpu_seconds=1800.0, wall_seconds=1800.0, memory_mb=2048)
    assert job["cost"]["amount"] == "0.000000"   # the API keeps its cost object
    day = job["finished_at"][:10]
    login(hub.client, "alice", hub.alice["password"])
    pages = {"usage": hub.client.get(f"/usage?until={day}").get_data(as_text=True),
             "job": hub.client.get(f"/jobs/{job['id']}").get_data(as_text=True),
             "jobs": hub.client.get("/job-status/alice").get_data(as_text=True)}
    for name, page in pages.items():
        assert "USD" not in page and "0.000000" not in page and "Cost" not in page, name
    usage_page = pages["usage"]
    assert 'aria-label="CPU-hours per day"' in usage_page
    assert f"<title>{day}: 0.5 CPU-hours</title>" in usage_page
    assert 'aria-label="GB-hours (reserved memory) per day"' in usage_page
    assert f"<title>{day}: 1 GB-hours</title>" in usage_page
    assert "No prices are set: usage only." in usage_page

    assert set_prices(hub, PRICES).status_code == 200
    priced = finish(hub, worker, cpu_seconds=1800.0, wall_seconds=1800.0, memory_mb=2048)
    usage_page = hub.client.get(f"/usage?until={priced['finished_at'][:10]}").get_data(as_text=True)
    assert "Cost per day (EUR)" in usage_page and 'aria-label="CPU-hours per day"' in usage_page
    assert f"{priced['cost']['amount']} EUR" in hub.client.get(f"/jobs/{priced['id']}").get_data(
        as_text=True)


def test_the_admin_cli_shows_and_sets_prices_in_the_shared_store(hub, database_url, tmp_path):
    env = dict(os.environ, JOBCLOUD_DATABASE_URL=database_url,
               JOBCLOUD_DATA_DIR=str(tmp_path / "cli"))
    jobcloud = str(Path(sys.executable).parent / "jobcloud")
    out = subprocess.run([jobcloud, "prices", "--currency", "CHF", "--cpu-hour", "0.125",
                          "--gpu-hour", "2"], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "cpu_hour\t0.125000" in out.stdout
    # The app (another process in real life) bills with what the CLI stored.
    got = hub.client.get("/api/v1/admin/prices", headers=hub.admin["headers"]).get_json()
    assert (got["currency"], got["cpu_hour"], got["gpu_hour"]) == ("CHF", "0.125000", "2.000000")
    bad = subprocess.run([jobcloud, "prices", "--gb-hour", "-0.5"], env=env, capture_output=True,
                         text=True)
    assert bad.returncode == 1 and "gb_hour must be a price per hour" in bad.stderr


def test_the_worker_reports_its_gpus_for_the_wall_time_as_gpu_seconds():
    outcome = Outcome(state="succeeded", exit_code=0, failure_reason=None, cpu_seconds=3.0,
                      peak_memory_bytes=1, wall_seconds=12.5)
    assert gpu_seconds({"gpus": 2}, outcome) == 25.0
    assert gpu_seconds({"gpus": 0}, outcome) == 0.0
    assert gpu_seconds({"gpus": 1}, Outcome(state="failed", exit_code=None, failure_reason="x",
                                                      cpu_seconds=None, peak_memory_bytes=None,
                                                      wall_seconds=None)) is None


def test_jobs_count_on_their_utc_day_up_to_the_last_instant_before_midnight(hub):
    """The day is floor(finish / 86400) on both databases: PostgreSQL's CAST rounds,
    so a job finished at 23:59:59.6, or at noon (a half day), must not move a day."""
    midnight = (int(time.time()) // 86400 - 3) * 86400
    day_before = datetime.fromtimestamp(midnight - 1, tz=timezone.utc).date().isoformat()
    day_of = datetime.fromtimestamp(midnight, tz=timezone.utc).date().isoformat()
    whens = (midnight - 43200.5, midnight - 43200, midnight - 0.4, midnight, midnight + 43200,
             midnight + 86399.9)
    jobs = [hub.submit() for _ in whens]
    worker = hub.register_at("w", whens[0] - 60, slots=8, cpus=16, memory_mb=65536)
    claimed = hub.claim_at(worker, whens[0] - 60, max_jobs=len(whens))
    assert sorted(j["id"] for j in claimed) == sorted(jobs)
    for job, when in zip(claimed, whens):
        result = worker_api.parse_result({"attempt": job["attempt"], "state": "succeeded",
                                        "exit_code": 0, "cpu_seconds": 1.0, "wall_seconds": 1.0},
                                       hub.config.log_tail_bytes)
        hub.call(leases.record_result, worker.row(), job["id"], result, None, now=when)
    data = usage(hub, hub.admin, period="day", since=day_before, until=day_of).get_json()
    assert {row["period"]: row["jobs"] for row in data["rows"]} == {day_before: 3, day_of: 3}
    month = usage(hub, hub.admin, period="month", since=day_before, until=day_of).get_json()
    assert sum(row["jobs"] for row in month["rows"]) == 6
