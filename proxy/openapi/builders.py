"""The pieces every part of the OpenAPI document is built from: security
requirements, common parameters, JSON and error answers, an operation, a page.

Written once here so that every operation answers its errors the same way
(`{"error", "detail"}` with the status's one-line meaning) and every browser
page documents its redirect, its CSRF refusal and its HTML-or-JSON errors
alike; a part module only says what is particular to its routes.
"""
from __future__ import annotations

ERROR = {"$ref": "#/components/schemas/Error"}
USER = [{"userToken": []}, {"session": []}]
WORKER = [{"workerSecret": []}]
ENROLL = [{"enrollmentToken": []}]
SESSION = [{"session": []}]

USER_NAME = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
USER_PARAM = {"name": "user", "in": "path", "required": True, "schema": {"type": "string"}}
JOB_ID = {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string", "maxLength": 64}}
ARRAY_ID = {"name": "array_id", "in": "path", "required": True,
            "schema": {"type": "string", "maxLength": 64}}

ERROR_TEXT = {400: "Invalid request", 401: "Missing or invalid credentials", 403: "Not allowed",
              404: "Not found (or not yours)", 409: "Conflict with the current state",
              410: "Deleted by retention (`expired`)",
              413: "Upload too large, or past the storage quota (`storage_quota_exceeded`)",
              415: "Wrong content type",
              429: "Over a per-user count or rate limit",
              503: "Store unavailable (the database, or `blob_store_unavailable`: the S3 store)"}
# A download from the S3 blob store (blob_url = s3://...; proxy/downloads.py).
STORE_REDIRECT = {"description": "With the S3 blob store: the file is at the presigned URL in"
                                 " Location (valid blob_presign_ttl_s; no credentials needed)"}

# The browser pages are part of the served surface too: documented so the
# document lists every route, with the session cookie and a form CSRF token.
HTML = {"description": "HTML page", "content": {"text/html": {}}}
REDIRECT = {"description": "Redirect (to the login page when not logged in)"}
CSRF_FORM = {"403": {"description": "The form's csrf_token is missing or wrong",
                     "content": {"text/html": {}, "application/json": {"schema": ERROR}}}}


def answer(schema, description="OK") -> dict:
    """A JSON response object with `schema`."""
    return {"description": description, "content": {"application/json": {"schema": schema}}}


# Every operation's 400 where it has none of its own (openapi.build_document).
MALFORMED = answer(ERROR, "Malformed HTTP request (a header or request line the server cannot"
                          " parse), refused before any route")

def errors(*codes) -> dict:
    """The responses of an API route's error statuses, each the JSON Error."""
    return {str(c): answer(ERROR, ERROR_TEXT[c]) for c in codes}


def page_errors(*codes) -> dict:
    """The error responses of a page: HTML, or JSON to Accept: application/json."""
    return {str(c): {"description": ERROR_TEXT[c], "content": {
        "text/html": {}, "application/json": {"schema": ERROR}}} for c in codes}


def op(summary, security, responses, *, params=(), body=None, tag="jobs") -> dict:
    """An operation object: what it does, who may call it, what it answers."""
    result = {"summary": summary, "tags": [tag], "security": security, "responses": responses}
    if params:
        result["parameters"] = list(params)
    if body:
        result["requestBody"] = body
    return result


def json_body(schema, required=True) -> dict:
    """A request body of JSON with `schema`."""
    return {"required": required, "content": {"application/json": {"schema": schema}}}


def page(summary, *, form=None, params=(), ok="200", errors=()) -> dict:
    """A browser page's operation.

    Args:
        summary: what the page shows or does.
        form: the fields of the urlencoded form it takes (csrf_token is added), or None.
        params: its path and query parameters.
        ok: "200" for a page that answers HTML, "302" for one that redirects.
        errors: the error statuses it may answer.
    """
    responses = {ok: REDIRECT if ok == "302" else HTML, "302": REDIRECT, **page_errors(*errors)}
    if form is not None:
        responses.update(CSRF_FORM)
    result = op(summary, SESSION, responses, params=params, tag="pages")
    if form is not None:
        props = {"csrf_token": {"type": "string"}, **form}
        result["requestBody"] = {"required": True, "content": {
            "application/x-www-form-urlencoded": {"schema": {
                "type": "object", "required": ["csrf_token"], "properties": props}}}}
    return result


# ------------------------------------------- parts an API route and its page share

SUBMIT_FORM = {
    "required": True,
    "content": {"multipart/form-data": {"schema": {
        "type": "object",
        "properties": {
            "script": {"type": "string", "format": "binary", "description": "a .py file"},
            "code": {"type": "string", "description": "pasted code, instead of script"},
            "dataset": {"type": "string", "format": "binary", "description": "optional .zip"},
            "array": {"type": "string", "maxLength": 64, "description": (
                "a job array (proxy/arrays.py): A-B (jobs A to B) or N (one job, index N), "
                "optionally %K: at most K of them reserved or running at once; with a params "
                "file, %K alone. The answer is then a JobArray. Each job gets "
                "JOBCLOUD_ARRAY_INDEX and JOBCLOUD_ARRAY_ID. 400 `invalid_array`, "
                "`array_too_large` (past max_array_size), `array_and_params`")},
            "params": {"type": "string", "format": "binary", "description": (
                "a parameters file, one job per row: CSV with a header, or JSON lines (one object "
                "a line); row i is job i's JOBCLOUD_PARAMS (JSON) and /job/input/params.json. "
                "400 `invalid_params` naming the line")},
            "requirements": {"type": "string", "format": "binary", "description": (
                "optional requirements.txt: name[extras] specifier lines, --hash=... and "
                "comments only; installed from wheels only (an sdist-only package is a 400 "
                "`sdist_only`; an unreachable package index a 503 `package_index_unreachable`)")},
            "name": {"type": "string", "maxLength": 100},
            "image": {"type": "string"},
            "cpus": {"type": "number"}, "memory_mb": {"type": "integer"},
            "timeout_s": {"type": "integer"}, "gpus": {"type": "integer"},
            "disk_mb": {"type": "integer", "minimum": 1,
                        "description": "the job's disk quota (outputs and scratch), MiB: writes "
                                       "past it fail with ENOSPC (default: default_disk_mb)"},
            "after": {"type": "string", "maxLength": 2560, "description": (
                "ids of the submitter's jobs or arrays (an array: all its jobs), separated by "
                "commas or spaces, at most 32: the job starts once all succeeded and reads their "
                "outputs at /job/input/after/<name or id>/; one that fails, times out or is "
                "cancelled cancels it. 400 `unknown_parent` for an id that is not one of yours, "
                "`parent_failed` for one that already failed, `too_many_parents` past "
                "max_parent_jobs parent jobs in all, `too_many_dependencies` when the jobs "
                "submitted times the parent jobs pass max_dependency_edges")},
            "retries": {"type": "integer", "minimum": 0, "description": "policy retries of a "
                        "failed try (0 to max_retries, default 0)"},
            "retry_exit_codes": {"type": "string", "description": "exit codes (1-255, comma-"
                                 "separated) that count as retryable; empty: any non-zero exit "
                                 "but an OOM kill. Never a timeout or a cancel"},
            "retry_backoff_s": {"type": "integer", "minimum": 0, "description": "the back-off's "
                                "base: the k-th retry waits min(base * 2^(k-1), "
                                "retry_backoff_max_s) (default 10)"},
            "webhook_url": {"type": "string", "maxLength": 2048,
                            "description": "http(s) URL on an allow-listed host (webhook_allowed_hosts)"
                                           ": gets a signed POST when the job finishes"},
            "env": {"type": "string", "description": (
                "the job's own environment variables (proxy/jobenv.py): a JSON object of names to "
                "strings, or NAME=value lines; the field may be repeated, one NAME=value each. "
                "Names [A-Za-z_][A-Za-z0-9_]*, at most job_env_max_vars of them, values at most "
                "job_env_max_value_bytes. Reserved, a 400 `invalid_env`: JOBCLOUD_*, LD_*, PATH, "
                "HOME, PYTHONPATH and the others the worker sets or that change what runs. The "
                "job's JSON shows the names (env_names); the owner reads the values at "
                "/api/v1/jobs/{job_id}/env")},
        }}}},
}

USAGE_PARAMS = [
    {"name": "period", "in": "query", "schema": {"type": "string", "enum": ["day", "month"]}},
    {"name": "since", "in": "query", "schema": {"type": "string", "format": "date"}},
    {"name": "until", "in": "query", "schema": {"type": "string", "format": "date"}},
    {"name": "user", "in": "query", "description": "admins: one user (default: everyone)",
     "schema": {"type": "string"}},
]

# Live updates (proxy/live.py): the same streams under /api/v1 and for the pages.
EVENT_STREAM = {"description": (
    "Server-Sent Events. The stream ends by itself after live_stream_s (25 s): reconnect with the last "
    "event's id in Last-Event-ID (EventSource does) to resume without duplicates or gaps."),
    "content": {"text/event-stream": {"schema": {"type": "string"}}}}
RESUME = [{"name": "Last-Event-ID", "in": "header", "schema": {"type": "string"},
           "description": "the id of the last event received: the stream resumes after it"},
          {"name": "from", "in": "query", "schema": {"type": "string"},
           "description": "the same as Last-Event-ID, for a first connection"}]
