"""`python -m bench [NAMES...]`: run benchmarks, rewrite docs/PERFORMANCE.md.

With no names, runs them all (about 15 minutes on 2 cores). Each benchmark's
section of the document is replaced; sections of benchmarks not run are kept.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

from . import (
    archive,
    arrays,
    claim,
    idle,
    loadtest,
    s3,
    slowloris,
    status,
    submit,
    upload,
    vm,
    wakeup,
    warmstart,
    worker,
)
from .harness import machine
from .report import Outcome, now_iso, update_doc, write_json

# name -> (title, run function); the document lists them in this order.
BENCHMARKS = {
    "submit": ("Submissions through gunicorn", submit.run_submit),
    "claim": ("Claim + result cycles, simulated workers", claim.run),
    "status": ("Job status page latency", status.run),
    "upload": ("1 GiB dataset upload", upload.run),
    "archive": ("Checking a 2 GiB dataset of any shape", archive.run),
    "submit-scaling": ("Submissions by store size", submit.run_scaling),
    "trivial": ("Trivial job end to end vs bare docker run", worker.run_trivial),
    "throughput": ("Jobs per second, 1 worker, N slots", worker.run_throughput),
    "claim-scaling": ("Claim cost by queue depth", claim.run_scaling),
    "worker-memory": ("Worker memory, 1 and 8 slots", worker.run_memory),
    "load": ("200 concurrent clients (locust)", loadtest.run),
    "vm-clone": ("Worker VM clone cost by template size", vm.run_clone),
    "vm-scaleup": ("Queue to first job on a new worker VM", vm.run_scaleup),
    "vm-warm": ("Queue to first job with one idle VM kept warm", vm.run_warm),
    "idle": ("1,000 idle workers and 1,000 live pages on one proxy", idle.run),
    "wakeup": ("A submission wakes a waiting worker", wakeup.run),
    "slowloris": ("300 slowloris connections", slowloris.run),
    "warm-start": ("Pre-started sandboxes and crun vs cold starts", warmstart.run),
    "arrays": ("A 10,000-job array: submission and claims with it queued", arrays.run),
    "s3": ("The S3 blob store vs the local directory: uploads, downloads, claims", s3.run),
}

INTRO = """# Performance

The sections below are written by `make bench` (`.venv/bin/python -m bench [NAMES...]`;
names: {names}); rerun rather than edit them. Every benchmark starts its own proxy: a temp
data dir with a SQLite store seeded through the store's own functions, and the real
gunicorn with the default `proxy/gunicorn_conf.py` ({gunicorn}) on a loopback port. The
load generator runs on the same machine and takes CPU from the server, and this machine is
shared with other work (each section says how busy it was): the figures are what one small
box does alone, a floor for a proxy with its own cores. Raw numbers: `bench/results/`
(git-ignored). The analysis at the end is written by hand.
"""

def main(argv=None) -> int:
    args = parse_args(argv)
    names = args.names or list(BENCHMARKS)
    args.machine = machine()
    outcomes, failed = [], []
    for name in names:
        title, fn = BENCHMARKS[name]
        print(f"== {name}: {title}", flush=True)
        started, t0, load_before = now_iso(), time.monotonic(), os.getloadavg()[0]
        try:
            rows, notes, raw = fn(args)
        except Exception:
            traceback.print_exc()
            failed.append(name)
            continue
        outcome = Outcome(name=name, title=title, command=_command(name, args), rows=rows,
                          notes=notes, raw=raw, started_at=started,
                          seconds=time.monotonic() - t0,
                          machine=dict(args.machine, loadavg=[round(load_before, 1),
                                                              round(os.getloadavg()[0], 1)]))
        print(f"   {outcome.seconds:.0f} s, raw: {write_json(outcome)}")
        for r in rows:
            mark = {True: "ok", False: "MISSED", None: ""}[r.met]
            print(f"   {r.measure}: {r.value if r.value is None else round(r.value, 2)} {r.unit}"
                  f"  {r.target}  {mark}")
        outcomes.append(outcome)
    if outcomes and not args.no_doc:
        from .harness import Proxy

        g = Proxy.gunicorn_settings()
        intro = INTRO.format(names=", ".join(f"`{n}`" for n in BENCHMARKS),
                             gunicorn=f"{g['workers']} {g['worker_class']} workers ×"
                                      f" {g['worker_connections']:,} connections")
        print(f"wrote {update_doc(outcomes, list(BENCHMARKS), intro)}")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("names", nargs="*", metavar="NAME",
                   help=f"benchmarks to run (default: all): {', '.join(BENCHMARKS)}")
    p.add_argument("--rounds", type=int, default=2,
                   help="alternating rounds for submit and claim (pooled)")
    p.add_argument("--duration", type=float, default=10, help="submit window per round, s")
    p.add_argument("--claim-duration", type=float, default=8,
                   help="claim window per scenario and round, s")
    p.add_argument("--scaling-duration", type=float, default=5, help="submit-scaling window, s")
    p.add_argument("--warmup", type=float, default=2, help="warm-up before each window, s")
    p.add_argument("--processes", type=int, default=2, help="client processes")
    p.add_argument("--threads", type=int, default=4, help="client threads per process")
    p.add_argument("--status-requests", type=int, default=300, help="requests per status row")
    p.add_argument("--claim-scaling-duration", type=float, default=5,
                   help="claim-scaling window per depth, s")
    p.add_argument("--load-clients", type=int, default=200, help="locust users for load")
    p.add_argument("--load-duration", type=float, default=60, help="load window, s")
    p.add_argument("--upload-mib", type=int, default=1024, help="dataset size for upload, MiB")
    p.add_argument("--s3-rounds", type=int, default=3,
                   help="rounds of each backend for s3 (median and range)")
    p.add_argument("--archive-mib", type=int, default=2048,
                   help="data in each dataset shape for archive, MiB (2 GiB: the upload limit)")
    p.add_argument("--idle-workers", type=int, default=1000,
                   help="idle workers holding a claim long-poll, for idle")
    p.add_argument("--idle-pages", type=int, default=1000, help="open live pages, for idle")
    p.add_argument("--idle-window", type=float, default=30,
                   help="idle CPU window, s (a whole claim wait: every claim renewed once)")
    p.add_argument("--idle-person-s", type=float, default=30,
                   help="window of each of the person's page loops while connections are open, s")
    p.add_argument("--wakeups", type=int, default=200, help="submissions per wakeup setup")
    p.add_argument("--slow-clients", type=int, default=300, help="slowloris connections")
    p.add_argument("--slow-window", type=float, default=30,
                   help="/healthz window while the slow clients are open, s")
    p.add_argument("--tmp", help="where temp data dirs go (default: system temp dir)")
    p.add_argument("--no-doc", action="store_true", help="do not rewrite docs/PERFORMANCE.md")
    args = p.parse_args(argv)
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        p.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    args.upload_bytes = args.upload_mib * 1024 * 1024
    args.defaults = {a.dest: a.default for a in p._actions if a.dest not in ("help", "names")}
    return args


def _command(name: str, args) -> str:
    """The command that reproduces this benchmark with the options it ran with."""
    changed = [f"--{k.replace('_', '-')} {getattr(args, k)}" for k, v in args.defaults.items()
               if k not in ("no_doc", "tmp") and getattr(args, k) != v]
    return " ".join(["python -m bench", name, *changed])


if __name__ == "__main__":
    sys.exit(main())
