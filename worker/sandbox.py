"""Running one job's script in a locked-down Docker container.

What the container gets, and why:
- no network (`network_mode="none"`, and the engine's networking skipped
  altogether: `network_disabled`, see `_lockdown`), a read-only root filesystem, a small
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

A container may also be started before its job is known (`prestart`, used by
worker/prestart.py): the same lockdown, its own job directory mounted, and a
launcher as its process that blocks on a pipe in /job/input. `run(...,
waiting=...)` then places the job's limits (`docker update`), hands the
launcher the job's argv and environment through the pipe, removes the pipe,
and the launcher execs the script as the same process 1 a cold container
runs: same argv, environment, uid, cwd and streams. Usage counts from that
release, not from the container's start.

Docker errors are translated here into `SandboxError`.
"""
from __future__ import annotations

import errno
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import docker
import docker.errors
import requests
from docker.models.containers import _create_container_args
from docker.types import DeviceRequest, LogConfig, Mount, Ulimit

from .config import DEFAULT_JOB_UID
from .errors import SandboxError

log = logging.getLogger(__name__)

INPUT_MOUNT = "/job/input"
OUTPUT_MOUNT = "/job/output"
# A job's requirements environment (worker/pyenv.py), read-only, on PYTHONPATH.
ENV_MOUNT = "/job/env"
# On the containers that install a requirements environment.
LABEL_BUILD = "jobcloud.build"
SCRIPT_PATH = f"{INPUT_MOUNT}/main.py"
DATA_PATH = f"{INPUT_MOUNT}/data"
LABEL_WORKER = "jobcloud.worker"
LABEL_JOB = "jobcloud.job"
LABEL_ATTEMPT = "jobcloud.attempt"
# On containers started before their job: the start-up sweep removes them with the rest.
LABEL_PRESTART = "jobcloud.prestart"
COMMAND = ["python3", "-u", SCRIPT_PATH]
# A container with the engine's networking disabled gets no /etc/hosts of
# Docker's; this one (the lines Docker writes for network "none") keeps
# "localhost" resolving for jobs that serve or connect on their own loopback.
HOSTS_MOUNT = "/etc/hosts"
HOSTS = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
# The pipe a waiting container's launcher reads its job from; removed before
# the script starts, so the job never sees it.
LAUNCH_PIPE = ".jobcloud-launch"
# Process 1 of a waiting container: blocks opening the pipe until the worker
# opens it to write, reads the job's argv and environment (`launch_order`),
# and becomes the job. Nothing but `os`, which the interpreter has loaded
# already: importing json cost the launcher as much CPU as its whole start.
LAUNCHER = (
    "import os\n"
    f"with open('{INPUT_MOUNT}/{LAUNCH_PIPE}', 'rb') as f:\n"
    "    order = f.read().split(b'\\0')\n"
    "argc = int(order[0])\n"
    "argv = order[1:1 + argc]\n"
    "env = dict(os.environb)\n"
    "env.update(item.split(b'=', 1) for item in order[1 + argc:])\n"
    "os.execvpe(argv[0], argv, env)\n")
# How long a release waits for a launcher that has not opened its pipe yet
# (one started a moment ago); past it the container is given up for a cold one.
RELEASE_WAIT_S = 10.0
# How often, meanwhile, the engine is asked whether it still runs (an inspect
# each: looking at every retry cost the engine and the worker more CPU than
# the wait itself on a busy worker).
RELEASE_LOOK_S = 0.25
# How often the run loop looks at the clock, the stop flag and the cgroup counters.
POLL_S = 0.1
# More often in a job's first moments: a job of a few tens of ms ends, its
# cgroup with it, between two looks POLL_S apart, and its CPU time is lost.
EARLY_S = 0.5
EARLY_POLL_S = 0.01
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
    # The runtime of waiting containers whose image has none in `runtimes`
    # (the worker's prestart_runtime, when the engine has it); empty: the
    # engine's default.
    prestart_runtime: str = ""
    # Host file mounted read-only at /etc/hosts (`write_hosts_file`); empty:
    # the image's own, where "localhost" may not resolve.
    hosts_file: str = ""


@dataclass(frozen=True)
class JobSpec:
    job_id: str
    attempt: int
    image: str
    cpus: float
    memory_mb: int
    gpus: int
    timeout_s: float
    # Its try under the job's retry policy (the claim's `try`): JOBCLOUD_TRY.
    try_number: int = 1
    # Its place in a job array (worker/arrays.py): JOBCLOUD_ARRAY_* and JOBCLOUD_PARAMS.
    array_env: tuple[tuple[str, str], ...] = ()
    # The job's own environment variables (the claim's `env`), under the worker's own.
    user_env: tuple[tuple[str, str], ...] = ()
    # Host directory of its requirements environment (worker/pyenv.py), mounted
    # read-only at ENV_MOUNT; None: no requirements.
    env_dir: str | None = None
    # A requirements build (worker/pyenv.py): pip's `command` runs instead of
    # the script, in a container of its own name and label, same lockdown.
    build: bool = False
    command: tuple[str, ...] | None = None


@dataclass
class Waiting:
    """A container started before its job, blocked in its launcher.

    The job directory it mounts (input_dir, output_dir) is where its job's
    inputs go; `stream` is its attach stream, opened before it started.
    """
    container: object
    stream: object
    image: str
    cpus: float
    memory_mb: int
    input_dir: Path
    output_dir: Path


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
        # Cleared when a waiting container cannot be made under it: the next
        # ones take the engine's default (a registered runtime may still be
        # unable to start containers on this host).
        self.prestart_runtime = policy.prestart_runtime

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

    def image_id(self, name: str) -> str:
        """The id of the local image `name` (a rebuilt image has a new one).

        Raises:
            SandboxError: the image is missing or the engine cannot say.
        """
        try:
            return self.docker.images.get(name).id
        except docker.errors.ImageNotFound as e:
            raise SandboxError(f"image {name} is not available on this worker") from e
        except docker.errors.DockerException as e:
            raise SandboxError(f"cannot inspect image {name}: {e}") from e

    def remove_leftovers(self) -> list[str]:
        """Remove containers of an earlier run of this worker, waiting ones
        included; returns their job ids ("waiting" for a container that had none)."""
        try:
            # ignore_removed: docker-py inspects each listed container; one
            # removed in between (its own --rm, a stopping worker's) is not an error.
            found = self.docker.containers.list(all=True, ignore_removed=True,
                                                filters={"label": f"{LABEL_WORKER}={self.owner}"})
            for c in found:
                try:
                    c.remove(force=True)
                except docker.errors.NotFound:
                    pass   # gone meanwhile (its own auto-removal, or an earlier sweep's)
                except docker.errors.APIError as e:
                    # 409 "removal already in progress": another remove of it is
                    # under way (a stopping worker's); the engine finishes it.
                    if e.status_code != 409:
                        raise
        except docker.errors.DockerException as e:
            raise SandboxError(f"cannot remove leftover containers: {e}") from e
        return [_job_of(c) for c in found]

    # ------------------------------------------------------ a waiting container

    def prestart(self, shape: JobSpec, input_dir: Path, output_dir: Path) -> Waiting:
        """Create and start a container of `shape` (its image, CPUs, memory)
        that waits for a job; it mounts `input_dir` and `output_dir`.

        Raises:
            SandboxError: the engine could not create, attach to or start it.
        """
        kwargs = self._lockdown(shape, input_dir, output_dir)
        # Nothing of a job yet: its environment comes through the pipe.
        kwargs.update(name=f"jobcloud-waiting-{shape.job_id}", environment={},
                      labels={LABEL_WORKER: self.owner, LABEL_PRESTART: "1"})
        pipe = input_dir / LAUNCH_PIPE
        os.mkfifo(pipe, 0o644)
        os.chmod(pipe, 0o644)  # the job's uid reads it; only the worker writes
        runtime = self.prestart_runtime if shape.image not in self.policy.runtimes else ""
        if not runtime:
            return self._make_waiting(shape, kwargs, input_dir, output_dir)
        try:
            return self._make_waiting(shape, dict(kwargs, runtime=runtime), input_dir, output_dir)
        except SandboxError as e:
            first = e
        # Once more under the engine's default: if that works, the runtime is at
        # fault (registered, yet unable to start a container on this host).
        waiting = self._make_waiting(shape, kwargs, input_dir, output_dir)
        self.prestart_runtime = ""
        log.warning("a waiting container cannot be made under %s (%s); waiting containers "
                    "take the engine's default runtime from now on", runtime, first)
        return waiting

    def _make_waiting(self, shape: JobSpec, kwargs: dict, input_dir: Path, output_dir: Path) -> Waiting:
        try:
            # -I -S: no site, no user paths, no PYTHON* variables: the launcher is the
            # image's interpreter alone, and starts in a few ms less.
            container = self._new_container(shape.image, ["python3", "-I", "-S", "-c", LAUNCHER], kwargs)
        except docker.errors.ImageNotFound as e:
            raise SandboxError(f"image {shape.image} is not available on this worker") from e
        except docker.errors.DockerException as e:
            raise SandboxError(f"cannot create a waiting container: {e}") from e
        stream = None
        try:
            stream = self._attach(container)
            self._start(container)
        except SandboxError:
            if stream is not None:
                _close(stream)
            self._remove(container)
            raise
        return Waiting(container=container, stream=stream, image=shape.image, cpus=shape.cpus,
                       memory_mb=shape.memory_mb, input_dir=input_dir, output_dir=output_dir)

    def discard(self, waiting: Waiting) -> None:
        """Remove a waiting container that will run no job."""
        _close(waiting.stream)
        self._remove(waiting.container)

    # ----------------------------------------------------------------- a run

    def run(self, spec: JobSpec, input_dir: Path, output_dir: Path, *,
            on_output: Callable[[str, bytes], None],
            stop_reason: Callable[[], str | None],
            on_poll: Callable[[], None] | None = None,
            waiting: Waiting | None = None,
            keep: Callable[[object], None] | None = None) -> Outcome:
        """Run the job's script to its end, its timeout, or a stop request.

        Args:
            on_output: called from a reader thread with ("stdout"|"stderr", bytes).
            stop_reason: polled; a non-None answer stops the container. "cancelled"
                ends the job cancelled; anything else ends it "abandoned".
            on_poll: called at each poll while the container runs, and once
                after (the job's disk looks whether it is full).
            waiting: a container started for this job's directories (its
                input_dir and output_dir are these); released instead of
                creating one. One whose limits cannot be set or whose launcher
                is gone is removed, and the job runs in a new container.
            keep: called with the container once it has ended, which is then
                not removed here: the caller removes it (`remove`) later, after
                posting the result, so removing it is not on the way to the next job.

        Raises:
            SandboxError: the engine could not create or start the container.
        """
        released = self._release(waiting, spec) if waiting is not None else None
        kept = False
        renaming = None
        if released is not None:
            container, stream, usage, since = released
            # Named for its job like a cold one (`docker ps`, the leftover sweep's log), in
            # the background: the script runs meanwhile, and its first samples are not late.
            renaming = threading.Thread(target=self._rename, args=(container, _container_name(spec)),
                                        name=f"rename-{spec.job_id}", daemon=True)
            renaming.start()
        else:
            container = self._create(spec, input_dir, output_dir)
        try:
            if released is None:
                stream = self._attach(container)
                reader, reader_done = _start_reader(stream, on_output, spec.job_id)
                self._start(container)
                usage, since = CgroupUsage(container.id), None
            else:
                reader, reader_done = _start_reader(stream, on_output, spec.job_id)
            outcome = self._watch(container, spec, usage, since, reader, reader_done, stop_reason,
                                  on_poll or _nothing)
            if keep is not None:
                keep(container)
                kept = True
            return outcome
        finally:
            if renaming is not None:
                renaming.join(timeout=30)
            if not kept:
                self._remove(container)

    def remove(self, container) -> None:
        """Remove an ended job's container that `run` left to its caller (`keep`)."""
        self._remove(container)

    def _release(self, waiting: Waiting, spec: JobSpec):
        """Give a waiting container its job: limits, then the launcher's order.

        Returns:
            (container, stream, usage, release time as epoch seconds), or None
            when it cannot run this job (it is removed then).
        """
        container = waiting.container
        try:
            if spec.env_dir is not None or spec.build:
                # Its mounts were fixed before the job was known.
                raise SandboxError("it cannot mount a requirements environment")
            self._fit_limits(waiting, spec)
            usage = CgroupUsage(container.id)
            # What the launcher used while it waited is not the job's.
            usage.exclude_so_far()
            since = time.time()
            self._send_order(waiting, launch_order(COMMAND, job_environment(spec)))
        except SandboxError as e:
            log.warning("job %s: the waiting container cannot take it (%s); starting a new one",
                        spec.job_id, e)
            self.discard(waiting)
            # The job's own container mounts the same directories: nothing of this one stays.
            (waiting.input_dir / LAUNCH_PIPE).unlink(missing_ok=True)
            return None
        return container, waiting.stream, usage, since

    def _fit_limits(self, waiting: Waiting, spec: JobSpec) -> None:
        """`docker update` memory and CPUs when the job's differ from the container's."""
        if (spec.memory_mb, spec.cpus) == (waiting.memory_mb, waiting.cpus):
            return
        memory = spec.memory_mb * 1024 * 1024
        # docker-py's Container.update has no NanoCpus (and a CPU quota is refused
        # on a container created with --cpus): the engine's own update call.
        api = self.docker.api
        try:
            api._result(api._post_json(api._url("/containers/{0}/update", waiting.container.id), data={
                "Memory": memory, "MemorySwap": memory, "NanoCpus": _nano_cpus(spec.cpus)}), True)
        except docker.errors.DockerException as e:
            raise SandboxError(f"cannot change its limits: {e}") from e

    def _send_order(self, waiting: Waiting, order: bytes) -> None:
        """Write the launcher's order into its pipe, removing the pipe's name first."""
        pipe = waiting.input_dir / LAUNCH_PIPE
        now = time.monotonic()
        deadline, look = now + RELEASE_WAIT_S, now + RELEASE_LOOK_S
        while True:
            try:
                # Non-blocking: ENXIO while no reader has the pipe open yet.
                fd = os.open(pipe, os.O_WRONLY | os.O_NONBLOCK)
                break
            except OSError as e:
                now = time.monotonic()
                gone = now > look and not self._running(waiting)
                if e.errno != errno.ENXIO or now > deadline or gone:
                    raise SandboxError(f"its launcher is not waiting ({e.strerror})") from e
                if now > look:
                    look = now + RELEASE_LOOK_S
                time.sleep(0.005)
        try:
            # Unlinked while both ends are open: the launcher reads on, the job never sees it.
            pipe.unlink()
            os.set_blocking(fd, True)
            os.write(fd, order)
        except OSError as e:
            raise SandboxError(f"cannot hand the job to its launcher ({e.strerror})") from e
        finally:
            os.close(fd)

    def _rename(self, container, name: str) -> None:
        try:
            self.docker.api.rename(container.id, name)
        except docker.errors.DockerException as e:
            # Only a name: the job runs on, under its waiting container's name.
            log.warning("cannot rename %s to %s: %s", container.name, name, e)

    def _running(self, waiting: Waiting) -> bool:
        try:
            waiting.container.reload()
            return waiting.container.status == "running"
        except docker.errors.DockerException:
            return False

    def _create(self, spec: JobSpec, input_dir: Path, output_dir: Path):
        try:
            return self._new_container(spec.image, list(spec.command or COMMAND),
                                       self._lockdown(spec, input_dir, output_dir))
        except docker.errors.ImageNotFound as e:
            raise SandboxError(f"image {spec.image} is not available on this worker") from e
        except docker.errors.DockerException as e:
            raise SandboxError(f"cannot create the job container: {e}") from e

    def _new_container(self, image: str, command: list[str], kwargs: dict):
        """docker-py's `containers.create` without the inspect it sends after the
        create: the id and name are all a run needs before the container ends
        (an engine call less per container, in dockerd and in the worker).
        `_create_container_args` is the same translation of the arguments that
        `create` uses (docker-py is pinned below 8 in setup.cfg)."""
        args = _create_container_args(dict(kwargs, image=image, command=command,
                                           version=self.docker.api._version))
        created = self.docker.api.create_container(**args)
        return self.docker.containers.prepare_model({"Id": created["Id"], "Name": "/" + kwargs["name"]})

    def _lockdown(self, spec: JobSpec, input_dir: Path, output_dir: Path) -> dict:
        p = self.policy
        memory = f"{spec.memory_mb}m"
        kwargs = dict(
            name=_container_name(spec),
            labels={LABEL_WORKER: self.owner, LABEL_JOB: spec.job_id, LABEL_ATTEMPT: str(spec.attempt)},
            user=p.user,
            working_dir=OUTPUT_MOUNT,
            hostname="job",
            environment=job_environment(spec),
            network_mode="none",
            # The container still gets a network namespace of its own with only
            # its loopback, brought up by the OCI runtime, as with "none" alone;
            # what this skips is the engine's networking for it, chiefly the
            # prestart hook that re-executes dockerd (libnetwork-setkey), which
            # was the largest single CPU cost of a trivial job: 150-180 ms of
            # the 350-400 ms the engine, the shim and runc spent per container
            # (docs/PERFORMANCE.md, "Warm starts"). It also leaves out Docker's
            # /etc/resolv.conf (the host's resolver, unreachable anyway).
            network_disabled=True,
            read_only=True,
            tmpfs={"/tmp": f"rw,nosuid,nodev,size={p.tmpfs_mb}m,mode=1777"},
            mounts=[Mount(INPUT_MOUNT, str(input_dir), type="bind", read_only=True),
                    Mount(OUTPUT_MOUNT, str(output_dir), type="bind", read_only=False)],
            cap_drop=["ALL"],
            security_opt=["no-new-privileges"],
            pids_limit=p.pids_limit,
            mem_limit=memory,
            memswap_limit=memory,
            nano_cpus=_nano_cpus(spec.cpus),
            ulimits=[Ulimit(name="nofile", soft=p.nofile, hard=p.nofile),
                     Ulimit(name="fsize", soft=p.fsize_bytes, hard=p.fsize_bytes)],
            # The worker reads the streams itself (attach); nothing needs Docker's log files,
            # and a job printing gigabytes must not fill the engine's disk.
            log_config=LogConfig(type="none"),
            stdin_open=False,
            tty=False,
        )
        if p.hosts_file:
            kwargs["mounts"].append(Mount(HOSTS_MOUNT, p.hosts_file, type="bind", read_only=True))
        if spec.image in p.runtimes:
            kwargs["runtime"] = p.runtimes[spec.image]
        if spec.env_dir is not None:
            kwargs["mounts"].append(Mount(ENV_MOUNT, spec.env_dir, type="bind", read_only=True))
            kwargs["environment"]["PYTHONPATH"] = f"{ENV_MOUNT}/site"
        if spec.build:
            kwargs["name"] = f"jobcloud-build-{spec.job_id}-{spec.attempt}"
            kwargs["labels"][LABEL_BUILD] = "1"
        if spec.gpus > 0:
            kwargs["device_requests"] = [DeviceRequest(count=spec.gpus, capabilities=[["gpu"]])]
        return kwargs

    def _attach(self, container):
        # Before start, so not a byte of early output is missed.
        try:
            return self.docker.api.attach(container.id, stdout=True, stderr=True, stream=True,
                                          demux=True)
        except docker.errors.DockerException as e:
            raise SandboxError(f"cannot attach to the job container: {e}") from e

    def _start(self, container) -> None:
        try:
            container.start()
        except docker.errors.DockerException as e:
            raise SandboxError(f"cannot start the job container: {e}") from e

    def _watch(self, container, spec: JobSpec, usage: CgroupUsage, since: float | None, reader,
               reader_done: threading.Event, stop_reason, on_poll) -> Outcome:
        """Poll a started job to its end; `since`: when a waiting container was
        released (epoch s), None for one started for the job."""
        started = time.monotonic()
        # At once, before the first poll: a job shorter than POLL_S would
        # otherwise end, taking its cgroup with it, before any look.
        usage.sample()
        ended_by = None
        while not reader_done.wait(POLL_S if time.monotonic() - started > EARLY_S else EARLY_POLL_S):
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
        return self._outcome(container, ended_by, exit_code, usage, time.monotonic() - started, since)

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

    def _outcome(self, container, ended_by, exit_code, usage, elapsed, since) -> Outcome:
        try:
            container.reload()
            st = container.attrs["State"]
        except docker.errors.DockerException:
            st = {}
        if since is not None:
            # A waiting container started before its job: the job's time begins at its release.
            st = dict(st, StartedAt=datetime.fromtimestamp(since, timezone.utc).isoformat(timespec="microseconds")[:26])
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


def launch_order(argv: list[str], env: dict) -> bytes:
    """What a waiting container's launcher reads (LAUNCHER): the argument
    count, the arguments, then NAME=value for each variable, NUL-separated.

    Raises:
        SandboxError: one of them holds a NUL (execve could not pass it, and
            it would split the order): the job runs in a new container.
    """
    items = [str(len(argv)), *argv, *(f"{name}={value}" for name, value in env.items())]
    if any("\0" in item for item in items):
        raise SandboxError("an argument or environment variable holds a NUL")
    return "\0".join(items).encode()


def write_hosts_file(data_dir: Path) -> str:
    """Write the containers' /etc/hosts (HOSTS) under the worker's data
    directory, in etc/ (the data directory's own files are made private at
    each start; the job's uid must read this one); returns its path.

    Raises:
        OSError: it could not be written.
    """
    directory = data_dir / "etc"
    directory.mkdir(mode=0o755, exist_ok=True)
    path = directory / "hosts"
    tmp = directory / "hosts.tmp"
    tmp.write_text(HOSTS)
    os.chmod(tmp, 0o644)   # the job's uid reads it through the mount
    os.replace(tmp, path)
    return str(path)


def _nothing() -> None:
    pass


def _job_of(container) -> str:
    """The job a container of this worker ran: its label, or for a waiting
    container released to a job, its name (labels cannot change); "waiting"
    for one that had none yet."""
    if LABEL_JOB in container.labels:
        return container.labels[LABEL_JOB]
    name = container.name or ""
    if LABEL_PRESTART in container.labels and not name.startswith("jobcloud-waiting-"):
        return name.removeprefix("jobcloud-").rpartition("-")[0] or "?"
    return "waiting" if LABEL_PRESTART in container.labels else "?"


def _container_name(spec: JobSpec) -> str:
    # A waiting container takes this name once released (`run`): the same for both.
    return f"jobcloud-{spec.job_id}-{spec.attempt}"


def _nano_cpus(cpus: float) -> int:
    # Docker refuses a CPU quota above the host's CPU count.
    return int(min(cpus, float(os.cpu_count() or 1)) * 1e9)


def _start_reader(stream, on_output, job_id: str) -> tuple[threading.Thread, threading.Event]:
    reader_done = threading.Event()
    reader = threading.Thread(target=_read_streams, args=(stream, on_output, reader_done),
                              name=f"out-{job_id}", daemon=True)
    reader.start()
    return reader, reader_done


def _close(stream) -> None:
    try:
        stream.close()
    except (OSError, RuntimeError) as e:   # a stream already broken: nothing left to release
        log.debug("closing an attach stream: %s", e)


def job_environment(spec: JobSpec) -> dict:
    """The container's whole environment: the job's own variables, then the
    job's facts over them (the proxy refuses those names, jobenv.py: this is
    the second line), nothing of the worker's. A requirements build gets none
    of the job's own: PIP_* and the like must not steer pip."""
    own = {} if spec.build else dict(spec.user_env)
    return {
        **own,
        **thread_limits(spec.cpus),
        # USER and LOGNAME: the job's uid has no passwd entry in an image built
        # before it was chosen, and getpass.getuser() looks at these first.
        "HOME": "/tmp", "USER": "job", "LOGNAME": "job", "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1",
        "MPLCONFIGDIR": "/tmp",
        "JOBCLOUD_JOB_ID": spec.job_id, "JOBCLOUD_ATTEMPT": str(spec.attempt),
        "JOBCLOUD_TRY": str(spec.try_number),
        "JOBCLOUD_INPUT": INPUT_MOUNT, "JOBCLOUD_DATA": DATA_PATH, "JOBCLOUD_OUTPUT": OUTPUT_MOUNT,
        **dict(spec.array_env),
    }


def thread_limits(cpus: float) -> dict:
    """Variables that size the job's thread pools to its CPUs, not the host's.

    Without them OpenBLAS and OpenMP start one thread per host core whatever
    the job's CPU quota (64 threads sharing 2 CPUs), and joblib's loky counts
    CPUs from the quota only where it can read the cgroup. Not the usual
    OMP_NUM_THREADS and OPENBLAS_NUM_THREADS: joblib passes those on to its
    worker processes unchanged when the parent has them, so n_jobs=2 on 2
    CPUs ran 2 x 2 BLAS threads; left unset, joblib gives each worker
    cpus // n_jobs of them. These cap the job's own process the same way and
    are not passed on: OMP_THREAD_LIMIT (the OpenMP standard's cap on a
    process's threads), GOTO_NUM_THREADS (read by OpenBLAS after
    OPENBLAS_NUM_THREADS, which joblib sets in its workers),
    NUMEXPR_MAX_THREADS (numexpr's pool), LOKY_MAX_CPU_COUNT (joblib's
    cpu_count(), so n_jobs=-1 and the split above use the job's CPUs).
    MKL_NUM_THREADS, BLIS_NUM_THREADS, NUMEXPR_NUM_THREADS and
    VECLIB_MAXIMUM_THREADS stay unset for the same reason as the first two
    (joblib's list). A job may still set any of those itself.
    """
    threads = str(max(1, int(cpus)))
    return {"OMP_THREAD_LIMIT": threads, "GOTO_NUM_THREADS": threads,
            "NUMEXPR_MAX_THREADS": threads, "LOKY_MAX_CPU_COUNT": threads}


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
        self._cpu_base = 0.0
        self._peak_reset: Path | None = None
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
            self._peak_reset = v1_mem / "memory.max_usage_in_bytes"

    def exclude_so_far(self) -> None:
        """Count from now on: a waiting container's launcher is not its job.

        CPU time is counted from here. The peak is reset where the kernel
        allows it (cgroup v1: writing 0 sets it to the memory in use now, the
        launcher's few MiB, which the exec frees); cgroup v2 keeps the
        container's peak, so a job smaller than its launcher reports the
        launcher's.
        """
        for kind, value in self._read():
            if kind == "cpu":
                self._cpu_base = value
        if self._peak_reset is not None:
            try:
                self._peak_reset.write_text("0")
            except OSError as e:
                log.debug("cannot reset %s: %s", self._peak_reset, e)

    def sample(self) -> None:
        for kind, value in self._read():
            if kind == "cpu":
                self.cpu_seconds = round(max(self.cpu_seconds or 0.0, value - self._cpu_base), 3)
            else:
                self.peak_memory_bytes = max(self.peak_memory_bytes or 0, value)

    def _read(self):
        """(kind, value) of each counter that can be read now ("cpu" or "mem")."""
        for path, parse in self._readers:
            try:
                yield parse(path.read_text())
            except (OSError, ValueError):
                continue


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
