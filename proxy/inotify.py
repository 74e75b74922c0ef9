"""A file one process touches and others wait on: Linux inotify through ctypes.

The SQLite wake-ups (wakeups.py) need "another process committed something
you may care about" pushed to every proxy process on the host. Polling a
change counter every few milliseconds costs each process a few hundredths of
a core for as long as anything waits; an inotify watch on one small file costs
nothing until it is touched. The standard library has no inotify binding and
the calls needed are two, so this is ctypes rather than a dependency.

`FileSignal.touch()` (after a commit) changes the file's times; every
`FileSignal.wait()` on that path, in any process, returns. The file is made
when missing; a watch whose file was removed or replaced is made again, and
`wait` then says it may have missed a touch.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import select
import struct

IN_ATTRIB = 0x00000004
IN_MODIFY = 0x00000002
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000
_GONE = IN_DELETE_SELF | IN_MOVE_SELF | IN_IGNORED
_EVENT = struct.Struct("iIII")   # wd, mask, cookie, len (then len bytes of name)

_libc = None


def available() -> bool:
    """Whether this system has inotify (Linux)."""
    return _load() is not None


def _load():
    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c")
        try:
            libc = ctypes.CDLL(name, use_errno=True)
            libc.inotify_init1, libc.inotify_add_watch  # noqa: B018 - present?
        except (OSError, AttributeError, TypeError):
            _libc = False
        else:
            _libc = libc
    return _libc or None


class FileSignal:
    """One signal file. `touch` from any process; `wait` in the watching one.

    Args:
        path: the file (made if missing, empty; its content never matters).
    """

    def __init__(self, path: str):
        self.path = path
        self._fd = None
        self._wd = None

    def touch(self) -> None:
        try:
            os.utime(self.path)
        except FileNotFoundError:
            self._create()

    def watch(self) -> None:
        """Start watching (before reading what the signal guards, so a touch
        after that read is never missed).

        Raises:
            OSError: inotify cannot be used here (no libc support, no watches left).
        """
        libc = _load()
        if libc is None:
            raise OSError("inotify is not available on this system")
        if self._fd is None:
            fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
            if fd < 0:
                raise OSError(ctypes.get_errno(), "inotify_init1 failed")
            self._fd = fd
        self._add_watch()

    def wait(self, timeout: float) -> bool | None:
        """Sleep until the file is touched (True), `timeout` passes (False), or
        the file was replaced and a touch may have been missed (None). Uses
        select, so under gevent's monkey-patching it only blocks the greenlet."""
        readable, _, _ = select.select([self._fd], [], [], timeout)
        if not readable:
            return False
        gone = False
        while True:
            try:
                data = os.read(self._fd, 64 * 1024)
            except BlockingIOError:
                break
            for mask in _masks(data):
                gone = gone or bool(mask & (_GONE | IN_Q_OVERFLOW))
        if gone:
            self._add_watch()
            return None
        return True

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = self._wd = None

    def _create(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600)
        os.close(fd)

    def _add_watch(self) -> None:
        if not os.path.exists(self.path):
            self._create()
        wd = _load().inotify_add_watch(self._fd, os.fsencode(self.path),
                                       IN_ATTRIB | IN_MODIFY | _GONE)
        if wd < 0:
            raise OSError(ctypes.get_errno(), f"inotify_add_watch failed on {self.path}")
        self._wd = wd


def _masks(data: bytes):
    offset = 0
    while offset + _EVENT.size <= len(data):
        _wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
        offset += _EVENT.size + length
        yield mask
