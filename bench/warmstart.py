"""`warm-start`: pre-started sandboxes (worker `prestart`) and the crun runtime
against today's cold start, in one run (issue 16).

Three parts, each side by side on the same machine at the same time:
1. a trivial job, submit → final state visible, against a bare `docker run`:
   triples (bare, job on a worker with prestart off, job on one with it on),
   interleaved, each job's phases from its own timestamps;
2. 40 trivial jobs on one worker with 2 slots: jobs/s of today's code (the
   proxy and worker of BASELINE, the commit issue 16 was filed against,
   extracted with `git archive`: the issue's "today's figure"), and of this
   code with prestart off and on, in alternating rounds, a fresh proxy and
   worker each;
3. claim → the first line of user code, for runc and crun, cold and
   pre-started: the job prints time.time() first, against its started_at
   (the proxy's claim stamp; one clock, one machine).

Before each measured job of a pre-starting worker the benchmark waits until
its waiting container is up, so no container of an earlier measurement is
being made in the background of the next one (bare runs included); the
job's own slot replacement is made while it runs, as on any worker.
"""
from __future__ import annotations

import json
import subprocess
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import psutil

from .harness import ROOT, BenchError
from .load import percentile
from .report import Row
from .worker import BARE, FINAL, IMAGE, _bare_phases, _engine_phases, _ts, bare_run, cluster

# From the issue: a trivial job at most 0.8× a bare `docker run`, p50 over 20 pairs.
TARGET_RATIO = 0.8
PAIRS = 20
WARMUPS = 2
# 40 jobs on 2 slots, prestart on at least 1.5× today's code, same run. Today's
# code: the commit issue 16 was filed against (the last before its work began).
BASELINE = "afa0de8"
BATCH = 40
BATCH_SLOTS = 2
ROUNDS = 2
TARGET_SPEEDUP = 1.5
# Claim → user code: jobs per runtime and mode.
CLAIM_JOBS = 10
RUNTIMES = ("runc", "crun")
DEADLINE_S = 600
READY_WAIT_S = 30
COLD = {"JOBCLOUD_WORKER_PRESTART": "false"}
WARM = {"JOBCLOUD_WORKER_PRESTART": "true"}
FIRST_LINE = b"import time\nprint('T', repr(time.time()), flush=True)\n"


def run(opts) -> tuple[list[Row], list[str], dict]:
    deadline = time.monotonic() + DEADLINE_S
    raw = {"trivial": _trivial(opts, deadline), "batch": _batch(opts, deadline),
           "claim": _claim_to_code(opts, deadline)}
    return _rows(raw), _notes(raw), raw


# ----------------------------------------------------------------- 1. trivial

def _trivial(opts, deadline: float) -> dict:
    with ExitStack() as stack:
        cold = stack.enter_context(cluster(opts, slots=1, worker_env=COLD))
        warm = stack.enter_context(cluster(opts, slots=1, worker_env=WARM))
        for _ in range(WARMUPS):
            bare_run()
            cold[0].run(deadline)
            _ready(warm[1], 1, deadline)
            warm[0].run(deadline)
        events = stack.enter_context(EngineEvents())
        bare, times, phases = [], {"cold": [], "warm": []}, {"cold": [], "warm": []}
        bare_names = []
        for _ in range(PAIRS):
            seconds, name = bare_run()
            bare.append(seconds)
            bare_names.append(name)
            for mode, (jobs, worker, _proxy) in (("cold", cold), ("warm", warm)):
                if mode == "warm":
                    _ready(worker, 1, deadline)
                seconds, record = jobs.run(deadline)
                times[mode].append(seconds)
                phases[mode].append(record)
        cold_events = events.of(lambda attrs: attrs.get("jobcloud.job")
                                if attrs.get("jobcloud.worker") == cold[1].name else None)
        bare_events = events.of(lambda attrs: attrs["name"] if attrs.get("name") in bare_names else None)
    out = {"bare_s": bare, "job_s": times, "phases": phases,
           "bare_p50": percentile(sorted(bare), 50), "bare_p90": percentile(sorted(bare), 90)}
    for mode in ("cold", "warm"):
        out[f"{mode}_p50"] = percentile(sorted(times[mode]), 50)
        out[f"{mode}_p90"] = percentile(sorted(times[mode]), 90)
        out[f"{mode}_ratio_p50"] = round(out[f"{mode}_p50"] / out["bare_p50"], 3)
        out[f"{mode}_phase_p50_ms"] = {
            k: percentile(sorted(p[k] for p in phases[mode]), 50)
            for k in ("submit_ms", "to_start_ms", "running_ms", "to_visible_ms")}
    out["cold_engine_p50_ms"] = _engine_phases(phases["cold"], cold_events)
    out["bare_engine_p50_ms"] = _bare_phases(bare_events)
    return out


def _ready(worker, count: int, deadline: float) -> None:
    """Wait until `count` waiting containers of `worker` are up: nothing is made meanwhile."""
    limit = min(deadline, time.monotonic() + READY_WAIT_S)
    while len(_waiting(worker)) < count:
        worker.check_alive()
        if time.monotonic() > limit:
            raise BenchError(f"no waiting container within {READY_WAIT_S}s:\n{worker.log_tail()}")
        time.sleep(0.02)


class EngineEvents:
    """Docker's container events, read as they happen: `docker events --since`
    answers from a buffer of the engine's last 256 events, which 20 triples
    and everything else on this machine overflow."""

    def __enter__(self) -> EngineEvents:
        self.lines: list[str] = []
        self.proc = subprocess.Popen(["docker", "events", "--filter", "type=container",
                                      "--format", "{{json .}}"], stdout=subprocess.PIPE, text=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        return self

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)

    def of(self, key) -> dict[str, dict[str, float]]:
        """{key(attributes): {action: epoch s}} for the events whose key is not None."""
        found: dict[str, dict[str, float]] = {}
        for line in list(self.lines):
            event = json.loads(line)
            k = key(event["Actor"]["Attributes"])
            if k is not None:
                found.setdefault(k, {}).setdefault(event["Action"], event["timeNano"] / 1e9)
        return found


def _waiting(worker) -> list[str]:
    # Named jobcloud-waiting-*: one released to its job is renamed for it.
    return subprocess.run(["docker", "ps", "-q", "--filter", f"label=jobcloud.worker={worker.name}",
                           "--filter", "label=jobcloud.prestart", "--filter", "status=running",
                           "--filter", "name=jobcloud-waiting-"],
                          capture_output=True, text=True, timeout=30).stdout.split()


# ------------------------------------------------------------ 2. throughput

def _batch(opts, deadline: float) -> dict:
    rounds = {"today": [], "cold": [], "warm": []}
    with tempfile.TemporaryDirectory(prefix="jobcloud-baseline-", dir=opts.tmp) as tree:
        baseline = _extract(BASELINE, Path(tree))
        for _ in range(ROUNDS):
            for mode in rounds:
                _batch_round(opts, deadline, mode, baseline, rounds)
    out = {"rounds": rounds, "baseline": BASELINE}
    for mode in rounds:
        out[f"{mode}_jobs_per_s"] = round(sum(r["jobs_per_s"] for r in rounds[mode]) / ROUNDS, 3)
    out["speedup"] = round(out["warm_jobs_per_s"] / out["today_jobs_per_s"], 3)
    out["speedup_vs_off"] = round(out["warm_jobs_per_s"] / out["cold_jobs_per_s"], 3)
    return out


def _extract(rev: str, dest: Path) -> Path:
    """The tree of commit `rev`, extracted under `dest` (no checkout of this one touched)."""
    archive = subprocess.run(["git", "archive", "--format=tar", rev], cwd=ROOT,
                             capture_output=True, check=False)
    if archive.returncode != 0:
        raise BenchError(f"cannot extract the baseline {rev}: "
                         f"{archive.stderr.decode(errors='replace')[:300]}")
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest


def _batch_round(opts, deadline: float, mode: str, baseline: Path, rounds: dict) -> None:
    env = {"cold": COLD, "warm": WARM}.get(mode)   # today's code has no such setting
    root = baseline if mode == "today" else None
    with cluster(opts, slots=BATCH_SLOTS, worker_env=env, root=root) as (jobs, worker, proxy):
        if mode == "warm":
            _ready(worker, BATCH_SLOTS, deadline)
        jobs.run(deadline)   # warm-up: the first job of a worker pays for caches
        if mode == "warm":
            _ready(worker, BATCH_SLOTS, deadline)
        before = _cpu(worker, proxy)
        result = jobs.batch(BATCH, deadline)
        after = _cpu(worker, proxy)
        result["cores_busy"] = round((after["busy"] - before["busy"]) / result["seconds"], 2)
        for part in ("engine", "worker", "proxy", "containers"):
            result[f"{part}_cpu_ms_per_job"] = round(
                (after[part] - before[part]) * 1000 / BATCH, 1)
        rounds[mode].append(result)


def _cpu(worker, proxy) -> dict:
    """CPU seconds so far: the whole machine's busy time; dockerd's + containerd's;
    the worker's, with the children it waited for (mkfs.ext4, mount, umount);
    the proxy's (gunicorn and its workers); and all containers' (the engine's
    cgroup, where a cgroup v1 cpuacct hierarchy has one: other containers on
    this machine included)."""
    t = psutil.cpu_times()
    engine = 0.0
    for p in psutil.process_iter(["name", "cpu_times"]):
        if p.info["name"] in ("dockerd", "containerd") and p.info["cpu_times"]:
            engine += p.info["cpu_times"].user + p.info["cpu_times"].system
    w = psutil.Process(worker.proc.pid).cpu_times()
    served = 0.0
    main = psutil.Process(proxy.proc.pid)
    for p in [main, *main.children(recursive=True)]:
        try:
            c = p.cpu_times()
            served += c.user + c.system
        except psutil.NoSuchProcess:
            continue
    try:
        with open("/sys/fs/cgroup/cpuacct/docker/cpuacct.usage") as f:
            containers = int(f.read()) / 1e9
    except (OSError, ValueError):
        containers = 0.0
    return {"busy": t.user + t.nice + t.system + t.irq + t.softirq + t.steal, "engine": engine,
            "worker": w.user + w.system + w.children_user + w.children_system, "proxy": served,
            "containers": containers}


# ------------------------------------------------------- 3. claim → user code

def _claim_to_code(opts, deadline: float) -> dict:
    out = {}
    for runtime in RUNTIMES:
        why = _cannot_run(runtime)
        if why:
            out[runtime] = {"unavailable": why}
            continue
        for mode, env in (("cold", COLD), ("warm", WARM)):
            settings = dict(env, JOBCLOUD_WORKER_RUNTIMES=f"{IMAGE}={runtime}")
            with cluster(opts, slots=1, worker_env=settings) as (jobs, worker, _proxy):
                ms = []
                for i in range(WARMUPS + CLAIM_JOBS):
                    if mode == "warm":
                        _ready(worker, 1, deadline)
                    job_id = jobs.submit(FIRST_LINE)
                    job = _final(jobs, job_id, deadline)
                    printed = _first_line_time(jobs, job_id)
                    if i >= WARMUPS:
                        ms.append(round((printed - _ts(job["started_at"])) * 1000, 1))
            out.setdefault(runtime, {})[mode] = {"ms": ms, "p50": percentile(sorted(ms), 50),
                                                 "p90": percentile(sorted(ms), 90)}
    return out


def _cannot_run(runtime: str) -> str | None:
    """Why the engine cannot start a container under `runtime` here, or None."""
    done = subprocess.run(["docker", "run", "--rm", "--runtime", runtime, *BARE[2:]],
                          capture_output=True, text=True, timeout=60)
    if done.returncode == 0:
        return None
    return (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[0][:300]


def _final(jobs, job_id: str, deadline: float) -> dict:
    while True:
        job = jobs.get(job_id)
        if job["state"] in FINAL:
            if job["state"] != "succeeded":
                raise BenchError(f"job ended {job['state']}: {job}")
            return job
        jobs._check(deadline)
        time.sleep(0.01)


def _first_line_time(jobs, job_id: str) -> float:
    logs = json.loads(jobs.client.request("GET", f"/api/v1/jobs/{job_id}/logs?stream=stdout"))
    return float(logs["data"].split()[1])


# ------------------------------------------------------------- rows, notes

def _rows(raw: dict) -> list[Row]:
    t, b = raw["trivial"], raw["batch"]
    rows = [
        Row("Bare `docker run`: p50 / p90", t["bare_p50"] * 1000, f"/ {t['bare_p90'] * 1000:.0f} ms"),
        Row("Trivial job, prestart off: p50 / p90", t["cold_p50"] * 1000, f"/ {t['cold_p90'] * 1000:.0f} ms"),
        Row("Trivial job, prestart on: p50 / p90", t["warm_p50"] * 1000, f"/ {t['warm_p90'] * 1000:.0f} ms"),
        Row("Job / bare, p50, prestart off", t["cold_ratio_p50"], "×"),
        Row("Job / bare, p50, prestart on", t["warm_ratio_p50"], "×", f"≤ {TARGET_RATIO}",
            t["warm_ratio_p50"] / TARGET_RATIO, "target", t["warm_ratio_p50"] <= TARGET_RATIO),
        Row(f"{BATCH} jobs, {BATCH_SLOTS} slots, today's code ({b['baseline']})",
            b["today_jobs_per_s"], "jobs/s"),
        Row(f"{BATCH} jobs, {BATCH_SLOTS} slots, prestart off", b["cold_jobs_per_s"], "jobs/s",
            "", b["cold_jobs_per_s"] / b["today_jobs_per_s"], "today"),
        Row(f"{BATCH} jobs, {BATCH_SLOTS} slots, prestart on", b["warm_jobs_per_s"], "jobs/s",
            f"≥ {TARGET_SPEEDUP}× today's code", b["speedup"], "today",
            b["speedup"] >= TARGET_SPEEDUP),
    ]
    for runtime in RUNTIMES:
        c = raw["claim"][runtime]
        if "unavailable" in c:
            rows.append(Row(f"Claim → user code, {runtime}", None, "", "not measurable here (below)"))
            continue
        for mode, label in (("cold", "cold"), ("warm", "pre-started")):
            rows.append(Row(f"Claim → user code, {runtime}, {label}: p50 / p90", c[mode]["p50"],
                            f"/ {c[mode]['p90']:.0f} ms"))
    return rows


def _per_round(b: dict, part: str) -> str:
    key = f"{part}_cpu_ms_per_job"
    return " / ".join(", ".join(f"{r.get(key, 0):.0f}" for r in b["rounds"][mode])
                      for mode in ("today", "cold", "warm"))


def _notes(raw: dict) -> list[str]:
    t, b, c = raw["trivial"], raw["batch"], raw["claim"]

    def phases(mode):
        ph = t[f"{mode}_phase_p50_ms"]
        return (f"POST {ph['submit_ms']} ms, submitted → claimed {ph['to_start_ms']} ms, claimed →"
                f" result stored {ph['running_ms']} ms, result → seen final {ph['to_visible_ms']} ms")

    def events(d):
        return ", ".join(f"{a} {v:.0f}" for a, v in sorted(d.items(), key=lambda kv: kv[1]))

    notes = [
        f"{PAIRS} triples after {WARMUPS} warm-up ones, interleaved (bare, job with prestart off,"
        f" job with prestart on): bare is `{' '.join(BARE)}` timed around the CLI; a job is the"
        f" script `pass` on {IMAGE} (1 CPU, 256 MB), POST /api/v1/jobs then GET /api/v1/jobs/<id>"
        " every 10 ms until final. Two proxies and two 1-slot workers, one per mode, up side by"
        " side; before each measurement the pre-starting worker's waiting container is up, so"
        " nothing of an earlier measurement is made in its background (the job's own slot"
        " replacement is, from the job's start on). Workers run with their defaults otherwise"
        " (the engine's runtime, runc, for waiting and cold containers alike).",
        f"Phases, p50: prestart off: {phases('cold')}; prestart on: {phases('warm')}. Docker's"
        f" events after the claim, prestart off (ms): {events(t['cold_engine_p50_ms'])}; bare runs,"
        f" after their create: {events(t['bare_engine_p50_ms'])}.",
        f"Throughput: {BATCH} trivial jobs submitted back to back to one worker with"
        f" {BATCH_SLOTS} slots after one warm-up job, first POST → last final state; {ROUNDS}"
        f" alternating rounds per mode (today's code: the proxy and worker of {b['baseline']},"
        " extracted by `git archive`; this code with prestart off; with it on), a fresh proxy"
        " and worker each; jobs/s per round: today "
        + ", ".join(f"{r['jobs_per_s']:.2f}" for r in b["rounds"]["today"]) + "; off "
        + ", ".join(f"{r['jobs_per_s']:.2f}" for r in b["rounds"]["cold"]) + "; on "
        + ", ".join(f"{r['jobs_per_s']:.2f}" for r in b["rounds"]["warm"])
        + f"; on vs today {b['speedup']}×, on vs off {b['speedup_vs_off']}×. Cores busy (of 2,"
        " the whole machine) during the rounds: today "
        + ", ".join(f"{r['cores_busy']:.2f}" for r in b["rounds"]["today"]) + "; off "
        + ", ".join(f"{r['cores_busy']:.2f}" for r in b["rounds"]["cold"]) + "; on "
        + ", ".join(f"{r['cores_busy']:.2f}" for r in b["rounds"]["warm"])
        + "; CPU per job (ms), today / off / on, per round: dockerd + containerd "
        + _per_round(b, "engine") + "; the worker with its mkfs/mount/umount "
        + _per_round(b, "worker") + "; the proxy (the batch's own polling of the job list"
        " included) " + _per_round(b, "proxy") + "; all containers' cgroups (other"
        " containers on the machine included) " + _per_round(b, "containers")
        + "; the shims and the OCI runtime's own processes are not counted here"
        " (docs/PERFORMANCE.md, \"Warm starts\", for a perf breakdown).",
        f"Claim → user code: {CLAIM_JOBS} jobs per runtime and mode after {WARMUPS} warm-up ones;"
        " the script's first line prints time.time(), taken against the job's started_at"
        " (stamped by the proxy when the worker's claim took it, ms), so Python's own start-up"
        " (about 20 ms) is in every figure.",
    ]
    for runtime in RUNTIMES:
        if "unavailable" in c[runtime]:
            notes.append(f"{runtime}: not measured, the engine cannot start a container under it on"
                         f" this machine: `{c[runtime]['unavailable']}`.")
    return notes
