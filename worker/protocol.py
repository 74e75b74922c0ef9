"""The proxy's answers as the worker reads them: one frozen dataclass per
answer the worker acts on, built from the JSON here and nowhere else.

Why one place: the proxy's OpenAPI document (/api/v1/openapi.json) is the
contract, and a dict handed around the daemon lets a field go unread without
anyone noticing. That happened: the claim answer carried `cancel` and `drain`
while the worker read only `jobs`, so it heard of a cancel or a drain only at
its next heartbeat. Each field below is one key of its answer, so
tests/test_worker_protocol.py holds the two sides together: a key the real
proxy answers that no field reads fails there.

The orders (`cancel`, `drain`, and on heartbeats `unknown`) mean the same on
every answer that carries them, and the daemon applies them in one place
(`Worker.apply_orders`), whichever answer brings them first.

Each `from_json` raises `MalformedAnswer` for an answer that does not match
(not an object, a missing key, a wrong type), instead of a KeyError or
TypeError somewhere in a loop. Claimed jobs stay dicts, read by the runner,
whose thread turns a missing field into a failed result; only what the daemon
reads before that thread starts (id, attempt, image) is checked here, and what
says where the job's bytes go (each input's `url`, `sha256` and optional
`direct_url`, the job's `outputs_upload`): the client acts on those without
asking, so a proxy of another version must not steer it anywhere odd.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from .errors import MalformedAnswer

# Metadata of a field that holds a part of the answer read by a dataclass of
# its own: its keys sit at the top level of the JSON, next to the other fields.
INLINE = {"inline": True}

# A claimed job's `outputs_upload`: how its output archive goes up. "proxy":
# in the result's multipart body (the local-directory store, and any job whose
# claim does not say); "direct": by a presigned PUT to the S3 store
# (WorkerClient.post_result), the proxy only checking what arrived.
OUTPUTS_VIA_PROXY = "proxy"
OUTPUTS_DIRECT = "direct"
OUTPUTS_UPLOAD_MODES = (OUTPUTS_VIA_PROXY, OUTPUTS_DIRECT)
# A claimed job's inputs, each {"url", "sha256", "size", "direct_url"?} or null.
INPUT_KEYS = ("script", "dataset", "requirements")


@dataclass(frozen=True)
class RegisterAnswer:
    """POST /api/v1/workers/register: who this worker is now and how often to call."""
    worker_id: str
    secret: str
    heartbeat_interval_s: float
    # A worker silent this long is marked lost; logged so an operator can see
    # how much of a network cut the worker survives.
    lease_timeout_s: float

    @classmethod
    def from_json(cls, answer) -> RegisterAnswer:
        what = "register answer"
        answer = _object(answer, what)
        return cls(worker_id=_str(answer, "worker_id", what), secret=_str(answer, "secret", what),
                   heartbeat_interval_s=_positive(answer, "heartbeat_interval_s", what),
                   lease_timeout_s=_positive(answer, "lease_timeout_s", what))


@dataclass(frozen=True)
class HeartbeatAnswer:
    """POST /api/v1/worker/heartbeat: the proxy's orders for the jobs this worker runs.

    cancel: jobs whose owner cancelled them; unknown: jobs the worker reported
    running that it no longer holds (requeued, given to another); drain: take
    no new jobs.
    """
    cancel: tuple[str, ...]
    unknown: tuple[str, ...]
    drain: bool

    @classmethod
    def from_json(cls, answer) -> HeartbeatAnswer:
        what = "heartbeat answer"
        answer = _object(answer, what)
        return cls(cancel=_ids(answer, "cancel", what), unknown=_ids(answer, "unknown", what),
                   drain=_bool(answer, "drain", what))


@dataclass(frozen=True)
class ClaimAnswer:
    """POST /api/v1/worker/claim, or the claim part of a result answer: the jobs
    now leased to this worker, and the same `cancel` and `drain` orders as a
    heartbeat's (a claim carries no `unknown`: it does not say what runs)."""
    jobs: tuple[dict, ...]
    cancel: tuple[str, ...]
    drain: bool

    @classmethod
    def from_json(cls, answer, what: str = "claim answer") -> ClaimAnswer:
        answer = _object(answer, what)
        return cls(jobs=_jobs(answer, what), cancel=_ids(answer, "cancel", what),
                   drain=_bool(answer, "drain", what))


@dataclass(frozen=True)
class ResultAnswer:
    """POST /api/v1/worker/jobs/<id>/result: the job's state after the result,
    whether this result set it (False: a duplicate, or the job was already
    final), and, when the request asked for successors (claim_next > 0), the
    claim answer that came with it."""
    job_id: str
    state: str
    applied: bool
    claim: ClaimAnswer | None = field(default=None, metadata=INLINE)

    @classmethod
    def from_json(cls, answer) -> ResultAnswer:
        what = "result answer"
        answer = _object(answer, what)
        # The proxy adds the claim keys only when the request asked for jobs.
        claim = ClaimAnswer.from_json(answer, what) if "jobs" in answer else None
        return cls(job_id=_str(answer, "job_id", what), state=_str(answer, "state", what),
                   applied=_bool(answer, "applied", what), claim=claim)


@dataclass(frozen=True)
class UploadTicket:
    """POST /api/v1/worker/jobs/<id>/outputs-upload: where to PUT the job's
    output archive in the object store, with exactly these headers (they carry
    the archive's sha256, so the store itself refuses other bytes), within
    `expires_in_s`."""
    url: str
    method: str
    headers: dict[str, str]
    expires_in_s: float

    @classmethod
    def from_json(cls, answer) -> UploadTicket:
        what = "outputs-upload answer"
        answer = _object(answer, what)
        method = _str(answer, "method", what)
        if method != "PUT":
            raise MalformedAnswer(f"{what}: 'method' must be PUT, got {method!r}")
        headers = _get(answer, "headers", what)
        if not isinstance(headers, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in headers.items()):
            raise MalformedAnswer(f"{what}: 'headers' must map names to strings")
        if any(k.lower() == "authorization" for k in headers):
            # The URL's signature is the credential; no header may carry another.
            raise MalformedAnswer(f"{what}: 'headers' must not carry an Authorization header")
        return cls(url=_absolute_url(answer, "url", what), method=method, headers=dict(headers),
                   expires_in_s=_positive(answer, "expires_in_s", what))


# ------------------------------------------------------------------ field readers

def _object(answer, what: str) -> dict:
    if not isinstance(answer, dict):
        raise MalformedAnswer(f"{what}: expected a JSON object, got {type(answer).__name__}")
    return answer


def _get(answer: dict, key: str, what: str):
    if key not in answer:
        raise MalformedAnswer(f"{what}: missing {key!r}")
    return answer[key]


def _str(answer: dict, key: str, what: str) -> str:
    value = _get(answer, key, what)
    if not isinstance(value, str):
        raise MalformedAnswer(f"{what}: {key!r} must be a string, got {value!r}")
    return value


def _bool(answer: dict, key: str, what: str) -> bool:
    value = _get(answer, key, what)
    if not isinstance(value, bool):
        raise MalformedAnswer(f"{what}: {key!r} must be true or false, got {value!r}")
    return value


def _positive(answer: dict, key: str, what: str) -> float:
    value = _get(answer, key, what)
    # bool is an int to Python, not a number to JSON.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise MalformedAnswer(f"{what}: {key!r} must be a positive number, got {value!r}")
    return float(value)


def _ids(answer: dict, key: str, what: str) -> tuple[str, ...]:
    value = _get(answer, key, what)
    if not isinstance(value, list) or not all(isinstance(i, str) for i in value):
        raise MalformedAnswer(f"{what}: {key!r} must be a list of job ids, got {value!r}")
    return tuple(value)


def _jobs(answer: dict, what: str) -> tuple[dict, ...]:
    value = _get(answer, "jobs", what)
    if not isinstance(value, list):
        raise MalformedAnswer(f"{what}: 'jobs' must be a list, got {value!r}")
    for job in value:
        job = _object(job, f"{what}: a claimed job")
        _str(job, "id", f"{what}: a claimed job")
        _str(job, "image", f"{what}: job {job['id']}")
        attempt = _get(job, "attempt", f"{what}: job {job['id']}")
        if isinstance(attempt, bool) or not isinstance(attempt, int):
            raise MalformedAnswer(f"{what}: job {job['id']}: 'attempt' must be an integer, "
                                  f"got {attempt!r}")
        _transfers(job, f"{what}: job {job['id']}")
    return tuple(value)


def _transfers(job: dict, what: str) -> None:
    """Check where a claimed job's bytes come from and go to: each input (and
    each parent's outputs) a proxy route with the sha256 the download is
    checked against, and maybe a presigned URL on the store; the outputs'
    upload mode."""
    mode = job.get("outputs_upload", OUTPUTS_VIA_PROXY)
    if mode not in OUTPUTS_UPLOAD_MODES:
        raise MalformedAnswer(f"{what}: 'outputs_upload' must be one of "
                              f"{', '.join(OUTPUTS_UPLOAD_MODES)}, got {mode!r}")
    sources = [(key, job.get(key)) for key in INPUT_KEYS]
    after = job.get("after") or []
    if not isinstance(after, list):
        raise MalformedAnswer(f"{what}: 'after' must be a list, got {after!r}")
    for n, parent in enumerate(after):
        parent = _object(parent, f"{what}: after[{n}]")
        sources.append((f"after[{n}].outputs", parent.get("outputs")))
    for key, source in sources:
        if source is None:
            continue
        where = f"{what}: {key}"
        source = _object(source, where)
        _str(source, "url", where)
        sha256 = _str(source, "sha256", where)
        if not _SHA256.fullmatch(sha256):
            raise MalformedAnswer(f"{where}: 'sha256' must be 64 hex digits, got {sha256!r}")
        if source.get("direct_url") is not None:
            _absolute_url(source, "direct_url", where)


def _absolute_url(answer: dict, key: str, what: str) -> str:
    value = _str(answer, key, what)
    if not _ABSOLUTE_URL.match(value):
        raise MalformedAnswer(f"{what}: {key!r} must be an absolute http(s) URL")
    return value


_SHA256 = re.compile(r"[0-9a-f]{64}")
# A presigned URL: its own host, since it is fetched without the proxy's credentials.
_ABSOLUTE_URL = re.compile(r"https?://[^/\s?#]+(/|$)")
