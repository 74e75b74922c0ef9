"""Pre-started sandboxes: one locked-down container per slot, already
created and started, waiting for its job (worker/sandbox.py's `prestart`).

Why: Docker's create and start are most of a short job's time after its
claim (docs/PERFORMANCE.md); a container started while the slot was idle
leaves a claim only the inputs, a `docker update` when the job's memory or
CPUs differ, and the launcher's release.

What keeps one job from the next: each waiting container gets a job
directory (and, with quotas, a disk) of its own, runs exactly one job and is
removed with it, like a cold one; nothing is ever reused. Once it has its
job, the directory is renamed jobs/<job>-<attempt> and the container
jobcloud-<job>-<attempt> (worker/sandbox.py), as a cold job's are; only its
labels (which Docker cannot change) still say `jobcloud.prestart`. A job
that does not fit the waiting container (another image, a GPU, another disk
size) discards it and runs cold.

The replacement is prepared in a thread as soon as the job that took (or
could not use) the slot's waiting container starts (`refill`), in that
job's shape (the likeliest next one; the first ones take the worker's first
image and default disk): it is made while the job runs and posts its
result, so on a busy worker the next job finds it ready instead of waiting
for Docker's create and start; and not before the job starts, so that
making it does not delay the start. A worker holds at most one waiting
container per slot, so a busy slot holds two containers: its job's and the
next one's (docs/PERFORMANCE.md, "Warm starts").

A draining or stopping worker removes its waiting containers (`close`); a
killed one leaves them to the next start's sweep (they carry the worker's
label, and their directories lie under jobs/).
"""
from __future__ import annotations

import logging
import os
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path

from .errors import SandboxError
from .jobdisk import JobDisk, make_job_dir
from .sandbox import JobSpec, Sandbox, Waiting
from .trees import remove_tree

log = logging.getLogger(__name__)

# A claim waits this long for a container still being prepared: it is further
# on than a cold one would be. Past it the job starts cold.
TAKE_WAIT_S = 30.0
# The first waiting containers' shape, until a job shows what jobs look like.
FIRST_CPUS = 1.0
FIRST_MEMORY_MB = 256
# How long removing a container still being made waits for it to be made.
CLOSE_WAIT_S = 30.0


@dataclass(frozen=True)
class Shape:
    """What a waiting container was made for (disk_mb None: no quota)."""
    image: str
    cpus: float
    memory_mb: int
    disk_mb: int | None


class Prepared:
    """One waiting container, ready or on its way, with its job directory."""

    def __init__(self, shape: Shape, job_dir: Path):
        self.shape = shape
        self.job_dir = job_dir
        self.ready = threading.Event()
        self.waiting: Waiting | None = None
        self.disk: JobDisk | None = None

    def move_to(self, job_dir: Path) -> None:
        """Name its directory for the job it got, as a cold job's is
        (jobs/<job>-<attempt>). The container's bind mounts and the disk's
        mount follow a rename; only the paths kept here change.

        Raises:
            OSError: it could not be renamed (it keeps its name then).
        """
        remove_tree(job_dir)   # a leftover of the same attempt, as for a cold job
        os.rename(self.job_dir, job_dir)
        old, self.job_dir = self.job_dir, job_dir
        waiting = self.waiting
        waiting.input_dir = job_dir / waiting.input_dir.relative_to(old)
        waiting.output_dir = job_dir / waiting.output_dir.relative_to(old)
        if self.disk is not None:
            self.disk.moved_to(job_dir)

    def remove_dir(self) -> None:
        """Remove the job directory and its disk (after its container)."""
        try:
            if self.disk is not None:
                self.disk.remove()
            remove_tree(self.job_dir)
        except (SandboxError, OSError) as e:
            log.error("%s could not be removed (%s); the next start-up sweep removes it",
                      self.job_dir, e)


class Prestarter:
    """Keeps one waiting container per slot, busy or not.

    Args:
        sandbox: makes and removes the containers.
        jobs_dir: where job directories go (the start-up sweep empties it).
        slots: the worker's slots.
        image: the first containers' image.
        disk_mb: the first containers' disk (None: the worker has no quotas).
        job_uid: owner of the job's writable directory.
    """

    def __init__(self, sandbox: Sandbox, *, jobs_dir: Path, slots: int, image: str,
                 disk_mb: int | None, job_uid: int):
        self.sandbox = sandbox
        self.jobs_dir = jobs_dir
        self.slots = slots
        self.owner = (job_uid, job_uid)
        self.next_shape = Shape(image, FIRST_CPUS, FIRST_MEMORY_MB, disk_mb)
        self._prepared: list[Prepared] = []
        self._open = False
        self._lock = threading.Lock()

    # ------------------------------------------------------------- the pool

    def open(self) -> None:
        """Make a waiting container for every slot (at start, and when a drain is lifted)."""
        with self._lock:
            self._open = True
            missing = self.slots - len(self._prepared)
            shape = self.next_shape
        for _ in range(max(0, missing)):
            self._prepare(shape)

    def close(self) -> None:
        """Remove every waiting container and prepare no more (drain, stop)."""
        with self._lock:
            self._open = False
            gone, self._prepared = self._prepared, []
        for prepared in gone:
            self._discard(prepared)

    def take(self, spec: JobSpec, disk_mb: int | None, job_dir: Path) -> Prepared | None:
        """A waiting container for this job, its directory renamed `job_dir`,
        or None: it runs cold.

        Either way the job calls `refill` when it starts. A waiting
        container that does not fit is removed.
        """
        with self._lock:
            fits = [p for p in self._prepared if self._fits(p, spec, disk_mb)]
            # A ready one first; else the one furthest on (prepared longest ago).
            fits.sort(key=lambda p: not p.ready.is_set())
            pick = fits[0] if fits else (self._prepared[0] if self._prepared else None)
            if pick is not None:
                self._prepared.remove(pick)
        if pick is None:
            return None
        if not fits:
            self._discard_later(pick)
            return None
        if not pick.ready.wait(TAKE_WAIT_S) or pick.waiting is None:
            self._discard_later(pick)
            return None
        try:
            pick.move_to(job_dir)
        except OSError as e:
            log.warning("job %s: cannot rename %s (%s); it runs in a new container",
                        spec.job_id, pick.job_dir, e)
            self._discard_later(pick)
            return None
        return pick

    def refill(self, shape: Shape) -> None:
        """A job of this shape starts, or its container is gone: its slot's
        waiting container is made again if it is missing."""
        with self._lock:
            self.next_shape = shape
            prepare = self._open and len(self._prepared) < self.slots
        if prepare:
            self._prepare(shape)

    # -------------------------------------------------------------- helpers

    def _fits(self, prepared: Prepared, spec: JobSpec, disk_mb: int | None) -> bool:
        # The image fixes the runtime too; CPUs and memory are changed at release
        # (`docker update`); a GPU and a disk size cannot be.
        return (prepared.shape.image, prepared.shape.disk_mb) == (spec.image, disk_mb) and spec.gpus == 0

    def _prepare(self, shape: Shape) -> None:
        token = secrets.token_hex(6)
        prepared = Prepared(shape, self.jobs_dir / f"waiting-{token}")
        with self._lock:
            if not self._open or len(self._prepared) >= self.slots:
                return   # closed, or filled, since the caller looked
            # Listed before it is made: whoever takes it out (take, close) waits for it.
            self._prepared.append(prepared)
        threading.Thread(target=self._make, args=(prepared, token), name=f"prestart-{token}",
                         daemon=True).start()

    def _make(self, prepared: Prepared, token: str) -> None:
        shape = prepared.shape
        try:
            input_dir, output_dir, prepared.disk = make_job_dir(prepared.job_dir, owner=self.owner,
                                                                disk_mb=shape.disk_mb)
            prepared.waiting = self.sandbox.prestart(
                JobSpec(job_id=token, attempt=0, image=shape.image, cpus=shape.cpus,
                        memory_mb=shape.memory_mb, gpus=0, timeout_s=0), input_dir, output_dir)
        except (SandboxError, OSError) as e:
            log.warning("could not prepare a waiting container: %s", e)
            with self._lock:
                mine = prepared in self._prepared
                if mine:
                    self._prepared.remove(prepared)
            if mine:   # else take or close has it, and removes it
                prepared.remove_dir()
        finally:
            prepared.ready.set()

    def _discard_later(self, prepared: Prepared) -> None:
        threading.Thread(target=self._discard, args=(prepared,), name="prestart-discard",
                         daemon=True).start()

    def _discard(self, prepared: Prepared) -> None:
        prepared.ready.wait(CLOSE_WAIT_S)
        if prepared.waiting is not None:
            self.sandbox.discard(prepared.waiting)
            prepared.waiting = None
        prepared.remove_dir()


def shape_of(spec: JobSpec, disk_mb: int | None) -> Shape:
    return Shape(spec.image, spec.cpus, spec.memory_mb, disk_mb)

