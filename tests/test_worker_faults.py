"""The worker under faults: the proxy restarting mid-job, graceful shutdown on
SIGTERM, and a restart after a crash cleaning up the earlier run's containers."""
from __future__ import annotations

import re
import signal
from pathlib import Path

import pytest

from tests.conftest import require, start_gunicorn, stop_gunicorn, wait_until
from tests.test_worker_sandbox import docker_ready, job_containers, start_cluster, start_worker, stop_worker


@pytest.fixture
def fresh(tmp_path):
    """A proxy and one worker of its own (slots=2), for tests that break them."""
    ok, reason = docker_ready()
    require(ok, reason)
    c = start_cluster(tmp_path, slots=2, gunicorn_workers=2)
    yield c
    stop_worker(c.worker)
    stop_gunicorn(c.server.proc)


def test_result_arrives_after_the_proxy_restarts_mid_job(fresh):
    job_id = fresh.submit("import time\nprint('started', flush=True)\ntime.sleep(4)\nprint('done')")
    wait_until(lambda: "started" in fresh.logs(job_id)["data"], timeout=30, what="job to start")
    stop_gunicorn(fresh.server.proc)
    # Down for longer than the job: the result must wait and be retried.
    wait_until(lambda: "result waits for the proxy" in fresh.log_tail(), timeout=20,
               what="the worker to retry its result")
    fresh.server.proc = start_gunicorn(fresh.server.env, fresh.port, workers=2)
    job = fresh.wait(job_id, timeout=30)
    assert job["state"] == "succeeded", job
    assert "done" in job.get("stdout", "") or "done" in fresh.logs(job_id)["data"]
    # And it keeps working afterwards.
    assert fresh.run("print('after')")["state"] == "succeeded"


def test_sigterm_lets_running_jobs_finish_then_deregisters(fresh):
    job_id = fresh.submit("import time\nprint('started', flush=True)\ntime.sleep(2)")
    wait_until(lambda: "started" in fresh.logs(job_id)["data"], timeout=30, what="job to start")
    fresh.worker.send_signal(signal.SIGTERM)
    assert fresh.worker.wait(timeout=20) == 0, fresh.log_tail()
    assert fresh.job(job_id)["state"] == "succeeded"
    assert "deregistered" in fresh.log_tail()


def test_second_signal_stops_now_and_a_restart_cleans_up(fresh):
    import docker
    job_id = fresh.submit("import time\nprint('started', flush=True)\ntime.sleep(120)")
    wait_until(lambda: "started" in fresh.logs(job_id)["data"], timeout=30, what="job to start")
    fresh.worker.send_signal(signal.SIGTERM)
    # Two standard signals sent back to back can merge into one pending signal:
    # send the second once the first has been acted on.
    wait_until(lambda: "stopping: waiting up to" in fresh.log_tail(), timeout=20,
               what="the worker to act on the first SIGTERM")
    fresh.worker.send_signal(signal.SIGTERM)
    assert fresh.worker.wait(timeout=20) == 130, fresh.log_tail()
    client = docker.from_env()
    assert not job_containers(client, job_id)
    # Deregistering handed the job back: it runs again on the next worker.
    worker, _ = start_worker(fresh.server.url, fresh.enrollment, fresh.data_dir, fresh.worker_log,
                             slots=2, name=fresh.worker_env["JOBCLOUD_WORKER_NAME"])
    fresh.worker = worker
    wait_until(lambda: fresh.job(job_id)["attempt"] == 2, timeout=30, what="the job to run again")


def test_kill_9_leftovers_are_removed_on_restart(fresh):
    import docker
    job_id = fresh.submit("import time\nprint('started', flush=True)\ntime.sleep(120)")
    wait_until(lambda: "started" in fresh.logs(job_id)["data"], timeout=30, what="job to start")
    fresh.worker.kill()
    fresh.worker.wait()
    client = docker.from_env()
    [left] = job_containers(client, job_id)
    assert left.status == "running", "container should outlive kill -9"
    worker, _ = start_worker(fresh.server.url, fresh.enrollment, fresh.data_dir, fresh.worker_log,
                             slots=2, name=fresh.worker_env["JOBCLOUD_WORKER_NAME"])
    fresh.worker = worker
    # The job's container, and the other slot's waiting one (worker `prestart`).
    wait_until(lambda: re.search(r"removed \d+ container\(s\) left by an earlier run: jobs \[.*'"
                                 + re.escape(job_id) + "'", fresh.log_tail()), timeout=30,
               what="the restarted worker to remove the leftover")
    wait_until(lambda: not job_containers(client, job_id, 1), timeout=10, what="the leftover to go")
    # The earlier registration was deregistered at start: the job is requeued at once and
    # runs again (attempt 2) instead of waiting for the lease to expire.
    wait_until(lambda: fresh.job(job_id)["attempt"] == 2, timeout=30, what="the job to run again")
    assert Path(fresh.data_dir, "worker-secret").exists()


def test_a_worker_killed_after_its_enrollment_expired_rejoins_with_its_saved_secret(fresh):
    """Enrollment tokens expire (make run's after an hour, the scaler's sooner):
    a worker that crashed or was killed later must still come back, with the
    secret it saved, not end with 'register refused' at every restart."""
    import sqlite3
    assert fresh.run("print('before')")["state"] == "succeeded"
    with sqlite3.connect(fresh.server.data_dir / "jobcloud.db") as db:
        db.execute("UPDATE enrollment_tokens SET expires_at = 1")   # long expired
    fresh.worker.kill()
    fresh.worker.wait()
    worker, _ = start_worker(fresh.server.url, fresh.enrollment, fresh.data_dir, fresh.worker_log,
                             slots=2, name=fresh.worker_env["JOBCLOUD_WORKER_NAME"])
    fresh.worker = worker
    wait_until(lambda: fresh.log_tail().count("registered as") >= 2, timeout=30,
               what="the restarted worker to register")
    assert worker.poll() is None, fresh.log_tail()
    assert fresh.run("print('after')")["state"] == "succeeded"
