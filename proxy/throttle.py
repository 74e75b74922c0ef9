"""Login throttling: how many password checks an account name and a client
address get.

Every password check goes through `begin_check` before the hash and `end_check`
after it (accounts.authenticate does both, for the login form, the
change-password form and anything else that takes a password). The counts live
in the database, so they hold across gunicorn processes and proxy instances.

The policy, for each key (the account name as typed; the client's address):
- its first few failures cost nothing (ACCOUNT_FREE_FAILURES, ADDRESS_FREE_FAILURES);
- from then on each failure locks the key, for FIRST_LOCKOUT_S doubling with
  every further failure up to MAX_LOCKOUT_S: never permanent;
- failures are forgotten FORGET_S after the last one; a success clears the
  account's failures, never the address's (else one valid account would reset
  an address that sprays guesses at the others);
- a locked check is refused (429, Retry-After) before any hash runs, so a
  locked-out guess costs no scrypt CPU;
- checks in flight count too: a key never has more checks running at once than
  it has failures left before its next lockout, so a burst of concurrent
  guesses gets no more tries than the same guesses one after another.

Names that no account has are throttled like real ones, so a 429 does not tell
which names exist.
"""
from __future__ import annotations

import ipaddress
import math
import time
from dataclasses import dataclass

from .errors import TooManyAttempts

# A person mistyping gets a few tries; a guesser then gets one per lockout.
ACCOUNT_FREE_FAILURES = 5
# One address may be a whole lab behind NAT: room for several people's typos,
# while an address trying a password on account after account is stopped.
ADDRESS_FREE_FAILURES = 20
FIRST_LOCKOUT_S = 60.0
# Never permanent: the longest lockout, however many failures came before.
MAX_LOCKOUT_S = 15 * 60.0
# Longer than MAX_LOCKOUT_S, so a steady guesser stays at the longest lockout
# instead of starting over with free failures.
FORGET_S = 60 * 60.0
# A check takes well under a second (queued behind other hashes: seconds); one
# still counted after this died with its process and stops counting.
PENDING_TTL_S = 60.0
# What a refusal for "as many checks in flight as failures left" asks to wait.
BUSY_RETRY_S = 1
# Serializes throttle updates across processes on PostgreSQL, as BEGIN
# IMMEDIATE does on SQLite (db.py's locks are 7_100_001 and 7_100_002).
PG_THROTTLE_LOCK = 7_100_011
# Longer than any user name (32): a longer "name" shares its key, harmlessly.
MAX_SUBJECT = 64


@dataclass(frozen=True)
class Key:
    scope: str      # "account" or "address"
    subject: str
    free_failures: int


def begin_check(conn, name: str, address: str | None, *, now: float | None = None) -> None:
    """Count a password check for `name` from `address` as in flight, or refuse it.

    Args:
        conn: a Connection not inside a transaction (this one commits at once).
        address: the client's address (request.remote_addr); None counts the account only.
        now: the time; the clock when None.

    Raises:
        TooManyAttempts: the account or the address is locked out, or already has
            as many checks in flight as it has failures left. Nothing is counted.
    """
    now = time.time() if now is None else now
    keys = keys_for(name, address)
    with conn.transaction(lock=PG_THROTTLE_LOCK, durable=False):
        wait, busy = max(_wait_s(key, _row(conn, key), now) for key in keys)
        if wait > 0:
            raise TooManyAttempts(_refusal(wait, busy), retry_after_s=math.ceil(wait))
        for key in keys:
            conn.execute(
                "INSERT INTO login_throttle (scope, subject, failures, last_failure_at, pending,"
                " pending_until) VALUES (?, ?, 0, 0, 1, ?) ON CONFLICT (scope, subject) DO UPDATE"
                " SET pending = CASE WHEN login_throttle.pending_until <= ? THEN 1"
                " ELSE login_throttle.pending + 1 END, pending_until = excluded.pending_until",
                (key.scope, key.subject, now + PENDING_TTL_S, now))
        # Rows of names tried once and never again would otherwise pile up.
        conn.execute("DELETE FROM login_throttle WHERE last_failure_at < ? AND pending_until < ?",
                     (now - FORGET_S, now))


def end_check(conn, name: str, address: str | None, *, failed: bool,
              now: float | None = None) -> None:
    """End a check that `begin_check` let through: count a failure against the
    account and the address, or clear the account's failures on a success."""
    now = time.time() if now is None else now
    with conn.transaction(lock=PG_THROTTLE_LOCK, durable=False):
        for key in keys_for(name, address):
            if failed:
                conn.execute(
                    "INSERT INTO login_throttle (scope, subject, failures, last_failure_at, pending,"
                    " pending_until) VALUES (?, ?, 1, ?, 0, 0) ON CONFLICT (scope, subject) DO UPDATE"
                    " SET failures = CASE WHEN login_throttle.last_failure_at < ? THEN 1"
                    " ELSE login_throttle.failures + 1 END, last_failure_at = excluded.last_failure_at,"
                    f" {_PENDING_DONE}", (key.scope, key.subject, now, now - FORGET_S))
            elif key.scope == "account":
                conn.execute(f"UPDATE login_throttle SET failures = 0, {_PENDING_DONE}"
                             " WHERE scope = ? AND subject = ?", (key.scope, key.subject))
            else:
                conn.execute(f"UPDATE login_throttle SET {_PENDING_DONE}"
                             " WHERE scope = ? AND subject = ?", (key.scope, key.subject))


_PENDING_DONE = ("pending = CASE WHEN login_throttle.pending > 0"
                 " THEN login_throttle.pending - 1 ELSE 0 END")


def lockout_s(excess: int) -> float:
    """How long a key is locked after `excess` failures beyond its free ones (0: the first lockout)."""
    return min(FIRST_LOCKOUT_S * 2 ** min(excess, 32), MAX_LOCKOUT_S)


def keys_for(name: str, address: str | None) -> list[Key]:
    keys = [Key("account", (name or "")[:MAX_SUBJECT], ACCOUNT_FREE_FAILURES)]
    if address:
        keys.append(Key("address", client_network(address), ADDRESS_FREE_FAILURES))
    return keys


def client_network(address: str) -> str:
    """What one client controls: its IPv4 address, or its IPv6 /64 (a host is
    usually given a whole /64, and could otherwise rotate through it)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address[:MAX_SUBJECT]
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    if ip.version == 6:
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


def _row(conn, key: Key) -> dict | None:
    return conn.query_one(
        "SELECT failures, last_failure_at, pending, pending_until FROM login_throttle"
        " WHERE scope = ? AND subject = ?", (key.scope, key.subject))


def _wait_s(key: Key, row: dict | None, now: float) -> tuple[float, bool]:
    """Seconds until `key` may have another check (0: now), and whether it waits
    for checks in flight rather than for a lockout."""
    if row is None:
        return 0.0, False
    failures = row["failures"] if now - row["last_failure_at"] <= FORGET_S else 0
    pending = row["pending"] if now < row["pending_until"] else 0
    if failures >= key.free_failures:
        locked_until = row["last_failure_at"] + lockout_s(failures - key.free_failures)
        if now < locked_until:
            return locked_until - now, False
    if pending >= max(key.free_failures - failures, 1):
        return float(BUSY_RETRY_S), True
    return 0.0, False


def _refusal(wait_s: float, busy: bool) -> str:
    if busy:
        return ("Too many password checks at once for this account or from this address. "
                "Try again in a second.")
    when = f"{math.ceil(wait_s)} seconds" if wait_s < 90 else f"{math.ceil(wait_s / 60)} minutes"
    return (f"Too many failed password attempts for this account or from this address. "
            f"Try again in {when}.")
