"""Retry policies (issue 15, proxy/retries.py).

The protocol tests run the real Flask app on SQLite and on a real PostgreSQL,
a worker speaking the worker protocol through the test client; where the
back-off must pass they claim with `now=` past the time the proxy recorded,
never sleeping. The end-to-end test runs a real gunicorn, worker subprocess
and Docker: a script that fails on its first two tries succeeds on its third.
"""
from __future__ import annotations

import hashlib
import io
import json
import re
import threading
from datetime import datetime

import pytest
import requests

from proxy import retries
from proxy.config import load_config
from proxy.errors import ConfigError
from tests.conftest import login
from tests.test_client_cli import Cli
from tests.test_dispatch import Hub, make_hub, zip_bytes  # noqa: F401  (fixture)
from tests.test_worker_sandbox import cluster  # noqa: F401  (fixture: gunicorn, worker, Docker)


def ts(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def deliveries(hub: Hub, job_id: str) -> int:
    with hub.app.extensions["jobcloud"].db.connection() as conn:
        return conn.query_one("SELECT COUNT(*) AS n FROM webhook_deliveries WHERE job_id = ?",
                              (job_id,))["n"]


@pytest.fixture
def hub(make_hub) -> Hub:  # noqa: F811
    return make_hub(webhook_allowed_hosts=("hooks.example.org",), max_retries=5,
                    retry_backoff_max_s=50)


# ------------------------------------------------------------------ submission

@pytest.mark.parametrize("setting, value", [("max_retries", 101), ("max_retries", -1),
                                            ("retry_backoff_max_s", 0)])
def test_the_settings_are_validated_at_load(tmp_path, setting, value):
    with pytest.raises(ConfigError, match=setting):
        load_config(env={}, overrides={"data_dir": str(tmp_path), setting: value})

MALFORMED = [
    ({"retries": "-1"}, "retries must be between 0 and 5"),
    ({"retries": "6"}, "retries must be between 0 and 5"),
    ({"retries": "two"}, "retries must be a whole number"),
    ({"retries": "2", "retry_exit_codes": "0"}, "between 1 and 255"),
    ({"retries": "2", "retry_exit_codes": "3,256"}, "between 1 and 255"),
    ({"retries": "2", "retry_exit_codes": "3;4"}, "whole numbers separated by commas"),
    ({"retry_exit_codes": "3"}, "needs retries of at least 1"),
    ({"retries": "1", "retry_backoff_s": "51"}, "retry_backoff_s must be between 0 and 50"),
]


def test_a_malformed_policy_is_a_clear_400(hub):
    for fields, words in MALFORMED:
        r = hub.client.post("/api/v1/jobs", headers=hub.alice["headers"],
                            data={"code": "print(1)", **fields}, content_type="multipart/form-data")
        assert r.status_code == 400, (fields, r.get_json())
        assert r.get_json()["error"] == "invalid_retry" and words in r.get_json()["detail"], fields


def test_the_policy_is_in_the_job_json(hub):
    job = hub.job(hub.submit(retries=3, retry_exit_codes="4, 3,3", retry_backoff_s=7))
    assert job["retry_policy"] == {"retries": 3, "exit_codes": [3, 4], "backoff_s": 7,
                                   "backoff_max_s": 50, "used": 0}
    assert job["try"] == 1 and job["tries"] == []
    plain = hub.job(hub.submit())
    assert plain["retry_policy"] is None and plain["try"] == 1


# ------------------------------------------------------------------ a try ends

def test_a_retryable_failure_waits_out_its_backoff_and_keeps_each_try(hub):
    job_id = hub.submit(retries=2, retry_exit_codes="3", retry_backoff_s=20,
                        webhook_url="https://hooks.example.org/done")
    w = hub.register("w1")
    [claimed] = w.claim()
    assert (claimed["attempt"], claimed["try"]) == (1, 1)
    assert w.log(job_id, 1, 0, "first try\n").status_code == 200
    r = w.result(job_id, 1, "failed", exit_code=3, failure_reason="exit code 3",
                 stdout="first try\n", cpu_seconds=0.5, wall_seconds=1.0)
    assert r.status_code == 200 and r.get_json()["state"] == "queued", r.get_json()

    job = hub.job(job_id)
    assert job["state"] == "queued" and job["finished_at"] is None and job["try"] == 2
    [first] = job["tries"]
    assert (first["try"], first["attempt"], first["outcome"], first["exit_code"]) == \
        (1, 1, "retried", 3)
    # The first retry waits the base: 20 s after the try ended, as the proxy recorded it.
    retry_at = ts(first["retry_at"])
    assert retry_at - ts(first["ended_at"]) == pytest.approx(20, abs=0.01)
    assert job["waiting"]["reason"] == "retry_backoff"
    assert "try 2 of 3 starts after" in job["waiting"]["detail"]
    assert "exit code 3" in job["waiting"]["detail"]
    assert deliveries(hub, job_id) == 0, "a webhook fired for a try that did not end the job"

    # The dispatcher does not hand it out before its not-before time, then does.
    assert hub.claim_at(w, retry_at - 1) == []
    [again] = hub.claim_at(w, retry_at + 0.01)
    assert again["id"] == job_id and again["attempt"] == 2
    assert w.log(job_id, 2, 0, "second try\n").status_code == 200
    r = w.result(job_id, 2, "failed", exit_code=3, stdout="second try\n")
    assert r.get_json()["state"] == "queued"
    second = hub.job(job_id)["tries"][1]
    # The second retry waits twice the base (40 s, under the 50 s cap).
    assert ts(second["retry_at"]) - ts(second["ended_at"]) == pytest.approx(40, abs=0.01)
    [third] = hub.claim_at(w, ts(second["retry_at"]) + 0.01)
    assert third["attempt"] == 3
    assert w.log(job_id, 3, 0, "third try\n").status_code == 200
    assert w.result(job_id, 3, "succeeded", exit_code=0).get_json()["state"] == "succeeded"

    job = hub.job(job_id)
    assert job["state"] == "succeeded" and job["attempt"] == 3
    assert [(t["try"], t["outcome"], t["exit_code"]) for t in job["tries"]] == \
        [(1, "retried", 3), (2, "retried", 3), (3, "final", 0)]
    assert job["retry_policy"]["used"] == 2
    # Each try's logs stay readable after the next ran, through the links in `tries`.
    for n, t in enumerate(job["tries"], 1):
        logs = hub.client.get(t["logs"]["stdout"], headers=hub.alice["headers"]).get_json()
        assert logs["data"] == ["first", "second", "third"][n - 1] + " try\n"
        assert logs["attempt"] == n
    assert hub.logs(job_id)["data"] == "third try\n"
    assert hub.client.get(f"/api/v1/jobs/{job_id}/logs?attempt=9",
                          headers=hub.alice["headers"]).status_code == 404
    assert deliveries(hub, job_id) == 1


def test_the_last_retry_used_ends_the_job(hub):
    job_id = hub.submit(retries=1, retry_backoff_s=0)
    w = hub.register("w1")
    w.claim()
    assert w.result(job_id, 1, "failed", exit_code=9).get_json()["state"] == "queued"
    [again] = w.claim()   # a back-off of 0: due at once
    assert again["try"] == 2
    assert w.result(job_id, 2, "failed", exit_code=9).get_json()["state"] == "failed"
    job = hub.job(job_id)
    assert [t["outcome"] for t in job["tries"]] == ["retried", "final"]


NOT_RETRIED = [
    ("3", "failed", {"exit_code": 4}, "an exit code not in the list"),
    ("", "timed_out", {"exit_code": 137, "failure_reason": "timeout exceeded"}, "a timeout"),
    ("", "failed", {"exit_code": 137, "failure_reason": "memory limit exceeded"},
     "an OOM kill without 137 in the list"),
    ("", "failed", {"exit_code": None, "failure_reason": "cannot start the container"},
     "a failure without an exit code"),
    ("", "cancelled", {"exit_code": 143}, "a cancel"),
]


def test_what_is_not_retried_ends_the_job(hub):
    w = hub.register("w1")
    for codes, state, result, why in NOT_RETRIED:
        job_id = hub.submit(retries=3, retry_exit_codes=codes, retry_backoff_s=0)
        w.claim()
        r = w.result(job_id, 1, state, **result)
        assert r.get_json()["state"] == state, why
        job = hub.job(job_id)
        assert job["retry_policy"]["used"] == 0, why
        assert [t["outcome"] for t in job["tries"]] == ["final"], why


def test_an_oom_kill_is_retried_when_137_is_listed(hub):
    job_id = hub.submit(retries=1, retry_exit_codes="137", retry_backoff_s=0)
    w = hub.register("w1")
    w.claim()
    r = w.result(job_id, 1, "failed", exit_code=137, failure_reason="memory limit exceeded")
    assert r.get_json()["state"] == "queued"


def test_a_failure_after_a_cancel_request_is_not_retried(hub):
    job_id = hub.submit(retries=3, retry_backoff_s=0)
    w = hub.register("w1")
    w.claim()
    assert hub.cancel(job_id).status_code == 200
    assert w.result(job_id, 1, "failed", exit_code=1).get_json()["state"] == "failed"


def test_a_job_in_its_backoff_can_be_cancelled(hub):
    job_id = hub.submit(retries=3, retry_backoff_s=30)
    w = hub.register("w1")
    w.claim()
    w.result(job_id, 1, "failed", exit_code=1)
    assert hub.cancel(job_id).get_json()["state"] == "cancelled"
    job = hub.job(job_id)
    assert [t["outcome"] for t in job["tries"]] == ["retried"]
    assert hub.claim_at(w, ts(job["tries"][0]["retry_at"]) + 1) == []


def test_a_lost_worker_rerun_is_not_a_policy_retry(hub):
    job_id = hub.submit(retries=1, retry_backoff_s=0)
    lost = hub.register("lost")
    lost.claim()
    assert lost.log(job_id, 1, 0, "before the loss\n").status_code == 200
    # The worker goes away holding the job: the lease's requeue (leases.requeue).
    assert lost.post("deregister").status_code == 200
    job = hub.job(job_id)
    assert job["state"] == "queued" and job["retry_policy"]["used"] == 0
    assert [(t["try"], t["attempt"], t["outcome"]) for t in job["tries"]] == \
        [(1, 1, "worker_lost")]
    w = hub.register("w2")
    [rerun] = w.claim()
    # The same try again, under a new attempt.
    assert (rerun["attempt"], rerun["try"]) == (2, 1)
    assert w.result(job_id, 2, "failed", exit_code=1).get_json()["state"] == "queued"
    [retry] = w.claim()
    assert (retry["attempt"], retry["try"]) == (3, 2)
    assert w.result(job_id, 3, "succeeded", exit_code=0).get_json()["state"] == "succeeded"
    job = hub.job(job_id)
    assert [(t["try"], t["attempt"], t["outcome"]) for t in job["tries"]] == \
        [(1, 1, "worker_lost"), (1, 2, "retried"), (2, 3, "final")]
    lost_logs = hub.client.get(job["tries"][0]["logs"]["stdout"], headers=hub.alice["headers"])
    assert lost_logs.get_json()["data"] == "before the loss\n"


def test_policy_retries_do_not_use_up_the_lost_worker_attempts(make_hub):  # noqa: F811
    hub = make_hub(max_attempts=2)
    job_id = hub.submit(retries=2, retry_backoff_s=0)
    w = hub.register("w1")
    for attempt in (1, 2):
        w.claim()
        assert w.result(job_id, attempt, "failed", exit_code=1).get_json()["state"] == "queued"
    [j] = w.claim()
    assert j["attempt"] == 3
    w.post("deregister")
    # One lost-worker attempt of max_attempts=2 used: it runs again.
    assert hub.job(job_id)["state"] == "queued"


def test_a_waiting_claim_takes_the_job_when_its_backoff_ends(hub):
    job_id = hub.submit(retries=1, retry_backoff_s=1)
    w = hub.register("w1")
    w.claim()
    w.result(job_id, 1, "failed", exit_code=1)
    # Claims long-poll up to 20 s each; the back-off's own wake-up may answer one
    # early (empty), then the next waits until the back-off ends: the job comes
    # well before any one long-poll could have run out.
    answers = []

    def claim_until_taken():
        while not any(a.get("jobs") for a in answers) and len(answers) < 5:
            answers.append(w.post("claim", {"max_jobs": 1, "wait_s": 20}).get_json())
    t = threading.Thread(target=claim_until_taken, daemon=True)
    t.start()
    t.join(timeout=15)
    assert [j["id"] for a in answers for j in a["jobs"]] == [job_id], answers
    row = hub.row(job_id)
    assert row["started_at"] >= row["not_before"]


def test_retention_deletes_the_earlier_tries_logs_and_keeps_their_exits(make_hub):  # noqa: F811
    hub = make_hub(retention_sweep_s=86400.0)
    job_id = hub.submit(retries=1, retry_backoff_s=0)
    w = hub.register("w1")
    w.claim()
    w.result(job_id, 1, "failed", exit_code=5, stdout="first try's tail\n")
    w.claim()
    w.result(job_id, 2, "succeeded", exit_code=0)
    tail = hub.client.get(f"/api/v1/jobs/{job_id}/logs?attempt=1", headers=hub.alice["headers"])
    assert tail.get_json()["data"] == "first try's tail\n"
    with hub.app.extensions["jobcloud"].db.connection() as conn, conn.transaction():
        conn.execute("UPDATE jobs SET finished_at = ? WHERE id = ?", (1.0, job_id))
    assert hub.app.extensions["jobcloud_retention"].run_once().expired_jobs == [job_id]
    with hub.app.extensions["jobcloud"].db.connection() as conn:
        row = conn.query_one("SELECT * FROM job_tries WHERE job_id = ?", (job_id,))
    assert (row["exit_code"], row["stdout_tail"]) == (5, None)
    assert hub.client.get(f"/api/v1/jobs/{job_id}/logs?attempt=1",
                          headers=hub.alice["headers"]).status_code == 410


def post_outputs(w, job_id: str, attempt: int, state: str, outputs: bytes):
    r = w.hub.client.post(f"/api/v1/worker/jobs/{job_id}/result", headers=w.headers,
                          content_type="multipart/form-data", data={
                              "result": json.dumps({"attempt": attempt, "state": state,
                                                    "exit_code": 0 if state == "succeeded" else 1}),
                              "outputs": (io.BytesIO(outputs), "outputs.zip", "application/zip")})
    assert r.status_code == 200, r.get_json()
    return r.get_json()["state"]


def test_a_retried_tries_outputs_are_deleted_unless_a_job_refers_to_them(make_hub):  # noqa: F811
    hub = make_hub(max_retries=5, retention_sweep_s=86400.0)
    blobs = hub.app.extensions["jobcloud"].blobs
    first, shared, final = (zip_bytes(**{"out.txt": f"try {n}\n"}) for n in (1, 2, 3))
    w = hub.register("w1")
    # Another job keeps an archive the second try writes too (blobs are shared by content).
    other = hub.submit()
    w.claim()
    assert post_outputs(w, other, 1, "succeeded", shared) == "succeeded"

    job_id = hub.submit(retries=2, retry_backoff_s=0)
    for attempt, archive in ((1, first), (2, shared)):
        [claimed] = w.claim()
        assert claimed["id"] == job_id
        assert post_outputs(w, job_id, attempt, "failed", archive) == "queued"
    w.claim()
    assert post_outputs(w, job_id, 3, "succeeded", final) == "succeeded"

    sha = {name: hashlib.sha256(data).hexdigest()
           for name, data in (("first", first), ("shared", shared), ("final", final))}
    assert hub.job(job_id)["outputs"]["sha256"] == sha["final"]
    swept = hub.app.extensions["jobcloud_retention"].run_once()
    assert list(swept.deleted) == [sha["first"]]
    on_disk = {name for name, blob in sha.items() if blobs.path(blob).exists()}
    assert on_disk == {"shared", "final"}
    r = hub.client.get(f"/api/v1/jobs/{job_id}/outputs", headers=hub.alice["headers"])
    assert r.status_code == 200 and r.data == final


def test_the_cost_prices_every_try_and_the_usage_report_counts_them(hub):
    prices = {"currency": "EUR", "cpu_hour": "3.6", "gb_hour": "0.36"}
    assert hub.client.put("/api/v1/admin/prices", headers=hub.admin["headers"],
                          json=prices).status_code == 200
    job_id = hub.submit(retries=2, retry_backoff_s=0, memory_mb=1024)
    w = hub.register("w1")
    # 1, 2 and 3 CPU seconds (and wall seconds): within what each lease allows.
    for attempt in (1, 2, 3):
        w.claim()
        state = "succeeded" if attempt == 3 else "failed"
        r = w.result(job_id, attempt, state, cpu_seconds=float(attempt),
                     wall_seconds=float(attempt), peak_memory_bytes=attempt * 10**6)
        assert r.get_json()["state"] == ("succeeded" if attempt == 3 else "queued")

    job = hub.job(job_id)
    assert job["usage"]["cpu_seconds"] == 3.0   # the last try's
    assert job["usage_all_tries"] == {"tries": 3, "cpu_seconds": 6.0, "wall_seconds": 6.0,
                                      "peak_memory_bytes": 3 * 10**6, "gpu_seconds": None}
    # cpu: 6 s at 3.6/h = 0.006; memory: 1 GB reserved x 6 s at 0.36/h = 0.0006.
    assert job["cost"]["breakdown"] == {"cpu": "0.006000", "memory": "0.000600",
                                        "gpu": "0.000000"}
    assert job["cost"]["amount"] == "0.006600"
    [total] = hub.client.get("/api/v1/usage", headers=hub.alice["headers"]).get_json()["totals"]
    assert (total["jobs"], total["cpu_hours"], total["gb_hours"], total["cost"]) == \
        (1, round(6 / 3600, 6), round(6 / 3600, 6), "0.006600")
    login(hub.client, "alice", hub.alice["password"])
    page = hub.client.get(f"/jobs/{job_id}").get_data(as_text=True)
    assert re.search(r'id="cost">0\.006600 EUR \(all 3 tries\)</dd>', page), page


def test_the_job_page_shows_each_try_with_its_logs(hub):
    job_id = hub.submit(retries=1, retry_exit_codes="3", retry_backoff_s=0)
    w = hub.register("w1")
    w.claim()
    w.result(job_id, 1, "failed", exit_code=3, failure_reason="exit code 3")
    w.claim()
    w.result(job_id, 2, "succeeded", exit_code=0)
    login(hub.client, "alice", hub.alice["password"])
    page = hub.client.get(f"/jobs/{job_id}").get_data(as_text=True)
    table = page[page.index('id="tries"'):page.index("</table>")]
    rows = re.findall(r'data-attempt="(\d)" data-outcome="(\w+)"', table)
    assert rows == [("1", "retried"), ("2", "final")]
    assert f"/api/v1/jobs/{job_id}/logs?attempt=1&amp;stream=stdout" in table
    assert "exit code 3" in table and "Retried up to 1 time(s) on exit code 3" in page


def test_the_claim_carries_the_try_the_worker_puts_in_the_environment(hub):
    job_id = hub.submit(retries=1, retry_backoff_s=0)
    w = hub.register("w1")
    w.claim()
    w.result(job_id, 1, "failed", exit_code=1)
    [claimed] = w.claim()
    from worker.sandbox import JobSpec, job_environment
    spec = JobSpec(job_id=claimed["id"], attempt=claimed["attempt"], image=claimed["image"],
                   cpus=1, memory_mb=64, gpus=0, timeout_s=1, try_number=claimed["try"])
    assert job_environment(spec)["JOBCLOUD_TRY"] == "2"


def test_dispatch_filters_the_queue_only_while_a_job_is_in_its_backoff(hub):
    job_id = hub.submit(retries=1, retry_backoff_s=30)
    w = hub.register("w1")
    with hub.app.extensions["jobcloud"].db.connection() as conn:
        assert retries.due_filter(conn, w.row()["registered_at"]) == ("", ())
    w.claim()
    w.result(job_id, 1, "failed", exit_code=1)
    retry_at = hub.row(job_id)["not_before"]
    with hub.app.extensions["jobcloud"].db.connection() as conn:
        assert retries.due_filter(conn, retry_at - 1)[0] != ""
        assert retries.due_filter(conn, retry_at) == ("", ())


# ------------------------------------------------------------------ end to end

TRIES_SCRIPT = """\
import os, sys
n = int(os.environ["JOBCLOUD_TRY"])
print(f"try {n} attempt {os.environ['JOBCLOUD_ATTEMPT']}")
sys.exit(3 if n < 3 else 0)
"""


@pytest.mark.live
def test_a_script_failing_twice_succeeds_on_its_third_try(cluster, tmp_path):  # noqa: F811
    cli = Cli(tmp_path / "cfg" / "config.json", tmp_path)
    cli.login(cluster.server.url, cluster.headers["Authorization"].split()[1])
    (tmp_path / "flaky.py").write_text(TRIES_SCRIPT)
    r = cli("submit", "flaky.py", "--memory", "256", "--timeout", "60", "--retries", "3",
            "--retry-on", "3", "--retry-backoff", "1", "--json")
    assert r.returncode == 0, r.stderr
    job_id = json.loads(r.stdout)["id"]
    job = cluster.wait(job_id, timeout=120)
    assert job["state"] == "succeeded", job
    tries = job["tries"]
    assert [(t["try"], t["outcome"], t["exit_code"]) for t in tries] == \
        [(1, "retried", 3), (2, "retried", 3), (3, "final", 0)]
    for n, t in enumerate(tries, 1):
        r = requests.get(cluster.server.url + t["logs"]["stdout"], headers=cluster.headers,
                         timeout=10)
        assert r.json()["data"] == f"try {n} attempt {n}\n", r.json()
    # The back-off, from the proxy's own records: each try started at least
    # base * 2^(k-1) after the one before ended.
    for k in (1, 2):
        assert ts(tries[k]["started_at"]) - ts(tries[k - 1]["ended_at"]) >= 2 ** (k - 1) - 0.01
        assert ts(tries[k]["started_at"]) >= ts(tries[k - 1]["retry_at"])
    status = cli("status", job_id).stdout
    assert "retries:   2 of 3 used, on exit codes 3" in status, status
    assert re.search(r"try 1: +attempt 1: retried, exit code 3", status), status
    assert re.search(r"try 3: +attempt 3: succeeded, exit code 0", status), status


@pytest.mark.live
def test_an_exit_code_not_in_the_list_is_not_retried(cluster):  # noqa: F811
    job = cluster.wait(cluster.submit("import sys; sys.exit(4)", retries=3, retry_exit_codes="3",
                                      retry_backoff_s=1), timeout=60)
    assert job["state"] == "failed" and job["exit_code"] == 4, job
    assert [t["outcome"] for t in job["tries"]] == ["final"]
