"""The worker daemon's loop: register, heartbeat, claim, run jobs in threads,
and shut down in order.

Shutdown order (first SIGTERM/SIGINT, or `request_stop()`):
1. stop claiming: a job claimed now would only have to be handed back;
2. keep heartbeating, so the proxy keeps our leases while jobs finish;
3. wait up to `grace_s` for running jobs, which post their results;
4. stop what is still running (no result: the proxy requeues it), deregister.
A second signal skips the wait: containers are stopped at once, and the
deregistration hands their jobs back.

The proxy's orders (cancel these jobs, stop those you no longer hold, drain)
come on heartbeat answers, on claim answers, and on result answers that claim
a successor: `apply_orders` applies them alike, whichever arrives first, so a
cancel reaches a busy worker within one claim round trip rather than one
heartbeat interval.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import threading
import time

import psutil

from .client import WorkerClient
from .config import WorkerConfig
from .errors import EXIT_FORCED, EXIT_OK, EXIT_REGISTER, MalformedAnswer, ProtocolError, ProxyUnreachable
from .inputs import DatasetCache, remove_tree
from .protocol import ClaimAnswer
from .runner import JobRunner, Successors
from .sandbox import Sandbox

log = logging.getLogger(__name__)

SECRET_FILE = "worker-secret"


class Worker:
    """Args:
        config: the validated configuration.
        client: the protocol client (not yet registered).
        sandbox: runs containers on the local Docker engine.
    """

    def __init__(self, config: WorkerConfig, client: WorkerClient, sandbox: Sandbox):
        self.config = config
        self.client = client
        self.sandbox = sandbox
        self.cache = DatasetCache(config.data_path / "datasets", config.dataset_cache_bytes)
        self.heartbeat_interval = config.heartbeat_interval_s
        self.stopping = threading.Event()    # first signal: stop claiming
        self.giving_up = threading.Event()   # second signal: stop everything now
        self.draining = False
        self._runners: dict[str, JobRunner] = {}
        self._lock = threading.Lock()
        self._slot_freed = threading.Event()
        self._signals = 0
        self._register_lock = threading.Lock()

    # ------------------------------------------------------------------ entry

    def work(self) -> int:
        """Run until stopped. Returns the process exit code."""
        self.prepare()
        if not self.register():
            return EXIT_REGISTER if not self.stopping.is_set() else EXIT_OK
        heartbeat = threading.Thread(target=self.heartbeat_loop, name="heartbeat", daemon=True)
        heartbeat.start()
        claimer = threading.Thread(target=self.claim_loop, name="claim", daemon=True)
        claimer.start()
        self.stopping.wait()
        self.finish_running_jobs()
        self.deregister()
        return EXIT_FORCED if self.giving_up.is_set() else EXIT_OK

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum, _frame) -> None:
        # Flags only; the loops act on them.
        self._signals += 1
        self.stopping.set()
        if self._signals > 1:
            self.giving_up.set()

    def request_stop(self, now: bool = False) -> None:
        self.stopping.set()
        if now:
            self.giving_up.set()

    # ----------------------------------------------------------------- steps

    def prepare(self) -> None:
        """Clean up after an earlier run of this worker on this machine."""
        data = self.config.data_path
        data.mkdir(parents=True, exist_ok=True)
        gone = self.sandbox.remove_leftovers()
        if gone:
            log.warning("removed %d container(s) left by an earlier run: jobs %s", len(gone), gone)
        remove_tree(data / "jobs")
        # The earlier run's leases: deregistering its worker requeues its jobs now,
        # instead of after the proxy's lease timeout.
        secret_file = data / SECRET_FILE
        if secret_file.exists():
            old = WorkerClient(self.config.proxy_url, secret_file.read_text().strip(), timeout=10)
            try:
                old.deregister()
                log.info("told the proxy the earlier run's jobs were lost")
            except ProtocolError as e:
                log.info("earlier registration not deregistered: %s", e)
            secret_file.unlink(missing_ok=True)

    def register(self) -> bool:
        tries = 0
        while not self.stopping.is_set():
            cap = self.capacity()
            try:
                answer = self.client.register(self.config.enrollment_token, self.config.name, **cap)
            except ProxyUnreachable as e:
                tries += 1
                log.warning("register: %s; retrying", e)
                self.stopping.wait(self.backoff(tries))
                continue
            except ProtocolError as e:
                # Refused, or an answer not understood (a proxy of another version).
                log.error("register refused: %s", e)
                return False
            self.heartbeat_interval = answer.heartbeat_interval_s
            secret_file = self.config.data_path / SECRET_FILE
            fd = os.open(secret_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(self.client.secret)
            log.info("registered as %s (%s): %s; heartbeat every %gs, lost after %gs of silence",
                     self.config.name, answer.worker_id, cap, answer.heartbeat_interval_s,
                     answer.lease_timeout_s)
            return True
        return False

    def capacity(self) -> dict:
        return {"cpus": float(psutil.cpu_count() or 1),
                "memory_mb": int(psutil.virtual_memory().total // (1024 * 1024)),
                "disk_mb": int(psutil.disk_usage(str(self.config.data_path)).free // (1024 * 1024)),
                "gpus": count_nvidia_gpus(), "slots": self.config.slots,
                "images": self.sandbox.images_present(self.config.images)}

    def heartbeat_loop(self) -> None:
        # Runs until the process ends: leases must be kept while jobs finish after a signal.
        while not self.giving_up.is_set():
            try:
                answer = self.client.heartbeat(self.running_ids())
                self.apply_orders(cancel=answer.cancel, unknown=answer.unknown, drain=answer.drain)
            except ProxyUnreachable as e:
                log.info("heartbeat: %s", e)
            except MalformedAnswer as e:
                # The leases were extended all the same; the next beat tries again.
                log.error("heartbeat: %s", e)
            except ProtocolError as e:
                if not self.recover_lost(e):
                    log.error("heartbeat refused (%s): this worker is no longer registered", e)
                    self.stop_jobs("lost")
                    self.stopping.set()
            except Exception:  # the loop boundary
                log.exception("heartbeat")
            self.giving_up.wait(self.heartbeat_interval)

    def apply_orders(self, *, cancel: tuple[str, ...], drain: bool, unknown: tuple[str, ...] = ()) -> None:
        """Act on the proxy's orders, from whichever answer carried them.

        Args:
            cancel: running jobs whose owner cancelled them: stopped, and their
                result says "cancelled".
            drain: take no new jobs (until an answer says otherwise).
            unknown: jobs this worker runs but no longer holds (heartbeats
                only): stopped without a result, another run owns them.
        """
        for job_id in cancel:
            self._stop_job(job_id, "cancelled")
        for job_id in unknown:
            self._stop_job(job_id, "lost")
        # The last answer wins. Heartbeat and claim answers can cross on the
        # way, so a stale one may undo a drain for a moment; harmless, because
        # the proxy gives a draining worker no jobs and its next answer says so.
        self.draining = drain

    def apply_claim(self, answer: ClaimAnswer) -> None:
        """Start the jobs a claim answer leased, then apply its orders.

        Jobs first: a cancel can name a job of this very answer (its owner
        cancelled it between the claim and the answer), and must find its
        runner. A drain only stops the next claim, which the claim loop makes
        after this returns; jobs already leased are this worker's to finish.
        """
        for job in answer.jobs:
            self.start_job(job)
        self.apply_orders(cancel=answer.cancel, drain=answer.drain)

    def claim_loop(self) -> None:
        tries = 0
        while not self.stopping.is_set():
            free = self.config.slots - len(self.running_ids())
            if free <= 0 or self.draining:
                self._slot_freed.wait(1.0)
                self._slot_freed.clear()
                continue
            try:
                answer = self.client.claim(max_jobs=free, wait_s=self.config.claim_wait_s)
                tries = 0
            except (ProxyUnreachable, MalformedAnswer) as e:
                # A malformed answer may be a proxy mid-upgrade: as worth another try.
                tries += 1
                delay = self.backoff(tries)
                log.warning("claim: %s; retry in %.1fs", e, delay)
                self.stopping.wait(delay)
                continue
            except ProtocolError as e:
                if self.recover_lost(e):
                    continue
                log.error("claim refused (%s); stopping", e)
                self.stopping.set()
                return
            except Exception:  # the loop boundary
                log.exception("claim")
                self.stopping.wait(self.backoff(1))
                continue
            self.apply_claim(answer)

    def start_job(self, job: dict) -> None:
        runner = JobRunner(job, client=self.client, sandbox=self.sandbox, cache=self.cache,
                           config=self.config, backoff=self.backoff, giving_up=self.giving_up,
                           on_done=self._job_done,
                           successors=Successors(want=self._claim_with_result, take=self.apply_claim))
        with self._lock:
            self._runners[runner.job_id] = runner
        if self.stopping.is_set():
            # Claimed during shutdown: deregistering hands it back.
            runner.stop("shutdown")
        log.info("job %s (attempt %s): starting in %s", runner.job_id, job["attempt"], job["image"])
        runner.start()

    def recover_lost(self, error: ProtocolError) -> bool:
        """After the proxy marked this worker lost: drop its jobs and register again.

        The proxy has already requeued the jobs, so their results would be
        refused; they are stopped without a result. Returns False when the
        error is not "worker_lost" (revoked, unknown secret): nothing to recover.
        """
        if error.code != "worker_lost":
            return False
        with self._register_lock:
            if error.secret != self.client.secret:
                return True  # the other loop registered again already
            log.warning("the proxy marked this worker lost; stopping its jobs and registering again")
            self.stop_jobs("lost")
            return self.register()

    def finish_running_jobs(self) -> None:
        deadline = time.monotonic() + self.config.grace_s
        if self.running_ids():
            log.info("stopping: waiting up to %gs for %d running job(s)", self.config.grace_s,
                     len(self.running_ids()))
        while self.running_ids() and time.monotonic() < deadline and not self.giving_up.is_set():
            self._slot_freed.wait(0.2)
            self._slot_freed.clear()
        self.stop_jobs("shutdown")
        for runner in self._snapshot():
            runner.join(timeout=30)

    def deregister(self) -> None:
        try:
            self.client.deregister()
            (self.config.data_path / SECRET_FILE).unlink(missing_ok=True)
            log.info("deregistered")
        except ProtocolError as e:
            log.warning("deregister: %s (the proxy will mark this worker lost)", e)

    # --------------------------------------------------------------- helpers

    def running_ids(self) -> list[str]:
        with self._lock:
            return list(self._runners)

    def stop_jobs(self, reason: str) -> None:
        for runner in self._snapshot():
            runner.stop(reason)

    def _snapshot(self) -> list[JobRunner]:
        with self._lock:
            return list(self._runners.values())

    def _stop_job(self, job_id: str, reason: str) -> None:
        with self._lock:
            runner = self._runners.get(job_id)
        if runner is not None:
            log.info("job %s: stopping (%s)", job_id, reason)
            runner.stop(reason)

    def _claim_with_result(self) -> int:
        # The finishing job's slot is about to be free: take its successor in
        # the same request, unless this worker is stopping or draining.
        return 0 if self.stopping.is_set() or self.draining else 1

    def _job_done(self, runner: JobRunner) -> None:
        with self._lock:
            self._runners.pop(runner.job_id, None)
        self._slot_freed.set()

    def backoff(self, tries: int) -> float:
        """Capped exponential backoff: initial, 2x, 4x, ... up to backoff_max_s."""
        return min(self.config.backoff_max_s, self.config.backoff_initial_s * 2 ** max(0, tries - 1))


def count_nvidia_gpus() -> int:
    """NVIDIA GPUs reported by nvidia-smi; 0 when it is not installed or fails."""
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.splitlines() if line.strip())
