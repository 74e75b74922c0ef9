"""The user, admin and ops routes of the OpenAPI document: everything under
/api/v1 that a person's API token (or session) calls, plus health and metrics.

The worker protocol is worker_paths.py's and the browser pages page_paths.py's;
builders.py holds what they all share.
"""
from __future__ import annotations

from .builders import (ARRAY_ID, ERROR, EVENT_STREAM, JOB_ID, RESUME, STORE_REDIRECT, SUBMIT_FORM,
                       USAGE_PARAMS, USER, USER_NAME, USER_PARAM, answer, errors, json_body, op)

JOB_EVENTS = ("A job's state and output as Server-Sent Events: `state` (the Job, when it changes, "
              "with truncated: {stdout, stderr}), `attempt` (requeued: output starts again), "
              "`log` ({stream, attempt, offset, text, truncated}), "
              "then `end` (the final Job). Event ids are ATTEMPT-STDOUT_BYTES-STDERR_BYTES; "
              "a malformed Last-Event-ID is a 400")
USER_EVENTS = ("A user's job changes as Server-Sent Events: `job` (the Job, with new: true when "
               "submitted since the last event) for each job that is new or changed; a "
               "(re)connection also sends the user's active jobs. Event ids are t<unix time>. "
               "Only the user and admins")


def api_paths() -> dict:
    """The user API, the admin API, usage and prices, live streams, and the ops routes."""
    return {
        "/api/v1/me": {"get": op("The caller's account", USER,
                                 {"200": answer({"type": "object"}), **errors(401)}, tag="account")},
        "/api/v1/jobs": {
            "get": op("List my jobs, newest first", USER,
                      {"200": answer({"$ref": "#/components/schemas/JobList"}), **errors(400, 401)},
                      params=[{"name": "before", "in": "query", "schema": {"type": "string"}},
                              {"name": "limit", "in": "query", "schema": {"type": "integer"}},
                              {"name": "state", "in": "query", "schema": {"type": "string"}}]),
            "post": op("Submit a job, or a job array (`array` or `params`)", USER,
                       {"201": answer({"oneOf": [{"$ref": "#/components/schemas/Job"},
                                                 {"$ref": "#/components/schemas/JobArray"}]},
                                      "Accepted, durable: the Job, or with `array`/`params` the "
                                      "JobArray (Location: /api/v1/arrays/{id})"),
                        **errors(400, 401, 413, 415, 429, 503),
                        # A job no live worker and no scaler VM shape could run (proxy/capacity.py).
                        "400": answer(ERROR, "A field is invalid, or `no_capacity`: no live worker "
                                      "and no VM shape the scaler reported has the image, CPUs, "
                                      "memory or GPUs it asks (the detail names the resource and "
                                      "what exists; the queue_unmet_capacity setting accepts "
                                      "such jobs instead)"),
                        # requirements.py: the package index could not be asked.
                        "503": answer(ERROR, "`package_index_unreachable`: the job has a "
                                      "requirements file and the package index could not be "
                                      "asked whether its packages have wheels")}, body=SUBMIT_FORM),
        },
        "/api/v1/jobs/{job_id}": {"get": op(
            "One job", USER, {"200": answer({"$ref": "#/components/schemas/Job"}), **errors(401, 404)},
            params=[JOB_ID])},
        "/api/v1/jobs/{job_id}/logs": {"get": op(
            "A job's stdout or stderr from a byte offset", USER,
            {"200": answer({"$ref": "#/components/schemas/Logs"}), **errors(400, 401, 404, 410)},
            params=[JOB_ID, {"name": "stream", "in": "query",
                             "schema": {"type": "string", "enum": ["stdout", "stderr"]}},
                    {"name": "offset", "in": "query", "schema": {"type": "integer", "minimum": 0}},
                    {"name": "attempt", "in": "query", "schema": {"type": "integer", "minimum": 0},
                     "description": "one try's logs (the job's `tries` link them); default: "
                                    "the latest"}])},
        "/api/v1/jobs/{job_id}/env": {"get": op(
            "The job's environment variables with their values (proxy/jobenv.py): its owner "
            "only (an admin gets 403, anyone else 404)", USER,
            {"200": answer({"$ref": "#/components/schemas/JobEnv"}), **errors(401, 403, 404)},
            params=[JOB_ID])},
        "/api/v1/jobs/{job_id}/outputs": {"get": op(
            "Download the output archive (zip attachment)", USER,
            {"200": {"description": "zip", "content": {"application/zip": {}}},
             "307": STORE_REDIRECT, **errors(401, 404, 410, 503)},
            params=[JOB_ID])},
        # Retention (proxy/retention.py): a pinned job's files are kept until unpinned.
        "/api/v1/jobs/{job_id}/pin": {
            "post": op("Pin a job: keep its files and logs past the retention time", USER,
                       {"200": answer({"$ref": "#/components/schemas/Job"}),
                        **errors(401, 404, 410)}, params=[JOB_ID]),
            "delete": op("Unpin a job: its files expire with the retention time", USER,
                         {"200": answer({"$ref": "#/components/schemas/Job"}), **errors(401, 404)},
                         params=[JOB_ID])},
        "/api/v1/jobs/{job_id}/cancel": {"post": op(
            "Cancel a job", USER,
            {"200": answer({"$ref": "#/components/schemas/Job"}), **errors(401, 404, 409)},
            params=[JOB_ID])},
        # Job arrays (proxy/arrays.py): the owner's or an admin's; 404 for anyone else.
        "/api/v1/arrays/{array_id}": {"get": op(
            "A job array: counts per state and its jobs by index, a page at a time", USER,
            {"200": answer({"$ref": "#/components/schemas/JobArray"}), **errors(400, 401, 404)},
            params=[ARRAY_ID, {"name": "after", "in": "query", "schema": {"type": "integer"},
                               "description": "the jobs after this index"},
                    {"name": "limit", "in": "query",
                     "schema": {"type": "integer", "minimum": 1, "maximum": 10000}}])},
        "/api/v1/arrays/{array_id}/cancel": {"post": op(
            "Cancel every job of the array that has not ended", USER,
            {"200": answer({"$ref": "#/components/schemas/JobArray"}), **errors(401, 404)},
            params=[ARRAY_ID])},
        "/api/v1/arrays/{array_id}/outputs": {"get": op(
            "Every job's outputs as one zip, streamed: <index>/<path>, and MISSING.txt listing "
            "the jobs without outputs", USER,
            {"200": {"description": "zip", "content": {"application/zip": {}}},
             **errors(401, 404)}, params=[ARRAY_ID])},
        "/api/v1/tokens": {
            "get": op("List my API tokens", USER, {"200": answer({"type": "object"}), **errors(401)},
                      tag="account"),
            "post": op("Create an API token (shown once)", USER,
                       {"201": answer({"$ref": "#/components/schemas/Token"}), **errors(400, 401)},
                       body=json_body({"type": "object", "properties": {"label": {"type": "string"}}},
                                      required=False), tag="account"),
        },
        "/api/v1/tokens/{token_id}": {"delete": op(
            "Revoke an API token", USER, {"200": answer({"type": "object"}), **errors(401, 404)},
            params=[{"name": "token_id", "in": "path", "required": True, "schema": {"type": "string"}}],
            tag="account")},
        "/api/v1/admin/users": {
            "get": op("List users (admin)", USER, {"200": answer({"type": "object"}), **errors(401, 403)},
                      tag="admin"),
            "post": op("Create a user with a one-time password (admin)", USER,
                       {"201": answer({"type": "object"}), **errors(400, 401, 403, 409)},
                       body=json_body({"type": "object", "required": ["name"], "properties": {
                            "name": {"type": "string"}, "admin": {"type": "boolean"}}}), tag="admin"),
        },
        "/api/v1/admin/users/{name}/limits": {
            "get": op("A user's limits and priority weight (admin)", USER,
                      {"200": answer({"$ref": "#/components/schemas/Limits"}), **errors(401, 403, 404)},
                      params=[USER_NAME], tag="admin"),
            "put": op("Change some of a user's limits; null clears one (admin)", USER,
                      {"200": answer({"$ref": "#/components/schemas/Limits"}),
                       **errors(400, 401, 403, 404)},
                      params=[USER_NAME], body=json_body({"$ref": "#/components/schemas/LimitChanges"}),
                      tag="admin"),
        },
        "/api/v1/admin/enrollment-tokens": {
            "get": op("List worker enrollment tokens (admin)", USER,
                      {"200": answer({"type": "object"}), **errors(401, 403)}, tag="admin"),
            "post": op("Create a worker enrollment token (admin)", USER,
                       {"201": answer({"type": "object"}), **errors(400, 401, 403)},
                       body=json_body({"type": "object", "properties": {
                            "label": {"type": "string"},
                            "expires_in_s": {"type": "number", "exclusiveMinimum": 0,
                                             "maximum": 10 * 365 * 24 * 3600}}},
                            required=False), tag="admin"),
        },
        "/api/v1/admin/enrollment-tokens/{enrollment_id}": {"delete": op(
            "Revoke an enrollment token (admin)", USER, {"200": answer({"type": "object"}),
                                                         **errors(401, 403, 404)},
            params=[{"name": "enrollment_id", "in": "path", "required": True,
                     "schema": {"type": "string"}}], tag="admin")},
        "/api/v1/admin/workers": {"get": op(
            "List workers (admin)", USER, {"200": answer({"type": "object"}), **errors(401, 403)},
            params=[{"name": "all", "in": "query", "schema": {"type": "string"}}], tag="admin")},
        "/api/v1/admin/workers/{worker_id}/{action}": {"post": op(
            "Drain, resume, retire or revoke a worker (admin). Retire and revoke both requeue its "
            "jobs, free its name and end the worker daemon (exit 5 retired, 6 revoked)", USER,
            {"200": answer({"$ref": "#/components/schemas/Worker"}), **errors(400, 401, 403, 404)},
            params=[{"name": "worker_id", "in": "path", "required": True, "schema": {"type": "string"}},
                    {"name": "action", "in": "path", "required": True,
                     "schema": {"type": "string", "enum": ["drain", "resume", "retire", "revoke"]}}],
            tag="admin")},
        "/api/v1/admin/queue": {"get": op(
            "Queue length and each live worker's load and idle time, for the VM scaler (admin)", USER,
            {"200": answer({"$ref": "#/components/schemas/QueueView"}), **errors(400, 401, 403)},
            params=[{"name": name, "in": "query", "required": False, "schema": schema,
                     "description": "a worker shape (all four or none): count as runnable only "
                                    "jobs such a worker could run"}
                    for name, schema in (("cpus", {"type": "number"}), ("memory_mb", {"type": "integer"}),
                                         ("gpus", {"type": "integer"}),
                                         ("images", {"type": "string", "description": "comma-separated"}))],
            tag="admin")},
        "/api/v1/admin/scaler/report": {"put": op(
            "The VM scaler reports its VMs (replacing the last list) and its decisions (admin)", USER,
            {"200": answer({"type": "object", "properties": {
                "vms": {"type": "integer"}, "events": {"type": "integer"}}}),
             **errors(400, 401, 403)},
            body=json_body({"$ref": "#/components/schemas/ScalerReport"}), tag="admin")},
        "/api/v1/admin/webhook-deliveries": {"get": op(
            "Webhook deliveries, newest first (100), with why each last failed (admin)", USER,
            {"200": answer({"type": "object", "properties": {
                "deliveries": {"type": "array", "items": {"type": "object"}}}}),
             **errors(400, 401, 403)},
            params=[{"name": "job", "in": "query", "schema": {"type": "string"},
                     "description": "only this job's delivery"},
                    {"name": "state", "in": "query",
                     "schema": {"type": "string", "enum": ["pending", "delivered", "failed"]}}],
            tag="admin")},
        "/api/v1/admin/vms": {"get": op(
            "Worker VMs as the scaler last reported them, and its latest decisions (admin)", USER,
            {"200": answer({"type": "object", "properties": {
                "vms": {"type": "array", "items": {"type": "object"}},
                "events": {"type": "array", "items": {"type": "object"}}}}),
             **errors(401, 403)}, tag="admin")},
        "/api/v1/usage": {"get": op(
            "My usage and cost per day or month (admins: everyone's, or ?user=)", USER,
            {"200": answer({"$ref": "#/components/schemas/Usage"}), **errors(400, 401, 404)},
            params=USAGE_PARAMS, tag="usage")},
        "/api/v1/usage.csv": {"get": op(
            "The same report as CSV (attachment)", USER,
            {"200": {"description": "CSV", "content": {"text/csv": {}}}, **errors(400, 401, 404)},
            params=USAGE_PARAMS, tag="usage")},
        "/api/v1/admin/prices": {
            "get": op("The prices jobs are billed at (admin)", USER,
                      {"200": answer({"$ref": "#/components/schemas/Prices"}), **errors(401, 403)},
                      tag="admin"),
            "put": op("Change prices; applies to jobs finishing from now on (admin)", USER,
                      {"200": answer({"$ref": "#/components/schemas/Prices"}),
                       **errors(400, 401, 403)},
                      body=json_body({"$ref": "#/components/schemas/PriceChanges"}), tag="admin"),
        },
        "/api/v1/admin/dashboard": {"get": op(
            "Workers, scaler VMs, queue by user, the oldest queued jobs and why each waits, jobs "
            "per hour (admin)", USER,
            {"200": answer({"type": "object", "properties": {
                "queued_jobs": {"type": "array", "description": "the 50 oldest queued jobs",
                                "items": {"type": "object", "properties": {
                                    "id": {"type": "string"}, "name": {"type": "string"},
                                    "owner": {"type": "string"}, "submitted_at": {"type": "string"},
                                    "waiting": {"$ref": "#/components/schemas/Waiting"}}}}}}),
             **errors(401, 403)}, tag="admin")},
        "/api/v1/webhook-secret": {
            "get": op("My webhook signing secret (made on first use)", USER,
                      {"200": answer({"$ref": "#/components/schemas/WebhookSecret"}),
                       **errors(401)}, tag="account"),
            "post": op("Replace my webhook signing secret", USER,
                       {"200": answer({"$ref": "#/components/schemas/WebhookSecret"}),
                        **errors(401, 403)}, tag="account"),
        },
        "/api/v1/jobs/{job_id}/events": {"get": op(
            JOB_EVENTS, USER, {"200": EVENT_STREAM, **errors(400, 401, 403, 404)},
            params=[JOB_ID, *RESUME])},
        "/api/v1/users/{user}/events": {"get": op(
            USER_EVENTS, USER, {"200": EVENT_STREAM, **errors(400, 401, 403, 404)},
            params=[USER_PARAM, *RESUME])},
        "/api/v1/openapi.json": {"get": {"summary": "This document", "tags": ["ops"], "security": [],
                                         "responses": {"200": answer({"type": "object"})}}},
        "/healthz": {"get": {"summary": "Store reachable", "tags": ["ops"], "security": [],
                             "responses": {"200": answer({"type": "object"}),
                                           "503": answer({"type": "object"})}}},
        # No token needed when metrics_token is unset (loopback clients only: 403 to others).
        "/metrics": {"get": {"summary": "Prometheus metrics", "tags": ["ops"],
                             "security": [{}, {"metricsToken": []}],
                             "responses": {"200": {"description": "text",
                                                   "content": {"text/plain": {}}},
                                           **errors(401, 403)}}},
    }
