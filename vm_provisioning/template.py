"""The worker VM template: a bootable Debian 12 disk with Docker, the worker and
the job images, built without installer media, plus a manifest of what is in it.

How it is built, and why this way:
1. debootstrap Debian with a kernel, systemd, docker.io and the worker's Python
   dependencies (Debian's own packages: the guest needs no pip and no network).
   The result is cached as a tarball keyed by the package list, so changing the
   worker or an image does not download Debian again.
2. Add the worker package (with the shared settings loader, jobcloud_config.py),
   its systemd unit and the first-boot unit that gives a clone its identity
   from a NoCloud seed (vm_provisioning/seed.py).
3. Bake the job images into the guest's Docker storage with a second, temporary
   dockerd on this host whose --data-root is inside the rootfs: importing them
   inside the guest at boot takes minutes under software emulation.
4. Scrub anything that identifies one machine (machine-id, hostname, Docker's
   key, the host's resolv.conf): every clone gets its own at first boot.
5. Make the disk without loop mounts or root-only block devices:
   `mkfs.ext4 -d ROOTFS` on a sparse raw file, then `qemu-img convert` to qcow2.
   The kernel and initrd are copied out for direct kernel boot (no bootloader).

A rebuild whose inputs (package list, guest files, worker source, this module,
image ids) are unchanged returns the existing manifest at once. Template files
carry the input hash in their names, so a rebuild never rewrites a disk that
running clones use as their backing file; files older than the previous build
are removed.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from .errors import BuildError, TemplateMissing

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DIR = ROOT / "var-vm" / "template"
# Debootstrapped base tarballs and build work dirs (same filesystem as the output).
DEFAULT_CACHE = ROOT / "var-vm" / "cache"
GUEST_DIR = Path(__file__).resolve().parent / "guest"
WORKER_DIR = ROOT / "worker"
# The settings loader, the data-directory privacy and the archive rule the
# deployables share (stdlib-only files): the guest gets them beside the worker
# package, on the worker's PYTHONPATH (/opt/jobcloud).
SHARED_MODULES = (ROOT / "jobcloud_config.py", ROOT / "jobcloud_datadir.py",
                  ROOT / "jobcloud_archive.py")
DEFAULT_IMAGES = ("jobcloud/python", "jobcloud/ml")

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
# What the guest runs: a kernel and systemd, Docker, and the worker's Python
# dependencies as Debian packages (requests, docker SDK, psutil). apparmor: Debian's
# kernel enables AppArmor, and dockerd then refuses to start containers unless it
# can load its docker-default profile (which also confines every job). e2fsprogs:
# mkfs.ext4 makes each job's own disk, the worker's disk quota (worker/jobdisk.py).
PACKAGES = (
    "linux-image-amd64", "initramfs-tools", "systemd-sysv", "udev", "kmod", "iproute2",
    "apparmor", "docker.io", "python3", "python3-requests", "python3-docker", "python3-psutil",
    "e2fsprogs",
)
# Bumped when the base rootfs is made differently with the same packages.
BASE_FORMAT = 1
# Free space in the guest's filesystem beyond what the template holds: job
# inputs, outputs and the containers' writable layers live there.
HEADROOM_BYTES = 4 * 1024**3
# Modules the initrd must hold to find the root filesystem on a virtio disk.
INITRD_MODULES = ("virtio_pci", "virtio_blk", "ext4")
CMDLINE = "root=/dev/vda rw console=ttyS0 loglevel=4"
# Timers and jobs that only cost CPU in a short-lived VM under emulation.
MASKED_UNITS = ("apt-daily.timer", "apt-daily-upgrade.timer", "dpkg-db-backup.timer",
                "e2scrub_all.timer", "e2scrub_reap.service", "fstrim.timer")
MANIFEST = "manifest.json"


def build_template(out_dir: Path = DEFAULT_DIR, images=DEFAULT_IMAGES, *,
                   cache_dir: Path = DEFAULT_CACHE, suite: str = SUITE, mirror: str = MIRROR,
                   headroom_bytes: int = HEADROOM_BYTES, force: bool = False) -> dict:
    """Build the worker VM template into `out_dir`, or return the current one
    when nothing it is made from changed.

    Args:
        out_dir: where the disk, kernel, initrd and manifest.json go.
        images: job images on this host's Docker engine to bake into the guest.
        cache_dir: debootstrap tarballs and build work dirs.
        force: rebuild even when the input hash matches.
    Returns:
        The manifest (see `load_manifest`).
    Raises:
        BuildError: not root, a tool missing, an image missing, or a build step failed.
    """
    out_dir, cache_dir = Path(out_dir), Path(cache_dir)
    _check_tools()
    image_ids = _image_ids(list(images))
    inputs = _inputs(suite, mirror, image_ids, headroom_bytes)
    input_hash = _sha256_bytes(json.dumps(inputs, sort_keys=True).encode())
    with _build_lock(out_dir):
        if not force:
            current = _current(out_dir, input_hash)
            if current is not None:
                log.info("template in %s is up to date (%s)", out_dir, input_hash[:12])
                return current
        return _build(out_dir, cache_dir, image_ids, inputs, input_hash, suite, mirror,
                      headroom_bytes)


@contextlib.contextmanager
def _build_lock(out_dir: Path):
    """One build of a template dir at a time: two builds would write the same
    `.partial` files. The second (another `build-template`, or test files run in
    parallel) waits, then finds the first one's template current."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(out_dir.parent / f".{out_dir.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _build(out_dir: Path, cache_dir: Path, image_ids: dict, inputs: dict, input_hash: str,
           suite: str, mirror: str, headroom_bytes: int) -> dict:
    started = time.monotonic()
    out_dir.mkdir(parents=True, exist_ok=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="build-", dir=cache_dir))
    try:
        rootfs = work / "rootfs"
        rootfs.mkdir()
        base = _base_tarball(cache_dir, suite, mirror)
        _run(["tar", "-C", str(rootfs), "--numeric-owner", "--xattrs", "-xf", str(base)],
             "unpacking the base rootfs")
        _install_guest(rootfs, image_ids)
        _bake_images(rootfs, image_ids, work)
        _scrub_identity(rootfs)
        contents = _contents(rootfs, suite, image_ids)
        manifest = _write_outputs(rootfs, work, out_dir, input_hash, headroom_bytes)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    manifest.update(contents=contents, input_hash=input_hash, inputs=inputs,
                    built_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    build_seconds=round(time.monotonic() - started, 1))
    _publish(out_dir, manifest)
    log.info("template built in %.0f s: %s", manifest["build_seconds"], out_dir / MANIFEST)
    return manifest


def load_manifest(template_dir: Path = DEFAULT_DIR) -> dict:
    """The manifest of the template in `template_dir`, checked to be usable.

    Keys: disk, kernel, initrd (file names in template_dir), cmdline,
    disk_format ("qcow2"), virtual_size_bytes, files {name: {size, sha256}},
    contents {debian, packages, images}, input_hash, built_at.

    Raises:
        TemplateMissing: no manifest, an unreadable one, or a file it names is absent.
    """
    template_dir = Path(template_dir)
    path = template_dir / MANIFEST
    hint = "build it with `make vm-template` (or `jobcloud-vm build-template`)"
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise TemplateMissing(f"no worker VM template in {template_dir} ({MANIFEST} is "
                              f"missing): {hint}") from None
    except (OSError, ValueError) as e:
        raise TemplateMissing(f"the template manifest {path} cannot be read ({e}): {hint}") from e
    for key in ("disk", "kernel", "initrd"):
        name = manifest.get(key)
        if not name or not (template_dir / name).is_file():
            raise TemplateMissing(f"the template in {template_dir} lacks its {key} file "
                                  f"({name or 'not named in the manifest'}): {hint}")
    return manifest


# ------------------------------------------------------------------- inputs

def _check_tools() -> None:
    if os.geteuid() != 0:
        raise BuildError("building the VM template needs root (debootstrap, chroot, dockerd)")
    for tool, package in (("debootstrap", "debootstrap"), ("mkfs.ext4", "e2fsprogs"),
                          ("qemu-img", "qemu-utils"), ("dockerd", "docker.io"),
                          ("docker", "docker.io"), ("chroot", "coreutils")):
        if shutil.which(tool) is None:
            raise BuildError(f"{tool} is missing: apt-get install {package} "
                             "(scripts/system-deps.sh installs what the build needs)")


def _image_ids(images: list[str]) -> dict[str, str]:
    if not images:
        raise BuildError("at least one job image must be baked into the template")
    ids = {}
    for name in images:
        done = subprocess.run(["docker", "image", "inspect", "-f", "{{.Id}}", name],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise BuildError(f"image {name} is not on this host's Docker engine: build it with "
                             f"`make images` ({done.stderr.strip()[-200:]})")
        ids[name] = done.stdout.strip()
    return ids


def _inputs(suite: str, mirror: str, image_ids: dict, headroom_bytes: int) -> dict:
    """Everything the template is made from, hashed into its input_hash."""
    sources = {p.relative_to(ROOT).as_posix(): _sha256_file(p) for p in _source_files()}
    return {"suite": suite, "mirror": mirror, "packages": list(PACKAGES),
            "base_format": BASE_FORMAT, "images": image_ids, "headroom_bytes": headroom_bytes,
            "cmdline": CMDLINE, "sources": sources}


def _source_files() -> list[Path]:
    files = [Path(__file__).resolve(), *sorted(p for p in GUEST_DIR.iterdir() if p.is_file())]
    return files + sorted(WORKER_DIR.glob("*.py")) + list(SHARED_MODULES)


def _current(out_dir: Path, input_hash: str) -> dict | None:
    try:
        manifest = load_manifest(out_dir)
    except TemplateMissing:
        return None
    if manifest.get("input_hash") != input_hash:
        return None
    for name, facts in manifest.get("files", {}).items():
        path = out_dir / name
        if not path.is_file() or path.stat().st_size != facts["size"]:
            return None
    return manifest


# ------------------------------------------------------------------ rootfs

def _base_tarball(cache_dir: Path, suite: str, mirror: str) -> Path:
    """The debootstrapped rootfs with PACKAGES, cached by what it is made from."""
    key = _sha256_bytes(json.dumps([suite, mirror, PACKAGES, BASE_FORMAT]).encode())[:16]
    tarball = cache_dir / f"base-{suite}-{key}.tar"
    if tarball.is_file():
        return tarball
    rootfs = Path(tempfile.mkdtemp(prefix="debootstrap-", dir=cache_dir))
    try:
        log.info("debootstrap %s with %s (a few minutes, once)", suite, ", ".join(PACKAGES))
        logfile = cache_dir / "debootstrap.log"
        with open(logfile, "w") as out:
            done = subprocess.run(["debootstrap", "--variant=minbase",
                                   f"--include={','.join(PACKAGES)}", suite, str(rootfs), mirror],
                                  stdout=out, stderr=subprocess.STDOUT)
        if done.returncode != 0:
            raise BuildError(f"debootstrap failed; see {logfile}")
        _check_initrd_modules(rootfs)
        # Package caches and lists are not needed in the guest and only grow the disk.
        for pattern in ("var/cache/apt/archives/*.deb", "var/lib/apt/lists/*_Packages"):
            for p in rootfs.glob(pattern):
                p.unlink()
        partial = tarball.with_suffix(".partial")
        _run(["tar", "-C", str(rootfs), "--numeric-owner", "--xattrs", "-cf", str(partial), "."],
             "archiving the base rootfs")
        partial.replace(tarball)
    finally:
        shutil.rmtree(rootfs, ignore_errors=True)
    for old in cache_dir.glob(f"base-{suite}-*.tar"):
        if old != tarball:
            old.unlink()
    return tarball


def _check_initrd_modules(rootfs: Path) -> None:
    """Debian's initrd (MODULES=most) holds the virtio and ext4 modules; check it,
    so that a changed default cannot make a template that does not boot."""
    initrd = _newest(rootfs / "boot", "initrd.img-*")
    listing = _chroot(rootfs, ["lsinitramfs", f"/boot/{initrd.name}"], "listing the initrd")
    missing = [m for m in INITRD_MODULES if f"/{m}.ko" not in listing]
    if missing:
        raise BuildError(f"the initrd {initrd.name} lacks the modules {', '.join(missing)}")


def _install_guest(rootfs: Path, image_ids: dict) -> None:
    """The worker package, its units, networking and Docker's settings."""
    opt = rootfs / "opt/jobcloud/worker"
    opt.mkdir(parents=True)
    for src in WORKER_DIR.glob("*.py"):
        shutil.copy2(src, opt / src.name)
    for src in SHARED_MODULES:
        shutil.copy2(src, opt.parent / src.name)
    _chroot(rootfs, ["python3", "-m", "compileall", "-q", "/opt/jobcloud"],
            "compiling the worker")
    _put(rootfs, "usr/lib/jobcloud/firstboot", "firstboot", 0o755)
    _put(rootfs, "etc/systemd/system/jobcloud-firstboot.service", "jobcloud-firstboot.service")
    _put(rootfs, "etc/systemd/system/jobcloud-worker.service", "jobcloud-worker.service")
    _put(rootfs, "etc/systemd/network/80-dhcp.network", "80-dhcp.network")
    _put(rootfs, "etc/docker/daemon.json", "daemon.json")
    _put(rootfs, "etc/fstab", "fstab")
    (rootfs / "etc/jobcloud").mkdir(exist_ok=True)
    (rootfs / "etc/jobcloud/template.env").write_text(
        "# The job images baked into this template.\n"
        f"JOBCLOUD_WORKER_IMAGES={','.join(image_ids)}\n")
    units = ["jobcloud-firstboot.service", "jobcloud-worker.service", "systemd-networkd.service",
             "docker.service"]
    _run(["systemctl", f"--root={rootfs}", "enable", *units], "enabling the guest's units")
    _run(["systemctl", f"--root={rootfs}", "mask", *MASKED_UNITS], "masking timers")


def _put(rootfs: Path, dest: str, name: str, mode: int = 0o644) -> None:
    target = rootfs / dest
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(GUEST_DIR / name, target)
    target.chmod(mode)


def _bake_images(rootfs: Path, image_ids: dict, work: Path) -> None:
    """`docker save | docker load` into a temporary dockerd whose storage is the guest's."""
    sock = work / "docker.sock"
    (work / "daemon.json").write_text("{}\n")
    # Short paths: containerd's sockets live under exec-root (108-byte socket path limit).
    exec_root = Path(tempfile.mkdtemp(prefix="jcx-"))
    with open(work / "dockerd.log", "w") as logf:
        daemon = subprocess.Popen(
            ["dockerd", "--config-file", str(work / "daemon.json"),
             "--data-root", str(rootfs / "var/lib/docker"), "--exec-root", str(exec_root),
             "--pidfile", str(work / "docker.pid"), "--host", f"unix://{sock}",
             "--bridge=none", "--iptables=false", "--ip-masq=false",
             "--storage-driver=overlay2", "--containerd-namespace=jobcloud-template",
             "--containerd-plugins-namespace=jobcloud-template-plugins"],
            stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
    docker = ["docker", "-H", f"unix://{sock}"]
    try:
        _wait_docker(docker, daemon, work / "dockerd.log")
        log.info("baking %s into the guest's Docker storage", ", ".join(image_ids))
        save = subprocess.Popen(["docker", "save", *image_ids], stdout=subprocess.PIPE)
        load = subprocess.run([*docker, "load", "-q"], stdin=save.stdout, capture_output=True,
                              text=True)
        save.stdout.close()
        if save.wait() != 0 or load.returncode != 0:
            raise BuildError(f"docker save | docker load failed: {load.stderr.strip()[-300:]}")
        for name, image_id in image_ids.items():
            got = _run([*docker, "image", "inspect", "-f", "{{.Id}}", name], "checking images")
            if got.strip() != image_id:
                raise BuildError(f"{name} in the guest is {got.strip()}, expected {image_id}")
    finally:
        if daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(timeout=60)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
        shutil.rmtree(exec_root, ignore_errors=True)
    # State of the temporary daemon that the guest's own dockerd recreates.
    for name in ("containerd", "network", "runtimes", "tmp", "buildkit", "swarm"):
        shutil.rmtree(rootfs / "var/lib/docker" / name, ignore_errors=True)


def _wait_docker(docker: list[str], daemon: subprocess.Popen, logfile: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if daemon.poll() is not None:
            raise BuildError(f"the temporary dockerd exited: {logfile.read_text()[-800:]}")
        if subprocess.run([*docker, "info"], capture_output=True).returncode == 0:
            return
        time.sleep(0.25)
    raise BuildError(f"the temporary dockerd did not answer within 60 s; see {logfile}")


def _scrub_identity(rootfs: Path) -> None:
    """No machine-id, hostname, keys or host files: each clone makes its own."""
    # An empty machine-id makes systemd generate a fresh one at the clone's first boot.
    (rootfs / "etc/machine-id").write_text("")
    (rootfs / "var/lib/dbus/machine-id").unlink(missing_ok=True)
    # debootstrap copies the build host's hostname and resolv.conf.
    (rootfs / "etc/hostname").write_text("localhost\n")
    (rootfs / "etc/hosts").write_text("127.0.0.1\tlocalhost\n::1\tlocalhost\n")
    (rootfs / "etc/resolv.conf").unlink(missing_ok=True)
    (rootfs / "etc/resolv.conf").write_text("")
    (rootfs / "etc/docker/key.json").unlink(missing_ok=True)
    for p in rootfs.glob("etc/ssh/ssh_host_*"):
        p.unlink()
    shutil.rmtree(rootfs / "var/lib/jobcloud-worker", ignore_errors=True)
    (rootfs / "etc/jobcloud/worker.json").unlink(missing_ok=True)
    # systemd's random seed would be shared by every clone.
    (rootfs / "var/lib/systemd/random-seed").unlink(missing_ok=True)


def _contents(rootfs: Path, suite: str, image_ids: dict) -> dict:
    versions = _run(["dpkg-query", f"--admindir={rootfs}/var/lib/dpkg", "-W",
                     "-f", "${Package} ${Version}\n"], "listing packages")
    installed = dict(line.split(" ", 1) for line in versions.splitlines() if line)
    return {"debian": f"{suite} {(rootfs / 'etc/debian_version').read_text().strip()}",
            "kernel": _newest(rootfs / "boot", "vmlinuz-*").name.removeprefix("vmlinuz-"),
            "packages": {p: installed.get(p) for p in PACKAGES},
            "package_count": len(installed),
            "images": image_ids}


# ------------------------------------------------------------------ outputs

def _write_outputs(rootfs: Path, work: Path, out_dir: Path, input_hash: str,
                   headroom_bytes: int) -> dict:
    tag = input_hash[:12]
    names = {"disk": f"worker-{tag}.qcow2", "kernel": f"vmlinuz-{tag}",
             "initrd": f"initrd-{tag}.img"}
    shutil.copyfile(_newest(rootfs / "boot", "vmlinuz-*"), out_dir / names["kernel"])
    shutil.copyfile(_newest(rootfs / "boot", "initrd.img-*"), out_dir / names["initrd"])
    used = int(_run(["du", "-sb", "--apparent-size", str(rootfs)], "sizing the rootfs").split()[0])
    # ext4 metadata and the reserved blocks take ~10%; round up to whole GiB.
    size = -(-(int(used * 1.15) + headroom_bytes) // 1024**3) * 1024**3
    raw = work / "disk.raw"
    log.info("making a %d GiB ext4 disk from %d MiB of files", size // 1024**3, used // 1024**2)
    with open(raw, "wb") as f:
        f.truncate(size)
    _run(["mkfs.ext4", "-q", "-F", "-L", "jobcloud-root", "-m", "1", "-d", str(rootfs),
          str(raw)], "making the ext4 filesystem")
    partial = out_dir / (names["disk"] + ".partial")
    _run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(partial)],
         "converting the disk to qcow2")
    partial.replace(out_dir / names["disk"])
    files = {}
    for name in names.values():
        # libvirt's QEMU runs as libvirt-qemu: the template must be world-readable.
        (out_dir / name).chmod(0o644)
        files[name] = {"size": (out_dir / name).stat().st_size,
                       "sha256": _sha256_file(out_dir / name)}
    return dict(names, cmdline=CMDLINE, disk_format="qcow2", virtual_size_bytes=size,
                files=files)


def _publish(out_dir: Path, manifest: dict) -> None:
    """Swap the manifest in, keep the previous build's files (clones may still use
    them as backing files), remove anything older."""
    path = out_dir / MANIFEST
    keep = set(manifest["files"]) | {MANIFEST}
    try:
        keep |= set(json.loads(path.read_text()).get("files", {}))
    except (OSError, ValueError):
        pass
    tmp = out_dir / (MANIFEST + ".partial")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.chmod(0o644)
    tmp.replace(path)
    out_dir.chmod(0o755)
    for p in out_dir.iterdir():
        if p.name not in keep and p.is_file():
            p.unlink()


# ------------------------------------------------------------------ helpers

def _chroot(rootfs: Path, cmd: list[str], what: str) -> str:
    return _run(["chroot", str(rootfs), *cmd], what,
                env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"})


def _run(cmd: list[str], what: str, env: dict | None = None) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise BuildError(f"{what} failed ({' '.join(cmd[:3])} ... exit {done.returncode}): "
                         f"{(done.stderr or done.stdout).strip()[-500:]}")
    return done.stdout


def _newest(directory: Path, pattern: str) -> Path:
    found = sorted(directory.glob(pattern))
    if not found:
        raise BuildError(f"no {pattern} in {directory}: is linux-image-amd64 installed?")
    return found[-1]


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1024 * 1024), b""):
            h.update(chunk)
    return h.hexdigest()


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
