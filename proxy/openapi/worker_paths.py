"""The worker protocol in the OpenAPI document: what a worker daemon
(worker/client.py) sends and what the proxy (proxy/worker_api.py) answers.

The contract between two deployables that share no code: a field the proxy
adds to an answer is described here, and that is where the worker's side
learns of it.
"""
from __future__ import annotations

from .builders import ENROLL, JOB_ID, STORE_REDIRECT, WORKER, answer, errors, json_body, op


def worker_paths() -> dict:
    """Register, heartbeat, claim, inputs, logs, result and deregister."""
    return {
        "/api/v1/workers/register": {"post": op(
            "Register a worker with an enrollment token, or rejoin with its own secret (a "
            "worker told worker_lost); returns its (new) secret. A live worker's name is taken "
            "over only with its secret or the same enrollment (else 409 name_in_use; an admin "
            "retires the live worker first); 401 worker_retired or worker_revoked: an admin "
            "ended this worker (worker_replaced, worker_lost: register again)", ENROLL + WORKER,
            {"201": answer({"$ref": "#/components/schemas/RegisterAnswer"}),
             **errors(400, 401, 409)}, body=json_body({"$ref": "#/components/schemas/Capacity"}),
            tag="worker")},
        "/api/v1/worker/heartbeat": {"post": op(
            "Heartbeat: extends leases; answers jobs to cancel and the drain flag", WORKER,
            {"200": answer({"$ref": "#/components/schemas/HeartbeatAnswer"}),
             **errors(400, 401, 404)},
            body=json_body({"type": "object", "properties": {
                "running": {"type": "array", "items": {"type": "string"}}}}, required=False),
            tag="worker")},
        "/api/v1/worker/claim": {"post": op(
            "Claim jobs (round-robin across live workers; may long-poll); answers the worker's "
            "orders (cancel, drain) as a heartbeat does", WORKER,
            {"200": answer({"$ref": "#/components/schemas/ClaimAnswer"}), **errors(400, 401, 404)},
            body=json_body({"type": "object", "properties": {
                "max_jobs": {"type": "integer", "minimum": 0, "maximum": 64},
                "wait_s": {"type": "number", "minimum": 0}}}, required=False), tag="worker")},
        "/api/v1/worker/jobs/{job_id}/script": {"get": op(
            "Download the script of a job this worker holds", WORKER,
            {"200": {"description": "the script", "content": {"text/x-python": {}}},
             "307": STORE_REDIRECT, **errors(401, 404, 503)}, params=[JOB_ID], tag="worker")},
        "/api/v1/worker/jobs/{job_id}/dataset": {"get": op(
            "Download the dataset of a job this worker holds", WORKER,
            {"200": {"description": "zip", "content": {"application/zip": {}}},
             "307": STORE_REDIRECT, **errors(401, 404, 503)},
            params=[JOB_ID], tag="worker")},
        "/api/v1/worker/jobs/{job_id}/requirements": {"get": op(
            "Download the normalised requirements.txt of a job this worker holds", WORKER,
            {"200": {"description": "text", "content": {"text/plain": {}}},
             "307": STORE_REDIRECT, **errors(401, 404, 503)},
            params=[JOB_ID], tag="worker")},
        "/api/v1/worker/jobs/{job_id}/after/{parent_id}/outputs": {"get": op(
            "Download the output archive of a parent of a job this worker holds (its claim's "
            "`after`); 410 parent_expired: retention deleted it, the job fails", WORKER,
            {"200": {"description": "zip", "content": {"application/zip": {}}},
             "307": STORE_REDIRECT, **errors(401, 404, 410, 503)},
            params=[JOB_ID, {"name": "parent_id", "in": "path", "required": True,
                             "schema": {"type": "string", "maxLength": 64}}], tag="worker")},
        "/api/v1/worker/jobs/{job_id}/logs": {"post": op(
            "Append a chunk of stdout/stderr (idempotent by offset)", WORKER,
            {"200": answer({"type": "object"}), **errors(400, 401, 404)}, params=[JOB_ID],
            body=json_body({"type": "object", "required": ["attempt", "stream", "offset", "data"],
                            "properties": {"attempt": {"type": "integer"},
                                           "stream": {"type": "string", "enum": ["stdout", "stderr"]},
                                           "offset": {"type": "integer", "minimum": 0},
                                           "data": {"type": "string"}}}), tag="worker")},
        "/api/v1/worker/jobs/{job_id}/outputs-upload": {"post": op(
            "With the S3 blob store (the claim's outputs_upload is \"direct\"): a presigned PUT "
            "for this try's output archive of exactly `size` bytes hashing to `sha256` (the "
            "store refuses other bytes); then post the result with outputs_upload {sha256, "
            "size}. 400 direct_upload_unavailable: the proxy keeps files itself (post the "
            "archive with the result)", WORKER,
            {"200": answer({"type": "object", "required": ["url", "method", "headers",
                                                           "expires_in_s"], "properties": {
                "url": {"type": "string"}, "method": {"type": "string", "enum": ["PUT"]},
                "headers": {"type": "object", "additionalProperties": {"type": "string"},
                            "description": "send exactly these with the PUT"},
                "expires_in_s": {"type": "integer"}}}),
             **errors(400, 401, 404, 409, 413)}, params=[JOB_ID],
            body=json_body({"type": "object", "required": ["attempt", "sha256", "size"],
                            "properties": {"attempt": {"type": "integer"},
                                           "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                                           "size": {"type": "integer", "minimum": 1}}}),
            tag="worker")},
        "/api/v1/worker/jobs/{job_id}/result": {"post": op(
            "Post the final result (JSON, or multipart: result + outputs zip); idempotent. With "
            "claim_next > 0 it also claims, and answers as a claim does too. With the S3 blob "
            "store the archive is PUT first (outputs-upload) and the JSON result names it "
            "(outputs_upload); 400 outputs_missing, outputs_mismatch, invalid_outputs: the "
            "store does not hold that archive", WORKER,
            {"200": answer({"$ref": "#/components/schemas/ResultAnswer"}),
             **errors(400, 401, 404, 409, 413, 503)}, params=[JOB_ID],
            body={"required": True, "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/Result"}},
                "multipart/form-data": {"schema": {"type": "object", "properties": {
                    "result": {"type": "string"}, "outputs": {"type": "string", "format": "binary"}}}}}},
            tag="worker")},
        "/api/v1/worker/deregister": {"post": op(
            "Deregister: the worker's running jobs are requeued", WORKER,
            {"200": answer({"type": "object"}), **errors(401, 404)}, tag="worker")},
    }
