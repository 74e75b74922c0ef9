"""Hostile uploads to POST /api/v1/jobs and the browser form POST /jobs.

Every refused upload must answer a 4xx whose detail names the problem, and
leave nothing behind: no temp file, no new blob, no job row. Bodies are built
by hand so a test controls every byte a hostile client could send; limits are
small (make_config) so the bombs stay cheap.
"""
from __future__ import annotations

import hashlib
import html
import io
import os
import re
import stat
import struct
import zipfile
from pathlib import Path

import pytest
import requests

from proxy import close_app, create_app
from tests.conftest import Users, csrf_from, login
from tests.zips import HOSTILE, entry_count_only, make_zip

KiB = 1024
MiB = 1024 * KiB
BOUNDARY = "jobcloud-test-boundary"
SCRIPT = b"print('hello from jobcloud')\n"
# The limits of the `site` fixture; tests that need others ask make_site.
LIMITS = dict(max_script_bytes=4 * KiB, max_dataset_bytes=256 * KiB,
              zip_max_total_bytes=8 * MiB, zip_max_entries=20, zip_max_ratio=100)


# ------------------------------------------------------------------ bodies

def part(name: str, value: bytes | str, filename: str | None = None,
         disposition: str | None = None) -> bytes:
    """One multipart part; `disposition` replaces the whole Content-Disposition value."""
    if disposition is None:
        disposition = f'form-data; name="{name}"'
        if filename is not None:
            quoted = filename.replace("\\", "\\\\").replace('"', '\\"')
            disposition += f'; filename="{quoted}"'
    head = f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n"
    if filename is not None:
        head += "Content-Type: application/octet-stream\r\n"
    data = value.encode() if isinstance(value, str) else value
    return head.encode() + b"\r\n" + data + b"\r\n"


def multipart(*parts: bytes) -> bytes:
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


CONTENT_TYPE = f"multipart/form-data; boundary={BOUNDARY}"


def special_member(name: str, kind: int) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.external_attr = (kind | 0o777) << 16
    return info


def lie_about_size(archive: bytes, declared: int) -> bytes:
    """Rewrite the first member's uncompressed size in its local and central headers."""
    raw = bytearray(archive)
    struct.pack_into("<I", raw, raw.find(b"PK\x03\x04") + 22, declared)
    struct.pack_into("<I", raw, raw.find(b"PK\x01\x02") + 24, declared)
    return bytes(raw)


class CountingStream(io.BytesIO):
    """A request body that records how much of it the server read."""

    def __init__(self, data: bytes):
        super().__init__(data)
        self.consumed = 0

    def read(self, n=-1):
        chunk = super().read(n)
        self.consumed += len(chunk)
        return chunk


# ----------------------------------------------------------------- the site

class Site:
    """One app with its own data dir, a user with an API token, and the checks
    every refused upload must pass."""

    def __init__(self, app):
        self.app = app
        self.client = app.test_client()
        self.user = Users(app).create("alice")
        self.data_dir = Path(app.extensions["jobcloud"].config.data_dir)
        self.blobs_dir = self.data_dir / "blobs"
        self.tmp_dir = self.data_dir / "tmp"
        self.before = (set(), [])

    def remember(self) -> None:
        """Note the blobs and jobs that exist before a request that should add none."""
        self.before = self.blob_files(), self.job_ids()

    def post(self, body: bytes | io.BytesIO, content_type: str | None = CONTENT_TYPE):
        """POST exactly these bytes (the test client would re-encode an empty body)."""
        stream = body if isinstance(body, io.BytesIO) else io.BytesIO(body)
        self.remember()
        return self.client.post("/api/v1/jobs", input_stream=stream, content_type=content_type,
                                content_length=len(stream.getbuffer()),
                                headers=self.user["headers"])

    def submit(self, *parts: bytes):
        return self.post(multipart(*parts))

    def blob_files(self) -> set[Path]:
        return {p for p in self.blobs_dir.rglob("*") if p.is_file()}

    def job_ids(self) -> list[str]:
        response = self.client.get("/api/v1/jobs", headers=self.user["headers"])
        assert response.status_code == 200
        return [j["id"] for j in response.get_json()["jobs"]]

    def refused(self, response, status: int, code: str, *words: str) -> str:
        """Assert the error answer, and that the upload left nothing behind."""
        body = response.get_json()
        assert response.status_code == status, (response.status_code, body)
        assert body["error"] == code, body
        for word in words:
            assert word.lower() in body["detail"].lower(), (word, body["detail"])
        self.assert_nothing_kept()
        return body["detail"]

    def assert_nothing_kept(self) -> None:
        assert list(self.tmp_dir.iterdir()) == [], "temp files left behind"
        blobs, jobs = self.blob_files(), self.job_ids()
        assert blobs == self.before[0], f"new blobs kept: {blobs - self.before[0]}"
        assert jobs == self.before[1], "a job row was created"


@pytest.fixture
def make_site(make_config):
    made = []

    def make(**limits):
        site = Site(create_app(make_config(**{**LIMITS, **limits})))
        made.append(site)
        return site

    yield make
    for site in made:
        close_app(site.app)


@pytest.fixture
def site(make_site):
    return make_site()


def script_part(data: bytes = SCRIPT, filename: str = "train.py") -> bytes:
    return part("script", data, filename=filename)


def dataset_part(data: bytes, filename: str = "data.zip") -> bytes:
    return part("dataset", data, filename=filename)


def stored_path(site: Site, sha: str) -> Path:
    return site.blobs_dir / sha[:2] / sha


# -------------------------------------------------------------- happy paths

def test_file_script_and_dataset_are_stored_durably_by_sha256(site):
    dataset = make_zip(("train.csv", b"x,y\n1,2\n" * 100), ("img/a.bin", os.urandom(2000)))
    response = site.submit(script_part(), dataset_part(dataset), part("cpus", "2"),
                           part("memory_mb", "512"), part("timeout_s", "60"),
                           part("image", "jobcloud/ml"))
    assert response.status_code == 201, response.get_json()
    job = response.get_json()
    assert response.headers["Location"] == f"/api/v1/jobs/{job['id']}"
    assert job["state"] == "queued" and job["name"] == "train"
    assert job["image"] == "jobcloud/ml"
    assert job["resources"] == {"cpus": 2.0, "memory_mb": 512, "timeout_s": 60, "gpus": 0,
                                "disk_mb": 1024}
    assert job["script"] == {"name": "train.py", "sha256": hashlib.sha256(SCRIPT).hexdigest(),
                             "size": len(SCRIPT)}
    assert job["dataset"] == {"name": "data.zip", "sha256": hashlib.sha256(dataset).hexdigest(),
                              "size": len(dataset)}
    assert stored_path(site, job["script"]["sha256"]).read_bytes() == SCRIPT
    assert stored_path(site, job["dataset"]["sha256"]).read_bytes() == dataset
    assert site.blob_files() == {stored_path(site, job["script"]["sha256"]),
                                 stored_path(site, job["dataset"]["sha256"])}
    assert list(site.tmp_dir.iterdir()) == []
    assert site.job_ids() == [job["id"]]


def test_pasted_code_is_stored_as_main_py(site):
    code = "import sys\nprint('pasted', sys.version)\n"
    response = site.submit(part("code", code), part("name", "CNN w/ dropout 1/2"))
    assert response.status_code == 201, response.get_json()
    job = response.get_json()
    sha = hashlib.sha256(code.encode()).hexdigest()
    assert job["name"] == "CNN w/ dropout 1/2"     # free text, not a path
    assert job["script"] == {"name": "main.py", "sha256": sha, "size": len(code.encode())}
    assert job["dataset"] is None
    assert stored_path(site, sha).read_bytes() == code.encode()
    assert list(site.tmp_dir.iterdir()) == []


def test_browser_empty_file_part_means_no_file(site):
    """A browser sends an empty, nameless file part for "no file chosen"."""
    response = site.submit(part("script", b"", filename=""), part("dataset", b"", filename=""),
                           part("code", "print(1)"))
    assert response.status_code == 201, response.get_json()
    assert response.get_json()["dataset"] is None
    assert list(site.tmp_dir.iterdir()) == []


# ---------------------------------------------------- user names stay display text

@pytest.mark.parametrize("filename, shown", [
    ("../../etc/passwd.py", "passwd.py"),
    ("/etc/cron.d/evil.py", "evil.py"),
    ("C:\\Users\\me\\..\\train.py", "train.py"),
    ("..\\..\\boot.py", "boot.py"),
])
def test_script_path_is_kept_only_as_display_name(site, filename, shown):
    response = site.submit(script_part(filename=filename))
    assert response.status_code == 201, response.get_json()
    job = response.get_json()
    assert job["script"]["name"] == shown
    _assert_only_content_addressed_files(site, job, shown)


def test_rfc2231_encoded_path_is_kept_only_as_display_name(site):
    response = site.submit(part("script", SCRIPT, disposition=(
        "form-data; name=\"script\"; filename*=UTF-8''..%2F..%2Fetc%2Fpasswd.py")))
    assert response.status_code == 201, response.get_json()
    job = response.get_json()
    assert job["script"]["name"] == "passwd.py"
    _assert_only_content_addressed_files(site, job, "passwd.py")


def test_dataset_path_is_kept_only_as_display_name(site):
    dataset = make_zip(("a.txt", b"a"))
    response = site.submit(script_part(), dataset_part(dataset, filename="../../../tmp/x.zip"))
    assert response.status_code == 201, response.get_json()
    job = response.get_json()
    assert job["dataset"]["name"] == "x.zip"
    _assert_only_content_addressed_files(site, job, "x.zip")


def _assert_only_content_addressed_files(site: Site, job: dict, shown: str) -> None:
    shas = {job["script"]["sha256"]} | ({job["dataset"]["sha256"]} if job["dataset"] else set())
    assert site.blob_files() == {stored_path(site, sha) for sha in shas}
    for path in site.blob_files():
        assert re.fullmatch(r"[0-9a-f]{64}", path.name) and path.parent.name == path.name[:2]
    assert shown not in [p.name for p in site.data_dir.parent.rglob("*")]


def test_html_pages_escape_script_injection_in_names(site):
    name = "<script>alert(1)</script>"
    filename = "<img src=x onerror=alert(1)>.py"
    response = site.submit(script_part(filename=filename), part("name", name))
    assert response.status_code == 201, response.get_json()
    job = response.get_json()
    assert job["name"] == name and job["script"]["name"] == filename
    login(site.client, "alice", site.user["password"])
    for path in (f"/jobs/{job['id']}", "/job-status/alice"):
        page = site.client.get(path).get_data(as_text=True)
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page, path
        assert "<script>" not in page and "<img" not in page, path
    page = site.client.get(f"/jobs/{job['id']}").get_data(as_text=True)
    assert "&lt;img src=x onerror=alert(1)&gt;.py" in page


# ------------------------------------------------------------- hostile zips

@pytest.mark.parametrize("member", ["../x", "data/../../x", "/etc/x", "\\etc\\x", "C:\\x",
                                    "c:/windows/x", "..\\x"])
def test_zip_slip_is_refused(site, member):
    dataset = make_zip(("ok.txt", b"fine"), (member, b"escape"))
    site.refused(site.submit(script_part(), dataset_part(dataset)), 400, "zip_unsafe_path",
                 "dataset member")


def test_zip_slip_in_a_directory_entry_is_refused(site):
    dataset = make_zip((zipfile.ZipInfo("../outside/"), b""))
    site.refused(site.submit(script_part(), dataset_part(dataset)), 400, "zip_unsafe_path", "..")


def test_symlink_member_is_refused(site):
    dataset = make_zip(("ok.txt", b"fine"), (special_member("passwd", stat.S_IFLNK), b"/etc/passwd"))
    site.refused(site.submit(script_part(), dataset_part(dataset)), 400, "zip_symlink",
                 "'passwd'", "symbolic link")


def test_device_and_fifo_members_are_refused(site):
    for kind in (stat.S_IFCHR, stat.S_IFIFO):
        dataset = make_zip((special_member("dev", kind), b""))
        site.refused(site.submit(script_part(), dataset_part(dataset)), 400, "zip_special_file",
                     "not a regular file")


def test_ratio_bomb_is_refused(site):
    dataset = make_zip(("zeros.bin", b"\0" * (4 * MiB)))
    assert len(dataset) < LIMITS["max_dataset_bytes"]
    site.refused(site.submit(script_part(), dataset_part(dataset)), 400, "zip_ratio",
                 "zeros.bin", "100:1")


def test_header_that_lies_about_size_is_refused(site):
    """Declares 1000 bytes but holds 4 MiB of zeros: the check reads the real bytes (CRC)."""
    dataset = lie_about_size(make_zip(("zeros.bin", b"\0" * (4 * MiB))), 1000)
    site.refused(site.submit(script_part(), dataset_part(dataset)), 400, "invalid_zip",
                 "zeros.bin", "damaged")


def test_total_size_bomb_is_refused(make_site):
    site = make_site(zip_max_total_bytes=64 * KiB)
    # Random bytes do not compress: no member trips the ratio check, the sum does.
    dataset = make_zip(("a.bin", os.urandom(40 * KiB)), ("b.bin", os.urandom(40 * KiB)))
    site.refused(site.submit(script_part(), dataset_part(dataset)), 400, "zip_too_large",
                 "expands to", "64 KiB")


def test_many_entries_zip_is_refused(site):
    dataset = make_zip(*[(f"f{i}.txt", b"") for i in range(LIMITS["zip_max_entries"] + 1)])
    site.refused(site.submit(script_part(), dataset_part(dataset)), 400, "zip_too_many_entries",
                 "21 entries", "limit is 20")


@pytest.mark.parametrize("cut", [0.5, 0.95])
def test_truncated_zip_is_refused(site, cut):
    dataset = make_zip(("data.bin", os.urandom(20 * KiB)), ("more.bin", os.urandom(20 * KiB)))
    truncated = dataset[:int(len(dataset) * cut)]
    site.refused(site.submit(script_part(), dataset_part(truncated)), 400, "invalid_zip",
                 "not a readable zip")


def test_zip_with_corrupt_member_data_is_refused(site):
    dataset = bytearray(make_zip(("data.txt", b"hello " * 1000)))
    dataset[40:60] = b"\xff" * 20      # inside the first member's deflate stream
    site.refused(site.submit(script_part(), dataset_part(bytes(dataset))), 400, "invalid_zip",
                 "damaged", "data.txt")


@pytest.mark.parametrize("content", [b"", b"not a zip at all\n", b"PK\x03\x04" + b"\0" * 100,
                                     b"%PDF-1.7\n" + os.urandom(1000)])
def test_non_zip_with_zip_name_is_refused(site, content):
    site.refused(site.submit(script_part(), dataset_part(content, "data.zip")), 400, "invalid_zip",
                 "not a readable zip")


def test_encrypted_member_is_refused(site):
    dataset = bytearray(make_zip(("secret.txt", b"x" * 100)))
    for header, flag_offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        at = dataset.find(header) + flag_offset
        struct.pack_into("<H", dataset, at, struct.unpack_from("<H", dataset, at)[0] | 0x1)
    site.refused(site.submit(script_part(), dataset_part(bytes(dataset))), 400, "zip_encrypted",
                 "encrypted")


@pytest.mark.parametrize("name, archive, code, words", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_every_member_the_worker_would_refuse_is_refused_at_intake(site, name, archive, code,
                                                                   words):
    """The one archive rule (jobcloud_archive): a 400 naming the member and the
    reason, no blob, no job row; before it, these were 201s and failed jobs."""
    site.refused(site.submit(script_part(), dataset_part(archive)), 400, code, *words)


def test_entry_count_is_judged_from_the_end_record_before_the_directory(make_site):
    """1.5 million entries announced by a zip64 end record with no directory behind
    it: refused for the count, which is only possible if nothing was parsed first."""
    site = make_site(max_dataset_bytes=MiB)
    site.refused(site.submit(script_part(), dataset_part(entry_count_only(1_500_000))), 400,
                 "zip_too_many_entries", "1500000 entries", "limit is 20")


def test_directory_size_is_judged_from_the_end_record(site):
    """A directory bigger than the entry limit allows, whatever count the record claims."""
    archive = bytearray(make_zip(("a.txt", b"a")))
    eocd = archive.rfind(b"PK\x05\x06")
    struct.pack_into("<HH", archive, eocd + 8, 1, 1)           # one entry, as it says
    struct.pack_into("<L", archive, eocd + 12, 1 << 30)        # in a 1 GiB directory
    site.refused(site.submit(script_part(), dataset_part(bytes(archive))), 400,
                 "zip_too_many_entries", "directory is 1 GiB")


def test_overlapping_members_are_refused(site):
    """Two directory entries sharing one member's data (the non-recursive zip bomb)."""
    archive = bytearray(make_zip(("a.txt", b"x" * 100), ("b.txt", b"x" * 100)))
    second = archive.find(b"PK\x01\x02", archive.find(b"PK\x01\x02") + 4)
    struct.pack_into("<L", archive, second + 42, 0)            # b.txt's header offset -> a.txt
    site.refused(site.submit(script_part(), dataset_part(bytes(archive))), 400, "invalid_zip",
                 "local header")


# ---------------------------------------------------------- sizes (test client)

def test_oversize_script_file_is_413(site):
    site.refused(site.submit(script_part(b"#" * (4 * KiB + 1))), 413, "too_large",
                 "script", "4 KiB")


def test_oversize_pasted_code_is_413(site):
    site.refused(site.submit(part("code", "#" * (4 * KiB + 1))), 413, "too_large", "code", "4 KiB")


def test_oversize_dataset_is_413(site):
    dataset = make_zip(("r.bin", os.urandom(300 * KiB)), compression=zipfile.ZIP_STORED)
    site.refused(site.submit(script_part(), dataset_part(dataset)), 413, "too_large",
                 "dataset", "256 KiB")


def test_oversize_small_field_is_413(site):
    site.refused(site.submit(script_part(), part("name", "n" * 2000)), 413, "too_large", "'name'")


# ------------------------------------------------------------------ scripts

@pytest.mark.parametrize("content, code, words", [
    (b"", "empty_script", ["empty"]),
    (b"  \n\t\r\n  ", "empty_script", ["only whitespace"]),
    (b"print('caf\xe9')\n", "invalid_script", ["not valid utf-8"]),
    (b"\xff\xfe\x00p\x00r\x00i\x00", "invalid_script", ["binary"]),
    (b"print(1)\x00\x00ELF", "invalid_script", ["binary"]),
    (b"print('\xe2\x82')", "invalid_script", ["not valid utf-8"]),   # cut inside a character
])
def test_bad_script_file_is_refused(site, content, code, words):
    site.refused(site.submit(script_part(content)), 400, code, *words)


def test_utf8_split_across_read_chunks_is_accepted(make_site):
    from proxy.uploads import READ_CHUNK
    site = make_site(max_script_bytes=MiB)
    content = b"#" * (READ_CHUNK - 1) + "\u00e9\n".encode() + SCRIPT
    response = site.submit(script_part(content))
    assert response.status_code == 201, response.get_json()


@pytest.mark.parametrize("code, error, words", [
    ("print(1)\x00", "invalid_script", ["binary"]),
    ("   \n  ", "missing_script", ["no script"]),
])
def test_bad_pasted_code_is_refused(site, code, error, words):
    site.refused(site.submit(part("code", code)), 400, error, *words)


def test_non_utf8_pasted_code_is_refused(site):
    site.refused(site.submit(part("code", b"print('\xe9')")), 400, "invalid_encoding",
                 "'code'", "utf-8")


@pytest.mark.parametrize("filename", ["train.txt", "train.py.exe", "train", "train.pyc",
                                      "evil.sh"])
def test_script_needs_py_extension(site, filename):
    site.refused(site.submit(script_part(filename=filename)), 400, "invalid_script", ".py file")


def test_missing_script_is_refused(site):
    site.refused(site.submit(part("name", "no script"), part("cpus", "1")), 400, "missing_script",
                 "no script")


def test_file_and_pasted_code_together_are_refused(site):
    site.refused(site.submit(script_part(), part("code", "print(2)")), 400, "script_twice",
                 "either", "not both")


# ----------------------------------------------------------- other fields

@pytest.mark.parametrize("field, value, words", [
    ("cpus", "100", ["cpus", "between"]),
    ("cpus", "0", ["cpus", "between"]),
    ("cpus", "-1", ["cpus", "between"]),
    ("cpus", "abc", ["cpus", "a number"]),
    ("cpus", "NaN", ["cpus", "finite"]),
    ("cpus", "inf", ["cpus", "finite"]),
    ("cpus", "1e400", ["cpus", "finite"]),
    ("memory_mb", "1.5", ["memory_mb", "whole number"]),
    ("memory_mb", "nan", ["memory_mb", "whole number"]),
    ("memory_mb", "10", ["memory_mb", "between"]),
    ("memory_mb", "99999999999999999999999999", ["memory_mb", "between"]),
    ("timeout_s", "0", ["timeout_s", "between"]),
    ("timeout_s", "ten", ["timeout_s", "whole number"]),
    ("gpus", "-1", ["gpus", "between"]),
    ("gpus", "9", ["gpus", "between"]),
])
def test_bad_resources_are_refused(site, field, value, words):
    site.refused(site.submit(script_part(), part(field, value)), 400, "invalid_resource", *words)


def test_unknown_image_is_refused(site):
    site.refused(site.submit(script_part(), part("image", "evil/miner:latest")), 400,
                 "unknown_image", "evil/miner", "jobcloud/python")


def test_unknown_field_is_refused(site):
    site.refused(site.submit(script_part(), part("owner_id", "admin")), 400, "unknown_field",
                 "'owner_id'", "known fields")


@pytest.mark.parametrize("parts, name", [
    ([part("cpus", "1"), part("cpus", "2")], "cpus"),
    ([script_part(), script_part()], "script"),
    ([script_part(), dataset_part(make_zip(("a", b"a"))), dataset_part(make_zip(("b", b"b")))],
     "dataset"),
    ([part("code", "print(1)"), part("code", "print(2)")], "code"),
])
def test_duplicate_fields_are_refused(site, parts, name):
    site.refused(site.submit(*parts), 400, "duplicate_field", f"'{name}'", "more than once")


def test_file_where_text_is_expected_is_refused(site):
    site.refused(site.submit(script_part(), part("cpus", "2", filename="cpus.txt")), 400,
                 "invalid_field", "'cpus'", "text field")


def test_text_where_file_is_expected_is_refused(site):
    site.refused(site.submit(part("script", "print(1)")), 400, "invalid_field", "'script'",
                 "file upload")


@pytest.mark.parametrize("name", ["evil\x1b[2J", "tab\there", "new\nline", "bell\x07",
                                  "rtl\u202eyp.exe", "nul\x00byte"])
def test_job_name_with_control_characters_is_refused(site, name):
    site.refused(site.submit(script_part(), part("name", name)), 400, "invalid_name",
                 "control characters")


def test_script_filename_with_control_characters_is_refused(site):
    site.refused(site.submit(script_part(filename="a\x1b[31m.py")), 400, "invalid_name",
                 "script file name", "control characters")


def test_dataset_filename_with_control_characters_is_refused(site):
    """Checked before the files are stored: a refused name must not leave blobs behind."""
    site.refused(site.submit(script_part(), dataset_part(make_zip(("a", b"a")), "d\x1b.zip")), 400,
                 "invalid_name", "dataset file name", "control characters")


def test_overlong_dataset_filename_is_refused(site):
    site.refused(site.submit(script_part(), dataset_part(make_zip(("a", b"a")), "d" * 150 + ".zip")),
                 400, "invalid_name", "dataset file name", "100 characters")


def test_overlong_job_name_is_refused(site):
    site.refused(site.submit(script_part(), part("name", "n" * 101)), 400, "invalid_name",
                 "100 characters")


def test_non_utf8_text_field_is_refused(site):
    site.refused(site.submit(script_part(), part("name", b"caf\xe9")), 400, "invalid_encoding",
                 "'name'", "utf-8")


# --------------------------------------------------------------- the body

@pytest.mark.parametrize("content_type", [
    "application/json", "application/x-www-form-urlencoded", "text/plain", "multipart/form-data",
    "multipart/mixed; boundary=" + BOUNDARY, None,
])
def test_non_multipart_body_is_415(site, content_type):
    site.refused(site.post(b'{"code": "print(1)"}', content_type=content_type), 415,
                 "unsupported_media_type", "multipart/form-data")


def test_ten_thousand_form_parts_are_refused_early(site):
    body = multipart(*[part("name", f"n{i}") for i in range(10_000)])
    stream = CountingStream(body)
    response = site.post(stream)
    site.refused(response, 400, "duplicate_field", "'name'")
    assert stream.consumed < len(body) / 2, "the server read the whole flood before refusing"


def test_endless_part_header_is_refused_without_buffering(site):
    body = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"code\"\r\nX-Pad: ".encode()
            + b"a" * (8 * MiB))
    stream = CountingStream(body)
    response = site.post(stream)
    site.refused(response, 400, "malformed_form", "64 KiB")
    assert stream.consumed < 2 * MiB, "the server buffered the whole header"


def test_endless_preamble_is_refused_without_buffering(site):
    body = b"junk" * (2 * MiB) + multipart(script_part())
    stream = CountingStream(body)
    response = site.post(stream)
    site.refused(response, 400, "malformed_form", "64 KiB")
    assert stream.consumed < 2 * MiB, "the server buffered the whole preamble"


@pytest.mark.parametrize("body", [
    multipart(script_part())[:-30],                                     # no closing boundary
    script_part()[:-10],                                                # cut inside the part
    f"--{BOUNDARY}\r\nX-No-Disposition: 1\r\n\r\nabc\r\n--{BOUNDARY}--\r\n".encode(),
    f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"c\xe9\"\r\n\r\n".encode("latin-1"),
    b"",
])
def test_malformed_multipart_is_refused(site, body):
    site.refused(site.post(body), 400, "malformed_form", "malformed")


def test_missing_token_is_401_and_keeps_nothing(site):
    response = site.client.post("/api/v1/jobs", data=multipart(script_part()),
                                content_type=CONTENT_TYPE)
    assert response.status_code == 401
    assert response.get_json()["error"] == "unauthorized"
    site.assert_nothing_kept()


# ------------------------------------------------------------- the web form

@pytest.fixture
def browser(site):
    login(site.client, "alice", site.user["password"])
    site.csrf = csrf_from(site.client)
    return site


def form_post(site: Site, *parts: bytes, csrf: bool = True):
    """Submit the browser form; `csrf` adds the session's token as a browser does."""
    site.remember()
    if csrf:
        parts = (part("csrf_token", site.csrf), *parts)
    return site.client.post("/jobs", data=multipart(*parts), content_type=CONTENT_TYPE)


def form_error(site: Site, response, status: int, *words: str) -> str:
    assert response.status_code == status, response.get_data(as_text=True)[:500]
    page = response.get_data(as_text=True)
    found = re.search(r'<p class="error" id="error">(.*?)</p>', page, re.S)
    assert found, "no error shown on the form"
    message = html.unescape(found.group(1))
    for word in words:
        assert word.lower() in message.lower(), (word, message)
    assert 'id="job-form"' in page, "the form is shown again"
    site.assert_nothing_kept()
    return message


def test_web_form_accepts_a_job(browser):
    response = form_post(browser, script_part(), dataset_part(make_zip(("a.txt", b"a"))),
                         part("name", "<b>bold</b> run"))
    assert response.status_code == 302
    job_id = response.headers["Location"].rsplit("/", 1)[1]
    page = browser.client.get(f"/jobs/{job_id}").get_data(as_text=True)
    assert "&lt;b&gt;bold&lt;/b&gt; run" in page and "<b>bold" not in page
    assert browser.job_ids() == [job_id]


@pytest.mark.parametrize("parts, status, words", [
    ([part("code", "")], 400, ["no script"]),
    ([script_part(filename="x.sh")], 400, [".py file"]),
    ([script_part(b"#" * (5 * KiB))], 413, ["script", "4 KiB"]),
    ([script_part(), dataset_part(make_zip(("../x", b"x")))], 400, ["'../x'", "outside"]),
    ([script_part(), dataset_part(b"MZ not a zip")], 400, ["not a readable zip"]),
    ([script_part(), dataset_part(HOSTILE[0][1])], 400, ["'a\\nb.txt'", "control character"]),
    ([script_part(), part("cpus", "NaN")], 400, ["finite"]),
    ([script_part(), part("bogus", "1")], 400, ["unknown field"]),
])
def test_web_form_shows_errors(browser, parts, status, words):
    form_error(browser, form_post(browser, *parts), status, *words)


def test_web_form_escapes_the_error(browser):
    response = form_post(browser, script_part(filename="<script>x.sh"))
    assert "<script>x.sh" in form_error(browser, response, 400, ".py file")
    assert "<script>x.sh" not in response.get_data(as_text=True)


def test_web_form_without_csrf_token_is_403(browser):
    form_error(browser, form_post(browser, script_part(), csrf=False), 403, "csrf")


def test_web_form_with_wrong_csrf_token_is_403(browser):
    response = form_post(browser, part("csrf_token", "forged"), script_part(), csrf=False)
    form_error(browser, response, 403, "csrf")


def test_web_form_non_multipart_is_415(browser):
    browser.remember()
    response = browser.client.post("/jobs", data={"csrf_token": browser.csrf, "code": "print(1)"})
    form_error(browser, response, 415, "multipart/form-data")


# ------------------------------------------------------------ real gunicorn

def _chunks(body: bytes, size: int = 64 * KiB):
    for at in range(0, len(body), size):
        yield body[at:at + size]


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_refusals_on_gunicorn_are_answered_cleanly(live_server, framing):
    """The real server, with and without Content-Length: a script over the default 1 MiB
    limit gets its 413, and a form refused at its first part gets its 400, while the
    client is still sending megabytes; the answer arrives instead of a reset."""
    live_server.admin("user", "add", "x")
    token = live_server.admin("token", "create", "--user", "x")
    auth = {"Authorization": f"Bearer {token}"}
    big_script = script_part(b"#" * (2 * MiB), "big.py")
    for parts, status, code, word in [([big_script], 413, "too_large", "1 MiB"),
                                      ([part("bogus", "1"), big_script], 400, "unknown_field",
                                       "'bogus'")]:
        body = multipart(*parts)
        response = requests.post(f"{live_server.url}/api/v1/jobs", timeout=30,
                                 data=body if framing == "content-length" else _chunks(body),
                                 headers={**auth, "Content-Type": CONTENT_TYPE})
        sent_length = "Content-Length" in response.request.headers
        assert sent_length == (framing == "content-length")
        assert response.status_code == status, response.text
        assert response.json()["error"] == code and word in response.json()["detail"]
    assert list((live_server.data_dir / "tmp").iterdir()) == []
    assert [p for p in (live_server.data_dir / "blobs").rglob("*") if p.is_file()] == []
    jobs = requests.get(f"{live_server.url}/api/v1/jobs", headers=auth, timeout=10)
    assert jobs.status_code == 200 and jobs.json()["jobs"] == []
