"""The worker daemon end to end: the real proxy under gunicorn, the real
`jobcloud-worker` as a subprocess, a real Docker engine, jobcloud/python.

One proxy and one worker serve the whole module (starting them per test would
dominate the runtime); each test submits its own jobs and waits for their
final states.
"""
from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import requests

from tests.conftest import LiveServer, free_port, require, start_gunicorn, stop_gunicorn, wait_until
from worker import jobdisk
from worker.config import DEFAULT_JOB_UID
from worker.outputs import MANIFEST

IMAGE = "jobcloud/python"
FINAL = {"succeeded", "failed", "cancelled", "timed_out"}
WORKER_SECRET_MARK = "jcw_"


def docker_ready() -> tuple[bool, str]:
    try:
        import docker
        client = docker.from_env(timeout=10)
        client.ping()
    except Exception as e:  # any failure means: no usable engine here
        return False, f"no Docker engine ({e}); run scripts/docker-up.sh"
    try:
        client.images.get(IMAGE)
    except Exception:
        return False, f"image {IMAGE} missing; run scripts/build-images.sh python"
    return True, ""


def job_containers(client, job_id: str, attempt: int | None = None) -> list:
    """The containers a job ran in, however they were started: labelled with
    the job (made for it), or named for it (a waiting container released to it,
    worker `prestart`: labels cannot change, the name can)."""
    labels = [f"jobcloud.job={job_id}"] + ([f"jobcloud.attempt={attempt}"] if attempt else [])
    name = f"^/?jobcloud-{re.escape(job_id)}-{attempt if attempt else '[0-9]+'}$"
    # ignore_removed: a container removed between the list and its inspect is gone, not an error.
    found = {c.id: c for c in client.containers.list(all=True, filters={"label": labels},
                                                       ignore_removed=True)}
    found.update({c.id: c for c in client.containers.list(all=True, filters={"name": name},
                                                            ignore_removed=True)})
    return list(found.values())


def not_of_a_job(jobs_dir: Path, client, worker_name: str) -> list[str]:
    """What a worker holds besides waiting containers (worker `prestart`) that
    carry nothing of any job: job directories, disks mounted for jobs, job
    containers. A waiting container is named jobcloud-waiting-*, its directory
    jobs/waiting-*, holding no more than its launcher's pipe in input/ and an
    empty writable directory. Empty: nothing of a job is left."""
    found = [f"container {c.name}" for c in client.containers.list(
        all=True, filters={"label": f"jobcloud.worker={worker_name}"}, ignore_removed=True)
        if not c.name.startswith("jobcloud-waiting-") or c.status != "running"]
    if not jobs_dir.exists():
        return found
    for d in jobs_dir.iterdir():
        if not (d.name.startswith("waiting-") and _holds_no_job(d)):
            found.append(f"directory {d.name}: {sorted(p.name for p in d.rglob('*'))[:20]}")
    found += [f"mount {m}" for m in jobdisk.mounts_under(jobs_dir)
              if m.parent.parent != jobs_dir or not m.parent.name.startswith("waiting-")]
    return found


def _holds_no_job(waiting_dir: Path) -> bool:
    entries = {p.name for p in waiting_dir.iterdir()}
    if not entries <= {"input", jobdisk.WRITABLE_NAME, jobdisk.IMAGE_NAME, jobdisk.MOUNT_NAME}:
        return False
    inputs = waiting_dir / "input"
    if inputs.exists() and not {p.name for p in inputs.iterdir()} <= {".jobcloud-launch"}:
        return False
    for writable in (waiting_dir / jobdisk.WRITABLE_NAME,
                     waiting_dir / jobdisk.MOUNT_NAME / jobdisk.WRITABLE_NAME):
        if writable.exists() and any(writable.iterdir()):
            return False
    return True


class Cluster:
    def __init__(self, server: LiveServer, token: str, worker: subprocess.Popen, data_dir: Path,
                 worker_log: Path, env: dict):
        self.server = server
        self.headers = {"Authorization": f"Bearer {token}"}
        self.worker = worker
        self.data_dir = data_dir
        self.worker_log = worker_log
        self.worker_env = env

    def submit(self, code: str, dataset: bytes | None = None, **fields) -> str:
        data = {"code": code, "image": IMAGE, "timeout_s": 60, "memory_mb": 256, **fields}
        # Always multipart, as the API requires, even without a dataset.
        files = {k: (None, str(v)) for k, v in data.items()}
        if dataset:
            files["dataset"] = ("data.zip", dataset, "application/zip")
        r = requests.post(f"{self.server.url}/api/v1/jobs", headers=self.headers, files=files,
                          timeout=30)
        assert r.status_code == 201, r.text
        return r.json()["id"]

    def job(self, job_id: str) -> dict:
        return requests.get(f"{self.server.url}/api/v1/jobs/{job_id}", headers=self.headers,
                            timeout=10).json()

    def wait(self, job_id: str, timeout: float = 60) -> dict:
        def final():
            assert self.worker.poll() is None, f"worker died:\n{self.log_tail()}"
            job = self.job(job_id)
            return job if job["state"] in FINAL else None
        try:
            return wait_until(final, timeout=timeout, interval=0.1, what=f"job {job_id} to finish")
        except AssertionError as e:
            raise AssertionError(f"{e}; job: {self.job(job_id)}\nworker log:\n{self.log_tail()}") from None

    def run(self, code: str, **kw) -> dict:
        return self.wait(self.submit(code, **kw))

    def logs(self, job_id: str, stream: str = "stdout") -> dict:
        return requests.get(f"{self.server.url}/api/v1/jobs/{job_id}/logs",
                            params={"stream": stream}, headers=self.headers, timeout=10).json()

    def outputs(self, job_id: str) -> zipfile.ZipFile:
        r = requests.get(f"{self.server.url}/api/v1/jobs/{job_id}/outputs", headers=self.headers,
                         timeout=30)
        assert r.status_code == 200, r.text
        return zipfile.ZipFile(io.BytesIO(r.content))

    def log_tail(self) -> str:
        return self.worker_log.read_text()[-4000:] if self.worker_log.exists() else ""


def start_worker(url: str, enrollment: str, data_dir: Path, log_path: Path, **extra) -> tuple:
    if jobdisk.check_available() is not None:
        # Not root here: jobs run without a disk quota (test_worker_hostile_jobs
        # needs one, and says so); every other test runs the same.
        extra.setdefault("disk_quota", "false")
    env = dict(os.environ,
               JOBCLOUD_WORKER_PROXY_URL=url, JOBCLOUD_WORKER_ENROLLMENT_TOKEN=enrollment,
               JOBCLOUD_WORKER_NAME=extra.pop("name", f"test-{os.getpid()}"),
               JOBCLOUD_WORKER_SLOTS=str(extra.pop("slots", 3)),
               JOBCLOUD_WORKER_DATA_DIR=str(data_dir),
               JOBCLOUD_WORKER_IMAGES=extra.pop("images", IMAGE),
               JOBCLOUD_WORKER_CLAIM_WAIT_S="5", JOBCLOUD_WORKER_GRACE_S="10",
               JOBCLOUD_WORKER_BACKOFF_MAX_S="1", JOBCLOUD_WORKER_LOG_LEVEL="INFO",
               **{f"JOBCLOUD_WORKER_{k.upper()}": str(v) for k, v in extra.items()})
    log = open(log_path, "ab")
    proc = subprocess.Popen([sys.executable, "-m", "worker.cli"], env=env, stdout=log,
                            stderr=subprocess.STDOUT, cwd=Path(__file__).parent.parent)
    return proc, env


def stop_worker(proc: subprocess.Popen) -> None:
    """SIGTERM (finish running jobs), then a second one (stop them now: the
    worker removes their containers and job disks), then kill -9, which would
    leave a job's disk mounted for the next start's sweep."""
    for sig in (signal.SIGTERM, signal.SIGTERM):
        if proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(timeout=10)
            return
        except subprocess.TimeoutExpired:
            pass
    proc.kill()
    proc.wait()


def start_cluster(base: Path, *, slots: int, gunicorn_workers: int, proxy_env: dict | None = None,
                  worker_images: str = IMAGE, access_log: dict | None = None,
                  **worker_settings) -> Cluster:
    """The real proxy (1 s heartbeats) with one user and one worker subprocess.

    Args:
        proxy_env: JOBCLOUD_* settings for the proxy that win over these defaults.
        worker_images: the worker's allowed images, comma-separated.
        access_log: start_gunicorn's access_log and access_log_format (none by default).
        worker_settings: more of the worker's settings (JOBCLOUD_WORKER_*).
    """
    port = free_port()
    env = dict(os.environ, JOBCLOUD_DATA_DIR=str(base / "proxy"), JOBCLOUD_BIND=f"127.0.0.1:{port}",
               JOBCLOUD_LOG_LEVEL="WARNING", JOBCLOUD_HEARTBEAT_INTERVAL_S="1",
               JOBCLOUD_LEASE_TIMEOUT_S="20")
    env.update(proxy_env or {})
    env.pop("JOBCLOUD_CONFIG", None)
    env.pop("JOBCLOUD_DATABASE_URL", None)
    server = LiveServer(f"http://127.0.0.1:{port}",
                        start_gunicorn(env, port, gunicorn_workers, **(access_log or {})), env,
                        base / "proxy")
    server.admin("user", "add", "alice")
    token = re.search(r"jcu_\S+", server.admin("token", "create", "--user", "alice")).group(0)
    enrollment = re.search(r"jce_\S+", server.admin("enroll", "create")).group(0)
    worker_log = base / "worker.log"
    worker, worker_env = start_worker(server.url, enrollment, base / "worker", worker_log, slots=slots,
                                      images=worker_images, **worker_settings)
    c = Cluster(server, token, worker, base / "worker", worker_log, worker_env)
    c.enrollment, c.port = enrollment, port
    return c


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    ok, reason = docker_ready()
    require(ok, reason)
    c = start_cluster(tmp_path_factory.mktemp("cluster"), slots=3, gunicorn_workers=4)
    try:
        yield c
    finally:
        stop_worker(c.worker)
        stop_gunicorn(c.server.proc)


def test_hello_job_succeeds_with_logs_and_usage(cluster):
    job = cluster.run("print('hello from the sandbox')\nimport sys; print('err', file=sys.stderr)")
    assert job["state"] == "succeeded", job
    assert job["exit_code"] == 0
    assert "hello from the sandbox" in cluster.logs(job["id"])["data"]
    assert "err" in cluster.logs(job["id"], "stderr")["data"]
    assert job["usage"]["wall_seconds"] is not None


def test_a_job_shorter_than_one_poll_still_reports_cpu_and_memory(cluster):
    job = cluster.run("import time\ntime.sleep(0.03)")
    assert job["state"] == "succeeded", job
    assert job["usage"]["cpu_seconds"] is not None, job["usage"]
    assert job["usage"]["peak_memory_bytes"] > 1024 * 1024, job["usage"]


def test_failed_exit_code_is_reported(cluster):
    job = cluster.run("import sys; sys.exit(3)")
    assert job["state"] == "failed" and job["exit_code"] == 3, job


def test_network_is_unreachable(cluster):
    # A loopback port of the host that really listens (the proxy), and TEST-NET-1:
    # with network "none" both fail inside the container, nothing leaves it.
    port = cluster.server.url.rsplit(":", 1)[1]
    code = f"""
import socket
for host, port in [("127.0.0.1", {port}), ("192.0.2.1", 80)]:
    s = socket.socket(); s.settimeout(3)
    try:
        s.connect((host, port)); print("CONNECTED", host)
    except OSError as e:
        print("blocked", host, type(e).__name__)
print(open("/proc/net/dev").read())
"""
    job = cluster.run(code)
    out = cluster.logs(job["id"])["data"]
    assert job["state"] == "succeeded", job
    assert "CONNECTED" not in out and out.count("blocked") == 2, out
    assert "eth0" not in out


def test_the_engines_networking_is_left_out_and_localhost_still_resolves(cluster):
    # network_disabled: no hook of the engine's runs for the container (its
    # libnetwork-setkey re-executes dockerd, the largest CPU cost of a short
    # job), so no /etc/hosts or /etc/resolv.conf of Docker's; the job's own
    # loopback works and "localhost" resolves from the worker's hosts file.
    code = """
import socket
print("localhost", socket.getaddrinfo("localhost", 80, socket.AF_INET)[0][4][0])
server = socket.socket(); server.bind(("localhost", 0)); server.listen()
client = socket.create_connection(server.getsockname(), timeout=3)
client.sendall(b"hi"); print("loopback", server.accept()[0].recv(2))
print("resolv", repr(open("/etc/resolv.conf").read()))
for line in open("/proc/self/mountinfo"):
    fields = line.split()
    if fields[4] in ("/etc/hosts", "/etc/resolv.conf"):
        print("mounted", fields[4], fields[3])
"""
    job = cluster.run(code)
    out = cluster.logs(job["id"])["data"]
    assert job["state"] == "succeeded", (job, cluster.logs(job["id"], "stderr")["data"])
    assert "localhost 127.0.0.1" in out and "loopback b'hi'" in out, out
    assert "nameserver" not in out, out
    [hosts] = [line.split()[2] for line in out.splitlines() if line.startswith("mounted /etc/hosts ")]
    assert hosts.endswith("/etc/hosts") and "/containers/" not in hosts, out
    assert "mounted /etc/resolv.conf" not in out, out


def test_filesystem_privileges_and_environment(cluster):
    code = """
import os
for d in ["/", "/usr", "/etc", "/job/input"]:
    try:
        open(os.path.join(d, "x"), "w"); print("WROTE", d)
    except OSError as e:
        print("readonly", d)
status = open("/proc/self/status").read()
print([l for l in status.splitlines() if l.startswith(("NoNewPrivs", "CapEff", "CapPrm", "CapBnd"))])
print("uid", os.getuid(), "gid", os.getgid())
print("sock", os.path.exists("/var/run/docker.sock"), os.path.exists("/run/docker.sock"))
print("env", sorted(os.environ.items()))
open("/tmp/t", "w").write("tmp ok"); print(open("/tmp/t").read())
open("out.txt", "w").write("relative write goes to the outputs")
"""
    job = cluster.run(code)
    out = cluster.logs(job["id"])["data"]
    assert job["state"] == "succeeded", (job, out)
    assert "WROTE" not in out and out.count("readonly") == 4, out
    assert "'NoNewPrivs:\\t1'" in out and "'CapEff:\\t0000000000000000'" in out, out
    assert "'CapPrm:\\t0000000000000000'" in out
    assert f"uid {DEFAULT_JOB_UID} gid {DEFAULT_JOB_UID}" in out
    assert "sock False False" in out
    assert "tmp ok" in out
    assert WORKER_SECRET_MARK not in out and "jce_" not in out and "ENROLLMENT" not in out
    assert cluster.outputs(job["id"]).read("out.txt") == b"relative write goes to the outputs"


def test_dataset_is_extracted_and_outputs_come_back(cluster):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("train.csv", "x,y\n1,2\n3,4\n")
        zf.writestr("nested/readme.txt", "nested file")
    code = """
import os, json
data = os.environ["JOBCLOUD_DATA"]
rows = open(os.path.join(data, "train.csv")).read().splitlines()
os.makedirs("/job/output/model", exist_ok=True)
json.dump({"rows": len(rows) - 1, "nested": open(data + "/nested/readme.txt").read()},
          open("/job/output/metrics.json", "w"))
open("/job/output/model/weights.bin", "wb").write(bytes(range(256)) * 4)
"""
    job = cluster.run(code, dataset=buf.getvalue())
    assert job["state"] == "succeeded", (job["failure_reason"], cluster.logs(job["id"], "stderr"))
    zf = cluster.outputs(job["id"])
    assert sorted(zf.namelist()) == ["metrics.json", "model/weights.bin"]
    assert zf.read("metrics.json") == b'{"rows": 2, "nested": "nested file"}'
    assert zf.read("model/weights.bin") == bytes(range(256)) * 4


def test_symlinks_in_outputs_yield_nothing_of_the_host(cluster):
    code = """
import os
os.symlink("/etc/hostname", "/job/output/host-hostname")
os.symlink("/etc/shadow", "/job/output/shadow")
os.symlink("/", "/job/output/root")
os.mkfifo("/job/output/fifo")
open("/job/output/real.txt", "w").write("mine")
"""
    job = cluster.run(code)
    assert job["state"] == "succeeded", job
    zf = cluster.outputs(job["id"])
    assert zf.namelist() == ["real.txt", MANIFEST]
    for name in zf.namelist():
        assert b"root:" not in zf.read(name)
    assert job["outputs"]["left_out_reasons"] == {"symlink": 3, "special_file": 1}


def test_memory_far_beyond_the_limit_fails_with_reason(cluster):
    job = cluster.run("b = bytearray(1024 * 1024 * 1024)\nprint('survived')", memory_mb=64)
    assert job["state"] == "failed", job
    assert job["failure_reason"] == "memory limit exceeded"


def test_timeout_kills_within_two_seconds(cluster):
    job = cluster.run("import time\nprint('sleeping', flush=True)\ntime.sleep(120)", timeout_s=2)
    assert job["state"] == "timed_out", job
    assert job["usage"]["wall_seconds"] < 2 + 2, job


def test_fork_bomb_is_contained_and_worker_stays_healthy(cluster):
    code = """
import os, time
n = 0
try:
    for _ in range(100000):
        if os.fork() == 0:
            time.sleep(30); os._exit(0)
        n += 1
except OSError as e:
    print("fork refused after", n, e.errno, flush=True)
os._exit(0)
"""
    job = cluster.run(code, timeout_s=20)
    assert job["state"] in ("succeeded", "failed"), job
    assert "fork refused after" in cluster.logs(job["id"])["data"]
    # The worker still runs the next job.
    assert cluster.run("print('ok')")["state"] == "succeeded"


def test_printing_100_mb_is_truncated(cluster):
    code = "import sys\nline = 'x' * 1023 + '\\n'\nfor _ in range(100 * 1024):\n    sys.stdout.write(line)\nprint('END')"
    job = cluster.run(code, timeout_s=120)
    assert job["state"] == "succeeded", job
    logs = cluster.logs(job["id"])
    assert logs["truncated"] is True
    # Stored: at most the worker's 10 MiB bound, and the tail still ends with the last line.
    first = requests.get(f"{cluster.server.url}/api/v1/jobs/{job['id']}/logs",
                         params={"stream": "stdout", "offset": 0}, headers=cluster.headers).json()
    assert first["data"].startswith("x" * 1023)


def test_cancel_stops_a_running_job(cluster):
    job_id = cluster.submit("import time\nprint('started', flush=True)\ntime.sleep(120)")
    wait_until(lambda: "started" in cluster.logs(job_id)["data"], timeout=30, what="job to start")
    r = requests.post(f"{cluster.server.url}/api/v1/jobs/{job_id}/cancel", headers=cluster.headers,
                      timeout=10)
    assert r.status_code == 200, r.text
    job = cluster.wait(job_id, timeout=15)
    assert job["state"] == "cancelled", job


def test_jobs_run_in_parallel_up_to_the_slots(cluster):
    start = time.monotonic()
    ids = [cluster.submit("import time\ntime.sleep(3)") for _ in range(3)]
    jobs = [cluster.wait(i) for i in ids]
    assert all(j["state"] == "succeeded" for j in jobs), jobs
    assert time.monotonic() - start < 3 * 3, "three 3 s jobs on 3 slots ran one after another"


def test_no_containers_or_job_dirs_left_behind(cluster):
    import docker
    job = cluster.run("print(1)\nopen('left.txt', 'w').write('x')")
    assert job["state"] == "succeeded", job
    client = docker.from_env()
    name = cluster.worker_env["JOBCLOUD_WORKER_NAME"]
    # Only waiting containers stay (worker `prestart`, on by default), and they hold nothing of a job.
    wait_until(lambda: not job_containers(client, job["id"])
               and not not_of_a_job(cluster.data_dir / "jobs", client, name),
               timeout=10, what="containers and job dirs to be removed")
