"""The Debian-installer preseed: well-formed for debconf, and every package it
installs exists in Debian bookworm's archive (as this machine's apt lists,
which point at deb.debian.org, see it). The full unattended install is a
manual command (preseed/README.md): it takes over an hour under emulation.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import require

PRESEED = Path(__file__).resolve().parent.parent / "preseed" / "preseed.cfg"
SUITE = "bookworm"


def selections(text: str) -> dict[str, str]:
    """question -> value, with d-i's backslash line continuations joined."""
    joined = re.sub(r"\\\n\s*", " ", text)
    out = {}
    for line in joined.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            owner, question, _type, *value = line.split(None, 3)
            out[question] = value[0] if value else ""
    return out


def in_archive(package: str) -> bool:
    """True when apt knows `package` from a bookworm archive (not only as installed here)."""
    done = subprocess.run(["apt-cache", "policy", package], capture_output=True, text=True)
    return any(re.search(rf"\s\d+\s+\S+\s+{SUITE}(-updates|-security)?/\w+", line)
               for line in done.stdout.splitlines())


@pytest.fixture(scope="module")
def apt_lists():
    require(shutil.which("apt-cache") is not None, "apt-cache is not installed")
    if not in_archive("debconf") and os.geteuid() == 0:
        subprocess.run(["apt-get", "update", "-qq"], check=False, capture_output=True)
    require(in_archive("debconf"), f"apt's lists do not know Debian {SUITE}: run apt-get update")


def test_preseed_passes_debconf_checkonly(tmp_path):
    require(shutil.which("debconf-set-selections") is not None, "debconf is not installed")
    done = subprocess.run(["debconf-set-selections", "--checkonly", str(PRESEED)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    # The check is real: a line without a type is refused.
    broken = tmp_path / "broken.cfg"
    broken.write_text(PRESEED.read_text() + "\nd-i netcfg/get_hostname\n")
    assert subprocess.run(["debconf-set-selections", "--checkonly", str(broken)],
                          capture_output=True).returncode != 0


def test_preseed_is_unattended_and_installs_the_worker():
    s = selections(PRESEED.read_text())
    assert "finish-install/reboot_in_progress" in s   # no "installation complete" stop
    assert s["partman/confirm_nooverwrite"] == "true"
    assert s["passwd/root-login"] == "false"
    late = s["preseed/late_command"]
    assert "jobcloud-worker.tar.gz" in late
    assert re.search(r"systemctl enable .*jobcloud-worker\.service", late)


def test_every_preseeded_package_is_in_the_debian_archive(apt_lists):
    packages = selections(PRESEED.read_text())["pkgsel/include"].split()
    assert {"docker.io", "python3-docker", "python3-requests", "python3-psutil"} <= set(packages)
    missing = [p for p in packages if not in_archive(p)]
    assert missing == [], f"not in Debian {SUITE}: {missing}"
    # The lookup tells a misspelt name from a real one.
    assert not in_archive("docker.oi")
