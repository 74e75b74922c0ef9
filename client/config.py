"""The client's local state: one JSON config file (proxy URL + API token) and,
beside it, the record of this machine's submissions that `resubmit` reads.

The file holds a bearer token, so it is written 0600 in a 0700 directory, by
a rename, so a crash never leaves half a file.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigInvalid, ConfigMissing

ENV_CONFIG = "JOBCLOUD_CLIENT_CONFIG"
# The proxy's default bind (proxy/config.py), what `make run` starts.
DEFAULT_URL = "http://127.0.0.1:3000"
# Only the most recent submissions are kept: the record is for `resubmit`, not history.
MAX_SUBMISSIONS = 500


@dataclass(frozen=True)
class ClientConfig:
    url: str
    token: str


def config_path(env=None) -> Path:
    """$JOBCLOUD_CLIENT_CONFIG, else ~/.config/jobcloud/config.json (honouring $XDG_CONFIG_HOME)."""
    env = os.environ if env is None else env
    if env.get(ENV_CONFIG):
        return Path(env[ENV_CONFIG]).expanduser()
    base = env.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "jobcloud" / "config.json"


def submissions_path(path: Path) -> Path:
    return path.with_name(path.stem + ".submissions.json")


def load_config(path: Path) -> ClientConfig:
    """The stored URL and token.

    Raises:
        ConfigMissing: nothing stored yet.
        ConfigInvalid: the file is unreadable or lacks a field.
    """
    data = _read_json(path)
    if data is None:
        raise ConfigMissing(f"not logged in (no {path}): run jobcloud login URL")
    if not isinstance(data, dict) or not data.get("url") or not data.get("token"):
        raise ConfigInvalid(f"{path} lacks url or token: run jobcloud login URL")
    return ClientConfig(url=str(data["url"]), token=str(data["token"]))


def stored_url(path: Path) -> str | None:
    """The URL of an earlier login, if any (a new login defaults to it)."""
    try:
        data = _read_json(path)
    except ConfigInvalid:
        return None
    return data.get("url") if isinstance(data, dict) else None


def save_config(path: Path, cfg: ClientConfig) -> None:
    _write_json(path, {"url": cfg.url, "token": cfg.token})


def record_submission(path: Path, job_id: str, record: dict) -> None:
    """Remember how job `job_id` was submitted (absolute paths and settings) for `resubmit`."""
    rec_path = submissions_path(path)
    records = _read_json(rec_path) or {}
    records[job_id] = record
    if len(records) > MAX_SUBMISSIONS:
        records = dict(list(records.items())[-MAX_SUBMISSIONS:])
    _write_json(rec_path, records)


def find_submission(path: Path, job_id: str) -> dict | None:
    records = _read_json(submissions_path(path)) or {}
    return records.get(job_id) if isinstance(records, dict) else None


def _read_json(path: Path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ConfigInvalid(f"cannot read {path}: {e}") from None


def _write_json(path: Path, data) -> None:
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
        try:
            # mkstemp creates the file 0600 already; chmod guards odd umasks/filesystems.
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=2)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    except OSError as e:
        raise ConfigInvalid(f"cannot write {path}: {e.strerror or e}") from None
