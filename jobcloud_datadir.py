"""Keeping a deployable's data directory to the user it runs as.

The proxy's directory holds the session-signing key and webhook secrets (in
its database), the scaler's its clones' disks and seeds (enrollment tokens),
the worker's its secret: a local user who can read any of them can act as an
admin or as a worker. So each deployable, when it starts, makes its data
directory private (`make_private`): created 0700 if missing, refused if
another user owns it (the files it would write there would not be its own,
and that user could read them), and what is in it already tightened (group
and other bits removed, never widened), since earlier releases left 0755
directories and 0644 files behind. New files stay private through the umask
each entry point sets (PRIVATE_UMASK) and explicit modes where a file is made.

Standard library only and one file outside the three packages, like
jobcloud_config.py: the worker VM gets it beside worker/ (vm_provisioning/
template.py's SHARED_MODULES), where no pip runs.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

# Files and directories a process makes are its user's alone.
PRIVATE_UMASK = 0o077


class ForeignOwner(Exception):
    """Raised when a data directory belongs to another user than the one starting."""


def make_private(path: str | Path, *, dir_mode: int = 0o700,
                 recurse_into: tuple[str, ...] | None = None) -> int:
    """Create `path` if missing, refuse it if another user owns it, tighten it.

    Args:
        path: the data directory.
        dir_mode: the directory's own mode (the scaler's is 0711: libvirt's
            QEMU must pass through it to the disks it boots).
        recurse_into: names of subdirectories whose whole tree is tightened;
            None: all of them. Other subdirectories (another deployable's, or
            job directories a container user must read) keep their modes; the
            private directory above them already keeps other users out.

    Returns:
        How many files and directories had group or other permissions removed.

    Raises:
        ForeignOwner: the directory is owned by another user.
    """
    path = Path(path)
    path.mkdir(mode=dir_mode, parents=True, exist_ok=True)
    st = path.stat()
    if st.st_uid != os.geteuid():
        raise ForeignOwner(f"data directory {path} is owned by uid {st.st_uid}, not by this user "
                           f"(uid {os.geteuid()}): refusing to use it (run as its owner, or "
                           f"chown it to this user)")
    tightened = 0
    if stat.S_IMODE(st.st_mode) != dir_mode:
        os.chmod(path, dir_mode)
        tightened += 1
    for entry in os.scandir(path):
        if entry.is_dir(follow_symlinks=False):
            if recurse_into is None or entry.name in recurse_into:
                tightened += _tighten_tree(Path(entry.path))
        else:
            tightened += _tighten(entry.path)
    return tightened


def _tighten_tree(root: Path) -> int:
    tightened = _tighten(root)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            tightened += _tighten(os.path.join(dirpath, name))
    return tightened


def _tighten(path: str) -> int:
    """Remove group and other bits of one file or directory we own; 1 when changed.

    Symbolic links are left alone (their own mode means nothing; what they
    point at is not ours to change), and so is what another user owns (e.g. a
    disk libvirt handed to its QEMU user while a VM runs).
    """
    try:
        st = os.lstat(path)
        mode = stat.S_IMODE(st.st_mode)
        if stat.S_ISLNK(st.st_mode) or st.st_uid != os.geteuid() or not mode & 0o077:
            return 0
        os.chmod(path, mode & ~0o077)
    except FileNotFoundError:   # removed meanwhile (an upload's temp file, a -journal)
        return 0
    return 1
