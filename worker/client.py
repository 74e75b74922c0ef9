"""HTTP client for the worker protocol (see the proxy's /api/v1/openapi.json).

The worker only ever opens connections to the proxy. Transport errors and
error answers are translated here into `ProtocolError` subclasses
(worker/errors.py); the answers the worker acts on come back as the typed
answers of worker/protocol.py, never as raw dicts.
"""
from __future__ import annotations

import json

import requests

from .errors import LeaseLost, MalformedAnswer, ProtocolError, ProxyUnreachable
from .protocol import ClaimAnswer, HeartbeatAnswer, RegisterAnswer, ResultAnswer

# The exceptions are defined in worker/errors.py (the one hierarchy) and
# imported from here by callers that think of them as the client's.
__all__ = ["WorkerClient", "ProtocolError", "ProxyUnreachable", "LeaseLost", "MalformedAnswer"]


# The proxy's error codes for "this worker does not hold that job (any more)";
# other 404s on a job call (a job without a dataset) are not about the lease.
LEASE_LOST_CODES = ("no_lease", "stale_lease", "job_not_found")

# What a proxy answers while it restarts or sits behind a gateway that lost it:
# worth another try. Any other error answer to a download is the proxy's last word.
TRANSIENT_STATUSES = (502, 503, 504)


class WorkerClient:
    """One worker's session with the proxy.

    Args:
        base_url: the proxy, e.g. http://127.0.0.1:3000
        secret: the worker secret from `register`, if already registered.
    """

    def __init__(self, base_url: str, secret: str | None = None, timeout: float = 30.0,
                 session: requests.Session | None = None):
        self.base_url = base_url.rstrip("/")
        self.secret = secret
        self.worker_id: str | None = None
        self.timeout = timeout
        self.http = session or requests.Session()

    # ---------------------------------------------------------------- protocol

    def register(self, enrollment_token: str, name: str, *, cpus: float, memory_mb: int,
                 gpus: int, slots: int, images: list[str], disk_mb: int | None = None
                 ) -> RegisterAnswer:
        """Register with an enrollment token, or rejoin with this worker's own
        secret after the proxy answered "worker_lost"; later calls use the
        (new) secret it answers.

        Raises:
            ProxyUnreachable: worth another try.
            ProtocolError: the token or the capacity was refused.
            MalformedAnswer: the answer does not match the protocol.
        """
        answer = RegisterAnswer.from_json(self._call(
            "POST", "/api/v1/workers/register", token=enrollment_token, json={
                "name": name, "cpus": cpus, "memory_mb": memory_mb, "gpus": gpus, "slots": slots,
                "images": images, "disk_mb": disk_mb}))
        self.secret, self.worker_id = answer.secret, answer.worker_id
        return answer

    def heartbeat(self, running: list[str]) -> HeartbeatAnswer:
        """Say which jobs run here (their leases are extended); returns the proxy's orders.

        Raises:
            ProxyUnreachable: worth another try.
            ProtocolError: refused (code "worker_lost": register again).
            MalformedAnswer: the answer does not match the protocol.
        """
        return HeartbeatAnswer.from_json(
            self._call("POST", "/api/v1/worker/heartbeat", json={"running": running}))

    def claim(self, max_jobs: int = 1, wait_s: float = 0) -> ClaimAnswer:
        """Lease up to `max_jobs` jobs, waiting up to `wait_s` for one to be queued.

        Returns:
            the leased jobs, with the proxy's cancel and drain orders.
        Raises:
            ProxyUnreachable: worth another try.
            ProtocolError: refused (code "worker_lost": register again).
            MalformedAnswer: the answer does not match the protocol.
        """
        return ClaimAnswer.from_json(self._call(
            "POST", "/api/v1/worker/claim", json={"max_jobs": max_jobs, "wait_s": wait_s},
            timeout=self.timeout + wait_s))

    def download(self, url: str, dest) -> None:
        """Stream one of a held job's inputs (script or dataset url from the claim) to `dest`.

        Raises:
            ProxyUnreachable: the proxy could not be reached, answered 502/503/504,
                or the body was cut off (a proxy restarting): another run may succeed.
            LeaseLost: this worker no longer holds the job.
            ProtocolError: any other error answer (a 500, a missing dataset): the
                input cannot be had, whoever tries.
        """
        try:
            response = self._send("GET", url, stream=True)
        except ProxyUnreachable as e:
            if e.status is None or e.status in TRANSIENT_STATUSES:
                raise
            raise ProtocolError(f"download of {url}: {e}", status=e.status) from e
        try:
            with open(dest, "wb") as f:
                for chunk in response.iter_content(1024 * 1024):
                    f.write(chunk)
        except requests.RequestException as e:
            # The body is read here, outside _send: a cut mid-body (ChunkedEncodingError,
            # a short Content-Length) is as transient as a refused connection.
            raise ProxyUnreachable(f"download of {url} cut off: {e}") from e
        finally:
            response.close()  # a half-read body must not go back to the pool

    def append_log(self, job_id: str, attempt: int, stream: str, offset: int, data: str) -> dict:
        return self._call("POST", f"/api/v1/worker/jobs/{job_id}/logs", json={
            "attempt": attempt, "stream": stream, "offset": offset, "data": data})

    def post_result(self, job_id: str, result: dict, outputs_path=None) -> ResultAnswer:
        """Post a held job's final result, with its outputs archive if any.

        Args:
            result: the result document; a `claim_next` > 0 in it asks for that
                many successors in the same round trip (answered as `.claim`).
        Raises:
            ProxyUnreachable: worth another try.
            LeaseLost: this worker no longer holds the job.
            ProtocolError: the result was refused.
            MalformedAnswer: the result was taken, but the answer does not
                match the protocol.
        """
        path = f"/api/v1/worker/jobs/{job_id}/result"
        if outputs_path is None:
            return ResultAnswer.from_json(self._call("POST", path, json=result))
        with open(outputs_path, "rb") as f:
            return ResultAnswer.from_json(self._call("POST", path, files={
                "result": (None, json.dumps(result), "application/json"),
                "outputs": ("outputs.zip", f, "application/zip")}))

    def deregister(self) -> dict:
        return self._call("POST", "/api/v1/worker/deregister")

    # --------------------------------------------------------------- transport

    def _call(self, method: str, path: str, **kwargs):
        response = self._send(method, path, **kwargs)
        try:
            return response.json()
        except ValueError as e:  # requests' JSONDecodeError, whichever json it uses
            raise MalformedAnswer(f"{method} {path}: the answer is not JSON",
                                  status=response.status_code) from e

    def _send(self, method: str, path: str, token: str | None = None, timeout=None, **kwargs):
        headers = {"Authorization": f"Bearer {token or self.secret}"}
        try:
            response = self.http.request(method, self.base_url + path, headers=headers,
                                         timeout=timeout or self.timeout, **kwargs)
        except requests.RequestException as e:
            raise ProxyUnreachable(f"cannot reach the proxy at {self.base_url}: {e}") from e
        if response.status_code >= 500:
            response.close()
            raise ProxyUnreachable(f"the proxy answered {response.status_code}",
                                   status=response.status_code)
        if response.status_code >= 400:
            try:
                body = response.json()
            except ValueError:
                body = {"error": "http_error", "detail": response.text[:200]}
            lost = response.status_code in (404, 409) and body.get("error") in LEASE_LOST_CODES
            cls = LeaseLost if lost and "/jobs/" in path else ProtocolError
            raise cls(f"{body.get('error')}: {body.get('detail')}", status=response.status_code,
                      code=body.get("error"), secret=token or self.secret)
        return response
