"""`make soak` (`python -m bench.soak`): the whole system under faults, then its books checked.

On loopback: a proxy (gunicorn, several processes, SQLite store, 1 s
heartbeats, a short lease) and several real `jobcloud-worker` processes on the
local Docker engine. Several users submit small scripts (some write an output
file, some fail on purpose) while a driver, at seeded random, kill -9's a
worker and starts its replacement, restarts the proxy (SIGTERM or kill -9),
freezes a worker past its lease (SIGSTOP, then SIGCONT), freezes the whole
proxy past the lease, and cuts one worker's link past the lease. Every worker
talks to the proxy through a `LossyLink` of its own, which loses some result
posts before the proxy sees them and cuts others after the proxy committed
them. A few hostile jobs run in the mix: a deep directory tree, a disk filled
with many files up to the job's quota, and 10^5 files. Then the
faults stop, the system settles, and the invariants are checked: zero
violations is the only pass, and at least `min_verified_share` of the planned
jobs must be shown to have ended as their script meant: a soak in which little
works cannot pass by skipping what failed.

Each script prints its attempt and a token of its own, and writes the token
to its output file, so the stored result shows which run it came from.
Besides the books, the workers themselves: no worker process may exit unless
the soak killed it, every worker must be active at the proxy again within two
heartbeats of each fault ending, and each worker's data directory must be back
to its size before the first job (nothing mounted under it).
"""
from __future__ import annotations

import argparse
import contextlib
import http.client
import io
import json
import math
import os
import random
import re
import signal
import sys
import threading
import time
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import requests

from .forms import job_form
from .harness import Account, BenchError, Proxy, free_port
from .worker import FINAL, IMAGE, LocalWorker

RESULT_PATH = re.compile(r"^/api/v1/worker/jobs/([^/?]+)/result$")
DONE = re.compile(r"done attempt=(\d+) token=([0-9a-f]{16})")
SCRIPT = """import os, secrets, sys, time
token = secrets.token_hex(8)
attempt = os.environ["JOBCLOUD_ATTEMPT"]
print("start attempt=%s" % attempt, flush=True)
time.sleep({sleep})
if {output}:
    open("token.txt", "w").write(token)
print("done attempt=%s token=%s" % (attempt, token), flush=True)
sys.exit({exit_code})
"""
WORKER_LOST = "worker lost"
# Logged by a trigger on every change to a final job's outcome (see watch_final_rows).
OVERWRITES = "soak_final_overwrites"
WATCHED = ("state", "exit_code", "attempt", "finished_at", "stdout_tail", "output_sha256")
FAULTS = ("kill_worker", "restart_proxy", "kill_proxy", "pause_worker", "freeze_proxy",
          "cut_link")
# Hostile scripts in the mix (Expected.kind): each prints the same start/done
# markers as the others, so its one result is checked the same way.
HOSTILE = {
    # 3,000 nested directories in the outputs: deeper than Python's recursion limit.
    "deep": """top = os.getcwd()
for _ in range(3000):
    os.mkdir("d")
    os.chdir("d")
os.chdir(top)
""",
    # 1 MiB files until the job's disk quota says ENOSPC, then carry on (and
    # fail, having written four times its quota, if it never does).
    "fill": """import errno
os.makedirs("fill", exist_ok=True)
try:
    for i in range(4 * DISK_MB):
        with open("fill/%d" % i, "wb") as f:
            f.write(b"x" * 2**20)
    print("no ENOSPC after %d MiB" % (4 * DISK_MB), flush=True)
    sys.exit(5)
except OSError as e:
    if e.errno != errno.ENOSPC:
        raise
    print("disk full after %d files" % i, flush=True)
import shutil
shutil.rmtree("fill")
""",
    # 10^5 empty files: ten times the output file cap.
    "many": """os.makedirs("many", exist_ok=True)
for i in range(100000):
    open("many/%d" % i, "w").close()
""",
}
# The hostile jobs' disk_mb: the filler's quota is small (it writes four times
# that before it gives up); 10^5 files need inodes a 1 GiB job disk (about
# 68,000) does not have, and the disks are sparse, so the others get 2 GiB.
HOSTILE_DISK_MB = 64
HOSTILE_ROOMY_DISK_MB = 2048
# A recovered worker: active at the proxy within this many heartbeats of a fault's end.
RECOVERY_HEARTBEATS = 2


@dataclass(frozen=True)
class Plan:
    """What one soak does; the defaults are `make soak`'s."""
    jobs: int = 600
    users: int = 4
    workers: int = 3
    slots: int = 2
    gunicorn_workers: int = 3
    chaos_s: float = 240.0          # submissions and faults happen in this window
    fault_every_s: tuple[float, float] = (4.0, 9.0)
    drop_before: float = 0.08       # share of result posts lost before the proxy sees them
    drop_after: float = 0.08        # share cut after the proxy answered (committed)
    lease_s: float = 5.0
    settle_s: float = 180.0         # bound on waiting for every job to end
    # A job fails as "worker lost" only after max attempts: with faults this
    # sparse, a handful at most; more means requeueing or leases are broken.
    max_lost_share: float = 0.02
    # Share of planned jobs that must be seen to end as their script meant,
    # with one attempt's result (the rest: worker lost, duplicates, refusals).
    min_verified_share: float = 0.95
    seed: int | None = None


@dataclass
class Expected:
    state: str
    exit_code: int
    output: bool
    kind: str = "plain"   # or a HOSTILE key


@dataclass
class Report:
    seed: int
    invariants: list[tuple[str, int, int]] = field(default_factory=list)  # (name, checked, violations)
    counts: dict = field(default_factory=dict)
    details: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def violations(self) -> int:
        return sum(v for _, _, v in self.invariants)

    def check(self, name: str, checked: int, bad: list[str]) -> None:
        self.invariants.append((name, checked, len(bad)))
        self.details.extend(f"{name}: {b}" for b in bad[:10])

    def table(self) -> str:
        width = max(len(n) for n, _, _ in self.invariants)
        lines = [f"soak seed {self.seed}, {self.seconds:.0f} s",
                 f"{'invariant'.ljust(width)}  checked  violations"]
        lines += [f"{n.ljust(width)}  {c:7d}  {v:10d}" for n, c, v in self.invariants]
        lines.append("")
        width = max(len(k) for k in self.counts)
        lines += [f"{k.ljust(width)}  {v:7d}" for k, v in self.counts.items()]
        lines += ["", "PASS: zero violations" if not self.violations
                  else f"FAIL: {self.violations} violation(s)", *self.details]
        return "\n".join(lines)


# --------------------------------------------------------------- the lossy link

class LossyLink(ThreadingHTTPServer):
    """An HTTP forwarder between workers and the proxy that loses some requests.

    Args:
        rules: {label: (path pattern, share lost before, share lost after)}. A
            request whose path matches is, at random, dropped unforwarded (lost
            before the proxy saw it), or forwarded and its answer swallowed by
            cutting the connection (lost after the proxy committed it); the
            worker sees a broken connection either way.

    Every answer the proxy gave to a result post is recorded, so the soak can
    see how many results the proxy applied per job.
    """

    daemon_threads = True

    def __init__(self, upstream_port: int, rng: random.Random,
                 rules: dict[str, tuple[re.Pattern, float, float]]):
        super().__init__(("127.0.0.1", free_port()), _Forward)
        self.upstream_port = upstream_port
        self.rng, self.rules = rng, rules
        self.dropping = True
        self.cut = False   # a partition: every request refused unforwarded
        self.lock = threading.Lock()
        self.counts: Counter = Counter()
        self.applied: Counter = Counter()  # job id -> results the proxy applied

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def handle_error(self, request, client_address) -> None:
        # A worker killed -9 or cut off mid-request resets its connection: expected here.
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)

    def fate(self, path: str) -> tuple[str, str]:
        """(label of the rule that matched or "", "before" | "after" | "pass")."""
        for label, (pattern, before, after) in self.rules.items():
            if pattern.match(path):
                with self.lock:
                    if not self.dropping:
                        return label, "pass"
                    r = self.rng.random()
                return label, "before" if r < before else "after" if r < before + after else "pass"
        return "", "pass"

    @staticmethod
    def merged(links: list["LossyLink"]) -> "LossyLink":
        """The counts of several links as one (a view for the checks, not a server)."""
        view = object.__new__(LossyLink)
        view.counts, view.applied = Counter(), Counter()
        for link in links:
            view.counts.update(link.counts)
            view.applied.update(link.applied)
        return view

    def record(self, job_id: str, status: int, body: bytes) -> None:
        with self.lock:
            self.counts[f"result answers {status}"] += 1
            if status == 200 and json.loads(body).get("applied"):
                self.applied[job_id] += 1


class _Forward(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: LossyLink

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        self._forward()

    def do_POST(self) -> None:
        self._forward()

    def _forward(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.server.cut:
            with self.server.lock:
                self.server.counts["requests refused while the link was cut"] += 1
            self.close_connection = True
            return
        result = RESULT_PATH.match(self.path)
        label, fate = self.server.fate(self.path)
        if fate == "before":
            self.server.counts[f"{label} dropped before the proxy"] += 1
            self.close_connection = True
            return
        upstream = http.client.HTTPConnection("127.0.0.1", self.server.upstream_port, timeout=90)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
            upstream.request(self.command, self.path, body, headers)
            answer = upstream.getresponse()
            data = answer.read()
        except OSError:
            # The proxy is down or was killed mid-request: the worker sees what
            # it would see without us in between, a broken connection.
            self.close_connection = True
            return
        finally:
            upstream.close()
        if result:
            self.server.record(result.group(1), answer.status, data)
        if fate == "after":
            self.server.counts[f"{label} cut after the proxy answered"] += 1
            self.close_connection = True
            return
        self.send_response(answer.status)
        for k, v in answer.getheaders():
            if k.lower() not in ("connection", "keep-alive", "transfer-encoding", "content-length"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


# ------------------------------------------------------------------- the soak

def run_soak(plan: Plan, tmp: str | None = None, say=print) -> Report:
    """Run one soak; returns its report (check `report.violations`)."""
    seed = plan.seed if plan.seed is not None else random.SystemRandom().randrange(2**31)
    say(f"soak: seed {seed} (rerun with --seed {seed})")
    rng = random.Random(seed)
    report = Report(seed=seed)
    t0 = time.monotonic()
    run_id = f"soak{seed % 10**6}-{random.SystemRandom().randrange(16**4):04x}"
    with Proxy(tmp) as proxy:
        settings = {"JOBCLOUD_HEARTBEAT_INTERVAL_S": "1", "JOBCLOUD_LEASE_TIMEOUT_S": str(plan.lease_s),
                    "JOBCLOUD_MAX_ATTEMPTS": "6", "JOBCLOUD_LOG_LEVEL": "WARNING",
                    "JOBCLOUD_GUNICORN_WORKERS": str(plan.gunicorn_workers),
                    "JOBCLOUD_ACCESS_LOG": "/dev/null"}
        users = [proxy.add_user(f"{run_id}-u{i}") for i in range(plan.users)]
        enrollment = proxy.enrollment_token()
        proxy.start(settings)
        links = [LossyLink(proxy.port, random.Random(rng.random()),
                           {"results": (RESULT_PATH, plan.drop_before, plan.drop_after)})
                 for _ in range(plan.workers)]
        for link in links:
            threading.Thread(target=link.serve_forever, daemon=True).start()
        workers = [LocalWorker(proxy, enrollment, plan.slots, name=f"{run_id}-w{i}", url=link.url,
                               env={"JOBCLOUD_WORKER_CLAIM_WAIT_S": "2",
                                    "JOBCLOUD_WORKER_GRACE_S": "5"})
                   for i, link in enumerate(links)]
        try:
            with contextlib.ExitStack() as stack:
                for w in workers:
                    stack.enter_context(w)
                    # Runs before that worker's stop: a frozen process cannot act on SIGTERM.
                    stack.callback(_resume, w)
                stack.callback(_resume_proxy, proxy)
                report = _soak(plan, rng, report, proxy, settings, users, workers, links, say)
        finally:
            for link in links:
                link.shutdown()
                link.server_close()
    report.seconds = time.monotonic() - t0
    return report


def _soak(plan: Plan, rng: random.Random, report: Report, proxy: Proxy, settings: dict,
          users: list[Account], workers: list[LocalWorker], links: list[LossyLink],
          say) -> Report:
    """Submissions and faults, settling, then the checks; workers and links are up."""
    expected = plan_jobs(plan, rng)
    watch_final_rows(proxy)
    baseline = {w.name: disk_use(w.data_dir) for w in workers}
    monitor = Monitor(proxy, workers)
    monitor.start()
    submitter = Submitter(proxy, users, expected, plan.chaos_s * 0.7, rng.randrange(2**31))
    submitter.start()
    faults, recoveries = drive_faults(plan, rng, proxy, settings, workers, links, say)
    submitter.join()
    for link in links:
        link.dropping = False
    say(f"soak: faults over ({dict(faults)}); settling, up to {plan.settle_s:.0f} s")
    settled = settle(proxy, plan.settle_s)
    # Long enough for a frozen worker's late result or a lost claim's lease to
    # have come and gone: nothing may change after this.
    snapshot = final_rows(proxy)
    time.sleep(plan.lease_s + 2)
    monitor.stop()   # its last look sees every worker process still running
    for w in workers:
        w.stop()
    link = LossyLink.merged(links)
    check(report, plan, proxy, users, submitter, expected, monitor, snapshot, workers, link, settled)
    check_workers(report, workers, monitor, recoveries, baseline,
                  RECOVERY_HEARTBEATS * float(settings["JOBCLOUD_HEARTBEAT_INTERVAL_S"]))
    report.counts.update(faults)
    report.counts.update(link.counts)
    return report


def plan_jobs(plan: Plan, rng: random.Random) -> list[Expected]:
    """What each job will do: most succeed, about one in four writes an output,
    one in ten fails; one in 50 (at least one of each kind) is hostile and succeeds."""
    jobs = []
    for _ in range(plan.jobs):
        fails = rng.random() < 0.1
        jobs.append(Expected("failed" if fails else "succeeded", 3 if fails else 0,
                             rng.random() < 0.25))
    kinds = sorted(HOSTILE)
    hostile = rng.sample(range(plan.jobs), min(plan.jobs, max(len(kinds), plan.jobs // 50)))
    for n, index in enumerate(hostile):
        jobs[index] = Expected("succeeded", 0, False, kinds[n % len(kinds)])
    return jobs


def script_for(e: Expected, rng: random.Random) -> bytes:
    script = SCRIPT.format(sleep=round(rng.uniform(0.05, 0.6), 2), output=e.output,
                           exit_code=e.exit_code)
    if e.kind != "plain":  # the hostile part runs before the done marker
        marker = '\nprint("done attempt'
        head, tail = script.split(marker, 1)
        hostile = HOSTILE[e.kind].replace("DISK_MB", str(HOSTILE_DISK_MB))
        script = f"{head}\n{hostile}{marker}{tail}"
    return script.encode()


class Submitter:
    """One thread per user, spreading its share of the jobs over `window_s`.

    A submission whose answer never came (proxy restarting) is tried again; it
    may exist twice then, once unacknowledged: only 201s are promises.
    """

    def __init__(self, proxy: Proxy, users: list[Account], expected: list[Expected],
                 window_s: float, seed: int):
        self.proxy, self.users, self.expected, self.window_s = proxy, users, expected, window_s
        self.seed = seed
        self.acked: dict[str, int] = {}   # job id -> plan index
        self.retries = 0
        self.refused: list[str] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True)
                        for i in range(len(users))]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def join(self) -> None:
        for t in self.threads:
            t.join()

    def _run(self, u: int) -> None:
        user, session = self.users[u], requests.Session()
        mine = list(range(u, len(self.expected), len(self.users)))
        rng = random.Random(self.seed + u)
        t0 = time.monotonic()
        for n, index in enumerate(mine):
            _sleep_until(t0 + self.window_s * n / len(mine))
            fields = {"name": f"soak-{index}", "image": IMAGE, "cpus": "1",
                      "memory_mb": "128", "timeout_s": "60"}
            kind = self.expected[index].kind
            if kind != "plain":
                fields["disk_mb"] = str(HOSTILE_DISK_MB if kind == "fill" else HOSTILE_ROOMY_DISK_MB)
            body, content_type = job_form(script_for(self.expected[index], rng), fields)
            while True:
                try:
                    r = session.post(f"{self.proxy.url}/api/v1/jobs", data=body, timeout=30,
                                     headers={**user.auth, "Content-Type": content_type})
                except requests.RequestException:
                    r = None
                if r is not None and r.status_code == 201:
                    with self.lock:
                        self.acked[r.json()["id"]] = index
                    break
                if r is not None and r.status_code < 500:
                    with self.lock:
                        self.refused.append(f"soak-{index}: {r.status_code} {r.text[:200]}")
                    break
                with self.lock:
                    self.retries += 1
                time.sleep(0.2)


class Monitor:
    """Reads every final job from the store twice a second; a job whose final
    state, attempt or finish time changes after it was first seen is an overwrite.

    It sees only what lasts until its next look; the trigger of watch_final_rows
    sees every committed change. A look that fails is counted, never fatal. It also notes every worker
    process that exited without being killed by the soak.
    """

    def __init__(self, proxy: Proxy, workers: list[LocalWorker] = ()):
        self.proxy = proxy
        self.workers = workers
        self.exits: dict[int, str] = {}   # pid -> what happened to a worker process
        self.first: dict[str, tuple] = {}
        self.overwrites: list[str] = []
        self.looks = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._look()

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            try:
                self._look()
            except Exception as e:  # the loop boundary: one failed look must not end the watch
                self.errors.append(repr(e))

    def _look(self) -> None:
        self.looks += 1
        for w in self.workers:
            proc = w.proc
            code = proc.poll() if proc is not None else None
            if code is not None and code != -signal.SIGKILL:   # -9: the soak killed it
                self.exits.setdefault(proc.pid, f"{w.name} (pid {proc.pid}) exited with {code}")
        for job_id, row in final_rows(self.proxy).items():
            seen = self.first.setdefault(job_id, row)
            if seen != row:
                self.overwrites.append(f"{job_id}: {seen} then {row}")
                self.first[job_id] = row


def watch_final_rows(proxy: Proxy) -> None:
    """Make the store itself log every change to a final job's outcome.

    An AFTER UPDATE trigger sees every committed change, including a result the
    proxy committed just before a kill -9 (its answer reached nobody) and
    changes undone between two of the Monitor's looks. The soak owns this
    SQLite file; the table and trigger are made after the proxy's migrations,
    which know nothing of them.
    """
    final = ", ".join(f"'{s}'" for s in sorted(FINAL))
    changed = " OR ".join(f"NEW.{c} IS NOT OLD.{c}" for c in WATCHED)
    old, new = (" || ' ' || ".join(f"quote({row}.{c})" for c in WATCHED) for row in ("OLD", "NEW"))
    with proxy.db.connection() as conn, conn.transaction():
        conn.execute(f"CREATE TABLE {OVERWRITES} (job_id TEXT NOT NULL, old TEXT NOT NULL,"
                     " new TEXT NOT NULL)")
        conn.execute(f"CREATE TRIGGER {OVERWRITES}_log AFTER UPDATE ON jobs"
                     f" WHEN OLD.state IN ({final}) AND ({changed})"
                     f" BEGIN INSERT INTO {OVERWRITES} VALUES (OLD.id, {old}, {new}); END")


def logged_overwrites(proxy: Proxy) -> list[str]:
    with proxy.db.connection() as conn:
        rows = conn.query(f"SELECT job_id, old, new FROM {OVERWRITES}")
    return [f"{r['job_id']}: ({r['old']}) then ({r['new']})" for r in rows]


def final_rows(proxy: Proxy) -> dict[str, tuple]:
    with proxy.db.connection() as conn:
        rows = conn.query(f"SELECT id, state, attempt, finished_at, exit_code, stdout_tail,"
                          f" output_sha256 FROM jobs WHERE state IN ({', '.join('?' * len(FINAL))})",
                          tuple(FINAL))
    return {r["id"]: (r["state"], r["attempt"], r["finished_at"], r["exit_code"], r["stdout_tail"],
                      r["output_sha256"]) for r in rows}


# ------------------------------------------------------------------ the faults

# Faults that cut workers off from the proxy past the lease: after each, every
# worker must be active again within RECOVERY_HEARTBEATS.
PARTITIONS = ("pause_worker", "freeze_proxy", "cut_link")
# Bound on waiting for the workers to be back after a fault (a worker that is
# not back by then is reported, and the soak goes on).
RECOVERY_WAIT_S = 30.0


def drive_faults(plan: Plan, rng: random.Random, proxy: Proxy, settings: dict,
                 workers: list[LocalWorker], links: list[LossyLink],
                 say) -> tuple[Counter, list[tuple[str, float | None]]]:
    """Inject faults until the chaos window ends: each kind once first, then at
    random. After each, wait for every worker to be active at the proxy again.

    Returns:
        the faults done, and per fault (kind, seconds from its end until every
        worker was active again, or None if not within RECOVERY_WAIT_S).
    """
    done: Counter = Counter()
    recoveries: list[tuple[str, float | None]] = []
    order = list(FAULTS)
    rng.shuffle(order)
    end = time.monotonic() + plan.chaos_s
    while True:
        time.sleep(rng.uniform(*plan.fault_every_s))
        if time.monotonic() >= end:
            return done, recoveries
        kind = order.pop(0) if order else rng.choice(FAULTS)
        w = rng.choice(workers)
        t = time.monotonic()
        if kind == "kill_worker":
            w.kill()
            w.start()
        elif kind == "restart_proxy":
            proxy.stop()
            proxy.start(settings)
        elif kind == "kill_proxy":
            proxy.kill()
            proxy.start(settings)
        elif kind == "pause_worker":
            w.proc.send_signal(signal.SIGSTOP)
            time.sleep(plan.lease_s + rng.uniform(1, 3))
            w.proc.send_signal(signal.SIGCONT)
        elif kind == "freeze_proxy":
            frozen = proxy.processes()
            for p in frozen:
                p.suspend()
            time.sleep(plan.lease_s + rng.uniform(1, 3))
            for p in frozen:
                p.resume()
        elif kind == "cut_link":
            link = links[workers.index(w)]
            link.cut = True
            time.sleep(plan.lease_s + rng.uniform(1, 3))
            link.cut = False
        done[f"fault {kind}"] += 1
        back = workers_back(proxy, workers, time.time(), RECOVERY_WAIT_S)
        recoveries.append((kind, back))
        say(f"soak: {t - end + plan.chaos_s:5.0f} s  {kind}"
            + (f" {w.name}" if kind in ("kill_worker", "pause_worker", "cut_link") else "")
            + f" ({time.monotonic() - t:.1f} s; workers back after "
            + (f"{back:.1f} s)" if back is not None else f"more than {RECOVERY_WAIT_S:g} s)"))


def workers_back(proxy: Proxy, workers: list[LocalWorker], since: float,
                 bound_s: float) -> float | None:
    """Seconds until each worker's newest registration is active and has
    talked to the proxy after `since` (wall clock), or None past `bound_s`."""
    t0 = time.monotonic()
    names = [w.name for w in workers]
    marks = ", ".join("?" * len(names))
    while time.monotonic() - t0 < bound_s:
        with proxy.db.connection() as conn:
            rows = conn.query(f"SELECT name, state, last_seen_at FROM workers WHERE name IN ({marks})"
                              " ORDER BY registered_at", tuple(names))
        newest = {r["name"]: r for r in rows}
        if all(n in newest and newest[n]["state"] == "active" and newest[n]["last_seen_at"] >= since
               for n in names):
            return time.monotonic() - t0
        time.sleep(0.05)
    return None


def disk_use(path) -> int:
    """Bytes allocated under `path` (iterative; links not followed)."""
    total = 0
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except FileNotFoundError:
                pass
    return total


def mounts_under(path) -> list[str]:
    prefix = os.path.realpath(path) + "/"
    with open("/proc/self/mounts") as f:
        points = [line.split()[1].encode().decode("unicode_escape") for line in f]
    return [p for p in points if p.startswith(prefix)]


def _resume_proxy(proxy: Proxy) -> None:
    for p in proxy.processes():
        with contextlib.suppress(Exception):
            p.resume()


def _resume(w: LocalWorker) -> None:
    if w.proc is not None and w.proc.poll() is None:
        w.proc.send_signal(signal.SIGCONT)


def settle(proxy: Proxy, bound_s: float) -> bool:
    deadline = time.monotonic() + bound_s
    while time.monotonic() < deadline:
        with proxy.db.connection() as conn:
            left = conn.query_one(f"SELECT COUNT(*) AS n FROM jobs WHERE state NOT IN"
                                  f" ({', '.join('?' * len(FINAL))})", tuple(FINAL))["n"]
        if not left:
            return True
        time.sleep(0.5)
    return False


def _sleep_until(t: float) -> None:
    delay = t - time.monotonic()
    if delay > 0:
        time.sleep(delay)


# ------------------------------------------------------------- the invariants

def check(report: Report, plan: Plan, proxy: Proxy, users: list[Account], submitter: Submitter,
          expected: list[Expected], monitor: Monitor, snapshot: dict, workers: list[LocalWorker],
          link: LossyLink, settled: bool) -> None:
    with proxy.db.connection() as conn:
        jobs = {j["id"]: j for j in conn.query("SELECT * FROM jobs")}
        logs: dict[tuple[str, int], str] = {}
        for r in conn.query("SELECT job_id, attempt, data FROM job_logs WHERE stream = ?"
                            " ORDER BY job_id, attempt, byte_offset", ("stdout",)):
            logs[(r["job_id"], r["attempt"])] = logs.get((r["job_id"], r["attempt"]), "") + r["data"]

    acked = submitter.acked
    report.check("no submission refused", len(expected), submitter.refused)
    report.check("every acknowledged (201) submission is stored", len(acked),
                 [j for j in acked if j not in jobs])
    report.check("every job reached a final state" + ("" if settled else " (settle bound hit)"),
                 len(jobs), [f"{j['id']} {j['state']}" for j in jobs.values()
                             if j["state"] not in FINAL])
    end = final_rows(proxy)
    changed = [f"{k}: {v} then {end.get(k)}" for k, v in snapshot.items() if end.get(k) != v]
    report.check("no final state overwritten (watched, and after settling)", len(jobs),
                 monitor.overwrites + changed)
    report.check("no committed update changed a final job (store trigger)", len(jobs),
                 logged_overwrites(proxy))

    def outputs(job: dict) -> requests.Response:
        owner = next(u for u in users if u.id == job["owner_id"])
        return requests.get(f"{proxy.url}/api/v1/jobs/{job['id']}/outputs", headers=owner.auth,
                            timeout=30)

    outcomes = check_outcomes(report, plan, jobs, logs, expected, outputs)
    report.check("the proxy applied at most one result per job", len(link.applied),
                 [f"{j} applied {n}×" for j, n in link.applied.items() if n > 1])

    left = {w.name: w.containers() for w in workers}
    report.check("no container left (this run's workers)", len(workers),
                 [f"{n}: {ids}" for n, ids in left.items() if ids])
    dirs = [str(d) for w in workers if (w.data_dir / "jobs").exists()
            for d in (w.data_dir / "jobs").iterdir()]
    report.check("no job directory left", len(workers), dirs)

    report.counts.update({
        "jobs stored": len(jobs), "submissions acknowledged": len(acked),
        "submissions retried (no answer)": submitter.retries,
        "jobs requeued at least once": sum(1 for j in jobs.values() if j["attempt"] > 1),
        "requeues (attempts beyond the first)": sum(max(0, j["attempt"] - 1) for j in jobs.values()),
        **outcomes,
        "monitor looks": monitor.looks,
        "monitor looks failed": len(monitor.errors),
    })
    report.details.extend(f"monitor look failed: {e}" for e in monitor.errors[:3])


# Allowed growth of a worker's data dir over the run (its own small state files).
DISK_SLACK_BYTES = 2**20


def check_workers(report: Report, workers: list[LocalWorker], monitor: Monitor,
                  recoveries: list[tuple[str, float | None]], baseline: dict[str, int],
                  bound_s: float) -> None:
    """The workers' own invariants: alive, back after each partition, disk as before."""
    report.check("no worker process exited (other than killed -9 by the soak)", len(workers),
                 list(monitor.exits.values()))
    partitions = [(k, s) for k, s in recoveries if k in PARTITIONS]
    report.check(f"every worker active again within {bound_s:g} s of each partition ending",
                 len(partitions), [f"{k}: {'not back' if s is None else f'{s:.1f} s'}"
                                   for k, s in partitions if s is None or s > bound_s])
    disk = []
    for w in workers:
        grown = disk_use(w.data_dir) - baseline[w.name]
        if grown > DISK_SLACK_BYTES:
            disk.append(f"{w.name}: {grown / 2**20:.1f} MiB more than before the first job")
        disk.extend(f"{w.name}: still mounted: {m}" for m in mounts_under(w.data_dir))
    report.check("every worker's disk use back to its baseline (nothing mounted)", len(workers),
                 disk)
    slowest = max((s for _, s in recoveries if s is not None), default=0.0)
    report.counts["slowest recovery after a fault, ms"] = round(slowest * 1000)


def check_outcomes(report: Report, plan: Plan, jobs: dict[str, dict], logs: dict,
                   expected: list[Expected], outputs) -> dict:
    """Each stored job against its plan entry: the three outcome invariants, and
    how many planned jobs were verified end to end.

    Args:
        jobs: job id -> row; logs: (job id, attempt) -> stdout as shipped.
        outputs: job row -> the answer of its /outputs download.

    Returns:
        counts for the report.
    """
    wrong, mixed, lost, twice = [], [], [], 0
    verified: set[int] = set()
    for job in jobs.values():
        index = int(job["name"].split("-")[1])
        e = expected[index]
        done_in = [a for (jid, a), text in logs.items() if jid == job["id"] and DONE.search(text)]
        twice += len(done_in) > 1
        if job["state"] == "failed" and (job["failure_reason"] or "").startswith(WORKER_LOST):
            lost.append(job["id"])
            continue
        if job["state"] not in FINAL:
            continue
        if (job["state"], job["exit_code"]) != (e.state, e.exit_code):
            wrong.append(f"{job['id']} ({e.kind}) ended {job['state']} ({job['exit_code']},"
                         f" {job['failure_reason']}), script meant {e.state} ({e.exit_code});"
                         f" stderr ends {(job.get('stderr_tail') or '')[-300:]!r}")
            continue
        problem = _one_result(job, e, logs, outputs)
        if problem:
            mixed.append(f"{job['id']}: {problem}")
        else:
            verified.add(index)
    # Shares of the plan, not of the jobs stored: a submission stored twice
    # (retried after a lost answer) must not dilute the bounds.
    most_lost = int(plan.max_lost_share * len(expected))
    report.check(f"at most {most_lost} jobs failed as worker lost ({plan.max_lost_share:.0%})",
                 len(jobs), lost if len(lost) > most_lost else [])
    report.check("each job ended as its script meant (or failed: worker lost)", len(jobs), wrong)
    report.check("stored result is one attempt's (stdout, logs, output agree)", len(jobs), mixed)
    least = math.ceil(plan.min_verified_share * len(expected))
    missing = [f"soak-{i}" for i in range(len(expected)) if i not in verified]
    report.check(f"at least {least} planned jobs verified as meant ({plan.min_verified_share:.0%})",
                 len(expected), [] if len(verified) >= least else
                 [f"{len(verified)} of {len(expected)} verified; not: {', '.join(missing[:20])}"])
    return {"planned jobs verified as meant": len(verified),
            "jobs run to completion more than once (one result kept)": twice,
            "jobs failed as worker lost (max attempts)": len(lost)}


def _one_result(job: dict, e: Expected, logs: dict, outputs) -> str | None:
    """Why the stored result is not one attempt's own, or None when it is."""
    found = DONE.findall(job["stdout_tail"] or "")
    if len(found) != 1:
        return f"stdout holds {len(found)} done markers"
    attempt, token = int(found[0][0]), found[0][1]
    if attempt != job["attempt"]:
        return f"stdout is attempt {attempt}'s, the job is at attempt {job['attempt']}"
    if token not in logs.get((job["id"], attempt), ""):
        return "the stored stdout's token is not in that attempt's log"
    if e.output:
        r = outputs(job)
        if r.status_code != 200:
            return f"outputs answered {r.status_code}"
        stored = zipfile.ZipFile(io.BytesIO(r.content)).read("token.txt").decode()
        if stored != token:
            return f"output token {stored} is another attempt's than stdout's {token}"
    return None


# ---------------------------------------------------------------------- entry

def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.splitlines()[0])
    d = Plan()
    p.add_argument("--jobs", type=int, default=d.jobs)
    p.add_argument("--users", type=int, default=d.users)
    p.add_argument("--workers", type=int, default=d.workers)
    p.add_argument("--slots", type=int, default=d.slots)
    p.add_argument("--chaos-s", type=float, default=d.chaos_s, help="window of submissions and faults")
    p.add_argument("--settle-s", type=float, default=d.settle_s, help="bound on settling")
    p.add_argument("--seed", type=int, help="replay a run's fault schedule and job mix")
    p.add_argument("--tmp", help="where the temp data dir goes")
    a = p.parse_args(argv)
    plan = Plan(jobs=a.jobs, users=a.users, workers=a.workers, slots=a.slots, chaos_s=a.chaos_s,
                settle_s=a.settle_s, seed=a.seed)
    report = run_soak(plan, a.tmp)
    print(report.table())
    return 0 if report.violations == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
