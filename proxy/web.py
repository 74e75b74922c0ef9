"""The browser pages: upload form, code editor, a user's job list, one job, cancel, downloads."""
from __future__ import annotations

import os
import time

from flask import (Blueprint, current_app, flash, g, jsonify, redirect, render_template, request,
                   url_for)

from . import (accounts, arrays, dependencies, job_templates, limits, retention, retries, store, usage,
               waiting, webhooks)
from .appstate import app_state
from .auth import check_csrf, load_user, login_required, password_change_pending
from .db import get_conn
from .downloads import send_outputs
from .errors import Forbidden, ProxyError, Unauthorized
from .intake import submit_job
from .live import Position
from .models import ACTIVE_VALUES, JobState

bp = Blueprint("web", __name__)


@bp.route("/", methods=["GET"])
@login_required
def index():
    return render_template("index.html", cfg=app_state().config)


@bp.route("/jobs", methods=["POST"])
@login_required
def submit():
    st = app_state()
    try:
        job = submit_job(get_conn(), st.config, st.blobs, g.user, request.stream,
                         request.headers.get("Content-Type"), csrf_check=check_csrf)
    except ProxyError as e:
        return render_template("index.html", cfg=st.config, error=e.detail), e.status
    if job.get("array_id"):
        flash(f"Array {job['name'].rsplit('[', 1)[0]!r} accepted.")
        return redirect(url_for("web.array_page", array_id=job["array_id"]))
    flash(f"Job {job['name']!r} accepted.")
    return redirect(url_for("web.job_page", job_id=job["id"]))


@bp.route("/job-status/<user>", methods=["GET"])
def job_status(user):
    """A user's jobs, newest first. HTML, or JSON for Accept: application/json."""
    wants_json = request.accept_mimetypes.best_match(["text/html", "application/json"]) \
        == "application/json"
    viewer = load_user()
    if viewer is None:
        if wants_json:
            raise Unauthorized("log in or send 'Authorization: Bearer <API token>'")
        return redirect(url_for("auth.login", next=request.path))
    if password_change_pending(viewer):
        if wants_json:
            raise Forbidden("change your one-time password first", code="password_change_required")
        return redirect(url_for("auth.password"))
    conn = get_conn()
    owner = accounts.visible_owner(conn, user, viewer)
    before = request.args.get("before") or None
    jobs, cursor = store.list_jobs(conn, owner["id"], before=before, limit=app_state().config.page_size)
    if wants_json:
        return jsonify({
            "user": owner["name"], "jobs": [store.job_json(j) for j in jobs],
            "next": url_for("web.job_status", user=owner["name"], before=cursor) if cursor else None,
        })
    active = any(j["state"] in ACTIVE_VALUES for j in jobs)
    # The page updates itself over live.py's stream; the refresh is for browsers without scripts.
    return render_template("job_status.html", owner=owner, jobs=jobs, cursor=cursor,
                           refresh=app_state().config.status_refresh_s if active else None,
                           rendered_at=time.time())


@bp.route("/jobs/<job_id>", methods=["GET"])
@login_required
def job_page(job_id):
    conn = get_conn()
    job = store.get_visible_job(conn, job_id, g.user)
    logs = {s: store.read_logs(conn, job, s) for s in ("stdout", "stderr")}
    # The page shows what is stored now and follows the rest live (live.py)
    # from this position.
    position = Position(job["attempt"], logs["stdout"]["next_offset"], logs["stderr"]["next_offset"])
    active = job["state"] in ACTIVE_VALUES
    why = waiting.explain(conn, job, lease_timeout_s=app_state().config.lease_timeout_s)
    return render_template("job.html", job=job, job_view=store.job_json(job, why, tries=retries.tries_json(conn, job)), logs=logs,
                           relations=dependencies.relations(conn, job),
                           position=position.event_id(), kept_until=_kept_until(conn, job),
                           billed=usage.billed(usage.get_prices(conn)),
                           refresh=app_state().config.status_refresh_s if active else None)


def _kept_until(conn, job: dict) -> float | None:
    """When the job's files expire (retention.py); None when kept (pinned, unfinished, for ever)."""
    days = retention.retention_days(app_state().config.retention_days,
                                    limits.get_limits(conn, job["owner_id"]))
    return retention.expires_at(job, days)


@bp.route("/jobs/<job_id>/pin", methods=["POST"])
@login_required
def pin(job_id):
    """The job page's Keep / Let expire button (retention.set_pinned)."""
    check_csrf(request.form.get("csrf_token"))
    conn = get_conn()
    job = store.get_visible_job(conn, job_id, g.user)
    keep = request.form.get("pinned") == "1"
    try:
        retention.set_pinned(conn, job, keep)
        flash("Pinned: this job's files are kept until you unpin it." if keep else
              "Unpinned: this job's files expire with the retention time.")
    except ProxyError as e:
        flash(e.detail)
    return redirect(url_for("web.job_page", job_id=job_id))


@bp.route("/new", methods=["GET"])
@login_required
def new_job():
    """The code editor page; "Run" posts to /jobs like the upload form."""
    # Without the built bundle (scripts/build-editor.sh) the page keeps a plain text area.
    bundle = os.path.exists(os.path.join(current_app.static_folder, "editor.bundle.js"))
    cfg = app_state().config
    return render_template("new_job.html", cfg=cfg, templates=job_templates.load(cfg.images),
                           editor_bundle=bundle)


@bp.route("/jobs/<job_id>/cancel", methods=["POST"])
@login_required
def cancel(job_id):
    check_csrf(request.form.get("csrf_token"))
    conn = get_conn()
    job = store.get_visible_job(conn, job_id, g.user)
    try:
        store.cancel_job(conn, job)
        flash("Cancelled." if job["state"] == JobState.QUEUED.value else
              "Cancel requested: the worker stops the job.")
    except ProxyError as e:
        flash(e.detail)
    return redirect(url_for("web.job_page", job_id=job_id))


@bp.route("/jobs/<job_id>/outputs", methods=["GET"])
@login_required
def outputs(job_id):
    st = app_state()
    return send_outputs(store.get_visible_job(get_conn(), job_id, g.user), st.blobs,
                        stream=st.config.blob_user_downloads == "stream")


@bp.route("/arrays/<array_id>", methods=["GET"])
@login_required
def array_page(array_id):
    """A job array: counts per state and its jobs by index; static/array.js keeps it current."""
    conn = get_conn()
    array = arrays.get_visible_array(conn, array_id, g.user)
    # The first PAGE_JOBS by index: a 10,000-row table is no page; the JSON has them all.
    view = arrays.array_json(conn, array, limit=arrays.PAGE_JOBS)
    return render_template("array.html", array=view)


@bp.route("/arrays/<array_id>/cancel", methods=["POST"])
@login_required
def cancel_array(array_id):
    check_csrf(request.form.get("csrf_token"))
    conn = get_conn()
    done = arrays.cancel(conn, arrays.get_visible_array(conn, array_id, g.user))
    flash(f"Cancelled {done['cancelled']} queued job(s); {done['stopping']} running job(s)"
          " told to stop.")
    return redirect(url_for("web.array_page", array_id=array_id))


@bp.route("/arrays/<array_id>/outputs", methods=["GET"])
@login_required
def array_outputs(array_id):
    conn = get_conn()
    return arrays.send_archive(conn, arrays.get_visible_array(conn, array_id, g.user),
                               app_state().blobs)


@bp.route("/account/webhook", methods=["GET", "POST"])
@login_required
def webhook_secret():
    """The user's webhook signing secret (webhooks.py); POST makes a new one."""
    conn = get_conn()
    if request.method == "POST":
        check_csrf(request.form.get("csrf_token"))
        webhooks.rotate_secret(conn, g.user["id"])
        flash("New webhook secret made: update your receivers.")
        return redirect(url_for("web.webhook_secret"))
    return render_template("webhook.html", secret=webhooks.secret_for(conn, g.user["id"]),
                           allowed_hosts=app_state().config.webhook_allowed_hosts)
