"""The worker's configuration: read once at the entry point (flags, then
JOBCLOUD_WORKER_* environment variables, then one config file, then the
defaults below), validated, and passed inward.
"""
from __future__ import annotations

import argparse
import grp
import json
import os
import pwd
import re
import socket
from dataclasses import dataclass, field, fields
from pathlib import Path

from .errors import ConfigError

MiB = 1024 * 1024
GiB = 1024 * MiB

ENV_PREFIX = "JOBCLOUD_WORKER_"
# Jobs run as this uid and gid: above every range Debian gives accounts
# (< 65536) and below systemd's container ranges (524288+); the worker refuses
# one that is an account or group on its host. docs/SECURITY.md.
DEFAULT_JOB_UID = 700_000


@dataclass(frozen=True)
class WorkerConfig:
    proxy_url: str = "http://127.0.0.1:3000"
    enrollment_token: str = ""
    # One name per host is what an admin expects to see in the worker list.
    name: str = field(default_factory=socket.gethostname)
    # One job per core leaves the machine responsive on small VMs.
    slots: int = field(default_factory=lambda: max(1, os.cpu_count() or 1))
    data_dir: str = "/var/lib/jobcloud-worker"
    images: tuple[str, ...] = ("jobcloud/python", "jobcloud/ml")
    # The proxy caps a long-poll at 30 s by default; shorter keeps shutdown snappy.
    claim_wait_s: float = 20.0
    # Used until the proxy's register answer says otherwise.
    heartbeat_interval_s: float = 10.0
    # Capped exponential backoff while the proxy is unreachable.
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    # First SIGTERM: running jobs get this long to finish before they are stopped.
    grace_s: float = 60.0
    # Same default as the proxy's log_max_bytes: more is discarded and marked truncated.
    log_max_bytes: int = 10 * MiB
    # What goes into the result document as stdout/stderr tails (the proxy keeps 64 KiB).
    log_tail_bytes: int = 64 * 1024
    # Log chunks are posted at least this often while a job runs.
    log_flush_s: float = 0.5
    # Datasets already here are not fetched again; least recently used go first.
    dataset_cache_bytes: int = 10 * GiB
    # Unpacked datasets: a zip bomb stops here (the proxy checks too; never trust it).
    dataset_max_bytes: int = 8 * GiB
    dataset_max_members: int = 100_000
    dataset_max_ratio: float = 200.0
    # The proxy refuses output archives above 1 GiB.
    output_max_bytes: int = 1 * GiB
    output_max_files: int = 10_000
    # The sandbox: enough processes for torch/BLAS threads, few enough to stop a fork bomb.
    pids_limit: int = 256
    tmpfs_mb: int = 256
    nofile: int = 1024
    # Largest file a job may write (RLIMIT_FSIZE), in bytes.
    fsize_bytes: int = 2 * GiB
    # Each job writes into a filesystem of its own of the job's disk_mb
    # (worker/jobdisk.py): needs root and mkfs.ext4. Off only for a worker
    # that cannot have it; then nothing bounds what a job writes.
    disk_quota: bool = True
    # A job's disk when its claim names none (a proxy older than disk_mb).
    default_disk_mb: int = 1024
    # The uid and gid jobs run as (see DEFAULT_JOB_UID).
    job_uid: int = DEFAULT_JOB_UID
    # Image -> OCI runtime registered with the engine (e.g. "runsc", gVisor): a
    # second kernel between a job and the host's, per image. None by default:
    # the engine's own runtime (runc), which every Docker install has.
    runtimes: dict[str, str] = field(default_factory=dict)
    # Keep one locked-down container started per free slot, waiting for its job
    # (worker/prestart.py): a claim skips Docker's create and start. On by
    # default (issue 16); off for a worker that must hold nothing while idle
    # (each free slot then holds a started container, a job dir and its disk).
    prestart: bool = True
    # The OCI runtime of waiting containers, when the engine has it registered
    # and the image has none in `runtimes`; empty: the engine's default (runc).
    # "crun" (scripts/docker-up.sh registers it where installed) starts a
    # container on about half runc's CPU, but crun 1.8 (Debian 12) bind-mounts
    # /job/output without the nosuid,nodev of the job's disk, which runc keeps
    # (docs/SECURITY.md): so not by default. A waiting container that cannot be
    # made under it is made under the engine's default, and so are the next ones.
    prestart_runtime: str = ""
    # Where jobs' requirements wheels are downloaded from (a PEP 503/691
    # simple index). Empty: the index the proxy's claim names (its
    # package_index_url), else PyPI. Set it for a mirror near this worker.
    package_index_url: str = ""
    # Built requirements environments kept for later jobs (worker/pyenv.py),
    # in MiB; least recently used are evicted past it, never one in use.
    pyenv_cache_mb: int = 10 * 1024
    log_level: str = "INFO"

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir)


def load_config(argv: list[str] | None = None, env: dict | None = None) -> WorkerConfig:
    """Build the configuration from flags, environment and an optional JSON file.

    Precedence: flags > JOBCLOUD_WORKER_* environment > config file > defaults.

    Raises:
        ConfigError: an unknown key, a value of the wrong type, or an invalid value.
    """
    env = dict(os.environ if env is None else env)
    args = _parser().parse_args(argv)
    values: dict = {}
    config_file = args.config or env.get(ENV_PREFIX + "CONFIG")
    if config_file:
        values.update(_read_file(config_file))
    for f in fields(WorkerConfig):
        key = ENV_PREFIX + f.name.upper()
        if key in env:
            values[f.name] = env[key]
    for f in fields(WorkerConfig):
        v = getattr(args, f.name, None)
        if v is not None:
            values[f.name] = v
    return _validate(_coerce(values))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jobcloud-worker",
                                description="Run jobcloud jobs in locked-down Docker containers.")
    p.add_argument("--config", help="JSON config file (keys as the long flags, with underscores)")
    p.add_argument("--proxy-url", dest="proxy_url")
    p.add_argument("--enrollment-token", dest="enrollment_token",
                   help="better passed as JOBCLOUD_WORKER_ENROLLMENT_TOKEN (flags show in ps)")
    p.add_argument("--name")
    p.add_argument("--slots", type=int)
    p.add_argument("--data-dir", dest="data_dir")
    p.add_argument("--images", help="comma-separated allowed images")
    p.add_argument("--claim-wait-s", dest="claim_wait_s", type=float)
    p.add_argument("--grace-s", dest="grace_s", type=float)
    p.add_argument("--log-level", dest="log_level")
    return p


def _read_file(path: str) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a JSON object")
    return data


def _coerce(values: dict) -> dict:
    known = {f.name: f for f in fields(WorkerConfig)}
    out = {}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"unknown setting {key!r}")
        kind = type(getattr(_DEFAULTS, key))
        try:
            if kind is tuple:
                items = value.split(",") if isinstance(value, str) else list(value)
                out[key] = tuple(i.strip() for i in items if i.strip())
            elif kind is dict:
                out[key] = _mapping(value)
            elif kind is bool:
                out[key] = _boolean(value)
            elif kind in (int, float):
                out[key] = kind(value)
            else:
                out[key] = str(value)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{key}: {value!r} is not a valid {kind.__name__}") from e
    return out


def _boolean(value) -> bool:
    """A JSON boolean, or true/false/1/0/yes/no as an environment variable holds it."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise ValueError("expected true or false")


def _mapping(value) -> dict[str, str]:
    """A JSON object, or "key=value,key=value" as an environment variable holds it."""
    if isinstance(value, str):
        pairs = [item.split("=", 1) for item in value.split(",") if item.strip()]
        if any(len(pair) != 2 for pair in pairs):
            raise ValueError("expected key=value pairs separated by commas")
        value = dict(pairs)
    if not isinstance(value, dict):
        raise TypeError("expected an object")
    return {str(k).strip(): str(v).strip() for k, v in value.items()}


_DEFAULTS = WorkerConfig(name="x", slots=1)


def _is_account(uid: int) -> bool:
    """Whether `uid` is a user, or the same number a group, on this host."""
    for lookup in (pwd.getpwuid, grp.getgrgid):
        try:
            lookup(uid)
            return True
        except KeyError:
            continue
    return False
# What dockerd accepts as a runtime name in its daemon.json.
RUNTIME_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def _validate(values: dict) -> WorkerConfig:
    cfg = WorkerConfig(**values)
    checks = [
        (cfg.proxy_url.startswith(("http://", "https://")), "proxy_url must be an http(s) URL"),
        (bool(cfg.enrollment_token), "an enrollment token is required "
                                     f"({ENV_PREFIX}ENROLLMENT_TOKEN or --enrollment-token)"),
        (1 <= len(cfg.name) <= 100, "name must be 1-100 characters"),
        (1 <= cfg.slots <= 64, "slots must be between 1 and 64"),
        (len(cfg.images) >= 1, "images must list at least one image"),
        (0 <= cfg.claim_wait_s <= 300, "claim_wait_s must be between 0 and 300"),
        (cfg.heartbeat_interval_s > 0, "heartbeat_interval_s must be positive"),
        (0 < cfg.backoff_initial_s <= cfg.backoff_max_s, "backoff must satisfy 0 < initial <= max"),
        (cfg.grace_s >= 0, "grace_s must not be negative"),
        (cfg.log_max_bytes >= 1024, "log_max_bytes must be at least 1024"),
        (1024 <= cfg.log_tail_bytes <= cfg.log_max_bytes, "log_tail_bytes must be in [1024, log_max_bytes]"),
        (cfg.pids_limit >= 16, "pids_limit must be at least 16"),
        (cfg.tmpfs_mb >= 1, "tmpfs_mb must be at least 1"),
        (set(cfg.runtimes) <= set(cfg.images),
         "runtimes may name only images this worker runs: "
         + ", ".join(sorted(set(cfg.runtimes) - set(cfg.images)))),
        (all(RUNTIME_NAME.fullmatch(r) for r in cfg.runtimes.values()),
         "runtimes: a runtime name is letters, digits, '_', '.', '-' (as in dockerd's config)"),
        (cfg.prestart_runtime == "" or RUNTIME_NAME.fullmatch(cfg.prestart_runtime) is not None,
         "prestart_runtime must be empty or a runtime name: letters, digits, '_', '.', '-'"),
        (1 <= cfg.default_disk_mb <= 2**24, "default_disk_mb must be between 1 and 16777216"),
        (cfg.package_index_url == "" or re.fullmatch(r"https?://[^\s/?#]+(/[^\s?#]*)?",
                                                     cfg.package_index_url) is not None,
         "package_index_url must be empty or an http(s) URL without query or fragment"),
        (1 <= cfg.pyenv_cache_mb <= 2**24, "pyenv_cache_mb must be between 1 and 16777216"),
        (65536 <= cfg.job_uid < 2**31, "job_uid must be between 65536 and 2147483647 "
                                       "(below 65536 lie the host's accounts)"),
        (not _is_account(cfg.job_uid), f"job_uid {cfg.job_uid} is a user or group on this host: "
                                       "jobs must run as no account (choose another job_uid)"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    return cfg
