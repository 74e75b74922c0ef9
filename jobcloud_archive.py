"""Zip archives jobcloud takes in or hands out: the one rule for what an
archive and its members may be, and the reader that enforces it.

The proxy checks every dataset with it at intake (proxy/uploads.py), the
worker extracts datasets with it (worker/inputs.py) and the CLI extracts
fetched outputs with it (client/cli.py), so an archive the proxy accepts is
one the worker unpacks, and the messages are the same everywhere.

The archive is read here, not by `zipfile`, for two reasons. `zipfile` cuts a
member's name at a NUL byte before any check can see it. And it reads the
whole central directory into objects before anyone can count the entries (a
135 MB zip of 1.5 million empty members took a proxy process to 850 MB).
Here the entry count and the directory's size come from the end-of-central-
directory record (zip64 included) and are checked first; the directory is
then parsed as a stream with `struct`, keeping per member only a short key
for the name-clash check and two offsets, so checking any archive within the
limits stays within a few tens of MiB.

Standard library only, and one file outside the packages, as
jobcloud_config.py: the worker VM template copies it beside worker/
(docs/ARCHITECTURE.md, "Configuration loaders" and "One archive rule").
"""
from __future__ import annotations

import bz2
import dataclasses
import errno
import lzma
import os
import re
import stat
import struct
import unicodedata
import zlib
from array import array
from pathlib import Path

CHUNK = 256 * 1024
# Longest member name and path component, in UTF-8 bytes: 255 is Linux's
# NAME_MAX (ext4, xfs); 1024 leaves room under PATH_MAX (4096) for wherever
# the archive is unpacked (a job's /job/input/data, a user's home).
MAX_COMPONENT_BYTES = 255
MAX_PATH_BYTES = 1024
# The central directory may hold this many bytes per allowed entry: a 46-byte
# header and about 270 of name, extra fields and comment on average. Bounds
# what the name-clash check keeps in memory.
DIRECTORY_BYTES_PER_ENTRY = 320
# Members smaller than this are never called bombs by ratio: a few KiB of
# zeros compress 1000x and are harmless.
RATIO_MIN_BYTES = 1024 * 1024

# Record layouts (APPNOTE.TXT 4.3.7, 4.3.12, 4.3.14-16).
_EOCD = struct.Struct("<4s4H2LH")
_EOCD64_LOCATOR = struct.Struct("<4sLQL")
_EOCD64 = struct.Struct("<4sQ2H2L4Q")
_CENTRAL = struct.Struct("<4s4B4HL2L5H2L")
_LOCAL = struct.Struct("<4s2B4HL2L2H")
_EOCD_SIG, _EOCD64_LOCATOR_SIG, _EOCD64_SIG = b"PK\x05\x06", b"PK\x06\x07", b"PK\x06\x06"
_CENTRAL_SIG, _LOCAL_SIG = b"PK\x01\x02", b"PK\x03\x04"
_ZIP64_EXTRA = 0x0001
_FLAG_ENCRYPTED, _FLAG_DESCRIPTOR, _FLAG_UTF8 = 0x0001, 0x0008, 0x0800
_FLAG_STRONG_ENCRYPTION, _FLAG_MASKED_HEADER = 0x0040, 0x2000
STORED, DEFLATED, BZIP2, LZMA = 0, 8, 12, 14
# Unicode's control characters (category Cc: C0, DEL, C1) and its line and
# paragraph separators: a name holding one reads as two lines in a log or a
# terminal, or is cut (NUL) by whatever reads it next.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_METHODS = {STORED: "stored", DEFLATED: "deflate", BZIP2: "bzip2", LZMA: "lzma"}


class ArchiveError(Exception):
    """Raised when an archive breaks the rule.

    Args:
        code: which rule, as the proxy's API error code (`zip_unsafe_path`, ...).
        message: what is wrong, naming the member; never a host path.
    """

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


@dataclasses.dataclass(frozen=True)
class Limits:
    """How much an archive may hold; each deployable reads these from its config."""

    max_total_bytes: int
    max_entries: int
    max_ratio: float

    @property
    def max_directory_bytes(self) -> int:
        return self.max_entries * DIRECTORY_BYTES_PER_ENTRY


@dataclasses.dataclass(frozen=True)
class Member:
    """One entry of the central directory, its name already judged safe."""

    name: str                    # as stored (decoded), for messages
    raw_name: bytes
    parts: tuple[str, ...]       # the relative path it unpacks to
    is_dir: bool
    method: int
    flags: int
    crc: int
    compress_size: int
    file_size: int
    header_offset: int
    data_offset: int = -1        # known once the local header was read


@dataclasses.dataclass(frozen=True)
class Summary:
    entries: int
    total_bytes: int


@dataclasses.dataclass
class Extracted:
    names: list[str]             # the files written, in archive order
    total_bytes: int


def check(source, limits: Limits, what: str = "dataset") -> Summary:
    """Check a whole archive: its directory, every member's name and type, and
    every member's data (inflated and CRC-checked, never past its declared size).

    Args:
        source: a path or a seekable binary file.
        what: how messages call the archive ("dataset", "output archive").

    Raises:
        ArchiveError: the archive breaks the rule; nothing about it is trusted.
    """
    with _Reader(source, limits, what) as reader:
        members = reader.check_directory()
        total = 0
        for member in reader.members():
            for chunk in reader.read(member):
                total += len(chunk)
    return Summary(members, total)


def extract(source, dest: Path, limits: Limits, what: str = "dataset", *,
            replace: bool = False, file_mode: int | None = None,
            dir_mode: int | None = None) -> Extracted:
    """Unpack an archive into the directory `dest` after checking its whole directory.

    Nothing is written unless every member's name, type and declared size pass.
    Data is checked while it is written (a member holding more than it declares,
    or failing its CRC, stops the extraction). Every path is opened relative to
    `dest` without following links, so a link already inside `dest` is never
    written through.

    Args:
        replace: overwrite files already in `dest` (the CLI's fetch into an
            existing folder); otherwise a file that exists is an error.
        file_mode, dir_mode: set on what is created whatever the umask; None
            leaves the umask to decide.

    Returns:
        The files written and their bytes.

    Raises:
        ArchiveError: the archive breaks the rule, or `dest` holds a link or a
            file where the archive puts a directory.
        OSError: `dest` cannot be written (its message may name host paths:
            callers that show it to users give only its strerror).
    """
    written = Extracted([], 0)
    with _Reader(source, limits, what) as reader:
        reader.check_directory()
        os.makedirs(dest, exist_ok=True)
        root = os.open(dest, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for member in reader.members():
                parent = _open_parent(root, member, reader.what, dir_mode)
                try:
                    if member.is_dir:
                        _make_dir(parent, member.parts[-1], member, reader.what, dir_mode)
                        continue
                    written.total_bytes += _write_file(reader, member, parent, replace,
                                                       file_mode)
                    written.names.append(member.name)
                finally:
                    if parent != root:
                        os.close(parent)
        finally:
            os.close(root)
    return written


# ------------------------------------------------------------------ the name rule

def member_parts(name: str, what: str = "dataset") -> tuple[str, ...]:
    """The path components a member name unpacks to, when the name is safe.

    Refused: control characters (C0, DEL, C1, line and paragraph separators),
    backslashes, colons (drive letters, NTFS streams), absolute paths, `..`,
    names with no component, components over MAX_COMPONENT_BYTES and names
    over MAX_PATH_BYTES. Empty and `.` components are dropped (`a//b`, `./a`).

    Raises:
        ArchiveError: code `zip_unsafe_path`.
    """
    def refuse(reason: str) -> ArchiveError:
        return ArchiveError("zip_unsafe_path", f"{what} member {_shown(name)} {reason}")

    if len(name.encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES:
        raise refuse(f"has a name longer than {MAX_PATH_BYTES} bytes")
    if _CONTROL.search(name):
        raise refuse("has a control character in its name")
    if "\\" in name:
        raise refuse("has a backslash in its name (a Windows path?)")
    if ":" in name:
        raise refuse("has a colon in its name (a drive letter?)")
    if name.startswith("/"):
        raise refuse("has an absolute path")
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise refuse("points outside the archive ('..')")
    if not parts:
        raise refuse("has an empty name")
    for part in parts:
        if len(part.encode("utf-8")) > MAX_COMPONENT_BYTES:
            raise refuse(f"has a path component longer than {MAX_COMPONENT_BYTES} bytes")
    return parts


def clash_key(parts: tuple[str, ...], is_dir: bool = False) -> bytes:
    """The key two member names clash on (also used by the worker's outputs)."""
    # Case- and normalization-insensitive (as on macOS and Windows, where the
    # CLI unpacks outputs). NUL never occurs in a checked name, so it can
    # separate components; a directory's key ends with one, so once sorted a
    # file's key is followed at once by any key under it.
    folded = (unicodedata.normalize("NFC", unicodedata.normalize("NFC", p).casefold())
              for p in parts)
    return "\x00".join(folded).encode("utf-8") + (b"\x00" if is_dir else b"")


def _shown(name: str) -> str:
    return repr(name if len(name) <= 200 else name[:200] + "...")


# ---------------------------------------------------------------------- the reader

class _Reader:
    def __init__(self, source, limits: Limits, what: str):
        self.limits = limits
        self.what = what
        self._owned = not hasattr(source, "read")
        self.f = open(source, "rb") if self._owned else source
        self.count = self.cd_offset = self.cd_size = 0
        self._starts: array | None = None

    def __enter__(self) -> "_Reader":
        return self

    def __exit__(self, *exc) -> None:
        if self._owned:
            self.f.close()

    def _damaged(self, why: str) -> ArchiveError:
        return ArchiveError("invalid_zip", f"the {self.what} is damaged or not a zip archive: {why}")

    # ------------------------------------------------------------ the directory

    def check_directory(self) -> int:
        """Check the end record, then every member of the directory (names,
        types, flags, declared sizes), then name clashes and overlapping data.

        Returns:
            The number of entries.
        """
        self._locate_directory()
        keys: list[bytes] = []
        starts, ends = array("Q"), array("Q")
        declared = 0
        for member in self.members(with_data=False):
            keys.append(clash_key(member.parts, member.is_dir))
            declared += member.file_size
            if declared > self.limits.max_total_bytes:
                raise ArchiveError(
                    "zip_too_large", f"the {self.what} expands to more than the limit of "
                    f"{_size(self.limits.max_total_bytes)}")
            start = self._data_start(member)
            starts.append(start)
            ends.append(start + member.compress_size)
        self._check_clashes(keys)
        del keys
        self._check_overlaps(starts, ends)
        self._starts = starts
        return self.count

    def _locate_directory(self) -> None:
        f = self.f
        size = f.seek(0, os.SEEK_END)
        if size < _EOCD.size:
            raise ArchiveError("invalid_zip", f"the {self.what} is not a readable zip archive")
        tail_at = max(0, size - _EOCD.size - 0xFFFF)
        f.seek(tail_at)
        tail = f.read(size - tail_at)
        # The last signature whose record and comment fit in the file.
        at = tail.rfind(_EOCD_SIG)
        while at >= 0 and (at + _EOCD.size > len(tail) or
                           at + _EOCD.size + struct.unpack_from("<H", tail, at + 20)[0] > len(tail)):
            at = tail.rfind(_EOCD_SIG, 0, at)
        if at < 0:
            raise ArchiveError("invalid_zip", f"the {self.what} is not a readable zip archive")
        eocd_at = tail_at + at
        _, disk, cd_disk, disk_entries, entries, cd_size, cd_offset, _ = _EOCD.unpack_from(tail, at)
        end_of_directory = eocd_at
        locator_at = eocd_at - _EOCD64_LOCATOR.size
        if locator_at >= 0 and self._read_at(locator_at, 4) == _EOCD64_LOCATOR_SIG:
            sig, zip64_disk, zip64_at, disks = _EOCD64_LOCATOR.unpack(
                self._read_at(locator_at, _EOCD64_LOCATOR.size))
            record = self._read_at(zip64_at, _EOCD64.size) if zip64_at < locator_at else b""
            if len(record) < _EOCD64.size or record[:4] != _EOCD64_SIG or zip64_disk or disks > 1:
                raise self._damaged("its zip64 end record is missing or misplaced")
            (_, _, _, _, disk, cd_disk, disk_entries, entries, cd_size,
             cd_offset) = _EOCD64.unpack(record)
            end_of_directory = zip64_at
        if disk or cd_disk or disk_entries != entries:
            raise ArchiveError("invalid_zip", f"the {self.what} spans several disks; "
                                             "send it as one zip file")
        # Both limits are judged from the end record, before one byte of the
        # directory is read: neither a count nor a directory size can make us
        # parse more than the limits allow.
        if entries > self.limits.max_entries:
            raise ArchiveError(
                "zip_too_many_entries",
                f"the {self.what} has {entries} entries; the limit is {self.limits.max_entries}")
        if cd_size > self.limits.max_directory_bytes:
            raise ArchiveError(
                "zip_too_many_entries",
                f"the {self.what}'s directory is {_size(cd_size)}; the limit is "
                f"{_size(self.limits.max_directory_bytes)} ({DIRECTORY_BYTES_PER_ENTRY} bytes "
                "per allowed entry)")
        if cd_offset + cd_size != end_of_directory:
            # Data before the first member (a self-extractor) or a directory
            # that is not where the end record says: offsets would be guessed.
            raise self._damaged("its directory is not where its end record says")
        if cd_size < entries * _CENTRAL.size:
            raise self._damaged("its directory is smaller than its entry count needs")
        self.count, self.cd_offset, self.cd_size = entries, cd_offset, cd_size

    def members(self, with_data: bool = True):
        """Each member of the directory, in order, its name and type checked.

        Streams the directory in chunks: only one entry is in memory at a time.
        Its own file position is kept, so reading a member's data (or a local
        header) between two entries is safe.
        """
        left = self.cd_size
        buffer, at = b"", 0            # the directory bytes read, and where the next entry starts
        for index in range(self.count):
            if len(buffer) - at < _CENTRAL.size:
                buffer, at, left = self._fill(buffer, at, _CENTRAL.size, left)
            (sig, _, _, _, _, flags, method, _, _, crc, csize, usize, name_len, extra_len,
             comment_len, _, _, external, offset) = _CENTRAL.unpack_from(buffer, at)
            if sig != _CENTRAL_SIG:
                raise self._damaged(f"entry {index + 1} of its directory is not a directory entry")
            need = _CENTRAL.size + name_len + extra_len + comment_len
            if len(buffer) - at < need:
                buffer, at, left = self._fill(buffer, at, need, left)
            name_at = at + _CENTRAL.size
            raw_name = buffer[name_at:name_at + name_len]
            extra = buffer[name_at + name_len:name_at + name_len + extra_len]
            at += need
            usize, csize, offset = self._zip64_sizes(extra, usize, csize, offset)
            data_offset = self._starts[index] if with_data and self._starts is not None else -1
            yield self._member(raw_name, flags, method, crc, csize, usize, offset, external,
                               data_offset)
        if at != len(buffer) or left:
            raise self._damaged("its directory is longer than its entries")

    def _fill(self, buffer: bytes, at: int, need: int, left: int) -> tuple[bytes, int, int]:
        """The unread part of `buffer` with at least `need` bytes more of the directory."""
        rest = buffer[at:]
        want = max(need - len(rest), min(CHUNK, left))
        if want > left:
            raise self._damaged("its directory ends inside an entry")
        more = self._read_at(self.cd_offset + self.cd_size - left, want)
        if len(more) != want:
            raise self._damaged("the file ends inside its directory")
        return rest + more, 0, left - want

    def _zip64_sizes(self, extra: bytes, usize: int, csize: int, offset: int):
        if 0xFFFFFFFF not in (usize, csize, offset):
            return usize, csize, offset
        at = 0
        while at + 4 <= len(extra):
            kind, length = struct.unpack_from("<2H", extra, at)
            if kind == _ZIP64_EXTRA:
                values = extra[at + 4:at + 4 + length]
                fields = []
                for value in (usize, csize, offset):
                    if value == 0xFFFFFFFF:
                        if len(values) < 8:
                            raise self._damaged("a zip64 extra field is too short")
                        value, values = struct.unpack_from("<Q", values)[0], values[8:]
                    fields.append(value)
                return tuple(fields)
            at += 4 + length
        raise self._damaged("a member's zip64 sizes are missing")

    def _member(self, raw_name: bytes, flags: int, method: int, crc: int, csize: int,
                usize: int, offset: int, external: int, data_offset: int) -> Member:
        # The raw bytes, not zipfile's name: zipfile cuts a name at its first NUL.
        if flags & _FLAG_UTF8:
            try:
                name = raw_name.decode("utf-8")
            except UnicodeDecodeError:
                raise ArchiveError("zip_unsafe_path", f"{self.what} member "
                                  f"{_shown(raw_name.decode('utf-8', 'replace'))} has a name "
                                  "that is not valid UTF-8") from None
        else:
            name = raw_name.decode("cp437")      # what zip writers without the UTF-8 flag mean
        parts = member_parts(name, self.what)
        shown = f"{self.what} member {_shown(name)}"
        is_dir = name.endswith("/")
        kind = stat.S_IFMT(external >> 16)
        # Many zip writers leave the type bits out: only a type that is set is judged.
        if kind == stat.S_IFLNK:
            raise ArchiveError("zip_symlink", f"{shown} is a symbolic link")
        if kind and kind not in (stat.S_IFREG, stat.S_IFDIR):
            raise ArchiveError("zip_special_file", f"{shown} is not a regular file or directory")
        if kind and (kind == stat.S_IFDIR) != is_dir:
            raise ArchiveError("zip_special_file", f"{shown} has a type that does not match its "
                                                  "name (a directory's name ends in '/')")
        if flags & (_FLAG_ENCRYPTED | _FLAG_STRONG_ENCRYPTION | _FLAG_MASKED_HEADER):
            raise ArchiveError("zip_encrypted", f"{shown} is encrypted")
        if method not in _METHODS:
            raise ArchiveError("zip_unsupported", f"{shown} uses compression method {method}; "
                              f"use one of {', '.join(_METHODS.values())}")
        if is_dir and usize:
            raise self._damaged(f"directory {_shown(name)} declares {usize} bytes of data")
        if method == STORED and usize != csize:
            raise self._damaged(f"member {_shown(name)} is stored but declares two sizes")
        if usize >= RATIO_MIN_BYTES and usize > self.limits.max_ratio * max(csize, 1):
            raise ArchiveError("zip_ratio", f"{shown} has a compression ratio above "
                                           f"{self.limits.max_ratio:g}:1 (a zip bomb?)")
        return Member(name, raw_name, parts, is_dir, method, flags, crc, csize, usize, offset,
                      data_offset)

    def _data_start(self, member: Member) -> int:
        """Where the member's data begins, after checking its local header agrees."""
        if member.header_offset + _LOCAL.size > self.cd_offset:
            raise self._damaged(f"member {_shown(member.name)} starts inside the directory")
        header = self._read_at(member.header_offset, _LOCAL.size)
        (sig, _, _, flags, method, _, _, crc, csize, usize, name_len,
         extra_len) = _LOCAL.unpack(header)
        raw_name = self._read_at(member.header_offset + _LOCAL.size, name_len)
        if sig != _LOCAL_SIG or method != member.method or raw_name != member.raw_name:
            raise self._damaged(f"member {_shown(member.name)}'s local header does not match "
                                "the directory")
        if not flags & _FLAG_DESCRIPTOR and (crc, csize, usize) != (0, 0, 0) and \
                crc != member.crc:
            raise self._damaged(f"member {_shown(member.name)}'s headers disagree about its CRC")
        start = member.header_offset + _LOCAL.size + name_len + extra_len
        if start + member.compress_size > self.cd_offset:
            raise self._damaged(f"member {_shown(member.name)}'s data runs into the directory")
        return start

    def _check_clashes(self, keys: list[bytes]) -> None:
        order = sorted(range(len(keys)), key=keys.__getitem__)
        for a, b in zip(order, order[1:]):
            first, second = keys[a], keys[b]
            if first == second or (not first.endswith(b"\x00") and second.startswith(first + b"\x00")):
                self._name_clash(min(a, b), max(a, b), first == second)

    def _name_clash(self, i: int, j: int, same: bool):
        names = {}
        for index, member in enumerate(self.members(with_data=False)):
            if index in (i, j):
                names[index] = member
            if index >= j:
                break
        one, other = names[i], names[j]
        if one.parts == other.parts and one.is_dir == other.is_dir:
            reason = "appears twice"
        elif same and one.is_dir == other.is_dir:
            reason = (f"has the same name as {_shown(one.name)} apart from letter case or "
                      "Unicode form (one would overwrite the other on macOS and Windows)")
        else:
            file, folder = (one, other) if not one.is_dir and len(one.parts) <= len(other.parts) \
                else (other, one)
            raise ArchiveError("zip_name_clash", f"{self.what} member {_shown(file.name)} is a "
                              f"file, and {_shown(folder.name)} needs a directory at that path")
        raise ArchiveError("zip_name_clash", f"{self.what} member {_shown(other.name)} {reason}")

    def _check_overlaps(self, starts: array, ends: array) -> None:
        # Members whose data overlap are the non-recursive zip bomb (one
        # compressed stream counted by many members); no zip writer makes them.
        order = sorted(range(len(starts)), key=starts.__getitem__)
        for a, b in zip(order, order[1:]):
            if ends[a] > starts[b] - _LOCAL.size:
                raise self._damaged("two members share the same data (an overlapping zip bomb?)")

    # ------------------------------------------------------------------- the data

    def read(self, member: Member):
        """The member's bytes, in chunks of at most CHUNK.

        Raises:
            ArchiveError: the data holds more or less than declared, fails its
                CRC, or does not decompress.
        """
        if member.is_dir:
            return
        if member.data_offset < 0:
            raise ValueError("read() needs a member from members() after check_directory()")
        inflate = _decompressor(member.method)
        produced, crc = 0, 0
        try:
            left = member.compress_size
            while left:
                raw = self._read_at(member.data_offset + member.compress_size - left,
                                    min(CHUNK, left))
                if not raw:
                    raise self._damaged(f"member {_shown(member.name)} is cut short")
                left -= len(raw)
                for chunk in inflate(raw):
                    produced += len(chunk)
                    if produced > member.file_size:
                        raise self._damaged(
                            f"member {_shown(member.name)} holds more than the "
                            f"{member.file_size} bytes its header declares")
                    crc = zlib.crc32(chunk, crc)
                    yield chunk
            for chunk in inflate(None):
                produced += len(chunk)
                if produced > member.file_size:
                    raise self._damaged(f"member {_shown(member.name)} holds more than the "
                                        f"{member.file_size} bytes its header declares")
                crc = zlib.crc32(chunk, crc)
                yield chunk
        except (zlib.error, EOFError, lzma.LZMAError, OSError, ValueError) as e:
            if isinstance(e, OSError) and e.errno is not None:
                raise                    # reading the file failed: not the archive's fault
            # bz2 reports a corrupt stream as an OSError without an errno.
            raise self._damaged(f"member {_shown(member.name)} does not decompress") from None
        if produced != member.file_size:
            raise self._damaged(f"member {_shown(member.name)} holds {produced} bytes, not the "
                                f"{member.file_size} its header declares")
        if crc != member.crc:
            raise self._damaged(f"member {_shown(member.name)} fails its CRC check")

    def _read_at(self, offset: int, n: int) -> bytes:
        self.f.seek(offset)
        return self.f.read(n)


def _decompressor(method: int):
    """A function: raw bytes -> chunks of at most CHUNK; None flushes (end of data)."""
    if method == STORED:
        def stored(raw):
            if raw:
                yield raw
        return stored
    if method == DEFLATED:
        d = zlib.decompressobj(-15)

        def deflate(raw):
            if raw is None:
                if not d.eof:
                    raise zlib.error("the deflate stream ends early")
                return
            while raw:
                # max_length: a 256 KiB chunk of a bomb must not inflate at once.
                out = d.decompress(raw, CHUNK)
                raw = d.unconsumed_tail
                if out:
                    yield out
                if d.eof:
                    return
                if not raw and len(out) == CHUNK:
                    raw = b""
                    while True:
                        out = d.decompress(b"", CHUNK)
                        if out:
                            yield out
                        if len(out) < CHUNK or d.eof:
                            break
        return deflate
    if method == BZIP2:
        return _buffered(bz2.BZ2Decompressor())
    return _lzma()


def _buffered(d, skip: int = 0):
    def feed(raw):
        if raw is None:
            if not d.eof:
                raise EOFError("the stream ends early")
            return
        if d.eof:
            return
        out = d.decompress(raw, CHUNK)
        while True:
            if out:
                yield out
            if d.eof or d.needs_input:
                return
            out = d.decompress(b"", CHUNK)
    return feed


def _lzma():
    # A zip's LZMA member starts with a 4-byte header (version, properties
    # size) and 5 bytes of LZMA1 properties (APPNOTE 5.8.8).
    state = {"head": b"", "feed": None}

    def feed(raw):
        if state["feed"] is None:
            if raw is None:
                raise EOFError("the stream ends early")
            state["head"] += raw
            if len(state["head"]) < 9:
                return
            head = state["head"]
            props_size = struct.unpack_from("<H", head, 2)[0]
            if props_size != 5:
                raise lzma.LZMAError("unexpected LZMA properties")
            d = head[4]
            filters = [{"id": lzma.FILTER_LZMA1, "pb": d // 45, "lp": d % 45 // 9, "lc": d % 9,
                        "dict_size": struct.unpack_from("<I", head, 5)[0]}]
            state["feed"] = _buffered(lzma.LZMADecompressor(lzma.FORMAT_RAW, filters=filters))
            raw = head[9:]
        yield from state["feed"](raw)
    return feed


def _write_file(reader: _Reader, member: Member, parent: int, replace: bool,
                file_mode: int | None) -> int:
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | (os.O_TRUNC if replace else os.O_EXCL)
    try:
        fd = os.open(member.parts[-1], flags, 0o666 if file_mode is None else file_mode,
                     dir_fd=parent)
    except OSError as e:
        raise _destination_error(e, member, reader.what) from None
    with os.fdopen(fd, "wb") as out:
        if file_mode is not None:
            os.fchmod(fd, file_mode)
        for chunk in reader.read(member):
            out.write(chunk)
    return member.file_size


def _open_parent(root: int, member: Member, what: str, dir_mode: int | None) -> int:
    """An fd of the member's parent directory, made as needed, never through a link."""
    fd = root
    try:
        for part in member.parts[:-1]:
            _make_dir(fd, part, member, what, dir_mode)
            try:
                child = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            except OSError as e:
                raise _destination_error(e, member, what) from None
            if fd != root:
                os.close(fd)
            fd = child
    except BaseException:
        if fd != root:
            os.close(fd)
        raise
    return fd


def _make_dir(parent: int, name: str, member: Member, what: str, mode: int | None) -> None:
    try:
        os.mkdir(name, 0o777 if mode is None else mode, dir_fd=parent)
    except FileExistsError:
        st = os.stat(name, dir_fd=parent, follow_symlinks=False)
        if not stat.S_ISDIR(st.st_mode):
            raise ArchiveError("zip_unsafe_destination", f"{what} member {_shown(member.name)}: "
                               f"{name!r} in the destination is not a directory (a link?)") from None
        return
    if mode is not None:
        # mkdir's mode passes through the umask; the caller's mode must not.
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=parent)
        try:
            os.fchmod(fd, mode)
        finally:
            os.close(fd)


def _destination_error(e: OSError, member: Member, what: str) -> Exception:
    if e.errno in (errno.ELOOP, errno.ENOTDIR, errno.EEXIST, errno.EISDIR):
        return ArchiveError("zip_unsafe_destination", f"{what} member {_shown(member.name)}: "
                            "the destination already holds a link, a file or a directory there")
    return e


def _size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:g} {unit}" if unit == "bytes" else f"{n:.4g} {unit}"
        n /= 1024
    return f"{n:.4g} GiB"
