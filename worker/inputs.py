"""A job's inputs: the script and dataset streamed from the proxy (or from the
object store, by the claim's presigned URLs), each checked against the claim's
sha256, a dataset cache keyed by sha256 (bounded, least recently used
evicted), and a safe extraction that re-checks every member of the archive
with the rule the proxy checked it with at intake (jobcloud_archive); the
worker never relies on that.
"""
from __future__ import annotations

import hashlib
import os
import re
import threading
import uuid
from pathlib import Path

import jobcloud_archive
from jobcloud_archive import ArchiveError, Limits as ArchiveLimits

from .errors import InputError, UnsafeArchive

CHUNK = 1024 * 1024


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def fetch_input(download, source: dict, dest: Path, what: str) -> None:
    """One input of a claimed job (its script, requirements, or a parent's
    outputs: {"url", "sha256", "direct_url"?}) fetched with
    `download(url, dest, direct_url=...)` and checked against the claim's
    sha256, wherever the bytes came from (the proxy, or the object store by a
    presigned URL): bytes that do not match never reach the job. The dataset
    goes through DatasetCache.acquire, which checks it as it caches it.

    Raises:
        InputError: the bytes do not match the claim's sha256 (or it gave none).
        ProtocolError, LeaseLost, ProxyUnreachable: from `download`.
    """
    download(source["url"], dest, direct_url=source.get("direct_url"))
    # No sha256 in the claim (a proxy of another version) is a mismatch too.
    if sha256_of(dest) != source.get("sha256"):
        raise InputError(f"{what} sha256 mismatch")


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
    """Extract a zip into `dest` (which must exist) under the one archive rule
    (jobcloud_archive, the rule the proxy applied at intake): InputBudget's
    unpack with a budget of its own.

    Returns:
        The number of bytes written.

    Raises:
        as InputBudget.unpack.
    """
    return InputBudget(max_bytes, max_members, max_ratio).unpack(archive, dest, "dataset")


class InputBudget:
    """What all of one job's input archives may unpack to together: the
    worker's dataset limits (dataset_max_bytes, dataset_max_members), shared
    by the dataset and every parent's outputs. Per archive, N parents could
    each fill the limit, and the worker's data disk N times over.

    Each archive is checked against what is left; the files it wrote are
    counted once it is unpacked.
    """

    def __init__(self, max_bytes: int, max_members: int, max_ratio: float):
        self.max_bytes = max_bytes
        self.max_members = max_members
        self.max_ratio = max_ratio
        self.used_bytes = 0
        self.used_members = 0

    def unpack(self, archive: Path, dest: Path, what: str) -> int:
        """Unpack `archive` into `dest` within what is left of the budget.

        The whole directory is checked before anything is written; data is
        counted and CRC-checked while it is written, never trusted from the
        headers. Files are 0644 and directories 0755 whatever the umask: the
        job's user reads them.

        Returns:
            The number of bytes written.

        Raises:
            UnsafeArchive: a member breaks the rule (the message names the
                member, never a path of this machine).
            InputError: the file is not a readable zip, it cannot be written
                (the reason only, without the path), or it is over what is
                left of the budget after earlier archives (the message names
                the limit).
        """
        limits = ArchiveLimits(max_total_bytes=self.max_bytes - self.used_bytes,
                               max_entries=self.max_members - self.used_members,
                               max_ratio=self.max_ratio)
        try:
            written = jobcloud_archive.extract(archive, dest, limits, what=what, file_mode=0o644,
                                               dir_mode=0o755)
        except ArchiveError as e:
            raise self._refusal(e, what) from None
        except OSError as e:
            # The job's owner reads this as the failure reason: no host path in it.
            raise InputError(f"cannot unpack the {what}: {e.strerror or type(e).__name__}") from None
        self.used_bytes += written.total_bytes
        self.used_members += len(written.names)
        return written.total_bytes

    def _refusal(self, error: ArchiveError, what: str) -> InputError:
        if error.code in _OVER_LIMIT and (self.used_bytes or self.used_members):
            limit = (f"{self.max_bytes} bytes (dataset_max_bytes)" if error.code == "zip_too_large"
                     else f"{self.max_members} files (dataset_max_members)")
            return InputError(f"the {what} and the job's other inputs (its dataset and its "
                              f"parents' outputs) are over this worker's limit of {limit} "
                              "for all of them together")
        return (InputError if error.code == "invalid_zip" else UnsafeArchive)(error.message)


# What an archive too big for what is left of a budget is refused with.
_OVER_LIMIT = ("zip_too_large", "zip_too_many_entries")


# Where a job's parents' outputs are unpacked (proxy/dependencies.py), under
# its input directory: /job/input/after/<name>/, read-only like the rest.
AFTER_DIR = "after"
# The proxy names each directory (the parent's job name or id, made safe);
# the worker checks it is one plain path component all the same.
_PARENT_DIR = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def unpack_parent_outputs(parents: list, input_dir: Path, scratch: Path, download,
                          budget: InputBudget) -> None:
    """Each parent's output archive (the claim's `after`) fetched with
    `download(url, dest, direct_url=...)` (fetch_input: checked against its
    sha256) and unpacked into input_dir/after/<name>/ under the
    dataset's archive rule, all of them within the job's one `budget`; a
    parent without outputs gets an empty directory.

    Raises:
        InputError: a parent entry or its name is malformed, a download does
            not have the expected sha256, an archive is not a readable zip, or
            they are over the budget together.
        UnsafeArchive: an archive breaks the rule.
        ProtocolError, LeaseLost, ProxyUnreachable: from `download` (a parent's
            outputs expired: 410 parent_expired, and the job fails with it).
    """
    if not parents:
        return
    after = input_dir / AFTER_DIR
    after.mkdir(mode=0o755)
    os.chmod(after, 0o755)
    for n, parent in enumerate(parents):
        name = parent.get("name") if isinstance(parent, dict) else None
        if not isinstance(name, str) or not _PARENT_DIR.match(name) or (after / name).exists():
            raise InputError(f"invalid directory name for a parent's outputs: {str(name)[:80]!r}")
        dest = after / name
        dest.mkdir(mode=0o755)
        os.chmod(dest, 0o755)
        outputs = parent.get("outputs")
        if not outputs:
            continue
        archive = scratch / f"after-{n}.zip"
        try:
            fetch_input(download, outputs, archive, f"outputs of job {parent.get('id')}")
            budget.unpack(archive, dest, f"outputs of job {parent.get('id')}")
        finally:
            archive.unlink(missing_ok=True)
