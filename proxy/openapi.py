"""The OpenAPI 3 document of the user, admin and worker APIs: the contract
between the proxy and its clients. tests/test_openapi.py checks that every
route the app serves is described here and nothing else is.
"""
from __future__ import annotations

from flask import Blueprint, jsonify

bp = Blueprint("openapi", __name__)

ERROR = {"$ref": "#/components/schemas/Error"}
USER = [{"userToken": []}, {"session": []}]
WORKER = [{"workerSecret": []}]
ENROLL = [{"enrollmentToken": []}]
USER_NAME = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
JOB_ID = {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string", "maxLength": 64}}


def _json(schema, description="OK"):
    return {"description": description, "content": {"application/json": {"schema": schema}}}


ERROR_TEXT = {400: "Invalid request", 401: "Missing or invalid credentials", 403: "Not allowed",
              404: "Not found (or not yours)", 409: "Conflict with the current state",
              413: "Upload too large", 415: "Wrong content type",
              429: "Over a per-user count or rate limit", 503: "Store unavailable"}


def _errors(*codes):
    return {str(c): _json(ERROR, ERROR_TEXT[c]) for c in codes}


def _page_errors(*codes):
    # A page answers its errors as HTML, or as JSON to Accept: application/json.
    return {str(c): {"description": ERROR_TEXT[c], "content": {
        "text/html": {}, "application/json": {"schema": ERROR}}} for c in codes}


def _op(summary, security, responses, *, params=(), body=None, tag="jobs"):
    op = {"summary": summary, "tags": [tag], "security": security, "responses": responses}
    if params:
        op["parameters"] = list(params)
    if body:
        op["requestBody"] = body
    return op


def _json_body(schema, required=True):
    return {"required": required, "content": {"application/json": {"schema": schema}}}


SUBMIT_FORM = {
    "required": True,
    "content": {"multipart/form-data": {"schema": {
        "type": "object",
        "properties": {
            "script": {"type": "string", "format": "binary", "description": "a .py file"},
            "code": {"type": "string", "description": "pasted code, instead of script"},
            "dataset": {"type": "string", "format": "binary", "description": "optional .zip"},
            "name": {"type": "string", "maxLength": 100},
            "image": {"type": "string"},
            "cpus": {"type": "number"}, "memory_mb": {"type": "integer"},
            "timeout_s": {"type": "integer"}, "gpus": {"type": "integer"},
            "webhook_url": {"type": "string", "maxLength": 2048,
                            "description": "http(s) URL on an allow-listed host (webhook_allowed_hosts)"
                                           ": gets a signed POST when the job finishes"},
        }}}},
}

USAGE = {"type": ["number", "null"], "minimum": 0, "maximum": 2**53}

SCHEMAS = {
    "Error": {"type": "object", "required": ["error", "detail"],
              "properties": {"error": {"type": "string"}, "detail": {"type": "string"}}},
    "Job": {"type": "object", "required": ["id", "state", "name", "image", "attempt"],
            "properties": {
                "id": {"type": "string"}, "owner": {"type": "string"}, "name": {"type": "string"},
                "state": {"type": "string", "enum": ["queued", "running", "succeeded", "failed",
                                                     "cancelled", "timed_out"]},
                "image": {"type": "string"}, "resources": {"type": "object"},
                "script": {"type": "object"}, "dataset": {"type": ["object", "null"]},
                "attempt": {"type": "integer"}, "worker_id": {"type": ["string", "null"]},
                "cancel_requested": {"type": "boolean"},
                "submitted_at": {"type": "string"}, "started_at": {"type": ["string", "null"]},
                "finished_at": {"type": ["string", "null"]},
                "exit_code": {"type": ["integer", "null"]},
                "failure_reason": {"type": ["string", "null"]},
                "outputs": {"type": ["object", "null"]}, "usage": {"type": "object"},
                "cost": {"oneOf": [{"type": "null"}, {"$ref": "#/components/schemas/Cost"}]},
                "webhook": {"type": ["object", "null"], "description": "URL and delivery state"},
                "links": {"type": "object"}}},
    "JobList": {"type": "object", "required": ["jobs", "next"],
                "properties": {"jobs": {"type": "array", "items": {"$ref": "#/components/schemas/Job"}},
                               "next": {"type": ["string", "null"]},
                               "user": {"type": "string"}}},
    "Logs": {"type": "object", "required": ["stream", "offset", "next_offset", "data"],
             "properties": {"stream": {"type": "string"}, "offset": {"type": "integer"},
                            "next_offset": {"type": "integer"}, "data": {"type": "string"},
                            "truncated": {"type": "boolean"}, "source": {"type": "string"},
                            "job_id": {"type": "string"}, "attempt": {"type": "integer"},
                            "state": {"type": "string"}}},
    "Token": {"type": "object", "properties": {
        "id": {"type": "string"}, "label": {"type": "string"}, "token": {"type": "string"},
        "created_at": {"type": "string"}, "last_used_at": {"type": ["string", "null"]},
        "revoked_at": {"type": ["string", "null"]}}},
    "Capacity": {"type": "object", "required": ["name", "cpus", "memory_mb", "gpus", "slots", "images"],
                 "properties": {"name": {"type": "string"}, "cpus": {"type": "number"},
                                "memory_mb": {"type": "integer"}, "gpus": {"type": "integer"},
                                "slots": {"type": "integer"},
                                "disk_mb": {"type": ["integer", "null"],
                                            "description": "free disk of the worker's data dir"},
                                "images": {"type": "array", "items": {"type": "string"}}}},
    "ClaimedJob": {"type": "object", "properties": {
        "id": {"type": "string"}, "attempt": {"type": "integer"}, "image": {"type": "string"},
        "cpus": {"type": "number"}, "memory_mb": {"type": "integer"},
        "timeout_s": {"type": "integer"}, "gpus": {"type": "integer"},
        "script": {"type": "object"}, "dataset": {"type": ["object", "null"]}}},
    "Result": {"type": "object", "required": ["attempt", "state"], "properties": {
        "attempt": {"type": "integer"},
        "state": {"type": "string", "enum": ["succeeded", "failed", "cancelled", "timed_out"]},
        "exit_code": {"type": ["integer", "null"], "minimum": -2**31, "maximum": 2**31 - 1},
        "failure_reason": {"type": ["string", "null"]},
        "stdout": {"type": "string"}, "stderr": {"type": "string"},
        "stdout_truncated": {"type": "boolean"}, "stderr_truncated": {"type": "boolean"},
        "cpu_seconds": USAGE, "peak_memory_bytes": {**USAGE, "type": ["integer", "null"]},
        "wall_seconds": USAGE,
        "gpu_seconds": {**USAGE, "description": "stored as at most the job's gpus times the"
                        " seconds since its claim (so 0 for a CPU job)"},
        "claim_next": {"type": "integer", "minimum": 0, "maximum": 64,
                       "description": "also claim up to this many jobs; they come back in `jobs`"}}},
    "Limits": {"type": "object", "required": ["user", "weight"], "properties": {
        "user": {"type": "string"}, "weight": {"type": "number"},
        **{name: {"type": ["number", "null"]} for name in (
            "max_running", "max_queued", "max_submissions_per_minute", "max_cpus",
            "max_memory_mb", "max_gpus", "max_timeout_s")}}},
    "LimitChanges": {"type": "object", "additionalProperties": False, "properties": {
        "weight": {"type": ["number", "null"], "minimum": 0.01, "maximum": 1e9},
        "max_cpus": {"type": ["number", "null"], "minimum": 0.1, "maximum": 1e9},
        **{name: {"type": ["integer", "null"], "minimum": low, "maximum": 1e9} for name, low in (
            ("max_running", 0), ("max_queued", 0), ("max_submissions_per_minute", 0),
            ("max_memory_mb", 6), ("max_gpus", 0), ("max_timeout_s", 1))}}},
    "Worker": {"type": "object", "properties": {
        "id": {"type": "string"}, "name": {"type": "string"}, "state": {"type": "string"},
        "slots": {"type": "integer"}, "running": {"type": ["integer", "null"]}}},
    "QueueView": {"type": "object", "required": ["queued", "running", "workers"], "properties": {
        "queued": {"type": "integer"}, "running": {"type": "integer"},
        "runnable": {"type": "integer", "description": "queued jobs more workers could start now: "
                     "owners under max_running and, with a worker shape given, fitting it"},
        "workers": {"type": "array", "items": {"type": "object", "properties": {
            "id": {"type": "string"}, "name": {"type": "string"}, "state": {"type": "string"},
            "slots": {"type": "integer"}, "running": {"type": "integer"},
            "reserved": {"type": "integer"},
            "idle_s": {"type": ["number", "null"],
                       "description": "seconds since it last finished a job; null while it holds one"}}}}}},
    "ScalerReport": {"type": "object", "properties": {
        "vms": {"type": "array", "maxItems": 1000, "items": {
            "type": "object", "required": ["name", "host_uri", "state"], "properties": {
                "name": {"type": "string", "minLength": 1, "maxLength": 64},
                "host_uri": {"type": "string", "minLength": 1, "maxLength": 500},
                "state": {"type": "string", "enum": ["booting", "ready", "draining", "stopping"]},
                "worker_name": {"type": ["string", "null"], "maxLength": 64},
                "created_at": {"type": ["number", "null"], "minimum": 0}}}},
        "events": {"type": "array", "maxItems": 1000, "items": {
            "type": "object", "required": ["action", "reason"], "properties": {
                "action": {"type": "string", "pattern": "^[a-z_]{1,32}$"},
                "reason": {"type": "string", "minLength": 1, "maxLength": 1000},
                "vm_name": {"type": ["string", "null"], "maxLength": 64}}}}}},
}


# The browser pages are part of the served surface too: documented so the
# document lists every route, with the session cookie and a form CSRF token.
SESSION = [{"session": []}]
HTML = {"description": "HTML page", "content": {"text/html": {}}}
REDIRECT = {"description": "Redirect (to the login page when not logged in)"}
CSRF_FORM = {"403": {"description": "The form's csrf_token is missing or wrong",
                     "content": {"text/html": {}, "application/json": {"schema": ERROR}}}}


def _page(summary, *, form=None, params=(), ok="200", errors=()):
    responses = {ok: REDIRECT if ok == "302" else HTML, "302": REDIRECT, **_page_errors(*errors)}
    if form is not None:
        responses.update(CSRF_FORM)
    op = _op(summary, SESSION, responses, params=params, tag="pages")
    if form is not None:
        props = {"csrf_token": {"type": "string"}, **form}
        op["requestBody"] = {"required": True, "content": {
            "application/x-www-form-urlencoded": {"schema": {
                "type": "object", "required": ["csrf_token"], "properties": props}}}}
    return op


def _pages() -> dict:
    return {
        "/": {"get": _page("The job upload form")},
        "/login": {
            "get": {**_page("The login form"), "security": []},
            "post": {**_page("Log in; redirects to ?next= (a local path only); 401 and the form "
                             "again on a wrong name or password", ok="302", errors=[401],
                             form={"username": {"type": "string"},
                                   "password": {"type": "string"}}), "security": []},
        },
        "/logout": {"post": _page("Log out", ok="302", form={})},
        "/account/password": {
            "get": _page("The password form (forced after a one-time password)"),
            "post": _page("Change the password; 400 and the form again on a mistake", ok="302",
                          errors=[400], form={
                "current_password": {"type": "string"}, "new_password": {"type": "string"},
                "confirm_password": {"type": "string"}}),
        },
        "/account/tokens": {
            "get": _page("My API tokens"),
            "post": _page("Create (label) or revoke (revoke=<token id>) an API token",
                          errors=[404], form={"label": {"type": "string"}, "revoke": {"type": "string"}}),
        },
        "/jobs": {"post": {**_page("Submit a job from the upload form; the form again with the "
                                   "error's status when refused", ok="302", form={},
                                   errors=[400, 413, 415, 429]),
                           "requestBody": {"required": True, "content": {
                               "multipart/form-data": {"schema": {
                                   "type": "object", "required": ["csrf_token"], "properties": {
                                       "csrf_token": {"type": "string"},
                                       **SUBMIT_FORM["content"]["multipart/form-data"]
                                       ["schema"]["properties"]}}}}}}},
        "/jobs/{job_id}": {"get": _page("One job: state, facts, logs", params=[JOB_ID],
                                        errors=[404])},
        "/jobs/{job_id}/cancel": {"post": _page("Cancel a job", ok="302", form={},
                                                params=[JOB_ID], errors=[404])},
        "/jobs/{job_id}/outputs": {"get": {**_page("Download the output archive", params=[JOB_ID]),
                                           "responses": {"200": {"description": "zip attachment",
                                                                 "content": {"application/zip": {}}},
                                                         "302": REDIRECT, **_page_errors(404)}}},
    }


# Live updates (proxy/live.py) and the code editor page (issue #5).
EVENT_STREAM = {"description": (
    "Server-Sent Events. The stream ends by itself after live_stream_s (25 s): reconnect with the last "
    "event's id in Last-Event-ID (EventSource does) to resume without duplicates or gaps."),
    "content": {"text/event-stream": {"schema": {"type": "string"}}}}
RESUME = [{"name": "Last-Event-ID", "in": "header", "schema": {"type": "string"},
           "description": "the id of the last event received: the stream resumes after it"},
          {"name": "from", "in": "query", "schema": {"type": "string"},
           "description": "the same as Last-Event-ID, for a first connection"}]
JOB_EVENTS = ("A job's state and output as Server-Sent Events: `state` (the Job, when it changes, "
              "with truncated: {stdout, stderr}), `attempt` (requeued: output starts again), "
              "`log` ({stream, attempt, offset, text, truncated}), "
              "then `end` (the final Job). Event ids are ATTEMPT-STDOUT_BYTES-STDERR_BYTES; "
              "a malformed Last-Event-ID is a 400")
USER_EVENTS = ("A user's job changes as Server-Sent Events: `job` (the Job, with new: true when "
               "submitted since the last event) for each job that is new or changed; a "
               "(re)connection also sends the user's active jobs. Event ids are t<unix time>. "
               "Only the user and admins")
USER_PARAM = {"name": "user", "in": "path", "required": True, "schema": {"type": "string"}}


def _live_paths() -> dict:
    return {
        "/api/v1/jobs/{job_id}/events": {"get": _op(
            JOB_EVENTS, USER, {"200": EVENT_STREAM, **_errors(400, 401, 403, 404)},
            params=[JOB_ID, *RESUME])},
        "/api/v1/users/{user}/events": {"get": _op(
            USER_EVENTS, USER, {"200": EVENT_STREAM, **_errors(400, 401, 403, 404)},
            params=[USER_PARAM, *RESUME])},
        "/jobs/{job_id}/events": {"get": _op(
            "The job page's stream (the same as /api/v1/jobs/{job_id}/events)", USER,
            {"200": EVENT_STREAM, **_page_errors(400, 401, 403, 404)}, params=[JOB_ID, *RESUME],
            tag="pages")},
        "/job-status/{user}/events": {"get": _op(
            "The job list page's stream (the same as /api/v1/users/{user}/events)", USER,
            {"200": EVENT_STREAM, **_page_errors(400, 401, 403, 404)}, params=[USER_PARAM, *RESUME],
            tag="pages")},
        "/new": {"get": _page("The code editor: templates, CodeMirror, Run posts to /jobs")},
    }


# Usage, cost, prices, webhooks and the admin dashboard (issue #5).
MONEY = {"type": "string", "pattern": r"^\d+\.\d{6}$", "description": "exact decimal amount"}
PRICE_IN = {"type": ["string", "number"], "description": "per hour, >= 0, at most 6 decimals"}
REPORT_SCHEMAS = {
    "Cost": {"type": "object", "required": ["amount", "amount_micros", "currency", "breakdown"],
             "properties": {"amount": MONEY, "amount_micros": {"type": "integer"},
                            "currency": {"type": "string"},
                            "breakdown": {"type": "object", "properties": {
                                "cpu": MONEY, "memory": MONEY, "gpu": MONEY}}}},
    "Prices": {"type": "object", "properties": {
        "currency": {"type": "string"}, "cpu_hour": MONEY, "gb_hour": MONEY, "gpu_hour": MONEY,
        "memory_basis": {"type": "string"}, "updated_at": {"type": ["string", "null"]},
        "updated_by": {"type": ["string", "null"]}}},
    "PriceChanges": {"type": "object", "additionalProperties": False, "properties": {
        "currency": {"type": "string", "minLength": 1, "maxLength": 8},
        "cpu_hour": PRICE_IN, "gb_hour": PRICE_IN, "gpu_hour": PRICE_IN}},
    "Usage": {"type": "object", "required": ["period", "since", "until", "rows", "totals"],
              "properties": {
                  "period": {"type": "string", "enum": ["day", "month"]},
                  "since": {"type": "string", "format": "date"},
                  "until": {"type": "string", "format": "date"},
                  "user": {"type": ["string", "null"]},
                  "rows": {"type": "array", "items": {"type": "object", "properties": {
                      "period": {"type": "string"}, "user": {"type": "string"},
                      "currency": {"type": "string"}, "jobs": {"type": "integer"},
                      "cpu_hours": {"type": "number"}, "gb_hours": {"type": "number"},
                      "gpu_hours": {"type": "number"}, "cost": MONEY,
                      "cost_micros": {"type": "integer"}}}},
                  "totals": {"type": "array", "items": {"type": "object"}}}},
    "WebhookSecret": {"type": "object", "required": ["secret"], "properties": {
        "secret": {"type": "string"}, "algorithm": {"type": "string"},
        "signed_content": {"type": "string"}, "signature_header": {"type": "string"}}},
}
USAGE_PARAMS = [
    {"name": "period", "in": "query", "schema": {"type": "string", "enum": ["day", "month"]}},
    {"name": "since", "in": "query", "schema": {"type": "string", "format": "date"}},
    {"name": "until", "in": "query", "schema": {"type": "string", "format": "date"}},
    {"name": "user", "in": "query", "description": "admins: one user (default: everyone)",
     "schema": {"type": "string"}},
]


def _report_paths() -> dict:
    return {
        "/api/v1/usage": {"get": _op(
            "My usage and cost per day or month (admins: everyone's, or ?user=)", USER,
            {"200": _json({"$ref": "#/components/schemas/Usage"}), **_errors(400, 401, 404)},
            params=USAGE_PARAMS, tag="usage")},
        "/api/v1/usage.csv": {"get": _op(
            "The same report as CSV (attachment)", USER,
            {"200": {"description": "CSV", "content": {"text/csv": {}}}, **_errors(400, 401, 404)},
            params=USAGE_PARAMS, tag="usage")},
        "/api/v1/admin/prices": {
            "get": _op("The prices jobs are billed at (admin)", USER,
                       {"200": _json({"$ref": "#/components/schemas/Prices"}), **_errors(401, 403)},
                       tag="admin"),
            "put": _op("Change prices; applies to jobs finishing from now on (admin)", USER,
                       {"200": _json({"$ref": "#/components/schemas/Prices"}),
                        **_errors(400, 401, 403)},
                       body=_json_body({"$ref": "#/components/schemas/PriceChanges"}), tag="admin"),
        },
        "/api/v1/admin/dashboard": {"get": _op(
            "Workers, scaler VMs, queue by user, jobs per hour (admin)", USER,
            {"200": _json({"type": "object"}), **_errors(401, 403)}, tag="admin")},
        "/api/v1/webhook-secret": {
            "get": _op("My webhook signing secret (made on first use)", USER,
                       {"200": _json({"$ref": "#/components/schemas/WebhookSecret"}),
                        **_errors(401)}, tag="account"),
            "post": _op("Replace my webhook signing secret", USER,
                        {"200": _json({"$ref": "#/components/schemas/WebhookSecret"}),
                         **_errors(401, 403)}, tag="account"),
        },
        "/usage": {"get": _page("Usage and cost per day or month, with a chart", params=USAGE_PARAMS,
                                errors=[400, 404])},
        "/admin": {"get": _page("The admin dashboard", errors=[403])},
        "/account/webhook": {
            "get": _page("My webhook signing secret and how notices are signed"),
            "post": _page("Replace my webhook signing secret", ok="302", form={}),
        },
    }


def build_document() -> dict:
    paths = {
        "/api/v1/me": {"get": _op("The caller's account", USER,
                                  {"200": _json({"type": "object"}), **_errors(401)}, tag="account")},
        "/api/v1/jobs": {
            "get": _op("List my jobs, newest first", USER,
                       {"200": _json({"$ref": "#/components/schemas/JobList"}), **_errors(400, 401)},
                       params=[{"name": "before", "in": "query", "schema": {"type": "string"}},
                               {"name": "limit", "in": "query", "schema": {"type": "integer"}},
                               {"name": "state", "in": "query", "schema": {"type": "string"}}]),
            "post": _op("Submit a job", USER,
                        {"201": _json({"$ref": "#/components/schemas/Job"}, "Accepted, durable"),
                         **_errors(400, 401, 413, 415, 429)}, body=SUBMIT_FORM),
        },
        "/api/v1/jobs/{job_id}": {"get": _op(
            "One job", USER, {"200": _json({"$ref": "#/components/schemas/Job"}), **_errors(401, 404)},
            params=[JOB_ID])},
        "/api/v1/jobs/{job_id}/logs": {"get": _op(
            "A job's stdout or stderr from a byte offset", USER,
            {"200": _json({"$ref": "#/components/schemas/Logs"}), **_errors(400, 401, 404)},
            params=[JOB_ID, {"name": "stream", "in": "query",
                             "schema": {"type": "string", "enum": ["stdout", "stderr"]}},
                    {"name": "offset", "in": "query", "schema": {"type": "integer", "minimum": 0}}])},
        "/api/v1/jobs/{job_id}/outputs": {"get": _op(
            "Download the output archive (zip attachment)", USER,
            {"200": {"description": "zip", "content": {"application/zip": {}}}, **_errors(401, 404)},
            params=[JOB_ID])},
        "/api/v1/jobs/{job_id}/cancel": {"post": _op(
            "Cancel a job", USER,
            {"200": _json({"$ref": "#/components/schemas/Job"}), **_errors(401, 404, 409)},
            params=[JOB_ID])},
        "/api/v1/tokens": {
            "get": _op("List my API tokens", USER, {"200": _json({"type": "object"}), **_errors(401)},
                       tag="account"),
            "post": _op("Create an API token (shown once)", USER,
                        {"201": _json({"$ref": "#/components/schemas/Token"}), **_errors(400, 401)},
                        body=_json_body({"type": "object", "properties": {"label": {"type": "string"}}},
                                        required=False), tag="account"),
        },
        "/api/v1/tokens/{token_id}": {"delete": _op(
            "Revoke an API token", USER, {"200": _json({"type": "object"}), **_errors(401, 404)},
            params=[{"name": "token_id", "in": "path", "required": True, "schema": {"type": "string"}}],
            tag="account")},
        "/api/v1/admin/users": {
            "get": _op("List users (admin)", USER, {"200": _json({"type": "object"}), **_errors(401, 403)},
                       tag="admin"),
            "post": _op("Create a user with a one-time password (admin)", USER,
                        {"201": _json({"type": "object"}), **_errors(400, 401, 403, 409)},
                        body=_json_body({"type": "object", "required": ["name"], "properties": {
                            "name": {"type": "string"}, "admin": {"type": "boolean"}}}), tag="admin"),
        },
        "/api/v1/admin/users/{name}/limits": {
            "get": _op("A user's limits and priority weight (admin)", USER,
                       {"200": _json({"$ref": "#/components/schemas/Limits"}), **_errors(401, 403, 404)},
                       params=[USER_NAME], tag="admin"),
            "put": _op("Change some of a user's limits; null clears one (admin)", USER,
                       {"200": _json({"$ref": "#/components/schemas/Limits"}),
                        **_errors(400, 401, 403, 404)},
                       params=[USER_NAME], body=_json_body({"$ref": "#/components/schemas/LimitChanges"}),
                       tag="admin"),
        },
        "/api/v1/admin/enrollment-tokens": {
            "get": _op("List worker enrollment tokens (admin)", USER,
                       {"200": _json({"type": "object"}), **_errors(401, 403)}, tag="admin"),
            "post": _op("Create a worker enrollment token (admin)", USER,
                        {"201": _json({"type": "object"}), **_errors(400, 401, 403)},
                        body=_json_body({"type": "object", "properties": {
                            "label": {"type": "string"},
                            "expires_in_s": {"type": "number", "exclusiveMinimum": 0,
                                             "maximum": 10 * 365 * 24 * 3600}}},
                            required=False), tag="admin"),
        },
        "/api/v1/admin/enrollment-tokens/{enrollment_id}": {"delete": _op(
            "Revoke an enrollment token (admin)", USER, {"200": _json({"type": "object"}),
                                                         **_errors(401, 403, 404)},
            params=[{"name": "enrollment_id", "in": "path", "required": True,
                     "schema": {"type": "string"}}], tag="admin")},
        "/api/v1/admin/workers": {"get": _op(
            "List workers (admin)", USER, {"200": _json({"type": "object"}), **_errors(401, 403)},
            params=[{"name": "all", "in": "query", "schema": {"type": "string"}}], tag="admin")},
        "/api/v1/admin/workers/{worker_id}/{action}": {"post": _op(
            "Drain, resume or revoke a worker (admin)", USER,
            {"200": _json({"$ref": "#/components/schemas/Worker"}), **_errors(400, 401, 403, 404)},
            params=[{"name": "worker_id", "in": "path", "required": True, "schema": {"type": "string"}},
                    {"name": "action", "in": "path", "required": True,
                     "schema": {"type": "string", "enum": ["drain", "resume", "revoke"]}}],
            tag="admin")},
        "/api/v1/admin/queue": {"get": _op(
            "Queue length and each live worker's load and idle time, for the VM scaler (admin)", USER,
            {"200": _json({"$ref": "#/components/schemas/QueueView"}), **_errors(400, 401, 403)},
            params=[{"name": name, "in": "query", "required": False, "schema": schema,
                     "description": "a worker shape (all four or none): count as runnable only "
                                    "jobs such a worker could run"}
                    for name, schema in (("cpus", {"type": "number"}), ("memory_mb", {"type": "integer"}),
                                         ("gpus", {"type": "integer"}),
                                         ("images", {"type": "string", "description": "comma-separated"}))],
            tag="admin")},
        "/api/v1/admin/scaler/report": {"put": _op(
            "The VM scaler reports its VMs (replacing the last list) and its decisions (admin)", USER,
            {"200": _json({"type": "object", "properties": {
                "vms": {"type": "integer"}, "events": {"type": "integer"}}}),
             **_errors(400, 401, 403)},
            body=_json_body({"$ref": "#/components/schemas/ScalerReport"}), tag="admin")},
        "/api/v1/admin/vms": {"get": _op(
            "Worker VMs as the scaler last reported them, and its latest decisions (admin)", USER,
            {"200": _json({"type": "object", "properties": {
                "vms": {"type": "array", "items": {"type": "object"}},
                "events": {"type": "array", "items": {"type": "object"}}}}),
             **_errors(401, 403)}, tag="admin")},
        "/api/v1/workers/register": {"post": _op(
            "Register a worker with an enrollment token; returns its secret", ENROLL,
            {"201": _json({"type": "object", "required": ["worker_id", "secret"]}),
             **_errors(400, 401)}, body=_json_body({"$ref": "#/components/schemas/Capacity"}),
            tag="worker")},
        "/api/v1/worker/heartbeat": {"post": _op(
            "Heartbeat: extends leases; answers jobs to cancel and the drain flag", WORKER,
            {"200": _json({"type": "object", "properties": {
                "cancel": {"type": "array", "items": {"type": "string"}},
                "unknown": {"type": "array", "items": {"type": "string"}},
                "drain": {"type": "boolean"}}}), **_errors(400, 401, 404)},
            body=_json_body({"type": "object", "properties": {
                "running": {"type": "array", "items": {"type": "string"}}}}, required=False),
            tag="worker")},
        "/api/v1/worker/claim": {"post": _op(
            "Claim jobs (round-robin across live workers; may long-poll)", WORKER,
            {"200": _json({"type": "object", "properties": {
                "jobs": {"type": "array", "items": {"$ref": "#/components/schemas/ClaimedJob"}},
                "drain": {"type": "boolean"},
                "cancel": {"type": "array", "items": {"type": "string"}}}}), **_errors(400, 401, 404)},
            body=_json_body({"type": "object", "properties": {
                "max_jobs": {"type": "integer", "minimum": 0, "maximum": 64},
                "wait_s": {"type": "number", "minimum": 0}}}, required=False), tag="worker")},
        "/api/v1/worker/jobs/{job_id}/script": {"get": _op(
            "Download the script of a job this worker holds", WORKER,
            {"200": {"description": "the script", "content": {"text/x-python": {}}},
             **_errors(401, 404)}, params=[JOB_ID], tag="worker")},
        "/api/v1/worker/jobs/{job_id}/dataset": {"get": _op(
            "Download the dataset of a job this worker holds", WORKER,
            {"200": {"description": "zip", "content": {"application/zip": {}}}, **_errors(401, 404)},
            params=[JOB_ID], tag="worker")},
        "/api/v1/worker/jobs/{job_id}/logs": {"post": _op(
            "Append a chunk of stdout/stderr (idempotent by offset)", WORKER,
            {"200": _json({"type": "object"}), **_errors(400, 401, 404)}, params=[JOB_ID],
            body=_json_body({"type": "object", "required": ["attempt", "stream", "offset", "data"],
                             "properties": {"attempt": {"type": "integer"},
                                            "stream": {"type": "string", "enum": ["stdout", "stderr"]},
                                            "offset": {"type": "integer", "minimum": 0},
                                            "data": {"type": "string"}}}), tag="worker")},
        "/api/v1/worker/jobs/{job_id}/result": {"post": _op(
            "Post the final result (JSON, or multipart: result + outputs zip); idempotent", WORKER,
            {"200": _json({"type": "object", "properties": {
                "job_id": {"type": "string"}, "state": {"type": "string"},
                "applied": {"type": "boolean"},
                "jobs": {"type": "array", "items": {"$ref": "#/components/schemas/ClaimedJob"}}}}),
             **_errors(400, 401, 404, 409, 413)}, params=[JOB_ID],
            body={"required": True, "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/Result"}},
                "multipart/form-data": {"schema": {"type": "object", "properties": {
                    "result": {"type": "string"}, "outputs": {"type": "string", "format": "binary"}}}}}},
            tag="worker")},
        "/api/v1/worker/deregister": {"post": _op(
            "Deregister: the worker's running jobs are requeued", WORKER,
            {"200": _json({"type": "object"}), **_errors(401, 404)}, tag="worker")},
        "/api/v1/openapi.json": {"get": {"summary": "This document", "tags": ["ops"], "security": [],
                                         "responses": {"200": _json({"type": "object"})}}},
        "/job-status/{user}": {"get": _op(
            "A user's jobs (HTML, or JSON with Accept: application/json)", USER,
            {"200": {"description": "OK", "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/JobList"}},
                "text/html": {}}},
             "302": REDIRECT, **_page_errors(400, 401, 403, 404)},
            params=[{"name": "user", "in": "path", "required": True, "schema": {"type": "string"}},
                    {"name": "before", "in": "query", "description": "a job id: the page after it",
                     "schema": {"type": "string", "maxLength": 64}}])},
        "/healthz": {"get": {"summary": "Store reachable", "tags": ["ops"], "security": [],
                             "responses": {"200": _json({"type": "object"}),
                                           "503": _json({"type": "object"})}}},
        "/metrics": {"get": {"summary": "Prometheus metrics", "tags": ["ops"], "security": [],
                             "responses": {"200": {"description": "text",
                                                   "content": {"text/plain": {}}}}}},
        **_pages(),
        **_report_paths(),
        **_live_paths(),
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "jobcloud proxy API", "version": "1"},
        "paths": paths,
        "components": {
            "schemas": {**SCHEMAS, **REPORT_SCHEMAS},
            "securitySchemes": {
                "userToken": {"type": "http", "scheme": "bearer", "description": "API token (jcu_...)"},
                "session": {"type": "apiKey", "in": "cookie", "name": "jobcloud_session"},
                "workerSecret": {"type": "http", "scheme": "bearer", "description": "worker secret (jcw_...)"},
                "enrollmentToken": {"type": "http", "scheme": "bearer",
                                    "description": "enrollment token (jce_...)"},
            },
        },
    }


@bp.route("/api/v1/openapi.json", methods=["GET"])
def document():
    return jsonify(build_document())
