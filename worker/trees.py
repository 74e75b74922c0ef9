"""Walking and removing directory trees a job made: any depth, any width, any
name, any permission bits the job set.

Why not shutil.rmtree or os.walk: on Python 3.11 both recurse (rmtree one
Python frame per level, fwalk too), so about 1,000 nested directories raise
RecursionError; and every path-based call fails once a path passes PATH_MAX
(4,096 bytes), which 2,100 levels of one-letter names reach.

How, instead: one loop, relative to one open directory at a time (openat),
that empties the tree as it goes. In a directory it handles every
non-directory entry, and goes down into the first subdirectory it meets; an
empty directory is left for its parent (going back up by ".."), which removes
it. Going up re-reads the parent from its start, but what was handled is gone,
so each entry is read about once. Memory is the names of the directories
above the current one (the relative path), open descriptors are two.

Only for trees nothing else writes to while this runs: the job's container
has stopped (or, at the worker's start-up, belongs to an earlier run). Each
".." is checked to be the directory it came down from (device and inode), and
a directory on another filesystem (a mount point) is never entered.
"""
from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path

# A file of the tree: visit(rel, dir_fd, name, st), called before the file is
# removed. rel is its path below the root ("a/b/c.txt"), None when that path is
# longer than max_path (only its depth is known then); name is relative to dir_fd.
Visit = Callable[[str | None, int, str, os.stat_result], None]

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class TreeError(OSError):
    """Raised when a tree cannot be emptied (a mount point inside it, a
    directory that changed under the walk, a permission the worker lacks)."""


def remove_tree(path: Path) -> None:
    """Remove `path` and everything below it, whatever the job did to it.

    Raises:
        TreeError: something in it cannot be removed.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(path)
        return
    drain_tree(path, visit=None)
    os.rmdir(path)


def drain_tree(root: Path, visit: Visit | None, *, max_path: int = 4096) -> None:
    """Empty the directory `root` (it stays), calling `visit` on each
    non-directory entry before removing it.

    Args:
        visit: see `Visit`; None to remove only.
        max_path: longest relative path (in characters) given to `visit`.

    Raises:
        TreeError: see the class.
    """
    fd = _open_dir(None, str(root))
    try:
        _drain(fd, visit, max_path)
    finally:
        os.close(fd)


def _drain(top_fd: int, visit: Visit | None, max_path: int) -> None:
    fd = os.dup(top_fd)
    root_dev = os.fstat(fd).st_dev
    # Per level below the root: (name, (dev, ino) of the directory above it),
    # and `prefix`, the relative path. Only while the path fits max_path;
    # deeper, `lost` counts the levels.
    above: list[tuple[str, tuple[int, int]]] = []
    prefix, lost = "", 0
    try:
        while True:
            child = _next_subdir(fd, visit, None if lost else prefix, max_path, root_dev)
            if child is not None:
                here = os.fstat(fd)
                fd = _descend(fd, child)
                if lost or len(prefix) + len(child) + 1 > max_path:
                    lost += 1
                else:
                    above.append((child, (here.st_dev, here.st_ino)))
                    prefix += child + "/"
                continue
            # This directory is empty: up one level, where it is removed.
            if not above and not lost:
                return
            up = _open_dir(fd, "..")
            os.close(fd)
            fd = up
            if lost:
                # The name of the level left is not kept past max_path: the
                # next read of this directory finds it empty and removes it.
                lost -= 1
                continue
            name, expected = above.pop()
            prefix = prefix[:-len(name) - 1]
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != expected:
                raise TreeError(errno.ESTALE, "the tree changed while it was being emptied")
            _writable(fd, os.rmdir, name)
    finally:
        os.close(fd)


def _next_subdir(fd: int, visit, prefix: str | None, max_path: int, root_dev: int) -> str | None:
    """Handle this directory's files; returns a subdirectory to go down into,
    None when the directory is empty. An empty subdirectory is removed here."""
    with os.scandir(fd) as entries:
        for entry in entries:
            name = entry.name
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                if st.st_dev != root_dev:
                    raise TreeError(errno.EXDEV, "a mount point inside the tree")
                try:
                    _writable(fd, os.rmdir, name)
                    continue
                except OSError as e:
                    if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                        raise
                return name
            if visit is not None:
                rel = None if prefix is None or len(prefix) + len(name) > max_path else prefix + name
                visit(rel, fd, name, st)
            _writable(fd, os.unlink, name)
    return None


def _writable(fd: int, remove, name: str) -> None:
    """`remove(name)` (os.rmdir or os.unlink) in the directory `fd`, made
    writable first when the job had taken that away (a worker that is not root)."""
    try:
        remove(name, dir_fd=fd)
    except PermissionError:
        os.chmod(fd, 0o700)
        remove(name, dir_fd=fd)


def _descend(fd: int, name: str) -> int:
    try:
        child = _open_dir(fd, name)
    except PermissionError:
        # Mode 000, as the job left it (a worker that is not root needs this).
        os.chmod(name, 0o700, dir_fd=fd)
        child = _open_dir(fd, name)
    os.close(fd)
    return child


def _open_dir(dir_fd: int | None, name: str) -> int:
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except OSError as e:
        if e.errno == errno.ENOENT or isinstance(e, PermissionError):
            raise
        raise TreeError(e.errno, f"cannot open a directory of the tree: {e.strerror}") from e
