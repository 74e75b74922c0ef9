"""The scaler's own memory: which VMs it made, where, and how far along each is.

One JSON file in the state dir, rewritten atomically (temp file, fsync, rename)
under an exclusive lock, so the daemon and an admin's `jobcloud-vm down 1` can
both change it, and a crash of either leaves the previous or the next version,
never half of one. It survives the scaler's restart; reconcile compares it with
what libvirt and the proxy say.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import secrets
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from .errors import VMError

STATE_FILE = "scaler-state.json"
LOCK_FILE = "scaler.lock"


class VMState(str, Enum):
    BOOTING = "booting"      # defined and started; its worker has not registered yet
    READY = "ready"          # its worker registered and takes jobs
    DRAINING = "draining"    # asked to finish its jobs and take no new ones
    STOPPING = "stopping"    # shut down requested; destroyed after shutdown_timeout_s


@dataclass
class VMRecord:
    name: str
    uuid: str
    host_uri: str
    mac: str
    disk: str
    seed: str
    console_log: str
    state: str = VMState.BOOTING.value
    created_at: float = 0.0
    state_since: float = 0.0
    enrollment_id: str | None = None
    worker_id: str | None = None
    # Its shape when it was made (0: unknown, a record from before they were kept):
    # what it takes of its host's room.
    vcpus: int = 0
    memory_mb: int = 0
    # Its host stopped answering and its worker was revoked: removed once the host
    # answers again (it is `stopping` meanwhile).
    lost: bool = False


def new_scaler_id() -> str:
    return secrets.token_hex(8)


@dataclass
class ScalerState:
    vms: dict[str, VMRecord] = field(default_factory=dict)
    last_scale_up_at: float = 0.0
    # This scaler instance, drawn once and kept here: every domain it defines carries
    # it (domain.py), and only domains carrying it are ever cleaned up as leftovers.
    scaler_id: str = field(default_factory=new_scaler_id)

    def to_json(self) -> dict:
        return {"last_scale_up_at": self.last_scale_up_at, "scaler_id": self.scaler_id,
                "vms": [dataclasses.asdict(v) for v in self.vms.values()]}

    @classmethod
    def from_json(cls, data: dict) -> "ScalerState":
        known = {f.name for f in dataclasses.fields(VMRecord)}
        vms = {v["name"]: VMRecord(**{k: v[k] for k in v if k in known}) for v in data.get("vms", [])}
        return cls(vms=vms, last_scale_up_at=float(data.get("last_scale_up_at", 0.0)),
                   scaler_id=str(data.get("scaler_id") or new_scaler_id()))


class StateStore:
    """The state file and its lock in `state_dir`."""

    def __init__(self, state_dir: str | Path):
        self.dir = Path(state_dir)
        self.path = self.dir / STATE_FILE

    @contextlib.contextmanager
    def locked(self):
        """Hold the exclusive lock; yields the state, saved when the block ends.

        Saved on an error too: the scaler changes the state only after each
        action succeeded, so what it holds then is what was really done.
        """
        self.dir.mkdir(mode=0o711, parents=True, exist_ok=True)  # as Scaler makes it
        with open(_private(self.dir / LOCK_FILE, os.O_RDWR | os.O_CREAT), "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                state = self.load()
                try:
                    yield state
                finally:
                    self.save(state)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def load(self) -> ScalerState:
        try:
            with open(self.path, encoding="utf-8") as f:
                return ScalerState.from_json(json.load(f))
        except FileNotFoundError:
            return ScalerState()
        except (ValueError, TypeError, KeyError) as e:
            raise VMError(f"the scaler state file {self.path} is unreadable ({e}); move it "
                          "aside and remove its VMs with virsh (a new state file is a new "
                          "scaler instance, which leaves the old one's domains alone)") from None

    def save(self, state: ScalerState) -> None:
        tmp = self.path.with_suffix(".tmp")
        with open(_private(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), "w", encoding="utf-8") as f:
            json.dump(state.to_json(), f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        dir_fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _private(path: Path, flags: int) -> int:
    """A descriptor of `path` opened with `flags`, created 0600 whatever the umask."""
    return os.open(path, flags, 0o600)
