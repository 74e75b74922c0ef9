"""Users, API tokens and worker enrollment tokens.

Passwords are stored as salted scrypt hashes (werkzeug.security). Tokens are
random 256-bit strings shown once; only their sha256 is stored (a slow hash
buys nothing for secrets with that much entropy). Each kind of secret has its
own prefix and table, so a worker secret can never pass as a user token.

Every password check is throttled per account and per client address
(throttle.py), and every hash runs through `_hash_cpu`, which caps how many
run at once in a process and keeps them off gevent's event loop.
"""
from __future__ import annotations

import functools
import hashlib
import re
import secrets
import threading
import time

from werkzeug.security import check_password_hash, generate_password_hash

from . import offload, throttle
from .errors import Conflict, NotFound, ValidationError
from .models import is_lookup_key, new_id

USER_TOKEN_PREFIX = "jcu_"
WORKER_SECRET_PREFIX = "jcw_"
ENROLLMENT_PREFIX = "jce_"
USERNAME_RE = re.compile(r"^[a-z][a-z0-9_.-]{0,31}$")
MIN_PASSWORD = 10
# Longest an enrollment token may be valid: ten years.
MAX_ENROLLMENT_S = 10 * 365 * 24 * 3600
# Password hashes (scrypt, 0.15-0.5 s of CPU each) running at once per process:
# the cores of the machine this was sized on; more only makes each one slower.
MAX_CONCURRENT_HASHES = 2


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_secret(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(32)


def generate_password() -> str:
    """A one-time password that is easy to type: 4 groups of 4 from an unambiguous alphabet."""
    alphabet = "abcdefghjkmnpqrstuvwxyz23456789"
    return "-".join("".join(secrets.choice(alphabet) for _ in range(4)) for _ in range(4))


def check_username(name: str) -> str:
    if not USERNAME_RE.match(name or ""):
        raise ValidationError(
            "user names are 1-32 characters: lower-case letters, digits, '_', '.', '-', "
            "starting with a letter", code="invalid_username")
    return name


def check_password(password: str) -> None:
    if len(password or "") < MIN_PASSWORD:
        raise ValidationError(f"passwords must have at least {MIN_PASSWORD} characters",
                              code="weak_password")


# ---------------------------------------------------------------------------- users

def create_user(conn, name: str, password: str, *, admin: bool = False,
                must_change: bool = False) -> dict:
    """Create an account.

    Raises:
        ValidationError: bad name or password.
        Conflict: the name is taken.
    """
    check_username(name)
    check_password(password)
    if conn.query_one("SELECT id FROM users WHERE name = ?", (name,)):
        raise Conflict(f"user {name!r} already exists", code="user_exists")
    user = {
        "id": new_id("u"), "name": name, "password_hash": _hash_cpu(generate_password_hash, password),
        "is_admin": int(admin), "must_change_password": int(must_change),
        "session_epoch": 0, "created_at": time.time(),
    }
    conn.execute(
        "INSERT INTO users (id, name, password_hash, is_admin, must_change_password,"
        " session_epoch, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
        tuple(user.values()))
    return user


def get_user_by_name(conn, name: str) -> dict | None:
    return conn.query_one("SELECT * FROM users WHERE name = ?", (name,))


def visible_owner(conn, name: str, viewer: dict) -> dict:
    """The user called `name`, if `viewer` may see their jobs and usage (themself or an admin).

    Raises:
        NotFound: no such user, or not visible (indistinguishable on purpose).
    """
    owner = get_user_by_name(conn, name) if is_lookup_key(name) else None
    if owner is None or (owner["id"] != viewer["id"] and not viewer["is_admin"]):
        raise NotFound(f"no user {name[:64]!r} visible to you", code="user_not_found")
    return owner


def get_user(conn, user_id: str) -> dict | None:
    return conn.query_one("SELECT * FROM users WHERE id = ?", (user_id,))


def list_users(conn) -> list[dict]:
    return conn.query("SELECT id, name, is_admin, created_at FROM users ORDER BY name")


def authenticate(conn, name: str, password: str, *, address: str | None = None,
                 now: float | None = None) -> dict | None:
    """The user whose name and password these are, or None; throttled (throttle.py).

    Args:
        conn: a Connection not inside a transaction (the throttle commits its counts).
        address: the client's address, throttled too; None throttles the account only.
        now: the time for the throttle; the clock when None.

    Raises:
        TooManyAttempts: the account or address is locked out; no hash was run.
    """
    name = name or ""
    throttle.begin_check(conn, name, address, now=now)
    user = None
    try:
        user = _check_password(get_user_by_name(conn, name), password or "")
    finally:
        throttle.end_check(conn, name, address, failed=user is None, now=now)
    return user


def _check_password(user: dict | None, password: str) -> dict | None:
    if user is None:
        # Same work as a real check, so timing does not reveal which names exist.
        _hash_cpu(check_password_hash, _dummy_hash(), password)
        return None
    return user if _hash_cpu(check_password_hash, user["password_hash"], password) else None


def set_password(conn, user_id: str, password: str, *, must_change: bool = False) -> None:
    check_password(password)
    conn.execute(
        "UPDATE users SET password_hash = ?, must_change_password = ?,"
        " session_epoch = session_epoch + 1 WHERE id = ?",
        (_hash_cpu(generate_password_hash, password), int(must_change), user_id))


def end_sessions(conn, user_id: str) -> None:
    """Invalidate every session cookie of a user (they carry the old epoch)."""
    conn.execute("UPDATE users SET session_epoch = session_epoch + 1 WHERE id = ?", (user_id,))


def ensure_first_admin(conn) -> str | None:
    """Create the first admin account if there are no users.

    Returns:
        The generated one-time password, or None when users already existed.
    """
    with conn.transaction():
        if conn.query_one("SELECT id FROM users LIMIT 1"):
            return None
        password = generate_password()
        create_user(conn, "admin", password, admin=True, must_change=True)
        return password


@functools.cache
def _dummy_hash() -> str:
    # Made on first use, not at import: hashing is deliberately slow.
    return _hash_cpu(generate_password_hash, secrets.token_hex(8))


def _hash_cpu(fn, *args):
    """Run a password hash function, at most MAX_CONCURRENT_HASHES at once in this process.

    Under gevent (gunicorn's gevent workers patch threading into greenlets) the
    hash runs in the hub's pool of real threads: scrypt releases the GIL, so the
    event loop goes on serving other requests meanwhile. Elsewhere it runs inline.
    """
    with _hash_slots():
        return offload.run(fn, *args)


_slots = None
_slots_lock = threading.Lock()


def _hash_slots():
    # Made on first use, not at import: gevent patches threading when a gunicorn
    # worker starts, after this module may have been imported, and a semaphore
    # made before that would block the whole event loop instead of one greenlet.
    # (The lock is held only while nothing can switch greenlets: either kind serves.)
    global _slots
    if _slots is None:
        with _slots_lock:
            if _slots is None:
                _slots = threading.BoundedSemaphore(MAX_CONCURRENT_HASHES)
    return _slots


# ----------------------------------------------------------------------- API tokens

def create_token(conn, user_id: str, label: str) -> tuple[dict, str]:
    """Create an API token for a user; returns (record, the token shown once)."""
    label = (label or "").strip() or "token"
    if len(label) > 100:
        raise ValidationError("token labels are at most 100 characters", code="invalid_label")
    token = new_secret(USER_TOKEN_PREFIX)
    record = {"id": new_id("t"), "user_id": user_id, "label": label,
              "token_hash": hash_token(token), "created_at": time.time()}
    conn.execute(
        "INSERT INTO api_tokens (id, user_id, label, token_hash, created_at) VALUES (?, ?, ?, ?, ?)",
        tuple(record.values()))
    return record, token


def list_tokens(conn, user_id: str) -> list[dict]:
    return conn.query(
        "SELECT id, label, created_at, last_used_at, revoked_at FROM api_tokens"
        " WHERE user_id = ? ORDER BY id DESC", (user_id,))


def revoke_token(conn, user_id: str, token_id: str) -> None:
    n = conn.execute(
        "UPDATE api_tokens SET revoked_at = ? WHERE id = ? AND user_id = ? AND revoked_at IS NULL",
        (time.time(), token_id, user_id))
    if not n:
        raise NotFound("no such active token", code="token_not_found")


def user_for_token(conn, token: str) -> dict | None:
    if not token.startswith(USER_TOKEN_PREFIX):
        return None
    row = conn.query_one(
        "SELECT u.*, t.id AS token_id, t.last_used_at AS token_last_used_at FROM api_tokens t"
        " JOIN users u ON u.id = t.user_id WHERE t.token_hash = ? AND t.revoked_at IS NULL",
        (hash_token(token),))
    if row is None:
        return None
    now = time.time()
    # Coarse last-used stamp: one write per token per minute, not per request.
    if row["token_last_used_at"] is None or now - row["token_last_used_at"] > 60:
        conn.execute("UPDATE api_tokens SET last_used_at = ? WHERE id = ?", (now, row["token_id"]))
    return row


# ---------------------------------------------------------------- enrollment tokens

def create_enrollment(conn, label: str, created_by: str | None,
                      expires_in_s: float | None = None) -> tuple[dict, str]:
    """Create a worker enrollment token; returns (record, the token shown once)."""
    # NaN fails both comparisons, so it is refused too; the cap keeps the
    # stored expiry a finite, listable time.
    if expires_in_s is not None and not 0 < expires_in_s <= MAX_ENROLLMENT_S:
        raise ValidationError(f"expires_in_s must be between 0 and {MAX_ENROLLMENT_S} (10 years)",
                              code="invalid_expiry")
    token = new_secret(ENROLLMENT_PREFIX)
    now = time.time()
    record = {"id": new_id("e"), "label": (label or "workers")[:100], "token_hash": hash_token(token),
              "created_by": created_by, "created_at": now,
              "expires_at": now + expires_in_s if expires_in_s else None}
    conn.execute(
        "INSERT INTO enrollment_tokens (id, label, token_hash, created_by, created_at, expires_at)"
        " VALUES (?, ?, ?, ?, ?, ?)", tuple(record.values()))
    return record, token


def list_enrollments(conn) -> list[dict]:
    return conn.query(
        "SELECT id, label, created_by, created_at, expires_at, revoked_at FROM enrollment_tokens"
        " ORDER BY id DESC")


def revoke_enrollment(conn, enrollment_id: str) -> None:
    n = conn.execute(
        "UPDATE enrollment_tokens SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
        (time.time(), enrollment_id))
    if not n:
        raise NotFound("no such active enrollment token", code="enrollment_not_found")


def enrollment_by_id(conn, enrollment_id: str) -> dict | None:
    """The enrollment unless an admin revoked it. Its expiry bounds joining, not
    staying: a worker that joined in time rejoins with its own secret later."""
    return conn.query_one("SELECT * FROM enrollment_tokens WHERE id = ? AND revoked_at IS NULL",
                          (enrollment_id,))


def enrollment_for_token(conn, token: str, now: float) -> dict | None:
    if not token.startswith(ENROLLMENT_PREFIX):
        return None
    row = conn.query_one(
        "SELECT * FROM enrollment_tokens WHERE token_hash = ? AND revoked_at IS NULL",
        (hash_token(token),))
    if row is None or (row["expires_at"] is not None and row["expires_at"] < now):
        return None
    return row
