"""A job's inputs: the script and dataset streamed from the proxy, a dataset
cache keyed by sha256 (bounded, least recently used evicted), and a safe
extraction that re-checks every member of the archive. The proxy checks
datasets too; the worker never relies on that.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import stat
import threading
import uuid
import zipfile
from pathlib import Path, PurePosixPath

from .errors import InputError, UnsafeArchive

CHUNK = 1024 * 1024


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


class DatasetCache:
    """Datasets by sha256 under `root`, at most `max_bytes` in all.

    Entries in use by a running job are never evicted; the others go least
    recently used first (their mtime is touched on each use).
    """

    def __init__(self, root: Path, max_bytes: int):
        self.root = root
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._in_use: dict[str, int] = {}
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob("*.partial"):
            stale.unlink(missing_ok=True)

    def acquire(self, sha256: str, fetch) -> Path:
        """The cached file of `sha256`, fetched with `fetch(dest)` when missing.

        Call `release(sha256)` when done with it.

        Raises:
            InputError: the fetched file does not have the expected sha256.
        """
        if len(sha256) != 64 or not all(c in "0123456789abcdef" for c in sha256):
            raise InputError(f"invalid dataset sha256 {sha256!r}")
        path = self.root / f"{sha256}.zip"
        with self._lock:
            self._in_use[sha256] = self._in_use.get(sha256, 0) + 1
        try:
            if path.exists():
                os.utime(path)
                return path
            partial = self.root / f"{sha256}.{uuid.uuid4().hex}.partial"
            try:
                fetch(partial)
                actual = sha256_of(partial)
                if actual != sha256:
                    raise InputError(f"dataset sha256 mismatch: expected {sha256}, got {actual}")
                os.replace(partial, path)
            finally:
                partial.unlink(missing_ok=True)
            self._evict()
            return path
        except BaseException:
            self.release(sha256)
            raise

    def release(self, sha256: str) -> None:
        with self._lock:
            n = self._in_use.get(sha256, 0) - 1
            if n <= 0:
                self._in_use.pop(sha256, None)
            else:
                self._in_use[sha256] = n

    def _evict(self) -> None:
        with self._lock:
            entries = []
            for p in self.root.glob("*.zip"):
                try:
                    st = p.stat()
                except FileNotFoundError:
                    continue
                entries.append((st.st_mtime, st.st_size, p))
            total = sum(size for _, size, _ in entries)
            for _, size, p in sorted(entries):
                if total <= self.max_bytes:
                    break
                if p.stem in self._in_use:
                    continue
                p.unlink(missing_ok=True)
                total -= size


def extract_dataset(archive: Path, dest: Path, *, max_bytes: int, max_members: int,
                    max_ratio: float) -> int:
    """Extract a zip into `dest` (which must exist), checking every member.

    Refused: absolute paths, `..`, backslashes and drive letters, symlinks and
    other special files, more than `max_members` members, more than `max_bytes`
    uncompressed in all (counted while writing, not trusted from the headers),
    and members whose compression ratio is above `max_ratio`.

    Returns:
        The number of bytes written.

    Raises:
        UnsafeArchive: a member breaks one of the rules (nothing more is written).
        InputError: the file is not a readable zip.
    """
    try:
        zf = zipfile.ZipFile(archive)
    except (OSError, zipfile.BadZipFile) as e:
        raise InputError(f"the dataset is not a valid zip archive: {e}") from e
    written = 0
    with zf:
        members = zf.infolist()
        if len(members) > max_members:
            raise UnsafeArchive(f"the dataset has {len(members)} members (at most {max_members})")
        for info in members:
            parts = _safe_parts(info)
            target = dest.joinpath(*parts) if parts else dest
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True, mode=0o755)
                continue
            if info.compress_size and info.file_size / info.compress_size > max_ratio \
                    and info.file_size > CHUNK:
                raise UnsafeArchive(f"{info.filename}: compression ratio above {max_ratio:g}")
            target.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
            written = _write_member(zf, info, target, written, max_bytes)
    return written


def _safe_parts(info: zipfile.ZipInfo) -> tuple[str, ...]:
    name = info.filename
    # Many zip writers leave the file type bits out: only a type that is set is judged.
    kind = stat.S_IFMT(info.external_attr >> 16)
    if kind and kind not in (stat.S_IFREG, stat.S_IFDIR):
        raise UnsafeArchive(f"{name}: symlinks and special files are not allowed")
    if "\\" in name or "\x00" in name or name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise UnsafeArchive(f"{name}: absolute or non-POSIX paths are not allowed")
    parts = tuple(p for p in PurePosixPath(name).parts if p not in ("", "."))
    if ".." in parts:
        raise UnsafeArchive(f"{name}: '..' is not allowed")
    return parts


def _write_member(zf: zipfile.ZipFile, info, target: Path, written: int, max_bytes: int) -> int:
    # O_EXCL|O_NOFOLLOW: a duplicate member name cannot overwrite, nor write through a link.
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "wb") as out, zf.open(info) as src:
        for block in iter(lambda: src.read(CHUNK), b""):
            written += len(block)
            if written > max_bytes:
                raise UnsafeArchive(f"the dataset unpacks to more than {max_bytes} bytes")
            out.write(block)
    return written


def remove_tree(path: Path) -> None:
    """Remove a job directory whatever the job did to its permissions."""
    def fix_and_retry(func, p, _exc):
        try:
            os.chmod(os.path.dirname(p), 0o700)
            os.chmod(p, 0o700, follow_symlinks=False)
        except OSError:
            pass
        func(p)

    if path.exists():
        shutil.rmtree(path, onerror=fix_and_retry)
