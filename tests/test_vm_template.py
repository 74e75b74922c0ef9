"""The worker VM template: a real debootstrap build (cached by its input hash in
var-vm/test-template, so a machine builds it once), its manifest, a quick
no-op rebuild, no identity or secret inside, and the identity seed ISO.

The disk's files are read with debugfs on a raw copy: no mount, no loop device.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, require
from vm_provisioning.errors import ConfigError, TemplateMissing
from vm_provisioning.seed import Identity, write_seed
from vm_provisioning.template import MANIFEST, build_template, load_manifest

TEST_TEMPLATE = ROOT / "var-vm" / "test-template"
# Only the small image: the end-to-end VM tests run jobcloud/python jobs.
TEST_IMAGES = ["jobcloud/python"]


def template_tools_missing() -> str | None:
    if os.geteuid() != 0:
        return "building the VM template needs root"
    for tool in ("debootstrap", "mkfs.ext4", "qemu-img", "docker", "debugfs", "genisoimage"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (scripts/system-deps.sh)"
    if subprocess.run(["docker", "image", "inspect", *TEST_IMAGES], capture_output=True).returncode:
        return f"image {TEST_IMAGES} missing: scripts/build-images.sh python"
    return None


def ensure_test_template() -> dict:
    """Build (or reuse) the test template; shared with tests/test_vm_e2e.py."""
    missing = template_tools_missing()
    require(missing is None, missing or "")
    return build_template(TEST_TEMPLATE, TEST_IMAGES)


@pytest.fixture(scope="module")
def template():
    return ensure_test_template()


@pytest.fixture(scope="module")
def disk_files(template, tmp_path_factory):
    """read(path) -> the file's text in the template's filesystem, or None when absent."""
    raw = tmp_path_factory.mktemp("template") / "disk.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(TEST_TEMPLATE / template["disk"]),
                    str(raw)], check=True)

    def read(path: str) -> str | None:
        done = subprocess.run(["debugfs", "-R", f"cat {path}", str(raw)], capture_output=True)
        if b"File not found" in done.stderr:
            return None
        return done.stdout.decode()

    def listing(path: str) -> list[str]:
        done = subprocess.run(["debugfs", "-R", f"ls -l {path}", str(raw)], capture_output=True,
                              text=True)
        return [line.split()[-1] for line in done.stdout.splitlines() if line.strip()]

    read.listing = listing
    yield read
    raw.unlink()


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def test_manifest_describes_the_built_files(template):
    assert template == load_manifest(TEST_TEMPLATE)
    assert template["disk_format"] == "qcow2"
    assert "root=/dev/vda" in template["cmdline"] and "console=ttyS0" in template["cmdline"]
    assert set(template["files"]) == {template["disk"], template["kernel"], template["initrd"]}
    for name, facts in template["files"].items():
        path = TEST_TEMPLATE / name
        assert path.stat().st_size == facts["size"]
        assert sha256(path) == facts["sha256"]
        # libvirt's QEMU runs as libvirt-qemu: it must read the template.
        assert path.stat().st_mode & 0o004
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json",
                                      str(TEST_TEMPLATE / template["disk"])],
                                     capture_output=True, text=True, check=True).stdout)
    assert info["format"] == "qcow2" and "backing-filename" not in info
    assert info["virtual-size"] == template["virtual_size_bytes"]
    contents = template["contents"]
    assert contents["debian"].startswith("bookworm 12.")
    for package in ("linux-image-amd64", "systemd-sysv", "docker.io", "python3-docker",
                    "python3-requests", "python3-psutil"):
        assert contents["packages"][package], package
    image_id = subprocess.run(["docker", "image", "inspect", "-f", "{{.Id}}", TEST_IMAGES[0]],
                              capture_output=True, text=True, check=True).stdout.strip()
    assert contents["images"] == {TEST_IMAGES[0]: image_id}
    assert len(template["input_hash"]) == 64 and template["built_at"]


def test_rebuild_with_nothing_changed_is_quick_and_the_same(template):
    started = time.monotonic()
    again = build_template(TEST_TEMPLATE, TEST_IMAGES)
    assert time.monotonic() - started < 10
    assert again["input_hash"] == template["input_hash"]
    assert again["files"] == template["files"]
    assert again["built_at"] == template["built_at"]


def test_template_holds_no_identity_and_no_secrets(template, disk_files):
    assert disk_files("/etc/machine-id") == ""
    assert disk_files("/var/lib/dbus/machine-id") is None
    assert disk_files("/etc/hostname").strip() == "localhost"
    assert disk_files("/etc/resolv.conf") == ""
    for secret in ("/etc/jobcloud/worker.json", "/etc/docker/key.json",
                   "/var/lib/jobcloud-worker/worker-secret", "/var/lib/systemd/random-seed"):
        assert disk_files(secret) is None, secret
    assert not [n for n in disk_files.listing("/etc/ssh") if n.startswith("ssh_host_")]
    # What a clone needs to become itself and run jobs is there.
    assert "JOBCLOUD_WORKER_IMAGES=jobcloud/python" in disk_files("/etc/jobcloud/template.env")
    assert "class Worker" in disk_files("/opt/jobcloud/worker/daemon.py")
    # The settings loader beside it, on the worker's PYTHONPATH (/opt/jobcloud).
    assert "def layered(" in disk_files("/opt/jobcloud/jobcloud_config.py")
    # The archive rule the worker extracts datasets with (worker/inputs.py).
    assert "def extract(" in disk_files("/opt/jobcloud/jobcloud_archive.py")
    wants = disk_files.listing("/etc/systemd/system/multi-user.target.wants")
    assert {"jobcloud-firstboot.service", "jobcloud-worker.service", "docker.service"} <= set(wants)
    repositories = json.loads(disk_files("/var/lib/docker/image/overlay2/repositories.json"))
    assert "jobcloud/python" in repositories["Repositories"]


def test_load_manifest_says_what_is_missing(tmp_path, template):
    with pytest.raises(TemplateMissing, match="manifest.json is missing.*make vm-template"):
        load_manifest(tmp_path)
    (tmp_path / MANIFEST).write_text(json.dumps(template))
    with pytest.raises(TemplateMissing, match="lacks its disk file"):
        load_manifest(tmp_path)


def iso_files(path: Path) -> dict[str, str]:
    names = subprocess.run(["isoinfo", "-R", "-f", "-i", str(path)], capture_output=True,
                           text=True, check=True).stdout.split()
    return {n.lstrip("/"): subprocess.run(["isoinfo", "-R", "-x", n, "-i", str(path)],
                                          capture_output=True, text=True, check=True).stdout
            for n in names}


def test_write_seed_makes_a_nocloud_iso(tmp_path):
    require(shutil.which("genisoimage") or shutil.which("xorriso"), "genisoimage is not installed")
    require(shutil.which("isoinfo") is not None, "isoinfo is not installed (genisoimage)")
    identity = Identity(instance_id="3f1c-uuid", hostname="jc-0123456789", worker_name="jc-0123456789",
                        proxy_url="http://10.0.2.2:3000", enrollment_token="jce_secret", slots=2)
    path = write_seed(tmp_path / "seed.iso", identity)
    assert path.stat().st_mode & 0o777 == 0o600
    # The primary volume descriptor (sector 16) holds the volume label at byte 40.
    with open(path, "rb") as f:
        f.seek(16 * 2048 + 40)
        assert f.read(32).decode().strip() == "cidata"
    files = iso_files(path)
    assert set(files) == {"meta-data", "user-data", "jobcloud"}
    assert json.loads(files["meta-data"]) == {"instance-id": "3f1c-uuid",
                                              "local-hostname": "jc-0123456789"}
    assert files["user-data"].startswith("#cloud-config\n")
    assert json.loads(files["jobcloud"]) == {
        "instance_id": "3f1c-uuid", "hostname": "jc-0123456789", "name": "jc-0123456789",
        "proxy_url": "http://10.0.2.2:3000", "enrollment_token": "jce_secret", "slots": 2}


def test_write_seed_refuses_an_unusable_identity(tmp_path):
    good = dict(instance_id="i", hostname="vm-1", worker_name="vm-1",
                proxy_url="http://10.0.2.2:3000", enrollment_token="jce_x")
    for bad in ({"hostname": "Bad_Host"}, {"hostname": "vm-1\n"}, {"proxy_url": "10.0.2.2:3000"},
                {"proxy_url": "http://"}, {"proxy_url": "http://10.0.2.2:3000/\nx"},
                {"worker_name": "vm 1;reboot"}, {"worker_name": "w" * 65},
                {"enrollment_token": ""}, {"slots": 0}):
        with pytest.raises(ConfigError):
            write_seed(tmp_path / "s.iso", Identity(**dict(good, **bad)))
    assert not (tmp_path / "s.iso").exists()


def test_first_boot_refuses_a_seed_it_cannot_use_before_writing_anything():
    """The guest's first-boot script checks the whole seed first: a seed missing its
    token or with a bad host name must not leave a worker.json behind (the unit runs
    only while there is none)."""
    import importlib.machinery
    import importlib.util
    loader = importlib.machinery.SourceFileLoader(
        "jobcloud_firstboot", str(ROOT / "vm_provisioning" / "guest" / "firstboot"))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
    loader.exec_module(module)
    good = {"instance_id": "i-1", "hostname": "jc-0123456789", "name": "jc-0123456789",
            "proxy_url": "http://10.0.2.2:3000", "enrollment_token": "jce_x", "slots": 2}
    assert module.check_seed(good) is None
    for bad, says in [([], "not a JSON object"),
                      ({**good, "enrollment_token": ""}, "enrollment_token"),
                      ({**good, "hostname": "jc-1\n"}, "not a valid host name"),
                      ({**good, "proxy_url": "ftp://10.0.2.2"}, "http(s) URL"),
                      ({**good, "slots": "2"}, "slots")]:
        assert says in module.check_seed(bad)


def test_every_top_level_module_the_worker_imports_is_copied_into_the_guest():
    """The guest has no pip: a module beside the packages that worker/ imports
    (jobcloud_config, jobcloud_archive, ...) must be in the template's copy list,
    or the worker VM dies at its first import."""
    import ast

    from vm_provisioning.template import SHARED_MODULES, WORKER_DIR
    top_level = {p.stem for p in ROOT.glob("*.py")}
    imported = set()
    for source in WORKER_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Import):
                imported.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    assert "jobcloud_archive" in imported
    assert imported & top_level <= {p.stem for p in SHARED_MODULES}
