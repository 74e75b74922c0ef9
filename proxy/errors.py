"""The proxy's exception hierarchy.

Every error a client can cause is a `ProxyError` with an HTTP status, a short
machine-readable code and a human sentence; the API answers it as
``{"error": code, "detail": detail}`` and the web pages show the detail.
"""
from __future__ import annotations


class ProxyError(Exception):
    """Raised when a request cannot be served; base of every proxy error."""

    status = 400
    code = "bad_request"

    def __init__(self, detail: str, *, code: str | None = None, status: int | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.detail = detail
        # Sent with the error answer, e.g. Retry-After on a 429.
        self.headers = dict(headers or {})
        if code:
            self.code = code
        if status:
            self.status = status


class ConfigError(ProxyError):
    """Raised when a configuration value is unknown, mistyped or out of range."""

    code = "config_error"
    status = 500


class ValidationError(ProxyError):
    """Raised when a submitted field, file or parameter is not acceptable."""

    code = "invalid"
    status = 400


class TooLarge(ProxyError):
    """Raised when an upload exceeds its size limit."""

    code = "too_large"
    status = 413


class Unauthorized(ProxyError):
    """Raised when a request carries no valid credentials."""

    code = "unauthorized"
    status = 401


class Forbidden(ProxyError):
    """Raised when valid credentials do not allow the action."""

    code = "forbidden"
    status = 403


class NotFound(ProxyError):
    """Raised when a resource does not exist or is not visible to the caller."""

    code = "not_found"
    status = 404


class Conflict(ProxyError):
    """Raised when the resource's state does not allow the action (stale lease, final job)."""

    code = "conflict"
    status = 409


class Gone(ProxyError):
    """Raised when a job's files or logs were deleted by retention (proxy/retention.py)."""

    code = "expired"
    status = 410


class StoreUnavailable(ProxyError):
    """Raised when the database cannot be reached or is locked for too long."""

    code = "store_unavailable"
    status = 503


class BlobStoreUnavailable(ProxyError):
    """Raised when the object store behind blob_url (proxy/s3blobs.py) cannot be
    reached or refuses the proxy's keys: the submission or download is refused
    whole, nothing half-written."""

    code = "blob_store_unavailable"
    status = 503


class StoreNotFound(ProxyError):
    """Raised when an admin command finds no proxy database where the settings point
    (only `jobcloud-proxy serve`, `init` and `migrate` create one)."""

    code = "store_not_found"
    status = 404


class TooManyRequests(ProxyError):
    """Raised when a user is over a rate or count limit (queued jobs, submissions per minute)."""

    code = "limit_exceeded"
    status = 429


class StorageQuotaExceeded(ProxyError):
    """Raised when a submission would take a user's stored files past their storage quota."""

    code = "storage_quota_exceeded"
    status = 413


class TooManyAttempts(TooManyRequests):
    """Raised when password checks for an account or from an address are locked out for a while."""

    code = "too_many_attempts"

    def __init__(self, detail: str, *, retry_after_s: int):
        super().__init__(detail, headers={"Retry-After": str(retry_after_s)})
        self.retry_after_s = retry_after_s


class PackageIndexUnreachable(ProxyError):
    """Raised when the package index (package_index_url) cannot be asked whether a
    job's requirements have wheels: the submission is refused, never accepted unchecked."""

    code = "package_index_unreachable"
    status = 503
