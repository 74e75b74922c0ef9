"""The user REST API (/api/v1): jobs, logs, outputs, cancel, pin, tokens.

Every route answers JSON; errors are {"error", "detail"} with a 4xx status.
A user sees only their own jobs (admins see all); others' jobs are 404.
"""
from __future__ import annotations

from flask import Blueprint, jsonify, request, url_for

from . import (accounts, arrays, dependencies, jobenv, retention, retries, store, waiting,
               webhooks)
from .appstate import app_state
from .auth import api_user
from .db import get_conn
from .downloads import send_outputs
from .errors import ValidationError
from .intake import submit_job
from .jsonbody import json_object
from .models import JobState, iso

bp = Blueprint("api", __name__, url_prefix="/api/v1")


@bp.route("/me", methods=["GET"])
def me():
    user = api_user()
    return jsonify({"id": user["id"], "name": user["name"], "is_admin": bool(user["is_admin"])})


@bp.route("/jobs", methods=["POST"])
def create_job():
    user = api_user()
    st = app_state()
    conn = get_conn()
    job = submit_job(conn, st.config, st.blobs, user, request.stream,
                     request.headers.get("Content-Type"))
    if job.get("array_id"):
        # An array submission (arrays.py) answers with the array it made.
        array = arrays.get_visible_array(conn, job["array_id"], user)
        return (jsonify(arrays.array_json(conn, array, limit=st.config.page_size)), 201,
                {"Location": f"/api/v1/arrays/{array['id']}"})
    return jsonify(_job_view(conn, job)), 201, {"Location": f"/api/v1/jobs/{job['id']}"}


@bp.route("/jobs", methods=["GET"])
def list_jobs():
    user = api_user()
    limit = _int_arg("limit", app_state().config.page_size, 1, 500)
    job_state = request.args.get("state") or None
    if job_state is not None and job_state not in {s.value for s in JobState}:
        raise ValidationError(f"state must be one of {[s.value for s in JobState]}",
                              code="invalid_state")
    jobs, cursor = store.list_jobs(get_conn(), user["id"], before=request.args.get("before") or None,
                                   limit=limit, state=job_state)
    return jsonify({"jobs": [store.job_json(j) for j in jobs],
                    "next": url_for("api.list_jobs", before=cursor, limit=limit, state=job_state)
                    if cursor else None})


@bp.route("/jobs/<job_id>", methods=["GET"])
def get_job(job_id):
    conn = get_conn()
    return jsonify(_job_view(conn, store.get_visible_job(conn, job_id, api_user())))


@bp.route("/jobs/<job_id>/env", methods=["GET"])
def get_job_env(job_id):
    """The job's environment variables with their values: its owner's only (jobenv.py)."""
    conn = get_conn()
    user = api_user()
    return jsonify(jobenv.owner_values(store.get_visible_job(conn, job_id, user), user))


def _job_view(conn, job: dict) -> dict:
    """One job's JSON with why it waits, if it is queued, and the jobs it runs
    after and before (dependencies.relations)."""
    return {**store.job_json(job, waiting.explain(conn, job,
                                                  lease_timeout_s=app_state().config.lease_timeout_s),
                             tries=retries.tries_json(conn, job)),
            **dependencies.relations(conn, job)}


@bp.route("/jobs/<job_id>/logs", methods=["GET"])
def get_logs(job_id):
    conn = get_conn()
    job = store.get_visible_job(conn, job_id, api_user())
    stream = request.args.get("stream", "stdout")
    if stream not in ("stdout", "stderr"):
        raise ValidationError("stream must be stdout or stderr", code="invalid_stream")
    offset = _int_arg("offset", 0, 0, 2**62)
    # One try's logs (its `tries` entry links here); default: the latest.
    attempt = _int_arg("attempt", job["attempt"], 0, 2**31 - 1)
    if job.get("expired_at") is not None:
        raise retention.gone(job, "logs")
    view = retries.logs_view(conn, job, attempt)
    logs = store.read_logs(conn, view, stream, offset)
    return jsonify(dict(logs, job_id=job["id"], attempt=view["attempt"], state=job["state"]))


@bp.route("/jobs/<job_id>/outputs", methods=["GET"])
def get_outputs(job_id):
    st = app_state()
    return send_outputs(store.get_visible_job(get_conn(), job_id, api_user()), st.blobs,
                        stream=st.config.blob_user_downloads == "stream")


@bp.route("/jobs/<job_id>/pin", methods=["POST", "DELETE"])
def pin_job(job_id):
    """POST keeps the job's files past the retention time (retention.py); DELETE lets them expire."""
    conn = get_conn()
    job = store.get_visible_job(conn, job_id, api_user())
    retention.set_pinned(conn, job, request.method == "POST")
    return jsonify(_job_view(conn, store.get_job(conn, job["id"])))


@bp.route("/jobs/<job_id>/cancel", methods=["POST"])
def cancel_job(job_id):
    conn = get_conn()
    job = store.get_visible_job(conn, job_id, api_user())
    return jsonify(store.job_json(store.cancel_job(conn, job)))


@bp.route("/arrays/<array_id>", methods=["GET"])
def get_array(array_id):
    """A job array: counts per state and its jobs by index, a page at a time (?after=INDEX)."""
    conn = get_conn()
    array = arrays.get_visible_array(conn, array_id, api_user())
    after = _int_arg("after", -1, -1, 2**31 - 1)
    return jsonify(arrays.array_json(conn, array, after=None if after < 0 else after,
                                     limit=_int_arg("limit", 1000, 1, 10_000)))


@bp.route("/arrays/<array_id>/cancel", methods=["POST"])
def cancel_array(array_id):
    conn = get_conn()
    array = arrays.get_visible_array(conn, array_id, api_user())
    done = arrays.cancel(conn, array)
    return jsonify(dict(arrays.array_json(conn, array, limit=0), **done))


@bp.route("/arrays/<array_id>/outputs", methods=["GET"])
def get_array_outputs(array_id):
    conn = get_conn()
    return arrays.send_archive(conn, arrays.get_visible_array(conn, array_id, api_user()),
                               app_state().blobs)


@bp.route("/tokens", methods=["GET"])
def list_tokens():
    user = api_user()
    return jsonify({"tokens": [_token_json(t) for t in accounts.list_tokens(get_conn(), user["id"])]})


@bp.route("/tokens", methods=["POST"])
def create_token():
    user = api_user()
    label = json_object().get("label", "")
    if not isinstance(label, str):
        raise ValidationError("label must be a string", code="invalid_label")
    record, token = accounts.create_token(get_conn(), user["id"], label)
    return jsonify(dict(_token_json(record), token=token)), 201


@bp.route("/tokens/<token_id>", methods=["DELETE"])
def revoke_token(token_id):
    user = api_user()
    accounts.revoke_token(get_conn(), user["id"], token_id)
    return jsonify({"revoked": token_id})


@bp.route("/webhook-secret", methods=["GET"])
def get_webhook_secret():
    user = api_user()
    return jsonify(_webhook_secret_json(webhooks.secret_for(get_conn(), user["id"])))


@bp.route("/webhook-secret", methods=["POST"])
def rotate_webhook_secret():
    user = api_user()
    return jsonify(_webhook_secret_json(webhooks.rotate_secret(get_conn(), user["id"])))


def _webhook_secret_json(secret: str) -> dict:
    return {"secret": secret, "algorithm": "HMAC-SHA256",
            "signed_content": "<X-Jobcloud-Timestamp> + '.' + <raw body>",
            "signature_header": "X-Jobcloud-Signature: sha256=<hex>"}


def _token_json(t: dict) -> dict:
    return {"id": t["id"], "label": t["label"], "created_at": iso(t["created_at"]),
            "last_used_at": iso(t.get("last_used_at")), "revoked_at": iso(t.get("revoked_at"))}


def _int_arg(name: str, default: int, lo: int, hi: int) -> int:
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValidationError(f"{name} must be a whole number", code="invalid_parameter") from None
    if not lo <= value <= hi:
        raise ValidationError(f"{name} must be between {lo} and {hi}", code="invalid_parameter")
    return value
