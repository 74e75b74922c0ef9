"""A job's own disk: everything the job can write on the worker's disk lies in
one filesystem of its own, so the kernel stops it at its quota (ENOSPC), while
it runs, whatever it writes: big files, many files, sparse files, directories.

How: a sparse file of `disk_mb` MiB in the job directory, made ext4
(mkfs.ext4: no journal, no blocks reserved for root, so the job gets all of
it), loop-mounted `nosuid,nodev` by the worker (which is root), with the
job's writable directory (/job/output in the container) inside it, owned by
the job's uid. The image is sparse: it takes on the worker's disk only what
the job wrote, never more than `disk_mb`. Removing it is an unmount and one
unlink, however many files the job made.

Whether the job filled it is sampled while it runs (statvfs, each poll of
the sandbox) and once after: a job that filled its disk and then removed
files is still reported as having hit the quota, if a sample saw it full.
"""
from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

from .errors import SandboxError

log = logging.getLogger(__name__)

IMAGE_NAME = "disk.img"
MOUNT_NAME = "disk"
WRITABLE_NAME = "output"
MOUNT_OPTIONS = "loop,nosuid,nodev,noatime"
# ext4's own data for a small filesystem (superblocks, group descriptors,
# inode tables, the root and lost+found directories): added to the image so a
# job gets the disk_mb it asked for. 4 % covers the inode tables of the
# default 16 KiB per inode (256 bytes each: 1.6 %) with room; 2 MiB is the
# floor for a tiny one.
OVERHEAD_FRACTION = 0.04
OVERHEAD_MIN_MB = 2
# Free space at or below this counts as full: ext4 answers ENOSPC with a few
# blocks still free (they are held back for its own use).
FULL_BELOW_BYTES = 256 * 1024
COMMAND_TIMEOUT_S = 60


class JobDisk:
    """One job's disk, under `job_dir`.

    Args:
        job_dir: the job's directory on the worker (holds the image and its mount point).
        size_mb: the job's quota, in MiB.
        owner: (uid, gid) that owns the writable directory.
    """

    def __init__(self, job_dir: Path, size_mb: int, owner: tuple[int, int]):
        self.image = job_dir / IMAGE_NAME
        self.mountpoint = job_dir / MOUNT_NAME
        self.writable = self.mountpoint / WRITABLE_NAME
        self.size_mb = size_mb
        self.owner = owner
        self.full = False
        self._mounted = False

    def create(self) -> Path:
        """Make, mount and open the disk; returns the job's writable directory.

        Raises:
            SandboxError: mkfs or mount failed (the job fails with it).
        """
        size = self.size_mb + max(OVERHEAD_MIN_MB, int(self.size_mb * OVERHEAD_FRACTION) + 1)
        with open(self.image, "xb") as f:
            f.truncate(size * 1024 * 1024)
        _run(["mkfs.ext4", "-q", "-F", "-m", "0", "-O", "^has_journal",
              "-E", "lazy_itable_init=1,nodiscard", str(self.image)], "make the job's disk")
        self.mountpoint.mkdir(mode=0o700)
        _run(["mount", "-t", "ext4", "-o", f"{MOUNT_OPTIONS},noinit_itable", str(self.image),
              str(self.mountpoint)], "mount the job's disk")
        self._mounted = True
        os.chmod(self.mountpoint, 0o755)
        self.writable.mkdir(mode=0o755)
        os.chown(self.writable, *self.owner)
        return self.writable

    def moved_to(self, job_dir: Path) -> None:
        """Its job directory was renamed (a waiting container's, given its job):
        the mount follows the rename, these paths must too."""
        self.image = job_dir / IMAGE_NAME
        self.mountpoint = job_dir / MOUNT_NAME
        self.writable = self.mountpoint / WRITABLE_NAME

    def sample(self) -> None:
        """Look whether the disk is full now (cheap: one statvfs)."""
        if not self._mounted or self.full:
            return
        try:
            st = os.statvfs(self.mountpoint)
        except OSError:
            return
        if st.f_bavail * st.f_frsize <= FULL_BELOW_BYTES or st.f_favail == 0:
            self.full = True

    def remove(self) -> None:
        """Unmount and delete the disk, with whatever the job left on it.

        Raises:
            SandboxError: it could not be unmounted (the image stays; the
                worker's next start-up sweep unmounts it).
        """
        if self._mounted:
            unmount(self.mountpoint)
            self._mounted = False
        self.image.unlink(missing_ok=True)


def make_job_dir(job_dir: Path, *, owner: tuple[int, int],
                 disk_mb: int | None) -> tuple[Path, Path, JobDisk | None]:
    """A job directory: input/ (read-only to the job) and the job's writable
    directory, on a disk of its own of `disk_mb` MiB (None: no quota).

    Returns:
        (input directory, writable directory, the disk or None).

    Raises:
        SandboxError: the disk could not be made (nothing of it is left mounted).
    """
    input_dir = job_dir / "input"
    for d in (job_dir, input_dir):
        d.mkdir(parents=True, mode=0o755)
        os.chmod(d, 0o755)  # whatever the umask: the job's uid must read the inputs
    if disk_mb is not None:
        disk = JobDisk(job_dir, disk_mb, owner)
        try:
            return input_dir, disk.create(), disk
        except SandboxError:
            try:
                disk.remove()
            except SandboxError as e:
                log.error("%s", e)
            raise
    output_dir = job_dir / WRITABLE_NAME
    output_dir.mkdir(mode=0o755)
    try:
        os.chown(output_dir, *owner)
    except PermissionError:
        # Not root: the job's user can still write when the directory is open to all.
        os.chmod(output_dir, 0o777)
    return input_dir, output_dir, None


def unmount(mountpoint: Path) -> None:
    """Unmount, lazily when something still holds it open (the loop device
    is freed once it is let go).

    Raises:
        SandboxError: neither way worked.
    """
    try:
        _run(["umount", str(mountpoint)], "unmount the job's disk")
    except SandboxError:
        _run(["umount", "--lazy", str(mountpoint)], "unmount the job's disk")


def mounts_under(directory: Path) -> list[Path]:
    """Mount points at or below `directory`, deepest first (what an earlier run left)."""
    prefix = os.path.realpath(directory).rstrip("/") + "/"
    found = []
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            for line in f:
                # Field 5 is the mount point, with space, tab, newline and
                # backslash written as octal escapes.
                point = line.split(b" ")[4].decode("unicode_escape").encode("latin-1")
                if (os.fsdecode(point) + "/").startswith(prefix):
                    found.append(Path(os.fsdecode(point)))
    except OSError:
        return []
    return sorted(found, key=lambda p: len(str(p)), reverse=True)


def check_available() -> str | None:
    """Why per-job disks cannot be made on this machine, or None when they can."""
    if os.geteuid() != 0:
        return "per-job disks are loop-mounted filesystems: the worker must run as root"
    for tool in ("mkfs.ext4", "mount", "umount"):
        if not _which(tool):
            return f"{tool} is not installed (Debian: e2fsprogs, mount)"
    return None


def _which(tool: str) -> bool:
    for d in os.environ.get("PATH", "").split(":") + ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]:
        if d and os.access(os.path.join(d, tool), os.X_OK):
            return True
    return False


def _run(argv: list[str], what: str) -> None:
    env = dict(os.environ, PATH=os.environ.get("PATH", "") + ":/usr/sbin:/sbin:/usr/bin:/bin")
    try:
        subprocess.run(argv, check=True, capture_output=True, timeout=COMMAND_TIMEOUT_S, env=env)
    except subprocess.CalledProcessError as e:
        detail = (e.stderr or b"").decode("utf-8", "replace").strip()[-300:]
        log.error("cannot %s: %s: %s", what, " ".join(argv), detail)
        raise SandboxError(f"cannot {what} (exit code {e.returncode})") from e
    except (OSError, subprocess.TimeoutExpired) as e:
        log.error("cannot %s: %s: %s", what, " ".join(argv), e)
        raise SandboxError(f"cannot {what}") from e
