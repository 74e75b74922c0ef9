"""One claimed job, from claim to accepted result: fetch inputs, run the
container, collect outputs, post the result (retried until the proxy accepts
or refuses it), and always clean up the job directory.
"""
from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .client import WorkerClient
from .config import WorkerConfig
from .errors import InputError, LeaseLost, MalformedAnswer, ProtocolError, ProxyUnreachable, SandboxError
from .inputs import DatasetCache, extract_dataset, remove_tree, sha256_of
from .logs import LogShipper, LogStream
from .outputs import collect_outputs
from .protocol import ClaimAnswer
from .sandbox import JOB_USER, JobSpec, Outcome, Sandbox

log = logging.getLogger(__name__)

JOB_UID, JOB_GID = (int(i) for i in JOB_USER.split(":"))
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
    """

    def __init__(self, claimed: dict, *, client: WorkerClient, sandbox: Sandbox, cache: DatasetCache,
                 config: WorkerConfig, backoff, giving_up: threading.Event, on_done,
                 successors: Successors | None = None):
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
            remove_tree(self.job_dir)
            self.on_done(self)

    # -------------------------------------------------------------- the steps

    def _execute(self) -> tuple[dict | None, Path | None]:
        input_dir, output_dir = self._make_job_dir()
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
            return self._result("failed", failure_reason=f"inputs: {e}"), None
        shipper = LogShipper(self.client, self.job_id, self.job["attempt"], list(streams.values()),
                             self.config.log_flush_s)
        shipper.start()
        self._shipper = shipper
        try:
            outcome = self.sandbox.run(
                self._spec(), input_dir, output_dir,
                on_output=lambda name, data: streams[name].feed(data),
                stop_reason=lambda: self._stop_reason)
        except SandboxError as e:
            log.warning("job %s: %s", self.job_id, e)
            outcome = Outcome(state="failed", exit_code=None, failure_reason=str(e), cpu_seconds=None,
                              peak_memory_bytes=None, wall_seconds=None)
        finally:
            shipper.finish()
        if outcome.state == "abandoned" or shipper.lease_lost:
            log.info("job %s: stopped (%s), no result sent", self.job_id, self._stop_reason)
            return None, None
        archive = self.job_dir / "outputs.zip"
        collected = collect_outputs(output_dir, archive, max_bytes=self.config.output_max_bytes,
                                    max_files=self.config.output_max_files)
        return self._outcome_result(outcome, streams, collected), archive if collected else None

    def _make_job_dir(self) -> tuple[Path, Path]:
        remove_tree(self.job_dir)
        input_dir, output_dir = self.job_dir / "input", self.job_dir / "output"
        for d in (self.job_dir, input_dir, output_dir):
            d.mkdir(parents=True, mode=0o755)
            os.chmod(d, 0o755)  # whatever the umask: uid 1000 must read the inputs
        try:
            os.chown(output_dir, JOB_UID, JOB_GID)
        except PermissionError:
            # Not root: the job's user can still write when the directory is open to all.
            os.chmod(output_dir, 0o777)
        return input_dir, output_dir

    def _fetch_inputs(self, input_dir: Path) -> None:
        script = input_dir / "main.py"
        self.client.download(self.job["script"]["url"], script)
        expected = self.job["script"].get("sha256")
        if expected and sha256_of(script) != expected:
            raise InputError("script sha256 mismatch")
        os.chmod(script, 0o644)
        dataset = self.job.get("dataset")
        if not dataset:
            return
        data_dir = input_dir / "data"
        data_dir.mkdir(mode=0o755)
        os.chmod(data_dir, 0o755)
        path = self.cache.acquire(dataset["sha256"], lambda dest: self.client.download(dataset["url"], dest))
        try:
            extract_dataset(path, data_dir, max_bytes=self.config.dataset_max_bytes,
                            max_members=self.config.dataset_max_members,
                            max_ratio=self.config.dataset_max_ratio)
        finally:
            self.cache.release(dataset["sha256"])

    def _spec(self) -> JobSpec:
        j = self.job
        return JobSpec(job_id=j["id"], attempt=j["attempt"], image=j["image"], cpus=float(j["cpus"]),
                       memory_mb=int(j["memory_mb"]), gpus=int(j.get("gpus") or 0),
                       timeout_s=float(j["timeout_s"]))

    def _outcome_result(self, outcome: Outcome, streams: dict[str, LogStream], collected) -> dict:
        out, err = streams["stdout"], streams["stderr"]
        return self._result(
            outcome.state, exit_code=outcome.exit_code, failure_reason=outcome.failure_reason,
            stdout=out.tail(), stderr=err.tail(),
            stdout_truncated=out.truncated, stderr_truncated=err.truncated,
            cpu_seconds=outcome.cpu_seconds, peak_memory_bytes=outcome.peak_memory_bytes,
            wall_seconds=outcome.wall_seconds, gpu_seconds=gpu_seconds(self.job, outcome))

    def _result(self, state: str, **fields) -> dict:
        result = {"attempt": self.job["attempt"], "state": state, **fields}
        return {k: v for k, v in result.items() if v is not None}

    def _post_result(self, result: dict, archive: Path | None) -> None:
        tries = 0
        while True:
            try:
                # Logs go first: once the result is in, the proxy takes no more chunks.
                if self._shipper is not None and not self._shipper.flush():
                    raise ProxyUnreachable("log chunks not delivered yet")
                want = self.successors.want() if self.successors else 0
                answer = self.client.post_result(self.job_id, dict(result, claim_next=want), archive)
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
            except MalformedAnswer as e:
                # A 2xx: the result is in. Any job claimed with it is not known
                # here; its lease runs out and it is requeued.
                log.error("job %s: result delivered, answer not understood: %s", self.job_id, e)
                return
            except ProtocolError as e:
                log.warning("job %s: the proxy refused the result: %s", self.job_id, e)
                return


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
