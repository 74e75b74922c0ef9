"""`arrays`: a 10,000-job array's submission time, and claim cycles with it queued.

Submit: one POST /api/v1/jobs with `array=0-9999` (and `0-9999%8`) through
gunicorn, timed from the request to the 201: the array row and 10,000 job
rows written in one transaction, each job a copy of the first's row
(proxy/arrays.py). Three arrays of each, on one proxy, median.

Claims: `claim`'s cycle (simulated workers claim one job and post its result
at once; bench/claim.py) with alice's runnable queue kept at 1,000 jobs, on a
fresh proxy per scenario: alone; with bob's 10,000 lone jobs queued as well
(what a second user's queue costs anyway); with bob's 10,000-job array
instead; and with that array capped at %2 (arrays.Caps: each dispatch pass
reads which arrays are at their cap and steps over their queued jobs). Fair
share gives bob about half the slots, so cycles count both users' jobs; his
queue is far from drained within a window. The array's own cost is judged
against the lone jobs, on the server's CPU per cycle.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import requests

from .claim import Feeder, cycle_op, register_workers
from .harness import Proxy
from .load import run_load
from .report import Row

ARRAY_SIZE = 10_000
SUBMITS = 3
# The server's CPU per claim cycle with an array queued must stay within 25% of
# without: claim-scaling's bound. Judged on CPU per cycle, not cycles/s, since
# this shared machine's load moves cycles/s between scenarios far more.
CPU_BOUND = 1.25
QUEUE = 1_000


@dataclass(frozen=True)
class Scenario:
    key: str
    label: str
    array: str | None    # bob's array, as submitted; None: no array
    lone: int = 0        # bob's lone jobs queued instead


SCENARIOS = (
    Scenario("none", "1,000 jobs queued, no array", None),
    # The same queue as an array's, of lone jobs: what a second user with
    # 10,000 jobs costs anyway, so the array's own cost is the difference.
    Scenario("lone", f"1,000 queued + {ARRAY_SIZE:,} lone jobs of another user", None,
             lone=ARRAY_SIZE),
    Scenario("array", f"1,000 queued + a {ARRAY_SIZE:,}-job array", f"0-{ARRAY_SIZE - 1}"),
    # %2 is below bob's fair share of the 8 simulated workers: the cap binds,
    # and every pass that turns to bob finds his array full.
    Scenario("capped", f"1,000 queued + a {ARRAY_SIZE:,}-job array %2", f"0-{ARRAY_SIZE - 1}%2"),
)


class OwnerFeeder(Feeder):
    """claim.Feeder counting only its owner's taken jobs: the array's are another user's."""

    def _taken(self) -> int:
        with self.proxy.db.connection() as conn:
            return conn.query_one("SELECT COUNT(*) AS n FROM jobs WHERE owner_id = ? AND state IN"
                                  " (?, ?)", (self.owner.id, "running", "succeeded"))["n"]


def submit_array(proxy: Proxy, token: str, spec: str) -> float:
    """Seconds from sending an array submission to its 201."""
    t0 = time.perf_counter()
    r = requests.post(f"{proxy.url}/api/v1/jobs", headers={"Authorization": f"Bearer {token}"},
                      files={"code": (None, "print('x')\n"), "array": (None, spec)}, timeout=300)
    elapsed = time.perf_counter() - t0
    if r.status_code != 201 or r.json()["size"] != ARRAY_SIZE:
        raise RuntimeError(f"array submission refused: {r.status_code} {r.text[:300]}")
    return elapsed


def measure_submit(opts) -> dict:
    with Proxy(opts.tmp) as proxy:
        bob = proxy.add_user("bob")
        proxy.start()
        register_workers(proxy, 1)   # a worker that can run them: no capacity refusal
        plain = [submit_array(proxy, bob.token, f"0-{ARRAY_SIZE - 1}") for _ in range(SUBMITS)]
        capped = [submit_array(proxy, bob.token, f"0-{ARRAY_SIZE - 1}%8") for _ in range(SUBMITS)]
    return {"plain_s": plain, "capped_s": capped,
            "plain_median_s": statistics.median(plain), "capped_median_s": statistics.median(capped)}


def measure_claims(opts, scenario: Scenario):
    workers = opts.processes * opts.threads
    with Proxy(opts.tmp) as proxy:
        alice, bob = proxy.add_user("alice"), proxy.add_user("bob")
        feeder = OwnerFeeder(proxy, alice, QUEUE)
        feeder.fill()
        if scenario.lone:
            proxy.seed_jobs(bob, scenario.lone)
        proxy.start()
        secrets = register_workers(proxy, workers)
        submit_s = submit_array(proxy, bob.token, scenario.array) if scenario.array else None
        result = run_load(cycle_op(proxy, secrets, opts.threads), processes=opts.processes,
                          threads=opts.threads, duration_s=opts.claim_duration,
                          warmup_s=opts.warmup, server_cpu=proxy.cpu_seconds, alongside=feeder)
        with proxy.db.connection() as conn:
            left = conn.query_one("SELECT COUNT(*) AS n FROM jobs WHERE owner_id = ? AND state = ?",
                                  (bob.id, "queued"))["n"]
    summary = result.summary()
    summary.update(cycles_per_s=round(result.unit_rate, 1), array_submit_s=submit_s,
                   array_left_queued=left, empty_claims=result.ops - result.units)
    return summary


def run(opts) -> tuple[list[Row], list[str], dict]:
    submit = measure_submit(opts)
    claims = {s.key: measure_claims(opts, s) for s in SCENARIOS}
    rows = [Row(f"Submit a {ARRAY_SIZE:,}-job array (one request), median of {SUBMITS}",
                submit["plain_median_s"], "s", "one request; quick", None, "", None),
            Row(f"Submit a {ARRAY_SIZE:,}-job array %8, median of {SUBMITS}",
                submit["capped_median_s"], "s")]
    base = claims["lone"]["server_cpu_ms_per_op"]
    for s in SCENARIOS:
        c = claims[s.key]
        rows.append(Row(f"Claim cycles/s, {s.label}", c["cycles_per_s"], "/s"))
        rows.append(Row(f"Server CPU per cycle, {s.label}", c["server_cpu_ms_per_op"], "ms"))
        if s.array:
            ratio = c["server_cpu_ms_per_op"] / base if base else 0.0
            rows.append(Row(f"Server CPU per cycle, {s.label} vs as many lone jobs", ratio, "×",
                            f"≤ {CPU_BOUND}×", ratio, "", ratio <= CPU_BOUND))
    notes = [
        f"Submit: {SUBMITS} arrays of each kind one after the other on one proxy (its store"
        f" grows to {2 * SUBMITS * ARRAY_SIZE:,} jobs), one worker registered; seconds each:"
        f" plain {', '.join(f'{x:.2f}' for x in submit['plain_s'])};"
        f" %8 {', '.join(f'{x:.2f}' for x in submit['capped_s'])}.",
        f"Claims: {opts.processes * opts.threads} simulated workers ({opts.processes} processes ×"
        f" {opts.threads} threads, slots=1), one fresh proxy per scenario, a"
        f" {opts.claim_duration:g} s window after {opts.warmup:g} s warm-up; alice's runnable"
        f" queue kept at {QUEUE:,}; bob's array submitted through the API before the window"
        " (fair share splits the slots between them). Bob's jobs still queued after the window: "
        + "; ".join(f"{s.label}: {claims[s.key]['array_left_queued']:,}" for s in SCENARIOS)
        + ". Errors: " + ", ".join(str(claims[s.key]["errors"]) for s in SCENARIOS)
        + "; empty claims: " + ", ".join(str(claims[s.key]["empty_claims"]) for s in SCENARIOS)
        + ".",
        f"Cores busy during the windows (of {opts.machine['nproc']}), server / simulated"
        " workers / other: " + "; ".join(
            f"{s.label}: {claims[s.key]['cores_server']} / {claims[s.key]['cores_clients']} /"
            f" {claims[s.key]['cores_other']}" for s in SCENARIOS) + ".",
    ]
    return rows, notes, {"submit": submit, "claims": claims}
