"""The worker among others: two users' jobs side by side on one worker, a job
whose run is lost every time it is tried, and a worker killed -9 while another
one is up. The real proxy under gunicorn, real worker subprocesses, the real
Docker engine with jobcloud/python.
"""
from __future__ import annotations

import io
import os
import re
import secrets
import zipfile

import pytest
import requests

from tests.conftest import require, stop_gunicorn, wait_until
from tests.test_worker_sandbox import (FINAL, Cluster, docker_ready, job_containers, start_cluster,
                                       start_worker, stop_worker)

LABEL_WORKER = "jobcloud.worker"


@pytest.fixture
def docker_client():
    ok, reason = docker_ready()
    require(ok, reason)
    import docker
    return docker.from_env(timeout=30)


@pytest.fixture
def clusters(tmp_path, docker_client):
    """Starts clusters on demand; stops every worker and proxy they end with, and
    removes any container their workers left."""
    started: list[tuple[Cluster, list]] = []

    def start(**kw) -> Cluster:
        c = start_cluster(tmp_path / f"c{len(started)}", gunicorn_workers=2, **kw)
        c.extra = []  # more worker processes a test starts
        c.first = c.worker  # tests point c.worker at another process: this one is stopped too
        c.names = {c.worker_env["JOBCLOUD_WORKER_NAME"]}  # worker names, for the cleanup
        started.append(c)
        return c

    yield start
    for c in started:
        for proc in {id(p): p for p in (c.first, c.worker, *c.extra)}.values():
            stop_worker(proc)
        stop_gunicorn(c.server.proc)
    for name in set().union(*(c.names for c in started)):
        for container in docker_client.containers.list(all=True,
                                                       filters={"label": f"{LABEL_WORKER}={name}"}):
            container.remove(force=True)


def user_headers(c: Cluster, name: str) -> dict:
    c.server.admin("user", "add", name)
    token = re.search(r"jcu_\S+", c.server.admin("token", "create", "--user", name)).group(0)
    return {"Authorization": f"Bearer {token}"}


def submit_as(c: Cluster, headers: dict, code: str, dataset: bytes | None = None, **fields) -> str:
    files = {k: (None, str(v)) for k, v in
             {"code": code, "image": "jobcloud/python", "timeout_s": 60, "memory_mb": 256,
              **fields}.items()}
    if dataset:
        files["dataset"] = ("data.zip", dataset, "application/zip")
    r = requests.post(f"{c.server.url}/api/v1/jobs", headers=headers, files=files, timeout=30)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def job_as(c: Cluster, headers: dict, job_id: str) -> dict:
    return requests.get(f"{c.server.url}/api/v1/jobs/{job_id}", headers=headers, timeout=10).json()


def wait_as(c: Cluster, headers: dict, job_id: str, timeout: float) -> dict:
    def final():
        job = job_as(c, headers, job_id)
        return job if job["state"] in FINAL else None
    try:
        return wait_until(final, timeout=timeout, interval=0.1, what=f"job {job_id} to finish")
    except AssertionError as e:
        raise AssertionError(f"{e}; worker log:\n{c.log_tail()}") from None


def logs_as(c: Cluster, headers: dict, job_id: str) -> str:
    return requests.get(f"{c.server.url}/api/v1/jobs/{job_id}/logs", params={"stream": "stdout"},
                        headers=headers, timeout=10).json()["data"]


def running_container(client, job_id: str, attempt: int):
    found = [c for c in job_containers(client, job_id, attempt) if c.status == "running"]
    return found[0] if found else None


def kill_9(proc) -> None:
    proc.kill()
    proc.wait()


# ------------------------------------------------------------------ isolation

SEARCH = r'''
import os
# Reversed, so that this script itself does not hold the secret it looks for.
SECRET, MINE = {reversed_secret!r}[::-1], {mine!r}
open(f"/job/output/{{MINE}}.txt", "w").write(MINE)
hits, mine, scanned = [], [], 0

def look(path):
    global scanned
    scanned += 1
    name = os.path.basename(path)
    if SECRET in name:
        hits.append(("name", path))
    if MINE in name:
        mine.append(path)
    try:
        if os.path.isfile(path) and not os.path.islink(path) and os.path.getsize(path) < 1 << 20:
            with open(path, "rb") as f:
                if SECRET.encode() in f.read():
                    hits.append(("content", path))
    except OSError:
        pass

def walk(top, skip=()):
    for root, dirs, files in os.walk(top, onerror=lambda e: None):
        dirs[:] = [d for d in dirs if os.path.join(root, d) not in skip]
        for name in dirs + files:
            look(os.path.join(root, name))

walk("/", skip=("/proc", "/sys", "/dev"))
# Every process this container can see, through its cwd, root and environment.
pids = [p for p in os.listdir("/proc") if p.isdigit()]
for pid in pids:
    for part in ("environ", "cmdline"):
        try:
            if SECRET.encode() in open(f"/proc/{{pid}}/{{part}}", "rb").read():
                hits.append((part, pid))
        except OSError:
            pass
    for link in ("cwd", "root"):
        try:
            print("proc", pid, link, os.readlink(f"/proc/{{pid}}/{{link}}"))
        except OSError as e:
            print("proc", pid, link, "unreadable", e.errno)
        walk(f"/proc/{{pid}}/{{link}}/job") if link == "root" else walk(f"/proc/{{pid}}/cwd")
print("pids", pids)
print("scanned", scanned)
print("mine", sorted(mine))
print("HITS" if hits else "no hits", hits)
'''


def test_two_users_jobs_on_one_worker_cannot_see_each_others_files(clusters, docker_client):
    c = clusters(slots=2)
    alice = c.headers
    bob = user_headers(c, "bob")
    secret = "alice-" + secrets.token_hex(8)
    dataset = io.BytesIO()
    with zipfile.ZipFile(dataset, "w") as zf:
        zf.writestr(f"input-{secret}.csv", f"x,y\n1,{secret}\n")
    a = submit_as(c, alice, f"""
import time
open("/job/output/{secret}.txt", "w").write("{secret}")
open("/tmp/{secret}.tmp", "w").write("{secret}")
print("A ready", flush=True)
time.sleep(60)
""", dataset=dataset.getvalue())
    wait_until(lambda: "A ready" in logs_as(c, alice, a), timeout=30, what="job A to write its secret")

    mine = "bob-" + secrets.token_hex(8)
    b = submit_as(c, bob, SEARCH.format(reversed_secret=secret[::-1], mine=mine), timeout_s=90)
    job_b = wait_as(c, bob, b, timeout=90)
    # Bob cannot even look Alice's job up through the API.
    assert requests.get(f"{c.server.url}/api/v1/jobs/{a}", headers=bob, timeout=10).status_code == 404
    out = logs_as(c, bob, b)
    assert job_b["state"] == "succeeded", (job_b, out)
    # A was running on the same worker the whole time B searched.
    assert job_as(c, alice, a)["state"] == "running"
    assert "no hits []" in out, out
    assert "HITS" not in out and secret not in out
    # The search works: it finds B's own file, by path and through /proc/1/cwd.
    assert f"/job/output/{mine}.txt" in out and f"/proc/1/cwd/{mine}.txt" in out, out
    assert int(re.search(r"scanned (\d+)", out).group(1)) > 1000, out
    # Only B's own process is visible: its own PID namespace.
    assert "pids ['1']" in out, out

    r = requests.post(f"{c.server.url}/api/v1/jobs/{a}/cancel", headers=alice, timeout=10)
    assert r.status_code == 200, r.text
    assert c.wait(a, timeout=20)["state"] == "cancelled"


# ---------------------------------------------------------------- attempt limit

CRASHING = "import os, time\nprint('started attempt', os.environ['JOBCLOUD_ATTEMPT'], flush=True)\ntime.sleep(60)"


def test_a_run_lost_every_time_ends_failed_after_the_attempt_limit(clusters, docker_client):
    # Each attempt crashes under the job: its worker dies with kill -9 while the
    # container runs (what a host or daemon crash looks like to the proxy), and
    # a restarted worker reports the run lost. Two attempts, then failed.
    c = clusters(slots=1, proxy_env={"JOBCLOUD_MAX_ATTEMPTS": "2"})
    job_id = c.submit(CRASHING)
    for attempt in (1, 2):
        wait_until(lambda: running_container(docker_client, job_id, attempt), timeout=30,
                   what=f"attempt {attempt} to run")
        assert c.job(job_id)["attempt"] == attempt
        kill_9(c.worker)
        c.worker, _ = start_worker(c.server.url, c.enrollment, c.data_dir, c.worker_log, slots=1,
                                   name=c.worker_env["JOBCLOUD_WORKER_NAME"])
    job = c.wait(job_id, timeout=30)
    assert job["state"] == "failed" and job["failure_reason"] == "worker lost", job
    assert job["attempt"] == 2
    # Not retried again: the restarted worker takes and finishes the next job,
    # while the failed one stays failed with no container of a third attempt.
    assert c.run("print('next')")["state"] == "succeeded"
    job = c.job(job_id)
    assert job["state"] == "failed" and job["attempt"] == 2, job
    assert not job_containers(docker_client, job_id)
    # Each restart removed that attempt's container (and the slot's waiting one, worker `prestart`).
    left = re.findall(r"removed \d+ container\(s\) left by an earlier run: jobs \[(.*)\]", c.log_tail())
    assert [job_id in found for found in left] == [True, True], left


def test_a_container_killed_from_outside_fails_at_once_with_its_exit_code(clusters, docker_client):
    # The job's own container dying (here: `docker kill` by someone else) is the
    # job's outcome, reported by a live worker: failed, not retried.
    c = clusters(slots=1, proxy_env={"JOBCLOUD_MAX_ATTEMPTS": "2"})
    job_id = c.submit(CRASHING)
    container = wait_until(lambda: running_container(docker_client, job_id, 1), timeout=30,
                           what="the job to run")
    container.kill()
    job = c.wait(job_id, timeout=30)
    assert job["state"] == "failed" and job["exit_code"] == 137, job
    assert job["failure_reason"] == "exit code 137" and job["attempt"] == 1, job
    wait_until(lambda: not job_containers(docker_client, job_id), timeout=10,
               what="the container to be removed")


# ------------------------------------------------------------- worker killed -9

def two_workers(clusters, tmp_path) -> tuple[Cluster, dict]:
    """A proxy with 3 s leases (1 s heartbeats) and two one-slot workers.

    Returns:
        (the cluster, {worker name: (process, log path, data dir)}).
    """
    c = clusters(slots=1, proxy_env={"JOBCLOUD_LEASE_TIMEOUT_S": "3",
                                     "JOBCLOUD_HEARTBEAT_INTERVAL_S": "1"})
    second_log, second_name = tmp_path / "worker2.log", f"second-{os.getpid()}"
    second, _ = start_worker(c.server.url, c.enrollment, tmp_path / "worker2", second_log, slots=1,
                             name=second_name)
    c.extra.append(second)
    c.names.add(second_name)
    wait_until(lambda: "registered as" in c.log_tail() and second_log.exists()
               and "registered as" in second_log.read_text(), timeout=30,
               what="both workers to register")
    return c, {c.worker_env["JOBCLOUD_WORKER_NAME"]: (c.worker, c.worker_log, c.data_dir),
               second_name: (second, second_log, tmp_path / "worker2")}

def test_kill_9_one_of_two_workers_requeues_and_the_other_finishes_once(clusters, docker_client, tmp_path):
    c, workers = two_workers(clusters, tmp_path)

    job_id = c.submit("import os, time\nprint('started attempt', os.environ['JOBCLOUD_ATTEMPT'], flush=True)\n"
                      "time.sleep(4)\nopen('attempt.txt', 'w').write(os.environ['JOBCLOUD_ATTEMPT'])")
    first = wait_until(lambda: running_container(docker_client, job_id, 1), timeout=30,
                       what="attempt 1 to run")
    victim = first.labels[LABEL_WORKER]
    victim_proc, victim_log, victim_dir = workers[victim]
    (survivor_proc, survivor_log, _), = [v for k, v in workers.items() if k != victim]
    kill_9(victim_proc)

    # Cluster.wait checks that c.worker is alive: let it watch the survivor.
    c.worker, c.worker_log = survivor_proc, survivor_log
    job = c.wait(job_id, timeout=40)
    assert job["state"] == "succeeded" and job["attempt"] == 2, job
    assert c.outputs(job_id).read("attempt.txt") == b"2"
    assert survivor_log.read_text().count(f"job {job_id}: succeeded (applied=True)") == 1
    # The killed worker's container outlived it; nothing of it reached the proxy.
    leftover = job_containers(docker_client, job_id, 1)
    assert [ct.labels[LABEL_WORKER] for ct in leftover] == [victim]

    # The killed worker comes back: it removes its leftover and posts nothing for the job.
    restarted, _ = start_worker(c.server.url, c.enrollment, victim_dir, victim_log, slots=1, name=victim)
    c.extra.append(restarted)
    # (With its slot's waiting container, worker `prestart`.)
    wait_until(lambda: re.search(r"removed \d+ container\(s\) left by an earlier run: jobs \[.*'"
                                 + re.escape(job_id) + "'", victim_log.read_text()),
               timeout=30, what="the restarted worker to remove its leftover")
    assert not job_containers(docker_client, job_id)
    final = c.job(job_id)
    assert (final["state"], final["attempt"], final["finished_at"]) == ("succeeded", 2, job["finished_at"])
    assert f"job {job_id}: succeeded" not in victim_log.read_text()


def test_a_frozen_worker_that_wakes_after_the_requeue_posts_no_second_result(clusters, docker_client,
                                                                            tmp_path):
    # kill -9 can never post again; a worker frozen (SIGSTOP) past its lease can:
    # its job finished on the other worker meanwhile, and its late result must be
    # refused as stale, leaving the one final result in place.
    import signal
    c, workers = two_workers(clusters, tmp_path)
    job_id = c.submit("import os, time\ntime.sleep(2)\nopen('attempt.txt', 'w').write(os.environ['JOBCLOUD_ATTEMPT'])")
    first = wait_until(lambda: running_container(docker_client, job_id, 1), timeout=30,
                       what="attempt 1 to run")
    frozen_proc, frozen_log, _ = workers[first.labels[LABEL_WORKER]]
    (awake_proc, awake_log, _), = [v for k, v in workers.items() if k != first.labels[LABEL_WORKER]]
    frozen_proc.send_signal(signal.SIGSTOP)
    try:
        c.worker, c.worker_log = awake_proc, awake_log
        job = c.wait(job_id, timeout=40)
    finally:
        frozen_proc.send_signal(signal.SIGCONT)
    assert job["state"] == "succeeded" and job["attempt"] == 2, job
    # Awake again, it finds its container ended (the 2 s sleep ran out while it was frozen)
    # and tries to report attempt 1: refused, or dropped as lost, never applied.
    wait_until(lambda: f"job {job_id}" in frozen_log.read_text().split("registered as", 1)[1]
               and ("refused the result" in frozen_log.read_text()
                    or "no result sent" in frozen_log.read_text()),
               timeout=30, what="the woken worker to give up its stale job")
    assert f"job {job_id}: succeeded (applied=True)" not in frozen_log.read_text()
    final = c.job(job_id)
    assert (final["state"], final["attempt"], final["finished_at"]) == ("succeeded", 2, job["finished_at"])
    assert c.outputs(job_id).read("attempt.txt") == b"2"
    # Marked lost while frozen, the worker registers again and carries on.
    wait_until(lambda: frozen_log.read_text().count("registered as") == 2 and frozen_proc.poll() is None,
               timeout=30, what="the woken worker to register again")
