"""The worker's pure parts, no Docker needed: safe extraction, the dataset
cache, output collection, bounded logs, configuration."""
from __future__ import annotations

import os
import shutil
import stat
import zipfile

import pytest

from worker.config import load_config
from worker.errors import ConfigError, InputError, UnsafeArchive
from worker.inputs import (DatasetCache, InputBudget, extract_dataset, sha256_of,
                           unpack_parent_outputs)
from worker.logs import LogStream
from worker.outputs import collect_outputs
from tests.zips import HOSTILE

LIMITS = dict(max_bytes=1 << 20, max_members=100, max_ratio=200.0)


def make_zip(path, members):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data, mode in members:
            info = zipfile.ZipInfo(name)
            info.compress_type = zipfile.ZIP_DEFLATED
            if mode is not None:
                info.external_attr = mode << 16
            zf.writestr(info, data)
    return path


@pytest.mark.parametrize("name", ["/etc/passwd", "../escape.txt", "a/../../escape.txt",
                                  "a\\..\\b.txt", "C:/windows.txt"])
def test_unsafe_member_paths_are_refused(tmp_path, name):
    archive = make_zip(tmp_path / "d.zip", [(name, b"x", None)])
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(UnsafeArchive):
        extract_dataset(archive, dest, **LIMITS)
    assert not (tmp_path / "escape.txt").exists()


def test_symlink_members_are_refused(tmp_path):
    archive = make_zip(tmp_path / "d.zip", [("link", b"/etc/passwd", stat.S_IFLNK | 0o777)])
    (tmp_path / "out").mkdir()
    with pytest.raises(UnsafeArchive, match="symbolic link"):
        extract_dataset(archive, tmp_path / "out", **LIMITS)


@pytest.mark.parametrize("name, archive, code, words", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_the_worker_refuses_what_the_proxy_refuses_without_host_paths(tmp_path, name, archive,
                                                                       code, words):
    """The same rule as intake (jobcloud_archive): nothing is written, and the
    message, which becomes the job's failure reason, names no path of this machine."""
    (tmp_path / "d.zip").write_bytes(archive)
    dest = tmp_path / "job" / "input" / "data"
    dest.mkdir(parents=True)
    with pytest.raises(UnsafeArchive) as refused:
        extract_dataset(tmp_path / "d.zip", dest, **LIMITS)
    message = str(refused.value)
    for word in words:
        assert word.lower() in message.lower(), (word, message)
    assert str(tmp_path) not in message and "/job/" not in message, message
    assert list(dest.iterdir()) == [], "nothing is written from a refused archive"


def test_size_and_ratio_limits_hold_whatever_the_headers_say(tmp_path):
    bomb = make_zip(tmp_path / "bomb.zip", [("zeros", b"\0" * (8 << 20), stat.S_IFREG | 0o644)])
    (tmp_path / "a").mkdir()
    with pytest.raises(UnsafeArchive, match="ratio"):
        extract_dataset(bomb, tmp_path / "a", **LIMITS)
    (tmp_path / "b").mkdir()
    with pytest.raises(UnsafeArchive, match="more than"):
        extract_dataset(bomb, tmp_path / "b", max_bytes=1 << 20, max_members=10, max_ratio=1e9)


def test_a_good_dataset_is_extracted(tmp_path):
    archive = make_zip(tmp_path / "d.zip", [("dir/", b"", stat.S_IFDIR | 0o755),
                                            ("dir/a.csv", b"1,2\n", None), ("b.txt", b"b", None)])
    dest = tmp_path / "out"
    dest.mkdir()
    assert extract_dataset(archive, dest, **LIMITS) == 5
    assert (dest / "dir" / "a.csv").read_bytes() == b"1,2\n"
    with pytest.raises(InputError):
        extract_dataset(tmp_path / "out" / "b.txt", dest, **LIMITS)


def test_parents_outputs_and_the_dataset_share_one_limit(tmp_path):
    """Three parents' outputs, each well under the worker's dataset limit,
    together over it: the job is refused naming the limit, and what is
    unpacked never passes it."""
    served = tmp_path / "served"
    served.mkdir()
    parents = []
    for n in range(3):
        make_zip(served / f"p{n}.zip", [(f"part{n}.bin", os.urandom(400 << 10), None)])
        parents.append({"id": f"job-{n}", "name": f"p{n}",
                        "outputs": {"url": f"p{n}.zip", "sha256": sha256_of(served / f"p{n}.zip")}})

    def download(url, dest, direct_url=None):
        dest.write_bytes((served / url).read_bytes())
    input_dir, scratch = tmp_path / "input", tmp_path / "scratch"
    input_dir.mkdir()
    scratch.mkdir()
    budget = InputBudget(1 << 20, 100, 200.0)
    with pytest.raises(InputError, match=r"over this worker's limit of 1048576 bytes "
                                         r"\(dataset_max_bytes\) for all of them together"):
        unpack_parent_outputs(parents, input_dir, scratch, download, budget)
    unpacked = sum(f.stat().st_size for f in input_dir.rglob("*") if f.is_file())
    assert unpacked == budget.used_bytes == 2 * (400 << 10)
    assert not (input_dir / "after" / "p2" / "part2.bin").exists()

    # Under the limit together, the dataset still counts: it is what is left.
    budget = InputBudget(1 << 20, 100, 200.0)
    shutil.rmtree(input_dir)
    input_dir.mkdir()
    unpack_parent_outputs(parents[:2], input_dir, scratch, download, budget)
    (input_dir / "data").mkdir()
    with pytest.raises(InputError, match="dataset and the job's other inputs"):
        budget.unpack(served / "p2.zip", input_dir / "data", "dataset")
    # And a dataset alone keeps its own limit and its own message.
    with pytest.raises(UnsafeArchive, match="expands to more than the limit"):
        extract_dataset(served / "p2.zip", tmp_path, max_bytes=100 << 10, max_members=10,
                        max_ratio=200.0)


def test_the_shared_limit_counts_files_too(tmp_path):
    budget = InputBudget(1 << 20, 5, 200.0)
    for n in range(2):
        make_zip(tmp_path / f"{n}.zip", [(f"{n}-{i}.txt", b"x", None) for i in range(3)])
        (tmp_path / f"out{n}").mkdir()
    budget.unpack(tmp_path / "0.zip", tmp_path / "out0", "outputs of job a")
    with pytest.raises(InputError, match=r"limit of 5 files \(dataset_max_members\)"):
        budget.unpack(tmp_path / "1.zip", tmp_path / "out1", "outputs of job b")


def test_dataset_cache_fetches_once_checks_hash_and_evicts_lru(tmp_path):
    cache = DatasetCache(tmp_path / "cache", max_bytes=25)
    blobs = {}
    fetched = []

    def fetcher(data):
        def fetch(dest):
            fetched.append(data)
            dest.write_bytes(data)
        return fetch

    for i in range(3):
        data = bytes([i]) * 10
        (tmp_path / "x").write_bytes(data)
        blobs[i] = (sha256_of(tmp_path / "x"), data)
    sha0, d0 = blobs[0]
    assert cache.acquire(sha0, fetcher(d0)).read_bytes() == d0
    cache.acquire(sha0, fetcher(d0))
    assert fetched == [d0]  # the second use came from the cache
    cache.release(sha0)
    cache.release(sha0)
    for i in (1, 2):
        cache.acquire(blobs[i][0], fetcher(blobs[i][1]))
        cache.release(blobs[i][0])
    names = sorted(p.stem for p in (tmp_path / "cache").glob("*.zip"))
    assert names == sorted([blobs[1][0], blobs[2][0]])  # 30 bytes > 25: the oldest went
    with pytest.raises(InputError, match="mismatch"):
        cache.acquire("0" * 64, fetcher(b"not that"))
    assert not list((tmp_path / "cache").glob("*.partial"))


def test_outputs_skip_symlinks_fifos_and_respect_bounds(tmp_path):
    def make_outputs():
        out = tmp_path / "out"
        (out / "sub").mkdir(parents=True)
        (out / "a.txt").write_text("a")
        (out / "sub" / "b.txt").write_text("bb")
        os.symlink("/etc/passwd", out / "passwd")
        os.symlink("/etc", out / "etcdir")
        os.mkfifo(out / "fifo")
        return out

    # Collection empties the output directory (worker/outputs.py): made again for each.
    got = collect_outputs(make_outputs(), tmp_path / "o.zip", max_bytes=100, max_files=10)
    names = zipfile.ZipFile(tmp_path / "o.zip").namelist()
    assert sorted(n for n in names if not n.startswith(".jobcloud/")) == ["a.txt", "sub/b.txt"]
    assert got.files == 2 and got.left_out == {"symlink": 2, "special_file": 1}
    got = collect_outputs(make_outputs(), tmp_path / "p.zip", max_bytes=100, max_files=1)
    assert got.truncated and got.files == 1 and got.left_out["file_cap"] == 1
    (tmp_path / "empty").mkdir()
    assert collect_outputs(tmp_path / "empty", tmp_path / "e.zip", max_bytes=1, max_files=1) is None


def test_log_stream_is_bounded_keeps_a_tail_and_utf8_offsets():
    s = LogStream("stdout", max_bytes=1024, tail_bytes=16)
    s.feed("é".encode() * 300)          # 600 bytes
    s.feed(b"x" * 1000 + b"THE END")
    offset, chunk = s.take(limit=100)
    assert offset == 0 and len(chunk.encode()) == 100
    s.sent_ok(chunk)
    offset, rest = s.take()
    assert offset == 100 and len((chunk + rest).encode()) <= 1024
    assert s.truncated and s.seen == 1607
    assert s.tail().endswith("THE END")


def test_a_log_chunk_whose_post_failed_is_sent_again_as_it_was():
    """Found by the chaos soak (a frozen proxy): the proxy may store a chunk
    whose answer never arrived, and ignores a second chunk at that offset. Were
    the retry merged with the output written since, that output would be lost."""
    s = LogStream("stdout", max_bytes=1024, tail_bytes=16)
    s.feed(b"start\n")
    assert s.take() == (0, "start\n")
    s.put_back("start\n")            # the post timed out: stored or not, unknown
    s.feed(b"done token=abc\n")
    assert s.take() == (0, "start\n")
    s.sent_ok("start\n")
    assert s.take() == (6, "done token=abc\n")


def test_config_precedence_and_validation(tmp_path):
    cfg_file = tmp_path / "w.json"
    cfg_file.write_text('{"slots": 2, "name": "from-file", "images": ["a", "b"]}')
    env = {"JOBCLOUD_WORKER_ENROLLMENT_TOKEN": "jce_x", "JOBCLOUD_WORKER_NAME": "from-env"}
    cfg = load_config(["--config", str(cfg_file), "--slots", "4"], env=env)
    assert (cfg.slots, cfg.name, cfg.images) == (4, "from-env", ("a", "b"))
    with pytest.raises(ConfigError, match="enrollment"):
        load_config([], env={})
    with pytest.raises(ConfigError, match="slots"):
        load_config(["--slots", "0"], env=env)
    with pytest.raises(ConfigError, match="unknown"):
        cfg_file.write_text('{"slotz": 1}')
        load_config(["--config", str(cfg_file)], env=env)
