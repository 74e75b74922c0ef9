"""Each clone's identity, handed to it at first boot as a NoCloud seed ISO.

The template holds no identity and no secrets; a clone learns who it is from
a small ISO (volume label "cidata") attached as a read-only cdrom. The format
is cloud-init's NoCloud ("meta-data" + "user-data"), so a cloud-init image
would take the same seed, but the template reads it with its own small
first-boot unit (vm_provisioning/guest/firstboot), which reads the extra
"jobcloud" file: cloud-init costs several seconds of Python start-up under
software emulation and many packages in the template. See docs/VMS.md.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit

from .errors import ConfigError, SeedError

SEED_LABEL = "cidata"
# RFC 1123 host name label: what `hostname` and DHCP accept.
_HOSTNAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_WORKER_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")  # the proxy takes 1-64


@dataclass(frozen=True)
class Identity:
    """Who one clone is: everything that differs between two clones of a template."""

    instance_id: str
    hostname: str
    worker_name: str
    proxy_url: str
    enrollment_token: str
    slots: int | None = None


def write_seed(path: Path, identity: Identity) -> Path:
    """Write `identity` as a NoCloud seed ISO at `path` (mode 0600: it holds a token).

    Returns:
        path.
    Raises:
        ConfigError: a field of the identity is not usable (bad hostname, URL, token).
        SeedError: genisoimage/xorriso is missing or failed.
    """
    _check(identity)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="jobcloud-seed-") as tmp:
        files = _seed_files(identity)
        for name, text in files.items():
            (Path(tmp) / name).write_text(text)
        partial = path.with_name(path.name + ".partial")
        # Made 0600 before anything is written into it: the ISO holds the token.
        partial.unlink(missing_ok=True)
        os.close(os.open(partial, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600))
        _make_iso(partial, Path(tmp), list(files))
    partial.chmod(0o600)
    partial.replace(path)
    return path


def _check(identity: Identity) -> None:
    if not _HOSTNAME.fullmatch(identity.hostname):
        raise ConfigError(f"hostname {identity.hostname!r} is not a valid host name "
                          "(lowercase letters, digits and '-', at most 63)")
    url = urlsplit(identity.proxy_url)
    if url.scheme not in ("http", "https") or not url.hostname or \
            any(c.isspace() or ord(c) < 32 for c in identity.proxy_url):
        raise ConfigError(f"proxy_url {identity.proxy_url!r} must be an http(s) URL")
    if not identity.enrollment_token:
        raise ConfigError("an enrollment token is required in the identity")
    if not identity.instance_id or not _WORKER_NAME.fullmatch(identity.worker_name):
        raise ConfigError("instance_id must be set and worker_name be 1-64 letters, digits,"
                          " '.', '_' or '-'")
    if identity.slots is not None and not 1 <= identity.slots <= 64:
        raise ConfigError("slots must be between 1 and 64")


def _seed_files(identity: Identity) -> dict[str, str]:
    worker = {"proxy_url": identity.proxy_url, "enrollment_token": identity.enrollment_token,
              "name": identity.worker_name}
    if identity.slots is not None:
        worker["slots"] = identity.slots
    jobcloud = dict(asdict(identity), name=identity.worker_name)
    del jobcloud["worker_name"]
    # JSON is valid YAML: cloud-init reads these without a YAML writer here.
    meta = {"instance-id": identity.instance_id, "local-hostname": identity.hostname}
    user = {"hostname": identity.hostname, "preserve_hostname": False,
            "write_files": [{"path": "/etc/jobcloud/worker.json", "permissions": "0600",
                             "content": json.dumps(worker)}]}
    return {"meta-data": json.dumps(meta) + "\n",
            "user-data": "#cloud-config\n" + json.dumps(user, indent=1) + "\n",
            "jobcloud": json.dumps(jobcloud, indent=1) + "\n"}


def _make_iso(out: Path, src: Path, names: list[str]) -> None:
    # Rock Ridge + Joliet keep the lower-case names with '-' that NoCloud expects.
    if shutil.which("genisoimage"):
        cmd = ["genisoimage"]
    elif shutil.which("xorriso"):
        cmd = ["xorriso", "-as", "mkisofs"]
    else:
        raise SeedError("neither genisoimage nor xorriso is installed: "
                        "apt-get install genisoimage (scripts/system-deps.sh does)")
    cmd += ["-quiet", "-output", str(out), "-volid", SEED_LABEL, "-joliet", "-rock",
            *[str(src / n) for n in names]]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SeedError(f"{cmd[0]} failed to write the seed {out}: {done.stderr.strip()[-500:]}")
