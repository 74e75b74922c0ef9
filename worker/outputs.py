"""Collecting a job's output directory after its container has stopped.

The job owned that directory, so everything in it is hostile: symlinks are
never followed (a link to a host file yields nothing of it), only regular
files are read (opened with O_NOFOLLOW and re-checked with fstat, so a file
swapped for a link or FIFO is skipped), and the archive is bounded in size and
file count. Any tree is walked (worker/trees.py: no recursion, no path longer
than PATH_MAX, mode-000 directories): the walk empties the directory as it
goes, the job's tree being of no use once collected.

Nothing is left out silently: every file that is not in the archive is
counted by reason (REASONS), the counts go into the job's result, and the
archive holds a manifest (MANIFEST) listing them.
"""
from __future__ import annotations

import json
import os
import stat
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import jobcloud_archive

from .trees import drain_tree

CHUNK = 1024 * 1024
# Why a file is not in the archive.
SIZE_CAP = "size_cap"            # past output_max_bytes (the file, or the total with it)
FILE_CAP = "file_cap"            # past output_max_files
SPECIAL_FILE = "special_file"    # FIFO, socket, device
SYMLINK = "symlink"              # never followed
# Refused by the archive rule every unpacker applies (jobcloud_archive:
# control characters, backslash, colon, too long, not UTF-8), or clashing with
# a file already kept when letter case and Unicode form are ignored.
BAD_NAME = "bad_name"
UNREADABLE = "unreadable"        # could not be opened or read
RESERVED_NAME = "reserved_name"  # the manifest's own path
REASONS = (SIZE_CAP, FILE_CAP, SPECIAL_FILE, SYMLINK, BAD_NAME, UNREADABLE, RESERVED_NAME)
# The list of what was left out, inside the archive. Always at this path: a
# job's own file of that name is left out (RESERVED_NAME).
MANIFEST = ".jobcloud/left-out.json"
# Entries named in the manifest; past this, only counted (a job can leave out a million files).
MANIFEST_MAX = 1000
# Longest member path: the zip format allows 65,535 bytes, but no file system
# a user unpacks into takes more than 4,096, and a deeper path is left out.
MAX_PATH = 1024


@dataclass
class Collected:
    """What collection kept (`files`, `bytes`) and left out, by reason."""
    files: int = 0
    bytes: int = 0
    left_out: dict[str, int] = field(default_factory=dict)
    left_out_bytes: int = 0
    # The first MANIFEST_MAX left-out files: {"path", "reason", "size"}.
    listed: list[dict] = field(default_factory=list)

    @property
    def truncated(self) -> bool:
        return bool(self.left_out)

    def leave_out(self, rel: str | None, name: str, reason: str, size: int) -> None:
        self.left_out[reason] = self.left_out.get(reason, 0) + 1
        self.left_out_bytes += size
        if len(self.listed) < MANIFEST_MAX:
            shown = rel if rel is not None else f".../{name}"
            self.listed.append({"path": _printable(shown), "reason": reason, "size": size})

    def report(self) -> dict:
        """The result document's `outputs` part (the proxy stores and shows it)."""
        return {"files": self.files, "bytes": self.bytes,
                "left_out": sum(self.left_out.values()), "left_out_bytes": self.left_out_bytes,
                "reasons": dict(sorted(self.left_out.items()))}


def collect_outputs(output_dir: Path, archive: Path, *, max_bytes: int, max_files: int) -> Collected | None:
    """Zip the regular files under `output_dir` into `archive`, emptying `output_dir`.

    Returns:
        What was collected and left out, or None when the directory held
        nothing at all (no archive is written then).

    Raises:
        OSError: the tree could not be walked (trees.TreeError) or the archive
            not written; the caller fails the job with it.
    """
    result = Collected()
    names = _Names()
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        def visit(rel: str | None, dir_fd: int, name: str, st: os.stat_result) -> None:
            reason = _reason_to_leave_out(rel, st)
            if reason is None and not names.take(rel):
                reason = BAD_NAME
            if reason is None and result.bytes + st.st_size > max_bytes:
                reason = SIZE_CAP
            if reason is None and result.files >= max_files:
                reason = FILE_CAP
            if reason is None:
                added = _add_file(zf, rel, dir_fd, name, max_bytes - result.bytes)
                if isinstance(added, int):
                    result.files += 1
                    result.bytes += added
                    return
                reason = added
            result.leave_out(rel, name, reason, st.st_size if stat.S_ISREG(st.st_mode) else 0)

        drain_tree(output_dir, visit, max_path=MAX_PATH)
        if result.left_out:
            _write_manifest(zf, result)
    if not result.files and not result.left_out:
        archive.unlink()
        return None
    return result


def _reason_to_leave_out(rel: str | None, st: os.stat_result) -> str | None:
    if stat.S_ISLNK(st.st_mode):
        return SYMLINK
    if not stat.S_ISREG(st.st_mode):
        return SPECIAL_FILE
    if rel is None or not _portable(rel):
        return BAD_NAME
    if rel == MANIFEST:
        return RESERVED_NAME
    return None


def _portable(rel: str) -> bool:
    """A member name the fetching CLI (and the proxy's rule) takes as it is."""
    try:
        rel.encode("utf-8")  # os.scandir gives undecodable bytes as lone surrogates
        jobcloud_archive.member_parts(rel, "output")
    except (UnicodeEncodeError, jobcloud_archive.ArchiveError):
        return False
    return True


class _Names:
    """The names kept so far, by jobcloud_archive.clash_key: a file that would
    clash with one of them (same name but for case or Unicode form, or a file
    where a kept one's directory is, or the reverse) is left out, as the CLI
    would refuse the whole archive for it. Memory: one key per kept file and
    directory (at most output_max_files files)."""

    def __init__(self):
        self.files: set[bytes] = set()
        self.dirs: set[bytes] = set()

    def take(self, rel: str) -> bool:
        parts = tuple(rel.split("/"))
        key = jobcloud_archive.clash_key(parts)
        prefixes = [jobcloud_archive.clash_key(parts[:i]) for i in range(1, len(parts))]
        if key in self.files or key in self.dirs or any(p in self.files for p in prefixes):
            return False
        self.files.add(key)
        self.dirs.update(prefixes)
        return True


def _printable(name: str) -> str:
    """A name as the manifest shows it: undecodable bytes as \\xNN (JSON escapes the rest)."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def _add_file(zf: zipfile.ZipFile, rel: str, dir_fd: int, name: str, budget: int) -> int | str:
    """Add one file; returns the bytes added, or the reason it was left out."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd)
    except OSError:
        return UNREADABLE
    with os.fdopen(fd, "rb") as src:
        st = os.fstat(src.fileno())
        if not stat.S_ISREG(st.st_mode):
            return SPECIAL_FILE
        if st.st_size > budget:
            return SIZE_CAP
        info = zipfile.ZipInfo(rel, time.localtime(max(st.st_mtime, 315532800))[:6])
        info.compress_type = zipfile.ZIP_DEFLATED
        # Never the job's mode bits: no setuid, setgid or sticky bit leaves the worker.
        info.external_attr = 0o644 << 16
        written = 0
        with zf.open(info, "w", force_zip64=st.st_size > 1 << 30) as dst:
            # Read no more than fstat said: the container has stopped, so a
            # file cannot grow, but the budget must hold whatever happens.
            while written < st.st_size:
                block = src.read(min(CHUNK, st.st_size - written))
                if not block:
                    break
                written += len(block)
                dst.write(block)
    return written


def _write_manifest(zf: zipfile.ZipFile, result: Collected) -> None:
    manifest = {
        "about": "Files of the job's output directory that are not in this archive.",
        **result.report(),
        "listed": len(result.listed),
        "files_left_out": result.listed,
    }
    info = zipfile.ZipInfo(MANIFEST, time.localtime()[:6])
    info.compress_type = zipfile.ZIP_DEFLATED
    info.external_attr = 0o644 << 16
    zf.writestr(info, json.dumps(manifest, indent=1) + "\n")
