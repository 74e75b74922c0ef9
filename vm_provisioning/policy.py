"""What the scaler should do, as pure functions of what it sees.

No libvirt, no HTTP, no clock: each function takes the configuration, the
scaler's records, the proxy's view of the queue and workers, what libvirt lists,
and `now`, and returns `Decision`s with a reason an admin can read. The scaler
(scaler.py) carries them out; tests drive these functions with tables.

The rules (defaults in config.py):
- up: when queued jobs a VM could run (the proxy's `runnable`) per worker exceed
  `queue_per_worker`, add `step` VMs, then wait `cooldown_s` before adding more.
  Every VM we hold counts toward `max_vms`, draining and stopping ones too (they
  still take a host's memory). A draining VM that runs nothing is resumed before
  a new one is cloned: it is already up. Booting VMs count as workers, so a
  queue that waits for them does not add more. Below `min_vms`, VMs are added
  whatever the queue.
- warm: `idle_vms` VMs are kept booted, registered and holding no job (GitLab
  Runner's `idle_count`), so a job that arrives starts on one at once; when
  jobs take them, replacements are cloned whatever the cooldown. Booting VMs
  count as future idle ones (so a slow boot does not clone more), draining
  ones do not (they are going). The larger of the three wants wins: a VM
  cloned for the queue is also a future idle one.
- down: a VM whose worker has run nothing for `idle_time_s` is drained, then
  stopped once it runs nothing, then removed; never below `min_vms`, and never
  below `idle_vms` idle ones. A VM with a running job is never stopped:
  draining waits for its jobs.
- hosts: a VM whose host is not reachable this pass (or no longer configured) is
  left as it is by every rule; the scaler logs it. A host that has not answered
  for `host_lost_after_s` is down: its VMs are `lost` as a vanished VM is (their
  workers revoked, so their jobs requeue), held as `stopping` and no longer counted
  toward `max_vms`, and removed when the host answers again.
- per host: a new VM goes to the reachable host with room (`host_max_vms`,
  `host_max_vcpus`, `host_max_memory_mb`; 0: no limit) that runs the fewest of
  ours; with no room anywhere a wanted VM is a `hold`.
- reconcile: a VM whose worker has not registered within `boot_timeout_s` is
  replaced; a VM whose domain vanished or stopped is removed and its worker
  revoked (its jobs requeue); our domains and files with no record are leftovers
  (the scaler passes in only the domains that carry its id, and files only when
  it saw every host).
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from .config import ScalerConfig
from .proxy_client import QueueView, WorkerView
from .state import VMRecord, VMState


class Action(str, Enum):
    CREATE = "create"        # clone and start a new VM
    RESUME = "resume"        # a draining VM that runs nothing takes jobs again
    HOLD = "hold"            # wanted more VMs, but max_vms or the cooldown says no
    READY = "ready"          # its worker registered
    UNREGISTERED = "unregistered"  # its worker is gone while the VM runs: wait boot_timeout_s again
    REPLACE = "replace"      # remove it and create another (boot timeout)
    DRAIN = "drain"          # ask its worker to take no more jobs
    STOP = "stop"            # its worker runs nothing: shut the VM down
    REMOVE = "remove"        # destroy, undefine, delete its files, revoke its credentials
    LOST = "lost"            # its domain vanished or stopped, or its host is down: revoke its worker
    CLEANUP = "cleanup"      # a leftover domain or file with no record


@dataclass(frozen=True)
class Decision:
    action: Action
    vm: str | None
    reason: str

    def to_json(self) -> dict:
        return {"action": self.action.value, "vm_name": self.vm, "reason": self.reason}


GOING = (VMState.DRAINING.value, VMState.STOPPING.value)
# A host's room when no per-host limit is set: more than max_vms can ever ask for.
NO_LIMIT = 10**6


def staying(records) -> list[VMRecord]:
    """The VMs that are not on their way out."""
    return [r for r in records if r.state not in GOING]


def on_hosts(records, hosts: set[str] | None) -> list[VMRecord]:
    """The records on `hosts` (None: all): what a pass can act on."""
    return [r for r in records if hosts is None or r.host_uri in hosts]


def held(records) -> list[VMRecord]:
    """The VMs that count toward max_vms: all but those lost with their host."""
    return [r for r in records if not r.lost]


def host_use(cfg: ScalerConfig, records, uri: str) -> dict:
    """What our VMs take of one host: vms, vcpus, memory_mb."""
    mine = [r for r in records if r.host_uri == uri]
    return {"vms": len(mine), "vcpus": sum(r.vcpus or cfg.vcpus for r in mine),
            "memory_mb": sum(r.memory_mb or cfg.memory_mb for r in mine)}


def host_room(cfg: ScalerConfig, records, hosts) -> dict[str, int]:
    """How many more VMs of the configured shape each of `hosts` takes (NO_LIMIT: no limit set)."""
    room = {}
    for uri in hosts:
        use = host_use(cfg, records, uri)
        limits = cfg.limits_for(uri)
        fits = [NO_LIMIT]
        if limits["vms"]:
            fits.append(limits["vms"] - use["vms"])
        if limits["vcpus"]:
            fits.append((limits["vcpus"] - use["vcpus"]) // cfg.vcpus)
        if limits["memory_mb"]:
            fits.append((limits["memory_mb"] - use["memory_mb"]) // cfg.memory_mb)
        room[uri] = max(0, min(fits))
    return room


def place(cfg: ScalerConfig, records, hosts) -> str | None:
    """The host a new VM goes to: of `hosts` with room, the one running the fewest
    of ours (then by URI, so placement is repeatable); None when none has room."""
    room = host_room(cfg, records, hosts)
    fits = [uri for uri in sorted(room) if room[uri] > 0]
    if not fits:
        return None
    return min(fits, key=lambda uri: host_use(cfg, records, uri)["vms"])


def host_limits(cfg: ScalerConfig) -> str:
    """The per-host limits, as a decision's reason names them."""
    set_ = [f"{name}={getattr(cfg, name)}" for name in ("host_max_vms", "host_max_vcpus",
                                                         "host_max_memory_mb") if getattr(cfg, name)]
    set_ += [f"host_limits {entry}" for entry in cfg.host_limits]
    return ", ".join(set_) or "no per-host limit"


def scale_up(cfg: ScalerConfig, records: list[VMRecord], queue: QueueView, *, now: float,
             last_scale_up_at: float, hosts: set[str] | None = None) -> list[Decision]:
    """Decisions to add VMs: RESUMEs of draining VMs first, then CREATEs, or a HOLD saying why not.

    Three rules may want VMs: `min_vms` and `idle_vms` whatever the cooldown (they
    count the fleet itself, booting VMs included, so they cannot run away), and
    the queue, `step` at a time once `cooldown_s` has passed. The one that wants
    the most is followed; a queue held by its cooldown leaves the other two theirs.
    """
    wants = [w for w in (_below_min(cfg, records), _warm_deficit(cfg, records, queue)) if w]
    free = max(wants, key=lambda w: w[0], default=None)
    queued = _queue_want(cfg, records, queue)
    cooldown = last_scale_up_at + cfg.cooldown_s - now
    if queued and (free is None or (queued[0] > free[0] and cooldown <= 0)):
        return _add(cfg, records, queue, queued[0], queued[1], hosts, cooldown=cooldown)
    if free is None:
        return []
    return _add(cfg, records, queue, free[0], free[1], hosts, cooldown=0.0)


def _below_min(cfg: ScalerConfig, records: list[VMRecord]) -> tuple[int, str] | None:
    count = len(staying(records))
    if count >= cfg.min_vms:
        return None
    return cfg.min_vms - count, f"{count} VMs, below min_vms={cfg.min_vms}"


def _queue_want(cfg: ScalerConfig, records: list[VMRecord], queue: QueueView) -> tuple[int, str] | None:
    booting = sum(1 for r in records if r.state == VMState.BOOTING.value)
    workers = sum(1 for w in queue.workers.values() if w.state == "active") + booting
    demand = queue.demand
    if demand == 0 or (workers and demand / workers <= cfg.queue_per_worker):
        return None
    return cfg.step, (f"{demand} queued jobs for {workers} workers"
                      + (f" (over {cfg.queue_per_worker:g} per worker)" if workers else ""))


def _warm_deficit(cfg: ScalerConfig, records: list[VMRecord], queue: QueueView) -> tuple[int, str] | None:
    if cfg.idle_vms == 0:
        return None
    idle = len(idle_vms(records, queue))
    booting = sum(1 for r in records if r.state == VMState.BOOTING.value)
    missing = cfg.idle_vms - idle - booting
    if missing <= 0:
        return None
    return missing, f"{idle} idle and {booting} booting VMs: {warm_reason(cfg)}"


def warm_reason(cfg: ScalerConfig) -> str:
    """How the decisions and logs say what idle_vms asks for."""
    return f"keeping {cfg.idle_vms} idle VM{'s' if cfg.idle_vms != 1 else ''} warm (idle_vms={cfg.idle_vms})"


def idle_vms(records, queue: QueueView) -> list[str]:
    """Ready VMs whose worker is active and holds no job, running or reserved: spare
    capacity a job starts on at once. A worker's `idle_s` is None while it holds one.

    Whatever their host's reachability: a live worker takes jobs without libvirt.
    """
    out = []
    for r in records:
        w = queue.workers.get(r.name)
        if r.state == VMState.READY.value and w is not None and w.state == "active" \
                and w.idle_s is not None:
            out.append(r.name)
    return sorted(out)


def _add(cfg: ScalerConfig, records: list[VMRecord], queue: QueueView, wanted: int, why: str,
         hosts: set[str] | None, *, cooldown: float) -> list[Decision]:
    # Resuming costs nothing and needs no boot: no cooldown and no max_vms for it.
    out = [Decision(Action.RESUME, name, f"{why}: it is up and runs nothing")
           for name in resumable(on_hosts(records, hosts), queue)[:wanted]]
    wanted -= len(out)
    room = cfg.max_vms - len(held(records))
    if wanted <= 0:
        return out
    if room <= 0:
        return out + [Decision(Action.HOLD, None, f"{why}, but already at max_vms={cfg.max_vms} "
                                                  f"(draining and stopping VMs count)")]
    if cooldown > 0:
        return out + [Decision(Action.HOLD, None, f"{why}, but cooling down for {cooldown:.0f} s more")]
    if hosts is not None:
        on_hosts_room = sum(host_room(cfg, records, hosts).values())
        if on_hosts_room <= 0:
            where = "every reachable host is full" if hosts else "no host is reachable"
            return out + [Decision(Action.HOLD, None, f"{why}, but {where} ({host_limits(cfg)})")]
        room = min(room, on_hosts_room)
    return out + [Decision(Action.CREATE, None, why) for _ in range(min(wanted, room))]


def resumable(records: list[VMRecord], queue: QueueView) -> list[str]:
    """Draining VMs whose live worker runs nothing: they can take jobs again at once."""
    out = []
    for r in records:
        w = queue.workers.get(r.name)
        if r.state == VMState.DRAINING.value and w is not None and w.running == 0:
            out.append(r.name)
    return sorted(out)


def scale_down(cfg: ScalerConfig, records: list[VMRecord], queue: QueueView,
               hosts: set[str] | None = None) -> list[Decision]:
    """DRAIN decisions for VMs whose worker has been idle for idle_time_s (down to min_vms)."""
    idle = []
    for r in on_hosts(records, hosts):
        w = queue.workers.get(r.name)
        if (r.state == VMState.READY.value and w is not None and w.state == "active"
                and w.running == 0 and w.idle_s is not None and w.idle_s >= cfg.idle_time_s):
            idle.append((w.idle_s, r.name))
    # Booting VMs are not counted here as they are for scale_up: a VM is drained
    # only while idle_vms others are idle already, never on a boot's promise.
    spare = max(0, min(len(staying(records)) - cfg.min_vms,
                       len(idle_vms(records, queue)) - cfg.idle_vms))
    kept = f"; {warm_reason(cfg)}" if cfg.idle_vms else ""
    return [Decision(Action.DRAIN, name, f"its worker has been idle for {idle_s:.0f} s "
                                         f"(idle_time={cfg.idle_time_s:g} s){kept}")
            for idle_s, name in sorted(idle, reverse=True)[:spare]]


def pick_for_removal(records: list[VMRecord], queue: QueueView, n: int,
                     hosts: set[str] | None = None) -> list[str]:
    """The `n` VMs an admin's `down N` should retire: booting ones, then the least busy."""
    def busy(r: VMRecord):
        w = queue.workers.get(r.name)
        return (r.state != VMState.BOOTING.value, w.running if w else 0, -(w.idle_s or 0) if w else 0)
    return [r.name for r in sorted(staying(on_hosts(records, hosts)), key=busy)[:max(0, n)]]


def retirements(cfg: ScalerConfig, records: list[VMRecord], workers: dict[str, WorkerView],
                active: set[str], *, now: float, hosts: set[str] | None = None) -> list[Decision]:
    """The next step of each VM on its way out: STOP once drained, REMOVE once stopped.

    `active` must hold the running domains of every host in `hosts`: a record on
    a host outside it is skipped, since "not active" would mean "not known" there.
    """
    out = []
    for r in on_hosts(records, hosts):
        w = workers.get(r.name)
        if r.lost:
            out.append(Decision(Action.REMOVE, r.name, "its host answers again"))
        elif r.state == VMState.DRAINING.value:
            if w is not None and w.state == "active":
                out.append(Decision(Action.DRAIN, r.name, "its worker registered after the drain"))
            elif w is None or w.running == 0:
                out.append(Decision(Action.STOP, r.name, "drained: its worker runs nothing"))
        elif r.state == VMState.STOPPING.value:
            if r.name not in active:
                out.append(Decision(Action.REMOVE, r.name, "shut down"))
            elif now - r.state_since >= cfg.shutdown_timeout_s:
                out.append(Decision(Action.REMOVE, r.name, f"no shutdown after "
                                                           f"{cfg.shutdown_timeout_s:g} s: destroyed"))
    return out


def reconcile(cfg: ScalerConfig, records: list[VMRecord], workers: dict[str, WorkerView],
              domains: dict[str, set[str]], active: set[str], files: dict[str, list[str]],
              *, now: float, down: dict[str, float] | None = None) -> list[Decision]:
    """Compare the records with libvirt and the proxy.

    Args:
        domains: host URI -> names of our domains defined there.
        active: names of our domains that are running.
        files: VM name -> paths in the state dir (or its host's pool) that belong to that name.
        down: host URI -> seconds it has not answered, for the hosts down for good.
    """
    out = []
    down = down or {}
    known = {r.name for r in records}
    for r in records:
        if r.host_uri in down:
            if not r.lost:
                out.append(Decision(Action.LOST, r.name, f"its host {r.host_uri} has not answered "
                                                         f"for {down[r.host_uri]:.0f} s"))
            continue
        defined = r.name in domains.get(r.host_uri, set())
        if r.state == VMState.STOPPING.value:
            continue    # retirements() finishes it, whether or not the domain is still there
        if r.host_uri not in domains:
            continue    # a host no longer configured: nothing is known about its domains
        if not defined or r.name not in active:
            why = "its domain vanished" if not defined else "its domain is not running"
            out.append(Decision(Action.LOST, r.name, why))
        elif r.state == VMState.BOOTING.value:
            if r.name in workers:
                out.append(Decision(Action.READY, r.name, "its worker registered"))
            elif now - r.state_since > cfg.boot_timeout_s:
                out.append(Decision(Action.REPLACE, r.name, f"its worker did not register within "
                                                            f"boot_timeout={cfg.boot_timeout_s:g} s"))
        elif r.state == VMState.READY.value and r.name not in workers:
            out.append(Decision(Action.UNREGISTERED, r.name, "its worker is no longer live"))
    for uri, names in sorted(domains.items()):
        for name in sorted(names - known):
            out.append(Decision(Action.CLEANUP, name, f"a domain of ours on {uri} with no record "
                                                      "(left by a crash)"))
    leftover = set(files) - known - set().union(*domains.values())
    for name in sorted(leftover):
        out.append(Decision(Action.CLEANUP, name, "files of ours with no domain and no record"))
    return out
