"""Jobs that try to break their worker (issue 12): a tree deeper than Python's
recursion limit, a disk filled past the job's quota, files the archive cannot
hold, a setuid binary left behind. The worker must end each such job with an
honest result, give its slot back, keep its own disk, and start again over
whatever a killed run left.

The real proxy under gunicorn, the real worker subprocess, a real Docker
engine, real loop-mounted job disks (so: root). The worker has one slot: a
job that kept its slot would leave the next job queued for ever.
"""
from __future__ import annotations

import grp
import json
import os
import pwd
import re
import stat
from pathlib import Path

import pytest

from tests.conftest import require, stop_gunicorn, wait_until
from tests.test_client_cli import Cli
from tests.test_worker_sandbox import docker_ready, not_of_a_job, start_cluster, start_worker, stop_worker
from worker import jobdisk
from worker.jobdisk import JobDisk
from worker.outputs import MANIFEST
from worker.trees import remove_tree

MAX_FILES = 5
MAX_BYTES = 64 * 1024


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    ok, reason = docker_ready()
    require(ok, reason)
    why = jobdisk.check_available()
    require(why is None, f"per-job disks cannot be made here: {why}")
    c = start_cluster(tmp_path_factory.mktemp("hostile"), slots=1, gunicorn_workers=2,
                      output_max_files=MAX_FILES, output_max_bytes=MAX_BYTES)
    try:
        yield c
    finally:
        stop_worker(c.worker)
        stop_gunicorn(c.server.proc)


def job_disk_of(cluster, job_id: str) -> Path:
    """The job's writable directory on the worker's host (its disk's mount)."""
    return cluster.data_dir / "jobs" / f"{job_id}-1" / jobdisk.MOUNT_NAME / jobdisk.WRITABLE_NAME


def worker_is_clean(cluster) -> bool:
    """No job directory, disk or container left: only waiting containers (worker
    `prestart`) holding nothing of a job."""
    import docker
    return not not_of_a_job(cluster.data_dir / "jobs", docker.from_env(),
                            cluster.worker_env["JOBCLOUD_WORKER_NAME"])


DEEP_TREE = """
import os
for _ in range(1500):   # past Python's recursion limit (1,000)
    os.mkdir("d"); os.chdir("d")
open("bottom.txt", "w").write("deep")
os.chdir("/job/output")
os.makedirs("locked/inner"); open("locked/inner/x.txt", "w").write("x")
os.chmod("locked/inner", 0); os.chmod("locked", 0)
open("readonly.txt", "w").write("r"); os.chmod("readonly.txt", 0o400); os.chmod(".", 0o500)
print("tree made", flush=True)
"""


def test_a_job_leaving_a_deep_tree_ends_and_the_worker_claims_the_next(cluster):
    job = cluster.run(DEEP_TREE)
    assert job["state"] == "succeeded", (job, cluster.log_tail())
    zf = cluster.outputs(job["id"])
    assert "readonly.txt" in zf.namelist() and "locked/inner/x.txt" in zf.namelist(), zf.namelist()
    # The one slot came back: the next job is claimed and runs.
    assert cluster.run("print('next')")["state"] == "succeeded"
    wait_until(lambda: worker_is_clean(cluster), timeout=10, what="job dirs and disks to be removed")


def test_a_worker_starts_over_a_deep_job_dir_and_a_mounted_disk_a_killed_run_left(cluster, tmp_path):
    data = tmp_path / "worker"
    left = data / "jobs" / "jleft-1"
    left.mkdir(parents=True)
    fd = os.open(left, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(1100):  # 45,100 characters deep: past the recursion limit and PATH_MAX
        os.mkdir("d" * 40, dir_fd=fd)
        child = os.open("d" * 40, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = child
    os.close(fd)
    os.chmod(left / ("d" * 40), 0)
    disk = JobDisk(data / "jobs" / "jdisk-1", 8, (os.getuid(), os.getgid()))
    disk.image.parent.mkdir()
    (disk.create() / "left.txt").write_text("a killed run's job wrote this")
    log = tmp_path / "worker.log"
    proc, _ = start_worker(cluster.server.url, cluster.enrollment, data, log, name="sweeper", slots=1)
    try:
        wait_until(lambda: proc.poll() is not None or "registered as sweeper" in log.read_text(),
                   timeout=30, what="the second worker to register")
        assert proc.poll() is None, log.read_text()[-3000:]
        # The killed run's tree and disk are gone; what it makes itself is waiting containers'.
        assert not (data / "jobs" / "jleft-1").exists() and not (data / "jobs" / "jdisk-1").exists()
        assert not [m for m in jobdisk.mounts_under(data) if not m.parent.name.startswith("waiting-")]
        import docker
        client = docker.from_env()
        wait_until(lambda: not not_of_a_job(data / "jobs", client, "sweeper"), timeout=30,
                   what="only waiting containers, holding nothing")
    finally:
        stop_worker(proc)
        for mountpoint in jobdisk.mounts_under(data):
            jobdisk.unmount(mountpoint)
        remove_tree(data)


FILL_THE_DISK = """
import os, time
written = 0
try:
    with open("fill.bin", "wb") as f:
        while True:
            f.write(b"x" * 65536); f.flush(); written += 65536
except OSError as e:
    print("errno", e.errno, "after", written // (1024 * 1024), "MiB", flush=True)
while not os.path.exists("go"):   # the test looks at the worker's disk meanwhile
    time.sleep(0.05)
"""


def test_a_job_writing_past_its_disk_quota_gets_enospc_and_the_worker_disk_is_kept(cluster):
    job_id = cluster.submit(FILL_THE_DISK, disk_mb=16, timeout_s=60)
    wait_until(lambda: "errno 28" in cluster.logs(job_id)["data"], timeout=60,
               what="the job to hit its quota")
    out = job_disk_of(cluster, job_id)
    image = out.parent.parent / jobdisk.IMAGE_NAME
    # What the job's writes take on the worker's disk: its image, sparse, no
    # more than the quota and ext4's own overhead.
    allocated = os.stat(image).st_blocks * 512
    assert allocated <= (16 + jobdisk.OVERHEAD_MIN_MB) * 1024 * 1024, allocated
    assert os.statvfs(out).f_bavail * os.statvfs(out).f_frsize <= jobdisk.FULL_BELOW_BYTES
    (out / "go").touch()
    job = cluster.wait(job_id)
    assert job["state"] == "succeeded", job
    assert job["resources"]["disk_mb"] == 16
    assert job["disk_full"] is True, job
    assert any("disk quota of 16 MB" in w for w in job["warnings"]), job["warnings"]
    assert "after 16 MiB" in cluster.logs(job_id)["data"] or "after 15 MiB" in cluster.logs(job_id)["data"]


LEAVE_FILES_OUT = f"""
import os
for i in range({MAX_FILES} + 3):
    open(f"small-{{i}}.txt", "w").write("s")
open("big.bin", "wb").write(b"b" * ({MAX_BYTES} + 1))
os.symlink("/etc/passwd", "link")
os.mkfifo("fifo")
open(b"bad-\\xff-name", "w").write("x")
"""


def test_files_left_out_are_counted_in_the_job_and_listed_in_its_archive(cluster, tmp_path):
    job = cluster.run(LEAVE_FILES_OUT)
    assert job["state"] == "succeeded", job
    outputs = job["outputs"]
    assert outputs["files"] == MAX_FILES, outputs
    assert outputs["left_out_reasons"] == {"file_cap": 3, "size_cap": 1, "symlink": 1,
                                           "special_file": 1, "bad_name": 1}, outputs
    assert outputs["left_out"] == 7 and outputs["manifest"] == MANIFEST
    assert any("7 output file(s) left out" in w for w in job["warnings"]), job["warnings"]
    zf = cluster.outputs(job["id"])
    manifest = json.loads(zf.read(MANIFEST))
    assert manifest["left_out"] == 7
    assert {(e["path"], e["reason"]) for e in manifest["files_left_out"]} >= {
        ("big.bin", "size_cap"), ("link", "symlink"), ("fifo", "special_file"),
        ("bad-\\xff-name", "bad_name")}
    assert len(zf.namelist()) == MAX_FILES + 1
    # `jobcloud fetch` unpacks what there is, and says what is not there.
    cli = Cli(tmp_path / "cfg" / "config.json", tmp_path)
    cli.login(cluster.server.url, cluster.headers["Authorization"].split()[1])
    r = cli("fetch", job["id"], "-o", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    assert "warning: 7 output file(s) left out of the archive" in r.stderr, r.stderr
    assert (tmp_path / "out" / MANIFEST).exists()


LEAVE_A_SETUID_BINARY = """
import os, shutil, time
print("uid", os.getuid(), "gid", os.getgid(), flush=True)
shutil.copy("/usr/bin/id", "id-setuid")
os.chmod("id-setuid", 0o6755)
print("mode", oct(os.stat("id-setuid").st_mode), flush=True)
for line in open("/proc/self/mountinfo"):
    if line.split()[4] in ("/job/output", "/tmp"):
        print("mount", line.split()[4], line.split()[5], flush=True)
print("ready", flush=True)
while not os.path.exists("go"):
    time.sleep(0.05)
"""


def test_jobs_run_as_no_host_account_and_what_they_leave_cannot_be_setuid_on_the_host(cluster):
    job_id = cluster.submit(LEAVE_A_SETUID_BINARY)
    wait_until(lambda: "ready" in cluster.logs(job_id)["data"], timeout=60, what="the job to start")
    uid, gid = map(int, re.search(r"uid (\d+) gid (\d+)", cluster.logs(job_id)["data"]).groups())
    with pytest.raises(KeyError):
        pwd.getpwuid(uid)
    with pytest.raises(KeyError):
        grp.getgrgid(gid)
    # Inside the container too, the writable mounts are nosuid and nodev.
    logs = cluster.logs(job_id)["data"]
    for mount in ("/job/output", "/tmp"):
        options = re.search(rf"mount {mount} (\S+)", logs).group(1).split(",")
        assert "nosuid" in options and "nodev" in options, (mount, options)
    left = job_disk_of(cluster, job_id) / "id-setuid"
    # The job could set the bit on its own file; the filesystem holding it is nosuid.
    assert os.stat(left).st_mode & stat.S_ISUID
    assert os.statvfs(left).f_flag & os.ST_NOSUID and os.statvfs(left).f_flag & os.ST_NODEV
    (left.parent / "go").touch()
    job = cluster.wait(job_id)
    assert job["state"] == "succeeded", job
    info = cluster.outputs(job_id).getinfo("id-setuid")
    assert (info.external_attr >> 16) & 0o7777 == 0o644, oct(info.external_attr >> 16)
