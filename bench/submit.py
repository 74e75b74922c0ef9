"""`submit`: durable job submissions per second through gunicorn, and their latency.

Several client threads POST /api/v1/jobs (multipart, a unique small script,
bearer token) in a closed loop for a fixed time; each 201 means the script
blob and the job row are on disk. The same clients then fetch GET /healthz
from the same server: the ratio says how much of the server's capacity the
submission path itself uses.

`submit-scaling` measures the same path with 10^3, 10^4 and 10^5 jobs already
in the store.
"""
from __future__ import annotations

from .forms import job_form
from .harness import BenchError, Proxy
from .load import Client, LoadResult, percentile, run_load, sequential
from .report import Row

# Slurm's documented high-throughput tuning sustains about 500 job submissions/s.
TARGET_PER_S = 500
SCALING_SIZES = (1_000, 10_000, 100_000)
SCALING_SEQUENTIAL = 200


def submit_op(proxy: Proxy, token: str):
    """An op factory: each call of the op submits one job with a script no other job has."""
    def factory(process: int, thread: int):
        client = Client(proxy.port, {"Authorization": f"Bearer {token}"})
        counter = iter(range(10**9))

        def op():
            script = f"print('job {process}-{thread}-{next(counter)}')\n".encode()
            body, content_type = job_form(script)
            client.request("POST", "/api/v1/jobs", body, {"Content-Type": content_type},
                           expect=201)
        return op
    return factory


def healthz_op(proxy: Proxy):
    def factory(process: int, thread: int):
        client = Client(proxy.port)
        return lambda: client.request("GET", "/healthz")
    return factory


def run_submit(opts) -> tuple[list[Row], list[str], dict]:
    with Proxy(opts.tmp) as proxy:
        user = proxy.add_user("alice")
        proxy.start()
        load = dict(processes=opts.processes, threads=opts.threads, duration_s=opts.duration,
                    warmup_s=opts.warmup, server_cpu=proxy.cpu_seconds)
        # Alternating rounds: a burst of load from other tenants of this
        # machine then hits both sides instead of one.
        health, submit = [], []
        for _ in range(opts.rounds):
            health.append(run_load(healthz_op(proxy), **load))
            submit.append(run_load(submit_op(proxy, user.token), **load))
        stored = proxy.count_jobs()
    s, h = LoadResult.pooled(submit).summary(), LoadResult.pooled(health).summary()
    if stored < s["ops"]:
        raise BenchError(f"{s['ops']} submissions answered 201 but only {stored} jobs stored")
    s["rounds_per_s"] = [round(r.rate, 1) for r in submit]
    h["rounds_per_s"] = [round(r.rate, 1) for r in health]
    rows = [
        Row("Durable submissions (POST /api/v1/jobs → 201)", s["rate_per_s"], "/s",
            f"≥ {TARGET_PER_S}/s (Slurm, tuned high-throughput)", s["rate_per_s"] / TARGET_PER_S,
            "target", s["rate_per_s"] >= TARGET_PER_S),
        Row("Submission latency p50", s["p50_ms"], "ms"),
        Row("Submission latency p99", s["p99_ms"], "ms"),
        Row("GET /healthz, same server and clients", h["rate_per_s"], "/s",
            "baseline: the cheapest request", s["rate_per_s"] / h["rate_per_s"],
            "submit/healthz"),
        Row("/healthz latency p50 / p99", h["p50_ms"], f"/ {h['p99_ms']:.1f} ms"),
        Row("Server CPU per submission", s["server_cpu_ms_per_op"], "ms",
            f"{h['server_cpu_ms_per_op']:.2f} ms per /healthz", s["server_cpu_ms_per_op"]
            / h["server_cpu_ms_per_op"], "healthz"),
    ]
    notes = [
        f"{s['concurrency']} closed-loop clients ({opts.processes} processes × {opts.threads}"
        f" threads, keep-alive); {opts.rounds} alternating rounds of /healthz then submit, each"
        f" a {opts.duration:g} s window after {opts.warmup:g} s warm-up; rates per round:"
        f" submit {', '.join(map(str, s['rounds_per_s']))}/s, /healthz"
        f" {', '.join(map(str, h['rounds_per_s']))}/s; errors: {s['errors']} submit,"
        f" {h['errors']} healthz.",
        "Each submission has a unique script, so every 201 paid for a new blob (fsync, rename,"
        " directory fsync) and a job row committed with synchronous=FULL.",
        f"Cores busy during the submit window (of {opts.machine['nproc']}): server"
        f" {s['cores_server']}, load generator {s['cores_clients']}, other processes on this"
        f" shared machine {s['cores_other']}; during /healthz: {h['cores_server']},"
        f" {h['cores_clients']}, {h['cores_other']}.",
    ]
    return rows, notes, {"submit": s, "healthz": h, "stored_jobs": stored,
                         "gunicorn": Proxy.gunicorn_settings()}


def run_scaling(opts) -> tuple[list[Row], list[str], dict]:
    raw = {}
    rows = []
    with Proxy(opts.tmp) as proxy:
        user = proxy.add_user("alice")
        others = proxy.add_user("others")
        proxy.start()
        client = Client(proxy.port, user.auth)
        counter = iter(range(10**9))

        def one():
            body, content_type = job_form(f"print({next(counter)})\n".encode())
            client.request("POST", "/api/v1/jobs", body, {"Content-Type": content_type},
                           expect=201)

        for size in SCALING_SIZES:
            missing = size - proxy.count_jobs()
            if missing > 0:
                proxy.seed_jobs(others, missing, queued_one_in=10)
            one()
            lat = sequential(one, SCALING_SEQUENTIAL)
            load = run_load(submit_op(proxy, user.token), processes=opts.processes,
                            threads=opts.threads, duration_s=opts.scaling_duration,
                            warmup_s=1.0, server_cpu=proxy.cpu_seconds).summary()
            raw[size] = {"sequential_p50_ms": percentile(lat, 50),
                         "sequential_p99_ms": percentile(lat, 99), "load": load,
                         "jobs_in_store": proxy.count_jobs()}
            rows.append(Row(f"{size:,} jobs in store: one client, p50 / p99",
                            percentile(lat, 50), f"/ {percentile(lat, 99):.1f} ms"))
            rows.append(Row(f"{size:,} jobs in store: {load['concurrency']} clients",
                            load["rate_per_s"], f"/s (p99 {load['p99_ms']:.0f} ms)",
                            f"≥ {TARGET_PER_S}/s", load["rate_per_s"] / TARGET_PER_S, "target",
                            load["rate_per_s"] >= TARGET_PER_S))
    first, last = raw[SCALING_SIZES[0]], raw[SCALING_SIZES[-1]]
    ratio = last["load"]["rate_per_s"] / first["load"]["rate_per_s"]
    rows.append(Row(f"Rate at {SCALING_SIZES[-1]:,} vs {SCALING_SIZES[0]:,} jobs", ratio, "×",
                    "≥ 0.8× (within 20%)", ratio, "", ratio >= 0.8))
    notes = [f"Store seeded with the store's create_job (90% then marked succeeded); one client:"
             f" {SCALING_SEQUENTIAL} sequential submissions; then {opts.processes * opts.threads}"
             f" clients for {opts.scaling_duration:g} s."]
    return rows, notes, raw
