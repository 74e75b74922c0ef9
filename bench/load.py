"""Load generation: a lean keep-alive HTTP client and a closed-loop runner.

The client machine is the server machine here (2 cores), so the load generator
must cost little: http.client on a persistent connection spends a fraction of
the CPU `requests` does per call. Client processes (forked) times threads each
run one operation in a loop; only operations that start after the warm-up and
end before the deadline count.
"""
from __future__ import annotations

import http.client
import json
import multiprocessing
import resource
import threading
import time
import traceback
from dataclasses import dataclass, field

import psutil

from .harness import BenchError

# Children wait this long after being started so all begin together.
START_DELAY_S = 1.0


class Client:
    """One keep-alive HTTP/1.1 connection to the proxy on 127.0.0.1."""

    def __init__(self, port: int, headers: dict | None = None, timeout: float = 120.0):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        self.headers = dict(headers or {})

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict | None = None, expect: int = 200) -> bytes:
        """Send one request; returns the body.

        Raises:
            BenchError: the answer's status is not `expect`.
        """
        headers = {**self.headers, **(headers or {})}
        try:
            response, data = self._send(method, path, body, headers)
        except (BrokenPipeError, ConnectionResetError, http.client.RemoteDisconnected):
            # The server closes keep-alive connections idle for 5 s (gunicorn
            # keepalive); a connection left idle meanwhile is reopened once.
            response, data = self._send(method, path, body, headers)
        if response.status != expect:
            raise BenchError(f"{method} {path} answered {response.status}: {data[:300]!r}")
        return data

    def _send(self, method: str, path: str, body, headers: dict):
        try:
            self.conn.request(method, path, body=body, headers=headers)
            response = self.conn.getresponse()
            return response, response.read()
        except (http.client.HTTPException, OSError):
            self.conn.close()  # reopened by the next request
            raise

    def json(self, method: str, path: str, payload=None, expect: int = 200):
        body = None if payload is None else json.dumps(payload).encode()
        headers = {"Content-Type": "application/json"} if body is not None else {}
        return json.loads(self.request(method, path, body, headers, expect))


@dataclass
class LoadResult:
    """What a closed-loop run measured inside its window."""

    window_s: float
    ops: int = 0
    units: int = 0            # what the operations returned, summed (e.g. jobs done)
    errors: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    error_samples: list[str] = field(default_factory=list)
    client_cpu_s: float = 0.0
    server_cpu_s: float = 0.0
    machine_cpu_s: float = 0.0
    concurrency: int = 0

    @classmethod
    def pooled(cls, parts: list["LoadResult"]) -> "LoadResult":
        """Several rounds of the same load as one: rates over the summed windows, all latencies."""
        total = cls(window_s=sum(p.window_s for p in parts), concurrency=parts[0].concurrency)
        for p in parts:
            total.ops += p.ops
            total.units += p.units
            total.errors += p.errors
            total.latencies_ms.extend(p.latencies_ms)
            total.error_samples.extend(p.error_samples)
            total.client_cpu_s += p.client_cpu_s
            total.server_cpu_s += p.server_cpu_s
            total.machine_cpu_s += p.machine_cpu_s
        return total

    @property
    def rate(self) -> float:
        return self.ops / self.window_s

    @property
    def unit_rate(self) -> float:
        return self.units / self.window_s

    def summary(self) -> dict:
        lat = sorted(self.latencies_ms)
        out = {
            "window_s": self.window_s, "concurrency": self.concurrency, "ops": self.ops,
            "units": self.units, "errors": self.errors, "rate_per_s": round(self.rate, 1),
            "p50_ms": percentile(lat, 50), "p90_ms": percentile(lat, 90),
            "p99_ms": percentile(lat, 99), "max_ms": lat[-1] if lat else None,
            "error_samples": self.error_samples[:5],
            "server_cpu_ms_per_op": round(1000 * self.server_cpu_s / max(self.ops, 1), 3),
            # Cores kept busy during the window: by the server, by the load
            # generator, and by everything else on this shared machine.
            "cores_server": round(self.server_cpu_s / self.window_s, 2),
            "cores_clients": round(self.client_cpu_s / self.window_s, 2),
            "cores_other": round(max(0.0, self.machine_cpu_s - self.server_cpu_s
                                     - self.client_cpu_s) / self.window_s, 2),
        }
        return out


def percentile(sorted_values: list[float], p: float) -> float | None:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return None
    k = max(0, min(len(sorted_values) - 1, round(p / 100 * len(sorted_values) + 0.5) - 1))
    return round(sorted_values[k], 3)


def run_load(op_factory, *, processes: int, threads: int, duration_s: float, warmup_s: float,
             server_cpu=None, alongside=None) -> LoadResult:
    """Run `op_factory(process_index, thread_index)()` in a loop on every client thread.

    Args:
        op_factory: called once per thread inside the client process; returns
            the operation, a callable that returns a count of units done (anything
            but an int counts 1) and raises on failure.
        server_cpu: callable giving the server's CPU seconds, sampled at the
            window's start and end.
        alongside: callable(stop_event) run in a parent thread during the run
            (e.g. to keep a queue topped up); started after the children fork.

    Returns:
        The operations that started after the warm-up and ended before the deadline.

    Children are forked (closures need no pickling) and leave through
    os._exit, so they never close the parent's inherited SQLite or socket handles.
    """
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    start = time.monotonic() + START_DELAY_S
    window = (start + warmup_s, start + warmup_s + duration_s)
    children = [ctx.Process(target=_client_process, daemon=True,
                            args=(op_factory, i, threads, start, window, results))
                for i in range(processes)]
    for child in children:
        child.start()
    stop = threading.Event()
    helper = threading.Thread(target=alongside, args=(stop,), daemon=True) if alongside else None
    if helper:
        helper.start()
    server_cpu = server_cpu or (lambda: 0.0)
    _sleep_until(window[0])
    before = server_cpu(), busy_cpu()
    _sleep_until(window[1])
    after = server_cpu(), busy_cpu()
    try:
        parts = [results.get(timeout=window[1] - time.monotonic() + 300) for _ in children]
    finally:
        stop.set()
        for child in children:
            child.join(timeout=30)
            if child.is_alive():
                child.kill()
        if helper:
            helper.join()
    total = LoadResult(window_s=duration_s, concurrency=processes * threads)
    for part in parts:
        if "fatal" in part:
            raise BenchError(f"a client process failed:\n{part['fatal']}")
        total.ops += part["ops"]
        total.units += part["units"]
        total.errors += part["errors"]
        total.latencies_ms.extend(part["latencies_ms"])
        total.error_samples.extend(part["error_samples"])
        total.client_cpu_s += part["cpu_s"]
    total.server_cpu_s = after[0] - before[0]
    total.machine_cpu_s = after[1] - before[1]
    return total


def _sleep_until(t: float) -> None:
    time.sleep(max(0.0, t - time.monotonic()))


def _client_process(op_factory, index: int, threads: int, start: float, window, results) -> None:
    try:
        shared = {"ops": 0, "units": 0, "errors": 0, "latencies_ms": [], "error_samples": []}
        lock = threading.Lock()
        ops = [op_factory(index, t) for t in range(threads)]
        workers = [threading.Thread(target=_client_thread, args=(op, start, window, shared, lock))
                   for op in ops]
        for w in workers:
            w.start()
        _sleep_until(window[0])
        cpu0 = _cpu()
        _sleep_until(window[1])
        shared["cpu_s"] = _cpu() - cpu0
        for w in workers:
            w.join()
        if "fatal" in shared:
            raise BenchError(shared["fatal"])
        results.put(shared)
    except BaseException:
        results.put({"fatal": traceback.format_exc()})


def _client_thread(op, start: float, window, shared: dict, lock: threading.Lock) -> None:
    try:
        _loop(op, start, window, shared, lock)
    except BaseException:
        shared["fatal"] = traceback.format_exc()


def _loop(op, start: float, window, shared: dict, lock: threading.Lock) -> None:
    ops = units = errors = 0
    latencies, samples = [], []
    _sleep_until(start)
    while True:
        t0 = time.monotonic()
        if t0 >= window[1]:
            break
        try:
            done = op()
            failed = None
        except Exception as e:  # counted, sampled and reported: the run goes on
            done, failed = 0, f"{type(e).__name__}: {e}"
        t1 = time.monotonic()
        if t0 >= window[0] and t1 <= window[1]:
            if failed:
                errors += 1
                if len(samples) < 3:
                    samples.append(failed[:300])
            else:
                ops += 1
                units += done if isinstance(done, int) else 1
                latencies.append((t1 - t0) * 1000)
    with lock:
        shared["ops"] += ops
        shared["units"] += units
        shared["errors"] += errors
        shared["latencies_ms"].extend(latencies)
        shared["error_samples"].extend(samples)


def busy_cpu() -> float:
    """CPU seconds the whole machine has spent busy (all processes, all cores)."""
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0) - getattr(t, "guest", 0.0) \
        - getattr(t, "guest_nice", 0.0)


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def sequential(op, count: int) -> list[float]:
    """Run `op()` `count` times one after another; returns sorted latencies in ms."""
    latencies = []
    for _ in range(count):
        t0 = time.perf_counter()
        op()
        latencies.append((time.perf_counter() - t0) * 1000)
    return sorted(latencies)
