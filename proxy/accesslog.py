"""gunicorn's access log for people's requests, not the worker protocol's.

Every worker registers, heartbeats every few seconds, long-polls for claims and
posts its jobs' log chunks and results: on `make run` that was 2,793 access-log
lines in 33 minutes for one idle worker, which buried the requests of the
people using the proxy. gunicorn_conf.py makes `WithoutWorkerProtocol` its
logger unless `access_log_worker_protocol` is set; everything else (pages, the
user and admin API, /metrics, /healthz) is logged exactly as gunicorn logs it.
"""
from __future__ import annotations

from gunicorn.glogging import Logger

# What a worker daemon calls (proxy/worker_api.py's routes; a test checks that
# every one of them is matched here and nothing else the app serves is).
WORKER_PROTOCOL_PREFIXES = ("/api/v1/worker/", "/api/v1/workers/register")


def is_worker_protocol(path: str) -> bool:
    return path.startswith(WORKER_PROTOCOL_PREFIXES)


class WithoutWorkerProtocol(Logger):
    """gunicorn's logger, whose access log leaves out the worker protocol."""

    def access(self, resp, req, environ, request_time):
        # req.path is the path as the request line sent it, before any
        # SCRIPT_NAME handling: what the worker's client asked for.
        if is_worker_protocol(req.path or ""):
            return
        super().access(resp, req, environ, request_time)
