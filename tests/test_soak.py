"""The short chaos soak (`make soak` runs the long one): a few hundred jobs from
several users through a proxy with several gunicorn processes and three real
workers, while workers are killed -9 and frozen past their lease, the proxy is
restarted gently, killed -9 and frozen past the lease, a worker's link is cut
past the lease, result posts are lost before and after the proxy commits them,
and hostile jobs (a deep tree, a disk filled to its quota, 10^5 files) run in
the mix. Every invariant must hold; about two minutes on 2 cores.

The seed is printed (pytest -s shows it, and a failure repeats it); set
JOBCLOUD_SOAK_SEED to replay a fault schedule and job mix. The second test pins
down, without chance, the one fault the first soaks found. The fast tests at the
end check the checks: a soak where little works must fail, and an overwrite the
Monitor could miss must still be seen.
"""
from __future__ import annotations

import io
import os
import random
import re
import threading
import zipfile
from types import SimpleNamespace

import pytest
import requests

from bench.forms import job_form
from bench.harness import Proxy
from bench.soak import (FAULTS, HOSTILE, WORKER_LOST, Expected, LossyLink, Monitor, Plan,
                        Report, check_outcomes, check_workers, logged_overwrites, plan_jobs,
                        run_soak, watch_final_rows)
from bench.worker import FINAL, IMAGE, LocalWorker
from tests.conftest import require, wait_until
from tests.test_worker_sandbox import docker_ready

SHORT = Plan(jobs=200, users=3, workers=3, slots=2, gunicorn_workers=3, chaos_s=85.0,
             fault_every_s=(3.0, 7.0), settle_s=90.0)


@pytest.mark.slow
@pytest.mark.live
def test_short_soak_keeps_every_invariant(tmp_path):
    ok, reason = docker_ready()
    require(ok, reason)
    seed = os.environ.get("JOBCLOUD_SOAK_SEED")
    plan = Plan(**{**SHORT.__dict__, "seed": int(seed) if seed else None})
    report = run_soak(plan, str(tmp_path))
    table = report.table()
    print(table)
    assert report.violations == 0, table
    # The run proves something only if every kind of fault really happened.
    for kind in FAULTS:
        assert report.counts.get(f"fault {kind}", 0) >= 1, table
    assert report.counts.get("results dropped before the proxy", 0) >= 1, table
    assert report.counts.get("results cut after the proxy answered", 0) >= 1, table
    assert report.counts["jobs requeued at least once"] >= 1, table


@pytest.mark.live
def test_an_input_download_cut_off_runs_the_job_again_instead_of_failing_it(tmp_path):
    # What the first soaks found: a proxy restarting while a worker fetched a
    # job's script failed the job for good. Now it must run again.
    ok, reason = docker_ready()
    require(ok, reason)
    rule = {"script downloads": (re.compile(r"^/api/v1/worker/jobs/[^/]+/script$"), 1.0, 0.0)}
    with Proxy(str(tmp_path)) as proxy:
        user = proxy.add_user("alice")
        enrollment = proxy.enrollment_token()
        proxy.start({"JOBCLOUD_HEARTBEAT_INTERVAL_S": "1", "JOBCLOUD_LEASE_TIMEOUT_S": "3",
                     "JOBCLOUD_GUNICORN_WORKERS": "2"})
        link = LossyLink(proxy.port, random.Random(0), rule)
        threading.Thread(target=link.serve_forever, daemon=True).start()
        try:
            with LocalWorker(proxy, enrollment, 1, name=f"cutoff-{os.getpid()}", url=link.url,
                             env={"JOBCLOUD_WORKER_CLAIM_WAIT_S": "1"}):
                body, content_type = job_form(b"print('ran')\n", {"name": "cut", "image": IMAGE,
                                                                   "timeout_s": "60"})
                r = requests.post(f"{proxy.url}/api/v1/jobs", data=body, timeout=30,
                                  headers={**user.auth, "Content-Type": content_type})
                assert r.status_code == 201, r.text
                job_id = r.json()["id"]
                wait_until(lambda: link.counts["script downloads dropped before the proxy"],
                           timeout=60, what="the script download to be cut off")
                link.dropping = False

                def final():
                    job = requests.get(f"{proxy.url}/api/v1/jobs/{job_id}", headers=user.auth,
                                       timeout=10).json()
                    return job if job["state"] in FINAL else None
                job = wait_until(final, timeout=60, what="the job to end")
        finally:
            link.shutdown()
            link.server_close()
    assert job["state"] == "succeeded", job
    assert job["attempt"] >= 2, job


# ------------------------------------------------------------- the checks checked

def _outcomes(expected: list[Expected], lost: set[int] = frozenset(),
              absent: set[int] = frozenset()) -> Report:
    """check_outcomes over stored jobs that did what the plan says, except the
    `lost` ones (failed: worker lost) and the `absent` ones (never stored)."""
    jobs, logs, zips = {}, {}, {}
    for i, e in enumerate(expected):
        if i in absent:
            continue
        job_id, token = f"j{i}", f"{i:016x}"
        stdout = f"start attempt=1\ndone attempt=1 token={token}\n"
        row = {"id": job_id, "name": f"soak-{i}", "attempt": 1, "state": e.state,
               "exit_code": e.exit_code, "failure_reason": None, "stdout_tail": stdout}
        if i in lost:
            row.update(state="failed", exit_code=None, failure_reason=f"{WORKER_LOST} (6 attempts)",
                       stdout_tail="")
        jobs[job_id], logs[(job_id, 1)] = row, stdout
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            zf.writestr("token.txt", token)
        zips[job_id] = buf.getvalue()
    report = Report(seed=0)
    check_outcomes(report, Plan(jobs=len(expected)), jobs, logs, expected,
                   lambda job: SimpleNamespace(status_code=200, content=zips[job["id"]]))
    return report


PLANNED = [Expected("failed", 3, False) if i % 10 == 0 else Expected("succeeded", 0, i % 4 == 0)
           for i in range(100)]


def test_a_soak_where_every_job_is_lost_fails():
    report = _outcomes(PLANNED, lost=set(range(100)))
    assert report.violations > 0, report.table()


def test_worker_lost_beyond_two_percent_is_a_violation():
    assert _outcomes(PLANNED).violations == 0
    assert _outcomes(PLANNED, lost={1, 2}).violations == 0
    report = _outcomes(PLANNED, lost={1, 2, 3})
    assert [(n, v) for n, _, v in report.invariants if v] == [
        ("at most 2 jobs failed as worker lost (2%)", 3)], report.table()


def test_fewer_than_95_percent_verified_is_a_violation():
    assert _outcomes(PLANNED, absent={5, 6, 7, 8, 9}).violations == 0
    report = _outcomes(PLANNED, absent={4, 5, 6, 7, 8, 9})
    assert [n for n, _, v in report.invariants if v] == [
        "at least 95 planned jobs verified as meant (95%)"], report.table()


def test_the_store_logs_every_change_to_a_final_job(tmp_path):
    with Proxy(str(tmp_path)) as proxy:
        proxy.seed_jobs(proxy.add_user("alice"), 3)
        watch_final_rows(proxy)
        with proxy.db.connection() as conn:
            a, b, c = (r["id"] for r in conn.query("SELECT id FROM jobs ORDER BY id"))
            # Becoming final, and bookkeeping on a final job: not overwrites.
            conn.execute("UPDATE jobs SET state = 'succeeded', exit_code = 0, finished_at = 1"
                         " WHERE id IN (?, ?)", (a, b))
            conn.execute("UPDATE jobs SET cost_currency = 'EUR' WHERE id = ?", (a,))
            conn.execute("UPDATE jobs SET exit_code = NULL WHERE id = ?", (c,))
        assert logged_overwrites(proxy) == []
        with proxy.db.connection() as conn:
            # A late result landing on a final job: an overwrite, even if undone at once.
            conn.execute("UPDATE jobs SET state = 'failed', exit_code = 3 WHERE id = ?", (a,))
            conn.execute("UPDATE jobs SET state = 'succeeded', exit_code = 0 WHERE id = ?", (a,))
            conn.execute("UPDATE jobs SET attempt = 2 WHERE id = ?", (b,))
        logged = logged_overwrites(proxy)
    assert [line.split(":")[0] for line in logged] == [a, a, b], logged
    # (state exit_code attempt finished_at stdout_tail output_sha256), before then after.
    assert "('succeeded' 0 0 1.0 NULL NULL) then ('failed' 3 0 1.0 NULL NULL)" in logged[0], logged


def test_a_failed_monitor_look_is_counted_and_the_watch_goes_on():
    monitor = Monitor(SimpleNamespace(db=None))  # every look fails
    monitor.start()
    wait_until(lambda: len(monitor.errors) >= 2, timeout=10, what="two failed looks")
    assert monitor._thread.is_alive()
    assert "AttributeError" in monitor.errors[0]
    monitor._stop.set()
    monitor._thread.join()


def test_every_soak_plan_has_each_hostile_kind():
    for jobs in (3, 200, 600):
        kinds = [e.kind for e in plan_jobs(Plan(jobs=jobs), random.Random(jobs))]
        assert set(kinds) == {"plain", *HOSTILE} or (jobs == 3 and set(kinds) == set(HOSTILE))


def test_worker_invariants_catch_an_exit_a_slow_recovery_and_a_grown_disk(tmp_path):
    workers = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        workers.append(SimpleNamespace(name=name, data_dir=tmp_path / name))
    baseline = {"a": 0, "b": 0}
    monitor = SimpleNamespace(exits={})
    report = Report(seed=0)
    check_workers(report, workers, monitor, [("freeze_proxy", 1.5), ("kill_proxy", 9.0)],
                  baseline, 2.0)
    assert report.violations == 0, report.table()

    (tmp_path / "b" / "left").write_bytes(b"x" * 2**21)
    monitor.exits = {123: "a (pid 123) exited with 0"}
    report = Report(seed=0)
    check_workers(report, workers, monitor,
                  [("cut_link", 2.5), ("pause_worker", None), ("kill_proxy", 9.0)], baseline, 2.0)
    assert {n: v for n, _, v in report.invariants if v} == {
        "no worker process exited (other than killed -9 by the soak)": 1,
        "every worker active again within 2 s of each partition ending": 2,
        "every worker's disk use back to its baseline (nothing mounted)": 1}, report.table()
