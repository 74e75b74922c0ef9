"""A job's Python packages (its requirements.txt): built once per image and
requirements, cached on disk, mounted read-only into the job at /job/env.

Security first (issue 15): no code a user controls runs with network access.

1. Download, on the worker's host, wheels only (`pip download
   --only-binary=:all:` for the job images' CPython 3.11 on manylinux
   x86_64, dependencies included) from the package index the admin
   configured, into a temporary directory. Downloading a wheel runs nothing
   from it; no sdist is ever fetched, so no setup.py ever runs. pip checks
   the `--hash` options the requirements carry (one hash turns on its
   hash-checking mode for all). pip runs with no configuration file and
   only the host's transport settings (proxy, CA bundle) from its
   environment: the index is the admin's, never a pip.conf's or a
   PIP_FIND_LINKS'. It is the worker interpreter's own pip, or on a host
   without one (worker VMs) pip's wheel from the same index.
2. Install offline in a container of the job's image (worker/sandbox.py's
   lockdown: `--network none`, read-only root, the job's uid, its memory,
   CPU and pids limits): `pip install --no-index --find-links /job/input/wheels
   --target /job/output/site`. The images have no pip: the pip wheel
   downloaded in step 1 is run as a zip (`python3 pip-X.whl/pip install`),
   pip's supported way to run from a wheel. The container writes only into
   the build's output directory.
3. Move the finished directory atomically into the cache (`os.replace`).

The cache key is sha256(image id, normalised requirements): a rebuilt image
gets new environments. Entries are bounded by `max_bytes` and evicted least
recently used, never one a job is using; two jobs needing one environment
build it once (a lock per key: the second waits and finds it cached).
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable
from urllib.parse import urljoin

import requests

from .errors import EnvBuildError, SandboxError
from .sandbox import INPUT_MOUNT, OUTPUT_MOUNT, JobSpec, Outcome, Sandbox
from .trees import remove_tree

log = logging.getLogger(__name__)

# The job images' interpreter (worker/images: Debian bookworm, python3.11,
# glibc 2.36); proxy/requirements.py checks wheels for the same target.
PYTHON_VERSION = "3.11"
ABI = "cp311"
PLATFORMS = ([f"manylinux_2_{m}_x86_64" for m in range(36, 4, -1)]
             + ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"])
# Where wheels come from when neither the worker nor the proxy names an index.
DEFAULT_INDEX_URL = "https://pypi.org/simple"
# The directory inside an environment that goes on the job's PYTHONPATH.
SITE = "site"
# Downloading wheels: a slow mirror gets this long in all.
DOWNLOAD_TIMEOUT_S = 900.0
# The host's transport settings pip may keep (a proxy, a CA bundle); nothing
# else of the worker's environment, pip's own PIP_* settings least of all.
PASSED_ENV = ("PATH", "http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY",
              "NO_PROXY", "PIP_CERT", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE")
PEP691 = "application/vnd.pypi.simple.v1+json"
PIP_QUIET = ["--disable-pip-version-check", "--no-input", "--no-cache-dir", "--progress-bar", "off"]


@dataclass(frozen=True)
class Env:
    """A job's environment, held until `EnvCache.release(key)`.

    path: the host directory mounted read-only at /job/env.
    cached: no build ran for this job (it was there, or another job built it
        meanwhile).
    build_s: how long getting it took: the build, or the wait for another
        job's build of it; None when it was there already.
    """
    key: str
    path: Path
    cached: bool
    build_s: float | None


class EnvCache:
    """Environments by key under `root`/envs, at most `max_bytes` in all.

    Args:
        sandbox: runs the offline install in a locked-down container.
        job_uid: the uid the build container writes the environment as.
        pip: the command that runs pip on the host: by default the worker's
            interpreter's own (`-m pip`), or, where it has none (worker VMs
            carry no python3-pip), None: pip's wheel from the index, run as
            the install step runs it.
    """

    def __init__(self, root: Path, max_bytes: int, *, sandbox: Sandbox, job_uid: int,
                 pip: tuple[str, ...] | None | object = ...):
        if pip is ...:
            pip = (sys.executable, "-m", "pip") if importlib.util.find_spec("pip") else None
        self.root = root
        self.envs = root / "envs"
        self.tmp = root / "tmp"
        self.max_bytes = max_bytes
        self.sandbox = sandbox
        self.job_uid = job_uid
        self.pip = pip
        self._lock = threading.Lock()
        self._key_locks: dict[str, threading.Lock] = {}
        self._in_use: dict[str, int] = {}
        for d in (self.envs, self.tmp):
            d.mkdir(parents=True, exist_ok=True)
        # A build cut off by a crash left only its temporary directory.
        for stale in self.tmp.iterdir():
            remove_tree(stale)

    def key(self, image_id: str, requirements: str) -> str:
        return hashlib.sha256(f"{image_id}\n{requirements}".encode()).hexdigest()

    def acquire(self, spec: JobSpec, requirements: str, index_url: str, *,
                on_output: Callable[[bytes], None],
                stop_reason: Callable[[], str | None]) -> Env | Outcome:
        """The environment of `requirements` on the job's image, built when missing.

        Call `release(env.key)` when the job is done with it.

        Returns:
            The Env; or the build's Outcome when it was stopped (a cancel or
            the worker's shutdown) before it finished.

        Raises:
            EnvBuildError: the download or the install failed (pip's message),
                or this worker's disk could not hold the build.
            SandboxError: the engine could not run the build container.
        """
        key = self.key(self.sandbox.image_id(spec.image), requirements)
        started = time.monotonic()
        with self._lock:
            self._in_use[key] = self._in_use.get(key, 0) + 1
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        try:
            waited = not key_lock.acquire(blocking=False)
            if waited:
                on_output(b"== waiting for another job's build of this environment ==\n")
                key_lock.acquire()
            try:
                path = self.envs / key
                if path.is_dir():
                    os.utime(path)
                    on_output(b"== environment cached: no build ==\n")
                    return Env(key, path, cached=True,
                               build_s=round(time.monotonic() - started, 3) if waited else None)
                on_output(b"== building environment (wheels only; installed offline) ==\n")
                stopped = self._build(spec, requirements, index_url, path, on_output, stop_reason)
                if stopped is not None:
                    self.release(key)
                    return stopped
            finally:
                key_lock.release()
            build_s = round(time.monotonic() - started, 3)
            on_output(f"== environment built in {build_s:.1f} s ==\n".encode())
            self._evict()
            return Env(key, path, cached=False, build_s=build_s)
        except OSError as e:
            # Not pip's failure but this worker's disk (full, unwritable): the
            # job's owner reads the reason, so it names no path of this machine.
            self.release(key)
            log.warning("environment %s: %s", key[:12], e)
            raise EnvBuildError("this worker could not build it: "
                                f"{e.strerror or type(e).__name__}") from None
        except BaseException:
            self.release(key)
            raise

    def release(self, key: str) -> None:
        with self._lock:
            n = self._in_use.get(key, 0) - 1
            if n <= 0:
                self._in_use.pop(key, None)
            else:
                self._in_use[key] = n

    # ----------------------------------------------------------------- the build

    def _build(self, spec: JobSpec, requirements: str, index_url: str, dest: Path,
               on_output, stop_reason) -> Outcome | None:
        work = self.tmp / f"{dest.name}-{uuid.uuid4().hex[:8]}"
        inputs, output = work / "input", work / "output"
        try:
            for d in (work, inputs, inputs / "wheels", inputs / "pip", output):
                d.mkdir(mode=0o755)
            (inputs / "requirements.txt").write_text(requirements)
            try:
                self._download(inputs, index_url, on_output, stop_reason)
            except _Stopped as e:
                return _stopped_outcome(e.reason)
            _readable(inputs)
            _writable_by(output, self.job_uid)
            outcome = self._install(spec, inputs, output, on_output, stop_reason)
            if outcome.state in ("cancelled", "abandoned"):
                return outcome
            if outcome.state == "timed_out":
                raise EnvBuildError("installing the wheels took longer than the job's timeout")
            if outcome.state != "succeeded" or not (output / SITE).is_dir():
                raise EnvBuildError(f"pip install failed ({outcome.failure_reason}); "
                                    "its output is at the start of the job's log")
            if os.geteuid() == 0:
                _read_only_tree(output)
            os.replace(output, dest)
            return None
        finally:
            remove_tree(work)

    def _download(self, inputs: Path, index_url: str, on_output, stop_reason) -> None:
        """Step 1, on the host: pip itself, then the requirements' wheels with their dependencies."""
        target = ["--only-binary=:all:", "--python-version", PYTHON_VERSION, "--implementation",
                  "cp", "--abi", ABI, *(a for p in PLATFORMS for a in ("--platform", p))]
        common = [*PIP_QUIET, "--index-url", index_url]
        if self.pip is None:
            on_output(b"$ fetching pip's wheel from the package index\n")
            pip = (sys.executable, f"{_fetch_pip_wheel(index_url, inputs / 'pip')}/pip")
        else:
            pip = self.pip
            self._pip(pip, ["download", *common, "--only-binary=:all:", "--no-deps", "--dest",
                            str(inputs / "pip"), "pip"], on_output, stop_reason,
                      what="downloading pip")
        self._pip(pip, ["download", *common, *target, "--dest", str(inputs / "wheels"),
                        "-r", str(inputs / "requirements.txt")], on_output, stop_reason,
                  what="downloading wheels")

    def _pip(self, pip: tuple[str, ...], args: list[str], on_output, stop_reason, *,
             what: str) -> None:
        """Run the host's pip, its output into the job's log; killed past
        DOWNLOAD_TIMEOUT_S or when the job is stopped (cancelled, worker stopping).

        Raises:
            EnvBuildError: pip failed (its ERROR lines) or ran out of time.
            _Stopped: the job was stopped meanwhile.
        """
        env = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
        env.update(PIP_CONFIG_FILE=os.devnull, PYTHONNOUSERSITE="1", HOME=str(self.tmp))
        on_output(f"$ pip {args[0]} ...\n".encode())
        try:
            proc = subprocess.Popen([*pip, *args], stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                    cwd=self.tmp)
        except OSError as e:
            raise EnvBuildError(f"{what}: cannot run pip ({e.strerror})") from None
        done, why = threading.Event(), []

        def watch() -> None:
            deadline = time.monotonic() + DOWNLOAD_TIMEOUT_S
            while not done.wait(0.2):
                reason = stop_reason()
                if reason is not None or time.monotonic() > deadline:
                    why.append(reason)
                    proc.kill()
                    return
        watcher = threading.Thread(target=watch, name="pip-watch", daemon=True)
        watcher.start()
        errors = _ErrorLines()
        try:
            for line in proc.stdout:
                on_output(line)
                errors.feed(line)
            code = proc.wait()
        finally:
            done.set()
            proc.stdout.close()
        if why and why[0] is not None:
            raise _Stopped(why[0])
        if why:
            raise EnvBuildError(f"{what}: took longer than {DOWNLOAD_TIMEOUT_S:.0f} s")
        if code != 0:
            detail = errors.text() or f"pip exited with {code}"
            raise EnvBuildError(f"{what}: {detail}")

    def _install(self, spec: JobSpec, inputs: Path, output: Path, on_output,
                 stop_reason) -> Outcome:
        """Step 2: pip from its wheel, offline, in a locked-down container of the job's image."""
        pip_wheel = next((inputs / "pip").glob("pip-*.whl"), None)
        if pip_wheel is None:
            raise EnvBuildError("downloading pip: no pip wheel on the package index")
        command = ("python3", f"{INPUT_MOUNT}/pip/{pip_wheel.name}/pip", "install", *PIP_QUIET,
                   "--no-index", "--find-links", f"{INPUT_MOUNT}/wheels", "--only-binary=:all:",
                   "--target", f"{OUTPUT_MOUNT}/{SITE}", "-r", f"{INPUT_MOUNT}/requirements.txt")
        build = replace(spec, build=True, command=command, env_dir=None, gpus=0)
        on_output(b"$ pip install --no-index (in the job's image, no network) ...\n")
        errors = _ErrorLines()

        def output_of(_stream: str, data: bytes) -> None:
            errors.feed(data)
            on_output(data)
        try:
            outcome = self.sandbox.run(build, inputs, output, on_output=output_of,
                                       stop_reason=stop_reason)
        except SandboxError as e:
            raise EnvBuildError(f"the install container could not run: {e}") from None
        if outcome.state == "failed" and errors.text():
            raise EnvBuildError(f"installing the wheels: {errors.text()}")
        return outcome

    # ----------------------------------------------------------------- eviction

    def _evict(self) -> None:
        """Remove least recently used environments past max_bytes, never one in use."""
        entries = []
        for path in self.envs.iterdir():
            try:
                entries.append((path.stat().st_mtime, _tree_size(path), path))
            except FileNotFoundError:
                continue
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):
            if total <= self.max_bytes:
                break
            with self._lock:
                if path.name in self._in_use:
                    continue
                # Out of the cache's name first: a job asking for it now builds it again.
                doomed = self.tmp / f"evicted-{path.name}-{uuid.uuid4().hex[:8]}"
                try:
                    os.replace(path, doomed)
                except FileNotFoundError:
                    continue
            remove_tree(doomed)
            total -= size
            log.info("environment cache: evicted %s (%d bytes)", path.name, size)


class _Stopped(Exception):
    """Raised inside a build when its job is stopped (`stop_reason`'s answer)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _stopped_outcome(reason: str) -> Outcome:
    """How a job stopped during its build ends: as the sandbox ends a stopped run."""
    state = "cancelled" if reason == "cancelled" else "abandoned"
    return Outcome(state=state, exit_code=None, failure_reason=f"stopped by the worker ({state})",
                   cpu_seconds=None, peak_memory_bytes=None, wall_seconds=None)


class _ErrorLines:
    """pip's ERROR lines (and what follows them) out of a stream of output chunks."""

    def __init__(self):
        self._partial = b""
        self._lines: list[str] = []
        self._last = ""   # said when there is no ERROR line (e.g. "No module named pip")

    def feed(self, data: bytes) -> None:
        *lines, self._partial = (self._partial + data).split(b"\n")
        for line in lines:
            text = line.decode("utf-8", "replace").rstrip()
            if text.startswith("ERROR") or (self._lines and len(self._lines) < 20):
                self._lines.append(text)
            if text.strip():
                self._last = text.strip()

    def text(self) -> str:
        return (" ".join(filter(None, self._lines)) or self._last)[:800]


def _fetch_pip_wheel(index_url: str, dest_dir: Path) -> Path:
    """pip's newest wheel on the index (PEP 691 JSON), its sha256 checked against
    the index's answer, into `dest_dir`: pip for a host that has none.

    Raises:
        EnvBuildError: the index has no usable pip wheel, or the download failed.
    """
    page = f"{index_url.rstrip('/')}/pip/"
    try:
        r = requests.get(page, headers={"Accept": PEP691}, timeout=30)
        r.raise_for_status()
        files = r.json()["files"]
        best = None
        for f in files:
            m = re.fullmatch(r"pip-(\d+(?:\.\d+)*)-py3-none-any\.whl", f.get("filename", ""))
            if (m and not f.get("yanked") and f.get("hashes", {}).get("sha256")
                    and _supports_our_python(f.get("requires-python") or "")):
                version = tuple(int(x) for x in m.group(1).split("."))
                best = max(best, (version, f), key=lambda b: b[0]) if best else (version, f)
        if best is None:
            raise EnvBuildError("downloading pip: no pip wheel for Python "
                                f"{PYTHON_VERSION} on the package index")
        wheel = best[1]
        path = dest_dir / wheel["filename"]
        digest = hashlib.sha256()
        with requests.get(urljoin(page, wheel["url"]), stream=True, timeout=60) as got, \
                open(path, "wb") as out:
            got.raise_for_status()
            for chunk in got.iter_content(1 << 16):
                digest.update(chunk)
                out.write(chunk)
    except (requests.RequestException, ValueError, KeyError, TypeError, AttributeError) as e:
        raise EnvBuildError(f"downloading pip: {type(e).__name__}: {e}"[:400]) from None
    if digest.hexdigest() != wheel["hashes"]["sha256"]:
        raise EnvBuildError("downloading pip: its sha256 is not the one the index gives")
    return path


def _supports_our_python(requires: str) -> bool:
    """Whether a Requires-Python allows the images' 3.11, judged by its >= clauses
    (pip's own wheels say only ">=3.N")."""
    ours = tuple(int(x) for x in PYTHON_VERSION.split("."))
    for clause in requires.split(","):
        m = re.fullmatch(r"\s*>=\s*(\d+(?:\.\d+)*)\s*", clause)
        if m and tuple(int(x) for x in m.group(1).split("."))[:2] > ours:
            return False
    return True


def environment_spec(spec: JobSpec, env: Env) -> JobSpec:
    """The job's spec with its environment mounted at /job/env (on PYTHONPATH)."""
    return replace(spec, env_dir=str(env.path))


def _readable(root: Path) -> None:
    """The build's inputs readable by the job's uid: directories 0755, files 0644."""
    for dirpath, dirnames, filenames in os.walk(root):
        os.chmod(dirpath, 0o755)
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), 0o644)


def _writable_by(output: Path, uid: int) -> None:
    """The build's output directory, for the job's uid to write (as
    jobdisk.make_job_dir makes a job's)."""
    try:
        os.chown(output, uid, uid)
    except PermissionError:
        # Not root: the build's user can still write when the directory is open to all.
        os.chmod(output, 0o777)


def _read_only_tree(root: Path) -> None:
    """The built environment owned by root and read-only to everyone else: jobs
    read it through a read-only mount, and no later build's uid may change it."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                os.lchown(path, 0, 0)
                os.chmod(path, 0o755 if os.path.isdir(path) else
                         (0o755 if os.stat(path).st_mode & 0o111 else 0o644))
        os.lchown(dirpath, 0, 0)
        os.chmod(dirpath, 0o755)


def _tree_size(root: Path) -> int:
    total = 0
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except FileNotFoundError:
                continue
    return total
