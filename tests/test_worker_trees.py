"""Any tree a job can leave: removed and collected without recursion, past
PATH_MAX, through mode-000 directories, read-only files and names no archive
can hold; and every file left out of the archive is counted and listed.

Real files on the test machine's disk, no Docker: these are the worker's own
functions on the trees a hostile job makes. The tree sizes are test-sized
(1,100 levels of 40-character names: past Python's recursion limit and ten
times PATH_MAX); the issue's 10^5 levels and 10^6 entries take the same code
paths, for longer.
"""
from __future__ import annotations

import json
import os
import stat
import sys
import zipfile
from pathlib import Path

import pytest

from worker.outputs import MANIFEST, collect_outputs
from worker.trees import drain_tree, remove_tree

DEPTH = 1100  # > sys.getrecursionlimit() (1,000)
NAME = "d" * 40  # DEPTH levels of it: a path of 45,100 characters, > PATH_MAX (4,096)


def make_deep(root: Path, depth: int = DEPTH, file_every: int = 500, name: str = NAME) -> None:
    """`depth` nested directories (made relative to an open directory: their
    path is longer than any path call accepts), a read-only file every
    `file_every` levels."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for level in range(depth):
            os.mkdir(name, dir_fd=fd)
            child = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
            if level % file_every == 0:
                os.close(os.open("f", os.O_WRONLY | os.O_CREAT, 0o400, dir_fd=fd))
    finally:
        os.close(fd)


def make_hostile(root: Path) -> None:
    """What a job can leave besides depth: mode 000, read-only files, odd names."""
    locked = root / "locked"
    (locked / "inner").mkdir(parents=True)
    (locked / "inner" / "secret.txt").write_text("x")
    os.chmod(locked / "inner", 0)
    os.chmod(locked, 0)
    ro = root / "readonly"
    ro.mkdir()
    (ro / "file.txt").write_text("x")
    os.chmod(ro / "file.txt", 0o400)
    os.chmod(ro, 0o500)
    with open(os.fsencode(root) + b"/new\nline", "w") as f:
        f.write("n")
    with open(os.fsencode(root) + b"/not-utf8-\xff\xfe", "w") as f:
        f.write("u")


def test_a_tree_deeper_than_the_recursion_limit_and_path_max_is_removed(tmp_path):
    assert DEPTH > sys.getrecursionlimit()
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    make_deep(job_dir)
    make_hostile(job_dir)
    remove_tree(job_dir)
    assert not job_dir.exists()


def test_a_wide_directory_is_removed(tmp_path):
    wide = tmp_path / "wide"
    wide.mkdir()
    for i in range(2_000):
        os.close(os.open(wide / f"f{i}", os.O_WRONLY | os.O_CREAT, 0o600))
    remove_tree(wide)
    assert not wide.exists()


def test_drain_visits_every_file_once_with_its_path_or_none_past_max_path(tmp_path):
    root = tmp_path / "out"
    root.mkdir()
    make_deep(root, depth=300, file_every=100, name="d")
    (root / "top.txt").write_text("t")
    seen = []
    drain_tree(root, lambda rel, fd, name, st: seen.append(rel), max_path=250)
    # Files at levels 1, 101, 201 and the top one; past 250 characters, no path.
    assert sorted(seen, key=str) == sorted(["d/f", "d/" * 101 + "f", None, "top.txt"], key=str), seen
    assert os.listdir(root) == []


def test_collection_of_a_hostile_tree_ends_with_a_report(tmp_path):
    out = tmp_path / "output"
    out.mkdir()
    make_deep(out)
    make_hostile(out)
    archive = tmp_path / "outputs.zip"
    collected = collect_outputs(out, archive, max_bytes=1 << 20, max_files=100)
    report = collected.report()
    # Kept: the read-only file, the file behind two mode-000 directories, and
    # the deep files whose path fits the archive's limit.
    with zipfile.ZipFile(archive) as zf:
        names = zf.namelist()
        assert "readonly/file.txt" in names and "locked/inner/secret.txt" in names, names
        manifest = json.loads(zf.read(MANIFEST))
    # The two odd names, and the deep files past the archive's longest path.
    assert report["reasons"] == {"bad_name": 2 + 2}, report
    assert f"{NAME}/f" in names
    shown = {entry["path"] for entry in manifest["files_left_out"]}
    assert "new\nline" in shown and "not-utf8-\\xff\\xfe" in shown, shown
    assert os.listdir(out) == []


def test_every_file_left_out_is_counted_by_reason_and_listed_in_the_archive(tmp_path):
    out = tmp_path / "output"
    (out / "many").mkdir(parents=True)
    for i in range(8):
        (out / "many" / f"{i}.txt").write_text("small")
    (out / "big.bin").write_bytes(b"\0" * 5000)
    os.symlink("/etc/passwd", out / "link")
    os.mkfifo(out / "fifo")
    (out / ".jobcloud").mkdir()
    (out / MANIFEST).write_text("a job's own file at the manifest's path")
    setuid = out / "setuid-tool"
    setuid.write_bytes(b"#!/bin/sh\n")
    os.chmod(setuid, 0o4755 | stat.S_ISGID)
    archive = tmp_path / "outputs.zip"
    collected = collect_outputs(out, archive, max_bytes=4096, max_files=5)
    # Nine small regular files (five kept), the big one, the link, the FIFO, the reserved name.
    assert collected.report() == {
        "files": 5, "bytes": collected.bytes, "left_out": 8, "left_out_bytes": 4 * 5 + 5000 + 39,
        "reasons": {"file_cap": 4, "reserved_name": 1, "size_cap": 1, "special_file": 1, "symlink": 1},
    }, collected.report()
    report = collected.report()
    with zipfile.ZipFile(archive) as zf:
        manifest = json.loads(zf.read(MANIFEST))
        assert manifest["left_out"] == report["left_out"]
        assert {e["reason"] for e in manifest["files_left_out"]} == set(report["reasons"])
        assert zf.read(MANIFEST) != b"a job's own file at the manifest's path"
        # No mode bit of the job's survives into the archive: no setuid, no setgid.
        for info in zf.infolist():
            assert (info.external_attr >> 16) & 0o7777 == 0o644, (info.filename, oct(info.external_attr))


def test_an_empty_output_directory_gives_no_archive(tmp_path):
    out = tmp_path / "output"
    (out / "empty-dir").mkdir(parents=True)
    archive = tmp_path / "outputs.zip"
    assert collect_outputs(out, archive, max_bytes=1 << 20, max_files=10) is None
    assert not archive.exists()


@pytest.mark.parametrize("kind", ["file", "missing"])
def test_remove_tree_takes_a_file_or_nothing(tmp_path, kind):
    path = tmp_path / "x"
    if kind == "file":
        path.write_text("x")
    remove_tree(path)
    assert not path.exists()


def test_outputs_the_fetching_cli_would_refuse_are_left_out_not_the_whole_archive(tmp_path):
    """The archive rule is one (jobcloud_archive): a name it refuses, or two
    names that clash but for letter case, would make `jobcloud fetch` refuse
    the whole archive, so the worker leaves those files out and says so."""
    import jobcloud_archive
    from client.cli import FETCH_LIMITS

    out = tmp_path / "output"
    out.mkdir()
    for name in ("Model.pt", "model.pt", "a:b.txt", "line\nbreak.txt", "kept.txt"):
        (out / name).write_text(name)
    (out / "Data").write_text("a file")
    (out / "data").mkdir()
    (out / "data" / "x.csv").write_text("a file where a kept file's name is a directory")
    archive = tmp_path / "outputs.zip"
    report = collect_outputs(out, archive, max_bytes=1 << 20, max_files=100).report()
    assert report["files"] == 3 and report["reasons"] == {"bad_name": 4}, report
    with open(archive, "rb") as f:   # the CLI's own check takes it whole
        jobcloud_archive.check(f, FETCH_LIMITS, "output")
