"""Admin API (/api/v1/admin): users, worker enrollment tokens, workers (drain, resume, revoke)."""
from __future__ import annotations

from flask import Blueprint, jsonify, request

from . import accounts, limits, usage, vms, webhooks, workers
from .appstate import app_state
from .auth import api_admin
from .db import get_conn
from .jsonbody import is_number, json_object
from .errors import NotFound, ValidationError
from .models import WorkerState, is_lookup_key, iso

bp = Blueprint("admin_api", __name__, url_prefix="/api/v1/admin")


@bp.route("/users", methods=["GET"])
def list_users():
    api_admin()
    return jsonify({"users": [{"id": u["id"], "name": u["name"], "is_admin": bool(u["is_admin"]),
                               "created_at": iso(u["created_at"])}
                              for u in accounts.list_users(get_conn())]})


@bp.route("/users", methods=["POST"])
def create_user():
    api_admin()
    body = json_object()
    name, admin = body.get("name"), body.get("admin", False)
    if not isinstance(name, str) or not isinstance(admin, bool):
        raise ValidationError("name must be a string and admin a boolean", code="invalid_user")
    password = accounts.generate_password()
    conn = get_conn()
    with conn.transaction():
        user = accounts.create_user(conn, name, password, admin=admin, must_change=True)
    return jsonify({"id": user["id"], "name": user["name"], "is_admin": admin,
                    "one_time_password": password}), 201


@bp.route("/users/<name>/limits", methods=["GET"])
def get_user_limits(name):
    api_admin()
    conn = get_conn()
    return jsonify(dict(limits.get_limits(conn, _user_id(conn, name)), user=name))


@bp.route("/users/<name>/limits", methods=["PUT"])
def set_user_limits(name):
    api_admin()
    conn = get_conn()
    changed = limits.set_limits(conn, _user_id(conn, name), json_object())
    return jsonify(dict(changed, user=name))


def _user_id(conn, name: str) -> str:
    user = accounts.get_user_by_name(conn, name) if is_lookup_key(name) else None
    if user is None:
        raise NotFound(f"no user {name[:64]!r}", code="user_not_found")
    return user["id"]


@bp.route("/enrollment-tokens", methods=["GET"])
def list_enrollments():
    api_admin()
    return jsonify({"enrollment_tokens": [_enrollment_json(e) for e in
                                          accounts.list_enrollments(get_conn())]})


@bp.route("/enrollment-tokens", methods=["POST"])
def create_enrollment():
    admin = api_admin()
    body = json_object()
    label, expires = body.get("label", "workers"), body.get("expires_in_s")
    # Bounded: a NaN, an infinity or 1e300 seconds was stored, and then every
    # listing of the tokens failed on the date it cannot print (a 500).
    if not isinstance(label, str) or (expires is not None and (
            not is_number(expires) or not 0 < expires <= accounts.MAX_ENROLLMENT_S)):
        raise ValidationError(f"label must be a string and expires_in_s a number of seconds "
                              f"between 0 and {accounts.MAX_ENROLLMENT_S}", code="invalid_enrollment")
    record, token = accounts.create_enrollment(get_conn(), label, admin["name"], expires)
    return jsonify(dict(_enrollment_json(record), token=token)), 201


@bp.route("/enrollment-tokens/<enrollment_id>", methods=["DELETE"])
def revoke_enrollment(enrollment_id):
    api_admin()
    accounts.revoke_enrollment(get_conn(), enrollment_id)
    return jsonify({"revoked": enrollment_id})


@bp.route("/workers", methods=["GET"])
def list_workers():
    api_admin()
    include_gone = request.args.get("all") in ("1", "true")
    return jsonify({"workers": [workers.worker_json(w)
                                for w in workers.list_workers(get_conn(), include_gone)]})


@bp.route("/workers/<worker_id>/<action>", methods=["POST"])
def worker_action(worker_id, action):
    api_admin()
    # retire: the worker ends (worker_retired) and its name is free for another
    # enrollment; revoke: the same, and the worker is not restarted (revoked).
    target = {"drain": WorkerState.DRAINING, "resume": WorkerState.ACTIVE,
              "retire": WorkerState.GONE, "revoke": WorkerState.REVOKED}.get(action)
    if target is None:
        raise ValidationError("action must be drain, resume, retire or revoke", code="invalid_action")
    worker = workers.set_worker_state(get_conn(), worker_id, target,
                                      lease_timeout_s=app_state().config.lease_timeout_s,
                                      max_attempts=app_state().config.max_attempts)
    return jsonify(workers.worker_json(worker))


def _enrollment_json(e: dict) -> dict:
    return {"id": e["id"], "label": e["label"], "created_by": e.get("created_by"),
            "created_at": iso(e["created_at"]), "expires_at": iso(e.get("expires_at")),
            "revoked_at": iso(e.get("revoked_at"))}


# ------------------------------------------------------------ the VM scaler (issue #4)
# The libvirt scaler (vm_provisioning) reads the queue here and reports its VMs
# and decisions back; proxy/vms.py owns both.

@bp.route("/queue", methods=["GET"])
def queue():
    api_admin()
    return jsonify(vms.queue_view(get_conn(), shape=vms.parse_shape(request.args)))


@bp.route("/scaler/report", methods=["PUT"])
def scaler_report():
    api_admin()
    return jsonify(vms.record_report(get_conn(), json_object()))


@bp.route("/vms", methods=["GET"])
def list_vms():
    api_admin()
    conn = get_conn()
    return jsonify({"vms": [vms.vm_json(v) for v in vms.list_vms(conn)],
                    "events": [vms.event_json(e) for e in vms.recent_events(conn, 50)]})


# ------------------------------------------------------------ prices (issue #5, usage.py)
# One row in the database, so every gunicorn process and proxy instance bills
# with the same prices; a job's cost is fixed with the prices in force when it ends.

@bp.route("/prices", methods=["GET"])
def get_prices():
    api_admin()
    return jsonify(usage.prices_json(usage.get_prices(get_conn())))


@bp.route("/prices", methods=["PUT"])
def set_prices():
    admin = api_admin()
    return jsonify(usage.prices_json(usage.set_prices(get_conn(), json_object(), admin["name"])))


# ------------------------------------------------------------ webhooks (issue #13)
# A job's owner reads only that a delivery failed; why (refused, timeout, TLS,
# an HTTP status) would map an allowed host's ports for them, so it is here.

@bp.route("/webhook-deliveries", methods=["GET"])
def list_webhook_deliveries():
    api_admin()
    job, state = request.args.get("job"), request.args.get("state")
    if job is not None and not is_lookup_key(job):
        raise ValidationError("job must be a job id", code="invalid_job")
    if state is not None and state not in {s.value for s in webhooks.DeliveryState}:
        raise ValidationError("state must be pending, delivered or failed", code="invalid_state")
    return jsonify({"deliveries": webhooks.list_deliveries(get_conn(), job_id=job, state=state)})
