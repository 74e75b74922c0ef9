"""Webhooks: a signed JSON POST to the job's URL when it reaches a final state.

Targets: only http(s) URLs whose host is on the admin allow-list
(`webhook_allowed_hosts`), checked at submission (400 naming the rule) and
again before every attempt, and at each attempt only the checked address,
public unless the admin listed that very address. The rules are
webhook_targets.py's; the one POST (no redirects, one deadline for the whole
attempt) is webhook_post.py's.

Failures: the job's owner sees one category, "delivery failed", whatever
stopped the notice (DNS, an address not allowed, refused, timed out, TLS, a
banner that is not HTTP, any status but 2xx): each distinct answer would map
an allowed host's ports and names for them (docs/SECURITY.md). Why it failed
goes to the log and to the admin API (`last_error_detail`,
GET /api/v1/admin/webhook-deliveries). Only a URL the allow-list no longer
admits is named to its user, as it was at submission. This module keeps the names its callers
use (`check_url`, `address_allowed`, `MAX_URL_LENGTH`, ...), so they need not
know how it is divided.

Signing: one secret per user (`secret_for`), shown to that user only (API
/api/v1/webhook-secret, page /account/webhook). Per user rather than one
proxy-wide secret so a receiver can check a notice came for *its* user, and
one leaked secret exposes one user's notices, not everyone's. The signature
is HMAC-SHA256 over ``"<timestamp>." + body`` (``X-Jobcloud-Signature:
sha256=<hex>``, ``X-Jobcloud-Timestamp``): the timestamp is in the signed
content, so a receiver that refuses old timestamps refuses replays.

Delivery: at least once. The notice is a row in webhook_deliveries, written in
the same transaction that made the job final, with its exact body, so every
attempt sends the same bytes and a restart loses nothing. Each proxy process
runs one delivery thread (`Deliverer`): no extra process to deploy or forget,
and any number of processes is safe because an attempt is claimed with a
compare-and-set UPDATE (`claimed_until`), so two processes never send the same
attempt. A process that dies mid-attempt leaves the claim to expire and the
attempt is made again: receivers de-duplicate on ``X-Jobcloud-Delivery``.
Failures are retried with exponential backoff up to `webhook_max_attempts`.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import threading
import time
from enum import Enum

from .errors import ValidationError
from .models import iso, new_id
from .webhook_post import SendFailed, post
# MAX_URL_LENGTH, address_allowed and host_allowed are not used here: callers and
# tests know them as webhooks.<name>.
from .webhook_targets import (MAX_URL_LENGTH, address_allowed, host_allowed,  # noqa: F401
                              url_problem)

log = logging.getLogger(__name__)

# Longest pause between two attempts, whatever the backoff doubling says.
MAX_BACKOFF_S = 3600.0
# A claim outlives the request's timeout by this much before another process may retry it.
CLAIM_GRACE_S = 30.0
# Deliveries one process claims per pass; the rest wait for the next pass.
BATCH = 20
EVENT = "job.finished"
# What a job's owner reads for every failed attempt (see the module docstring).
DELIVERY_FAILED = "delivery failed"


class DeliveryState(str, Enum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


# The latest delivery of a job, joined onto job rows (store.py) for the job JSON.
JOB_COLUMNS = (", d.id AS webhook_delivery_id, d.state AS webhook_state,"
               " d.attempts AS webhook_attempts, d.last_status AS webhook_last_status,"
               " d.last_error AS webhook_last_error, d.next_attempt_at AS webhook_next_attempt_at,"
               " d.delivered_at AS webhook_delivered_at")
JOB_JOIN = " LEFT JOIN webhook_deliveries d ON d.job_id = j.id"


# ------------------------------------------------------------------ submission

def check_url(url: str, allowed_hosts: tuple[str, ...]) -> str:
    """A job's webhook URL, if it may be used.

    Raises:
        ValidationError: not http(s), malformed, or its host is not allow-listed.
    """
    url = url.strip()
    if not allowed_hosts:
        raise ValidationError("webhooks are disabled on this proxy (webhook_allowed_hosts is empty)",
                              code="webhook_not_allowed")
    problem = url_problem(url, allowed_hosts)
    if problem:
        raise ValidationError(problem, code="webhook_not_allowed")
    return url


# --------------------------------------------------------------------- secrets

def secret_for(conn, user_id: str, now: float | None = None) -> str:
    """The user's signing secret, made on first use."""
    now = time.time() if now is None else now
    conn.execute("INSERT INTO webhook_secrets (user_id, secret, created_at) VALUES (?, ?, ?)"
                 " ON CONFLICT DO NOTHING", (user_id, _new_secret(), now))
    return conn.query_one("SELECT secret FROM webhook_secrets WHERE user_id = ?",
                          (user_id,))["secret"]


def rotate_secret(conn, user_id: str, now: float | None = None) -> str:
    """Replace the user's secret; pending deliveries are signed with the new one."""
    now = time.time() if now is None else now
    secret = _new_secret()
    conn.execute("INSERT INTO webhook_secrets (user_id, secret, created_at) VALUES (?, ?, ?)"
                 " ON CONFLICT (user_id) DO UPDATE SET secret = excluded.secret,"
                 " created_at = excluded.created_at", (user_id, secret, now))
    return secret


def _new_secret() -> str:
    return "whsec_" + secrets.token_urlsafe(32)


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The X-Jobcloud-Signature value: HMAC-SHA256 of "<timestamp>." + body."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


# ------------------------------------------------------------------- enqueuing

def enqueue(conn, job: dict, job_document: dict, now: float) -> None:
    """Queue the completion notice of a job that just became final (inside that transaction)."""
    delivery_id = new_id("wh")
    body = json.dumps({"event": EVENT, "delivery_id": delivery_id,
                       "job": {k: v for k, v in job_document.items() if k != "webhook"}},
                      separators=(",", ":"), sort_keys=True)
    conn.execute(
        "INSERT INTO webhook_deliveries (id, job_id, owner_id, url, body, state, attempts,"
        " next_attempt_at, created_at) VALUES (?, ?, ?, ?, ?, ?, 0, ?, ?)"
        " ON CONFLICT DO NOTHING",
        (delivery_id, job["id"], job["owner_id"], job["webhook_url"], body,
         DeliveryState.PENDING.value, now, now))


def webhook_json(job: dict) -> dict | None:
    """The `webhook` object of a job's JSON: where, and how its delivery went."""
    if not job.get("webhook_url"):
        return None
    if not job.get("webhook_delivery_id"):
        return {"url": job["webhook_url"], "state": "waiting_for_job"}
    return {"url": job["webhook_url"], "state": job["webhook_state"],
            "delivery_id": job["webhook_delivery_id"], "attempts": job["webhook_attempts"],
            # A status other than 2xx would say what listens on that port: admins only.
            "last_status": (job["webhook_last_status"]
                            if job["webhook_state"] == DeliveryState.DELIVERED.value else None),
            "last_error": job["webhook_last_error"],
            "next_attempt_at": (iso(job["webhook_next_attempt_at"])
                                if job["webhook_state"] == DeliveryState.PENDING.value else None),
            "delivered_at": iso(job["webhook_delivered_at"])}


def list_deliveries(conn, *, job_id: str | None = None, state: str | None = None,
                    limit: int = 100) -> list[dict]:
    """Deliveries as the admin sees them, newest first, with why the last attempt failed."""
    where, params = [], []
    if job_id is not None:
        where.append("d.job_id = ?")
        params.append(job_id)
    if state is not None:
        where.append("d.state = ?")
        params.append(state)
    rows = conn.query(
        "SELECT d.*, u.name AS owner FROM webhook_deliveries d JOIN users u ON u.id = d.owner_id"
        + (" WHERE " + " AND ".join(where) if where else "")
        + " ORDER BY d.created_at DESC, d.id LIMIT ?", (*params, limit))
    return [{"id": d["id"], "job_id": d["job_id"], "owner": d["owner"], "url": d["url"],
             "state": d["state"], "attempts": d["attempts"], "last_status": d["last_status"],
             "last_error": d["last_error"], "last_error_detail": d["last_error_detail"],
             "next_attempt_at": (iso(d["next_attempt_at"])
                                 if d["state"] == DeliveryState.PENDING.value else None),
             "created_at": iso(d["created_at"]), "delivered_at": iso(d["delivered_at"])}
            for d in rows]


# -------------------------------------------------------------------- delivery

class Deliverer:
    """Sends due webhook deliveries; one per proxy process, on its own thread.

    `run_once(now=...)` is one pass, so tests can drive it without a thread.
    """

    def __init__(self, db, *, allowed_hosts: tuple[str, ...], max_attempts: int,
                 backoff_s: float, timeout_s: float, poll_s: float,
                 claim_grace_s: float = CLAIM_GRACE_S):
        self.db = db
        self.allowed_hosts = allowed_hosts
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.timeout_s = timeout_s
        self.poll_s = poll_s
        self.claim_grace_s = claim_grace_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def from_config(cls, db, cfg) -> "Deliverer":
        """The deliverer the proxy's validated config (`cfg`) asks for; not started yet."""
        return cls(db, allowed_hosts=cfg.webhook_allowed_hosts,
                   max_attempts=cfg.webhook_max_attempts, backoff_s=cfg.webhook_backoff_s,
                   timeout_s=cfg.webhook_timeout_s, poll_s=cfg.webhook_poll_s)

    def start(self) -> "Deliverer":
        self._thread = threading.Thread(target=self._loop, name="webhooks", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Stop taking deliveries; an attempt in flight finishes (it ends within timeout_s).

        Called on a graceful shutdown (gunicorn's worker_exit hook), so the
        process does not exit under a POST whose outcome is not recorded yet.
        """
        self._stop.set()
        if self._thread is not None and timeout != 0:  # 0: only the flag (signal handlers)
            self._thread.join(self.timeout_s + 5 if timeout is None else timeout)

    def _loop(self) -> None:
        while not self._stop.is_set():
            if self.db.closed:
                return   # the app was closed (tests make many): nothing left to send for
            try:
                busy = self.run_once()
            except Exception:  # the loop boundary: log, keep delivering
                log.exception("webhook delivery pass failed")
                busy = 0
            if not busy:
                self._stop.wait(self.poll_s)

    def run_once(self, now: float | None = None) -> int:
        """Claim and send the deliveries due at `now`. Returns how many attempts were made."""
        now = time.time() if now is None else now
        sent = 0
        with self.db.connection() as conn:
            due = conn.query(
                "SELECT id FROM webhook_deliveries WHERE state = ? AND next_attempt_at <= ?"
                " AND (claimed_until IS NULL OR claimed_until < ?) ORDER BY next_attempt_at"
                " LIMIT ?", (DeliveryState.PENDING.value, now, now, BATCH))
            for row in due:
                if self._stop.is_set():
                    break
                delivery = self._claim(conn, row["id"], due_by=now)
                if delivery is not None:
                    self._attempt(conn, delivery)
                    sent += 1
        return sent

    def _claim(self, conn, delivery_id: str, due_by: float) -> dict | None:
        """Take the next attempt of a delivery, or None when another process took it."""
        # The clock is read here, not once per pass: the earlier sends of a
        # pass may have taken up to timeout_s each, and a claim dated from the
        # pass's start could expire before this send even began, letting
        # another process send the same notice again.
        claimed_at = time.time()
        with conn.transaction():
            taken = conn.execute(
                "UPDATE webhook_deliveries SET claimed_until = ?, attempts = attempts + 1"
                " WHERE id = ? AND state = ? AND next_attempt_at <= ?"
                " AND (claimed_until IS NULL OR claimed_until < ?)",
                (claimed_at + self.timeout_s + self.claim_grace_s, delivery_id,
                 DeliveryState.PENDING.value, due_by, claimed_at))
            if not taken:
                return None
            delivery = conn.query_one("SELECT * FROM webhook_deliveries WHERE id = ?", (delivery_id,))
            delivery["secret"] = secret_for(conn, delivery["owner_id"], claimed_at)
        return delivery

    def _attempt(self, conn, delivery: dict) -> None:
        status, error, detail = self._send(delivery)
        now = time.time()
        attempt = delivery["attempts"]
        if error is None:
            state, next_at = DeliveryState.DELIVERED, delivery["next_attempt_at"]
        elif attempt >= self.max_attempts:
            state, next_at = DeliveryState.FAILED, delivery["next_attempt_at"]
        else:
            state = DeliveryState.PENDING
            next_at = now + min(self.backoff_s * 2 ** (attempt - 1), MAX_BACKOFF_S)
        # Compare-and-set on the attempt number, which every claim increments: a
        # claimer whose claim expired while it waited, and which another
        # process claimed again, finds its attempt number gone and writes nothing.
        with conn.transaction():
            conn.execute(
                "UPDATE webhook_deliveries SET state = ?, next_attempt_at = ?, claimed_until = NULL,"
                " last_status = ?, last_error = ?, last_error_detail = ?, delivered_at = ?"
                " WHERE id = ? AND attempts = ?",
                (state.value, next_at, status, error, detail,
                 now if state == DeliveryState.DELIVERED else None, delivery["id"], attempt))

    def _send(self, delivery: dict) -> tuple[int | None, str | None, str | None]:
        """POST the delivery once.

        Returns:
            (HTTP status or None, the error its user reads, the admin's detail);
            both errors None on success.
        """
        problem = url_problem(delivery["url"], self.allowed_hosts)
        if problem:
            return None, problem, problem
        body = delivery["body"].encode()
        timestamp = int(time.time())
        headers = {"Content-Type": "application/json", "User-Agent": "jobcloud-webhooks",
                   "X-Jobcloud-Event": EVENT, "X-Jobcloud-Delivery": delivery["id"],
                   "X-Jobcloud-Timestamp": str(timestamp),
                   "X-Jobcloud-Signature": sign(delivery["secret"], timestamp, body)}
        status = None
        try:
            status = post(delivery["url"], body, headers, allowed_hosts=self.allowed_hosts,
                          deadline_s=self.timeout_s)
        except SendFailed as e:
            detail = f"{e.reason}: {e.detail}" if e.detail else e.reason
        else:
            if 200 <= status < 300:
                return status, None, None
            detail = f"HTTP {status}"
        log.warning("webhook %s for job %s to %s, attempt %d: %s", delivery["id"],
                    delivery["job_id"], delivery["url"], delivery["attempts"], detail)
        return status, DELIVERY_FAILED, detail[:1000]
