"""Reports: /usage (a user's totals per day or month, HTML, JSON, CSV) and the admin
dashboard /admin (workers, scaler VMs, queue depth by user, jobs per hour,
storage per user).

Pages are rendered on the server, charts included (inline SVG: no script, no
chart library, nothing the CSP has to allow).
"""
from __future__ import annotations

import time

from flask import Blueprint, Response, g, jsonify, render_template, request, url_for

from . import accounts, limits, retention, usage, vms, waiting, workers
from .appstate import app_state
from .auth import api_admin, api_user, login_required
from .db import get_conn
from .errors import Forbidden
from .models import JobState, id_floor, iso

bp = Blueprint("dashboard", __name__)

# Jobs per hour on the dashboard: the last day, hour by hour.
DASHBOARD_HOURS = 24
SCALER_EVENTS_SHOWN = 20
# Queued jobs the dashboard explains, oldest first: the head of the queue is what starts next.
QUEUED_JOBS_SHOWN = 50


# ----------------------------------------------------------------------- usage

@bp.route("/usage", methods=["GET"])
@login_required
def usage_page():
    data, shown_user = _usage_report(g.user)
    conn = get_conn()
    users = [u["name"] for u in accounts.list_users(conn)] if g.user["is_admin"] else []
    series = usage.chart_series(data)
    csv_args = {k: v for k, v in request.args.items() if k in ("period", "since", "until", "user")}
    # Costs only where something costs: prices are set, or were when these jobs finished.
    show_cost = (usage.billed(usage.get_prices(conn))
                 or any(t["cost_micros"] for t in data["totals"]))
    return render_template(
        "usage.html", data=data, shown_user=shown_user, users=users, show_cost=show_cost,
        cpu_chart=bar_chart(usage.hours_series(data, "cpu_hours")),
        gb_chart=bar_chart(usage.hours_series(data, "gb_hours")),
        chart=bar_chart([(label, micros / usage.MICROS) for label, micros in series]),
        chart_currency=data["totals"][0]["currency"] if data["totals"] else usage.DEFAULT_CURRENCY,
        csv_url=url_for("dashboard.usage_csv", **csv_args),
        storage=_storage(conn, g.user, shown_user))


@bp.route("/api/v1/usage", methods=["GET"])
def usage_json():
    viewer = api_user()
    data, shown_user = _usage_report(viewer)
    return jsonify(dict(data, user=shown_user, storage=_storage(get_conn(), viewer, shown_user)))


@bp.route("/api/v1/usage.csv", methods=["GET"])
def usage_csv():
    data, shown_user = _usage_report(api_user())
    name = f"usage-{shown_user or 'all'}-{data['period']}-{data['since']}-{data['until']}.csv"
    return Response(usage.report_csv(data), mimetype="text/csv",
                    headers={"Content-Disposition": f'attachment; filename="{name}"'})


def _usage_report(viewer: dict) -> tuple[dict, str | None]:
    """The report the query string asks for, as `viewer` may see it.

    A user sees their own figures; an admin sees everyone's, or one user's
    with ?user=NAME. Another user's name from a non-admin is 404, as for jobs.
    """
    query = usage.parse_query(request.args)
    conn = get_conn()
    name = request.args.get("user") or None
    if name is not None:
        owner = accounts.visible_owner(conn, name, viewer)
    else:
        owner = None if viewer["is_admin"] else viewer
    data = usage.report(conn, query, owner["id"] if owner else None)
    return data, owner["name"] if owner else None


def _storage(conn, viewer: dict, shown_user: str | None) -> list[dict]:
    """Stored bytes against the quota (retention.py): the shown user's, or
    every user's for an admin's view of all users."""
    defaults = _storage_defaults()
    if shown_user is None and viewer["is_admin"]:
        return retention.storage_report(conn, **defaults)
    user = accounts.get_user_by_name(conn, shown_user) if shown_user else viewer
    return [retention.storage_of_user(conn, user, limits.get_limits(conn, user["id"]), **defaults)]


def _storage_defaults() -> dict:
    cfg = app_state().config
    return {"default_days": cfg.retention_days, "default_quota_mb": cfg.storage_quota_mb}


# ------------------------------------------------------------------- dashboard

@bp.route("/admin", methods=["GET"])
@login_required
def admin_page():
    if not g.user["is_admin"]:
        raise Forbidden("the dashboard is for admins", code="admin_only")
    data = dashboard_data(get_conn(), lease_timeout_s=app_state().config.lease_timeout_s)
    hours = data["jobs_per_hour"]
    return render_template(
        "admin.html", data=data,
        submitted_chart=bar_chart([(h["hour"][11:16], h["submitted"]) for h in hours]),
        finished_chart=bar_chart([(h["hour"][11:16], h["finished"]) for h in hours]))


@bp.route("/api/v1/admin/dashboard", methods=["GET"])
def admin_json():
    api_admin()
    return jsonify(dashboard_data(get_conn(), lease_timeout_s=app_state().config.lease_timeout_s))


def dashboard_data(conn, now: float | None = None, *, lease_timeout_s: float) -> dict:
    """Everything the dashboard shows, as JSON-ready values."""
    now = time.time() if now is None else now
    return {
        "generated_at": iso(now),
        "workers": [workers.worker_json(w) for w in workers.list_workers(conn)],
        "vms": [vms.vm_json(v) for v in vms.list_vms(conn)],
        "scaler_events": [vms.event_json(e) for e in vms.recent_events(conn, SCALER_EVENTS_SHOWN)],
        "queue": _queue_by_user(conn),
        # The oldest queued jobs and why each waits, in one pass (waiting.explain_queue).
        "queued_jobs": [{"id": job["id"], "name": job["name"], "owner": job["owner"],
                         "submitted_at": iso(job["submitted_at"]), "waiting": why}
                        for job, why in waiting.explain_queue(conn, lease_timeout_s=lease_timeout_s,
                                                              limit=QUEUED_JOBS_SHOWN, now=now)],
        "jobs_per_hour": _jobs_per_hour(conn, now),
        # Stored bytes per user against their quota (retention.py).
        "storage": retention.storage_report(conn, **_storage_defaults()),
    }


def _queue_by_user(conn) -> list[dict]:
    rows = conn.query(
        "SELECT u.name AS user_name, j.state, COUNT(*) AS n FROM jobs j"
        " JOIN users u ON u.id = j.owner_id WHERE j.state IN (?, ?) GROUP BY u.name, j.state",
        (JobState.QUEUED.value, JobState.RUNNING.value))
    by_user: dict[str, dict] = {}
    for r in rows:
        entry = by_user.setdefault(r["user_name"], {"user": r["user_name"], "queued": 0, "running": 0})
        entry[r["state"]] = r["n"]
    return sorted(by_user.values(), key=lambda e: (-e["queued"], e["user"]))


def _jobs_per_hour(conn, now: float) -> list[dict]:
    """Jobs submitted and finished in each of the last 24 whole hours (UTC), this one included."""
    first = (int(now) // 3600 - DASHBOARD_HOURS + 1) * 3600
    # Job ids start with their submission time in microseconds (models.new_id):
    # "submitted since" is an id range on the primary key, no extra index.
    since_id = id_floor("j", first)
    submitted = conn.query("SELECT submitted_at AS t FROM jobs WHERE id >= ?", (since_id,))
    finished = conn.query("SELECT finished_at AS t FROM jobs WHERE finished_at >= ?", (first,))
    hours = [{"hour": iso(first + 3600 * i), "submitted": 0, "finished": 0}
             for i in range(DASHBOARD_HOURS)]
    for rows, key in ((submitted, "submitted"), (finished, "finished")):
        for r in rows:
            index = int((r["t"] - first) // 3600)
            if 0 <= index < DASHBOARD_HOURS:
                hours[index][key] += 1
    return hours


# ---------------------------------------------------------------------- charts

CHART_WIDTH, CHART_HEIGHT, CHART_PAD = 720, 180, 24


def bar_chart(series: list[tuple[str, float]]) -> dict:
    """The geometry of an inline SVG bar chart; the template draws it.

    Returns:
        {"width", "height", "max", "bars": [{"x", "y", "w", "h", "label", "value", "tick"}]}:
        every bar's box in SVG units; `tick` marks the bars whose label is printed
        (about eight, so labels never overlap).
    """
    top = max((v for _, v in series), default=0) or 1
    n = max(len(series), 1)
    slot = (CHART_WIDTH - 2 * CHART_PAD) / n
    usable = CHART_HEIGHT - 2 * CHART_PAD
    every = max(1, -(-n // 8))
    bars = []
    for i, (label, value) in enumerate(series):
        h = usable * value / top
        bars.append({"x": round(CHART_PAD + i * slot + slot * 0.1, 2), "w": round(slot * 0.8, 2),
                     "y": round(CHART_PAD + usable - h, 2), "h": round(h, 2),
                     "label": label, "value": value, "tick": i % every == 0})
    return {"width": CHART_WIDTH, "height": CHART_HEIGHT, "pad": CHART_PAD, "max": top,
            "bars": bars}
