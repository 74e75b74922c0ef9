"""One claimed job, from claim to accepted result: make its disk, fetch
inputs, run the container, collect outputs, post the result (retried until
the proxy accepts or refuses it), and always clean up the ended container
(after the result: removing it is not on the way to the next job), the job
directory, and give the slot back, whatever the job left (worker/trees.py).
"""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import arrays
from .client import Archive, WorkerClient
from .config import WorkerConfig
from .errors import (EnvBuildError, InputError, LeaseLost, MalformedAnswer, OutputsRefused,
                     ProtocolError, ProxyUnreachable, SandboxError)
from .inputs import DatasetCache, InputBudget, fetch_input, unpack_parent_outputs
from .jobdisk import JobDisk, make_job_dir, mounts_under, unmount
from .logs import LogShipper, LogStream
from .outputs import Collected, collect_outputs
from .prestart import Prestarter, shape_of
from .protocol import OUTPUTS_DIRECT, OUTPUTS_VIA_PROXY, ClaimAnswer
from .pyenv import DEFAULT_INDEX_URL, Env, EnvCache, environment_spec
from .sandbox import JobSpec, Outcome, Sandbox, Waiting
from .trees import remove_tree

log = logging.getLogger(__name__)

STREAMS = ("stdout", "stderr")


@dataclass(frozen=True)
class Successors:
    """How a finishing job claims its successors in the same request as its
    result, so a freed slot is filled without a claim round trip of its own.

    want: how many jobs to ask for, looked up just before each try (0 once the
        worker is stopping or draining).
    take: gets the claim part of the result answer: its orders and its jobs.
    """
    want: Callable[[], int]
    take: Callable[[ClaimAnswer], None]


class JobRunner(threading.Thread):
    """Runs one claimed job in its own thread.

    Args:
        claimed: the job as the claim answered it.
        backoff: callable(attempt_number) -> seconds, for result retries.
        giving_up: an Event set when the worker must stop now (second signal).
        successors: claim the next jobs along with the result; None to post
            results alone.
        prestarter: where a waiting container for the job may be; None: always cold.
    """

    def __init__(self, claimed: dict, *, client: WorkerClient, sandbox: Sandbox, cache: DatasetCache,
                 config: WorkerConfig, backoff, giving_up: threading.Event, on_done,
                 successors: Successors | None = None, prestarter: Prestarter | None = None,
                 envs: EnvCache | None = None):
        super().__init__(name=f"job-{claimed['id']}", daemon=True)
        self.job = claimed
        self.client = client
        self.sandbox = sandbox
        self.cache = cache
        self.config = config
        self.backoff = backoff
        self.giving_up = giving_up
        self.on_done = on_done
        self.successors = successors
        self.job_dir = config.data_path / "jobs" / f"{claimed['id']}-{claimed['attempt']}"
        self._stop_reason: str | None = None
        self._shipper: LogShipper | None = None
        self._disk: JobDisk | None = None
        self.prestarter = prestarter
        self._waiting: Waiting | None = None   # taken, not yet handed to the sandbox
        self._ended = None   # its container, ended, removed at clean-up (after the result)
        self._slot_held = prestarter is not None
        # Requirements environments (worker/pyenv.py); the one this job holds,
        # and what the result says of it (env_cached, env_build_s).
        self.envs = envs
        self._env: Env | None = None
        self._env_report: dict = {}

    @property
    def job_id(self) -> str:
        return self.job["id"]

    def stop(self, reason: str) -> None:
        """Ask the container to stop: "cancelled" (by its owner), or "lost"/"shutdown"."""
        if self._stop_reason is None:
            self._stop_reason = reason

    def run(self) -> None:
        try:
            try:
                result, archive = self._execute()
            except Exception as e:  # the loop boundary of a job thread
                log.exception("job %s: unexpected error", self.job_id)
                # A final answer beats a job left running until its lease expires.
                result, archive = self._result("failed", failure_reason=f"worker error: {e}"), None
            if result is not None:
                self._post_result(result, archive)
        finally:
            # The slot is given back even when the clean-up fails: a job
            # directory left behind is the start-up sweep's, not a lost slot.
            try:
                self._clean_up()
            finally:
                self._container_gone()
                self.on_done(self)

    def _container_gone(self) -> None:
        """Tell the prestarter once: the slot's container is gone (it makes the
        slot's waiting container again if the one made at `take` failed)."""
        if self._slot_held:
            self._slot_held = False
            self.prestarter.refill(shape_of(self._spec(), self._quota_mb()))

    def _clean_up(self) -> None:
        try:
            if self._ended is not None:
                # Before its disk: the container holds the disk's mount.
                self.sandbox.remove(self._ended)
                self._ended = None
            if self._waiting is not None:
                # Taken, never run (its inputs failed): it runs nothing else.
                self.sandbox.discard(self._waiting)
                self._waiting = None
            if self._env is not None:
                self.envs.release(self._env.key)
                self._env = None
            if self._disk is not None:
                self._disk.remove()
            remove_tree(self.job_dir)
        except Exception:  # the loop boundary of a job thread
            log.exception("job %s: its directory could not be removed; the next start-up "
                          "sweep removes it", self.job_id)

    # -------------------------------------------------------------- the steps

    def _execute(self) -> tuple[dict | None, Path | None]:
        try:
            input_dir, output_dir = self._make_job_dir()
        except SandboxError as e:
            log.warning("job %s: %s", self.job_id, e)
            return self._result("failed", failure_reason=f"worker error: {e}"), None
        streams = {name: LogStream(name, self.config.log_max_bytes, self.config.log_tail_bytes)
                   for name in STREAMS}
        try:
            self._fetch_inputs(input_dir)
        except (InputError, ProtocolError, OSError) as e:
            # Not the job's fault, so no result: a lost lease is another run's
            # business, and an unreachable proxy (restarting, a download cut off
            # mid-body, a 502/503/504) lets the lease run out and the job run
            # again, instead of failing it for good. Any other refusal (a 500,
            # a missing blob) is the proxy's last word: the job fails with it.
            if isinstance(e, (LeaseLost, ProxyUnreachable)):
                log.warning("job %s: inputs: %s; handed back without a result", self.job_id, e)
                return None, None
            log.warning("job %s: inputs: %s", self.job_id, e)
            # The owner reads this: an OSError's message names a path of this machine.
            why = _why(e) if isinstance(e, OSError) else e
            return self._result("failed", failure_reason=f"inputs: {why}"), None
        shipper = LogShipper(self.client, self.job_id, self.job["attempt"], list(streams.values()),
                             self.config.log_flush_s)
        shipper.start()
        self._shipper = shipper
        try:
            # Its requirements first: their build is the log's first section.
            spec = self._with_environment(input_dir, streams)
            if self.prestarter is not None:
                # Its slot's next waiting container is made while this job runs.
                self.prestarter.refill(shape_of(self._spec(), self._quota_mb()))
            if isinstance(spec, Outcome):
                # Ended in its build: the clean-up removes the waiting container it took.
                outcome = spec
            else:
                # The sandbox's from here (it runs it or removes it); until then, whatever
                # goes wrong, the clean-up removes it.
                waiting, self._waiting = self._waiting, None
                outcome = self.sandbox.run(
                    spec, input_dir, output_dir,
                    on_output=lambda name, data: streams[name].feed(data),
                    stop_reason=lambda: self._stop_reason,
                    on_poll=self._disk.sample if self._disk is not None else None,
                    waiting=waiting, keep=self._keep)
        except SandboxError as e:
            log.warning("job %s: %s", self.job_id, e)
            outcome = Outcome(state="failed", exit_code=None, failure_reason=str(e), cpu_seconds=None,
                              peak_memory_bytes=None, wall_seconds=None)
        finally:
            shipper.finish()
            # Before outputs and the result: a missing waiting container is made meanwhile.
            self._container_gone()
        if outcome.state == "abandoned" or shipper.lease_lost:
            log.info("job %s: stopped (%s), no result sent", self.job_id, self._stop_reason)
            return None, None
        archive = self.job_dir / "outputs.zip"
        try:
            collected = collect_outputs(output_dir, archive, max_bytes=self.config.output_max_bytes,
                                        max_files=self.config.output_max_files)
        except Exception as e:  # whatever the job's tree does, the job ends, not the worker
            log.exception("job %s: collecting its outputs failed", self.job_id)
            return failed_with(self._outcome_result(outcome, streams, None),
                               f"output collection failed: {_why(e)}"), None
        return self._outcome_result(outcome, streams, collected), archive if collected else None

    def _keep(self, container) -> None:
        self._ended = container

    def _make_job_dir(self) -> tuple[Path, Path]:
        """The job directory: input/ (read-only to the job) and the job's writable
        directory, on a disk of its own when the worker has quotas; a waiting
        container's, when one fits the job.

        Raises:
            SandboxError: the job's disk could not be made.
        """
        prepared = (self.prestarter.take(self._spec(), self._quota_mb(), self.job_dir)
                    if self.prestarter else None)
        if prepared is not None:
            self._disk, self._waiting = prepared.disk, prepared.waiting
            return self._waiting.input_dir, self._waiting.output_dir
        remove_tree(self.job_dir)
        input_dir, output_dir, self._disk = make_job_dir(
            self.job_dir, owner=(self.config.job_uid, self.config.job_uid), disk_mb=self._quota_mb())
        return input_dir, output_dir

    def _quota_mb(self) -> int | None:
        """The job's disk in MiB; None when the worker has no quotas."""
        if not self.config.disk_quota:
            return None
        value = self.job.get("disk_mb")
        return int(value) if value else self.config.default_disk_mb

    def _fetch_inputs(self, input_dir: Path) -> None:
        script = input_dir / "main.py"
        fetch_input(self.client.download, self.job["script"], script, "script")
        os.chmod(script, 0o644)
        requirements = self.job.get("requirements")
        if requirements:
            # Also the job's to read, at /job/input/requirements.txt.
            path = input_dir / "requirements.txt"
            fetch_input(self.client.download, requirements, path, "requirements")
            os.chmod(path, 0o644)
        # A job array's parameters row, at /job/input/params.json.
        arrays.write_params(self.job.get("array"), input_dir)
        # One limit for everything it unpacks on this disk: its parents' outputs and its dataset.
        budget = InputBudget(self.config.dataset_max_bytes, self.config.dataset_max_members,
                             self.config.dataset_max_ratio)
        # The outputs of the jobs it runs after, at /job/input/after/<name>/.
        unpack_parent_outputs(self.job.get("after") or [], input_dir, self.job_dir,
                              self.client.download, budget)
        dataset = self.job.get("dataset")
        if not dataset:
            return
        data_dir = input_dir / "data"
        data_dir.mkdir(mode=0o755)
        os.chmod(data_dir, 0o755)
        # The cache checks it against the claim's sha256 as it keeps it.
        path = self.cache.acquire(dataset["sha256"], lambda dest: self.client.download(
            dataset["url"], dest, direct_url=dataset.get("direct_url")))
        try:
            budget.unpack(path, data_dir, "dataset")
        finally:
            self.cache.release(dataset["sha256"])

    def _spec(self) -> JobSpec:
        j = self.job
        return JobSpec(job_id=j["id"], attempt=j["attempt"], image=j["image"], cpus=float(j["cpus"]),
                       memory_mb=int(j["memory_mb"]), gpus=int(j.get("gpus") or 0),
                       timeout_s=float(j["timeout_s"]), try_number=int(j.get("try") or 1),
                       array_env=arrays.environment(j.get("array")),
                       user_env=tuple((j.get("env") or {}).items()))

    def _outcome_result(self, outcome: Outcome, streams: dict[str, LogStream],
                        collected: Collected | None) -> dict:
        out, err = streams["stdout"], streams["stderr"]
        disk_full = self._disk is not None and self._disk.full
        reason = outcome.failure_reason
        if disk_full and outcome.state == "failed":
            reason = f"{reason} (the job filled its disk quota of {self._disk.size_mb} MB)"
        return self._result(
            outcome.state, exit_code=outcome.exit_code, failure_reason=reason,
            disk_full=disk_full or None, outputs=collected.report() if collected else None,
            stdout=out.tail(), stderr=err.tail(),
            stdout_truncated=out.truncated, stderr_truncated=err.truncated,
            cpu_seconds=outcome.cpu_seconds, peak_memory_bytes=outcome.peak_memory_bytes,
            wall_seconds=outcome.wall_seconds, gpu_seconds=gpu_seconds(self.job, outcome),
            **self._env_report)

    def _with_environment(self, input_dir: Path, streams: dict[str, LogStream]) -> JobSpec | Outcome:
        """The job's spec, with its requirements environment mounted when it
        has requirements (worker/pyenv.py: built, or found in the cache).

        Returns:
            The spec to run; or an Outcome that ends the job instead: failed
            (env_build_failed: pip's message), or stopped during the build.
        """
        spec = self._spec()
        if not self.job.get("requirements"):
            return spec
        out = streams["stdout"]
        started = time.monotonic()
        try:
            if self.envs is None:
                raise EnvBuildError("this worker cannot install requirements")
            index = (self.config.package_index_url or self.job.get("package_index_url")
                     or DEFAULT_INDEX_URL)
            got = self.envs.acquire(spec, (input_dir / "requirements.txt").read_text(), index,
                                    on_output=out.feed, stop_reason=lambda: self._stop_reason)
        except (EnvBuildError, SandboxError) as e:
            log.info("job %s: environment build failed: %s", self.job_id, e)
            out.feed(f"== environment build failed: {e} ==\n".encode())
            self._env_report = {"env_cached": False,
                                "env_build_s": round(time.monotonic() - started, 3)}
            return Outcome(state="failed", exit_code=None, failure_reason=f"env_build_failed: {e}",
                           cpu_seconds=None, peak_memory_bytes=None, wall_seconds=None)
        if isinstance(got, Outcome):
            return got
        self._env = got
        self._env_report = {"env_cached": got.cached, "env_build_s": got.build_s}
        out.feed(b"== running the script ==\n")
        return environment_spec(spec, got)

    def _result(self, state: str, **fields) -> dict:
        result = {"attempt": self.job["attempt"], "state": state, **fields}
        return {k: v for k, v in result.items() if v is not None}

    def _post_result(self, result: dict, archive: Path | None) -> None:
        """Post the result until the proxy takes or refuses it; a direct upload's
        archive refused (OutputsRefused: the store refused its bytes, or the
        proxy what the store holds) turns it into a failed result without
        outputs, posted the same way: never a result naming outputs that the
        store does not hold, and never a job left running until its lease
        runs out."""
        upload = self.job.get("outputs_upload") or OUTPUTS_VIA_PROXY
        outputs = archive
        if archive is not None and upload == OUTPUTS_DIRECT:
            try:
                outputs = Archive.of(archive)   # hashed once, whatever the number of tries
            except OSError as e:
                result, outputs = _without_outputs(result, _why(e)), None
        tries = 0
        while True:
            try:
                # Logs go first: once the result is in, the proxy takes no more chunks.
                if self._shipper is not None and not self._shipper.flush():
                    raise ProxyUnreachable("log chunks not delivered yet")
                want = self.successors.want() if self.successors else 0
                answer = self.client.post_result(self.job_id, dict(result, claim_next=want), outputs,
                                                 upload=upload)
                log.info("job %s: %s (applied=%s)", self.job_id, answer.state, answer.applied)
                # Even without jobs: the claim part carries cancel and drain orders.
                if answer.claim is not None and self.successors:
                    self.successors.take(answer.claim)
                return
            except ProxyUnreachable as e:
                tries += 1
                delay = self.backoff(tries)
                log.info("job %s: result waits for the proxy (%s); retry in %.1fs", self.job_id, e, delay)
                if self.giving_up.wait(delay):
                    log.warning("job %s: worker stopping; result not delivered", self.job_id)
                    return
            except OutputsRefused as e:
                log.warning("job %s: outputs not delivered: %s", self.job_id, e)
                result, outputs = _without_outputs(result, str(e)), None
            except MalformedAnswer as e:
                # A 2xx: the result is in. Any job claimed with it is not known
                # here; its lease runs out and it is requeued.
                log.error("job %s: result delivered, answer not understood: %s", self.job_id, e)
                return
            except ProtocolError as e:
                log.warning("job %s: the proxy refused the result: %s", self.job_id, e)
                return


def remove_job_dirs(jobs_dir: Path) -> None:
    """The start-up sweep: remove what jobs of an earlier run left in `jobs_dir`
    (their disks still mounted, when that run was killed, and any tree a job
    made). What cannot be removed is logged, and the worker starts all the
    same: a leftover must not keep it from running jobs. A disk that stays
    mounted is never removed through (trees.py stops at a mount point).
    """
    for mountpoint in mounts_under(jobs_dir):
        log.warning("unmounting a job disk an earlier run left: %s", mountpoint)
        try:
            unmount(mountpoint)
        except SandboxError as e:
            log.error("%s: %s", mountpoint, e)
    try:
        remove_tree(jobs_dir)
    except OSError as e:
        log.error("could not remove what an earlier run left in %s: %s", jobs_dir, e)


def failed_with(result: dict, reason: str) -> dict:
    """The result with `reason` added to its failure reason; a success becomes a failure."""
    result = dict(result, failure_reason="; ".join(filter(None, [result.get("failure_reason"),
                                                                 reason])))
    if result["state"] == "succeeded":
        result["state"] = "failed"
    return result


def _without_outputs(result: dict, why: str) -> dict:
    """A result whose outputs could not be delivered: failed, naming none."""
    return failed_with({k: v for k, v in result.items() if k != "outputs"},
                       f"outputs not delivered: {why}")


def _why(error: Exception) -> str:
    """What went wrong, for the job's owner: never a path on the worker."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return type(error).__name__


def gpu_seconds(job: dict, outcome: Outcome) -> float | None:
    """GPU time the job held: its GPUs for the container's wall time.

    The GPUs are the job's alone for that whole time (the container gets them
    by device request), so this is what it kept from others, whether or not it
    kept them busy; None when the wall time is unknown.
    """
    gpus = int(job.get("gpus") or 0)
    if outcome.wall_seconds is None:
        return None
    return round(gpus * outcome.wall_seconds, 3)
