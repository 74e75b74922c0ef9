"""Many workers at once: separate OS processes claim from one queue and no job
is ever handed out twice, on SQLite and on PostgreSQL, through the Flask app,
through the live gunicorn server, and through two proxy instances sharing one
PostgreSQL database. And a restarted proxy still has every job it accepted.

Each claimer is its own process (multiprocessing, spawn: nothing inherited
but its arguments), registered as its own worker; all of them wait on a
barrier and then claim, post results and claim again until the queue is
empty, reporting every (job id, attempt) they were given.
"""
from __future__ import annotations

import hashlib
import multiprocessing
import os
import queue
import random
import signal
import time
import traceback
from pathlib import Path

import pytest
import requests

from proxy import close_app, create_app
from proxy.config import load_config
from tests.conftest import Users, free_port, start_gunicorn, stop_gunicorn
from worker.client import LeaseLost, WorkerClient

JOBS = 200
CODE = "print('job {}')\n"


# ------------------------------------------------------- inside each claimer process

def work_until_queue_empty(claim, finish, queue_empty, seed: str) -> dict:
    """Claim batches of random size and finish them until no job is left queued.

    Args:
        finish: posts a job's result; returns None, or why the proxy refused it.

    Returns:
        {"claimed": (job id, attempt) of every job this worker was given,
         "refused": the results the proxy did not apply}.
    """
    rng = random.Random(seed)
    claimed, refused = [], []
    while True:
        jobs = claim(rng.randint(1, 4))
        for job in jobs:
            claimed.append((job["id"], job["attempt"]))
            problem = finish(job)
            if problem:
                refused.append(f"{job['id']}: {problem}")
        # Nothing for us and nothing queued: the rest is running elsewhere.
        if not jobs and queue_empty():
            return {"claimed": claimed, "refused": refused}


def _report(results, name: str, body) -> None:
    try:
        results.put((name, "ok", body()))
    except BaseException:  # the parent shows the child's traceback
        results.put((name, "error", traceback.format_exc()))


def claim_through_flask(name, database_url, data_dir, enrollment, user_token, barrier, results):
    """A claimer speaking the worker protocol to its own app instance on the shared store."""
    def body():
        app = create_app(load_config(env={}, overrides={
            "database_url": database_url, "data_dir": data_dir, "log_level": "WARNING"}))
        client = app.test_client()
        r = client.post("/api/v1/workers/register", headers=_bearer(enrollment), json={
            "name": name, "cpus": 4, "memory_mb": 8192, "gpus": 0, "slots": 4,
            "images": ["jobcloud/python"]})
        assert r.status_code == 201, r.get_json()
        secret = _bearer(r.get_json()["secret"])

        def claim(n):
            r = client.post("/api/v1/worker/claim", headers=secret,
                            json={"max_jobs": n, "wait_s": 0.2})
            assert r.status_code == 200, r.get_json()
            return r.get_json()["jobs"]

        def finish(job):
            r = client.post(f"/api/v1/worker/jobs/{job['id']}/result", headers=secret,
                            json={"attempt": job["attempt"], "state": "succeeded", "exit_code": 0})
            if r.status_code != 200 or r.get_json()["applied"] is not True:
                return r.get_json()

        def queue_empty():
            r = client.get("/api/v1/jobs?state=queued&limit=1", headers=_bearer(user_token))
            return r.get_json()["jobs"] == []

        try:
            barrier.wait(timeout=60)
            return work_until_queue_empty(claim, finish, queue_empty, seed=name)
        finally:
            close_app(app)

    _report(results, name, body)


def claim_through_http(name, base_url, enrollment, user_token, scratch_dir, barrier, results):
    """A claimer using the worker daemon's own client against a live proxy; checks each script."""
    def body():
        worker = WorkerClient(base_url)
        worker.register(enrollment, name, cpus=4, memory_mb=8192, gpus=0, slots=4,
                        images=["jobcloud/python"])
        user = requests.Session()
        user.headers.update(_bearer(user_token))
        scratch = Path(scratch_dir) / f"{name}.py"

        def finish(job):
            try:
                worker.download(job["script"]["url"], scratch)
                data = scratch.read_bytes()
                assert hashlib.sha256(data).hexdigest() == job["script"]["sha256"], job["id"]
                answer = worker.post_result(job["id"], {"attempt": job["attempt"],
                                                        "state": "succeeded", "exit_code": 0,
                                                        "stdout": data.decode()})
            except LeaseLost as e:  # 404/409: another worker holds the job
                return str(e)
            return None if answer.applied is True else answer

        def queue_empty():
            r = user.get(f"{base_url}/api/v1/jobs", params={"state": "queued", "limit": 1}, timeout=30)
            r.raise_for_status()
            return r.json()["jobs"] == []

        try:
            barrier.wait(timeout=60)
            return work_until_queue_empty(lambda n: worker.claim(n, wait_s=0.2).jobs, finish,
                                          queue_empty, seed=name)
        finally:
            scratch.unlink(missing_ok=True)
            worker.deregister()

    _report(results, name, body)


def _bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


# ------------------------------------------------------------------ in the test

def run_claimers(target, argument_lists, timeout: float = 60) -> dict[str, dict]:
    """Start one process per argument list, all released at once; return what each reported."""
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(len(argument_lists)), ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args, barrier, results), daemon=True)
             for args in argument_lists]
    for p in procs:
        p.start()
    outcomes = []
    try:
        deadline = time.monotonic() + timeout
        while len(outcomes) < len(procs):
            try:
                outcomes.append(results.get(timeout=0.5))
                if outcomes[-1][1] == "error":
                    barrier.abort()  # release the others at once instead of at their timeout
            except queue.Empty:
                crashed = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                assert not crashed, f"a claimer process died with exit codes {crashed}"
                assert time.monotonic() < deadline, \
                    f"claimers still busy after {timeout}s ({len(outcomes)} of {len(procs)} done)"
    finally:
        for p in procs:
            p.join(timeout=10)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    errors = [f"{name}:\n{body}" for name, status, body in outcomes if status == "error"]
    assert not errors, "\n".join(errors)
    return {name: body for name, _, body in outcomes}


def assert_each_job_claimed_exactly_once(reports: dict, submitted: list[str]) -> None:
    claimed = {name: report["claimed"] for name, report in reports.items()}
    everything = [job_id for jobs in claimed.values() for job_id, _ in jobs]
    twice = sorted({j for j in everything if everything.count(j) > 1})
    assert not twice, f"{len(twice)} jobs were handed out more than once: {twice[:5]}"
    assert sorted(everything) == sorted(submitted)
    assert {attempt for jobs in claimed.values() for _, attempt in jobs} == {1}
    refused = [r for report in reports.values() for r in report["refused"]]
    assert not refused, f"results refused: {refused[:5]}"
    idle = [name for name, jobs in claimed.items() if not jobs]
    assert not idle, f"round-robin gave these workers nothing: {idle}"


def submit_over_http(base_url: str, token: str, n: int, start: int = 0) -> list[str]:
    with requests.Session() as http:
        http.headers.update(_bearer(token))
        ids = []
        for i in range(start, start + n):
            r = http.post(f"{base_url}/api/v1/jobs", files={"code": (None, CODE.format(i))}, timeout=30)
            assert r.status_code == 201, r.text
            ids.append(r.json()["id"])
        return ids


def states_over_http(base_url: str, token: str) -> dict[str, str]:
    r = requests.get(f"{base_url}/api/v1/jobs", params={"limit": 500}, headers=_bearer(token),
                     timeout=30)
    assert r.status_code == 200, r.text
    return {j["id"]: j["state"] for j in r.json()["jobs"]}


@pytest.fixture
def store_app(make_config):
    """Open a proxy app on some store (to make users and tokens there); closed afterwards."""
    apps = []

    def open_app(**overrides):
        app = create_app(make_config(log_level="WARNING", **overrides))
        apps.append(app)
        return app

    yield open_app
    for app in apps:
        close_app(app)


# ------------------------------------------------------------------------ tests

def test_processes_claiming_at_once_never_share_a_job(database_url, store_app, make_config):
    app = store_app(database_url=database_url)
    users = Users(app)
    alice, enrollment = users.create("alice"), users.enrollment()
    client = app.test_client()
    submitted = []
    for i in range(JOBS):
        r = client.post("/api/v1/jobs", headers=alice["headers"], data={"code": CODE.format(i)},
                        content_type="multipart/form-data")
        assert r.status_code == 201, r.get_json()
        submitted.append(r.get_json()["id"])

    data_dir = make_config().data_dir
    claimed = run_claimers(claim_through_flask, [
        (f"proc-{i}", database_url, data_dir, enrollment, alice["token"]) for i in range(6)])

    assert_each_job_claimed_exactly_once(claimed, submitted)
    r = client.get("/api/v1/jobs?limit=500", headers=alice["headers"])
    assert sorted((j["id"], j["state"], j["attempt"]) for j in r.get_json()["jobs"]) == \
        sorted((j, "succeeded", 1) for j in submitted)


def test_worker_daemons_claiming_through_the_live_server_never_share_a_job(live_server, store_app,
                                                                           tmp_path):
    users = Users(store_app(data_dir=str(live_server.data_dir)))
    alice, enrollment = users.create("alice"), users.enrollment()
    submitted = submit_over_http(live_server.url, alice["token"], JOBS)

    claimed = run_claimers(claim_through_http, [
        (f"daemon-{i}", live_server.url, enrollment, alice["token"], str(tmp_path))
        for i in range(4)])

    assert_each_job_claimed_exactly_once(claimed, submitted)
    assert states_over_http(live_server.url, alice["token"]) == {j: "succeeded" for j in submitted}


def test_two_proxy_instances_on_one_postgres_never_share_a_job(pg_url, tmp_path, store_app):
    # Both instances share the database and the data dir (the blobs): a job
    # submitted to one is claimed, and its script downloaded, through either.
    data_dir = tmp_path / "shared"
    users = Users(store_app(database_url=pg_url, data_dir=str(data_dir)))
    alice, enrollment = users.create("alice"), users.enrollment()
    urls, procs = [], []
    try:
        for _ in range(2):
            port = free_port()
            env = dict(os.environ, JOBCLOUD_DATABASE_URL=pg_url, JOBCLOUD_DATA_DIR=str(data_dir),
                       JOBCLOUD_BIND=f"127.0.0.1:{port}", JOBCLOUD_LOG_LEVEL="WARNING")
            env.pop("JOBCLOUD_CONFIG", None)
            procs.append(start_gunicorn(env, port, workers=2))
            urls.append(f"http://127.0.0.1:{port}")
        submitted = (submit_over_http(urls[0], alice["token"], JOBS // 2)
                     + submit_over_http(urls[1], alice["token"], JOBS // 2, start=JOBS // 2))

        claimed = run_claimers(claim_through_http, [
            (f"daemon-{i}", urls[i % 2], enrollment, alice["token"], str(tmp_path))
            for i in range(6)])

        assert_each_job_claimed_exactly_once(claimed, submitted)
        for url in urls:
            assert states_over_http(url, alice["token"]) == {j: "succeeded" for j in submitted}
    finally:
        for proc in procs:
            stop_gunicorn(proc)


def test_a_restarted_proxy_still_has_every_job_it_accepted(live_server, store_app, tmp_path):
    users = Users(store_app(data_dir=str(live_server.data_dir)))
    alice, enrollment = users.create("alice"), users.enrollment()
    port = int(live_server.url.rsplit(":", 1)[1])
    proc = live_server.proc
    try:
        # A clean stop (TERM), then a hard one (KILL): a 201 means it is on disk.
        submitted = submit_over_http(live_server.url, alice["token"], 10)
        stop_gunicorn(proc)
        proc = start_gunicorn(live_server.env, port)
        submitted += submit_over_http(live_server.url, alice["token"], 10, start=10)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc = start_gunicorn(live_server.env, port)

        assert states_over_http(live_server.url, alice["token"]) == {j: "queued" for j in submitted}
        worker = WorkerClient(live_server.url)
        worker.register(enrollment, "after-restart", cpus=4, memory_mb=8192, gpus=0, slots=32,
                        images=["jobcloud/python"])
        jobs = worker.claim(max_jobs=32).jobs
        assert sorted(j["id"] for j in jobs) == sorted(submitted)
        scripts = {}
        for job in jobs:
            path = tmp_path / f"{job['id']}.py"
            worker.download(job["script"]["url"], path)
            scripts[job["id"]] = path.read_text()
        assert sorted(scripts.values()) == sorted(CODE.format(i) for i in range(20))
    finally:
        stop_gunicorn(proc)
