"""The worker's one exception hierarchy. Transport errors (requests, docker)
are translated into these at the boundary: worker/client.py for the proxy,
worker/sandbox.py for the Docker engine.
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


# Named exit codes of `jobcloud-worker`.
EXIT_OK = 0
EXIT_CONFIG = 2
EXIT_DOCKER = 3
EXIT_REGISTER = 4
EXIT_FORCED = 130
