"""`upload`: one 1 GiB dataset submitted to the live proxy: its memory and its speed.

The dataset is a stored (uncompressed) zip of random bytes generated into a
temp file and streamed from that file by requests. While it travels, every
gunicorn process's RSS is sampled; the figure is the largest rise of one
process over its RSS just before. Throughput (request sent → 201, which
includes the zip check and the fsync) is compared in the same run with
`dd bs=1M conv=fsync` writing the same bytes to the same file system.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import time
import zipfile

import requests

from .forms import StreamedJobForm
from .harness import BenchError, Proxy, RssSampler
from .report import Row

MiB = 1024 * 1024
TARGET_RSS_MIB = 64
MEMBER_BYTES = 16 * MiB
# Random blocks reused across members: the bytes are incompressible and making
# them costs a fraction of a second instead of many.
POOL_BLOCKS = 16


def make_dataset(path: str, size: int) -> int:
    """Write a stored zip holding about `size` bytes of random data; returns its size."""
    pool = [os.urandom(MiB) for _ in range(POOL_BLOCKS)]
    written = 0
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        member = 0
        while written < size:
            n = min(MEMBER_BYTES, size - written)
            with zf.open(f"data/part-{member:04d}.bin", "w", force_zip64=True) as f:
                for i in range(0, n, MiB):
                    f.write(pool[(member + i // MiB) % POOL_BLOCKS][:min(MiB, n - i)])
            written += n
            member += 1
    return os.path.getsize(path)


def dd_copy(src: str, dest: str) -> float:
    """Seconds for dd to write `src` to `dest` and fsync it."""
    t0 = time.monotonic()
    subprocess.run(["dd", f"if={src}", f"of={dest}", "bs=1M", "conv=fsync"], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.monotonic() - t0


def send_dataset(proxy: Proxy, user, dataset: str) -> tuple[dict, float, RssSampler, int]:
    """Submit a job with `dataset` streamed from its file while the proxy's RSS is sampled.

    Returns:
        (the 201 answer, seconds from sent to 201, the sampler, the body's length)
    Raises:
        BenchError: the proxy refused it, or stored another size.
    """
    size = os.path.getsize(dataset)
    form = StreamedJobForm(b"print('train')\n", dataset)
    try:
        with RssSampler(proxy) as rss:
            t0 = time.monotonic()
            response = requests.post(proxy.url + "/api/v1/jobs", data=form, timeout=900,
                                     headers=dict(user.auth, **{"Content-Type": form.content_type}))
            upload_s = time.monotonic() - t0
    finally:
        form.close()
    if response.status_code != 201:
        raise BenchError(f"upload answered {response.status_code}: {response.text[:300]}")
    stored = response.json()["dataset"]["size"]
    if stored != size:
        raise BenchError(f"sent a {size}-byte dataset, the proxy stored {stored} bytes")
    return response.json(), upload_s, rss, len(form)


def run(opts) -> tuple[list[Row], list[str], dict]:
    with Proxy(opts.tmp) as proxy:
        user = proxy.add_user("alice")
        need = 4 * opts.upload_bytes
        free = shutil.disk_usage(proxy.dir).free
        if free < need:
            raise BenchError(f"upload needs {need / 2**30:.1f} GiB free in {proxy.dir};"
                             f" {free / 2**30:.1f} GiB left")
        dataset = str(proxy.dir / "dataset.zip")
        size = make_dataset(dataset, opts.upload_bytes)
        proxy.start()
        _, upload_s, rss, body_bytes = send_dataset(proxy, user, dataset)
        growth, pid = rss.growth()
        dd_s = dd_copy(dataset, str(proxy.dir / "data" / "dd-copy"))
    body_mb = body_bytes / 1e6
    raw = {"dataset_bytes": size, "body_bytes": body_bytes, "upload_s": round(upload_s, 2),
           "upload_mb_s": round(body_mb / upload_s, 1), "dd_s": round(dd_s, 2),
           "dd_mb_s": round(size / 1e6 / dd_s, 1), "rss_growth_bytes": growth,
           "rss_growth_pid": pid, "rss_baseline": rss.baseline, "rss_peak": rss.peak,
           "rss_samples": rss.samples}
    growth_mib = growth / MiB
    rows = [
        Row("Peak RSS growth of the proxy process receiving it", growth_mib, "MiB",
            f"< {TARGET_RSS_MIB} MiB", growth_mib / TARGET_RSS_MIB, "target",
            growth_mib < TARGET_RSS_MIB),
        Row(f"Upload throughput ({size / 2**30:.2f} GiB, sent → 201)", raw["upload_mb_s"], "MB/s",
            f"dd bs=1M conv=fsync, same bytes, same disk: {raw['dd_mb_s']:.0f} MB/s",
            raw["upload_mb_s"] / raw["dd_mb_s"], "dd"),
        Row("Upload wall time", upload_s, "s", f"dd: {dd_s:.1f} s"),
    ]
    notes = [f"RSS sampled every 20 ms in every gunicorn process ({rss.samples} samples);"
             " the receiving process reads the body in 256 KiB chunks and writes it to"
             " data/tmp, then re-reads it to check the zip (CRC of every member) before the"
             " blob is fsync'd and renamed."]
    return rows, notes, raw
