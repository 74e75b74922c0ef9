"""Where a clone's disk, seed and console log live, and how the template gets there.

Two ways, chosen by `storage_pool`:

- `StateDirStorage` (no pool, the default): the clone is a qemu-img linked clone in
  the scaler's state dir, beside its seed and console log, backed by the template
  disk where `build-template` left it. Nothing to define on the host; a second host
  needs the state dir and the template at the same paths (shared storage).
- `PoolStorage` (`storage_pool = NAME`): everything is a volume of the libvirt
  storage pool NAME on each host (created there as a dir pool if missing). The
  template's disk, kernel and initrd are uploaded once per host over the libvirt
  connection; each copy's volume name carries the sha256 of the file it came from,
  and a sidecar volume holding that hash is written only once the upload finished,
  so a copy is used when its sidecar names the local file's hash, and replaced by
  a fresh upload otherwise (an upload cut short, a copy tampered with). A new
  template is new volume names: clones of the old one keep their backing file,
  which is deleted once no volume in the pool is backed by it. A clone is a qcow2
  volume backed by the host's copy (libvirt runs qemu-img there); its seed is
  uploaded; its console log is a file QEMU writes in the pool's directory.

Both answer the same calls, so the scaler does not care which it has.
"""
from __future__ import annotations

import hashlib
import io
import logging
import subprocess
from dataclasses import dataclass
from pathlib import Path

from . import domain
from .errors import TemplateMissing, VMError
from .seed import Identity, write_seed

log = logging.getLogger(__name__)

# Files a VM owns, by suffix after its name.
DISK_SUFFIX = ".qcow2"
SEED_SUFFIX = "-seed.iso"
CONSOLE_SUFFIX = "-console.log"
# The tail of a failed VM's console log that is fetched from its host to keep: a
# boot's kernel and systemd messages fit many times over.
CONSOLE_TAIL_BYTES = 1024 * 1024
# Volumes of the template's copy: "<prefix>template-<sha256[:16]>-<file name>", and
# beside each "...<HASH_SUFFIX>" holding the full hash, written after the upload.
TEMPLATE_TAG = "template-"
HASH_SUFFIX = ".sha256"


@dataclass(frozen=True)
class ClonePaths:
    """A clone's files as its host sees them."""

    disk: str
    seed: str
    console: str


@dataclass(frozen=True)
class BootFiles:
    """The template's disk (the clones' backing file), kernel and initrd on a host."""

    disk: str
    kernel: str
    initrd: str


def for_config(config) -> StateDirStorage | PoolStorage:
    return PoolStorage(config) if config.storage_pool else StateDirStorage(config)


class StateDirStorage:
    """Clones as files in the state dir, backed by the template where it was built."""

    def __init__(self, config):
        self.state_dir = Path(config.state_dir)

    def describe(self, host) -> str:
        return f"state dir {self.state_dir}"

    def paths(self, host, name: str) -> ClonePaths:
        root = self.state_dir.resolve()
        return ClonePaths(disk=str(root / (name + DISK_SUFFIX)), seed=str(root / (name + SEED_SUFFIX)),
                          console=str(root / (name + CONSOLE_SUFFIX)))

    def boot_files(self, host, template: Path, manifest: dict) -> BootFiles:
        return BootFiles(disk=str((template / manifest["disk"]).resolve()),
                         kernel=str((template / manifest["kernel"]).resolve()),
                         initrd=str((template / manifest["initrd"]).resolve()))

    def clone(self, host, paths: ClonePaths, boot: BootFiles, manifest: dict) -> None:
        linked_clone(Path(boot.disk), Path(paths.disk))

    def put_seed(self, host, paths: ClonePaths, identity: Identity) -> None:
        write_seed(Path(paths.seed), identity)

    def keep_console(self, host, record, dest: Path) -> bool:
        console = Path(record.console_log)
        if not console.exists():
            return False
        console.replace(dest)
        return True

    def delete(self, host, record) -> None:
        for path in (record.disk, record.seed, record.console_log):
            Path(path).unlink(missing_ok=True)

    def leftovers(self, host, prefix: str) -> dict[str, list[str]]:
        return {}       # the scaler looks in the state dir itself

    def cleanup(self, host, name: str) -> None:
        pass


class PoolStorage:
    """Template copies and clones as volumes of one storage pool on each host."""

    def __init__(self, config):
        self.pool = config.storage_pool
        self.create_in = config.resolved_pool_dir
        self.state_dir = Path(config.state_dir)
        self.prefix = config.name_prefix
        # (path, size, mtime, inode) -> sha256: a multi-GiB template is hashed once per
        # change, not once per clone.
        self._hashes: dict[tuple, str] = {}

    def describe(self, host) -> str:
        return f"pool {self.pool}"

    def paths(self, host, name: str) -> ClonePaths:
        root = host.pool_path(self.pool, self.create_in)
        return ClonePaths(disk=f"{root}/{name}{DISK_SUFFIX}", seed=f"{root}/{name}{SEED_SUFFIX}",
                          console=f"{root}/{name}{CONSOLE_SUFFIX}")

    def boot_files(self, host, template: Path, manifest: dict) -> BootFiles:
        """The host's copies of the template's files, uploaded where missing or not matching.

        Raises:
            TemplateMissing: a template file is not there.
            VMError: the pool or an upload failed.
        """
        host.pool_path(self.pool, self.create_in)
        volumes = host.volumes(self.pool)
        files = {key: template / manifest[key] for key in ("disk", "kernel", "initrd")}
        for key, path in files.items():
            if not path.is_file():
                raise TemplateMissing(f"the template's {key} {path} is missing: run "
                                      "jobcloud-vm build-template")
        copies, uploaded = {}, False
        for key, path in files.items():
            copies[key], fresh = self._copy_on(host, volumes, path)
            uploaded |= fresh
        if uploaded:
            self._prune_templates(host, keep={Path(p).name for p in copies.values()})
        return BootFiles(**copies)

    def clone(self, host, paths: ClonePaths, boot: BootFiles, manifest: dict) -> None:
        host.create_overlay(self.pool, Path(paths.disk).name, boot.disk,
                            int(manifest["virtual_size_bytes"]))

    def put_seed(self, host, paths: ClonePaths, identity: Identity) -> None:
        # Made here (genisoimage), then uploaded; the local copy holds an enrollment
        # token, so it goes whatever happens.
        local = self.state_dir / Path(paths.seed).name
        try:
            write_seed(local, identity)
            with open(local, "rb") as f:
                host.upload(self.pool, local.name, f, local.stat().st_size)
        finally:
            local.unlink(missing_ok=True)

    def keep_console(self, host, record, dest: Path) -> bool:
        tail = host.download(self.pool, Path(record.console_log).name, CONSOLE_TAIL_BYTES)
        if not tail:
            return False
        dest.write_bytes(tail)
        return True

    def delete(self, host, record) -> None:
        self.cleanup(host, record.name)
        (self.state_dir / (record.name + SEED_SUFFIX)).unlink(missing_ok=True)

    def leftovers(self, host, prefix: str) -> dict[str, list[str]]:
        """Volumes in the pool named for a VM: VM name -> their paths."""
        found: dict[str, list[str]] = {}
        for vol, path in self._volumes(host).items():
            name = vol[:len(prefix) + 10]
            if domain.is_our_name(name, prefix) and vol[len(name):] in (
                    DISK_SUFFIX, SEED_SUFFIX, CONSOLE_SUFFIX):
                found.setdefault(name, []).append(path)
        return found

    def cleanup(self, host, name: str) -> None:
        # A refresh first: libvirt learns of the console log, which QEMU made, only then.
        volumes = self._volumes(host)
        for suffix in (DISK_SUFFIX, SEED_SUFFIX, CONSOLE_SUFFIX):
            if name + suffix in volumes:
                host.delete_volume(self.pool, name + suffix)

    # ------------------------------------------------------------------ helpers

    def _volumes(self, host) -> dict[str, str]:
        """The pool's volumes; none on a host that has no such pool yet."""
        try:
            return host.volumes(self.pool)
        except VMError as e:
            if not host.reachable:
                raise       # LibvirtUnreachable: the caller leaves the host out
            log.debug("no volumes of pool %s on %s: %s", self.pool, host.uri, e)
            return {}

    def _copy_on(self, host, volumes: dict[str, str], path: Path) -> tuple[str, bool]:
        """The host's copy of `path` and whether it was uploaded now."""
        digest = self._sha256(path)
        name = f"{self.prefix}{TEMPLATE_TAG}{digest[:16]}-{path.name}"
        if name in volumes and name + HASH_SUFFIX in volumes and \
                host.download(self.pool, name + HASH_SUFFIX, 128).decode(errors="replace") == digest:
            return volumes[name], False
        # The sidecar goes first: a copy without one is never taken for complete.
        host.delete_volume(self.pool, name + HASH_SUFFIX)
        size = path.stat().st_size
        log.info("uploading %s (%d MiB, sha256 %s) to pool %s on %s", path.name, size // 2**20,
                 digest[:12], self.pool, host.uri)
        with open(path, "rb") as f:
            copy = host.upload(self.pool, name, f, size, mode=0o644)
        host.upload(self.pool, name + HASH_SUFFIX, io.BytesIO(digest.encode()), len(digest), mode=0o644)
        return copy, True

    def _prune_templates(self, host, keep: set[str]) -> None:
        """Delete older template copies that no volume in the pool is backed by."""
        volumes = host.volumes(self.pool)
        tag = self.prefix + TEMPLATE_TAG
        old = {n: p for n, p in volumes.items()
               if n.startswith(tag) and not n.endswith(HASH_SUFFIX) and n not in keep}
        if not old:
            return
        backing = {host.volume_backing(self.pool, n) for n in volumes if n.endswith(DISK_SUFFIX)
                   and not n.startswith(tag)}
        for name, path in old.items():
            if path not in backing:
                log.info("deleting the old template copy %s on %s", name, host.uri)
                host.delete_volume(self.pool, name + HASH_SUFFIX)
                host.delete_volume(self.pool, name)

    def _sha256(self, path: Path) -> str:
        st = path.stat()
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
        if key not in self._hashes:
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            self._hashes[key] = h.hexdigest()
        return self._hashes[key]


def linked_clone(base: Path, clone: Path) -> None:
    """A qcow2 overlay on `base`: instant and ~200 KB whatever the template's size.

    qemu-img rather than libvirt's storage-volume API in the state-dir way: the
    clone sits next to its seed and console log, with no storage pool to define
    and keep in step, and `-F` pins the backing format so QEMU never probes it.
    The base is opened read-only and never written: every write lands in the clone.

    Raises:
        TemplateMissing: the template disk is not there.
        VMError: qemu-img failed.
    """
    base = Path(base).resolve()
    if not base.is_file():
        raise TemplateMissing(f"the template disk {base} is missing: run jobcloud-vm build-template")
    clone.parent.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base),
                               "-F", "qcow2", str(clone)], capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise VMError("qemu-img is not installed: apt-get install qemu-utils") from None
    if done.returncode != 0:
        raise VMError(f"qemu-img could not clone {base}: {done.stderr.strip()[-300:]}")
    # Whatever the umask: the clone will hold its worker's secret.
    clone.chmod(0o600)
