"""The worker protocol (/api/v1/workers, /api/v1/worker): the only contract
between proxy and worker. Workers only ever call the proxy.

register (enrollment token) -> secret; then with the secret:
heartbeat, claim (long-poll), download inputs of held jobs, append log chunks,
post the result, deregister.

Every answer that can carry orders carries them whole: heartbeat, claim and
a result that claims its successor each say which held jobs to cancel and
whether to drain (workers.Orders), so a worker learns of them on whichever
call comes first. The worker reads each answer into one typed object
(worker/protocol.py); tests/test_worker_protocol.py holds the two to the same
fields. This module reads and checks what workers send (the wire format);
what it means is in workers.py, scheduler.py and leases.py.
"""
from __future__ import annotations

import json
import time
import zipfile

from flask import Blueprint, current_app, g, jsonify, request

from . import accounts, arrays, dependencies, jobenv, leases, retention, retries, wakeups, workers
from .appstate import app_state
from .auth import bearer_token
from .blobs import human_size, is_blob_name
from .db import close_conn, get_conn
from .downloads import send_blob
from .errors import NotFound, TooLarge, Unauthorized, ValidationError
from .jsonbody import integer, json_object, number
from .models import FINAL_VALUES, LEFT_OUT_REASONS, JobState, WorkerState
from .s3blobs import output_name
from .uploads import FormSpec, parse_form

bp = Blueprint("worker_api", __name__, url_prefix="/api/v1")

# A claim waiting for a retry's back-off to end wakes this much after it, so
# the job is due by the time the claim dispatches.
RETRY_DUE_SLACK_S = 0.05
# Jobs one claim (or one result's claim_next) may take.
MAX_CLAIM = 64
# Largest usage figure a result may report: 2**53 is exact as a JSON number
# and as a 64-bit INTEGER, and far above any real byte count or second count.
MAX_USAGE = 2**53


def _lease_args() -> dict:
    cfg = app_state().config
    return {"lease_timeout_s": cfg.lease_timeout_s, "max_attempts": cfg.max_attempts}


def current_worker() -> dict:
    secret = bearer_token()
    conn = get_conn()
    worker = workers.worker_for_secret(conn, secret)
    if worker is None:
        # A worker that was only silent too long (a network cut, a frozen VM)
        # is told so, and rejoins; a retired or revoked one is told so, and ends.
        raise workers.refusal(workers.any_worker_for_secret(conn, secret))
    g.worker = worker
    return worker


# ------------------------------------------------------------------------ routes

@bp.route("/workers/register", methods=["POST"])
def register():
    """Register with an enrollment token, or rejoin with the worker's own secret
    (a worker marked lost, or one that restarted): workers.rejoining."""
    conn = get_conn()
    token = bearer_token()
    proven = None
    if token.startswith(accounts.WORKER_SECRET_PREFIX):
        body = json_object()
        proven, enrollment = workers.rejoining(conn, token, body.get("name"))
    else:
        enrollment = accounts.enrollment_for_token(conn, token, time.time())
        if enrollment is None:
            raise Unauthorized("the enrollment token is not valid (unknown, expired or revoked)",
                               code="invalid_enrollment_token")
        body = json_object()
    cap = parse_capacity(body)
    worker, secret = workers.register_worker(conn, enrollment, body.get("name"), cap,
                                             proven=proven, **_lease_args())
    cfg = app_state().config
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
    return jsonify(workers.heartbeat(get_conn(), worker, running, **_lease_args()).json())


@bp.route("/worker/claim", methods=["POST"])
def claim():
    worker = current_worker()
    body = json_object()
    max_jobs = integer(body, "max_jobs", lo=0, hi=MAX_CLAIM, default=1, required=False,
                       code="invalid_max_jobs")
    wait_max = app_state().config.claim_wait_max_s
    wait_s = number(body, "wait_s", lo=0, hi=wait_max, default=0, required=False,
                    code="invalid_wait", message=f"wait_s must be between 0 and {wait_max:g}")
    return jsonify(_claim_waiting(worker, max_jobs, wait_s))


def _claim_waiting(worker: dict, max_jobs: int, wait_s: float) -> dict:
    """Claim; when nothing came, wait up to `wait_s` for a wake-up, claim once
    more and answer.

    The wait holds no database connection and reads nothing: the worker's
    topic (wakeups.py) fires when a job is reserved for it, one of its jobs
    is cancelled, or it is drained, resumed or retired. Any of those ends the
    wait, and the answer carries the jobs and the orders; the worker's next
    claim waits for the next wake-up, so a cancel already told does not turn
    the long-poll into a busy loop. It subscribes before the first claim, so
    nothing committed in between is missed. A process beginning its graceful
    shutdown (proxy.begin_shutdown) answers at once: a long-poll must not keep
    a gunicorn process being restarted waiting out the deadline.
    """
    st = app_state()
    close_conn()   # the request's connection: idle long-polls hold none
    # The retries topic, and a wait cut short where a back-off ends: a job
    # whose retry back-off ends meanwhile is dispatched by this claim
    # (retries.py), not by the next one after a full wait.
    with st.wakeups.subscribe(wakeups.worker_topic(worker["id"]), retries.RETRY_TOPIC) as wake:
        with st.db.connection() as conn:
            jobs = workers.claim(conn, worker, max_jobs, **_lease_args())
            if jobs or max_jobs == 0 or wait_s <= 0:
                return _claim_answer(conn, worker, jobs)
            due_in = retries.seconds_to_next(conn, time.time())
        wait = wait_s if due_in is None else min(wait_s, due_in + RETRY_DUE_SLACK_S)
        woken = not st.stopping.is_set() and (wake.wait(wait) or wait < wait_s)
    with st.db.connection() as conn:
        # Not woken: nothing was reserved for this worker since its claim (it
        # subscribed first), so the answer needs no second claim.
        if not woken or st.stopping.is_set() or not workers.is_active(conn, worker["id"]):
            jobs = []
        else:
            jobs = workers.claim(conn, worker, max_jobs, **_lease_args())
        return _claim_answer(conn, worker, jobs)


def _claim_answer(conn, worker: dict, jobs: list[dict]) -> dict:
    """A claim's answer: the jobs now held, and the worker's orders."""
    # `after`: the parents whose outputs the job reads (dependencies.py).
    blobs = app_state().blobs
    presign = blobs.presign_get if blobs.direct else None
    return {"jobs": [dict(_claimed_json(j), after=dependencies.claimed_parents(conn, j, presign))
                     for j in jobs], **workers.orders(conn, worker["id"]).json()}


def _claimed_json(job: dict) -> dict:
    base = f"/api/v1/worker/jobs/{job['id']}"
    blobs = app_state().blobs

    def blob(kind: str, url: str) -> dict:
        # With the S3 store, a presigned URL the worker GETs from the store
        # itself (s3blobs.py); `url` stays the way to ask for a fresh one.
        entry = {"sha256": job[f"{kind}_sha256"], "size": job[f"{kind}_size"], "url": url}
        if blobs.direct:
            entry["direct_url"] = blobs.presign_get(job[f"{kind}_blob"])
        return entry

    return {
        "id": job["id"], "attempt": job["attempt"], "name": job["name"], "image": job["image"],
        # Its try under its retry policy (JOBCLOUD_TRY): a lost worker's rerun keeps it.
        "try": (job.get("retries_used") or 0) + 1,
        "cpus": job["cpus"], "memory_mb": job["memory_mb"], "timeout_s": job["timeout_s"],
        "gpus": job["gpus"], "disk_mb": job.get("disk_mb"),
        "script": blob("script", f"{base}/script"),
        "dataset": blob("dataset", f"{base}/dataset") if job["dataset_blob"] else None,
        # Its array id, index and parameters row (arrays.py), for its env and params.json.
        "array": arrays.claim_json(job),
        # Its normalised requirements.txt, and the index to download its wheels from.
        "requirements": (blob("requirements", f"{base}/requirements")
                         if job.get("requirements_blob") else None),
        "package_index_url": app_state().config.package_index_url,
        # Its own environment variables (jobenv.py), under the worker's own.
        "env": jobenv.variables(job),
        # How its output archive goes up: "direct" (a presigned PUT to the S3
        # store, outputs-upload) or "proxy" (in the result's multipart body).
        "outputs_upload": "direct" if blobs.direct else "proxy",
    }


@bp.route("/worker/jobs/<job_id>/script", methods=["GET"])
def download_script(job_id):
    job = leases.held_job(get_conn(), current_worker(), job_id)
    return send_blob(app_state().blobs, job["script_blob"], "main.py", "text/x-python")


@bp.route("/worker/jobs/<job_id>/dataset", methods=["GET"])
def download_dataset(job_id):
    job = leases.held_job(get_conn(), current_worker(), job_id)
    if not job["dataset_blob"]:
        raise NotFound("this job has no dataset", code="no_dataset")
    return send_blob(app_state().blobs, job["dataset_blob"], "dataset.zip", "application/zip")


@bp.route("/worker/jobs/<job_id>/requirements", methods=["GET"])
def download_requirements(job_id):
    job = leases.held_job(get_conn(), current_worker(), job_id)
    if not job.get("requirements_blob"):
        raise NotFound("this job has no requirements", code="no_requirements")
    return send_blob(app_state().blobs, job["requirements_blob"], "requirements.txt", "text/plain")


@bp.route("/worker/jobs/<job_id>/after/<parent_id>/outputs", methods=["GET"])
def download_parent_outputs(job_id, parent_id):
    """A parent's output archive, for the worker holding the child's lease only."""
    conn = get_conn()
    job = leases.held_job(conn, current_worker(), job_id)
    parent = dependencies.parent_outputs(conn, job, parent_id)
    return send_blob(app_state().blobs, parent["output_blob"], "outputs.zip", "application/zip")


@bp.route("/worker/jobs/<job_id>/outputs-upload", methods=["POST"])
def outputs_upload(job_id):
    """A presigned PUT for a held try's output archive (S3 store only): the
    store refuses any other bytes, and post_result checks what arrived."""
    worker = current_worker()
    st = app_state()
    body = json_object()
    attempt = integer(body, "attempt", lo=1, hi=2**31 - 1, code="invalid_attempt",
                      message="attempt must be a positive integer")
    sha256, size = _announced_archive(body)
    _require_direct_store(st.blobs)
    if size > st.config.max_output_bytes:
        raise TooLarge("the output archive is larger than the limit of "
                       f"{human_size(st.config.max_output_bytes)}", code="too_large")
    leases.check_lease(get_conn(), worker, job_id, attempt)
    return jsonify(st.blobs.presign_put(_output_name(job_id, attempt, sha256), sha256, size))


def _announced_archive(body: dict) -> tuple[str, int]:
    """(sha256, size) of an output archive a worker names (outputs-upload, result)."""
    sha256 = body.get("sha256")
    if not isinstance(sha256, str) or not is_blob_name(sha256):
        raise ValidationError("sha256 must be 64 lower-case hex digits", code="invalid_outputs")
    size = integer(body, "size", lo=1, hi=MAX_USAGE, code="invalid_outputs",
                   message=f"size must be a whole number between 1 and {MAX_USAGE}")
    return sha256, size


def _require_direct_store(blobs) -> None:
    """Raises ValidationError: the proxy keeps files itself (no presigned uploads)."""
    if not blobs.direct:
        raise ValidationError("this proxy keeps files in its own directory: post the output"
                              " archive with the result", code="direct_upload_unavailable")


def _output_name(job_id: str, attempt: int, sha256: str) -> str:
    return output_name(str(current_app.secret_key).encode(), job_id, attempt, sha256)


@bp.route("/worker/jobs/<job_id>/logs", methods=["POST"])
def append_log(job_id):
    worker = current_worker()
    body = json_object()
    attempt = integer(body, "attempt", lo=1, hi=2**31 - 1, code="invalid_attempt",
                      message="attempt must be a positive integer")
    offset = integer(body, "offset", lo=0, hi=MAX_USAGE, code="invalid_offset",
                     message="offset must be a non-negative integer")
    data = body.get("data")
    if not isinstance(data, str):
        raise ValidationError("data must be a string", code="invalid_data")
    return jsonify(leases.append_log(
        get_conn(), worker, job_id, attempt, body.get("stream"), offset, data,
        log_max_bytes=app_state().config.log_max_bytes))


@bp.route("/worker/jobs/<job_id>/result", methods=["POST"])
def post_result(job_id):
    """The final result: JSON (with `outputs_upload` naming an archive PUT to the
    S3 store, or none), or multipart with a `result` JSON field and an `outputs` zip."""
    worker = current_worker()
    st = app_state()
    cfg = st.config
    direct = None
    if request.mimetype == "application/json":
        result, upload, form = json_object(), None, None
        if result.get("outputs_upload") is not None:
            if not isinstance(result["outputs_upload"], dict):
                raise ValidationError("outputs_upload must be an object", code="invalid_outputs")
            _require_direct_store(st.blobs)
            direct = _announced_archive(result["outputs_upload"])
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
        parsed = parse_result(result, cfg.log_tail_bytes)
        claim_next = integer(result, "claim_next", lo=0, hi=MAX_CLAIM, default=0, required=False,
                             code="invalid_result")
        conn = get_conn()
        # Refuse a stale lease before keeping any of its files.
        if leases.lease_ran_out(leases.check_lease(conn, worker, job_id, parsed.attempt), time.time()):
            # Nobody reaped it yet (no claim or heartbeat since a partition ended):
            # requeue it now, so this result is refused as stale and the job runs
            # again, instead of racing the rerun the requeue would start.
            workers.reap_now(conn, **_lease_args())
            leases.check_lease(conn, worker, job_id, parsed.attempt)
        if upload is not None and not zipfile.is_zipfile(upload.path):
            raise ValidationError("outputs must be a zip archive", code="invalid_outputs")
        uploaded = None
        if direct is not None:
            # Checked before the result is taken: size, hash, a zip's tail.
            uploaded = st.blobs.check_upload(_output_name(job_id, parsed.attempt, direct[0]),
                                             *direct)
        elif upload is not None:
            st.blobs.prepare(upload)   # outside the lock: the S3 store's upload
        with conn.transaction():
            # The archive is put in place under the blob lock, in the
            # transaction that refers to it: the retention sweep cannot unlink
            # an identical archive an expired job left between the two.
            retention.hold_blobs(conn)
            output = st.blobs.commit(upload) if upload is not None else uploaded
            job, applied = leases.record_result(conn, worker, job_id, parsed, output)
            if output is not None and job["output_blob"] != output.name:
                # A retried try (retries.retry): its job refers to no outputs
                # yet, so nothing would ever delete or count them.
                retention.release_if_unreferenced(conn, output.name, time.time())
        if upload is not None:
            upload.kept = True
    finally:
        if form is not None:
            form.discard()
    answer = {"job_id": job["id"], "state": job["state"], "applied": applied}
    if claim_next:
        # Result and next claim in one round trip: the freed slot is filled at
        # once, and a busy worker makes half the requests (bench/claim).
        jobs = workers.claim(conn, worker, claim_next, **_lease_args())
        answer.update(_claim_answer(conn, worker, jobs))
    return jsonify(answer)


@bp.route("/worker/deregister", methods=["POST"])
def deregister():
    worker = current_worker()
    workers.set_worker_state(get_conn(), worker["id"], WorkerState.GONE, **_lease_args())
    return jsonify({"worker_id": worker["id"], "state": WorkerState.GONE.value})


# ------------------------------------------------------------------- wire format

def parse_capacity(data: dict) -> workers.Capacity:
    """Validate a worker's reported capacity.

    Raises:
        ValidationError: a field is missing, of the wrong type or out of range.
    """
    def num(key, lo, hi, integral=False, required=True):
        return number(data, key, lo=lo, hi=hi, integer=integral, required=required,
                      code="invalid_capacity")

    images = data.get("images")
    if not isinstance(images, list) or not all(isinstance(i, str) and 0 < len(i) <= 200 for i in images):
        raise ValidationError("images must be a list of image names", code="invalid_capacity")
    if len(images) > 100:
        raise ValidationError("at most 100 images", code="invalid_capacity")
    return workers.Capacity(
        cpus=num("cpus", 0.01, 4096), memory_mb=num("memory_mb", 16, 64 * 1024 * 1024, True),
        gpus=num("gpus", 0, 1024, True), slots=num("slots", 1, 1024, True),
        images=tuple(images), disk_mb=num("disk_mb", 0, 2**53, True, required=False))


def parse_result(data: dict, tail_bytes: int) -> leases.Result:
    """Validate a worker's result document.

    Args:
        tail_bytes: how much of each of stdout and stderr is kept (the end).

    Raises:
        ValidationError: a field is missing or invalid.
    """
    if not isinstance(data, dict):
        raise ValidationError("the result must be a JSON object", code="invalid_result")
    state = data.get("state")
    if state not in FINAL_VALUES:
        raise ValidationError(f"state must be one of {sorted(FINAL_VALUES)}", code="invalid_result")
    reason = data.get("failure_reason")
    if reason is not None and not isinstance(reason, str):
        raise ValidationError("failure_reason must be a string or null", code="invalid_result")

    def usage(key, kind=float):
        # Bounded and finite: Python's JSON reads Infinity and NaN, which the
        # job's JSON would then carry (invalid JSON), and a larger integer
        # overflows the database's 64-bit INTEGER (a 500).
        value = number(data, key, lo=0, hi=MAX_USAGE, required=False, code="invalid_result",
                       message=f"{key} must be a number between 0 and {MAX_USAGE}")
        return None if value is None else kind(value)

    def text(key):
        v = data.get(key) or ""
        if not isinstance(v, str):
            raise ValidationError(f"{key} must be a string", code="invalid_result")
        raw = leases.storable_text(v).encode("utf-8")
        return raw[-tail_bytes:].decode("utf-8", "ignore"), len(raw) > tail_bytes

    stdout, out_cut = text("stdout")
    stderr, err_cut = text("stderr")
    return leases.Result(
        attempt=integer(data, "attempt", lo=1, hi=2**31 - 1, code="invalid_result",
                        message="attempt must be a positive integer"),
        state=JobState(state),
        exit_code=integer(data, "exit_code", lo=-2**31, hi=2**31 - 1, required=False,
                          code="invalid_result",
                          message="exit_code must be a 32-bit integer or null"),
        failure_reason=(reason or None) and leases.storable_text(reason[:1000]),
        stdout=stdout, stderr=stderr,
        stdout_truncated=bool(data.get("stdout_truncated")) or out_cut,
        stderr_truncated=bool(data.get("stderr_truncated")) or err_cut,
        cpu_seconds=usage("cpu_seconds"),
        peak_memory_bytes=usage("peak_memory_bytes", int),
        wall_seconds=usage("wall_seconds"),
        gpu_seconds=usage("gpu_seconds"),
        disk_full=_flag(data, "disk_full"),
        outputs_report=parse_outputs_report(data.get("outputs")),
        env_build_s=usage("env_build_s"),
        env_cached=_flag(data, "env_cached") if data.get("env_cached") is not None else None,
    )


def parse_outputs_report(report) -> dict | None:
    """Validate the result's `outputs` part: what the archive holds and what
    was left out of it, by reason.

    Raises:
        ValidationError: not an object of bounded counts, or an unknown reason.
    """
    if report is None:
        return None
    if not isinstance(report, dict):
        raise ValidationError("outputs must be an object", code="invalid_result")

    def count(source: dict, key: str) -> int:
        return integer(source, key, lo=0, hi=MAX_USAGE, default=0, required=False,
                       code="invalid_result",
                       message=f"outputs.{key} must be a whole number between 0 and {MAX_USAGE}")

    reasons = report.get("reasons") or {}
    if not isinstance(reasons, dict) or not set(reasons) <= set(LEFT_OUT_REASONS):
        raise ValidationError(f"outputs.reasons must map reasons ({', '.join(LEFT_OUT_REASONS)})"
                              " to counts", code="invalid_result")
    by_reason = {name: count(reasons, name) for name in LEFT_OUT_REASONS if reasons.get(name)}
    return {"files": count(report, "files"), "bytes": count(report, "bytes"),
            "left_out": sum(by_reason.values()),
            "left_out_bytes": count(report, "left_out_bytes"), "reasons": by_reason}


def _flag(data: dict, key: str) -> bool:
    value = data.get(key, False)
    if not isinstance(value, bool):
        raise ValidationError(f"{key} must be true or false", code="invalid_result")
    return value
