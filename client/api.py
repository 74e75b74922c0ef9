"""An HTTP client for the jobcloud user API (/api/v1).

Every call goes through `Client._call`, the one place where requests'
transport errors and the proxy's ``{"error", "detail"}`` answers become
`client.errors` exceptions. Uploads stream from disk (`MultipartBody`), and
downloads stream to disk, so neither holds a dataset in memory.
"""
from __future__ import annotations

import os
import secrets
from typing import Callable, Iterator

import requests

from . import errors

# (connect, read) seconds. The read timeout bounds a silent proxy; a submit
# waits for the proxy to check and fsync a dataset of up to 2 GiB, hence longer.
TIMEOUT = (10, 60)
SUBMIT_TIMEOUT = (10, 600)
CHUNK = 256 * 1024

_BY_STATUS = {400: errors.BadRequest, 401: errors.NotLoggedIn, 403: errors.Forbidden,
              404: errors.NotFound, 409: errors.Conflict, 413: errors.TooLarge,
              415: errors.BadRequest}


class Client:
    """The user API of one proxy, authenticated with one API token."""

    def __init__(self, url: str, token: str, session: requests.Session | None = None):
        self.url = url.rstrip("/")
        self.session = session or requests.Session()
        self.session.headers.update({"Authorization": f"Bearer {token}",
                                     "Accept": "application/json",
                                     "User-Agent": "jobcloud-cli"})

    def me(self) -> dict:
        return self._call("GET", "/api/v1/me").json()

    def job(self, job_id: str) -> dict:
        return self._call("GET", f"/api/v1/jobs/{_seg(job_id)}").json()

    def jobs(self, limit: int = 50) -> list[dict]:
        """My most recent jobs, newest first (one page of at most `limit`)."""
        return self._call("GET", "/api/v1/jobs", params={"limit": limit}).json()["jobs"]

    def logs(self, job_id: str, stream: str = "stdout", offset: int = 0) -> dict:
        return self._call("GET", f"/api/v1/jobs/{_seg(job_id)}/logs",
                          params={"stream": stream, "offset": offset}).json()

    def cancel(self, job_id: str) -> dict:
        return self._call("POST", f"/api/v1/jobs/{_seg(job_id)}/cancel").json()

    def array(self, array_id: str, after: int | None = None, limit: int = 1000) -> dict:
        """A job array: counts per state and a page of its jobs by index."""
        params = {"limit": limit, **({"after": after} if after is not None else {})}
        return self._call("GET", f"/api/v1/arrays/{_seg(array_id)}", params=params).json()

    def cancel_array(self, array_id: str) -> dict:
        return self._call("POST", f"/api/v1/arrays/{_seg(array_id)}/cancel").json()

    def pin(self, job_id: str, pinned: bool = True) -> dict:
        """Keep the job's files past the retention time (pinned), or let them expire."""
        return self._call("POST" if pinned else "DELETE", f"/api/v1/jobs/{_seg(job_id)}/pin").json()

    def submit(self, body: "MultipartBody") -> dict:
        """POST a job; `body` streams the script and dataset from disk.

        Raises:
            TooLarge: a file is over the proxy's limit (the detail names it).
            BadRequest: a field or file was refused.
        """
        return self._call("POST", "/api/v1/jobs", data=body, timeout=SUBMIT_TIMEOUT,
                          headers={"Content-Type": body.content_type}).json()

    def download_outputs(self, job_id: str, dest) -> int:
        """Write the job's output zip to the binary file `dest`; returns its size."""
        return self._download(f"/api/v1/jobs/{_seg(job_id)}/outputs", dest)

    def download_array_outputs(self, array_id: str, dest) -> int:
        """Write every job's outputs of the array, one zip by index, to `dest`; returns its size."""
        return self._download(f"/api/v1/arrays/{_seg(array_id)}/outputs", dest)

    def _download(self, path: str, dest) -> int:
        response = self._call("GET", path, stream=True)
        size = 0
        with response:
            try:
                for chunk in response.iter_content(CHUNK):
                    dest.write(chunk)
                    size += len(chunk)
            except requests.RequestException as e:
                raise errors.Unreachable(f"the download from {self.url} broke off: {_reason(e)}") from None
        return size

    def _call(self, method: str, path: str, *, timeout=TIMEOUT, **kw) -> requests.Response:
        try:
            response = self.session.request(method, self.url + path, timeout=timeout, **kw)
        except requests.exceptions.InvalidURL as e:
            raise errors.ConfigInvalid(f"invalid proxy URL {self.url!r}: {e}") from None
        except requests.exceptions.MissingSchema:
            raise errors.ConfigInvalid(f"invalid proxy URL {self.url!r}: it needs http:// or https://") from None
        except requests.exceptions.Timeout:
            raise errors.Unreachable(f"cannot reach {self.url}: no answer in time") from None
        except requests.RequestException as e:
            raise errors.Unreachable(f"cannot reach {self.url}: {_reason(e)}") from None
        if response.status_code >= 400:
            raise _api_error(response)
        return response


def _api_error(response: requests.Response) -> errors.ApiError:
    status = response.status_code
    try:
        body = response.json()
        code, detail = str(body["error"]), str(body["detail"])
    except (ValueError, KeyError, TypeError):
        code = "http_error"
        detail = f"unexpected answer {status} {response.reason or ''}".strip()
    finally:
        response.close()
    if status == 401:
        return errors.NotLoggedIn(status, code, detail,
                                  "not logged in or token revoked: run jobcloud login")
    if status == 413 and code != "storage_quota_exceeded":   # the quota's detail says it all
        return errors.TooLarge(status, code, detail, f"upload too large: {detail}")
    if status >= 500:
        return errors.ServerError(status, code, detail, f"the proxy failed: {detail} ({status})")
    return _BY_STATUS.get(status, errors.ApiError)(status, code, detail, detail)


def _reason(e: Exception) -> str:
    text = str(e)
    if "Connection refused" in text:
        return "connection refused"
    if "Name or service not known" in text or "nodename nor servname" in text:
        return "unknown host"
    if "Connection reset" in text or "Broken pipe" in text or "RemoteDisconnected" in text:
        return "the connection was closed"
    return type(e).__name__


def _seg(job_id: str) -> str:
    """A job id as one URL path segment (ids are opaque; never let one add path components)."""
    return requests.utils.quote(job_id, safe="")


class MultipartBody:
    """A multipart/form-data body read from text fields and files on disk, chunk by chunk.

    requests sends it with a Content-Length (from `__len__`) instead of chunked
    encoding, reading it through `read(n)`; `on_progress(sent, total)` is called
    as bytes go out.
    """

    def __init__(self, fields: dict[str, str], files: dict[str, tuple[str, str, str]],
                 on_progress: Callable[[int, int], None] | None = None):
        """Args:
            fields: name -> text value.
            files: name -> (file name sent, path on disk, content type).
        """
        self.boundary = "jobcloud-" + secrets.token_hex(16)
        self.content_type = f"multipart/form-data; boundary={self.boundary}"
        # Bytes, or (path, size): a file's size is taken once, for the Content-Length.
        self._parts: list[bytes | tuple[str, int]] = []
        for name, value in fields.items():
            self._parts.append(self._head(name) + b"\r\n" + value.encode("utf-8") + b"\r\n")
        for name, (filename, path, ctype) in files.items():
            self._parts.append(self._head(name, filename, ctype) + b"\r\n")
            self._parts.append((path, os.path.getsize(path)))
            self._parts.append(b"\r\n")
        self._parts.append(f"--{self.boundary}--\r\n".encode())
        self._length = sum(len(p) if isinstance(p, bytes) else p[1] for p in self._parts)
        self._chunks = self._iter_chunks()
        self._pending = b""
        self._sent = 0
        self._on_progress = on_progress

    def __len__(self) -> int:
        return self._length

    def read(self, size: int = -1) -> bytes:
        size = CHUNK if size is None or size < 0 else size
        while len(self._pending) < size:
            chunk = next(self._chunks, None)
            if chunk is None:
                break
            self._pending += chunk
        out, self._pending = self._pending[:size], self._pending[size:]
        self._sent += len(out)
        if self._on_progress and out:
            self._on_progress(self._sent, self._length)
        return out

    def _iter_chunks(self) -> Iterator[bytes]:
        for part in self._parts:
            if isinstance(part, bytes):
                yield part
                continue
            path, size = part
            with open(path, "rb") as f:
                while size > 0:
                    chunk = f.read(min(CHUNK, size))
                    if not chunk:
                        raise errors.ClientError(f"{path} shrank while it was being uploaded")
                    size -= len(chunk)
                    yield chunk

    def _head(self, name: str, filename: str | None = None, ctype: str | None = None) -> bytes:
        disposition = f'form-data; name="{_quote(name)}"'
        if filename is not None:
            disposition += f'; filename="{_quote(filename)}"'
        head = f"--{self.boundary}\r\nContent-Disposition: {disposition}\r\n"
        if ctype:
            head += f"Content-Type: {ctype}\r\n"
        return head.encode("utf-8")


def _quote(value: str) -> str:
    # The HTML form-data escaping of names: quote, CR and LF as percent escapes.
    return value.replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A")
