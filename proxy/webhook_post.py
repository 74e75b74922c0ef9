"""One webhook POST: to the address that was checked, within one deadline, and
failing with a reason its user may read.

The delivery thread (webhooks.Deliverer) calls `post` once per attempt. Three
things make it more than `requests.post`: the name is resolved here and the
connection goes to an address webhook_targets.py allows, so a name cannot pass
the allow-list and then resolve elsewhere (redirects are never followed
either: only the status line is read); a watchdog ends the attempt at its
deadline however slowly the receiver sends, since socket timeouts bound each
read and not the whole; and a failure is one short class ("timeout", "TLS
error") with the exception's text beside it, for the admin: the job's owner
is shown only that delivery failed (webhooks.py), since the class alone tells
which ports of an allowed host are open, filtered or closed.
"""
from __future__ import annotations

import http.client
import os
import socket
import ssl
import threading
import time
from urllib.parse import urlsplit

from .webhook_targets import address_allowed


class SendFailed(Exception):
    """Raised when a webhook POST gets no HTTP answer; `reason` classifies it for the admin."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


def post(url: str, body: bytes, headers: dict, *, allowed_hosts: tuple[str, ...],
         deadline_s: float) -> int:
    """POST `body` to `url` once, within `deadline_s` in all, and return the HTTP status.

    The host name is resolved here and the connection goes to the address that
    was checked (`reachable_address`), so a name cannot pass the allow-list and
    then resolve elsewhere. Only the status line and headers are read (their
    size is bounded by http.client: 100 lines of at most 64 KiB); a watchdog
    closes the connection at the deadline, however slowly the receiver sends.

    Raises:
        SendFailed: no address may be reached, or no HTTP answer within the deadline.
    """
    parts = urlsplit(url)
    https = parts.scheme == "https"
    port = parts.port or (443 if https else 80)
    address = reachable_address(parts.hostname, port, allowed_hosts)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    watchdog = _Watchdog(deadline_s)
    try:
        sock = socket.create_connection((address, port), timeout=deadline_s)
    except OSError as e:
        raise _failure(e, timed_out=False) from None
    response = None
    try:
        watchdog.guard(sock)
        if https:
            # Certificate and SNI for the name in the URL, not for the address.
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=parts.hostname)
        kind = http.client.HTTPSConnection if https else http.client.HTTPConnection
        connection = kind(parts.hostname, port, timeout=deadline_s)
        # Already connected to the checked address; the Host header names the URL's host.
        connection.sock = sock
        connection.request("POST", target, body=body, headers=headers)
        response = connection.getresponse()
        watchdog.disarm()
        if watchdog.fired:
            # A cut mid-headers reads as their end to http.client: not an answer.
            raise SendFailed("timeout", f"no complete answer within {deadline_s}s")
        return response.status
    except (OSError, http.client.HTTPException) as e:
        raise _failure(e, timed_out=watchdog.fired) from None
    finally:
        watchdog.disarm()
        if response is not None:
            response.close()  # the body is never read: closing drops it with the connection
        sock.close()


def reachable_address(host: str, port: int, allowed_hosts: tuple[str, ...]) -> str:
    """The first address `host` resolves to that a webhook may reach.

    Raises:
        SendFailed: the name does not resolve, or only to addresses not allowed.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as e:
        raise SendFailed("host name not resolved", str(e)) from None
    addresses = [info[4][0] for info in infos]
    for address in addresses:
        if address_allowed(address, allowed_hosts):
            return address
    raise SendFailed("address not allowed",
                     f"{host} resolves to {', '.join(addresses)}: not public, not allow-listed")


def _failure(e: Exception, timed_out: bool) -> SendFailed:
    """A failed POST's class ("connection refused", ...) and the exception's text, for the admin."""
    detail = f"{type(e).__name__}: {e}"
    if timed_out or isinstance(e, TimeoutError):
        return SendFailed("timeout", detail)
    if isinstance(e, ConnectionRefusedError):
        return SendFailed("connection refused", detail)
    if isinstance(e, ssl.SSLError):  # certificate errors included
        return SendFailed("TLS error", detail)
    if isinstance(e, http.client.HTTPException):
        return SendFailed("invalid HTTP response", detail)
    return SendFailed("connection failed", detail)


class _Watchdog:
    """Cuts a connection when an attempt's total deadline passes.

    Socket timeouts bound each read, not the attempt: a receiver sending one
    byte a second would hold the delivery thread for as long as it liked.
    shutdown() on the connection wakes the blocked read at once; it goes
    through a duplicate of the descriptor because an ssl wrap takes over the
    socket object, and under a lock so it never touches a descriptor that was
    closed and reused.
    """

    def __init__(self, deadline_s: float):
        self.fired = False
        self._ends_at = time.monotonic() + deadline_s
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._timer: threading.Timer | None = None

    def guard(self, sock: socket.socket) -> None:
        self._fd = sock.fileno()
        self._timer = threading.Timer(max(0.0, self._ends_at - time.monotonic()), self._cut)
        self._timer.daemon = True
        self._timer.start()

    def disarm(self) -> None:
        with self._lock:
            self._fd = None
        if self._timer is not None:
            self._timer.cancel()

    def _cut(self) -> None:
        with self._lock:
            if self._fd is None:
                return
            self.fired = True
            try:
                with socket.socket(fileno=os.dup(self._fd)) as dup:
                    dup.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed by the receiver: the read ends by itself
