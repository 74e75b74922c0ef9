"""The worker protocol (/api/v1/workers, /api/v1/worker): the only contract
between proxy and worker. Workers only ever call the proxy.

register (enrollment token) -> secret; then with the secret:
heartbeat, claim (long-poll), download inputs of held jobs, append log chunks,
post the result, deregister.
"""
from __future__ import annotations

import json
import time
import zipfile

from flask import Blueprint, current_app, g, jsonify, request

from . import accounts, dispatch
from .auth import bearer_token
from .db import get_conn
from .downloads import send_blob
from .jsonbody import json_object
from .errors import NotFound, Unauthorized, ValidationError
from .models import JobState, WorkerState
from .uploads import FormSpec, parse_form

bp = Blueprint("worker_api", __name__, url_prefix="/api/v1")

# Between two looks at the queue while a claim long-polls: a new job waits half
# of this on average before a waiting worker sees it (bench/worker.py: trivial).
# Each look is one indexed read, no lock.
CLAIM_POLL_S = 0.05


def state():
    return current_app.extensions["jobcloud"]


def _lease_args() -> dict:
    cfg = state().config
    return {"lease_timeout_s": cfg.lease_timeout_s, "max_attempts": cfg.max_attempts}


def current_worker() -> dict:
    secret = bearer_token()
    conn = get_conn()
    worker = dispatch.worker_for_secret(conn, secret)
    if worker is None:
        # A worker that was only silent too long (a network cut, a frozen VM)
        # is told so, and registers again; a revoked or unknown one is not.
        if dispatch.is_lost_worker_secret(conn, secret):
            raise Unauthorized("this worker was marked lost (silent past its lease) and its jobs "
                               "were requeued; register again", code="worker_lost")
        raise Unauthorized("the worker secret is not valid (unknown, retired or not a worker secret)",
                           code="invalid_worker_secret")
    g.worker = worker
    return worker


@bp.route("/workers/register", methods=["POST"])
def register():
    conn = get_conn()
    enrollment = accounts.enrollment_for_token(conn, bearer_token(), time.time())
    if enrollment is None:
        raise Unauthorized("the enrollment token is not valid (unknown, expired or revoked)",
                           code="invalid_enrollment_token")
    body = json_object()
    cap = dispatch.parse_capacity(body)
    worker, secret = dispatch.register_worker(conn, enrollment, body.get("name"), cap,
                                              **_lease_args())
    cfg = state().config
    return jsonify({"worker_id": worker["id"], "secret": secret,
                    "heartbeat_interval_s": cfg.heartbeat_interval_s,
                    "lease_timeout_s": cfg.lease_timeout_s}), 201


@bp.route("/worker/heartbeat", methods=["POST"])
def heartbeat():
    worker = current_worker()
    body = json_object()
    running = body.get("running", [])
    if not isinstance(running, list) or not all(isinstance(i, str) for i in running) or len(running) > 10_000:
        raise ValidationError("running must be a list of job ids", code="invalid_running")
    return jsonify(dispatch.heartbeat(get_conn(), worker, running, **_lease_args()))


@bp.route("/worker/claim", methods=["POST"])
def claim():
    worker = current_worker()
    body = json_object()
    max_jobs = body.get("max_jobs", 1)
    wait_s = body.get("wait_s", 0)
    if not isinstance(max_jobs, int) or isinstance(max_jobs, bool) or not 0 <= max_jobs <= 64:
        raise ValidationError("max_jobs must be an integer between 0 and 64", code="invalid_max_jobs")
    cfg = state().config
    if isinstance(wait_s, bool) or not isinstance(wait_s, (int, float)) or \
            not 0 <= wait_s <= cfg.claim_wait_max_s:
        raise ValidationError(f"wait_s must be between 0 and {cfg.claim_wait_max_s:g}",
                              code="invalid_wait")
    conn = get_conn()
    deadline = time.monotonic() + wait_s
    while True:
        jobs = dispatch.claim(conn, worker, max_jobs, **_lease_args())
        if jobs or max_jobs == 0 or time.monotonic() >= deadline:
            break
        if not _wait_for_work(conn, worker, deadline):
            break
    drain = dispatch.get_worker(conn, worker["id"])["state"] == WorkerState.DRAINING.value
    # Cancellations ride on the claim answer too, so a worker learns of them on
    # whichever call comes first.
    cancel = [r["id"] for r in conn.query(
        "SELECT id FROM jobs WHERE worker_id = ? AND state = ? AND cancel_requested = 1",
        (worker["id"], JobState.RUNNING.value))]
    return jsonify({"jobs": [_claimed_json(j) for j in jobs], "drain": drain, "cancel": cancel})


def _wait_for_work(conn, worker: dict, deadline: float) -> bool:
    """Sleep until a job this worker could run is queued (True) or the deadline
    passes (True: the caller claims once more and answers).

    Returns False as soon as the worker leaves the active state (deregistered,
    drained, revoked, marked lost) or this process begins its graceful shutdown
    (proxy.begin_shutdown): a long-poll must not keep a stopping worker, or a
    gunicorn process being restarted, waiting out the deadline.
    The look is a cheap read, so idle long-polls do not take the write lock; it
    counts only jobs this worker could run, so a queued job nobody here can take
    (say a GPU job) does not turn the long-poll into a busy loop.
    """
    images = json.loads(worker["images"]) or [""]
    marks = ", ".join("?" for _ in images)
    sql = ("SELECT w.state AS state, EXISTS (SELECT 1 FROM jobs WHERE state = ? AND"
           " (worker_id = w.id OR (worker_id IS NULL AND gpus <= w.gpus AND cpus <= w.cpus"
           f" AND memory_mb <= w.memory_mb AND image IN ({marks})))) AS work"
           " FROM workers w WHERE w.id = ?")
    params = (JobState.QUEUED.value, *images, worker["id"])
    stopping = state().stopping
    while time.monotonic() < deadline:
        if stopping.wait(min(CLAIM_POLL_S, max(0.0, deadline - time.monotonic()))):
            return False
        row = conn.query_one(sql, params)
        if row is None or row["state"] != WorkerState.ACTIVE.value:
            return False
        if row["work"]:
            return True
    return True


def _claimed_json(job: dict) -> dict:
    base = f"/api/v1/worker/jobs/{job['id']}"
    return {
        "id": job["id"], "attempt": job["attempt"], "name": job["name"], "image": job["image"],
        "cpus": job["cpus"], "memory_mb": job["memory_mb"], "timeout_s": job["timeout_s"],
        "gpus": job["gpus"],
        "script": {"sha256": job["script_sha256"], "size": job["script_size"],
                   "url": f"{base}/script"},
        "dataset": ({"sha256": job["dataset_sha256"], "size": job["dataset_size"],
                     "url": f"{base}/dataset"} if job["dataset_blob"] else None),
    }


@bp.route("/worker/jobs/<job_id>/script", methods=["GET"])
def download_script(job_id):
    job = dispatch.held_job(get_conn(), current_worker(), job_id)
    return send_blob(state().blobs, job["script_blob"], "main.py", "text/x-python")


@bp.route("/worker/jobs/<job_id>/dataset", methods=["GET"])
def download_dataset(job_id):
    job = dispatch.held_job(get_conn(), current_worker(), job_id)
    if not job["dataset_blob"]:
        raise NotFound("this job has no dataset", code="no_dataset")
    return send_blob(state().blobs, job["dataset_blob"], "dataset.zip", "application/zip")


@bp.route("/worker/jobs/<job_id>/logs", methods=["POST"])
def append_log(job_id):
    worker = current_worker()
    body = json_object()
    attempt = body.get("attempt")
    if not isinstance(attempt, int) or isinstance(attempt, bool):
        raise ValidationError("attempt must be an integer", code="invalid_attempt")
    return jsonify(dispatch.append_log(
        get_conn(), worker, job_id, attempt, body.get("stream"), body.get("offset"),
        body.get("data"), log_max_bytes=state().config.log_max_bytes))


@bp.route("/worker/jobs/<job_id>/result", methods=["POST"])
def post_result(job_id):
    """The final result: JSON, or multipart with a `result` JSON field and an `outputs` zip."""
    worker = current_worker()
    st = state()
    cfg = st.config
    mimetype = request.mimetype
    if mimetype == "application/json":
        result, upload, form = json_object(), None, None
    else:
        form = parse_form(request.stream, request.headers.get("Content-Type"), FormSpec(
            files={"outputs": (cfg.max_output_bytes, "the output archive")},
            texts={"result": 8 * cfg.log_tail_bytes + 65536}, max_parts=4), st.blobs)
        upload = form.files.get("outputs")
        try:
            result = json.loads(form.fields.get("result", ""))
        except ValueError:
            form.discard()
            raise ValidationError("the result field must be a JSON object", code="invalid_json") from None
    try:
        parsed = dispatch.parse_result(result, cfg.log_tail_bytes)
        claim_next = _claim_next(result)
        conn = get_conn()
        # Refuse a stale lease before keeping any of its files.
        dispatch.check_lease(conn, worker, job_id, parsed.attempt)
        output = None
        if upload is not None:
            if not zipfile.is_zipfile(upload.path):
                raise ValidationError("outputs must be a zip archive", code="invalid_outputs")
            blob = st.blobs.commit(upload)
            output = (blob, blob, upload.size)
        job, applied = dispatch.record_result(conn, worker, job_id, parsed, output)
    finally:
        if form is not None:
            form.discard()
    answer = {"job_id": job["id"], "state": job["state"], "applied": applied}
    if claim_next:
        # Result and next claim in one round trip: the freed slot is filled at
        # once, and a busy worker makes half the requests (bench/claim).
        answer["jobs"] = [_claimed_json(j) for j in
                          dispatch.claim(conn, worker, claim_next, **_lease_args())]
    return jsonify(answer)


def _claim_next(result: dict) -> int:
    value = result.get("claim_next", 0)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 64:
        raise ValidationError("claim_next must be an integer between 0 and 64", code="invalid_result")
    return value


@bp.route("/worker/deregister", methods=["POST"])
def deregister():
    worker = current_worker()
    dispatch.set_worker_state(get_conn(), worker["id"], WorkerState.GONE,
                              max_attempts=state().config.max_attempts)
    return jsonify({"worker_id": worker["id"], "state": WorkerState.GONE.value})
