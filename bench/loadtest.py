"""`load`: a class of 200 students at once, with locust (headless) on loopback.

200 locust users, each with an account of its own holding 20 jobs (nine in ten
finished, with a 4 KiB stdout tail), poll a job, read its log, open their
status page and submit a job (weights 5:3:2:1), pausing 0.5-2 s between
actions as a person or a self-refreshing page does. The proxy is gunicorn with
the default config; no worker runs, so submissions stay queued and the
figures are the proxy's alone. Statistics are reset once all 200 are running,
so the window is the steady state only.
"""
from __future__ import annotations

import csv
import json
import os
import resource
import subprocess
import sys

from .harness import ROOT, BenchError, Proxy
from .report import Row

JOBS_PER_ACCOUNT = 20
SPAWN_RATE = 50          # users started per second: 200 in 4 s
TARGET_P99_MS = 200      # the target for status polls
THINK_S = (0.5, 2.0)     # pause between one client's actions, s
STATUS_POLLS = ("status poll: GET /api/v1/jobs/<id>", "status page: GET /job-status/<user>")
TAIL = ("epoch 1 loss 0.693 accuracy 0.51\n" * 128)[:4096]


def run(opts) -> tuple[list[Row], list[str], dict]:
    with Proxy(opts.tmp) as proxy:
        accounts = seed_accounts(proxy, opts.load_clients)
        path = proxy.dir / "accounts.json"
        path.write_text(json.dumps(accounts))
        proxy.start()
        cpu0, children0 = proxy.cpu_seconds(), _children_cpu()
        stats = run_locust(proxy, opts, path)
        server_cpu, client_cpu = proxy.cpu_seconds() - cpu0, _children_cpu() - children0
        stored = proxy.count_jobs()
    total = stats.pop("Aggregated")
    window = opts.load_duration
    # What the clients ask for, pausing THINK_S on average: served at that rate,
    # the server kept up; below it, requests queued.
    offered = opts.load_clients / (sum(THINK_S) / 2)
    rows = [Row("Requests/s, all kinds", total["rps"], "/s",
                f"≈ {offered:.0f}/s offered ({opts.load_clients} clients, {THINK_S[0]:g}-{THINK_S[1]:g} s"
                " pauses)", total["rps"] / offered, "offered")]
    for name, s in stats.items():
        judged = name in STATUS_POLLS
        rows.append(Row(f"{name}: p50 / p99", s["p50"], f"/ {s['p99']:.0f} ms",
                        f"p99 < {TARGET_P99_MS} ms" if judged else "",
                        s["p99"] / TARGET_P99_MS if judged else None, "target" if judged else "",
                        s["p99"] < TARGET_P99_MS if judged else None))
    rows.append(Row("Errors (any non-2xx, refused or cut connection)", total["failures"], "",
                    "0", None, "", total["failures"] == 0))
    notes = [
        f"{opts.load_clients} locust users (FastHttpUser, one process) started at"
        f" {SPAWN_RATE}/s, then a {window:g} s window; per kind: "
        + ", ".join(f"{n.split(':')[0]} {s['count']:,} ({s['rps']:.0f}/s, {s['failures']} errors)"
                    for n, s in stats.items()) + f"; {stored:,} jobs in the store at the end.",
        f"CPU over the whole run: server {server_cpu:.0f} s, locust {client_cpu:.0f} s, of"
        f" {opts.machine['nproc']} cores × {window + 10:.0f} s; the load generator shares the"
        " cores with the server. locust reports percentiles rounded: to 1 ms below 100 ms, to"
        " 10 ms above.",
    ]
    return rows, notes, {"stats": stats, "total": total, "server_cpu_s": server_cpu,
                         "client_cpu_s": client_cpu, "gunicorn": Proxy.gunicorn_settings()}


def seed_accounts(proxy: Proxy, count: int) -> list[dict]:
    """One account per client, each with its jobs; returns what the locustfile reads."""
    accounts = []
    for i in range(count):
        user = proxy.add_user(f"student{i:03d}")
        proxy.seed_jobs(user, JOBS_PER_ACCOUNT, queued_one_in=10)
        accounts.append({"name": user.name, "token": user.token, "id": user.id})
    with proxy.db.connection() as conn:
        with conn.transaction():
            conn.execute("UPDATE jobs SET stdout_tail = ? WHERE state = ?", (TAIL, "succeeded"))
        for a in accounts:
            a["jobs"] = [r["id"] for r in conn.query("SELECT id FROM jobs WHERE owner_id = ?",
                                                     (a.pop("id"),))]
    return accounts


def run_locust(proxy: Proxy, opts, accounts_path) -> dict[str, dict]:
    """Run locust headless; returns {request name: count, rps, p50, p99, failures}."""
    prefix = proxy.dir / "locust"
    ramp_s = opts.load_clients / SPAWN_RATE
    argv = [sys.executable, "-m", "locust", "-f", str(ROOT / "bench" / "locustfile.py"),
            "--headless", "--users", str(opts.load_clients), "--spawn-rate", str(SPAWN_RATE),
            "--run-time", f"{int(opts.load_duration + ramp_s + 1)}s", "--reset-stats",
            "--host", proxy.url, "--csv", str(prefix), "--only-summary", "--loglevel", "WARNING",
            "--stop-timeout", "5"]
    env = {"JOBCLOUD_LOAD_ACCOUNTS": str(accounts_path), "PYTHONPATH": str(ROOT),
           "JOBCLOUD_LOAD_THINK_S": ",".join(map(str, THINK_S))}
    try:
        done = subprocess.run(argv, cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True,
                              timeout=opts.load_duration + ramp_s + 90)
    except subprocess.TimeoutExpired:
        raise BenchError("locust ran past its time") from None
    # locust exits 1 when any request failed: the CSV still holds the figures.
    if done.returncode not in (0, 1) or not (prefix.parent / "locust_stats.csv").exists():
        raise BenchError(f"locust failed ({done.returncode}):\n{done.stderr[-2000:]}")
    found = {}
    with open(prefix.parent / "locust_stats.csv", newline="") as f:
        for r in csv.DictReader(f):
            found[r["Name"]] = {"count": int(r["Request Count"]), "failures": int(r["Failure Count"]),
                                "rps": float(r["Requests/s"]), "p50": float(r["50%"]),
                                "p99": float(r["99%"]), "max": float(r["100%"])}
    return found


def _children_cpu() -> float:
    u = resource.getrusage(resource.RUSAGE_CHILDREN)
    return u.ru_utime + u.ru_stime
