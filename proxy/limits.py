"""Per-user limits and priority weights, set by admins.

Per-job limits (cpus, memory, GPUs, time, disk) refuse a submission with 400; count
and rate limits (jobs queued, submissions per minute) with 429; the running
limit and the weight are applied by the scheduler (scheduler.py). Every
refusal names the limit and its value.
"""
from __future__ import annotations

import time

from .errors import TooManyRequests, ValidationError
from .jsonbody import is_number
from .models import JobState, id_floor

# name -> (type, lowest allowed value)
FIELDS = {
    "max_running": (int, 0),
    "max_queued": (int, 0),
    "max_submissions_per_minute": (int, 0),
    "max_cpus": (float, 0.1),
    "max_memory_mb": (int, 6),
    "max_gpus": (int, 0),
    "max_timeout_s": (int, 1),
    "max_disk_mb": (int, 1),
    "weight": (float, 0.01),
    # Retention and storage (retention.py): overrides of retention_days and
    # storage_quota_mb in the configuration.
    "retention_days": (int, 1),
    "max_storage_mb": (int, 0),
}
# Which job field each per-job limit bounds.
PER_JOB = {"max_cpus": "cpus", "max_memory_mb": "memory_mb", "max_gpus": "gpus",
           "max_timeout_s": "timeout_s", "max_disk_mb": "disk_mb"}
UPPER = 10 ** 9


def get_limits(conn, user_id: str) -> dict:
    """The user's limits; every field present, None where unset (weight defaults to 1)."""
    row = conn.query_one(f"SELECT {', '.join(FIELDS)} FROM user_limits WHERE user_id = ?", (user_id,))
    limits = {name: (row or {}).get(name) for name in FIELDS}
    if limits["weight"] is None:
        limits["weight"] = 1.0
    return limits


def set_limits(conn, user_id: str, changes: dict) -> dict:
    """Change some of a user's limits (None clears one; weight resets to 1).

    Raises:
        ValidationError: an unknown field, a wrong type, or a value out of range.
    """
    if not isinstance(changes, dict):
        raise ValidationError("send a JSON object of limits", code="invalid_limits")
    unknown = sorted(set(changes) - set(FIELDS))
    if unknown:
        raise ValidationError(f"unknown limit(s) {', '.join(unknown)}; known: {', '.join(FIELDS)}",
                              code="invalid_limits")
    limits = get_limits(conn, user_id)
    for name, value in changes.items():
        limits[name] = _checked(name, value)
    if limits["weight"] is None:
        limits["weight"] = 1.0
    names = list(FIELDS)
    with conn.transaction():
        conn.execute(
            f"INSERT INTO user_limits (user_id, {', '.join(names)})"
            f" VALUES (?, {', '.join('?' for _ in names)}) ON CONFLICT (user_id) DO UPDATE SET "
            + ", ".join(f"{n} = excluded.{n}" for n in names),
            (user_id, *(limits[n] for n in names)))
    return limits


def _checked(name: str, value):
    if value is None:
        return None
    kind, low = FIELDS[name]
    if not is_number(value, integer=kind is int):
        raise ValidationError(f"{name} must be {'a whole number' if kind is int else 'a number'}"
                              " or null", code="invalid_limits")
    if not low <= value <= UPPER:
        raise ValidationError(f"{name} must be between {low} and {UPPER}", code="invalid_limits")
    return kind(value)


def check_job(limits: dict, fields: dict) -> None:
    """Refuse a job that asks for more than the user's per-job limits (400)."""
    for name, field in PER_JOB.items():
        limit = limits.get(name)
        if limit is not None and fields[field] > limit:
            raise ValidationError(
                f"{field} {fields[field]:g} is above your limit {name} = {limit:g}",
                code="limit_exceeded")


def check_counts(conn, user_id: str, limits: dict, now: float | None = None) -> None:
    """Refuse a submission past the user's queued-jobs or per-minute limit (429)."""
    now = time.time() if now is None else now
    if limits.get("max_queued") is not None:
        queued = conn.query_one("SELECT COUNT(*) AS n FROM jobs WHERE owner_id = ? AND state = ?",
                                (user_id, JobState.QUEUED.value))["n"]
        if queued >= limits["max_queued"]:
            raise TooManyRequests(f"you have {queued} jobs queued; your limit max_queued is "
                                  f"{limits['max_queued']}")
    if limits.get("max_submissions_per_minute") is not None:
        # Job ids start with their submission time in microseconds (models.new_id),
        # so "the last minute" is an id range on the (owner_id, id) index.
        since = id_floor("j", now - 60)
        recent = conn.query_one("SELECT COUNT(*) AS n FROM jobs WHERE owner_id = ? AND id >= ?",
                                (user_id, since))["n"]
        if recent >= limits["max_submissions_per_minute"]:
            raise TooManyRequests(
                f"{recent} submissions in the last minute; your limit max_submissions_per_minute"
                f" is {limits['max_submissions_per_minute']}")
