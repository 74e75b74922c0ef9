"""A running job's stdout/stderr: kept up to a bound (the rest is counted
and marked truncated), shipped to the proxy in chunks by a thread, with a
tail kept for the result document.
"""
from __future__ import annotations

import codecs
import logging
import threading

from .client import WorkerClient
from .errors import LeaseLost, ProtocolError, ProxyUnreachable

log = logging.getLogger(__name__)

# One log POST carries at most this much text.
CHUNK_BYTES = 1024 * 1024


class LogStream:
    """One stream's bounded buffer. `feed` is called by the container reader
    thread, `take` by the shipper: both under one lock."""

    def __init__(self, name: str, max_bytes: int, tail_bytes: int):
        self.name = name
        self.max_bytes = max_bytes
        self.tail_bytes = tail_bytes
        self.kept = 0          # bytes of text accepted for shipping (UTF-8 encoded size)
        self.seen = 0          # bytes the job wrote, kept or not
        self.sent = 0          # byte offset of the next chunk the proxy expects
        self.truncated = False
        self._pending: list[str] = []
        self._unsent: str | None = None   # taken, its post failed: sent again as it was
        self._tail = bytearray()
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._lock = threading.Lock()

    def feed(self, data: bytes) -> None:
        with self._lock:
            self.seen += len(data)
            self._tail += data
            if len(self._tail) > 2 * self.tail_bytes:
                del self._tail[:-self.tail_bytes]
            if self.truncated:
                return
            text = self._decoder.decode(data)
            size = len(text.encode("utf-8"))
            if self.kept + size > self.max_bytes:
                text = _cut_utf8(text, self.max_bytes - self.kept)
                size = len(text.encode("utf-8"))
                self.truncated = True
            self.kept += size
            if text:
                self._pending.append(text)

    def take(self, limit: int = CHUNK_BYTES) -> tuple[int, str] | None:
        """The next chunk to send and its offset, or None; `sent_ok` confirms it."""
        with self._lock:
            if self._unsent is not None:
                # A chunk whose post failed goes again exactly as it was: the
                # proxy may have stored it (the answer lost), and it ignores a
                # chunk at an offset it has; one merged with newer text would
                # be ignored whole, losing the newer text.
                return self.sent, self._unsent
            if not self._pending:
                return None
            text = "".join(self._pending)
            chunk = _cut_utf8(text, limit)
            rest = text[len(chunk):]
            self._pending = [rest] if rest else []
            return self.sent, chunk

    def put_back(self, chunk: str) -> None:
        """`chunk` (from `take`) was not confirmed: `take` returns it again, alone."""
        with self._lock:
            self._unsent = chunk

    def sent_ok(self, chunk: str) -> None:
        with self._lock:
            self._unsent = None
            self.sent += len(chunk.encode("utf-8"))

    def tail(self) -> str:
        with self._lock:
            return bytes(self._tail[-self.tail_bytes:]).decode("utf-8", "replace")


def _cut_utf8(text: str, max_bytes: int) -> str:
    raw = text.encode("utf-8")
    if len(raw) <= max_bytes:
        return text
    return raw[:max(0, max_bytes)].decode("utf-8", "ignore")


class LogShipper(threading.Thread):
    """Posts a job's new output to the proxy every `interval` seconds until stopped."""

    def __init__(self, client: WorkerClient, job_id: str, attempt: int, streams: list[LogStream],
                 interval: float):
        super().__init__(name=f"logs-{job_id}", daemon=True)
        self.client = client
        self.job_id = job_id
        self.attempt = attempt
        self.streams = streams
        self.interval = interval
        self.lease_lost = False
        self._finished = threading.Event()

    def run(self) -> None:
        while not self._finished.wait(self.interval):
            self.flush()

    def finish(self) -> None:
        """Stop the thread and try once to send what is left; the result
        retry loop flushes again until the proxy takes it."""
        self._finished.set()
        self.join(timeout=60)
        self.flush()

    def flush(self) -> bool:
        """Returns True when everything pending was sent (or cannot ever be)."""
        for stream in self.streams:
            while not self.lease_lost:
                item = stream.take()
                if item is None:
                    break
                offset, chunk = item
                try:
                    self.client.append_log(self.job_id, self.attempt, stream.name, offset, chunk)
                except LeaseLost:
                    self.lease_lost = True
                except ProxyUnreachable as e:
                    stream.put_back(chunk)
                    log.info("job %s: logs wait for the proxy: %s", self.job_id, e)
                    return False
                except ProtocolError as e:
                    if e.status == 401:
                        # This worker is being registered again (lost, replaced):
                        # keep the chunk; the rejoin stops this job if it was requeued.
                        stream.put_back(chunk)
                        log.info("job %s: logs wait for the worker to rejoin: %s", self.job_id, e)
                        return False
                    log.warning("job %s: proxy refused a log chunk: %s", self.job_id, e)
                stream.sent_ok(chunk)
        return True
