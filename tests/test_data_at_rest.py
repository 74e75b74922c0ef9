"""Data at rest (issue 13): the proxy's data directory is its user's alone.

A local user copied the 0644 database out of the 0755 data directory, read the
session-signing key and signed an admin's session cookie. These tests run the
real proxy under gunicorn on a data directory an earlier release left open,
inside a directory every user may enter (pytest's own tmp dirs are 0700 and
would hide the problem), and look at it as the owner and as `nobody`.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest
import requests

from tests.conftest import (
    free_port,
    register_worker,
    require,
    start_gunicorn,
    stop_gunicorn,
)

NOBODY = 65534


def _zip(**members: str) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, text in members.items():
            z.writestr(name, text)
    return buf.getvalue()


def _open_base() -> Path:
    """A directory any local user may enter, as /var/lib or a checkout is."""
    base = Path(tempfile.mkdtemp(prefix="jobcloud-rest-", dir="/tmp"))
    base.chmod(0o755)
    return base


def _as_nobody(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(["runuser", "-u", "nobody", "--", *argv], capture_output=True, text=True)


def _env(data_dir: Path, port: int) -> dict:
    env = dict(os.environ, JOBCLOUD_DATA_DIR=str(data_dir), JOBCLOUD_BIND=f"127.0.0.1:{port}",
               JOBCLOUD_LOG_LEVEL="WARNING")
    env.pop("JOBCLOUD_CONFIG", None)
    env.pop("JOBCLOUD_DATABASE_URL", None)
    return env


def _admin(env: dict, *args: str) -> str:
    out = subprocess.run([str(Path(sys.executable).parent / "jobcloud"), *args], env=env,
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


@pytest.fixture(scope="module")
def served():
    """The proxy under gunicorn on a data directory left 0755 with a 0644 blob, after a
    submission with a dataset and a worker's result with outputs; stopped again."""
    _require_runuser()
    base = _open_base()
    data = base / "data"
    (data / "blobs" / "ab").mkdir(parents=True)
    for d in (data, data / "blobs", data / "blobs" / "ab"):
        d.chmod(0o755)
    stale = data / "blobs" / "ab" / ("ab" + "0" * 62)
    stale.write_bytes(b"an earlier release's blob")
    stale.chmod(0o644)
    port = free_port()
    env = _env(data, port)
    proc = start_gunicorn(env, port, workers=1)
    try:
        url = f"http://127.0.0.1:{port}"
        _admin(env, "user", "add", "alice")
        user = {"Authorization": "Bearer " + _admin(env, "token", "create", "--user", "alice")}
        enrollment = _admin(env, "enroll", "create")
        r = requests.post(f"{url}/api/v1/jobs", headers=user, timeout=30,
                          data={"code": "print(1)\n"},
                          files={"dataset": ("data.zip", _zip(**{"a.csv": "x,y\n1,2\n"}))})
        assert r.status_code == 201, r.text
        job_id = r.json()["id"]
        worker = register_worker(url, enrollment)
        r = requests.post(f"{url}/api/v1/worker/claim", headers=worker, timeout=30,
                          json={"max_jobs": 1, "wait_s": 0})
        [job] = r.json()["jobs"]
        r = requests.post(f"{url}/api/v1/worker/jobs/{job_id}/result", headers=worker, timeout=30,
                          data={"result": json.dumps({"attempt": job["attempt"],
                                                      "state": "succeeded", "exit_code": 0})},
                          files={"outputs": ("outputs.zip", _zip(**{"model.txt": "weights"}))})
        assert r.status_code == 200, r.text
        assert requests.get(f"{url}/api/v1/jobs/{job_id}", headers=user,
                            timeout=30).json()["outputs"]
    finally:
        stop_gunicorn(proc)
    yield data, proc.stderr.read().decode()
    shutil.rmtree(base, ignore_errors=True)


def test_data_dir_is_0700_and_every_file_0600_after_start_upload_and_result(served):
    data, log = served
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    entries = list(data.rglob("*"))
    files = [p for p in entries if p.is_file()]
    # The database (and its WAL), the script, the dataset, the outputs, the old blob.
    assert {"jobcloud.db"} <= {p.name for p in files} and len(files) >= 5
    loose = {str(p.relative_to(data)): oct(stat.S_IMODE(p.stat().st_mode)) for p in entries
             if stat.S_IMODE(p.stat().st_mode) & 0o077}
    assert loose == {}
    assert "data directory" in log and "removed group/other access from 4 " in log


def test_another_local_user_cannot_read_the_database_or_list_the_blobs(served):
    data, _ = served
    # The attack: copy the database (it holds the session-signing key) as another user.
    copy = _as_nobody("cat", str(data / "jobcloud.db"))
    assert copy.returncode != 0 and "Permission denied" in copy.stderr
    listing = _as_nobody("ls", str(data / "blobs"))
    assert listing.returncode != 0 and "Permission denied" in listing.stderr


@pytest.fixture
def open_base():
    """A directory any local user may enter (see _open_base), removed after the test."""
    base = _open_base()
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def foreign_dir(open_base):
    """An empty directory owned by `nobody`, where a service running as root would start."""
    require(os.geteuid() == 0, "giving a directory to another user needs root")
    path = open_base / "data"
    path.mkdir()
    os.chown(path, NOBODY, NOBODY)
    return path


def _require_runuser():
    require(os.geteuid() == 0 and shutil.which("runuser") is not None,
            "looking at the files as another user needs root and runuser")


def test_start_is_refused_when_another_user_owns_the_data_dir(foreign_dir):
    env = _env(foreign_dir, free_port())
    proc = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-c", "python:proxy.gunicorn_conf", "--workers", "1",
         "proxy:create_app()"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        start_new_session=True)
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail("gunicorn started on a data directory owned by another user")
    assert proc.returncode != 0
    assert f"is owned by uid {NOBODY}, not by this user" in err.decode()
    assert "Traceback" not in err.decode()
    done = subprocess.run([str(Path(sys.executable).parent / "jobcloud-proxy"), "migrate"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and f"owned by uid {NOBODY}" in done.stderr
    assert list(foreign_dir.iterdir()) == []  # nothing created in it


# ------------------------------------------------------------------ the worker

def test_the_worker_keeps_its_data_dir_private_but_leaves_job_dirs_to_the_runner(open_base):
    from worker.cli import _secure_data_dir

    _require_runuser()
    data, job = open_base / "worker", open_base / "worker" / "jobs" / "j1"
    job.mkdir(parents=True)
    data.chmod(0o755)
    job.chmod(0o755)
    secret = data / "worker-secret"
    secret.write_text("wsec_x")
    secret.chmod(0o644)
    _secure_data_dir(str(data))
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    # A job's inputs stay readable by the container's unprivileged user.
    assert stat.S_IMODE(job.stat().st_mode) == 0o755
    assert _as_nobody("cat", str(secret)).returncode != 0


def test_the_worker_refuses_a_data_dir_owned_by_another_user(foreign_dir):
    env = dict(os.environ, JOBCLOUD_WORKER_DISK_QUOTA="false")
    done = subprocess.run(
        [str(Path(sys.executable).parent / "jobcloud-worker"), "--data-dir", str(foreign_dir),
         "--proxy-url", "http://127.0.0.1:9", "--enrollment-token", "enr_x", "--name", "w"],
        env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert f"is owned by uid {NOBODY}, not by this user" in done.stderr
    assert "Traceback" not in done.stderr


# ------------------------------------------------------------------ the scaler

def _scaler(state_dir: Path):
    from vm_provisioning.config import ScalerConfig
    from vm_provisioning.scaler import Scaler

    return Scaler(ScalerConfig(template_dir=str(state_dir.parent / "template"),
                               state_dir=str(state_dir), admin_token="t"), hosts=[])


def test_the_scalers_state_dir_is_only_traversable_and_its_files_private(open_base):
    from vm_provisioning.state import StateStore

    _require_runuser()
    state_dir = open_base / "clones"
    state_dir.mkdir()
    state_dir.chmod(0o755)
    seed = state_dir / "jc-old-seed.iso"
    seed.write_bytes(b"an enrollment token")
    seed.chmod(0o644)
    _scaler(state_dir).close()
    # libvirt's QEMU (libvirt-qemu) must pass through to the disks it boots; nobody may list.
    assert stat.S_IMODE(state_dir.stat().st_mode) == 0o711
    assert stat.S_IMODE(seed.stat().st_mode) == 0o600
    with StateStore(state_dir).locked():
        pass
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in state_dir.iterdir()}
    assert modes == {"jc-old-seed.iso": 0o600, "scaler-state.json": 0o600, "scaler.lock": 0o600}
    assert _as_nobody("ls", str(state_dir)).returncode != 0
    assert _as_nobody("cat", str(state_dir / "scaler-state.json")).returncode != 0


def test_a_linked_clone_is_private_whatever_the_umask(tmp_path):
    from vm_provisioning.scaler import linked_clone

    require(shutil.which("qemu-img") is not None, "qemu-img not installed (apt-get install qemu-utils)")
    base = tmp_path / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "1M"], check=True)
    old = os.umask(0o022)
    try:
        linked_clone(base, tmp_path / "jc-x.qcow2")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "jc-x.qcow2").stat().st_mode) == 0o600


def test_the_scaler_refuses_a_state_dir_owned_by_another_user(foreign_dir):
    from vm_provisioning.errors import ConfigError

    with pytest.raises(ConfigError, match=f"owned by uid {NOBODY}, not by this user"):
        _scaler(foreign_dir)
