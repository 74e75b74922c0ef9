"""Many long-lived connections from one process: claim long-polls, live
streams (Server-Sent Events) and slow clients, all on one asyncio loop.

A thousand idle workers and a thousand open pages are a socket each here, not
a thread each: the load generator shares the machine's cores with the server,
so holding them must cost next to nothing. A `Holder` runs the loop in a
thread of the benchmark's process and keeps up what it holds (a claim that is
answered is sent again, a stream the server ends is reopened, a slow client
that is cut off connects again) until it is closed; its counts say what the
server did to them. `Connection` is the keep-alive HTTP/1.1 client under it,
also used on its own where two answers are timed against each other
(bench/wakeup.py).
"""
from __future__ import annotations

import asyncio
import json
import random
import re
import resource
import threading
import time
from collections import Counter
from dataclasses import dataclass

from .harness import BenchError

REGISTER = "/api/v1/workers/register"
CLAIM = "/api/v1/worker/claim"
HEARTBEAT = "/api/v1/worker/heartbeat"
# What a browser's EventSource waits before reconnecting when the server ends a
# stream it did not say otherwise about (live.py sends `retry:` first anyway).
DEFAULT_RETRY_S = 0.5
# A stream the server ends this much before its lifetime (live_stream_s) was
# dropped, not renewed.
LIFETIME_SLACK_S = 1.0
# After a failed request, before the next try: a broken server is not hammered.
FAILURE_PAUSE_S = 1.0
# Registrations in flight at once: the enrollment check and the insert are
# quick, and a thousand at once would only queue in the proxy.
REGISTER_AT_ONCE = 8
# First texts of each kind of failure kept for the report.
SAMPLES = 5
# A slow client's request head: long enough that at one byte a second it is
# never complete before a server that bounds the head cuts it off.
SLOW_HEAD = ("GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n"
             "User-Agent: jobcloud-bench-slowloris/1 (one byte at a time)\r\n"
             + "".join(f"X-Slow-{i}: {'z' * 40}\r\n" for i in range(4)) + "\r\n").encode()

_RETRY = re.compile(rb"^retry: (\d+)", re.MULTILINE)
# Raised by a connection the server closed or reset: counted, not fatal.
DROPS = (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError)


@dataclass
class Answer:
    """One HTTP answer, and when its last byte was read (time.perf_counter)."""

    status: int
    headers: dict[str, str]
    body: bytes
    done_at: float

    def json(self):
        return json.loads(self.body)


class Connection:
    """One keep-alive HTTP/1.1 connection to the proxy on 127.0.0.1, on the running loop."""

    def __init__(self, port: int, headers: dict | None = None):
        self.port = port
        self.headers = dict(headers or {})
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.reused = False

    async def request(self, method: str, path: str, body: bytes = b"",
                      headers: dict | None = None) -> Answer:
        """Send one request and read its whole answer.

        Raises:
            OSError, asyncio.IncompleteReadError: the connection failed.
        """
        try:
            return await self._exchange(method, path, body, headers)
        except DROPS:
            reused = self.reused
            self.close()
            if not reused:
                raise
        # The server closes keep-alive connections idle for 5 s (gunicorn's
        # keepalive); one left idle meanwhile is reopened once.
        return await self._exchange(method, path, body, headers)

    async def post_json(self, path: str, payload) -> Answer:
        return await self.request("POST", path, json.dumps(payload).encode(),
                                  {"Content-Type": "application/json"})

    async def open_stream(self, path: str, headers: dict | None = None) -> int:
        """Send a GET whose answer is read by `chunks()`; returns its status.

        An answer other than 200 is read whole here and the connection stays usable.
        """
        await self._send("GET", path, b"", headers)
        status, head = await self._head()
        if status != 200:
            await self._body(head)
            return status
        if head.get("transfer-encoding", "").lower() != "chunked":
            raise BenchError(f"GET {path}: a stream that is not chunked: {head}")
        return status

    async def chunks(self):
        """The chunks of a chunked answer as they arrive, until its end."""
        while True:
            size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await self.reader.readuntil(b"\r\n")
                return
            yield (await self.reader.readexactly(size + 2))[:-2]

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None
        self.reused = False

    async def _exchange(self, method, path, body, headers) -> Answer:
        await self._send(method, path, body, headers)
        status, head = await self._head()
        data = await self._body(head)
        if head.get("connection", "").lower() == "close":
            self.close()
        return Answer(status, head, data, time.perf_counter())

    async def _send(self, method: str, path: str, body: bytes, headers: dict | None) -> None:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        else:
            self.reused = True
        lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{self.port}",
                 f"Content-Length: {len(body)}"]
        lines += [f"{k}: {v}" for k, v in {**self.headers, **(headers or {})}.items()]
        self.writer.write("\r\n".join(lines).encode() + b"\r\n\r\n" + body)
        await self.writer.drain()

    async def _head(self) -> tuple[int, dict[str, str]]:
        raw = await self.reader.readuntil(b"\r\n\r\n")
        status_line, *fields = raw.decode("latin-1").split("\r\n")
        head = {}
        for field in fields:
            if field:
                name, _, value = field.partition(":")
                head[name.strip().lower()] = value.strip()
        return int(status_line.split()[1]), head

    async def _body(self, head: dict[str, str]) -> bytes:
        if "content-length" in head:
            return await self.reader.readexactly(int(head["content-length"]))
        if head.get("transfer-encoding", "").lower() == "chunked":
            return b"".join([c async for c in self.chunks()])
        data = await self.reader.read()  # no length: the body ends with the connection
        self.close()
        return data


class Holder:
    """An asyncio loop in a thread that holds connections to one proxy; use as a
    context manager. What it holds runs until the holder is closed.

    Counts (`snapshot()`): workers ``registered`` (``register_failed``), claims answered (``claims``; ``claims_with_jobs``,
    ``claims_early``: answered empty well before their wait ended),
    ``claims_failed``; live streams the server ended at their lifetime
    (``streams_renewed``), earlier (``streams_dropped``), refused as busy
    (``streams_busy``) or broken (``streams_failed``); ``heartbeats`` and
    ``heartbeats_failed``; slow clients connected (``slow_opened``), cut off
    by the server (``slow_cut``) or never cut (``slow_completed``). Gauges:
    ``claims_waiting``, ``streams_open``, ``slow_open``.
    """

    def __init__(self, port: int):
        self.port = port
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="holder", daemon=True)
        self.tasks: set[asyncio.Task] = set()
        self.counts: Counter = Counter()
        self.secrets: list[str] = []        # of the workers registered
        self.samples: dict[str, list[str]] = {}
        self.stream_s: list[float] = []     # lifetimes of streams the server ended
        self.cut_s: list[float] = []        # slow clients: connect to being cut off
        self.cut_how: Counter = Counter()   # what the server sent a slow client it cut

    def __enter__(self) -> "Holder":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._call(self._cancel_all())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()

    # --------------------------------------------------------- what it holds

    def hold_workers(self, enrollment: str, count: int, capacity: dict, wait_s: float) -> None:
        """Register `count` workers (POST /api/v1/workers/register, `capacity` as
        its body, names added); each then keeps one claim long-poll (wait_s)
        open, sent again when answered.

        Each worker claims as soon as it is registered, as the daemon does: one
        left silent while the others register would be marked lost. The first
        claims wait a random part of `wait_s`, so the workers' claims end spread
        out, as those of workers started at different times do, not all in the
        same second.
        """
        registering = asyncio.Semaphore(REGISTER_AT_ONCE)
        self._start(self._idle_worker(enrollment, dict(capacity, name=f"idle-{i:05d}"),
                                      registering, random.uniform(1.0, wait_s), wait_s)
                    for i in range(count))

    def hold_streams(self, pages: list[tuple[str, dict]], lifetime_s: float,
                     spread_s: float) -> None:
        """Keep one live stream open per (path, headers), reopened when the server ends it.

        The streams are opened over `spread_s`, so they are not all renewed in
        the same second later.
        """
        self._start(self._live_page(path, headers, lifetime_s, i * spread_s / len(pages))
                    for i, (path, headers) in enumerate(pages))

    def heartbeat(self, every_s: float) -> None:
        """Each registered worker also heartbeats every `every_s` (no jobs
        running), as the daemon does while idle."""
        self._start(self._heartbeats(s, every_s, random.uniform(0, every_s))
                    for s in self.secrets)

    def slow_clients(self, count: int, byte_every_s: float) -> None:
        """`count` clients sending a request head one byte every `byte_every_s`."""
        self._start(self._slow_client(byte_every_s, i * byte_every_s / count)
                    for i in range(count))

    def snapshot(self) -> dict:
        """The counts, gauges, samples and lifetimes so far (copied on the loop)."""
        async def copy():
            return {"counts": dict(self.counts), "samples": {k: list(v) for k, v in
                                                             self.samples.items()},
                    "stream_s": list(self.stream_s), "cut_s": list(self.cut_s),
                    "cut_how": dict(self.cut_how)}
        return self._call(copy())

    def wait_for(self, predicate, timeout: float, what: str) -> dict:
        """Poll snapshot() until predicate(counts) holds; returns that snapshot.

        Raises:
            BenchError: not within `timeout` seconds.
        """
        deadline = time.monotonic() + timeout
        while True:
            snap = self.snapshot()
            if predicate(Counter(snap["counts"])):
                return snap
            if time.monotonic() > deadline:
                raise BenchError(f"not within {timeout:g} s: {what}; counts {snap['counts']}")
            time.sleep(0.2)

    # ---------------------------------------------------------------- tasks

    async def _idle_worker(self, enrollment: str, capacity: dict, registering: asyncio.Semaphore,
                           first_wait_s: float, wait_s: float) -> None:
        conn = Connection(self.port, {"Authorization": f"Bearer {enrollment}"})
        try:
            async with registering:
                answer = await conn.post_json(REGISTER, capacity)
            if answer.status != 201:
                self._sample("register_failed", f"{answer.status} {answer.body[:200]!r}")
                return
            secret = answer.json()["secret"]
            self.secrets.append(secret)
            self.counts["registered"] += 1
            conn.headers["Authorization"] = f"Bearer {secret}"
            wait = first_wait_s
            while True:
                sent = time.monotonic()
                self.counts["claims_waiting"] += 1
                try:
                    answer = await conn.post_json(CLAIM, {"max_jobs": 1, "wait_s": round(wait, 3)})
                except DROPS as e:
                    await self._failed("claims_failed", f"{type(e).__name__}: {e}", conn)
                    continue
                finally:
                    self.counts["claims_waiting"] -= 1
                if answer.status != 200:
                    await self._failed("claims_failed", f"{answer.status} {answer.body[:200]!r}",
                                       conn)
                    continue
                self.counts["claims"] += 1
                if answer.json()["jobs"]:
                    self.counts["claims_with_jobs"] += 1
                elif time.monotonic() - sent < wait - LIFETIME_SLACK_S:
                    self.counts["claims_early"] += 1
                wait = wait_s
        finally:
            conn.close()

    async def _heartbeats(self, secret: str, every_s: float, delay_s: float) -> None:
        conn = Connection(self.port, {"Authorization": f"Bearer {secret}"})
        await asyncio.sleep(delay_s)
        try:
            while True:
                try:
                    answer = await conn.post_json(HEARTBEAT, {"running": []})
                except DROPS as e:
                    await self._failed("heartbeats_failed", f"{type(e).__name__}: {e}", conn)
                    continue
                if answer.status != 200:
                    await self._failed("heartbeats_failed",
                                       f"{answer.status} {answer.body[:200]!r}", conn)
                    continue
                self.counts["heartbeats"] += 1
                await asyncio.sleep(every_s)
        finally:
            conn.close()

    async def _live_page(self, path: str, headers: dict, lifetime_s: float,
                         delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        conn = Connection(self.port, {"Accept": "text/event-stream", **headers})
        try:
            while True:
                retry_s = await self._follow(conn, path, lifetime_s)
                await asyncio.sleep(retry_s)
        finally:
            conn.close()

    async def _follow(self, conn: Connection, path: str, lifetime_s: float) -> float:
        """Read one stream to its end and classify how it ended; returns the retry pause."""
        opened = time.monotonic()
        retry_s, first = DEFAULT_RETRY_S, None
        self.counts["streams_open"] += 1
        try:
            status = await conn.open_stream(path)
            if status != 200:
                await self._failed("streams_failed", f"GET {path} answered {status}", conn)
                return 0.0
            async for chunk in conn.chunks():
                if first is None:
                    first = chunk
                    found = _RETRY.search(chunk)
                    retry_s = int(found.group(1)) / 1000 if found else retry_s
        except DROPS as e:
            await self._failed("streams_failed", f"{type(e).__name__}: {e}", conn)
            return 0.0
        finally:
            self.counts["streams_open"] -= 1
        lived = time.monotonic() - opened
        if retry_s > 2 * DEFAULT_RETRY_S:
            # live.py's answer when the process holds all the streams it may:
            # one read, then the page polls.
            self._sample("streams_busy", f"refused as busy after {lived:.1f} s: {first[:80]!r}")
        elif lived < lifetime_s - LIFETIME_SLACK_S:
            self._sample("streams_dropped", f"ended after {lived:.1f} s of {lifetime_s:g}")
        else:
            self.counts["streams_renewed"] += 1
            self.stream_s.append(lived)
        return retry_s

    async def _slow_client(self, byte_every_s: float, delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        while True:
            opened = time.monotonic()
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError as e:
                self._sample("slow_failed", f"connect: {e}")
                await asyncio.sleep(FAILURE_PAUSE_S)
                continue
            self.counts["slow_opened"] += 1
            self.counts["slow_open"] += 1
            answer = asyncio.ensure_future(reader.read(4096))
            try:
                cut = await _dribble(writer, answer, byte_every_s)
            finally:
                self.counts["slow_open"] -= 1
                if answer.done() and not answer.cancelled():
                    answer.exception()  # retrieved: a reset is an outcome, not an error
                answer.cancel()
                writer.close()
            if cut is None:
                self.counts["slow_completed"] += 1
                continue
            self.counts["slow_cut"] += 1
            self.cut_s.append(time.monotonic() - opened)
            self.cut_how[cut] += 1

    # -------------------------------------------------------------- helpers

    async def _failed(self, kind: str, text: str, conn: Connection) -> None:
        self._sample(kind, text)
        conn.close()
        await asyncio.sleep(FAILURE_PAUSE_S)

    def _sample(self, kind: str, text: str) -> None:
        self.counts[kind] += 1
        kept = self.samples.setdefault(kind, [])
        if len(kept) < SAMPLES:
            kept.append(text[:300])

    def _start(self, coros) -> None:
        async def start():
            for coro in coros:
                task = asyncio.ensure_future(coro)
                self.tasks.add(task)
                task.add_done_callback(self._ended)
        self._call(start())

    def _ended(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # A bug in the holder, not the server's doing: say so in the counts.
            self._sample("holder_bugs", repr(task.exception()))

    async def _cancel_all(self) -> None:
        tasks = list(self.tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()


async def _dribble(writer: asyncio.StreamWriter, answer: asyncio.Future,
                   byte_every_s: float) -> str | None:
    """Send SLOW_HEAD a byte at a time until the server ends the connection.

    Returns:
        None when the whole head went out uncut; else how the server ended it:
        the status line it answered, "closed" or "reset".
    """
    try:
        for i in range(len(SLOW_HEAD)):
            writer.write(SLOW_HEAD[i:i + 1])
            await writer.drain()
            await asyncio.wait({answer}, timeout=byte_every_s)
            if answer.done():
                break
        else:
            return None
    except OSError:
        return "reset"
    if answer.exception() is not None:
        return "reset"
    data = answer.result()
    return data.split(b"\r\n", 1)[0].decode("latin-1") if data else "closed"


def raise_fd_limit(need: int) -> int:
    """Raise this process's open-file limit (and so the proxy's it starts) to at least `need`.

    Returns:
        The soft limit now.
    Raises:
        BenchError: the hard limit is below `need` (raise it: ulimit -Hn, as root).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= need:
        return soft
    if hard != resource.RLIM_INFINITY and hard < need:
        raise BenchError(f"{need} open files needed, the hard limit is {hard} (ulimit -Hn)")
    resource.setrlimit(resource.RLIMIT_NOFILE, (need if hard == resource.RLIM_INFINITY
                                                else hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]
