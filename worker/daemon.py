"""The worker daemon's loop: register, heartbeat, claim, run jobs in threads,
and shut down in order.

Shutdown order (first SIGTERM/SIGINT, or `request_stop()`):
1. stop claiming: a job claimed now would only have to be handed back;
2. keep heartbeating, so the proxy keeps our leases while jobs finish;
3. wait up to `grace_s` for running jobs, which post their results;
4. stop what is still running (no result: the proxy requeues it), deregister.
A second signal skips the wait: containers are stopped at once, and the
deregistration hands their jobs back. Waiting containers (`prestart`) are
removed at step 1, and while the proxy says drain.

Nothing but a signal or an admin ends a registered worker. The proxy being
unreachable is retried with capped backoff; a refused secret (marked lost
after a partition longer than the lease, or a proxy that forgot this worker)
makes it stop the jobs the proxy already requeued and register again, first
with its own secret, then with its enrollment token. Only "retired" or
"revoked" (an admin's word) end it, with EXIT_RETIRED or EXIT_REVOKED.

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
from .errors import (EXIT_FORCED, EXIT_OK, EXIT_REGISTER, EXIT_RETIRED, EXIT_REVOKED, MalformedAnswer,
                     ProtocolError, ProxyUnreachable)
from .inputs import DatasetCache
from .prestart import Prestarter
from .pyenv import EnvCache
from .protocol import ClaimAnswer
from .runner import JobRunner, Successors, remove_job_dirs
from .sandbox import Sandbox

log = logging.getLogger(__name__)

SECRET_FILE = "worker-secret"
# The proxy's refusals that are an admin's word: the worker ends with this code
# (and systemd does not restart it). Any other refused secret registers again.
ENDED_BY_ADMIN = {"worker_retired": EXIT_RETIRED, "worker_revoked": EXIT_REVOKED}


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
        self.envs = EnvCache(config.data_path / "pyenv", config.pyenv_cache_mb * 1024 * 1024,
                             sandbox=sandbox, job_uid=config.job_uid)
        self.heartbeat_interval = config.heartbeat_interval_s
        self.stopping = threading.Event()    # first signal: stop claiming
        self.giving_up = threading.Event()   # second signal: stop everything now
        self.draining = False
        self._runners: dict[str, JobRunner] = {}
        self._lock = threading.Lock()
        self._slot_freed = threading.Event()
        self._signals = 0
        self._register_lock = threading.Lock()
        self.ended_by_admin: int | None = None   # the exit code, once an admin ended this worker
        # The earlier run's secret (worker-secret): the first registration
        # rejoins with it, so a restart needs no enrollment token still valid.
        self._saved_secret: str | None = None
        self.prestarter = Prestarter(
            sandbox, jobs_dir=config.data_path / "jobs", slots=config.slots, image=config.images[0],
            disk_mb=config.default_disk_mb if config.disk_quota else None,
            job_uid=config.job_uid) if config.prestart else None

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
        if self.prestarter is not None and not self.draining:
            self.prestarter.open()
        self.stopping.wait()
        if self.prestarter is not None:
            self.prestarter.close()
        self.finish_running_jobs()
        if self.ended_by_admin is not None:
            return self.ended_by_admin   # nothing to deregister: the proxy retired us
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
        remove_job_dirs(data / "jobs")
        # The earlier run's registration: rejoining with its secret (register)
        # replaces it and requeues its jobs now, instead of after the proxy's
        # lease timeout, and works after the enrollment token has expired.
        secret_file = data / SECRET_FILE
        if secret_file.exists():
            self._saved_secret = secret_file.read_text().strip() or None

    def register(self, again: bool = False) -> bool:
        """Register with the proxy; returns False when stopped or refused for good.

        Args:
            again: this worker was registered and the proxy dropped it: rejoin
                with the old secret first (the enrollment token may have expired
                since), and take a refusal as worth another try (a proxy being
                set up again), unless it is an admin's word (ENDED_BY_ADMIN).
                The first registration gives up on a refusal instead: a wrong
                token is a configuration error (EXIT_REGISTER).
        """
        tries = 0
        old_secret = self.client.secret if again else self._saved_secret
        self._saved_secret = None
        while not self.stopping.is_set():
            cap = self.capacity()
            credential = old_secret or self.config.enrollment_token
            try:
                answer = self.client.register(credential, self.config.name, **cap)
            except ProxyUnreachable as e:
                tries += 1
                log.warning("register: %s; retrying", e)
                self.stopping.wait(self.backoff(tries))
                continue
            except ProtocolError as e:
                if again and e.code in ENDED_BY_ADMIN:
                    self.end_by_admin(e)
                    return False
                if not again and old_secret is not None:
                    # The earlier run's secret is not taken (an admin retired it,
                    # a proxy that forgot it): join anew with the enrollment token.
                    log.info("earlier registration not taken back (%s); enrolling anew", e)
                    old_secret = None
                    continue
                if not again:
                    # Refused, or an answer not understood (a proxy of another version).
                    log.error("register refused: %s", e)
                    return False
                tries += 1
                log.error("register again refused (%s); retrying", e)
                if old_secret is not None:
                    old_secret = None   # e.g. a proxy that forgot us: the enrollment token next
                    continue
                self.stopping.wait(self.backoff(tries))
                continue
            self.heartbeat_interval = answer.heartbeat_interval_s
            log.info("registered as %s (%s): %s; heartbeat every %gs, lost after %gs of silence",
                     self.config.name, answer.worker_id, cap, answer.heartbeat_interval_s,
                     answer.lease_timeout_s)
            # After the line above: `make run` waits for this file to print the
            # first start's password last (scripts/run-local.sh).
            secret_file = self.config.data_path / SECRET_FILE
            fd = os.open(secret_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(self.client.secret)
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
                self.on_refused("heartbeat", e)
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
        was, self.draining = self.draining, drain
        if self.prestarter is not None and was != drain:
            # A drained worker holds no waiting containers; lifted, it fills its free slots again.
            if drain:
                self.prestarter.close()
            elif not self.stopping.is_set():
                self.prestarter.open()

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
                self.on_refused("claim", e)
                tries += 1
                self.stopping.wait(self.backoff(tries))
                continue
            except Exception:  # the loop boundary
                log.exception("claim")
                self.stopping.wait(self.backoff(1))
                continue
            self.apply_claim(answer)

    def start_job(self, job: dict) -> None:
        runner = JobRunner(job, client=self.client, sandbox=self.sandbox, cache=self.cache,
                           config=self.config, backoff=self.backoff, giving_up=self.giving_up,
                           on_done=self._job_done,
                           successors=Successors(want=self._claim_with_result, take=self.apply_claim),
                           prestarter=self.prestarter, envs=self.envs)
        with self._lock:
            self._runners[runner.job_id] = runner
        if self.stopping.is_set():
            # Claimed during shutdown: deregistering hands it back.
            runner.stop("shutdown")
        log.info("job %s (attempt %s): starting in %s", runner.job_id, job["attempt"], job["image"])
        runner.start()

    def on_refused(self, call: str, error: ProtocolError) -> None:
        """A heartbeat or claim was refused: rejoin, or end when an admin said so.

        A refused secret (401) means the proxy no longer counts this worker: it
        has requeued the jobs, so their results would be refused; they are
        stopped without a result, and the worker registers again (or ends,
        ENDED_BY_ADMIN). Any other refusal is logged and the call is made again
        later: a proxy of another version, not a reason to stop on our own.
        """
        if error.status != 401:
            log.error("%s refused: %s", call, error)
            return
        with self._register_lock:
            if error.secret != self.client.secret or self.stopping.is_set():
                return  # the other loop registered again already, or ended us
            if error.code in ENDED_BY_ADMIN:
                self.end_by_admin(error)
                return
            log.warning("%s: the proxy dropped this worker (%s); stopping its jobs and registering "
                        "again", call, error)
            self.stop_jobs("lost")
            self.register(again=True)

    def end_by_admin(self, error: ProtocolError) -> None:
        """An admin retired or revoked this worker: stop its jobs (already requeued) and end."""
        log.error("this worker was ended by an admin (%s); exiting with code %d", error,
                  ENDED_BY_ADMIN[error.code])
        self.ended_by_admin = ENDED_BY_ADMIN[error.code]
        self.stop_jobs("lost")
        self.stopping.set()

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
