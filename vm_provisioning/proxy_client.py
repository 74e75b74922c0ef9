"""The scaler's side of the proxy's admin API (/api/v1/admin), with an admin token.

The scaler never touches the proxy's database: the OpenAPI document is the
contract. Every transport or HTTP failure becomes a `ProxyUnavailable` with
one sentence naming what the proxy said.
"""
from __future__ import annotations

from dataclasses import dataclass

import requests

from .errors import ProxyUnavailable


@dataclass(frozen=True)
class WorkerView:
    """A live worker as the scaler needs it (from GET /api/v1/admin/queue)."""

    id: str
    name: str
    state: str          # active or draining
    slots: int
    running: int
    idle_s: float | None  # seconds since it last ran anything; None while it runs a job


@dataclass(frozen=True)
class QueueView:
    queued: int
    running: int
    workers: dict[str, WorkerView]   # by worker name; a VM's worker is named after the VM
    # Queued jobs a VM could start now (the proxy's `runnable`); None: count every queued job.
    runnable: int | None = None

    @property
    def demand(self) -> int:
        """The queued jobs that more VMs would help."""
        return self.queued if self.runnable is None else self.runnable


class ProxyClient:
    def __init__(self, url: str, admin_token: str, timeout_s: float = 15.0, session=None):
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.session = session or requests.Session()
        self.session.headers["Authorization"] = f"Bearer {admin_token}"

    def queue(self, shape: dict | None = None) -> QueueView:
        """The queue and the live workers.

        Args:
            shape: a VM's cpus, memory_mb, gpus and images: `runnable` then counts
                only the queued jobs a worker of that shape could run.
        """
        params = None if shape is None else dict(shape, images=",".join(shape["images"]))
        body = self._call("GET", "/api/v1/admin/queue", params=params)
        workers = {w["name"]: WorkerView(id=w["id"], name=w["name"], state=w["state"],
                                         slots=w["slots"], running=w["running"], idle_s=w["idle_s"])
                   for w in body["workers"]}
        return QueueView(queued=body["queued"], running=body["running"], workers=workers,
                         runnable=body.get("runnable"))

    def create_enrollment(self, label: str, expires_in_s: float | None = None) -> tuple[str, str]:
        """Returns (enrollment id, token); the token expires after `expires_in_s` when given."""
        body = self._call("POST", "/api/v1/admin/enrollment-tokens",
                          json={"label": label, "expires_in_s": expires_in_s})
        return body["id"], body["token"]

    def revoke_enrollment(self, enrollment_id: str) -> None:
        self._call("DELETE", f"/api/v1/admin/enrollment-tokens/{enrollment_id}", missing_ok=True)

    def worker_action(self, worker_id: str, action: str) -> None:
        """drain, resume or revoke; a worker that is no longer live is fine (nothing to do)."""
        self._call("POST", f"/api/v1/admin/workers/{worker_id}/{action}", missing_ok=True)

    def report(self, vms: list[dict], events: list[dict], shapes: list[dict] | None = None) -> None:
        """Our VMs, our decisions, and the worker shapes we can create: the proxy
        refuses jobs no live worker and no shape can run (proxy/capacity.py)."""
        body = {"vms": vms, "events": events}
        if shapes is not None:
            body["shapes"] = shapes
        self._call("PUT", "/api/v1/admin/scaler/report", json=body)

    def _call(self, method: str, path: str, *, json=None, params=None, missing_ok: bool = False) -> dict:
        try:
            r = self.session.request(method, self.url + path, json=json, params=params,
                                     timeout=self.timeout_s)
        except requests.RequestException as e:
            raise ProxyUnavailable(f"cannot reach the proxy at {self.url}: {type(e).__name__}") from None
        if r.status_code == 404 and missing_ok:
            return {}
        if r.status_code in (401, 403):
            raise ProxyUnavailable(f"the proxy at {self.url} refused the admin token "
                                   f"({_detail(r)}); set JOBCLOUD_VM_ADMIN_TOKEN to an admin's API token")
        if not r.ok:
            raise ProxyUnavailable(f"the proxy answered {method} {path} with {r.status_code}: {_detail(r)}")
        try:
            return r.json()
        except ValueError:
            raise ProxyUnavailable(f"the proxy answered {method} {path} with something not JSON") from None


def _detail(r) -> str:
    try:
        return str(r.json().get("detail", r.reason))
    except ValueError:
        return r.reason or str(r.status_code)
