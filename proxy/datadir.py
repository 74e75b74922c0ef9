"""The proxy's data directory is its user's alone (docs/SECURITY.md, "Data at rest").

It holds the SQLite database (the session-signing key, webhook secrets in
clear, password and token hashes), the blobs (scripts, datasets, outputs) and
upload temp files. Every entry point that opens it (gunicorn_conf.py, the
`jobcloud-proxy` and `jobcloud` commands) calls `secure` first: umask 077 for
the process, the directory 0700 and refused if another user owns it, and
what earlier releases left readable tightened, with one log line saying how
much.
"""
from __future__ import annotations

import logging
import os

from jobcloud_datadir import PRIVATE_UMASK, ForeignOwner, make_private

from .errors import ConfigError

log = logging.getLogger(__name__)

# The proxy's own subdirectories, tightened to their last file. Others (a
# `make run` worker's var/worker) belong to other
# deployables, which look after their own; the 0700 directory above them
# keeps other users out already.
OWN_DIRS = ("blobs", "tmp")


def secure(data_dir: str) -> int:
    """Make `data_dir` private and set this process's umask so it stays so.

    Returns:
        How many files and directories were tightened.

    Raises:
        ConfigError: the directory belongs to another user.
    """
    os.umask(PRIVATE_UMASK)
    try:
        tightened = make_private(data_dir, recurse_into=OWN_DIRS)
    except ForeignOwner as e:
        raise ConfigError(str(e)) from None
    if tightened:
        log.warning("data directory %s: removed group/other access from %d file(s) and "
                    "directories (it is now readable by its owner only)", data_dir, tightened)
    else:
        log.info("data directory %s: private (0700, files 0600)", data_dir)
    return tightened
