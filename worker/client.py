"""HTTP client for the worker protocol (see the proxy's /api/v1/openapi.json).

The worker opens connections to the proxy, and, when the proxy keeps blobs in
an S3 store, to the presigned URLs the proxy hands out (inputs by GET, the
output archive by PUT): those carry their own signature and are sent without
any credential, never the worker secret, and only their path is ever logged
or put in an error (the query string is the signature). Transport errors and
error answers are translated here into `ProtocolError` subclasses
(worker/errors.py); the answers the worker acts on come back as the typed
answers of worker/protocol.py, never as raw dicts.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import requests

from .errors import (LeaseLost, MalformedAnswer, OutputsRefused, ProtocolError, ProxyUnreachable,
                     StoreRefused, StoreUnreachable)
from .inputs import sha256_of
from .protocol import (OUTPUTS_DIRECT, OUTPUTS_VIA_PROXY, ClaimAnswer, HeartbeatAnswer,
                       RegisterAnswer, ResultAnswer, UploadTicket)

# The exceptions are defined in worker/errors.py (the one hierarchy) and
# imported from here by callers that think of them as the client's.
__all__ = ["WorkerClient", "Archive", "ProtocolError", "ProxyUnreachable", "LeaseLost",
           "MalformedAnswer", "StoreRefused", "StoreUnreachable", "OutputsRefused"]

log = logging.getLogger(__name__)


# The proxy's error codes for "this worker does not hold that job (any more)";
# other 404s on a job call (a job without a dataset) are not about the lease.
LEASE_LOST_CODES = ("no_lease", "stale_lease", "job_not_found")

# What a proxy answers while it restarts or sits behind a gateway that lost it:
# worth another try. Any other error answer to a download is the proxy's last word.
TRANSIENT_STATUSES = (502, 503, 504)

# An input route's answer when the blob is in the S3 store: a redirect to a
# fresh presigned URL (the proxy answers 307; any redirect is followed once).
REDIRECTS = (301, 302, 303, 307, 308)

# The proxy's refusals of a direct upload's result, about the archive itself
# (proxy/worker_api.py): the outputs cannot be delivered, whoever retries.
OUTPUTS_REFUSALS = ("too_large", "outputs_missing", "outputs_mismatch", "invalid_outputs")

CHUNK = 1024 * 1024


@dataclass(frozen=True)
class Archive:
    """A job's output archive as a direct upload announces it: the file, and
    the sha256 and size the store must find (computed once, whatever the
    number of tries)."""
    path: Path
    sha256: str
    size: int

    @classmethod
    def of(cls, path) -> Archive:
        return cls(Path(path), sha256_of(path), os.path.getsize(path))


class WorkerClient:
    """One worker's session with the proxy.

    Args:
        base_url: the proxy, e.g. http://127.0.0.1:3000
        secret: the worker secret from `register`, if already registered.
    """

    def __init__(self, base_url: str, secret: str | None = None, timeout: float = 30.0,
                 session: requests.Session | None = None,
                 store_session: requests.Session | None = None):
        self.base_url = base_url.rstrip("/")
        self.secret = secret
        self.worker_id: str | None = None
        self.timeout = timeout
        self.http = session or requests.Session()
        # Its own session: the presigned URLs' hosts are not the proxy's.
        self.store = store_session or requests.Session()

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

    def download(self, url: str, dest, direct_url: str | None = None) -> None:
        """Stream one of a held job's inputs (an input of the claim) to `dest`.

        From the object store by the claim's `direct_url` when it has one; by
        the proxy's `url` when it has none, or when the store refuses it
        (expired, denied): the proxy then streams the bytes (local store) or
        redirects to a fresh presigned URL, fetched without credentials. The
        caller checks the bytes against the claim's sha256 (worker/inputs.py).

        Raises:
            ProxyUnreachable: the proxy could not be reached, answered 502/503/504,
                or the body was cut off (a proxy restarting): another run may
                succeed. StoreUnreachable (a subclass): the same of the store.
            LeaseLost: this worker no longer holds the job.
            ProtocolError: any other error answer (a 500, a missing dataset), or
                the store refusing the URL the proxy just gave (StoreRefused):
                the input cannot be had, whoever tries.
        """
        if direct_url:
            try:
                self._fetch_from_store(direct_url, dest)
                return
            except StoreRefused as e:
                log.info("%s; asking the proxy for the input instead", e)
        try:
            response = self._send("GET", url, stream=True, allow_redirects=False)
        except ProxyUnreachable as e:
            if e.status is None or e.status in TRANSIENT_STATUSES:
                raise
            raise ProtocolError(f"download of {url}: {e}", status=e.status) from e
        if response.status_code in REDIRECTS:
            location = response.headers.get("Location")
            response.close()
            if not location:
                raise MalformedAnswer(f"download of {url}: a redirect without a Location",
                                      status=response.status_code)
            self._fetch_from_store(urljoin(self.base_url + url, location), dest)
            return
        _save(response, dest, ProxyUnreachable, f"download of {url}")

    def append_log(self, job_id: str, attempt: int, stream: str, offset: int, data: str) -> dict:
        return self._call("POST", f"/api/v1/worker/jobs/{job_id}/logs", json={
            "attempt": attempt, "stream": stream, "offset": offset, "data": data})

    def post_result(self, job_id: str, result: dict, outputs: Path | Archive | None = None, *,
                    upload: str = OUTPUTS_VIA_PROXY) -> ResultAnswer:
        """Post a held job's final result, with its outputs archive if any.

        Args:
            result: the result document; a `claim_next` > 0 in it asks for that
                many successors in the same round trip (answered as `.claim`).
            outputs: the output archive (an Archive: its sha256 already known).
            upload: the claim's `outputs_upload`. "proxy": the archive goes in
                the result's multipart body. "direct": it goes to the object
                store by a presigned PUT first (a URL refused as expired is
                asked for again, once), then the result is posted as JSON
                naming its sha256 and size, which the proxy checks against
                what the store holds.
        Raises:
            ProxyUnreachable: worth another try (StoreUnreachable: the store).
            LeaseLost: this worker no longer holds the job.
            OutputsRefused: the archive could not be delivered (direct uploads):
                the store refused its bytes, or the proxy refused the upload or
                what arrived; post the result without outputs instead.
            ProtocolError: the result was refused.
            MalformedAnswer: the result was taken, but the answer does not
                match the protocol.
        """
        path = f"/api/v1/worker/jobs/{job_id}/result"
        if outputs is None:
            return ResultAnswer.from_json(self._call("POST", path, json=result))
        if upload == OUTPUTS_DIRECT:
            archive = outputs if isinstance(outputs, Archive) else Archive.of(outputs)
            self._upload_outputs(job_id, result["attempt"], archive)
            announced = dict(result, outputs_upload={"sha256": archive.sha256, "size": archive.size})
            with _outputs_refused("the proxy refused the uploaded output archive"):
                return ResultAnswer.from_json(self._call("POST", path, json=announced))
        outputs_path = outputs.path if isinstance(outputs, Archive) else outputs
        with open(outputs_path, "rb") as f:
            return ResultAnswer.from_json(self._call("POST", path, files={
                "result": (None, json.dumps(result), "application/json"),
                "outputs": ("outputs.zip", f, "application/zip")}))

    def outputs_upload(self, job_id: str, attempt: int, archive: Archive) -> UploadTicket:
        """Ask where to PUT a held job's output archive (its sha256 and size announced).

        Raises:
            ProxyUnreachable: worth another try.
            LeaseLost: this worker no longer holds the job.
            OutputsRefused: the archive is over the proxy's max_output_bytes.
            ProtocolError: refused otherwise.
            MalformedAnswer: the answer does not match the protocol.
        """
        with _outputs_refused("the proxy refused the output archive"):
            answer = self._call("POST", f"/api/v1/worker/jobs/{job_id}/outputs-upload", json={
                "attempt": attempt, "sha256": archive.sha256, "size": archive.size})
        return UploadTicket.from_json(answer)

    def deregister(self) -> dict:
        return self._call("POST", "/api/v1/worker/deregister")

    # ----------------------------------------------------------- object store

    def _upload_outputs(self, job_id: str, attempt: int, archive: Archive) -> None:
        """PUT the archive to the presigned URL the proxy gives; a URL refused
        as expired (403: a slow start, a clock ahead of the store's) is asked
        for once more."""
        for ask in (1, 2):
            ticket = self.outputs_upload(job_id, attempt, archive)
            try:
                with open(archive.path, "rb") as f:
                    # A file object: requests streams it, with its size as Content-Length.
                    self._store_request(ticket.method, ticket.url, data=f,
                                        headers=ticket.headers).close()
                log.info("job %s: outputs (%d bytes) uploaded to %s", job_id, archive.size,
                         _path_of(ticket.url))
                return
            except StoreRefused as e:
                if e.status == 403 and ask == 1:
                    log.info("job %s: %s; asking for a fresh upload URL", job_id, e)
                    continue
                raise OutputsRefused(f"the object store refused the output archive: {e}",
                                     status=e.status, code=e.code) from None

    def _fetch_from_store(self, url: str, dest) -> None:
        _save(self._store_request("GET", url, stream=True), dest, StoreUnreachable,
              f"download of {_path_of(url)} from the object store")

    def _store_request(self, method: str, url: str, **kwargs) -> requests.Response:
        """One request to a presigned URL, without credentials.

        Raises:
            StoreUnreachable: a transport error or a 5xx.
            StoreRefused: any other answer but a 2xx (the store's error code in it).
        """
        where = _path_of(url)
        try:
            response = self.store.request(method, url, auth=_without_credentials,
                                          timeout=self.timeout, allow_redirects=False, **kwargs)
        except requests.RequestException as e:
            # requests' messages quote the URL, signature and all.
            raise StoreUnreachable(f"cannot reach the object store for {where}: "
                                   f"{_scrub(str(e))}") from None
        if response.status_code >= 500:
            response.close()
            raise StoreUnreachable(f"the object store answered {response.status_code} for {where}",
                                   status=response.status_code)
        if response.status_code >= 300:
            code, message = _store_error(response)
            raise StoreRefused(f"the object store refused {method} {where}: "
                               f"{response.status_code} {code}: {message}",
                               status=response.status_code, code=code)
        return response

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


# ------------------------------------------------------------------- helpers

@contextlib.contextmanager
def _outputs_refused(what: str):
    """The proxy's refusals of an output archive (OUTPUTS_REFUSALS) as OutputsRefused."""
    try:
        yield
    except ProtocolError as e:
        if isinstance(e, LeaseLost) or e.code not in OUTPUTS_REFUSALS:
            raise
        raise OutputsRefused(f"{what}: {e}", status=e.status, code=e.code) from None


def _save(response: requests.Response, dest, cut_off: type[ProxyUnreachable], what: str) -> None:
    """Stream a body to `dest`; a cut mid-body is raised as `cut_off` (transient)."""
    try:
        with open(dest, "wb") as f:
            for chunk in response.iter_content(CHUNK):
                f.write(chunk)
    except requests.RequestException as e:
        # The body is read here, outside the request: a cut mid-body (ChunkedEncodingError,
        # a short Content-Length) is as transient as a refused connection.
        raise cut_off(f"{what} cut off: {_scrub(str(e))}") from None
    finally:
        response.close()  # a half-read body must not go back to the pool


def _without_credentials(request: requests.PreparedRequest) -> requests.PreparedRequest:
    """requests' auth hook for presigned URLs: no Authorization header, whatever
    the session or a ~/.netrc would add (the signature is in the URL, and S3
    refuses a request that carries two)."""
    request.headers.pop("Authorization", None)
    return request


def _path_of(url: str) -> str:
    """A presigned URL without its query string (the signature): what may be logged."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


def _scrub(text: str) -> str:
    """`text` without any URL's query string: requests quotes the URL it was
    given in its errors, and a presigned URL's query is its signature."""
    return _QUERY.sub("?<signature>", text)


_QUERY = re.compile(r"\?[^\s'\")]+")


_XML_FIELD = re.compile(r"<(Code|Message)>([^<]{0,300})</\1>")


def _store_error(response: requests.Response) -> tuple[str, str]:
    """The S3 error document's Code and Message, e.g. ("AccessDenied", "Request has expired")."""
    try:
        # At most the start of it: an error document is small, whatever a body says.
        head = next(response.iter_content(4096), b"").decode("utf-8", "replace")
        found = dict(_XML_FIELD.findall(head))
    except requests.RequestException:
        found = {}
    finally:
        response.close()
    return found.get("Code", "http_error"), found.get("Message", "")
