"""The per-image OCI runtime (gVisor's runsc where installed): read from the
worker's configuration, validated, and given to the job's container.

The engine here has no gVisor, so scripts/docker-up.sh registers runc a second
time under its own name (`jobcloud-runc` in dockerd's daemon.json): the real run names
that alias and reads it back with `docker inspect`. The engine's default is runc
too, so only an alias shows the setting reached the engine; a name the engine
does not know must make the create fail.
"""
from __future__ import annotations

import json
import os
import secrets

import pytest

from tests.conftest import require
from tests.test_worker_sandbox import IMAGE, docker_ready
from worker.config import load_config
from worker.errors import ConfigError, SandboxError
from worker.sandbox import LABEL_JOB, JobSpec, Policy, Sandbox

# runc under a second name, registered by scripts/docker-up.sh: unlike "runc",
# the engine's default, it reaches the container only when the worker asks for it.
ALIAS = "jobcloud-runc"
BASE_ENV = {"JOBCLOUD_WORKER_ENROLLMENT_TOKEN": "jce_x", "JOBCLOUD_WORKER_IMAGES":
            "jobcloud/python,jobcloud/ml"}


def test_no_runtime_by_default():
    assert load_config([], env=BASE_ENV).runtimes == {}


def test_runtimes_from_environment_and_from_the_config_file(tmp_path):
    env = dict(BASE_ENV, JOBCLOUD_WORKER_RUNTIMES="jobcloud/ml=runsc, jobcloud/python=runc")
    assert load_config([], env=env).runtimes == {"jobcloud/ml": "runsc", "jobcloud/python": "runc"}
    path = tmp_path / "worker.json"
    path.write_text(json.dumps({"runtimes": {"jobcloud/ml": "runsc"}}))
    assert load_config(["--config", str(path)], env=BASE_ENV).runtimes == {"jobcloud/ml": "runsc"}


@pytest.mark.parametrize("value, message", [
    ("jobcloud/other=runsc", "only images this worker runs"),
    ("jobcloud/ml=run sc", "runtime name"),
    ("jobcloud/ml=", "runtime name"),
    ("jobcloud/ml", "not a valid dict"),
])
def test_bad_runtimes_are_refused(value, message):
    with pytest.raises(ConfigError, match=message):
        load_config([], env=dict(BASE_ENV, JOBCLOUD_WORKER_RUNTIMES=value))


@pytest.fixture
def engine():
    ok, reason = docker_ready()
    require(ok, reason)
    import docker
    client = docker.from_env(timeout=30)
    yield client
    client.close()


def run_job(engine, tmp_path, runtimes: dict) -> tuple[object, list]:
    """Run a short job through the Sandbox; returns (outcome, runtimes the engine reported)."""
    job_id = "rt" + secrets.token_hex(6)
    input_dir, output_dir = tmp_path / "in", tmp_path / "out"
    input_dir.mkdir(mode=0o755)
    output_dir.mkdir(mode=0o777)
    os.chmod(output_dir, 0o777)
    (input_dir / "main.py").write_text("print('up', flush=True)\nimport time; time.sleep(0.5)\n")
    os.chmod(input_dir / "main.py", 0o644)
    sandbox = Sandbox(engine, owner=f"runtime-test-{os.getpid()}", policy=Policy(
        pids_limit=64, tmpfs_mb=16, nofile=256, fsize_bytes=1 << 20, runtimes=runtimes))
    seen = []

    def on_output(stream: str, data: bytes) -> None:
        # The container exists while it prints: ask the engine what it runs under.
        for c in engine.containers.list(all=True, filters={"label": f"{LABEL_JOB}={job_id}"}):
            seen.append(c.attrs["HostConfig"]["Runtime"])

    spec = JobSpec(job_id=job_id, attempt=1, image=IMAGE, cpus=1.0, memory_mb=128, gpus=0,
                   timeout_s=30)
    try:
        return sandbox.run(spec, input_dir, output_dir, on_output=on_output,
                           stop_reason=lambda: None), seen
    finally:
        for c in engine.containers.list(all=True, filters={"label": f"{LABEL_JOB}={job_id}"}):
            c.remove(force=True)


def test_the_container_runs_under_the_configured_runtime(engine, tmp_path):
    require(ALIAS in engine.info().get("Runtimes", {}),
            f"the Docker engine has no {ALIAS!r} runtime: run scripts/docker-up.sh as root"
            " (it registers it and reloads dockerd)")
    outcome, seen = run_job(engine, tmp_path, {IMAGE: ALIAS})
    assert outcome.state == "succeeded", outcome
    assert seen and set(seen) == {ALIAS}, seen


def test_a_runtime_the_engine_lacks_fails_the_create(engine, tmp_path):
    with pytest.raises(SandboxError, match="cannot create the job container"):
        run_job(engine, tmp_path, {IMAGE: "jobcloud-no-such-runtime"})
