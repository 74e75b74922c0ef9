"""Proxy configuration: defaults, one optional TOML file, environment variables.

Read once at the entry point (`load_config`) and passed inward; nothing else in
the package reads the environment. Precedence: defaults < file < environment.
Every value is validated here, so the rest of the code can trust it. The
layering and type coercion are jobcloud_config's, shared with the scaler;
what each setting means and which values are allowed are here.

gunicorn's settings (bind, processes, connections, logs) are settings of the
proxy too: proxy/gunicorn_conf.py reads them from here, so `gunicorn_connections`
is one number for gunicorn and for the live-stream cap that depends on it.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

from jobcloud_config import SettingError, layered, read_toml

from .errors import ConfigError

MiB = 1024 * 1024
GiB = 1024 * MiB


@dataclass(frozen=True)
class Config:
    # Where blobs, the SQLite database and upload temp files live.
    data_dir: str = "./var"
    # Empty means SQLite at <data_dir>/jobcloud.db; set postgresql://... to share
    # one database between several proxy instances.
    database_url: str = ""
    # The port the system's first users know; loopback unless told otherwise.
    bind: str = "127.0.0.1:3000"
    # Public URL printed for users (make run) and used in links; derived from bind if empty.
    public_url: str = ""
    # Python scripts are text: 1 MiB is thousands of lines.
    max_script_bytes: int = 1 * MiB
    # Course datasets (images, CSVs) fit; larger data belongs on shared storage.
    max_dataset_bytes: int = 2 * GiB
    # Zip-bomb guards: what a dataset may expand to, how many members, and how
    # compressible one member may be (text compresses ~10x, zeros ~1000x).
    zip_max_total_bytes: int = 8 * GiB
    zip_max_entries: int = 100_000
    zip_max_ratio: int = 200
    # The job form has ~10 fields; anything far above that is an attack.
    max_form_parts: int = 64
    # A job's own environment variables (proxy/jobenv.py): how many, and how
    # long one value may be in bytes. Enough for a few API keys and options;
    # every claim of the job carries them. 0 variables: env is refused.
    job_env_max_vars: int = 32
    job_env_max_value_bytes: int = 4096
    # Jobs one array submission may make (a range, or a parameters file's
    # rows; proxy/arrays.py): a 10,000-point sweep submits in one request.
    max_array_size: int = 10_000
    # A parameters file (CSV or JSON lines): 10,000 rows of a few hundred bytes.
    max_params_bytes: int = 8 * MiB
    # Dependencies (proxy/dependencies.py): the parent jobs one job may wait
    # on (an array named in `after` counts each of its jobs; the claim answer
    # lists each with its outputs' URL), and the edges one submission may
    # make, jobs x parent jobs (an array after an array: every copy waits on
    # every parent), so one request never inserts millions of rows.
    max_parent_jobs: int = 1_000
    max_dependency_edges: int = 100_000
    # Images the form offers and the API accepts (admin allow-list).
    images: tuple[str, ...] = ("jobcloud/python", "jobcloud/ml")
    default_image: str = "jobcloud/python"
    # Per-job resource ranges and defaults.
    default_cpus: float = 1.0
    max_cpus: float = 16.0
    default_memory_mb: int = 1024
    min_memory_mb: int = 64
    max_memory_mb: int = 65536
    default_timeout_s: int = 600
    max_timeout_s: int = 24 * 3600
    max_gpus: int = 8
    # The job's own filesystem on the worker (outputs and scratch), in MiB:
    # the kernel stops a job there (ENOSPC), so one job cannot fill a worker.
    default_disk_mb: int = 1024
    max_disk_mb: int = 64 * 1024
    # Workers heartbeat this often; one silent for lease_timeout_s is lost.
    heartbeat_interval_s: float = 10.0
    lease_timeout_s: float = 45.0
    # A job is retried this many times when its worker is lost, then failed.
    max_attempts: int = 3
    # Policy retries a job may ask for (issue 15, proxy/retries.py): each is a
    # whole new run, so the bound is on how often one submission can rerun.
    max_retries: int = 10
    # Cap on a retry's exponential back-off (base x 2^(k-1)): an hour, like
    # the webhooks' cap, so a long retry chain still ends within a day.
    retry_backoff_max_s: int = 3600
    # Longest a claim request may long-poll.
    claim_wait_max_s: float = 30.0
    # Bounded logs per stream per job; the tail kept with the result.
    log_max_bytes: int = 10 * MiB
    log_tail_bytes: int = 64 * 1024
    # Largest output archive a worker may post.
    max_output_bytes: int = 1 * GiB
    # Jobs per page on /job-status/<user>.
    page_size: int = 50
    # Seconds between automatic refreshes of a status page with active jobs.
    status_refresh_s: int = 5
    # Longest a live update stream (Server-Sent Events) stays open; the browser
    # then reconnects and resumes. A waiting stream is cheap (a greenlet), so
    # this only spreads connections over processes and bounds a stream's age:
    # each renewal costs a request, 1,000 pages at 25 s were 0.1 core.
    live_stream_s: float = 120.0
    # Streams held open at once per proxy process; more are answered once and
    # polled every few seconds instead. A waiting stream is a greenlet holding
    # no thread and no database connection (wakeups.py), so this is far above
    # what a lab opens; capped at half of gunicorn_connections
    # (live.streams_per_process), so workers and pages always get in.
    live_streams_max: int = 2000
    # How often each process looks for wake-ups committed by other processes
    # on SQLite where inotify is missing (wakeups.py; on Linux a signal file
    # pushes them, PostgreSQL pushes them too): half of it is then the average
    # delay before a worker waiting in another process hears of a new job.
    wakeup_poll_s: float = 0.004
    # Connections one gunicorn process serves at once (gevent's
    # worker_connections): every idle claim long-poll and open live page is
    # one, costing a greenlet and a socket, not a thread.
    gunicorn_connections: int = 2000
    # gunicorn's processes; 0: twice the CPUs, at least 4 (no state lives in one).
    gunicorn_workers: int = 0
    # gunicorn's access log: "-" is stdout (journald), a path a file.
    access_log: str = "-"
    # Log the worker protocol's requests too (registration, heartbeats, claims,
    # log chunks, results: /api/v1/worker/...). Off: they are thousands of
    # lines an hour per worker (2,793 in 33 minutes of `make run`) and bury the
    # requests of people; on, to debug a worker's traffic (proxy/accesslog.py).
    access_log_worker_protocol: bool = False
    # Addresses whose X-Forwarded-* headers gunicorn trusts, comma-separated: none
    # by default, loopback included; a front proxy on this host is named explicitly.
    forwarded_allow_ips: str = ""
    # gunicorn >= 25.1 opens a control socket at one fixed per-user path, which
    # several proxies on one host (and the tests) would fight over: off unless a
    # path is given.
    gunicorn_control_socket: str = ""
    # Log level for the proxy's own logs (stdout).
    log_level: str = "INFO"
    # Hosts a job's webhook may target (exact names or IPs, "*.example.org" for
    # subdomains). Empty: webhooks are refused. An allow-list, not a deny-list:
    # the proxy must never be a way to reach internal addresses.
    webhook_allowed_hosts: tuple[str, ...] = ()
    # Delivery attempts per notice before it is marked failed; with the backoff
    # below (doubling, capped at an hour) 8 attempts span about 20 minutes.
    webhook_max_attempts: int = 8
    webhook_backoff_s: float = 5.0
    # The whole of one attempt (connect, send, answer): one receiver must not
    # hold a delivery thread for long. At most 20, below gunicorn's
    # graceful_timeout (30), so a shutdown waits for a POST in flight.
    webhook_timeout_s: float = 10.0
    # How often each proxy process looks for due deliveries.
    webhook_poll_s: float = 1.0
    # Bearer token /metrics requires (Prometheus: authorization.credentials_file).
    # Empty: /metrics answers loopback clients only, as the default bind does,
    # so binding to a public address never publishes queue depths and workers
    # (README, "Metrics"). 32 characters at least: `openssl rand -hex 32`.
    metrics_token: str = ""
    # Days a finished job's files (script, dataset, outputs) and logs are kept
    # unless its owner pins it; 0 keeps them for ever. A month covers a course
    # assignment's grading; admins override it per user (retention_days).
    retention_days: int = 30
    # Bytes of stored files a user's kept jobs may hold, in MiB; 0: no quota.
    # 20 GiB is ten of the largest datasets; admins override it per user
    # (max_storage_mb). Submissions past it get 413 storage_quota_exceeded.
    storage_quota_mb: int = 20 * 1024
    # How often each proxy process runs the retention sweep (proxy/retention.py).
    retention_sweep_s: float = 600.0
    # Accept a job that no live worker and no VM shape the scaler reported can
    # run (it waits until such capacity joins) instead of refusing it with 400
    # `no_capacity`: for admins who add workers by hand after jobs arrive.
    queue_unmet_capacity: bool = False
    # Where jobs' requirements.txt packages come from (PEP 691 simple index):
    # PyPI, or a mirror the admin trusts. Submissions ask it whether each
    # requirement has a wheel; claims tell workers to download from it.
    package_index_url: str = "https://pypi.org/simple"
    # Ask the index at submission (a clear 400 for an sdist-only package, 503
    # when it cannot be reached). Off: requirements are checked for syntax
    # only, and an sdist-only package fails at the worker's build instead.
    package_index_check: bool = True
    # How long that check may take for one submission's requirements in all
    # (asked concurrently): past it, a 503 instead of a request held open.
    package_index_check_timeout_s: float = 20.0

    # Where scripts, datasets and outputs are kept (proxy/blobs.py). Empty: files
    # under <data_dir>/blobs (one host, or a shared mount). s3://BUCKET/PREFIX:
    # an S3-compatible object store (proxy/s3blobs.py); then several proxies need
    # no shared directory, and workers move bytes to and from the store directly
    # with presigned URLs. The keys come from s3_credentials_file, else boto3's
    # usual places (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, ~/.aws): never here.
    blob_url: str = ""
    # The store's S3 endpoint (SeaweedFS, Ceph radosgw, Garage...); empty: AWS.
    s3_endpoint_url: str = ""
    # The endpoint presigned URLs name, when workers and browsers reach the store
    # at another address than the proxy does; empty: s3_endpoint_url.
    s3_presign_endpoint_url: str = ""
    s3_region: str = "us-east-1"
    # A TOML file with access_key_id and secret_access_key (mode 600), read once
    # at start; its path may be logged, its contents never are.
    s3_credentials_file: str = ""
    # How long a presigned URL works: a worker's download or upload must start
    # within it (a refused one is asked again); short limits what a leaked URL gives.
    blob_presign_ttl_s: int = 900
    # Users' downloads from the S3 store: "redirect" (to a presigned URL; the
    # proxy is out of the data path) or "stream" (through the proxy, for stores
    # the users' browsers cannot reach).
    blob_user_downloads: str = "redirect"

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return "sqlite:///" + str(Path(self.data_dir).resolve() / "jobcloud.db")

    @property
    def resolved_gunicorn_workers(self) -> int:
        return self.gunicorn_workers or max(4, (os.cpu_count() or 1) * 2)

    @property
    def url(self) -> str:
        if self.public_url:
            return self.public_url.rstrip("/")
        host, _, port = self.bind.rpartition(":")
        if host in ("0.0.0.0", "", "::", "[::]"):
            host = "127.0.0.1"
        return f"http://{host}:{port}"


ENV_PREFIX = "JOBCLOUD_"
_FIELDS = frozenset(f.name for f in dataclasses.fields(Config))


def load_config(env: dict | None = None, overrides: dict | None = None) -> Config:
    """Build the validated configuration.

    Args:
        env: environment mapping (default: os.environ); JOBCLOUD_CONFIG names
            the TOML file (its [proxy] table, or its top level).
        overrides: values that win over everything (tests, CLI flags).

    Raises:
        ConfigError: a value is unknown, of the wrong type or out of range.
    """
    env = os.environ if env is None else env
    try:
        values = layered(Config, env=env, prefix=ENV_PREFIX, section="proxy",
                         config_file=env.get(ENV_PREFIX + "CONFIG"), overrides=overrides)
    except SettingError as e:
        raise ConfigError(str(e)) from None
    return validate(values)


def store_origin(env: dict | None = None) -> str:
    """Which setting put the store where load_config found it, in words.

    For messages that name where the proxy's data was looked for: the layer
    that set database_url, when one did, else data_dir's (the environment
    over the JOBCLOUD_CONFIG file over the default, as in load_config).
    """
    env = os.environ if env is None else env
    config_file = env.get(ENV_PREFIX + "CONFIG")
    try:
        in_file = read_toml(config_file, "proxy", _FIELDS) if config_file else {}
    except SettingError:
        in_file = {}   # load_config has said so already
    for name in ("database_url", "data_dir"):
        variable = ENV_PREFIX + name.upper()
        if env.get(variable):
            return f"{name} from {variable}"
        if in_file.get(name):
            return f"{name} in {config_file} (JOBCLOUD_CONFIG)"
    return f"the default data_dir {Config.data_dir}, relative to the current directory"


def validate(values: dict) -> Config:
    cfg = Config(**values)
    checks = [
        (cfg.max_script_bytes >= 1, "max_script_bytes must be at least 1"),
        (cfg.max_dataset_bytes >= 1, "max_dataset_bytes must be at least 1"),
        (cfg.zip_max_total_bytes >= 1, "zip_max_total_bytes must be at least 1"),
        (cfg.zip_max_entries >= 1, "zip_max_entries must be at least 1"),
        (cfg.zip_max_ratio >= 1, "zip_max_ratio must be at least 1"),
        (16 <= cfg.max_form_parts <= 10_000, "max_form_parts must be between 16 and 10000"),
        (0 <= cfg.job_env_max_vars <= 1000, "job_env_max_vars must be between 0 and 1000"),
        (1 <= cfg.job_env_max_value_bytes <= 1024 * 1024,
         "job_env_max_value_bytes must be between 1 and 1048576"),
        (1 <= cfg.max_array_size <= 1_000_000, "max_array_size must be between 1 and 1000000"),
        (cfg.max_params_bytes >= 1, "max_params_bytes must be at least 1"),
        (1 <= cfg.max_parent_jobs <= 100_000, "max_parent_jobs must be between 1 and 100000"),
        (cfg.max_parent_jobs <= cfg.max_dependency_edges <= 10_000_000,
         "max_dependency_edges must be between max_parent_jobs and 10000000"),
        (len(cfg.images) >= 1, "images must list at least one image"),
        (cfg.default_image in cfg.images, "default_image must be one of images"),
        (0 < cfg.default_cpus <= cfg.max_cpus, "default_cpus must be in (0, max_cpus]"),
        (cfg.min_memory_mb <= cfg.default_memory_mb <= cfg.max_memory_mb,
         "default_memory_mb must be within [min_memory_mb, max_memory_mb]"),
        (cfg.min_memory_mb >= 6, "min_memory_mb must be at least 6 (Docker's minimum)"),
        (1 <= cfg.default_timeout_s <= cfg.max_timeout_s,
         "default_timeout_s must be within [1, max_timeout_s]"),
        (0 <= cfg.max_gpus <= 64, "max_gpus must be between 0 and 64"),
        (1 <= cfg.default_disk_mb <= cfg.max_disk_mb <= 2**24,
         "default_disk_mb and max_disk_mb must satisfy 1 <= default <= max <= 16777216"),
        (cfg.heartbeat_interval_s > 0, "heartbeat_interval_s must be positive"),
        (cfg.lease_timeout_s > cfg.heartbeat_interval_s,
         "lease_timeout_s must be longer than heartbeat_interval_s"),
        (cfg.max_attempts >= 1, "max_attempts must be at least 1"),
        (0 <= cfg.max_retries <= 100, "max_retries must be between 0 and 100"),
        (1 <= cfg.retry_backoff_max_s <= 7 * 24 * 3600,
         "retry_backoff_max_s must be between 1 and 604800 (a week)"),
        (0 <= cfg.claim_wait_max_s <= 300, "claim_wait_max_s must be between 0 and 300"),
        (cfg.log_max_bytes >= 1024, "log_max_bytes must be at least 1024"),
        (1024 <= cfg.log_tail_bytes <= cfg.log_max_bytes,
         "log_tail_bytes must be within [1024, log_max_bytes]"),
        (cfg.max_output_bytes >= 1, "max_output_bytes must be at least 1"),
        (1 <= cfg.page_size <= 500, "page_size must be between 1 and 500"),
        (cfg.status_refresh_s >= 1, "status_refresh_s must be at least 1"),
        (1 <= cfg.live_stream_s <= 300, "live_stream_s must be between 1 and 300"),
        (0.0005 <= cfg.wakeup_poll_s <= 60, "wakeup_poll_s must be between 0.0005 and 60"),
        (1 <= cfg.live_streams_max <= 100_000, "live_streams_max must be between 1 and 100000"),
        (2 <= cfg.gunicorn_connections <= 100_000,
         "gunicorn_connections must be between 2 and 100000"),
        (0 <= cfg.gunicorn_workers <= 1000,
         "gunicorn_workers must be between 0 (twice the CPUs) and 1000"),
        (all(_valid_forwarder(a) for a in cfg.forwarded_allow_ips.split(",") if a.strip()),
         "forwarded_allow_ips must list IP addresses or networks, or *"),
        (cfg.log_level.upper() in ("DEBUG", "INFO", "WARNING", "ERROR"),
         "log_level must be DEBUG, INFO, WARNING or ERROR"),
        (":" in cfg.bind and cfg.bind.rpartition(":")[2].isdigit()
         and 0 < int(cfg.bind.rpartition(":")[2]) < 65536, "bind must be HOST:PORT"),
        (all(_valid_host_pattern(h) for h in cfg.webhook_allowed_hosts),
         "webhook_allowed_hosts must list host names or IP addresses (optionally *.domain),"
         " without scheme, port or path"),
        (1 <= cfg.webhook_max_attempts <= 100, "webhook_max_attempts must be between 1 and 100"),
        (0.01 <= cfg.webhook_backoff_s <= 3600, "webhook_backoff_s must be between 0.01 and 3600"),
        (0.1 <= cfg.webhook_timeout_s <= 20, "webhook_timeout_s must be between 0.1 and 20"),
        (0.01 <= cfg.webhook_poll_s <= 60, "webhook_poll_s must be between 0.01 and 60"),
        (0 <= cfg.retention_days <= 100_000, "retention_days must be between 0 (keep for ever)"
         " and 100000"),
        (0 <= cfg.storage_quota_mb <= 10 ** 9, "storage_quota_mb must be between 0 (no quota)"
         " and 1000000000"),
        (1 <= cfg.retention_sweep_s <= 86400, "retention_sweep_s must be between 1 and 86400"),
        (re.fullmatch(r"https?://[^\s/?#]+(/[^\s?#]*)?", cfg.package_index_url) is not None,
         "package_index_url must be an http(s) URL without query or fragment"),
        (0.1 <= cfg.package_index_check_timeout_s <= 120,
         "package_index_check_timeout_s must be between 0.1 and 120"),
        (cfg.metrics_token == "" or _METRICS_TOKEN.fullmatch(cfg.metrics_token) is not None,
         "metrics_token must be empty or 32 to 256 letters, digits and -._~+/ (a bearer token;"
         " e.g. openssl rand -hex 32)"),
        (cfg.blob_url == "" or re.fullmatch(
            r"s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[A-Za-z0-9_./-]*)?", cfg.blob_url)
         is not None, "blob_url must be empty (files under data_dir) or s3://BUCKET[/PREFIX]"
         " (bucket: 3-63 lower-case letters, digits, dots, hyphens; prefix: letters, digits,"
         " '_', '.', '-', '/': nothing a URL would have to escape)"),
        (all(u == "" or re.fullmatch(r"https?://[^\s/?#]+/?", u) is not None
             for u in (cfg.s3_endpoint_url, cfg.s3_presign_endpoint_url)),
         "s3_endpoint_url and s3_presign_endpoint_url must be http(s)://HOST[:PORT]"),
        (re.fullmatch(r"[a-z0-9-]{1,40}", cfg.s3_region) is not None,
         "s3_region must be a region name such as us-east-1"),
        (1 <= cfg.blob_presign_ttl_s <= 7 * 24 * 3600,
         "blob_presign_ttl_s must be between 1 and 604800 (S3's longest)"),
        (cfg.blob_user_downloads in ("redirect", "stream"),
         "blob_user_downloads must be redirect or stream"),
        (cfg.database_url == "" or cfg.database_url.startswith(
            ("sqlite:///", "postgresql://", "postgres://")),
         "database_url must start with sqlite:/// or postgresql://"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    return dataclasses.replace(
        cfg, webhook_allowed_hosts=tuple(h.lower() for h in cfg.webhook_allowed_hosts))


# RFC 6750's b64token, long enough not to be guessed.
_METRICS_TOKEN = re.compile(r"[A-Za-z0-9._~+/-]{32,256}=*")
_HOST_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$", re.IGNORECASE)


def _valid_host_pattern(host: str) -> bool:
    """A host name, an IPv4/IPv6 literal, or *.domain; nothing that could smuggle a URL."""
    name = host[2:] if host.startswith("*.") else host
    try:
        ipaddress.ip_address(name)
        return not host.startswith("*.")
    except ValueError:
        pass
    labels = name.split(".")
    return 0 < len(name) <= 253 and all(_HOST_LABEL.match(label) for label in labels)


def _valid_forwarder(entry: str) -> bool:
    """An address or network gunicorn's forwarded_allow_ips takes, or "*" (any)."""
    entry = entry.strip()
    try:
        ipaddress.ip_network(entry, strict=False)
    except ValueError:
        return entry == "*"
    return True
