"""Hostile zip archives, built by hand, shared by the tests of the three places
that read archives: the proxy at intake (test_uploads.py), the worker at
extraction (test_worker_units.py) and the CLI at fetch (test_client_cli.py).
Each must refuse every one of them, with the same code and reason: there is
one archive rule (jobcloud_archive.py).
"""
from __future__ import annotations

import io
import struct
import warnings
import zipfile


def make_zip(*members, compression=zipfile.ZIP_DEFLATED) -> bytes:
    """A zip of (name or ZipInfo, data) members; duplicates allowed."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # zipfile warns on a duplicate name
        with zipfile.ZipFile(buf, "w", compression) as zf:
            for name, data in members:
                if isinstance(name, zipfile.ZipInfo):
                    name.compress_type = compression
                zf.writestr(name, data)
    return buf.getvalue()


def with_raw_name(archive: bytes, placeholder: bytes, raw: bytes) -> bytes:
    """Replace a name's bytes in the local and central headers (same length):
    how a NUL gets into a stored name, which zipfile itself cannot write."""
    assert len(placeholder) == len(raw) and archive.count(placeholder) == 2
    return archive.replace(placeholder, raw)


def entry_count_only(entries: int) -> bytes:
    """A zip64 end record announcing `entries` members and a directory of the
    matching size, with no directory at all: only a reader that judges the end
    record before parsing refuses it for its count rather than as damaged."""
    cd_size = entries * 56
    eocd64 = struct.pack("<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, entries, entries,
                         cd_size, 0)
    locator = struct.pack("<4sLQL", b"PK\x06\x07", 0, 0, 1)
    eocd = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF,
                       0xFFFFFFFF, 0)
    return eocd64 + locator + eocd


# (id, archive, code, words the message must hold). Every message names the
# member; none names a path of the machine that read it.
HOSTILE = [
    ("newline", make_zip(("ok.txt", b"ok"), ("a\nb.txt", b"x")), "zip_unsafe_path",
     ["'a\\nb.txt'", "control character"]),
    ("escape", make_zip(("evil\x1b[2J.txt", b"x")), "zip_unsafe_path", ["control character"]),
    ("nul", with_raw_name(make_zip(("ok.txt", b"ok"), ("a.txtXsecret", b"x")), b"a.txtXsecret",
                          b"a.txt\x00secret"), "zip_unsafe_path",
     ["'a.txt\\x00secret'", "control character"]),
    ("backslash", make_zip(("dir\\file.txt", b"x")), "zip_unsafe_path",
     ["'dir\\\\file.txt'", "backslash"]),
    ("colon", make_zip(("1:x.txt", b"x")), "zip_unsafe_path", ["'1:x.txt'", "colon"]),
    ("drive", make_zip(("C:/x.txt", b"x")), "zip_unsafe_path", ["colon"]),
    ("absolute", make_zip(("/etc/x", b"x")), "zip_unsafe_path", ["absolute"]),
    ("dotdot", make_zip(("a/../../x", b"x")), "zip_unsafe_path", ["outside"]),
    ("duplicate", make_zip(("a.txt", b"1"), ("a.txt", b"2")), "zip_name_clash",
     ["'a.txt'", "twice"]),
    ("file-and-dir", make_zip(("a", b"file"), ("a/b", b"under it")), "zip_name_clash",
     ["'a'", "'a/b'", "directory"]),
    ("file-and-dir-entry", make_zip(("a", b"file"), (zipfile.ZipInfo("a/"), b"")),
     "zip_name_clash", ["'a'", "directory"]),
    ("case", make_zip(("Data.csv", b"1"), ("data.csv", b"2")), "zip_name_clash",
     ["letter case"]),
    ("long-component", make_zip(("d" * 256, b"x")), "zip_unsafe_path", ["longer than 255"]),
    ("long-path", make_zip(("/".join(["d" * 200] * 6), b"x")), "zip_unsafe_path",
     ["longer than 1024"]),
]
