"""Collecting a job's output directory after its container has stopped.

The job owned that directory, so everything in it is hostile: symlinks are
never followed (a link to a host file yields nothing of it), only regular
files are read (opened with O_NOFOLLOW and re-checked with fstat, so a file
swapped for a link or FIFO is skipped), and the archive is bounded in size and
file count.
"""
from __future__ import annotations

import os
import stat
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

CHUNK = 1024 * 1024


@dataclass
class Collected:
    files: int = 0
    bytes: int = 0
    skipped: list[str] = field(default_factory=list)
    truncated: bool = False


def collect_outputs(output_dir: Path, archive: Path, *, max_bytes: int, max_files: int) -> Collected | None:
    """Zip the regular files under `output_dir` into `archive`.

    Returns:
        What was collected, or None when the directory holds no regular file
        (no archive is written then).
    """
    result = Collected()
    entries = list(_walk(output_dir, "", result))
    if not entries:
        return None
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for rel, path, size in entries:
            if result.files >= max_files or result.bytes + size > max_bytes:
                result.truncated = True
                result.skipped.append(rel)
                continue
            added = _add_file(zf, rel, path, max_bytes - result.bytes)
            if added is None:
                result.skipped.append(rel)
                continue
            result.files += 1
            result.bytes += added
    return result


def _walk(directory: Path, prefix: str, result: Collected):
    try:
        with os.scandir(directory) as it:
            items = sorted(it, key=lambda e: e.name)
    except OSError:
        return
    for entry in items:
        rel = f"{prefix}{entry.name}"
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode):
            yield from _walk(Path(entry.path), rel + "/", result)
        elif stat.S_ISREG(st.st_mode):
            yield rel, Path(entry.path), st.st_size
        else:
            result.skipped.append(rel)  # symlinks, FIFOs, sockets, devices


def _add_file(zf: zipfile.ZipFile, rel: str, path: Path, budget: int) -> int | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as src:
        st = os.fstat(src.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_size > budget:
            return None
        written = 0
        info = zipfile.ZipInfo(rel, time.localtime(max(st.st_mtime, 315532800))[:6])
        info.compress_type = zipfile.ZIP_DEFLATED
        info.external_attr = 0o644 << 16
        with zf.open(info, "w", force_zip64=st.st_size > 1 << 30) as dst:
            for block in iter(lambda: src.read(CHUNK), b""):
                written += len(block)
                if written > budget:
                    break
                dst.write(block)
    return written
