"""Blob storage: content-addressed files under <data_dir>/blobs, written durably.

Every stored file gets a server-generated name (its sha256), so nothing a user
sends ever becomes part of a path. Writes go to <data_dir>/tmp first, are
fsync'd, then renamed into place and the directory fsync'd: after `commit`
returns, the bytes survive a crash.
"""
from __future__ import annotations

import hashlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from .errors import TooLarge


@dataclass(frozen=True)
class StoredBlob:
    """A committed blob. Its name is its sha256: one value, stored in the
    *_blob column (where it is) and the *_sha256 column (what it is)."""

    sha256: str
    size: int


class BlobStore:
    def __init__(self, data_dir: str):
        self.root = Path(data_dir).resolve()
        self.blobs = self.root / "blobs"
        self.tmp = self.root / "tmp"
        # Private whatever the umask (datadir.py sets 077 at every entry point).
        for d in (self.root, self.blobs, self.tmp):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)

    def path(self, blob: str) -> Path:
        """Path of a stored blob by its name (a sha256 hex digest)."""
        if len(blob) != 64 or any(c not in "0123456789abcdef" for c in blob):
            raise ValueError("bad blob name")
        return self.blobs / blob[:2] / blob

    def new_upload(self, limit: int, what: str) -> "Upload":
        return Upload(self, limit, what)

    def commit(self, upload: "Upload") -> StoredBlob:
        """Move a finished upload into the store durably."""
        upload.finish()
        blob = upload.sha256
        target = self.path(blob)
        target.parent.mkdir(mode=0o700, exist_ok=True)
        if target.exists():
            upload.discard()
        else:
            os.replace(upload.path, target)
            _fsync_dir(target.parent)
        upload.committed = True
        return StoredBlob(blob, upload.size)

    def remove(self, blob: str) -> int | None:
        """Delete a stored blob (retention.py decides when no job needs it).

        Returns:
            Its size, or None when it was already gone (a sweep that unlinked it
            and then failed to commit, or a file removed by hand): not an error.
        """
        path = self.path(blob)
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            return None
        return size


class Upload:
    """A file being received: counted, hashed, written to tmp; refuses to grow past `limit`."""

    def __init__(self, store: BlobStore, limit: int, what: str):
        self.store = store
        self.limit = limit
        self.what = what
        self.path = store.tmp / f"up-{secrets.token_hex(12)}"
        self.file = os.fdopen(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb")
        self.hash = hashlib.sha256()
        self.size = 0
        self.sha256 = ""
        self.committed = False

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.limit:
            raise TooLarge(f"{self.what} is larger than the limit of {human_size(self.limit)}")
        self.hash.update(data)
        self.file.write(data)

    def finish(self) -> None:
        if not self.file.closed:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            self.sha256 = self.hash.hexdigest()

    def discard(self) -> None:
        if not self.file.closed:
            self.file.close()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def human_size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:g} {unit}" if unit == "bytes" else f"{n:.4g} {unit}"
        n /= 1024
    return str(n)


