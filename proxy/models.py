"""States, ids and time: the small vocabulary shared by the proxy's modules."""
from __future__ import annotations

import secrets
import time
from datetime import datetime, timezone
from enum import Enum


class JobState(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"


FINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.TIMED_OUT})
ACTIVE_STATES = frozenset({JobState.QUEUED, JobState.RUNNING})
# The same sets as the strings stored in rows and sent in JSON.
FINAL_VALUES = frozenset(s.value for s in FINAL_STATES)
ACTIVE_VALUES = frozenset(s.value for s in ACTIVE_STATES)


class WorkerState(str, Enum):
    ACTIVE = "active"        # heartbeating, gets jobs
    DRAINING = "draining"    # heartbeating, finishes its jobs, gets no new ones
    LOST = "lost"            # silent past the lease timeout; its jobs were requeued
    GONE = "gone"            # deregistered or replaced by a newer registration
    REVOKED = "revoked"      # credentials revoked by an admin


LIVE_WORKER_STATES = (WorkerState.ACTIVE.value, WorkerState.DRAINING.value)


def new_id(prefix: str = "") -> str:
    """A time-ordered id: 14 hex digits of microseconds, then 64 random bits.

    Sorting by id sorts by creation time, so "newest first" and FIFO need no
    extra column, and ids are not guessable.
    """
    return f"{prefix}{_id_time(time.time_ns() // 1000)}{secrets.token_hex(8)}"


def id_floor(prefix: str, ts: float) -> str:
    """The smallest id new_id(prefix) could give out at time `ts`: ids from `ts`
    on sort at or after it, so a time range is an id range on the primary key."""
    return f"{prefix}{_id_time(max(0, int(ts * 1_000_000)))}"


def _id_time(microseconds: int) -> str:
    return f"{microseconds:014x}"


def is_lookup_key(value) -> bool:
    """True for a string that could name a stored row (a job id, a user name).

    Keys are short and never hold a NUL, which PostgreSQL refuses as a query
    parameter: callers answer "not found" (or 400) instead of a server error.
    """
    return isinstance(value, str) and 0 < len(value) <= 64 and "\x00" not in value


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# Why a worker leaves a file of a job's output directory out of its archive
# (worker/outputs.py REASONS): the result's outputs report counts by these.
LEFT_OUT_REASONS = ("size_cap", "file_cap", "special_file", "symlink", "bad_name", "unreadable",
                    "reserved_name")
