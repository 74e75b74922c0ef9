"""What every request needs, built once per process by `create_app`, and the
one way a view reaches it (`app_state()`)."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

from flask import current_app

from .blobs import BlobStore
from .config import Config
from .db import Database
from .wakeups import Listener


@dataclass
class AppState:
    """The process's validated config, database, blob store and wake-ups."""

    config: Config
    db: Database
    blobs: BlobStore
    # The process's one listener on committed changes (wakeups.py): claim
    # long-polls and live streams wait on it.
    wakeups: Listener
    # Set when this process's graceful shutdown begins (begin_shutdown): long
    # requests (live streams, claim long-polls) then answer at their next look.
    stopping: threading.Event = field(default_factory=threading.Event)


def app_state() -> AppState:
    """The current application's AppState (inside a request or app context)."""
    return current_app.extensions["jobcloud"]
