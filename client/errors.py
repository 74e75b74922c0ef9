"""The client's exception hierarchy.

Every failure a command can meet (no config, the proxy unreachable, an
``{"error", "detail"}`` answer) is a `ClientError` carrying the sentence the
CLI prints; transport errors from requests are translated in `client.api`.
"""
from __future__ import annotations


class ClientError(Exception):
    """Raised when a client command cannot be carried out; base of every client error."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class ConfigMissing(ClientError):
    """Raised when no URL and token are stored yet (`jobcloud login` was never run)."""


class ConfigInvalid(ClientError):
    """Raised when the config file or the local submission record cannot be read."""


class Unreachable(ClientError):
    """Raised when the proxy cannot be reached (refused, DNS, timeout, dropped connection)."""


class ApiError(ClientError):
    """Raised when the proxy answers with an error status; `code` and `detail` come from its body."""

    def __init__(self, status: int, code: str, detail: str, message: str | None = None):
        super().__init__(message or f"{detail} ({status} {code})")
        self.status = status
        self.code = code
        self.detail = detail


class NotLoggedIn(ApiError):
    """Raised on 401: no token, a wrong one, or a revoked one."""


class Forbidden(ApiError):
    """Raised on 403: the token is valid but the action is not allowed."""


class NotFound(ApiError):
    """Raised on 404: the job does not exist or is not yours (or has no outputs yet)."""


class Conflict(ApiError):
    """Raised on 409: the job's state does not allow the action (e.g. cancelling a finished job)."""


class TooLarge(ApiError):
    """Raised on 413: an upload is over the proxy's limit (named in `detail`)."""


class BadRequest(ApiError):
    """Raised on 400 and 415: a field, file or parameter was refused (said in `detail`)."""


class ServerError(ApiError):
    """Raised on 5xx: the proxy or its store failed; trying again later may work."""


class UnsafeArchive(ClientError):
    """Raised when an output archive breaks the archive rule (jobcloud_archive) or would
    write through a link in the destination."""
