"""The archive reader itself (jobcloud_archive): whatever bytes it is given, it
answers with the archive or an ArchiveError, never another exception (which
the proxy would answer as a 500 and the worker as a crashed job thread)."""
from __future__ import annotations

import io
import random
import zipfile

import pytest

import jobcloud_archive
from jobcloud_archive import ArchiveError, Limits

LIMITS = Limits(max_total_bytes=1 << 20, max_entries=50, max_ratio=200)


def _archive(method: int, zip64: bool = False) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method) as zf:
        zf.writestr("a/b.txt", b"hello world " * 50)
        zf.writestr("c/", b"")
        with zf.open("d.bin", "w", force_zip64=zip64) as f:
            f.write(bytes(range(256)) * 4)
    return buf.getvalue()


@pytest.mark.parametrize("method, zip64", [(zipfile.ZIP_STORED, False),
                                           (zipfile.ZIP_DEFLATED, True),
                                           (zipfile.ZIP_BZIP2, False),
                                           (zipfile.ZIP_LZMA, False)])
def test_mutated_archives_are_read_or_refused_never_crash(tmp_path, method, zip64):
    base = _archive(method, zip64)
    assert jobcloud_archive.check(io.BytesIO(base), LIMITS).entries == 3
    rng = random.Random(13)
    for i in range(500):
        data = bytearray(base)
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(len(data))
            if rng.random() < 0.7:
                data[at] = rng.randrange(256)
            else:
                del data[at:at + rng.randint(1, 16)]
        try:
            jobcloud_archive.extract(io.BytesIO(bytes(data)), tmp_path / str(i), LIMITS)
        except ArchiveError:
            pass


def test_a_good_archive_is_extracted_with_the_modes_asked(tmp_path):
    archive = _archive(zipfile.ZIP_DEFLATED)
    done = jobcloud_archive.extract(io.BytesIO(archive), tmp_path / "out", LIMITS,
                                    file_mode=0o640, dir_mode=0o750)
    assert done.names == ["a/b.txt", "d.bin"] and done.total_bytes == 600 + 1024
    assert (tmp_path / "out" / "a" / "b.txt").read_bytes() == b"hello world " * 50
    assert (tmp_path / "out" / "d.bin").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "out" / "c").stat().st_mode & 0o777 == 0o750
