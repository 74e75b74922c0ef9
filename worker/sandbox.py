"""Running one job's script in a locked-down Docker container.

What the container gets, and why:
- no network (`network_mode="none"`), a read-only root filesystem, a small
  tmpfs for /tmp, the job's input directory read-only at /job/input (the
  script is /job/input/main.py, the dataset is unpacked under
  /job/input/data) and one writable directory, /job/output, which is also the
  working directory, so relative writes become outputs;
- a non-root user that is no account on the host (the worker's `job_uid`,
  see docs/SECURITY.md), every capability dropped, no-new-privileges;
- limits: processes (a fork bomb stops there), memory with swap equal to it
  (no swapping past the limit), CPU quota from the job's cpus, open files and
  file size;
- GPUs only through a device request, only when the job asked for them;
- the OCI runtime the worker's configuration names for the image, if any
  (e.g. gVisor's runsc: a kernel exploit then meets a user-space kernel);
- never the Docker socket, never the worker's own environment.

Docker errors are translated here into `SandboxError`.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable

import docker
import docker.errors
import requests
from docker.types import DeviceRequest, LogConfig, Mount, Ulimit

from .config import DEFAULT_JOB_UID
from .errors import SandboxError

log = logging.getLogger(__name__)

INPUT_MOUNT = "/job/input"
OUTPUT_MOUNT = "/job/output"
SCRIPT_PATH = f"{INPUT_MOUNT}/main.py"
DATA_PATH = f"{INPUT_MOUNT}/data"
LABEL_WORKER = "jobcloud.worker"
LABEL_JOB = "jobcloud.job"
LABEL_ATTEMPT = "jobcloud.attempt"
# How often the run loop looks at the clock, the stop flag and the cgroup counters.
POLL_S = 0.1
OOM_REASON = "memory limit exceeded"


@dataclass(frozen=True)
class Policy:
    """The worker-wide part of the lockdown (from the worker's configuration)."""
    pids_limit: int
    tmpfs_mb: int
    nofile: int
    fsize_bytes: int
    # image -> OCI runtime name; an image not listed gets the engine's default.
    runtimes: dict[str, str] = field(default_factory=dict)
    # "uid:gid" the job runs as: no account on the host (config.job_uid).
    user: str = f"{DEFAULT_JOB_UID}:{DEFAULT_JOB_UID}"


@dataclass(frozen=True)
class JobSpec:
    job_id: str
    attempt: int
    image: str
    cpus: float
    memory_mb: int
    gpus: int
    timeout_s: float


@dataclass
class Outcome:
    """How the container ended. `state` is a final job state, or "abandoned"
    when the worker stopped it for its own reasons (shutdown, lease lost)."""
    state: str
    exit_code: int | None
    failure_reason: str | None
    cpu_seconds: float | None
    peak_memory_bytes: int | None
    wall_seconds: float | None


class Sandbox:
    """Creates, runs and removes job containers on one Docker engine.

    Args:
        client: a docker.DockerClient (created once at the entry point).
        owner: this worker's label value; containers carrying it are its own.
        policy: the lockdown limits that do not depend on the job.
    """

    def __init__(self, client: docker.DockerClient, owner: str, policy: Policy):
        self.docker = client
        self.owner = owner
        self.policy = policy

    # ------------------------------------------------------------ engine facts

    def images_present(self, names) -> list[str]:
        present = []
        for name in names:
            try:
                self.docker.images.get(name)
                present.append(name)
            except docker.errors.ImageNotFound:
                continue
            except docker.errors.DockerException as e:
                raise SandboxError(f"cannot list images: {e}") from e
        return present

    def remove_leftovers(self) -> list[str]:
        """Remove containers of an earlier run of this worker; returns their job ids."""
        try:
            found = self.docker.containers.list(all=True, filters={"label": f"{LABEL_WORKER}={self.owner}"})
            for c in found:
                c.remove(force=True)
        except docker.errors.DockerException as e:
            raise SandboxError(f"cannot remove leftover containers: {e}") from e
        return [c.labels.get(LABEL_JOB, "?") for c in found]

    # ----------------------------------------------------------------- a run

    def run(self, spec: JobSpec, input_dir: Path, output_dir: Path, *,
            on_output: Callable[[str, bytes], None],
            stop_reason: Callable[[], str | None],
            on_poll: Callable[[], None] | None = None) -> Outcome:
        """Run the job's script to its end, its timeout, or a stop request.

        Args:
            on_output: called from a reader thread with ("stdout"|"stderr", bytes).
            stop_reason: polled; a non-None answer stops the container. "cancelled"
                ends the job cancelled; anything else ends it "abandoned".
            on_poll: called at each poll while the container runs, and once
                after (the job's disk looks whether it is full).

        Raises:
            SandboxError: the engine could not create or start the container.
        """
        container = self._create(spec, input_dir, output_dir)
        try:
            return self._run_created(container, spec, on_output, stop_reason, on_poll or _nothing)
        finally:
            self._remove(container)

    def _create(self, spec: JobSpec, input_dir: Path, output_dir: Path):
        try:
            return self.docker.containers.create(
                spec.image, ["python3", "-u", SCRIPT_PATH], **self._lockdown(spec, input_dir, output_dir))
        except docker.errors.ImageNotFound as e:
            raise SandboxError(f"image {spec.image} is not available on this worker") from e
        except docker.errors.DockerException as e:
            raise SandboxError(f"cannot create the job container: {e}") from e

    def _lockdown(self, spec: JobSpec, input_dir: Path, output_dir: Path) -> dict:
        p = self.policy
        memory = f"{spec.memory_mb}m"
        # Docker refuses a CPU quota above the host's CPU count.
        cpus = min(spec.cpus, float(os.cpu_count() or 1))
        kwargs = dict(
            name=f"jobcloud-{spec.job_id}-{spec.attempt}",
            labels={LABEL_WORKER: self.owner, LABEL_JOB: spec.job_id, LABEL_ATTEMPT: str(spec.attempt)},
            user=p.user,
            working_dir=OUTPUT_MOUNT,
            hostname="job",
            environment=job_environment(spec),
            network_mode="none",
            read_only=True,
            tmpfs={"/tmp": f"rw,nosuid,nodev,size={p.tmpfs_mb}m,mode=1777"},
            mounts=[Mount(INPUT_MOUNT, str(input_dir), type="bind", read_only=True),
                    Mount(OUTPUT_MOUNT, str(output_dir), type="bind", read_only=False)],
            cap_drop=["ALL"],
            security_opt=["no-new-privileges"],
            pids_limit=p.pids_limit,
            mem_limit=memory,
            memswap_limit=memory,
            nano_cpus=int(cpus * 1e9),
            ulimits=[Ulimit(name="nofile", soft=p.nofile, hard=p.nofile),
                     Ulimit(name="fsize", soft=p.fsize_bytes, hard=p.fsize_bytes)],
            # The worker reads the streams itself (attach); nothing needs Docker's log files,
            # and a job printing gigabytes must not fill the engine's disk.
            log_config=LogConfig(type="none"),
            stdin_open=False,
            tty=False,
        )
        if spec.image in p.runtimes:
            kwargs["runtime"] = p.runtimes[spec.image]
        if spec.gpus > 0:
            kwargs["device_requests"] = [DeviceRequest(count=spec.gpus, capabilities=[["gpu"]])]
        return kwargs

    def _run_created(self, container, spec: JobSpec, on_output, stop_reason, on_poll) -> Outcome:
        # Attach before start, so not a byte of early output is missed.
        try:
            stream = self.docker.api.attach(container.id, stdout=True, stderr=True, stream=True,
                                            demux=True)
        except docker.errors.DockerException as e:
            raise SandboxError(f"cannot attach to the job container: {e}") from e
        reader_done = threading.Event()
        reader = threading.Thread(target=_read_streams, args=(stream, on_output, reader_done),
                                  name=f"out-{spec.job_id}", daemon=True)
        reader.start()
        try:
            container.start()
        except docker.errors.DockerException as e:
            raise SandboxError(f"cannot start the job container: {e}") from e
        started = time.monotonic()
        usage = CgroupUsage(container.id)
        # At once, before the first poll: a job shorter than POLL_S would
        # otherwise end, taking its cgroup with it, before any look.
        usage.sample()
        ended_by = None
        while not reader_done.wait(POLL_S):
            usage.sample()
            on_poll()
            if time.monotonic() - started > spec.timeout_s:
                ended_by = "timed_out"
            else:
                reason = stop_reason()
                if reason is not None:
                    ended_by = "cancelled" if reason == "cancelled" else "abandoned"
            if ended_by:
                self._kill(container)
                break
        usage.sample()
        exit_code = self._wait(container)
        on_poll()
        reader.join(timeout=5)
        return self._outcome(container, ended_by, exit_code, usage, time.monotonic() - started)

    def _kill(self, container) -> None:
        try:
            container.kill()
        except docker.errors.APIError as e:
            # 409: it exited between our look and the kill.
            if e.status_code != 409:
                log.warning("killing %s: %s", container.name, e)

    def _wait(self, container) -> int | None:
        try:
            return container.wait(timeout=30).get("StatusCode")
        except (docker.errors.DockerException, requests.RequestException) as e:
            log.warning("waiting for %s: %s", container.name, e)
            self._kill(container)
            return None

    def _outcome(self, container, ended_by, exit_code, usage, elapsed) -> Outcome:
        try:
            container.reload()
            st = container.attrs["State"]
        except docker.errors.DockerException:
            st = {}
        wall = _wall_seconds(st) or elapsed
        common = dict(exit_code=exit_code, cpu_seconds=usage.cpu_seconds,
                      peak_memory_bytes=usage.peak_memory_bytes, wall_seconds=round(wall, 3))
        if ended_by == "timed_out":
            return Outcome(state="timed_out", failure_reason="timeout exceeded", **common)
        if ended_by in ("cancelled", "abandoned"):
            return Outcome(state=ended_by, failure_reason=f"stopped by the worker ({ended_by})", **common)
        if st.get("OOMKilled"):
            return Outcome(state="failed", failure_reason=OOM_REASON, **common)
        if exit_code == 0:
            return Outcome(state="succeeded", failure_reason=None, **common)
        return Outcome(state="failed", failure_reason=f"exit code {exit_code}", **common)

    def _remove(self, container) -> None:
        try:
            container.remove(force=True)
        except docker.errors.NotFound:
            pass
        except docker.errors.DockerException as e:
            log.error("could not remove container %s: %s", container.name, e)


def _nothing() -> None:
    pass


def job_environment(spec: JobSpec) -> dict:
    """The container's whole environment: job facts only, nothing of the worker's."""
    threads = str(max(1, int(spec.cpus)))
    return {
        # USER and LOGNAME: the job's uid has no passwd entry in an image built
        # before it was chosen, and getpass.getuser() looks at these first.
        "HOME": "/tmp", "USER": "job", "LOGNAME": "job", "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1",
        "MPLCONFIGDIR": "/tmp", "OMP_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads,
        "JOBCLOUD_JOB_ID": spec.job_id, "JOBCLOUD_ATTEMPT": str(spec.attempt),
        "JOBCLOUD_INPUT": INPUT_MOUNT, "JOBCLOUD_DATA": DATA_PATH, "JOBCLOUD_OUTPUT": OUTPUT_MOUNT,
    }


def _read_streams(stream, on_output, done: threading.Event) -> None:
    try:
        for out, err in stream:
            if out:
                on_output("stdout", out)
            if err:
                on_output("stderr", err)
    except Exception:  # the loop boundary of the reader thread
        log.exception("reading job output")
    finally:
        done.set()


def _wall_seconds(state: dict) -> float | None:
    try:
        start = datetime.fromisoformat(state["StartedAt"][:26].rstrip("Z"))
        end = datetime.fromisoformat(state["FinishedAt"][:26].rstrip("Z"))
    except (KeyError, TypeError, ValueError):
        return None
    seconds = (end - start).total_seconds()
    return seconds if seconds >= 0 else None


class CgroupUsage:
    """CPU time and peak memory of a container, read from its cgroup while it
    runs (the cgroup is gone once it exits, and `docker stats` then says 0).
    Short jobs can end between two samples: figures are then a lower bound."""

    def __init__(self, container_id: str):
        root = Path("/sys/fs/cgroup")
        v1_mem = root / "memory" / "docker" / container_id
        v2 = [root / "system.slice" / f"docker-{container_id}.scope", root / "docker" / container_id]
        self.cpu_seconds: float | None = None
        self.peak_memory_bytes: int | None = None
        self._readers = []
        if (root / "cgroup.controllers").exists():
            for d in v2:
                self._readers = [(d / "cpu.stat", _v2_cpu), (d / "memory.peak", _int_bytes),
                                 (d / "memory.current", _int_bytes)]
                if d.exists():
                    break
        else:
            self._readers = [(root / "cpuacct" / "docker" / container_id / "cpuacct.usage", _ns_cpu),
                             (v1_mem / "memory.max_usage_in_bytes", _int_bytes)]

    def sample(self) -> None:
        for path, parse in self._readers:
            try:
                kind, value = parse(path.read_text())
            except (OSError, ValueError):
                continue
            if kind == "cpu":
                self.cpu_seconds = round(max(self.cpu_seconds or 0.0, value), 3)
            else:
                self.peak_memory_bytes = max(self.peak_memory_bytes or 0, value)


def _ns_cpu(text: str):
    return "cpu", int(text) / 1e9


def _v2_cpu(text: str):
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == "usage_usec":
            return "cpu", int(value) / 1e6
    raise ValueError("no usage_usec")


def _int_bytes(text: str):
    return "mem", int(text)
