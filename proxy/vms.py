"""What the VM scaler reads from the proxy and reports back to it.

The scaler (vm_provisioning, another deployable) owns the VMs and talks to the
proxy only through the admin API. It reads `queue_view` (how many jobs wait,
which workers are busy or idle and for how long) and reports its VM list and
the decisions it took (`record_report`), which the proxy stores so that the
dashboard (`list_vms`, `recent_events`) and /metrics show them. The proxy never
calls libvirt.
"""
from __future__ import annotations

import re
import time
from collections import Counter

from . import capacity
from .errors import ValidationError
from .jsonbody import is_number
from .models import LIVE_WORKER_STATES, JobState, iso, new_id

VM_STATES = ("booting", "ready", "draining", "stopping")
# One report carries every VM and the decisions of one pass: far below these.
MAX_REPORT_VMS = 1000
MAX_REPORT_EVENTS = 1000
MAX_REPORT_SHAPES = 20
# Boot durations kept for the typical boot time a queued job shows (waiting.py).
KEEP_BOOTS = 50
# The decision log the dashboard shows is kept to the newest 1000 of the last week: a
# scaler reports every pass, and an unpruned log grew without bound.
KEEP_EVENTS = 1000
KEEP_EVENTS_S = 7 * 24 * 3600
SHAPE_KEYS = ("cpus", "memory_mb", "gpus", "images")
_ACTION = re.compile(r"^[a-z_]{1,32}$")


def parse_shape(args) -> dict | None:
    """The worker shape of GET /api/v1/admin/queue's query: cpus, memory_mb, gpus, images.

    All or none: a scaler asks "how many queued jobs could a worker like my VMs
    run". `images` is a comma-separated list.

    Raises:
        ValidationError: some but not all are given, or one is out of range.
    """
    given = [k for k in SHAPE_KEYS if args.get(k) is not None]
    if not given:
        return None
    try:
        if len(given) != len(SHAPE_KEYS):
            raise ValueError
        shape = {"cpus": float(args["cpus"]), "memory_mb": int(args["memory_mb"]),
                 "gpus": int(args["gpus"]),
                 "images": [i for i in args["images"].split(",") if i]}
    except ValueError:
        shape = None
    if shape is None or not (0 < shape["cpus"] <= 4096 and 0 < shape["memory_mb"] <= 2**26
                             and 0 <= shape["gpus"] <= 1024 and 0 < len(shape["images"]) <= 100
                             and all(_text(i, 200) for i in shape["images"])):
        raise ValidationError("a worker shape needs all of cpus (0-4096), memory_mb (1-67108864), "
                              "gpus (0-1024) and images (1-100 comma-separated names)",
                              code="invalid_shape")
    return shape


def queue_view(conn, now: float | None = None, shape: dict | None = None) -> dict:
    """Queued and running job counts, and each live worker's load and idle time.

    `runnable` is the part of the queue more workers could start now: jobs whose
    owner is under their max_running (at most their headroom per owner) and,
    given a worker `shape` (parse_shape), that fit it. A scaler scales on it, so
    jobs no VM can run (a GPU, more memory than a VM has, an owner at their
    limit) neither pin the fleet at max_vms nor keep cloning VMs.

    A worker's `idle_s` is the seconds since it last finished a job (or since it
    registered, when it never ran one), and None while it holds any job, running
    or reserved. Computed here, on the proxy's clock, so the scaler's clock never
    has to agree with it.
    """
    now = time.time() if now is None else now
    counts = {r["state"]: r["n"] for r in conn.query(
        "SELECT state, COUNT(*) AS n FROM jobs WHERE state IN (?, ?) GROUP BY state",
        (JobState.QUEUED.value, JobState.RUNNING.value))}
    rows = conn.query(
        "SELECT w.id, w.name, w.state, w.slots, w.registered_at,"
        " (SELECT COUNT(*) FROM jobs j WHERE j.worker_id = w.id AND j.state = ?) AS running,"
        " (SELECT COUNT(*) FROM jobs j WHERE j.worker_id = w.id AND j.state = ?) AS reserved,"
        " (SELECT MAX(j.finished_at) FROM jobs j WHERE j.worker_id = w.id) AS last_finished"
        " FROM workers w WHERE w.state IN (?, ?) ORDER BY w.name, w.id",
        (JobState.RUNNING.value, JobState.QUEUED.value, *LIVE_WORKER_STATES))
    workers = []
    for w in rows:
        busy = w["running"] or w["reserved"]
        since = max(w["registered_at"], w["last_finished"] or 0)
        workers.append({"id": w["id"], "name": w["name"], "state": w["state"], "slots": w["slots"],
                        "running": w["running"], "reserved": w["reserved"],
                        "idle_s": None if busy else max(0.0, now - since)})
    return {"queued": counts.get(JobState.QUEUED.value, 0),
            "running": counts.get(JobState.RUNNING.value, 0),
            "runnable": _runnable(conn, shape), "workers": workers}


def _runnable(conn, shape: dict | None) -> int:
    fits, args = "", []
    if shape is not None:
        fits = (" AND j.cpus <= ? AND j.memory_mb <= ? AND j.gpus <= ?"
                f" AND j.image IN ({', '.join('?' for _ in shape['images'])})")
        args = [shape["cpus"], shape["memory_mb"], shape["gpus"], *shape["images"]]
    rows = conn.query(
        "SELECT j.owner_id, COUNT(*) AS n,"
        " (SELECT l.max_running FROM user_limits l WHERE l.user_id = j.owner_id) AS max_running,"
        " (SELECT COUNT(*) FROM jobs r WHERE r.owner_id = j.owner_id AND r.state = ?) AS running"
        f" FROM jobs j WHERE j.state = ?{fits} GROUP BY j.owner_id",
        (JobState.RUNNING.value, JobState.QUEUED.value, *args))
    return sum(r["n"] if r["max_running"] is None else min(r["n"], max(0, r["max_running"] - r["running"]))
               for r in rows)


def record_report(conn, body: dict, now: float | None = None) -> dict:
    """Replace the VM list (and, when given, the worker shapes) with the scaler's
    and append its decisions.

    The scaler sends its whole list each time, so a VM it no longer reports is
    gone; one writer (the scaler) means no merge is needed. Its `shapes` are
    what intake checks an impossible job against (capacity.py); a VM past
    `booting` since the last report adds its boot time (waiting.py).

    Raises:
        ValidationError: the report is malformed (nothing is stored then).
    """
    now = time.time() if now is None else now
    vms = [_vm(v) for v in _list(body, "vms", MAX_REPORT_VMS)]
    events = [_event(e) for e in _list(body, "events", MAX_REPORT_EVENTS)]
    # Absent (a scaler from before issue 14): the stored shapes age out (capacity.SHAPE_FRESH_S).
    shapes = ([_shape(s) for s in _list(body, "shapes", MAX_REPORT_SHAPES)]
              if "shapes" in body else None)
    if len({v["name"] for v in vms}) != len(vms):
        raise ValidationError("vms must not name a VM twice", code="invalid_report")
    with conn.transaction():
        old = {r["name"]: r for r in conn.query("SELECT name, state, created_at FROM vms")}
        _record_boots(conn, old, vms, now)
        if shapes is not None:
            capacity.store_shapes(conn, shapes, now)
        conn.execute("DELETE FROM vms")
        for v in vms:
            conn.execute("INSERT INTO vms (name, host_uri, state, worker_name, created_at, updated_at)"
                         " VALUES (?, ?, ?, ?, ?, ?)",
                         (v["name"], v["host_uri"], v["state"], v["worker_name"],
                          v["created_at"] if v["created_at"] is not None
                          else (old[v["name"]]["created_at"] if v["name"] in old else now), now))
        for e in events:
            conn.execute("INSERT INTO scaler_events (id, at, action, reason, vm_name) VALUES (?, ?, ?, ?, ?)",
                         (new_id("se"), now, e["action"], e["reason"], e["vm_name"]))
        for action, n in Counter(e["action"] for e in events).items():
            conn.execute("INSERT INTO scaler_decision_counts (action, n) VALUES (?, ?)"
                         " ON CONFLICT (action) DO UPDATE SET n = scaler_decision_counts.n + excluded.n",
                         (action, n))
        if events:
            _prune_events(conn, now)
    return {"vms": len(vms), "events": len(events)}


def _record_boots(conn, old: dict, vms: list[dict], now: float) -> None:
    """A VM reported `booting` last time and past it now booted: keep how long it took
    (waiting.py's typical boot time), the newest KEEP_BOOTS only."""
    booted = [(v["name"], now - old[v["name"]]["created_at"]) for v in vms
              if v["name"] in old and old[v["name"]]["state"] == "booting" and v["state"] != "booting"]
    for name, seconds in booted:
        conn.execute("INSERT INTO vm_boots (id, vm_name, ready_at, boot_s) VALUES (?, ?, ?, ?)",
                     (new_id("vb"), name, now, max(0.0, seconds)))
    if booted:
        last = conn.query_one("SELECT ready_at FROM vm_boots ORDER BY ready_at DESC LIMIT 1 OFFSET ?",
                              (KEEP_BOOTS - 1,))
        if last:
            conn.execute("DELETE FROM vm_boots WHERE ready_at < ?", (last["ready_at"],))


def _prune_events(conn, now: float) -> None:
    """Keep the newest KEEP_EVENTS decisions of the last KEEP_EVENTS_S; the totals
    /metrics shows live on in scaler_decision_counts."""
    conn.execute("DELETE FROM scaler_events WHERE at < ?", (now - KEEP_EVENTS_S,))
    # The oldest one kept, in recent_events' order (one report's events share `at`).
    last = conn.query_one("SELECT at, id FROM scaler_events ORDER BY at DESC, id DESC LIMIT 1 OFFSET ?",
                          (KEEP_EVENTS - 1,))
    if last:
        conn.execute("DELETE FROM scaler_events WHERE at < ? OR (at = ? AND id < ?)",
                     (last["at"], last["at"], last["id"]))


def list_vms(conn) -> list[dict]:
    """The VMs the scaler last reported, with their worker's state and running jobs (oldest first)."""
    rows = conn.query(
        "SELECT v.name, v.host_uri, v.state, v.worker_name, v.created_at, v.updated_at,"
        " (SELECT w.state FROM workers w WHERE w.name = v.worker_name AND w.state IN (?, ?)"
        "  ORDER BY w.id DESC LIMIT 1) AS worker_state,"
        " (SELECT COUNT(*) FROM jobs j JOIN workers w ON j.worker_id = w.id"
        "  WHERE w.name = v.worker_name AND w.state IN (?, ?) AND j.state = ?) AS running"
        " FROM vms v ORDER BY v.created_at, v.name",
        (*LIVE_WORKER_STATES, *LIVE_WORKER_STATES, JobState.RUNNING.value))
    return [dict(r) for r in rows]


def recent_events(conn, limit: int = 50) -> list[dict]:
    """The scaler's latest decisions, newest first: at, action, reason, vm_name."""
    return [dict(r) for r in conn.query(
        "SELECT id, at, action, reason, vm_name FROM scaler_events ORDER BY at DESC, id DESC LIMIT ?",
        (max(0, int(limit)),))]


def vm_json(v: dict) -> dict:
    """A `list_vms` row as the API and the dashboard show it (times in ISO 8601)."""
    return dict(v, created_at=iso(v["created_at"]), updated_at=iso(v["updated_at"]))


def event_json(e: dict) -> dict:
    """A `recent_events` row as the API and the dashboard show it."""
    return dict(e, at=iso(e["at"]))


def vm_counts(conn) -> dict[str, int]:
    return {r["state"]: r["n"] for r in conn.query("SELECT state, COUNT(*) AS n FROM vms GROUP BY state")}


def decision_counts(conn) -> dict[str, int]:
    """Every decision ever reported, by action (kept apart from the pruned event list)."""
    return {r["action"]: r["n"] for r in conn.query("SELECT action, n FROM scaler_decision_counts")}


# ------------------------------------------------------------------ validation

def _list(body: dict, key: str, most: int) -> list:
    value = body.get(key, [])
    if not isinstance(value, list) or len(value) > most:
        raise ValidationError(f"{key} must be a list of at most {most} objects", code="invalid_report")
    if not all(isinstance(v, dict) for v in value):
        raise ValidationError(f"each of {key} must be a JSON object", code="invalid_report")
    return value


def _vm(v: dict) -> dict:
    created = v.get("created_at")
    if not (_text(v.get("name"), 64) and _text(v.get("host_uri"), 500) and v.get("state") in VM_STATES
            and (v.get("worker_name") is None or _text(v.get("worker_name"), 64))
            and (created is None or (is_number(created) and 0 <= created < 2**35))):
        raise ValidationError("each VM needs name (1-64 chars), host_uri, state "
                              f"({', '.join(VM_STATES)}), and optionally worker_name and "
                              "created_at (seconds since the epoch)", code="invalid_report")
    return {"name": v["name"], "host_uri": v["host_uri"], "state": v["state"],
            "worker_name": v.get("worker_name"), "created_at": created}


def _shape(s: dict) -> dict:
    """A worker shape the scaler can create: cpus, memory_mb, gpus, images (a list)."""
    images = s.get("images")
    if not (is_number(s.get("cpus")) and 0 < s["cpus"] <= 4096
            and is_number(s.get("memory_mb"), integer=True) and 0 < s["memory_mb"] <= 2**26
            and is_number(s.get("gpus"), integer=True) and 0 <= s["gpus"] <= 1024
            and isinstance(images, list) and 0 < len(images) <= 100
            and all(_text(i, 200) for i in images)):
        raise ValidationError("each shape needs cpus (0-4096), memory_mb (1-67108864), gpus "
                              "(0-1024) and images (a list of 1-100 names)", code="invalid_report")
    return {"cpus": float(s["cpus"]), "memory_mb": int(s["memory_mb"]), "gpus": int(s["gpus"]),
            "images": list(images)}


def _event(e: dict) -> dict:
    action, reason, vm = e.get("action"), e.get("reason"), e.get("vm_name")
    if not (isinstance(action, str) and _ACTION.match(action) and _text(reason, 1000)
            and (vm is None or _text(vm, 64))):
        raise ValidationError("each event needs action (a-z and _), reason (1-1000 chars) "
                              "and optionally vm_name", code="invalid_report")
    return {"action": action, "reason": reason, "vm_name": vm}


def _text(value, most: int) -> bool:
    return isinstance(value, str) and 0 < len(value) <= most and value.isprintable()
