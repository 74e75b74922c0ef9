"""A job's own environment variables: read from the submission, checked,
stored with the job (jobs.env_vars), handed to its worker in the claim.

Where they come from: the form's and the API's `env` field, as a JSON object
({"NAME": "value"}) or as `NAME=value` lines (the form's textarea); the API
may also repeat the field, one `NAME=value` per part. `jobcloud submit -e`
sends one JSON object.

What is refused, with a 400 `invalid_env` naming the variable:
- a name that is not `[A-Za-z_][A-Za-z0-9_]*` or is longer than NAME_MAX;
- a reserved name (RESERVED_NAMES, RESERVED_PREFIXES): the worker's own
  variables, which it sets for every job and a job must be able to trust
  (JOBCLOUD_*, the thread limits, HOME, USER...), and the ones that change
  which program or library runs instead of the script (PATH, PYTHONPATH and
  its kin, LD_*);
- a name given twice, more variables than `job_env_max_vars`, a value over
  `job_env_max_value_bytes` (UTF-8) or holding a NUL byte (no C string can).

Values may be secrets (an API key for the job's own use), so they appear in
no log line and no error message, and not in the job's JSON, page, lists,
live stream or webhook: those show the names (`env_names`). Only the job's
owner reads the values back, on request: GET /api/v1/jobs/<id>/env.
"""
from __future__ import annotations

import json
import re

from .errors import Forbidden, ValidationError

FIELD = "env"
NAME_MAX = 128
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Set by the worker for every job (worker/sandbox.py job_environment): a
# job's own value would be overridden there, so it is refused here, where the
# user hears why.
WORKER_NAMES = frozenset({
    "HOME", "USER", "LOGNAME", "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE", "MPLCONFIGDIR",
    "OMP_THREAD_LIMIT", "GOTO_NUM_THREADS", "LOKY_MAX_CPU_COUNT", "NUMEXPR_MAX_THREADS"})
# Names that make the interpreter or the dynamic loader run something else
# than the script as the image has it: another python3 (PATH), other startup
# code or module paths (PYTHONPATH and its kin, VIRTUAL_ENV), preloaded or
# substituted libraries (LD_*). The job's own code can do all of that at run
# time; refused so that what a job runs is its script, on its image (and its
# requirements' environment), as the job page says. PYTHONHASHSEED,
# PYTHONWARNINGS and the like stay free: they change how, not what.
RESERVED_NAMES = WORKER_NAMES | frozenset({
    "PATH", "PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONUSERBASE", "PYTHONNOUSERSITE",
    "PYTHONSAFEPATH", "PYTHONEXECUTABLE", "PYTHONPLATLIBDIR", "PYTHONINSPECT", "VIRTUAL_ENV"})
RESERVED_PREFIXES = ("JOBCLOUD_", "LD_")


def parse(values: list[str], *, max_vars: int, max_value_bytes: int) -> dict[str, str]:
    """The job's variables from the submitted `env` parts.

    Args:
        values: each `env` part: a JSON object, or `NAME=value` lines (blank
            lines and lines starting with # are skipped; the value is taken
            as it is, after the first =, without quotes being removed).

    Returns:
        name -> value, in the order given; empty when nothing was given.

    Raises:
        ValidationError: malformed, reserved, repeated or too many names, or
            a value too long (the detail never quotes a value).
    """
    env: dict[str, str] = {}
    for part in values:
        for name, value in _pairs(part):
            _check(name, value, max_value_bytes)
            if name in env:
                raise ValidationError(f"environment variable {name} is given twice",
                                      code="invalid_env")
            env[name] = value
            if len(env) > max_vars:
                raise ValidationError(f"more than {max_vars} environment variables "
                                      "(job_env_max_vars)", code="invalid_env")
    return env


def field_limit(max_vars: int, max_value_bytes: int) -> int:
    """Bytes one `env` form part may hold: every variable, JSON-quoted with room to spare."""
    return max(1024, 2 * max_vars * (NAME_MAX + max_value_bytes + 8))


def store(conn, job_id: str, env: dict[str, str]) -> None:
    """Keep the job's variables on its row (inside the submission's transaction)."""
    if env:
        conn.execute("UPDATE jobs SET env_vars = ? WHERE id = ?", (json.dumps(env), job_id))


def variables(job: dict) -> dict[str, str]:
    """The job's variables as stored: what its worker gets in the claim."""
    return json.loads(job["env_vars"]) if job.get("env_vars") else {}


def names(job: dict) -> list[str]:
    """The names alone, for every view of the job that is not its owner's request for values."""
    return list(variables(job))


def owner_values(job: dict, viewer: dict) -> dict:
    """GET /api/v1/jobs/<id>/env: the values, to the job's owner only.

    Raises:
        Forbidden: the viewer is an admin reading another user's job (the
            caller has already answered 404 to anyone else).
    """
    if job["owner_id"] != viewer["id"]:
        raise Forbidden("environment values are shown to the job's owner only; "
                        "its names are in the job's env_names", code="env_owner_only")
    return {"job_id": job["id"], "env": variables(job)}


def _pairs(part: str):
    """(name, value) pairs of one `env` part, in order."""
    text = part.strip()
    if text.startswith("{"):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            # The position only: the text may hold values.
            raise ValidationError(f"env is not a valid JSON object (error at character {e.pos})",
                                  code="invalid_env") from None
        except RecursionError:
            raise ValidationError("env is nested too deeply to be a JSON object of strings",
                                  code="invalid_env") from None
        if not isinstance(obj, dict):
            raise ValidationError("env must be a JSON object of names to strings",
                                  code="invalid_env")
        for name, value in obj.items():
            if not isinstance(value, str):
                raise ValidationError(f"environment variable {_shown(name)} must be a string "
                                      f"(got {type(value).__name__})", code="invalid_env")
            yield name, value
        return
    for number, line in enumerate(part.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, sep, value = line.partition("=")
        if not sep:
            raise ValidationError(f"env line {number} is not NAME=value", code="invalid_env")
        yield name.strip(), value


def _check(name: str, value: str, max_value_bytes: int) -> None:
    if len(name) > NAME_MAX or not _NAME.fullmatch(name):
        raise ValidationError(f"invalid environment variable name {_shown(name)}: use letters, "
                              f"digits and _, not starting with a digit, at most {NAME_MAX} "
                              "characters", code="invalid_env")
    if name in RESERVED_NAMES or name.startswith(RESERVED_PREFIXES):
        raise ValidationError(f"environment variable {name} is reserved: the worker sets it, or "
                              "it changes what runs instead of the script (reserved: "
                              f"{', '.join(p + '*' for p in RESERVED_PREFIXES)}, "
                              f"{', '.join(sorted(RESERVED_NAMES))})", code="invalid_env")
    if "\x00" in value:
        raise ValidationError(f"environment variable {name} holds a NUL byte", code="invalid_env")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:   # a lone surrogate, from a JSON "\ud800" escape
        raise ValidationError(f"environment variable {name} is not valid Unicode text",
                              code="invalid_env") from None
    if size > max_value_bytes:
        raise ValidationError(f"environment variable {name} is longer than {max_value_bytes} "
                              "bytes (job_env_max_value_bytes)", code="invalid_env")


def _shown(name) -> str:
    """A refused name as the error quotes it: bounded, as a Python literal."""
    return repr(str(name)[:40])
