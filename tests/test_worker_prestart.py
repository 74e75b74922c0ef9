"""Pre-started sandboxes (worker `prestart`) and the crun runtime, end to end:
the real proxy under gunicorn, the real `jobcloud-worker`, a real Docker engine.

A job finds out which container it runs in from its own mount table (Docker
bind-mounts /var/lib/docker/containers/<id>/hostname into each container),
so the tests can tell a waiting container that was used from one made for
the job, without the worker's help.
"""
from __future__ import annotations

import io
import json
import os
import re
import signal
import zipfile

import pytest
import requests

from tests.conftest import require, stop_gunicorn, wait_until
from tests.test_worker_sandbox import (
    IMAGE,
    docker_ready,
    job_containers,
    start_cluster,
    start_worker,
    stop_worker,
)
from worker import jobdisk
from worker.config import load_config
from worker.errors import ConfigError, SandboxError
from worker.jobdisk import mounts_under
from worker.sandbox import (
    LABEL_JOB,
    LABEL_PRESTART,
    LABEL_WORKER,
    JobSpec,
    Policy,
    Sandbox,
    launch_order,
)

# Printed by every job here: which container it is, what it was given, what it sees.
PROBE = r'''
import json, os, re
mounts = open("/proc/self/mountinfo").read()
container = re.search(r"/containers/([0-9a-f]{64})/hostname", mounts).group(1)
def first(*paths):
    for p in paths:
        try:
            return open(p).read().strip()
        except OSError:
            continue
memory = first("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")
cpu = first("/sys/fs/cgroup/cpu.max")
if cpu is None:
    cpu = first("/sys/fs/cgroup/cpu/cpu.cfs_quota_us") + " " + first("/sys/fs/cgroup/cpu/cpu.cfs_period_us")
def listing(top):
    found = []
    for root, dirs, files in os.walk(top):
        found += [os.path.join(root, n) for n in dirs + files]
    return sorted(found)
pids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines())
try:
    open("/probe-root-write", "w")
    root_writable = True
except OSError:
    root_writable = False
import socket
try:
    localhost = socket.getaddrinfo("localhost", 80, socket.AF_INET)[0][4][0]
except OSError as e:
    localhost = str(e)
print("PROBE " + json.dumps({
    "caps": status["CapEff"].strip(), "no_new_privs": status["NoNewPrivs"].strip(),
    "seccomp": status["Seccomp"].strip(), "root_writable": root_writable, "localhost": localhost,
    "interfaces": sorted(l.split(":")[0].strip() for l in open("/proc/net/dev").readlines()[2:]),
    "pids_max": first("/sys/fs/cgroup/pids.max", "/sys/fs/cgroup/pids/pids.max"),
    "container": container, "memory": memory, "cpu": cpu.split(),
    "env": dict(os.environ), "cwd": os.getcwd(), "uid": os.getuid(), "gid": os.getgid(),
    "pid": os.getpid(), "argv": open("/proc/self/cmdline").read().split("\0"),
    "pids": pids, "tmp": listing("/tmp"), "output": listing("/job/output"),
    "input": listing("/job/input"), "home": listing(os.environ["HOME"]),
    "fds": sorted(os.listdir("/proc/self/fd")),
}), flush=True)
'''


BASE_ENV = {"JOBCLOUD_WORKER_ENROLLMENT_TOKEN": "jce_x", "JOBCLOUD_WORKER_IMAGES": IMAGE}


def test_prestart_is_on_by_default_and_read_from_the_environment_and_the_file(tmp_path):
    assert load_config([], env=BASE_ENV).prestart is True
    assert load_config([], env=dict(BASE_ENV, JOBCLOUD_WORKER_PRESTART="false")).prestart is False
    path = tmp_path / "worker.json"
    path.write_text(json.dumps({"prestart": False}))
    assert load_config(["--config", str(path)], env=BASE_ENV).prestart is False
    with pytest.raises(ConfigError, match="prestart"):
        load_config([], env=dict(BASE_ENV, JOBCLOUD_WORKER_PRESTART="sometimes"))


def probe(cluster, job: dict) -> dict:
    out = cluster.logs(job["id"])["data"]
    found = re.search(r"^PROBE (.*)$", out, re.MULTILINE)
    assert found, (job, out, cluster.logs(job["id"], "stderr")["data"])
    return json.loads(found.group(1))


def waiting_containers(client, worker_name: str) -> dict[str, object]:
    """The worker's waiting containers that are up and have no job yet: {id: container}
    (one released to its job keeps its labels, and is named for the job)."""
    found = client.containers.list(filters={"label": [f"{LABEL_WORKER}={worker_name}", LABEL_PRESTART]},
                                   ignore_removed=True)
    return {c.id: c for c in found if c.status == "running" and c.name.startswith("jobcloud-waiting-")}


def exists(client, container_id: str) -> bool:
    import docker
    try:
        client.containers.get(container_id)
        return True
    except docker.errors.NotFound:
        return False


def worker_name(cluster) -> str:
    return cluster.worker_env["JOBCLOUD_WORKER_NAME"]


@pytest.fixture(scope="module")
def docker_client():
    ok, reason = docker_ready()
    require(ok, reason)
    import docker
    client = docker.from_env(timeout=30)
    yield client
    client.close()


@pytest.fixture(scope="module")
def warm(tmp_path_factory, docker_client):
    """One worker, one slot, prestart on: each job finds at most one container waiting."""
    c = start_cluster(tmp_path_factory.mktemp("warm"), slots=1, gunicorn_workers=2, prestart="true",
                      name=f"warm-{os.getpid()}")
    try:
        yield c
    finally:
        stop_worker(c.worker)
        stop_gunicorn(c.server.proc)


def one_waiting(client, cluster) -> str:
    """The id of the worker's one waiting container, once it is up."""
    def up():
        found = waiting_containers(client, worker_name(cluster))
        return list(found) if len(found) == 1 else None
    return wait_until(up, timeout=60, what="a waiting container")[0]


def test_prestart_runtime_is_the_engines_default_unless_set_and_is_validated():
    assert load_config([], env=BASE_ENV).prestart_runtime == ""
    env = dict(BASE_ENV, JOBCLOUD_WORKER_PRESTART_RUNTIME="crun")
    assert load_config([], env=env).prestart_runtime == "crun"
    with pytest.raises(ConfigError, match="prestart_runtime"):
        load_config([], env=dict(BASE_ENV, JOBCLOUD_WORKER_PRESTART_RUNTIME="cr un"))


def test_a_launch_order_holds_argv_and_environment_and_refuses_a_nul():
    order = launch_order(["python3", "-u", "a b"], {"A": "1=2", "B": "", "C": "é\n"})
    assert order.split(b"\0") == [b"3", b"python3", b"-u", b"a b", b"A=1=2", b"B=", "C=é\n".encode()]
    with pytest.raises(SandboxError, match="NUL"):
        launch_order(["python3"], {"A": "x\0B=injected"})


def test_waiting_sandboxes_run_under_prestart_runtime_and_cold_ones_do_not(tmp_path, docker_client):
    require_crun(docker_client)
    c = start_cluster(tmp_path / "prt", slots=1, gunicorn_workers=2, prestart="true",
                      prestart_runtime="crun", name=f"prt-{os.getpid()}")
    try:
        waiting = one_waiting(docker_client, c)
        # No runtime named for its image in `runtimes`: prestart_runtime's.
        assert docker_client.containers.get(waiting).attrs["HostConfig"]["Runtime"] == "crun"
        job = c.run(PROBE, memory_mb=192, cpus=0.5)
        assert job["state"] == "succeeded", (job, c.logs(job["id"], "stderr"))
        seen = probe(c, job)
        assert seen["container"] == waiting
        assert int(seen["memory"]) == 192 * 1024 * 1024
        assert int(seen["cpu"][0]) * 2 == int(seen["cpu"][1])
        assert seen["pids_max"] == "256" and seen["uid"] == 700_000 and seen["root_writable"] is False
        assert (seen["caps"], seen["no_new_privs"], seen["seccomp"]) == ("0000000000000000", "1", "2")
        assert seen["interfaces"] == ["lo"] and seen["localhost"] == "127.0.0.1"
        if jobdisk.check_available() is None:
            # Another disk size than the waiting container's: the job runs cold, under
            # the engine's default runtime.
            one_waiting(docker_client, c)
            job_id = c.submit(PROBE + "import time\nprint('running', flush=True)\ntime.sleep(60)",
                              disk_mb=64)
            wait_until(lambda: "running" in c.logs(job_id)["data"], timeout=60, what="the job to start")
            cold = docker_client.containers.get(probe(c, {"id": job_id})["container"])
            assert LABEL_PRESTART not in cold.labels
            assert cold.attrs["HostConfig"]["Runtime"] == docker_client.info()["DefaultRuntime"]
            requests.post(f"{c.server.url}/api/v1/jobs/{job_id}/cancel", headers=c.headers, timeout=10)
            assert c.wait(job_id, timeout=15)["state"] == "cancelled"
    finally:
        stop_worker(c.worker)
        stop_gunicorn(c.server.proc)


def test_a_prestart_runtime_that_cannot_make_a_container_falls_back_to_the_default(tmp_path, docker_client):
    """A registered runtime may still fail on a host (crun 1.8 on a hybrid cgroup
    host, docs/PERFORMANCE.md): the waiting container is made under the engine's
    default instead, and so are the next ones. A name the engine lacks fails the
    create the same way."""
    sandbox = Sandbox(docker_client, owner=f"prestart-rt-{os.getpid()}", policy=Policy(
        pids_limit=64, tmpfs_mb=16, nofile=256, fsize_bytes=1 << 20,
        prestart_runtime="jobcloud-no-such-runtime"))
    default = docker_client.info()["DefaultRuntime"]
    made = []
    try:
        for n in range(2):
            input_dir, output_dir = tmp_path / f"in{n}", tmp_path / f"out{n}"
            input_dir.mkdir(mode=0o755)
            output_dir.mkdir(mode=0o777)
            shape = JobSpec(job_id=f"rt{n}-{os.getpid()}", attempt=0, image=IMAGE, cpus=1.0,
                            memory_mb=128, gpus=0, timeout_s=0)
            made.append(sandbox.prestart(shape, input_dir, output_dir))
            container = docker_client.containers.get(made[-1].container.id)
            assert container.attrs["HostConfig"]["Runtime"] == default
            assert container.status == "running"
        assert sandbox.prestart_runtime == ""
    finally:
        for waiting in made:
            sandbox.discard(waiting)
    assert not docker_client.containers.list(all=True, filters={"label": f"{LABEL_WORKER}={sandbox.owner}"})


def test_a_waiting_sandbox_gets_its_jobs_inputs_and_limits_runs_once_and_is_removed(warm, docker_client):
    waiting = one_waiting(docker_client, warm)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("train.csv", "x,y\n1,2\n")
    code = PROBE + "print('data', open(os.environ['JOBCLOUD_DATA'] + '/train.csv').read().split())\n" \
                   "open('result.txt', 'w').write('written by the job')\n"
    # Neither the waiting container's memory (256 MB) nor its CPUs (1): `docker update`.
    job = warm.run(code, dataset=buf.getvalue(), memory_mb=192, cpus=0.5)
    assert job["state"] == "succeeded", (job, warm.logs(job["id"], "stderr"))
    seen = probe(warm, job)
    assert seen["container"] == waiting, "the job did not run in the container that was waiting"
    assert int(seen["memory"]) == 192 * 1024 * 1024, seen["memory"]
    quota, period = seen["cpu"]
    assert int(quota) == int(period) // 2, seen["cpu"]
    assert "data ['x,y', '1,2']" in warm.logs(job["id"])["data"]
    assert seen["input"] == ["/job/input/data", "/job/input/data/train.csv", "/job/input/main.py"]
    assert warm.outputs(job["id"]).read("result.txt") == b"written by the job"
    # Used once: gone with its job, and another one waits in its place.
    wait_until(lambda: not exists(docker_client, waiting), timeout=30, what="the used container to go")
    assert one_waiting(docker_client, warm) != waiting
    # Its time counts from the release, not from when it started waiting.
    usage = job["usage"]
    submitted, finished = (warm.job(job["id"])[k] for k in ("submitted_at", "finished_at"))
    from datetime import datetime
    span = (datetime.fromisoformat(finished.replace("Z", "+00:00"))
            - datetime.fromisoformat(submitted.replace("Z", "+00:00"))).total_seconds()
    assert usage["wall_seconds"] <= span + 0.002, (usage, submitted, finished)
    assert usage["cpu_seconds"] is not None and usage["peak_memory_bytes"] > 1024 * 1024, usage


def test_a_job_sees_nothing_of_the_previous_job_on_its_slot(warm, docker_client):
    first_waiting = one_waiting(docker_client, warm)
    leave = PROBE + """
import subprocess
for d in ["/tmp", os.environ["HOME"], os.getcwd(), "/job/output/sub"]:
    os.makedirs(d, exist_ok=True)
    open(os.path.join(d, "left-by-job-1"), "w").write("secret of job 1")
subprocess.Popen(["sleep", "600"], start_new_session=True)
"""
    first = warm.run(leave)
    assert first["state"] == "succeeded", (first, warm.logs(first["id"], "stderr"))
    seen_first = probe(warm, first)
    assert seen_first["container"] == first_waiting
    second_waiting = one_waiting(docker_client, warm)
    second = warm.run(PROBE)
    assert second["state"] == "succeeded", second
    seen = probe(warm, second)
    assert seen["container"] == second_waiting != first_waiting
    everything = seen["tmp"] + seen["output"] + seen["home"] + seen["input"]
    assert not [p for p in everything if "left-by-job-1" in p or p.endswith("/sub")], everything
    assert seen["input"] == ["/job/input/main.py"] and seen["output"] == [] and seen["tmp"] == []
    # Its own process only (pid 1, and the reading of /proc itself is the same process).
    assert seen["pids"] == [1] and seen["pid"] == 1, seen["pids"]
    assert seen["env"]["JOBCLOUD_JOB_ID"] == second["id"]
    assert first["id"] not in json.dumps(seen)


def test_a_shape_that_does_not_fit_runs_cold_and_sees_what_a_waiting_one_sees(warm, docker_client):
    require(jobdisk.check_available() is None, "per-job disks need root and mkfs.ext4: the disk size"
            " is the shape a waiting container cannot change")
    waiting = one_waiting(docker_client, warm)
    warm_job = warm.run(PROBE)
    assert warm_job["state"] == "succeeded", warm_job
    seen_warm = probe(warm, warm_job)
    assert seen_warm["container"] == waiting
    waiting = one_waiting(docker_client, warm)
    # Another disk size than the waiting container's (the worker's default, 1024 MB).
    cold_job = warm.run(PROBE + "open('out.txt', 'w').write('cold')\n", disk_mb=64)
    assert cold_job["state"] == "succeeded", (cold_job, warm.logs(cold_job["id"], "stderr"))
    seen_cold = probe(warm, cold_job)
    assert seen_cold["container"] != waiting
    assert warm.outputs(cold_job["id"]).read("out.txt") == b"cold"
    # The one that did not fit is removed, and the next one waits in the last job's shape.
    wait_until(lambda: not exists(docker_client, waiting), timeout=30, what="the unfit container to go")
    one_waiting(docker_client, warm)
    # A job sees the same in a waiting container as in one made for it, whichever
    # runtime each runs under (crun for waiting ones where the engine has it).
    for key in ("cwd", "uid", "gid", "pid", "argv", "memory", "cpu", "pids", "fds", "caps",
                "no_new_privs", "seccomp", "root_writable", "localhost", "interfaces", "pids_max"):
        assert seen_warm[key] == seen_cold[key], (key, seen_warm[key], seen_cold[key])
    assert (seen_warm["caps"], seen_warm["no_new_privs"], seen_warm["root_writable"]) == \
        ("0000000000000000", "1", False), seen_warm
    assert seen_warm["interfaces"] == ["lo"] and seen_warm["localhost"] == "127.0.0.1", seen_warm
    for env in (seen_warm["env"], seen_cold["env"]):
        env.pop("JOBCLOUD_JOB_ID")
    assert seen_warm["env"] == seen_cold["env"]


def test_cancel_and_timeout_stop_a_job_in_a_waiting_sandbox(warm, docker_client):
    one_waiting(docker_client, warm)
    job = warm.run("import time\nprint('sleeping', flush=True)\ntime.sleep(120)", timeout_s=2)
    assert job["state"] == "timed_out", job
    one_waiting(docker_client, warm)
    job_id = warm.submit("import time\nprint('started', flush=True)\ntime.sleep(120)")
    wait_until(lambda: "started" in warm.logs(job_id)["data"], timeout=30, what="the job to start")
    # Released to its job, the waiting container and its directory are named for it, as a cold job's.
    [container] = wait_until(lambda: job_containers(docker_client, job_id, 1), timeout=10,
                             what="the job's container, by its name")
    assert LABEL_PRESTART in container.labels and container.name == f"jobcloud-{job_id}-1"
    assert (warm.data_dir / "jobs" / f"{job_id}-1" / "input" / "main.py").is_file()
    r = requests.post(f"{warm.server.url}/api/v1/jobs/{job_id}/cancel", headers=warm.headers, timeout=10)
    assert r.status_code == 200, r.text
    assert warm.wait(job_id, timeout=15)["state"] == "cancelled"


def test_a_killed_worker_leaves_no_waiting_sandbox_after_its_restart(tmp_path, docker_client):
    c = start_cluster(tmp_path / "killed", slots=2, gunicorn_workers=2, prestart="true",
                      name=f"killed-{os.getpid()}")
    name = worker_name(c)
    try:
        before = wait_until(lambda: len(waiting_containers(docker_client, name)) == 2
                            and set(waiting_containers(docker_client, name)),
                            timeout=60, what="two waiting containers")
        c.worker.send_signal(signal.SIGKILL)
        c.worker.wait()
        assert set(waiting_containers(docker_client, name)) == before   # nobody removed them
        c.worker, _ = start_worker(c.server.url, c.enrollment, c.data_dir, c.worker_log, name=name,
                                   slots=2, prestart="true")
        # Its start-up sweep removes the earlier run's first, then it makes its own.
        wait_until(lambda: not [i for i in before if exists(docker_client, i)], timeout=60,
                   what="the earlier run's waiting containers to be removed")
        after = wait_until(lambda: len(waiting_containers(docker_client, name)) == 2
                           and set(waiting_containers(docker_client, name)),
                           timeout=60, what="two new waiting containers")
        assert not after & before
        mine = docker_client.containers.list(all=True, filters={"label": f"{LABEL_WORKER}={name}"})
        assert {x.id for x in mine} == after
        jobs_dir = c.data_dir / "jobs"
        assert len(list(jobs_dir.iterdir())) == 2, list(jobs_dir.iterdir())
        assert len(mounts_under(jobs_dir)) in (0, 2)   # 2 with per-job disks
        assert c.run("print('after the restart')")["state"] == "succeeded"
    finally:
        stop_worker(c.worker)
        stop_gunicorn(c.server.proc)
    # Stopped: nothing of it waits any more, nothing stays mounted.
    assert not docker_client.containers.list(all=True, filters={"label": f"{LABEL_WORKER}={name}"})
    assert not mounts_under(c.data_dir / "jobs")


def test_a_drained_worker_removes_its_waiting_sandboxes_and_fills_them_when_resumed(tmp_path, docker_client):
    c = start_cluster(tmp_path / "drain", slots=2, gunicorn_workers=2, prestart="true",
                      name=f"drain-{os.getpid()}")
    name = worker_name(c)
    try:
        wait_until(lambda: len(waiting_containers(docker_client, name)) == 2, timeout=60,
                   what="two waiting containers")
        c.server.admin("user", "add", "root", "--admin")
        admin = {"Authorization": "Bearer " + re.search(
            r"jcu_\S+", c.server.admin("token", "create", "--user", "root")).group(0)}
        [me] = requests.get(f"{c.server.url}/api/v1/admin/workers", headers=admin,
                            timeout=10).json()["workers"]
        for action, count in (("drain", 0), ("resume", 2)):
            r = requests.post(f"{c.server.url}/api/v1/admin/workers/{me['id']}/{action}",
                              headers=admin, timeout=10)
            assert r.status_code == 200, r.text
            wait_until(lambda count=count: len(docker_client.containers.list(
                all=True, filters={"label": f"{LABEL_WORKER}={name}"}, ignore_removed=True)) == count
                and len(waiting_containers(docker_client, name)) == count,
                timeout=60, what=f"{count} waiting containers after {action}")
    finally:
        stop_worker(c.worker)
        stop_gunicorn(c.server.proc)


def test_prestart_off_starts_a_container_per_job_as_before(tmp_path, docker_client):
    c = start_cluster(tmp_path / "cold", slots=1, gunicorn_workers=2, prestart="false",
                      name=f"cold-{os.getpid()}")
    name = worker_name(c)
    try:
        job_id = c.submit(PROBE + "import time\nprint('running', flush=True)\ntime.sleep(60)")
        wait_until(lambda: "running" in c.logs(job_id)["data"], timeout=60, what="the job to start")
        mine = docker_client.containers.list(all=True, filters={"label": f"{LABEL_WORKER}={name}"})
        assert [x.labels.get(LABEL_JOB) for x in mine] == [job_id]
        assert not waiting_containers(docker_client, name)
        r = requests.post(f"{c.server.url}/api/v1/jobs/{job_id}/cancel", headers=c.headers, timeout=10)
        assert r.status_code == 200, r.text
        job = c.wait(job_id, timeout=15)
        assert job["state"] == "cancelled"
        assert probe(c, job)["container"] == mine[0].id
    finally:
        stop_worker(c.worker)
        stop_gunicorn(c.server.proc)


# ------------------------------------------------------------------- crun

def require_crun(client) -> None:
    """crun registered with the engine and able to start a container (a failure
    under CI when not). crun 1.8 (Debian 12) refuses a cgroup v1 host whose v2
    hierarchy holds a controller ("cgroups in hybrid mode not supported");
    scripts/docker-up.sh moves such controllers to v1 hierarchies of their own
    (docs/PERFORMANCE.md, "crun"), so that is a setup step missed, not a limit."""
    import docker
    require("crun" in client.info().get("Runtimes", {}),
            "the Docker engine has no 'crun' runtime: scripts/system-deps.sh installs crun, "
            "scripts/docker-up.sh registers it")
    try:
        client.containers.run(IMAGE, ["true"], runtime="crun", network_mode="none", remove=True)
    except docker.errors.APIError as e:
        require(False, f"crun is registered but cannot start a container: {e.explanation}; "
                "run scripts/docker-up.sh as root (it moves cgroup v2 controllers off a hybrid host)")


@pytest.mark.parametrize("prestart", ["true", "false"])
def test_a_job_runs_under_crun_when_the_worker_names_it(tmp_path, docker_client, prestart):
    require_crun(docker_client)
    c = start_cluster(tmp_path / "crun", slots=1, gunicorn_workers=2, prestart=prestart,
                      runtimes=f"{IMAGE}=crun", name=f"crun-{prestart}-{os.getpid()}")
    name = worker_name(c)
    try:
        if prestart == "true":
            wait_until(lambda: waiting_containers(docker_client, name), timeout=60,
                       what="a waiting container")
        job_id = c.submit(PROBE + "import time\nprint('running', flush=True)\ntime.sleep(60)")
        wait_until(lambda: "running" in c.logs(job_id)["data"], timeout=60, what="the job to start")
        seen = re.search(r"^PROBE (.*)$", c.logs(job_id)["data"], re.MULTILINE).group(1)
        container = docker_client.containers.get(json.loads(seen)["container"])
        assert container.attrs["HostConfig"]["Runtime"] == "crun"
        assert (LABEL_PRESTART in container.labels) == (prestart == "true")
        requests.post(f"{c.server.url}/api/v1/jobs/{job_id}/cancel", headers=c.headers, timeout=10)
        assert c.wait(job_id, timeout=15)["state"] == "cancelled"
    finally:
        stop_worker(c.worker)
        stop_gunicorn(c.server.proc)
