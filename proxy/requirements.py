"""A job's requirements.txt: checked and normalised at submission.

Security first (issue 15): the worker installs a job's packages from wheels
only, downloaded on the worker's host and installed offline in a container
without network (worker/pyenv.py). A source distribution would run its
setup.py, code its author controls, so none is ever installed. This module
refuses at submission what the worker would refuse later, with a 400 naming
the line:

- only ``name[extras] specifier`` lines, ``--hash=alg:hex`` options and
  comments (``\\`` continues a line, as pip-compile --generate-hashes writes);
  no ``-e``, URLs, paths, ``-r``/``-c`` includes, ``--index-url`` or any other
  option: where packages come from is the admin's choice (package_index_url);
- environment markers are evaluated here, against the job images' Python
  (CPython 3.11 on Linux x86_64): a line whose marker is false is dropped,
  a true marker is removed, so the worker's pip never evaluates one against
  its own host;
- a requirement whose matching versions have only sdists for that Python is
  refused ("asks for X which has no wheel ..."), by asking the package index
  (PEP 691 JSON); an index that cannot be asked is a 503, never a silent
  accept. Answers are cached briefly per process.

The normalised text (one requirement a line, canonical names, sorted) is what
is stored and what the worker hashes with the image id for its cache key, so
two spellings of the same requirements share one environment.
"""
from __future__ import annotations

import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass

import requests
from packaging.markers import InvalidMarker, UndefinedComparison, UndefinedEnvironmentName
from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.tags import Tag, compatible_tags, cpython_tags
from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename
from packaging.version import InvalidVersion, Version

from .blobs import BlobStore, Upload
from .config import Config
from .errors import PackageIndexUnreachable, TooLarge, ValidationError

# The job images' interpreter (worker/images: Debian bookworm's python3 is
# 3.11, glibc 2.36); worker/pyenv.py downloads wheels for the same target.
PYTHON_VERSION = (3, 11)
PYTHON_FULL = "3.11.2"
GLIBC_MINOR = 36
PLATFORMS = ([f"manylinux_2_{m}_x86_64" for m in range(GLIBC_MINOR, 4, -1)]
             + ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"])
# What packaging's markers compare against: the job's environment, not the proxy's.
MARKER_ENV = {
    "implementation_name": "cpython", "implementation_version": PYTHON_FULL,
    "os_name": "posix", "platform_machine": "x86_64", "platform_python_implementation": "CPython",
    "platform_release": "", "platform_system": "Linux", "platform_version": "",
    "python_full_version": PYTHON_FULL, "python_version": "3.11", "sys_platform": "linux",
    "extra": "",
}
# A requirements file is a short text: hundreds of lines is already a lot.
MAX_BYTES = 64 * 1024
MAX_REQUIREMENTS = 200
HASH_ALGORITHMS = {"sha256": 64, "sha384": 96, "sha512": 128}
# How long one index answer is reused (per process): a burst of submissions
# with the same requirements asks once; a new release shows within minutes.
INDEX_CACHE_S = 300.0
INDEX_CACHE_MAX = 2048
# Short: a submission waits for it.
INDEX_TIMEOUT_S = 10.0
# The requirements of one submission are asked at once, this many at a time
# (threads; greenlets under gunicorn's gevent), within the proxy's
# package_index_check_timeout_s in all: a slow index is a 503 in seconds, not
# MAX_REQUIREMENTS answers one after another holding the request (and its
# database connection).
INDEX_CHECK_THREADS = 8
PEP691 = "application/vnd.pypi.simple.v1+json"

_HASH = re.compile(r"--hash(?:=|\s+)(\S+)")
_TAGS = frozenset([*cpython_tags(PYTHON_VERSION, abis=["cp311"], platforms=PLATFORMS),
                   *compatible_tags(PYTHON_VERSION, interpreter="cp311", platforms=PLATFORMS)])


@dataclass(frozen=True)
class Line:
    """One requirement as the job will install it (markers evaluated away)."""
    number: int          # the line it started on, for messages
    requirement: Requirement
    hashes: tuple[str, ...]

    @property
    def name(self) -> str:
        return canonicalize_name(self.requirement.name)

    def normalised(self) -> str:
        r = self.requirement
        extras = f"[{','.join(sorted(canonicalize_name(e) for e in r.extras))}]" if r.extras else ""
        spec = ",".join(sorted(str(s) for s in r.specifier))
        return " ".join([f"{self.name}{extras}{spec}", *(f"--hash={h}" for h in self.hashes)])


def normalise(raw: bytes, *, index: PackageIndex | None, deadline_s: float) -> str:
    """The normalised requirements text of a requirements.txt, after every check.

    Args:
        index: asked whether each requirement has a wheel; None skips that
            check (package_index_check off: the worker still refuses sdists).
        deadline_s: how long the index gets for all of them together.

    Returns:
        One requirement a line, sorted by name, ending with a newline; "" when
        no line applies to the job's Python (all markers false, or only comments).

    Raises:
        ValidationError: a line is not acceptable (the message names it), or
            a requirement has only sdists.
        TooLarge: more than MAX_BYTES.
        PackageIndexUnreachable: the index could not be asked, or did not
            answer for all of them within deadline_s.
    """
    lines = parse(raw)
    if index is not None:
        index.check_all(lines, deadline_s)
    return "".join(line.normalised() + "\n" for line in lines)


def parse(raw: bytes) -> list[Line]:
    """The requirements of a requirements.txt, checked line by line (no network)."""
    if len(raw) > MAX_BYTES:
        raise TooLarge(f"the requirements file is larger than {MAX_BYTES // 1024} KiB",
                       code="invalid_requirements")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise _invalid(None, "is not UTF-8 text") from None
    by_name: dict[str, Line] = {}
    for number, logical in _logical_lines(text):
        line = _parse_line(number, logical)
        if line is None:
            continue
        if line.name in by_name:
            raise _invalid(number, f"lists {line.name} again (first on line "
                                   f"{by_name[line.name].number}): give each package once")
        by_name[line.name] = line
        if len(by_name) > MAX_REQUIREMENTS:
            raise _invalid(number, f"is past the limit of {MAX_REQUIREMENTS} requirements")
    return sorted(by_name.values(), key=lambda line: line.name)


def _logical_lines(text: str):
    """(first line number, text) of each logical line: comments cut, continuations joined."""
    start, parts = None, []
    for number, physical in enumerate(text.splitlines(), 1):
        if any(c in physical for c in "\x00\r") or any(
                ord(c) < 32 and c != "\t" for c in physical):
            raise _invalid(number, "holds control characters")
        # pip's rule: '#' at the start or after whitespace begins a comment.
        physical = re.sub(r"(^|\s)#.*$", "", physical)
        start = number if start is None else start
        if physical.endswith("\\"):
            parts.append(physical[:-1])
            continue
        parts.append(physical)
        logical = " ".join(p.strip() for p in parts).strip()
        if logical:
            yield start, logical
        start, parts = None, []
    if parts and " ".join(parts).strip():
        yield start, " ".join(p.strip() for p in parts).strip()


def _parse_line(number: int, logical: str) -> Line | None:
    hashes = []
    for value in _HASH.findall(logical):
        alg, _, digest = value.partition(":")
        if HASH_ALGORITHMS.get(alg) != len(digest) or not re.fullmatch(r"[0-9a-f]+", digest):
            raise _invalid(number, f"has a malformed hash {value[:80]!r}: expected "
                                   "--hash=sha256:<64 hex digits> (or sha384, sha512)")
        hashes.append(f"{alg}:{digest}")
    rest = _HASH.sub("", logical).strip()
    if rest.startswith("-"):
        option = rest.split()[0].split("=")[0]
        raise _invalid(number, f"uses the option {option[:40]!r}: only requirements "
                               "(name[extras] specifier) and --hash=... are allowed; the package "
                               "index is the admin's (package_index_url), editable installs, "
                               "includes and other options are refused")
    if not rest:
        raise _invalid(number, "has a --hash without a requirement")
    if re.search(r"(^|\s)-", rest):
        raise _invalid(number, "has an option after the requirement: only --hash=... may follow it")
    if "://" in rest or rest.startswith((".", "/", "~")) or " @ " in f" {rest} " or "@" in rest:
        raise _invalid(number, "is a URL or a path: only packages from the package index, "
                               "by name, can be installed")
    try:
        requirement = Requirement(rest)
    except (InvalidRequirement, InvalidSpecifier, InvalidMarker) as e:
        raise _invalid(number, f"is not a requirement (name[extras] specifier): "
                               f"{str(e).splitlines()[0][:200]}") from None
    if requirement.url:
        raise _invalid(number, "is a URL: only packages from the package index can be installed")
    if requirement.marker is not None:
        try:
            applies = requirement.marker.evaluate(MARKER_ENV)
        except (UndefinedComparison, UndefinedEnvironmentName, InvalidVersion) as e:
            raise _invalid(number, f"has a marker that cannot be evaluated: {e}") from None
        if not applies:
            return None   # not for the job's Python: pip would skip it too
        requirement.marker = None
    if hashes and not _pinned(requirement.specifier):
        raise _invalid(number, "has --hash but no exact version: hashes need name==version")
    return Line(number, requirement, tuple(sorted(set(hashes))))


def _pinned(specifier: SpecifierSet) -> bool:
    return len(specifier) == 1 and next(iter(specifier)).operator in ("==", "===")


def _invalid(number: int | None, what: str) -> ValidationError:
    where = f"line {number} of the requirements file" if number else "the requirements file"
    return ValidationError(f"{where} {what}", code="invalid_requirements")


# ------------------------------------------------------------ the package index

class PackageIndex:
    """The admin's package index (PEP 691 JSON), asked which files a project
    has; answers cached for INDEX_CACHE_S. One per process (thread-safe)."""

    def __init__(self, url: str, *, timeout_s: float = INDEX_TIMEOUT_S,
                 cache_s: float = INDEX_CACHE_S):
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.cache_s = cache_s
        self._cache: dict[str, tuple[float, list[dict] | None]] = {}
        self._lock = threading.Lock()

    def check_all(self, lines: list[Line], deadline_s: float) -> None:
        """check_wheels for each line, asked concurrently, within deadline_s in all.

        Raises:
            ValidationError: as check_wheels, the first refused line's.
            PackageIndexUnreachable: as check_wheels, or some answers were
                still missing at the deadline.
        """
        if not lines:
            return
        pool = ThreadPoolExecutor(max_workers=min(INDEX_CHECK_THREADS, len(lines)),
                                  thread_name_prefix="index-check")
        try:
            asked = [pool.submit(self.check_wheels, line) for line in lines]
            _done, pending = wait(asked, timeout=deadline_s)
            if pending:
                raise PackageIndexUnreachable(
                    f"the package index ({self.url}) did not answer for the {len(lines)} "
                    f"requirements within {deadline_s:g} s (package_index_check_timeout_s); "
                    "try again later")
            for answer in asked:
                answer.result()
        finally:
            # Past the deadline the requests still out end at their own
            # timeout (timeout_s); nobody waits for them.
            pool.shutdown(wait=False, cancel_futures=True)

    def check_wheels(self, line: Line) -> None:
        """Refuse a requirement none of whose matching versions has a wheel for the job's Python.

        Raises:
            ValidationError: no such project, no matching version, or sdists only.
            PackageIndexUnreachable: the index did not answer usably.
        """
        files = self.files(line.name)
        where = f"line {line.number} of the requirements file"
        if files is None:
            raise ValidationError(f"{where} asks for {line.name}, which the package index "
                                  f"({self.url}) does not have", code="unknown_package")
        spec = line.requirement.specifier
        versions: dict[Version, list[dict]] = {}
        for f in files:
            version = _version_of(line.name, f.get("filename", ""))
            if version is not None and spec.contains(version):
                versions.setdefault(version, []).append(f)
        wanted = f"{line.name}{spec}"
        if not versions:
            raise ValidationError(f"{where} asks for {wanted}, but the package index has no "
                                  "version of it that matches", code="no_matching_version")
        if not any(_installable_wheel(f) for fs in versions.values() for f in fs):
            newest = max(versions)
            raise ValidationError(
                f"{where} asks for {wanted} which has no wheel for Python "
                f"{PYTHON_VERSION[0]}.{PYTHON_VERSION[1]} on Linux x86_64 (version {newest} is only a "
                "source distribution): jobs install wheels only, because building a source "
                "distribution runs its setup.py. Pick a version that has a wheel, or a package "
                "that ships one", code="sdist_only")

    def files(self, name: str) -> list[dict] | None:
        """The project's files (PEP 691 "files"), None when the index has no such project."""
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(name)
            if hit is not None and now - hit[0] < self.cache_s:
                return hit[1]
        files = self._fetch(name)
        with self._lock:
            if len(self._cache) >= INDEX_CACHE_MAX:
                self._cache.clear()
            self._cache[name] = (now, files)
        return files

    def _fetch(self, name: str) -> list[dict] | None:
        url = f"{self.url}/{name}/"
        try:
            r = requests.get(url, headers={"Accept": PEP691}, timeout=self.timeout_s)
        except requests.RequestException as e:
            raise PackageIndexUnreachable(
                f"the package index ({self.url}) could not be reached to check {name}: "
                f"{type(e).__name__}; try again later") from None
        if r.status_code == 404:
            return None
        try:
            if r.status_code != 200:
                raise ValueError(f"HTTP {r.status_code}")
            if not r.headers.get("Content-Type", "").startswith(PEP691):
                raise ValueError("not a PEP 691 JSON answer")
            files = r.json()["files"]
            if not isinstance(files, list):
                raise ValueError("files is not a list")
        except (ValueError, KeyError, TypeError) as e:
            raise PackageIndexUnreachable(
                f"the package index ({self.url}) gave no usable answer for {name} ({e}); "
                "try again later") from None
        return [f for f in files if isinstance(f, dict)]


def _version_of(name: str, filename: str) -> Version | None:
    """The version a distribution file carries (a wheel or an sdist), None when unreadable."""
    try:
        if filename.endswith(".whl"):
            return parse_wheel_filename(filename)[1]
        for ext in (".tar.gz", ".zip", ".tar.bz2", ".tgz"):
            if filename.endswith(ext):
                stem = filename[:-len(ext)]
                project, _, version = stem.rpartition("-")
                if canonicalize_name(project) == name:
                    return Version(version)
    except (InvalidWheelFilename, InvalidVersion, ValueError):
        return None
    return None


def _installable_wheel(f: dict) -> bool:
    """A wheel the job's Python can install: a matching tag, not yanked, Requires-Python met."""
    filename = f.get("filename", "")
    if not filename.endswith(".whl") or f.get("yanked"):
        return False
    try:
        tags: frozenset[Tag] = parse_wheel_filename(filename)[3]
    except InvalidWheelFilename:
        return False
    if not tags & _TAGS:
        return False
    requires = f.get("requires-python")
    if requires:
        try:
            return SpecifierSet(requires).contains(PYTHON_FULL, prereleases=True)
        except InvalidSpecifier:
            return True   # pip ignores an invalid Requires-Python too
    return True


_indexes: dict[str, PackageIndex] = {}
_indexes_lock = threading.Lock()


def index_for(url: str) -> PackageIndex:
    """The process's PackageIndex of `url`, made at first use: its cache is the process's."""
    with _indexes_lock:
        if url not in _indexes:
            _indexes[url] = PackageIndex(url)
        return _indexes[url]


def check_upload(upload: Upload, cfg: Config, blobs: BlobStore) -> Upload | None:
    """The normalised requirements of an uploaded requirements.txt, as a new
    finished Upload of the blob store (what is stored, and what workers hash);
    None when the file lists nothing that applies to the job's Python.

    Raises:
        as `normalise`.
    """
    upload.finish()
    raw = upload.path.read_bytes()
    text = normalise(raw, index=index_for(cfg.package_index_url) if cfg.package_index_check else None,
                     deadline_s=cfg.package_index_check_timeout_s)
    if not text:
        return None
    stored = blobs.new_upload(MAX_BYTES * 2, "the requirements file")
    stored.write(text.encode("utf-8"))
    stored.finish()
    return stored
