"""`slowloris`: clients that send their request a byte at a time must not
starve everyone else.

300 connections each send a request head one byte a second, and connect again
when the server cuts them off, so that many stay open for the whole window
(one asyncio loop holds them: bench/longconn.py). Meanwhile one client
requests GET /healthz in a loop, each on a new connection as a new visitor's
would be; the same client's figures with no slow clients are the baseline.
Also measured: how long the server lets a slow client hold its connection
before cutting it off (gunicorn's keepalive bounds the arrival of a request's
head, proxy/gunicorn_conf.py).
"""
from __future__ import annotations

from .harness import Proxy
from .load import Client, percentile, run_load
from .longconn import SLOW_HEAD, Holder, raise_fd_limit
from .report import Row

TARGET_P99_MS = 100
BYTE_EVERY_S = 1.0
# A cut this long after gunicorn's keepalive still counts as bounded by it:
# the timeout starts once the connection is accepted, and a byte is sent once a second.
CUT_SLACK_S = BYTE_EVERY_S + 0.5
BASELINE_S = 10.0
FDS_SPARE = 1024


def run(opts) -> tuple[list[Row], list[str], dict]:
    raise_fd_limit(2 * opts.slow_clients + FDS_SPARE)
    keepalive = Proxy.gunicorn_settings()["keepalive"]
    with Proxy(opts.tmp) as proxy:
        proxy.start()
        base = healthz_load(proxy, BASELINE_S, opts.warmup).summary()
        with Holder(proxy.port) as holder:
            holder.slow_clients(opts.slow_clients, BYTE_EVERY_S)
            holder.wait_for(lambda c: c["slow_opened"] >= opts.slow_clients, 30,
                            f"{opts.slow_clients} slow clients connected")
            under = healthz_load(proxy, opts.slow_window, opts.warmup).summary()
            held = holder.snapshot()
    c, cut = held["counts"], sorted(held["cut_s"])
    raw = {"baseline": base, "under": under, "holder": held, "keepalive_s": keepalive,
           "cut_p50_s": percentile(cut, 50), "cut_max_s": cut[-1] if cut else None}
    bound = keepalive + CUT_SLACK_S
    never_cut = c.get("slow_completed", 0)
    rows = [
        Row(f"/healthz p99, {opts.slow_clients} slow clients open", under["p99_ms"], "ms",
            f"< {TARGET_P99_MS} ms", under["p99_ms"] / TARGET_P99_MS, "target",
            under["p99_ms"] < TARGET_P99_MS),
        Row(f"/healthz p50, {opts.slow_clients} slow clients open", under["p50_ms"], "ms"),
        Row("/healthz p50 / p99, no slow clients", base["p50_ms"], f"/ {base['p99_ms']:.1f} ms",
            "baseline", under["p99_ms"] / base["p99_ms"], "p99 under attack/baseline"),
        Row("/healthz requests that failed under attack", under["errors"], "", "0", None, "",
            under["errors"] == 0),
        Row("Slow client cut off after, p50", raw["cut_p50_s"], "s"),
        Row("Slow client cut off after, longest", raw["cut_max_s"], "s",
            f"≤ keepalive ({keepalive:g} s) + {CUT_SLACK_S:g} s",
            None if raw["cut_max_s"] is None else raw["cut_max_s"] / keepalive, "keepalive",
            raw["cut_max_s"] is not None and raw["cut_max_s"] <= bound and never_cut == 0),
    ]
    notes = [
        f"{opts.slow_clients} connections each sending a {len(SLOW_HEAD)}-byte request head one"
        f" byte every {BYTE_EVERY_S:g} s, connecting again when cut off; /healthz by one client,"
        f" one request at a time, each on a new connection, a {opts.slow_window:g} s window"
        f" ({under['ops']:,} requests) after {opts.warmup:g} s warm-up while they were open, and"
        f" {BASELINE_S:g} s ({base['ops']:,} requests) before they were.",
        f"Slow connections over the run: {c.get('slow_opened', 0):,} opened,"
        f" {c.get('slow_cut', 0):,} cut off by the server ("
        + ", ".join(f"{how}: {n:,}" for how, n in sorted(held["cut_how"].items()))
        + f"), {never_cut} sent their whole head uncut"
        + (f"; samples: {held['samples']}" if held["samples"] else "") + ".",
        f"Cores busy during the window (of {opts.machine['nproc']}): server"
        f" {under['cores_server']}, /healthz client {under['cores_clients']}, other processes"
        f" (the slow clients' loop included) {under['cores_other']}.",
    ]
    return rows, notes, raw


def healthz_load(proxy: Proxy, duration_s: float, warmup_s: float):
    """One client requesting /healthz in a loop, a new connection for each request."""
    def factory(process: int, thread: int):
        def op():
            client = Client(proxy.port)
            try:
                client.request("GET", "/healthz")
            finally:
                client.conn.close()
        return op
    return run_load(factory, processes=1, threads=1, duration_s=duration_s, warmup_s=warmup_s,
                    server_cpu=proxy.cpu_seconds)
