"""The worker's one exception hierarchy. Transport errors (requests, docker)
are translated into these at the boundary: worker/client.py for the proxy,
worker/protocol.py for the proxy's answers, worker/sandbox.py for the Docker
engine.
"""
from __future__ import annotations


class WorkerError(Exception):
    """Base class of every error the worker raises on purpose."""


class ConfigError(WorkerError):
    """Raised when the worker's configuration is missing or invalid."""


class InputError(WorkerError):
    """Raised when a job's script or dataset cannot be fetched or is unsafe to unpack."""


class UnsafeArchive(InputError):
    """Raised when a dataset archive holds a member that must not be extracted."""


class SandboxError(WorkerError):
    """Raised when the Docker engine cannot create, run or inspect a job's container."""


class ProtocolError(WorkerError):
    """Raised when the proxy refuses a request or cannot be reached.

    Args:
        status: the HTTP status of the answer, None when there was none.
        code: the proxy's error code (`{"error": code}`), when it gave one.
        secret: the credential the refused request carried, so a loop can tell
            whether another loop has registered again since.
    """

    def __init__(self, message: str, status: int | None = None, code: str | None = None,
                 secret: str | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.secret = secret


class ProxyUnreachable(ProtocolError):
    """Raised when the proxy cannot be reached (connection refused or cut, timeout, 5xx)."""


class LeaseLost(ProtocolError):
    """Raised when the proxy says this worker no longer holds a job (404/409 on a job call)."""


class StoreUnreachable(ProxyUnreachable):
    """Raised when the object store behind a presigned URL cannot be reached,
    answers 5xx or cuts a body off: as transient as an unreachable proxy, and
    handled the same way (hence the subclass)."""


class StoreRefused(ProtocolError):
    """Raised when the object store refuses a presigned URL (a 4xx: expired,
    denied, no such object, or bytes that do not match the signed checksum)."""


class OutputsRefused(ProtocolError):
    """Raised when a job's output archive cannot be delivered by a direct upload:
    the store refused its bytes, or the proxy refused the upload (too large) or
    what the store holds (missing, another sha256, not a zip). The job then
    fails without outputs (worker/runner.py), never with a result that names
    outputs the store does not hold."""


class MalformedAnswer(ProtocolError):
    """Raised when a successful answer does not match the protocol (not JSON, a
    missing field, a wrong type): a proxy of another version."""


class EnvBuildError(WorkerError):
    """Raised when a job's requirements environment cannot be built (worker/pyenv.py):
    the message is pip's, and the job fails with reason env_build_failed."""


# Named exit codes of `jobcloud-worker` (README "Running a worker"). Only an
# admin ends a registered worker: a partition, a proxy restart or being marked
# lost never do (it registers again). The systemd units restart it on every
# code but EXIT_RETIRED and EXIT_REVOKED (RestartPreventExitStatus).
EXIT_OK = 0           # stopped by a signal, jobs finished or handed back
EXIT_CONFIG = 2       # invalid configuration
EXIT_DOCKER = 3       # no usable Docker engine
EXIT_REGISTER = 4     # the first registration was refused (enrollment token)
EXIT_RETIRED = 5      # an admin retired this worker (POST /api/v1/admin/workers/<id>/retire)
EXIT_REVOKED = 6      # an admin revoked this worker (POST /api/v1/admin/workers/<id>/revoke)
EXIT_FORCED = 130     # a second signal: stopped at once
