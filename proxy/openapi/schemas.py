"""The components of the OpenAPI document: the shapes of what the API takes and
answers (jobs, logs, worker results and claims, limits, the scaler's report,
usage and cost), referred to from the paths as #/components/schemas/<Name>.

Ranges, enums and lengths the proxy enforces are written into the shapes, so
a client, and the fuzzing test (tests/test_fuzz.py), learn them from the
contract rather than from a 400.
"""
from __future__ import annotations

from ..models import LEFT_OUT_REASONS

USAGE = {"type": ["number", "null"], "minimum": 0, "maximum": 2**53}
MONEY = {"type": "string", "pattern": r"^\d+\.\d{6}$", "description": "exact decimal amount"}
PRICE_IN = {"type": ["string", "number"], "description": "per hour, >= 0, at most 6 decimals"}
# A worker's orders ride on every answer that can carry them (heartbeat, claim,
# a result with claim_next), so it hears of a cancel or a drain on whichever
# call comes first; they mean the same on each (proxy/workers.py, Orders).
ORDER_CANCEL = {"type": "array", "items": {"type": "string"},
                "description": "jobs this worker holds whose owner asked to cancel them: stop "
                               "each, and post its result as cancelled"}
ORDER_DRAIN = {"type": "boolean",
               "description": "true while the worker is draining: finish the jobs it holds, "
                              "claim no new ones"}
CLAIMED_JOBS = {"type": "array", "items": {"$ref": "#/components/schemas/ClaimedJob"},
                "description": "jobs now leased to this worker (state running, this attempt)"}

# Why a queued job waits (proxy/waiting.py), in its order of precedence.
WAITING_REASONS = {
    "starting": "reserved for a worker, which takes it at its next claim",
    "retry_backoff": "its last try failed retryably; the next waits out its back-off (retry_at)",
    "vm_booting": "no live worker can take it; the scaler is booting a VM that can",
    "no_workers": "the cluster has no live worker",
    "no_capable_worker": "no live worker has its image, CPUs, memory or GPUs",
    "draining": "the only workers that can run it are draining",
    "max_running": "its owner's running jobs are at their max_running limit",
    "fair_share": "other users' jobs get the next slots by fair share",
    "free_slot": "next in its owner's turn, waiting for a slot to free",
    "dependency": "a job it runs after (`after`) has not succeeded yet",
    "array_cap": "its job array has as many jobs running or starting as its %N cap allows",
}

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
                "requirements": {"type": ["object", "null"], "description": "the normalised "
                                 "requirements.txt (sha256, size) installed before the script"},
                "attempt": {"type": "integer"}, "worker_id": {"type": ["string", "null"]},
                "env_names": {"type": "array", "items": {"type": "string"},
                              "description": "the names of the job's own environment variables; "
                                             "their values: GET /api/v1/jobs/{job_id}/env (owner)"},
                "array": {"type": ["object", "null"], "description": "the job array it belongs "
                          "to: {id, index, params (its row, or null), links}; null: a lone job"},
                "retry_policy": {"oneOf": [{"type": "null"},
                                           {"$ref": "#/components/schemas/RetryPolicy"}]},
                "try": {"type": "integer", "minimum": 1,
                        "description": "its try under its retry policy (JOBCLOUD_TRY); a lost "
                                       "worker's rerun keeps the number, `attempt` counts it"},
                "tries": {"oneOf": [{"type": "null"}, {"type": "array", "items": {
                    "$ref": "#/components/schemas/Try"}}],
                          "description": "every try, oldest first; given where one job is read "
                                         "(GET /api/v1/jobs/{id}, its submission), null in lists"},
                "cancel_requested": {"type": "boolean"},
                "submitted_at": {"type": "string"}, "started_at": {"type": ["string", "null"]},
                "finished_at": {"type": ["string", "null"]},
                "exit_code": {"type": ["integer", "null"]},
                "failure_reason": {"type": ["string", "null"]},
                "waiting": {"oneOf": [{"type": "null"}, {"$ref": "#/components/schemas/Waiting"}],
                            "description": "why a queued job waits and when it may start; "
                                           "given where one job is read (GET /api/v1/jobs/{id}, "
                                           "its submission, its event stream), null in lists "
                                           "and once the job runs"},
                "capacity_note": {"type": ["string", "null"],
                                  "description": "why the job was accepted although no live "
                                                 "worker or scaler VM shape was known to run it: "
                                                 "no capacity was known at all (a fresh "
                                                 "cluster), or queue_unmet_capacity is on"},
                "outputs": {"oneOf": [{"type": "null"}, {"$ref": "#/components/schemas/JobOutputs"}]},
                "usage": {"type": "object", "description": "cpu_seconds, peak_memory_bytes, "
                          "wall_seconds, gpu_seconds as the worker reported them, bounded by what "
                          "the lease allowed; clamped: the fields that were over and were "
                          "bounded; env_build_s and env_cached: building the requirements' "
                          "environment (seconds, apart from wall_seconds) and whether the "
                          "worker had it cached (null without requirements)"},
                "usage_all_tries": {"type": ["object", "null"], "description": "`usage` is the "
                                    "last try's; this sums every try's (tries: how many; "
                                    "peak_memory_bytes: the highest), and `cost` prices them "
                                    "all; given where `tries` is, null in lists"},
                "disk_full": {"type": "boolean",
                              "description": "the job filled its disk quota (resources.disk_mb)"},
                "pinned": {"type": "boolean", "description": "its owner pinned it: its files and "
                           "logs are kept past the retention time"},
                "outputs_expired": {"type": "boolean", "description": "its script, dataset, "
                                    "outputs and logs were deleted by retention (downloads: 410)"},
                "expired_at": {"type": ["string", "null"]},
                "warnings": {"type": "array", "items": {"type": "string"},
                             "description": "what the outputs lack (files left out, a full "
                                            "disk), as the job page and `jobcloud fetch` show it"},
                "cost": {"oneOf": [{"type": "null"}, {"$ref": "#/components/schemas/Cost"}]},
                "webhook": {"type": ["object", "null"], "description": "URL and delivery state"},
                "links": {"type": "object"},
                "parents": {"type": "array", "items": {"$ref": "#/components/schemas/RelatedJob"},
                            "description": "the jobs it runs after (`after`; the first 100), "
                                           "with the directory their outputs are in "
                                           "(input_dir); given where one job is read "
                                           "(GET /api/v1/jobs/{id}, its submission)"},
                "children": {"type": "array", "items": {"$ref": "#/components/schemas/RelatedJob"},
                             "description": "the jobs that run after it (the first 100)"},
                "parents_total": {"type": "integer", "description": "how many it runs after "
                                  "(parents lists the first 100)"},
                "children_total": {"type": "integer", "description": "how many run after it"}}},
    "JobArray": {"type": "object", "required": ["id", "size", "counts", "jobs", "done"],
                 "properties": {
        "id": {"type": "string"}, "owner": {"type": "string"}, "name": {"type": "string"},
        "spec": {"type": "string", "description": "the range as submitted, or the params file's name"},
        "size": {"type": "integer"},
        "max_running": {"type": ["integer", "null"], "description": "the %K cap; null: none"},
        "params": {"type": ["string", "null"], "description": "the parameters file's name"},
        "submitted_at": {"type": "string"},
        "counts": {"type": "object", "description": "jobs per state (every state)",
                   "additionalProperties": {"type": "integer"}},
        "done": {"type": "boolean", "description": "none queued or running"},
        "jobs": {"type": "array", "description": "a page of its jobs by index (?after, ?limit)",
                 "items": {"type": "object", "properties": {
                     "index": {"type": "integer"}, "id": {"type": "string"},
                     "state": {"type": "string"}, "exit_code": {"type": ["integer", "null"]},
                     "started_at": {"type": ["string", "null"]},
                     "finished_at": {"type": ["string", "null"]},
                     "has_outputs": {"type": "boolean"}}}},
        "next": {"type": ["string", "null"], "description": "the next page of jobs"},
        "cancelled": {"type": "integer", "description": "cancel all only: queued jobs cancelled"},
        "stopping": {"type": "integer", "description": "cancel all only: running jobs told to stop"},
        "links": {"type": "object"}}},
    "RetryPolicy": {"type": "object", "required": ["retries", "exit_codes", "backoff_s",
                                                    "backoff_max_s", "used"], "properties": {
        "retries": {"type": "integer", "description": "policy retries allowed"},
        "exit_codes": {"type": ["array", "null"], "items": {"type": "integer"},
                       "description": "exit codes that count as retryable; null: any non-zero "
                                      "exit but an OOM kill (never a timeout or a cancel)"},
        "backoff_s": {"type": "integer", "description": "the k-th retry waits "
                      "min(backoff_s * 2^(k-1), backoff_max_s)"},
        "backoff_max_s": {"type": "integer"}, "used": {"type": "integer"}}},
    "Try": {"type": "object", "required": ["try", "attempt", "outcome", "state", "exit_code",
                                           "started_at", "ended_at", "logs"], "properties": {
        "try": {"type": "integer"}, "attempt": {"type": "integer"},
        "outcome": {"type": "string", "enum": ["retried", "worker_lost", "final", "running"],
                    "description": "retried: a policy retry followed; worker_lost: its worker "
                                   "was lost (the same try was requeued, or the job failed); "
                                   "final: it ended the job; running: it runs now"},
        "state": {"type": ["string", "null"]}, "exit_code": {"type": ["integer", "null"]},
        "failure_reason": {"type": ["string", "null"]},
        "started_at": {"type": ["string", "null"]}, "ended_at": {"type": ["string", "null"]},
        "retry_at": {"type": ["string", "null"], "description": "retried: when the next try "
                     "could start at the earliest (its back-off)"},
        "usage": {"type": "object"},
        "logs": {"type": "object", "description": "stdout and stderr: this try's logs "
                 "(GET /api/v1/jobs/{id}/logs?attempt=N)"}}},
    "RelatedJob": {"type": "object", "required": ["id", "name", "state"], "properties": {
        "id": {"type": "string"}, "name": {"type": "string"}, "state": {"type": "string"},
        "input_dir": {"type": "string", "description": "a parent's outputs, in the child"},
        "links": {"type": "object"}}},
    "Waiting": {"type": "object", "required": ["reason", "detail", "position", "estimate"],
                "properties": {
        "reason": {"type": "string", "enum": list(WAITING_REASONS), "description": "; ".join(
            f"{code}: {text}" for code, text in WAITING_REASONS.items())},
        "detail": {"type": "string", "description": "the reason as a sentence"},
        "position": {"type": ["object", "null"], "description": "its place in the queue in the "
                     "order slots are handed out (fair share), and among its owner's queued jobs",
                     "properties": {"overall": {"type": "integer"}, "yours": {"type": "integer"}}},
        "estimate": {"type": ["object", "null"], "description": "an estimated start, from the "
                     "running jobs' time limits and recent runtimes (or VM boot times); null "
                     "when nothing can be said (no worker can run it yet)", "properties": {
                         "earliest": {"type": "string"}, "latest": {"type": "string"},
                         "is_estimate": {"type": "boolean"}, "basis": {"type": "string"}}},
        "resource": {"type": "string", "description": "no_capable_worker: what no live worker has "
                     "(image, cpus, memory_mb, gpus, or combination)"},
        "worker": {"type": ["string", "null"], "description": "starting: the worker's name"},
        "parents": {"type": "array", "description": "dependency: the parents not succeeded yet "
                    "(id, state; the first 20)", "items": {"type": "object"}},
        "retry_at": {"type": "string", "description": "retry_backoff: when its back-off ends"},
        "vm": {"type": "object", "description": "vm_booting: name, booting_since, typical_boot_s"}}},
    "JobOutputs": {"type": "object", "required": ["sha256", "size"], "properties": {
        "sha256": {"type": "string"}, "size": {"type": "integer"},
        "files": {"type": ["integer", "null"], "description": "files in the archive"},
        "left_out": {"type": ["integer", "null"],
                     "description": "files of the job's output directory not in the archive"},
        "left_out_bytes": {"type": ["integer", "null"]},
        "left_out_reasons": {"type": ["object", "null"], "description": "count by reason",
                             "properties": {r: {"type": "integer"} for r in LEFT_OUT_REASONS}},
        "manifest": {"type": ["string", "null"],
                     "description": "the archive member listing the files left out"}}},
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
    "ClaimedJob": {"type": "object", "required": [
        "id", "attempt", "name", "image", "cpus", "memory_mb", "timeout_s", "gpus", "script",
        "dataset"], "properties": {
        "id": {"type": "string"}, "attempt": {"type": "integer"}, "name": {"type": "string"},
        "try": {"type": "integer", "description": "its try under its retry policy: the job's "
                "JOBCLOUD_TRY"},
        "image": {"type": "string"}, "cpus": {"type": "number"}, "memory_mb": {"type": "integer"},
        "timeout_s": {"type": "integer"}, "gpus": {"type": "integer"},
        "disk_mb": {"type": ["integer", "null"],
                    "description": "the job's disk quota in MiB; null: the worker's default"},
        "script": {"$ref": "#/components/schemas/JobInput"},
        "env": {"type": "object", "additionalProperties": {"type": "string"},
                "description": "the job's own environment variables: set in its container "
                               "under the worker's own (JOBCLOUD_*, HOME, the thread limits)"},
        "dataset": {"type": ["object", "null"], "description": "a JobInput, or null: no dataset"},
        "array": {"type": ["object", "null"], "description": "its job array: {id, index, params "
                  "(the parameters row, or null)}, for JOBCLOUD_ARRAY_ID, JOBCLOUD_ARRAY_INDEX, "
                  "JOBCLOUD_PARAMS and /job/input/params.json; null: a lone job"},
        "after": {"type": "array", "description": "the parents whose outputs the job reads, "
                  "read-only at /job/input/after/<name>/ (name: a safe path component)",
                  "items": {"type": "object", "required": ["id", "name", "outputs"], "properties": {
                      "id": {"type": "string"}, "name": {"type": "string"},
                      "outputs": {"type": ["object", "null"],
                                  "description": "a JobInput (the parent's output zip), or null: "
                                                 "it left no outputs"}}}},
        "requirements": {"type": ["object", "null"],
                         "description": "a JobInput (the normalised requirements.txt), or null"},
        "package_index_url": {"type": "string",
                              "description": "the index to download the requirements' wheels from"},
        "outputs_upload": {"type": "string", "enum": ["direct", "proxy"],
                           "description": "direct: PUT the output archive to the S3 store "
                                          "(outputs-upload) and name it in the JSON result; "
                                          "proxy: post it with the result (multipart)"}}},
    "JobEnv": {"type": "object", "required": ["job_id", "env"], "properties": {
        "job_id": {"type": "string"},
        "env": {"type": "object", "additionalProperties": {"type": "string"},
                "description": "the job's own environment variables, names to values"}}},
    "JobInput": {"type": "object", "required": ["sha256", "size", "url"], "properties": {
        "sha256": {"type": "string"}, "size": {"type": "integer"},
        "url": {"type": "string", "description": "where this worker downloads it, while it holds the job"},
        "direct_url": {"type": "string", "description": "with the S3 blob store: a presigned URL "
                       "to GET it from the store itself, without credentials, for "
                       "blob_presign_ttl_s; once refused (expired), `url` answers 307 to a "
                       "fresh one"}}},
    # The worker's answers (worker/protocol.py reads each into one dataclass).
    "RegisterAnswer": {"type": "object", "required": [
        "worker_id", "secret", "heartbeat_interval_s", "lease_timeout_s"], "properties": {
        "worker_id": {"type": "string"},
        "secret": {"type": "string", "description": "the worker's bearer secret (jcw_...), shown once"},
        "heartbeat_interval_s": {"type": "number", "description": "how often to heartbeat"},
        "lease_timeout_s": {"type": "number",
                            "description": "a worker silent this long is lost, its jobs requeued"}}},
    "HeartbeatAnswer": {"type": "object", "required": ["cancel", "unknown", "drain"], "properties": {
        "cancel": ORDER_CANCEL, "drain": ORDER_DRAIN,
        "unknown": {"type": "array", "items": {"type": "string"},
                    "description": "jobs the heartbeat listed as running that this worker no "
                                   "longer holds (requeued, given up): stop them, post no result"}}},
    "ClaimAnswer": {"type": "object", "required": ["jobs", "cancel", "drain"], "properties": {
        "jobs": CLAIMED_JOBS, "cancel": ORDER_CANCEL, "drain": ORDER_DRAIN}},
    "ResultAnswer": {
        "type": "object", "required": ["job_id", "state", "applied"],
        "description": "With claim_next > 0 in the result, also the claim's answer: `jobs`, "
                       "`cancel` and `drain`, all three, meaning what they mean in ClaimAnswer",
        "properties": {
            "job_id": {"type": "string"},
            "state": {"type": "string", "description": "the job's state after this result"},
            "applied": {"type": "boolean", "description": "false: a duplicate of a result "
                        "already recorded, or the job was already final"},
            "jobs": CLAIMED_JOBS, "cancel": ORDER_CANCEL, "drain": ORDER_DRAIN},
        # All three or none: they come together, from the same claim.
        "dependentRequired": {"jobs": ["cancel", "drain"], "cancel": ["jobs", "drain"],
                              "drain": ["jobs", "cancel"]}},
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
        "disk_full": {"type": "boolean", "description": "the job filled its disk quota"},
        "outputs_upload": {"type": ["object", "null"], "required": ["sha256", "size"],
                           "description": "the output archive PUT to the S3 store "
                                          "(outputs-upload), checked before the result is taken",
                           "properties": {"sha256": {"type": "string"},
                                          "size": {"type": "integer", "minimum": 1}}},
        "env_build_s": {**USAGE, "description": "seconds building the requirements' environment"},
        "env_cached": {"type": ["boolean", "null"],
                       "description": "the requirements' environment was cached on the worker"},
        "outputs": {"type": ["object", "null"], "description": "what the archive holds and "
                    "what was left out of it, by reason", "properties": {
                        "files": {"type": "integer"}, "bytes": {"type": "integer"},
                        "left_out": {"type": "integer"}, "left_out_bytes": {"type": "integer"},
                        "reasons": {"type": "object", "additionalProperties": False, "properties": {
                            r: {"type": "integer", "minimum": 0} for r in LEFT_OUT_REASONS}}}},
        "claim_next": {"type": "integer", "minimum": 0, "maximum": 64,
                       "description": "also claim up to this many jobs: the answer then carries "
                                      "`jobs`, `cancel` and `drain`, as a claim's does"}}},
    "Limits": {"type": "object", "required": ["user", "weight"], "properties": {
        "user": {"type": "string"}, "weight": {"type": "number"},
        **{name: {"type": ["number", "null"]} for name in (
            "max_running", "max_queued", "max_submissions_per_minute", "max_cpus",
            "max_memory_mb", "max_gpus", "max_timeout_s", "max_disk_mb", "retention_days",
            "max_storage_mb")}}},
    "LimitChanges": {"type": "object", "additionalProperties": False, "properties": {
        "weight": {"type": ["number", "null"], "minimum": 0.01, "maximum": 1e9},
        "max_cpus": {"type": ["number", "null"], "minimum": 0.1, "maximum": 1e9},
        **{name: {"type": ["integer", "null"], "minimum": low, "maximum": 1e9} for name, low in (
            ("max_running", 0), ("max_queued", 0), ("max_submissions_per_minute", 0),
            ("max_memory_mb", 6), ("max_gpus", 0), ("max_timeout_s", 1), ("max_disk_mb", 1),
            ("retention_days", 1), ("max_storage_mb", 0))}}},
    "Worker": {"type": "object", "properties": {
        "id": {"type": "string"}, "name": {"type": "string"}, "state": {"type": "string"},
        "slots": {"type": "integer"}, "running": {"type": ["integer", "null"]},
        "usage_clamped": {"type": ["integer", "null"], "description": "results of this worker "
                          "whose usage was beyond what its lease allowed, and was clamped"}}},
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
                "vm_name": {"type": ["string", "null"], "maxLength": 64}}}},
        "shapes": {"type": "array", "maxItems": 20, "description": "the worker shapes the scaler "
                   "can create (replacing the last list; a shape not reported for 10 minutes is "
                   "gone): the proxy refuses jobs no live worker and no shape can run", "items": {
                       "type": "object", "required": ["cpus", "memory_mb", "gpus", "images"],
                       "properties": {
                           "cpus": {"type": "number", "exclusiveMinimum": 0, "maximum": 4096},
                           "memory_mb": {"type": "integer", "minimum": 1, "maximum": 2**26},
                           "gpus": {"type": "integer", "minimum": 0, "maximum": 1024},
                           "images": {"type": "array", "minItems": 1, "maxItems": 100,
                                      "items": {"type": "string"}}}}}}},

    # Usage, cost, prices and webhooks (issue #5).
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
