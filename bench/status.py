"""`status`: GET /job-status/<user> latency, JSON and HTML, by how many jobs the user has.

One client, one request at a time (the page's own cost, not queueing), bearer
token. Users hold 10^2, 10^3 and 10^4 jobs, about one in ten still queued so
the page is the active, self-refreshing kind; the target is judged at 10^4.
"""
from __future__ import annotations

from .harness import BenchError, Proxy
from .load import Client, percentile, sequential
from .report import Row

TARGET_P50_MS = 50
SIZES = (100, 1_000, 10_000)
FORMATS = {"JSON": "application/json", "HTML": "text/html"}


def run(opts) -> tuple[list[Row], list[str], dict]:
    raw = {}
    with Proxy(opts.tmp) as proxy:
        users = {}
        for size in SIZES:
            users[size] = proxy.add_user(f"user{size}")
            proxy.seed_jobs(users[size], size, queued_one_in=10)
        proxy.start()
        page_size = proxy.config.page_size
        for size, user in users.items():
            for fmt, accept in FORMATS.items():
                client = Client(proxy.port, dict(user.auth, Accept=accept))
                path = f"/job-status/{user.name}"
                page = client.request("GET", path)
                _check(page, fmt)
                lat = sequential(lambda: client.request("GET", path), opts.status_requests)
                raw[f"{size}-{fmt}"] = {"p50_ms": percentile(lat, 50), "p99_ms": percentile(lat, 99),
                                        "requests": len(lat), "page_bytes": len(page)}
    rows = []
    for size in sorted(SIZES, reverse=True):
        for fmt in FORMATS:
            r = raw[f"{size}-{fmt}"]
            judged = size == max(SIZES)
            rows.append(Row(
                f"{fmt}, {size:,} jobs: p50 / p99", r["p50_ms"], f"/ {r['p99_ms']:.1f} ms",
                f"p50 < {TARGET_P50_MS} ms" if judged else "",
                r["p50_ms"] / TARGET_P50_MS if judged else None, "target" if judged else "",
                r["p50_ms"] < TARGET_P50_MS if judged else None))
    notes = [f"{opts.status_requests} sequential requests per row on one keep-alive connection;"
             f" the page lists the newest {page_size} jobs (page_size); page sizes at"
             f" {max(SIZES):,} jobs: "
             + ", ".join(f"{fmt} {raw[f'{max(SIZES)}-{fmt}']['page_bytes'] / 1024:.0f} KiB"
                         for fmt in FORMATS) + "."]
    return rows, notes, raw


def _check(page: bytes, fmt: str) -> None:
    ok = page.startswith(b"{") if fmt == "JSON" else b'<table id="jobs"' in page
    if not ok:
        raise BenchError(f"/job-status answered no {fmt} job list: {page[:200]!r}")
