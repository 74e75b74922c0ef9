"""Blob storage: where scripts, datasets and output archives are kept.

Two backends behind one interface, chosen by `blob_url` (open_blob_store):

- BlobStore (here, the default): content-addressed files under
  <data_dir>/blobs. Every stored file gets a server-generated name (its
  sha256), so nothing a user sends ever becomes part of a path. Writes go to
  <data_dir>/tmp first, are fsync'd, then renamed into place and the
  directory fsync'd: after `commit` returns, the bytes survive a crash.
- S3BlobStore (proxy/s3blobs.py): objects in an S3-compatible store, so
  proxies on several hosts share no directory and workers move bytes with
  presigned URLs.

Either way an upload is first received into an `Upload` (a file under
<data_dir>/tmp, counted and hashed; the checks read it there), then
`prepare` (outside any lock: the S3 store finishes its upload here, which
may take seconds) and `commit` (under the blob lock, in the transaction that
writes the job row: retention.hold_blobs) put it where it stays. The blob's
*name* (the *_blob column: where it is) and its *sha256* (the *_sha256
column: what it is) are the same for files; the S3 store names objects at
random (see s3blobs.py for why).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from .errors import TooLarge


@dataclass(frozen=True)
class StoredBlob:
    """A committed blob: what it is (sha256, size) and where (name; the
    sha256 itself when not given, as for the file store)."""

    sha256: str
    size: int
    name: str = ""

    def __post_init__(self):
        if not self.name:
            object.__setattr__(self, "name", self.sha256)


def open_blob_store(cfg) -> "BlobStore":
    """The blob store the configuration names (proxy.config.Config)."""
    if cfg.blob_url:
        from .s3blobs import S3BlobStore

        return S3BlobStore.from_config(cfg)
    return BlobStore(cfg.data_dir)


def is_blob_name(name: str) -> bool:
    return len(name) == 64 and all(c in "0123456789abcdef" for c in name)


class BlobStore:
    """Content-addressed files under <data_dir>/blobs (the default backend)."""

    # Workers move this store's bytes through the proxy (no presigned URLs).
    direct = False
    kind = "local"

    def __init__(self, data_dir: str):
        self.root = Path(data_dir).resolve()
        self.blobs = self.root / "blobs"
        self.tmp = self.root / "tmp"
        # Private whatever the umask (datadir.py sets 077 at every entry point).
        for d in (self.root, self.blobs, self.tmp):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)

    def path(self, blob: str) -> Path:
        """Path of a stored blob by its name (a sha256 hex digest)."""
        if not is_blob_name(blob):
            raise ValueError("bad blob name")
        return self.blobs / blob[:2] / blob

    def new_upload(self, limit: int, what: str) -> "Upload":
        return Upload(self, limit, what)

    def prepare(self, upload: "Upload") -> None:
        """Before the blob lock: make the received bytes durable where they are."""
        upload.finish()

    def commit(self, upload: "Upload") -> StoredBlob:
        """Under the blob lock: move a finished upload into the store durably."""
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

    def exists(self, blob: str) -> bool:
        return self.path(blob).exists()

    @contextlib.contextmanager
    def open(self, blob: str):
        """A stored blob as a seekable binary file (zipfile reads archives this way).

        Raises:
            FileNotFoundError: it is not stored (any more).
        """
        with open(self.path(blob), "rb") as f:
            yield f


class Upload:
    """A file being received: counted, hashed, written to tmp; refuses to grow past `limit`."""

    def __init__(self, store, limit: int, what: str, *, durable: bool = True, sink=None):
        """
        Args:
            store: the blob store it is for (its tmp directory holds the file).
            durable: fsync the file at finish (the file store renames it into
                place; a store that copies it elsewhere does not need it).
            sink: also given every chunk as it arrives (s3blobs streams it on
                to the store while the rest is received), with `close()` at
                finish and `abort()` at discard.
        """
        self.store = store
        self.limit = limit
        self.what = what
        self.durable = durable
        self.sink = sink
        self.path = store.tmp / f"up-{secrets.token_hex(12)}"
        self.file = os.fdopen(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb")
        self.hash = hashlib.sha256()
        self.size = 0
        self.sha256 = ""
        self.committed = False
        # Set by a store that put the bytes somewhere else (s3blobs.prepare).
        self.stored: StoredBlob | None = None
        # Set once the transaction that refers to it has committed: discard
        # must then leave the stored copy alone.
        self.kept = False

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.limit:
            raise TooLarge(f"{self.what} is larger than the limit of {human_size(self.limit)}")
        self.hash.update(data)
        self.file.write(data)
        if self.sink is not None:
            self.sink.write(data)

    def finish(self) -> None:
        if not self.file.closed:
            self.file.flush()
            if self.durable:
                os.fsync(self.file.fileno())
            self.file.close()
            self.sha256 = self.hash.hexdigest()

    def discard(self) -> None:
        """Remove the received file; a copy stored elsewhere that no committed
        row refers to (a refused submission) goes too."""
        if not self.file.closed:
            self.file.close()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        if self.sink is not None and self.stored is None:
            self.sink.abort()
        if self.stored is not None and not self.kept:
            self.store.forget(self.stored.name)


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


