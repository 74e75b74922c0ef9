"""The scaler: one pass reads the proxy's queue and libvirt's domains, decides, and acts.

A pass (`run_once`) reads as its steps: reach the hosts (reopening lost
connections) -> look (queue, domains, files) -> reconcile (boot timeouts,
vanished domains, leftovers) -> resume draining VMs the queue wants -> move
retiring VMs on (drained -> stop -> remove) -> create VMs for the queue ->
unless VMs were just added, scale down idle VMs -> report to the proxy. Decisions come from policy.py (pure);
this module only carries them out and logs each with its reason. The whole pass,
like each admin command, holds the state file's lock (`_locked`), so an admin's
`jobcloud-vm down 1` and the daemon never interleave.

Nothing in a pass blocks on a guest: draining and shutting down are states a VM
moves through over several passes, so one slow VM never holds up the others.
A host whose libvirt connection fails is left out of the passes (its VMs stay
as they are) until it can be reopened; the other hosts carry on. One that has
not answered for `host_lost_after_s` is down: its VMs are lost as a vanished
VM is (their workers revoked, their jobs requeued), and removed once it answers.
Where clones and the template live (state dir or each host's storage pool) is
storage.py's business.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from jobcloud_datadir import ForeignOwner, make_private

from . import domain, policy, storage
from .config import ScalerConfig, validate
from .errors import ConfigError, LibvirtUnreachable, TemplateMissing, UnknownVM, VMError
from .libvirt_host import Host, open_hosts
from .policy import Action, Decision
from .proxy_client import ProxyClient, QueueView
from .seed import Identity
from .state import ScalerState, StateStore, VMRecord, VMState
from .storage import CONSOLE_SUFFIX, DISK_SUFFIX, SEED_SUFFIX, linked_clone  # noqa: F401 (imported from here)
from .template import load_manifest

log = logging.getLogger("vm_provisioning.scaler")

# The console log of a VM that never registered is kept under this name for diagnosis;
# the newest few only, since a template that never boots fails every boot_timeout_s.
FAILED_CONSOLE_SUFFIX = "-console.failed.log"
KEEP_FAILED_CONSOLES = 5
# A VM's enrollment token expires this long after its boot timeout: long enough for a
# worker that registers late, short enough that a leaked seed ISO enrolls nothing later.
ENROLLMENT_MARGIN_S = 600.0


@dataclass
class Look:
    """What libvirt and the state dir showed this pass."""

    hosts: set[str]                 # the URIs reachable this pass
    domains: dict[str, set[str]]    # URI -> our domains there (recorded, or carrying our id)
    active: set[str]                # names of those that run
    files: dict[str, list[str]]     # leftover candidates: VM name -> its paths (state dir, pools)
    down: dict[str, float]          # URI -> seconds unanswered, for hosts down for good


class Scaler:
    """Clones, watches and retires worker VMs for one proxy.

    Args:
        config: a validated ScalerConfig.
        hosts: open libvirt hosts (default: one per config.libvirt_uris, opened here;
            one that cannot be opened is retried each pass).
        proxy: the admin API client (default: built from config.proxy_url and admin_token).
        clock: time source, for tests.

    Raises:
        LibvirtUnreachable: none of the libvirt URIs can be opened.
    """

    def __init__(self, config: ScalerConfig, *, hosts: list[Host] | None = None,
                 proxy: ProxyClient | None = None, clock=time.time):
        self.config = validate(config)
        self.hosts = {h.uri: h for h in (hosts if hosts is not None else open_hosts(
            config.libvirt_uris, config.libvirt_keepalive_s))}
        self.proxy = proxy or ProxyClient(config.proxy_url, config.admin_token, config.http_timeout_s)
        self.clock = clock
        self.store = StateStore(config.state_dir)
        _secure_state_dir(config.state_dir)
        self._domain_types: dict[str, str] = {}
        self.storage = storage.for_config(self.config)
        # URI -> when this scaler first found it unreachable (since it last answered).
        self._unreachable_since: dict[str, float] = {}
        # Passes run_forever has finished, failed ones included: lets a caller
        # wait for the daemon to have looked, instead of sleeping.
        self.passes = 0

    def close(self) -> None:
        """Close the libvirt connections (those passed in too)."""
        for host in self.hosts.values():
            host.close()

    # ------------------------------------------------------------------ the daemon

    def run_forever(self, stop: threading.Event | None = None) -> None:
        """Run passes every interval_s until `stop` is set (SIGTERM handlers set it)."""
        stop = stop or threading.Event()
        while not stop.is_set():
            try:
                self.run_once()
            except VMError as e:
                log.warning("pass failed, retrying in %.0f s: %s", self.config.interval_s, e)
            except Exception:  # a loop boundary: log it and keep the fleet managed
                log.exception("pass failed unexpectedly")
            self.passes += 1
            stop.wait(self.config.interval_s)

    def run_once(self, now: float | None = None) -> list[Decision]:
        """One pass; returns every decision taken, in order."""
        return self._locked(self._autoscale, now)

    def _autoscale(self, state: ScalerState, queue: QueueView, now: float,
                   hosts: set[str]) -> list[Decision]:
        look = self._look(state, hosts, now)
        decisions = self._reconcile(state, queue, now, look)
        if decisions:
            # What was just done changed the queue (a lost worker's jobs requeued).
            queue = self._queue()
        ups = policy.scale_up(self.config, list(state.vms.values()), queue, now=now,
                              last_scale_up_at=state.last_scale_up_at, hosts=look.hosts)
        # Resumed before the retirements, so a draining VM wanted again is not stopped;
        # created after them, so a create that keeps failing (no template, no host)
        # does not hold retiring VMs up.
        decisions += self._execute(state, [d for d in ups if d.action is Action.RESUME], now, queue)
        decisions += self._advance_retirements(state, queue, now, look)
        decisions += self._execute(state, [d for d in ups if d.action is not Action.RESUME], now, queue)
        # Not in a pass that adds VMs. A HOLD does not stop it: a worker idle for
        # idle_time_s while jobs wait cannot run those jobs.
        if not any(d.action in (Action.CREATE, Action.RESUME) for d in ups):
            decisions += self._execute(state, policy.scale_down(
                self.config, list(state.vms.values()), queue, look.hosts), now, queue)
        return decisions

    # -------------------------------------------------------------- admin commands

    def list_vms(self) -> list[dict]:
        """Our VMs with their worker's view: name, host, state, worker, running, age_s;
        lost: its host stopped answering (it is removed when the host answers again)."""
        queue = self.proxy.queue()
        now = self.clock()
        state = self.store.load()
        rows = []
        for r in sorted(state.vms.values(), key=lambda r: r.created_at):
            w = queue.workers.get(r.name)
            rows.append({"name": r.name, "host": r.host_uri, "state": r.state,
                         "worker": w.name if w else None, "worker_state": w.state if w else None,
                         "running": w.running if w else 0, "age_s": now - r.created_at,
                         "lost": r.lost})
        return rows

    def scale_to(self, n: int | None = None, *, delta: int | None = None) -> list[Decision]:
        """Add or retire VMs so that `n` stay, or `delta` more (negative: fewer) than stay now.

        The count is taken under the state lock, so two `up 1` at once add two.
        Retiring VMs drain first.
        """
        if (n is None) == (delta is None):
            raise TypeError("scale_to takes n or delta")

        def act(state, queue, now, hosts):
            count = len(policy.staying(state.vms.values()))
            target = n if delta is None else max(0, count + delta)
            why = f"an admin asked for {target} VMs"
            if target > count:
                wanted = [Decision(Action.CREATE, None, why) for _ in range(target - count)]
            else:
                wanted = [Decision(Action.DRAIN, name, why) for name in policy.pick_for_removal(
                    list(state.vms.values()), queue, count - target, hosts)]
            return self._execute(state, wanted, now, queue)
        return self._locked(act)

    def up(self, n: int) -> list[Decision]:
        return self.scale_to(delta=n)

    def down(self, n: int) -> list[Decision]:
        return self.scale_to(delta=-n)

    def drain(self, name: str) -> list[Decision]:
        """Retire one VM: drain its worker, then stop and remove it once it runs nothing."""
        def act(state, queue, now, hosts):
            self._known(state, name)
            return self._execute(state, [Decision(Action.DRAIN, name, "an admin drained it")], now, queue)
        return self._locked(act)

    def destroy(self, name: str, force: bool = False) -> list[Decision]:
        """Remove one VM now: its worker is revoked first, so any job it runs requeues.

        Without `force` it is drained first and its running jobs counted on a view
        read after the drain, so no job can start on it between the check and the removal.

        Raises:
            UnknownVM: no VM of ours has that name.
            VMError: its worker runs jobs and `force` is not set (it is left draining,
                and goes once they end), or its host is unreachable or not configured.
        """
        def act(state, queue, now, hosts):
            record = self._known(state, name)
            if record.host_uri not in hosts:
                raise VMError(f"{name} is on {record.host_uri}, which is "
                              f"{self._host_trouble(record.host_uri)}: its domain cannot be "
                              "removed from here")
            if not force:
                if record.state in (VMState.BOOTING.value, VMState.READY.value):
                    self._execute(state, [Decision(Action.DRAIN, name, "an admin is destroying it")],
                                  now, queue)
                queue = self.proxy.queue()
                worker = queue.workers.get(name)
                if worker is not None and worker.running:
                    raise VMError(f"{name} runs {worker.running} job(s): it is draining now and goes "
                                  "once they end; force it to remove it now (its jobs then requeue)")
            return self._execute(state, [Decision(Action.REMOVE, name, "an admin destroyed it")],
                                 now, queue)
        return self._locked(act)

    def settle(self, names: set[str], timeout_s: float, poll_s: float = 2.0) -> set[str]:
        """Run reconcile and retirement steps until `names` are gone or `timeout_s`
        passes; returns those left."""
        def step(state, queue, now, hosts):
            look = self._look(state, hosts, now)
            return self._reconcile(state, queue, now, look) + \
                self._advance_retirements(state, queue, now, look)

        deadline = time.monotonic() + timeout_s
        while True:
            self._locked(step)
            left = names & set(self.store.load().vms)
            if not left or time.monotonic() >= deadline:
                return left
            time.sleep(poll_s)

    @staticmethod
    def _known(state: ScalerState, name: str) -> VMRecord:
        if name not in state.vms:
            raise UnknownVM(f"no VM named {name!r} is managed by this scaler "
                            "(jobcloud-vm list shows them)")
        return state.vms[name]

    # ------------------------------------------------------------------ the steps

    def _locked(self, act, now: float | None = None) -> list[Decision]:
        """Under the state lock: reach the hosts, read the queue, `act`, report what it did.

        `act(state, queue, now, hosts)` carries its decisions out and returns them;
        `hosts` are the URIs reachable now.
        """
        now = self.clock() if now is None else now
        with self.store.locked() as state:
            hosts = self._reachable(state, now)
            queue = self._queue()
            done = act(state, queue, now, hosts)
            self._report(state, done)
        return done

    def _reconcile(self, state: ScalerState, queue: QueueView, now: float, look: Look) -> list[Decision]:
        return self._execute(state, policy.reconcile(
            self.config, list(state.vms.values()), queue.workers, look.domains, look.active,
            look.files, now=now, down=look.down), now, queue)

    def _advance_retirements(self, state: ScalerState, queue: QueueView, now: float,
                             look: Look) -> list[Decision]:
        return self._execute(state, policy.retirements(
            self.config, list(state.vms.values()), queue.workers, look.active, now=now,
            hosts=look.hosts), now, queue)

    def _execute(self, state: ScalerState, decisions: list[Decision], now: float,
                 queue: QueueView) -> list[Decision]:
        done = []
        for d in decisions:
            if d.action is Action.HOLD:
                log.debug("hold: %s", d.reason)
            else:
                log.info("%s %s: %s", d.action.value, d.vm or "a new VM", d.reason)
            record = state.vms.get(d.vm) if d.vm else None
            if d.action is Action.CREATE:
                d = Decision(d.action, self._create(state, now), d.reason)
                state.last_scale_up_at = now
            elif d.action is Action.RESUME:
                self.proxy.worker_action(queue.workers[d.vm].id, "resume")
                self._set_state(record, VMState.READY, now)
            elif d.action is Action.READY:
                self._set_state(record, VMState.READY, now, worker_id=queue.workers[d.vm].id)
            elif d.action is Action.UNREGISTERED:
                self._set_state(record, VMState.BOOTING, now)
            elif d.action is Action.DRAIN:
                worker_id = self._worker_id(record, queue)
                if worker_id:
                    self.proxy.worker_action(worker_id, "drain")
                self._set_state(record, VMState.DRAINING, now)
            elif d.action is Action.STOP:
                d = self._stop(record, d, now)
                if d is None:
                    continue
            elif d.action is Action.LOST and record.host_uri in self._down(now):
                self._abandon(record, queue, now)
            elif d.action in (Action.REMOVE, Action.LOST):
                self._remove(state, record, queue)
            elif d.action is Action.REPLACE:
                self._remove(state, record, queue, keep_console=True)
                replacement = self._create(state, now)
                d = Decision(d.action, d.vm, f"{d.reason}; replaced by {replacement}")
            elif d.action is Action.CLEANUP:
                self._cleanup(state, d.vm)
            done.append(d)
        return done

    # ------------------------------------------------------------- one VM's life

    def _create(self, state: ScalerState, now: float) -> str:
        """Clone the template, give the clone its identity, define and start it. Returns its name."""
        cfg = self.config
        template = Path(cfg.template_dir)
        manifest = load_manifest(template)
        host = self._place(state)
        name = domain.new_name(cfg.name_prefix)
        paths = self.storage.paths(host, name)
        record = VMRecord(name=name, uuid=domain.new_uuid(), host_uri=host.uri, mac=domain.new_mac(),
                          disk=paths.disk, seed=paths.seed, console_log=paths.console,
                          created_at=now, state_since=now, vcpus=cfg.vcpus, memory_mb=cfg.memory_mb)
        try:
            boot = self.storage.boot_files(host, template, manifest)
            self.storage.clone(host, paths, boot, manifest)
            record.enrollment_id, token = self.proxy.create_enrollment(
                f"vm {name}", cfg.boot_timeout_s + ENROLLMENT_MARGIN_S)
            # Recorded as soon as it holds something to undo: after a crash from here
            # on, reconcile finds a record without a domain (LOST) and revokes the
            # token and deletes the files, instead of an unknown domain or token.
            state.vms[name] = record
            self.store.save(state)
            self.storage.put_seed(host, paths, Identity(
                instance_id=record.uuid, hostname=name, worker_name=name,
                proxy_url=cfg.resolved_guest_proxy_url, enrollment_token=token,
                slots=cfg.worker_slots))
            host.define_and_start(domain.domain_xml(domain.DomainSpec(
                name=name, uuid=record.uuid, mac=record.mac,
                domain_type=self._domain_type(host), memory_mb=cfg.memory_mb, vcpus=cfg.vcpus,
                disk=record.disk, seed=record.seed, kernel=boot.kernel, initrd=boot.initrd,
                cmdline=manifest["cmdline"], console_log=record.console_log,
                scaler_id=state.scaler_id)))
        except BaseException:
            # Files first: in the state dir they cannot fail to go (in a pool they are
            # leftovers for a later pass if they do); the token is the proxy's, and one
            # that cannot be revoked now expires by itself.
            state.vms.pop(name, None)
            try:
                self.storage.delete(host, record)
            except VMError as e:
                log.warning("could not delete the files of %s (a later pass does): %s", name, e)
            if record.enrollment_id:
                try:
                    self.proxy.revoke_enrollment(record.enrollment_id)
                except VMError as e:
                    log.warning("could not revoke the enrollment token of %s (it expires by "
                                "itself): %s", name, e)
            raise
        return name

    def _stop(self, record: VMRecord, decision: Decision, now: float) -> Decision | None:
        """Revoke a drained VM's worker and shut the VM down, checked against the worker
        as the proxy has it now: the pass's view can be older than a worker that
        registered since (the VM was drained while it booted). Returns what was done
        (a DRAIN for such a worker), or None when its worker holds a running job."""
        worker = self.proxy.queue().workers.get(record.name)
        if worker is not None and worker.state == "active":
            self.proxy.worker_action(worker.id, "drain")
            log.info("drain %s: its worker registered after the drain; stopped once it runs nothing",
                     record.name)
            return Decision(Action.DRAIN, record.name, "its worker registered after the drain")
        if worker is not None and worker.running:
            log.info("%s is not stopped: its worker runs %d job(s)", record.name, worker.running)
            return None
        # Revoked before the shutdown, so the worker cannot claim a job it would then lose.
        worker_id = worker.id if worker is not None else record.worker_id
        if worker_id:
            self.proxy.worker_action(worker_id, "revoke")
        self.hosts[record.host_uri].shutdown(record.name)
        self._set_state(record, VMState.STOPPING, now)
        return decision

    def _remove(self, state: ScalerState, record: VMRecord, queue: QueueView,
                keep_console: bool = False) -> None:
        """Destroy and undefine the domain, delete its files, revoke its credentials.

        The record goes last: if any step fails, the next pass finds the record
        (LOST, its domain gone) and finishes, the token's revocation included.

        Raises:
            VMError: its host is not reachable (or configured): its domain's state is
                unknown, so nothing of it is touched.
        """
        host = self.hosts.get(record.host_uri)
        if host is None or not host.reachable:
            raise VMError(f"{record.name} is on {record.host_uri}, which is "
                          f"{self._host_trouble(record.host_uri)}: left as it is")
        # Revoke first: the worker's running jobs requeue at once instead of
        # waiting for their lease, and its secret can never be used again.
        worker_id = self._worker_id(record, queue)
        if worker_id:
            self.proxy.worker_action(worker_id, "revoke")
        host.destroy_and_undefine(record.name)
        if keep_console:
            self._keep_console(host, record)
        self.storage.delete(host, record)
        if record.enrollment_id:
            self.proxy.revoke_enrollment(record.enrollment_id)
        state.vms.pop(record.name, None)

    def _abandon(self, record: VMRecord, queue: QueueView, now: float) -> None:
        """A VM whose host stopped answering: its worker is revoked now, so its jobs
        requeue as a vanished VM's do, and its token too; its domain and files are
        removed when the host answers again (retirements' REMOVE)."""
        worker_id = self._worker_id(record, queue)
        if worker_id:
            self.proxy.worker_action(worker_id, "revoke")
        if record.enrollment_id:
            self.proxy.revoke_enrollment(record.enrollment_id)
        self._set_state(record, VMState.STOPPING, now, lost=True)

    def _keep_console(self, host: Host, record: VMRecord) -> None:
        kept = Path(self.config.state_dir) / (record.name + FAILED_CONSOLE_SUFFIX)
        if not self.storage.keep_console(host, record, kept):
            return
        os.utime(kept)      # newest first below means most recently failed
        pattern = self.config.name_prefix + "*" + FAILED_CONSOLE_SUFFIX
        failed = sorted(Path(self.config.state_dir).glob(pattern), key=lambda p: p.stat().st_mtime,
                        reverse=True)
        for old in failed[KEEP_FAILED_CONSOLES:]:
            old.unlink(missing_ok=True)

    def _cleanup(self, state: ScalerState, name: str) -> None:
        """Remove a leftover: its domain only where it carries this scaler's id."""
        for host in self.hosts.values():
            if host.reachable and domain.scaler_id_of(host.domain_xml(name)) == state.scaler_id:
                host.destroy_and_undefine(name)
            if host.reachable:
                self.storage.cleanup(host, name)
        for path in self._paths(name).values():
            path.unlink(missing_ok=True)
        Path(self.config.state_dir, name + SEED_SUFFIX + ".partial").unlink(missing_ok=True)

    @staticmethod
    def _worker_id(record: VMRecord, queue: QueueView) -> str | None:
        worker = queue.workers.get(record.name)
        return worker.id if worker else record.worker_id

    def _set_state(self, record: VMRecord, new: VMState, now: float, **changes) -> None:
        record.state = new.value
        record.state_since = now
        for key, value in changes.items():
            setattr(record, key, value)

    # --------------------------------------------------------------------- looking

    def _reachable(self, state: ScalerState, now: float) -> set[str]:
        """The hosts connected now (lost connections reopened when due); the VMs on
        the others are logged, and every step leaves them as they are."""
        hosts = set()
        for uri, host in self.hosts.items():
            if host.reconnect_if_due(now):
                hosts.add(uri)
                self._unreachable_since.pop(uri, None)
            else:
                self._unreachable_since.setdefault(uri, now)
        for r in state.vms.values():
            if r.host_uri not in hosts:
                log.warning("%s is on %s, which is %s: left as it is", r.name, r.host_uri,
                            self._host_trouble(r.host_uri))
        return hosts

    def _host_trouble(self, uri: str) -> str:
        return "unreachable" if uri in self.hosts else "not in libvirt_uris"

    def _down(self, now: float) -> dict[str, float]:
        """Configured hosts unreachable for host_lost_after_s: URI -> seconds unanswered."""
        return {uri: now - since for uri, since in self._unreachable_since.items()
                if uri in self.hosts and not self.hosts[uri].reachable
                and now - since >= self.config.host_lost_after_s}

    def _look(self, state: ScalerState, hosts: set[str], now: float) -> Look:
        """Our domains on the reachable hosts, and our files in the state dir.

        A domain named like ours is ours when a record names it or it carries this
        scaler's id; another scaler's are left alone, files included. Files are
        leftover candidates only when every configured host was seen: a file's
        domain may be on a host that was not.
        """
        look = Look(hosts=set(hosts), domains={}, active=set(), files={}, down={})
        seen: set[str] = set()
        files = self._our_files()
        for uri in sorted(hosts):
            host = self.hosts[uri]
            try:
                names = {n for n in host.domain_names() if domain.is_our_name(n, self.config.name_prefix)}
                ours = {n for n in names if n in state.vms
                        or domain.scaler_id_of(host.domain_xml(n)) == state.scaler_id}
                active = {n for n in ours if host.is_active(n)}
                pooled = self.storage.leftovers(host, self.config.name_prefix)
            except LibvirtUnreachable as e:
                log.warning("%s: left out of this pass", e)
                look.hosts.discard(uri)
                self._unreachable_since.setdefault(uri, now)
                continue
            look.domains[uri] = ours
            look.active |= active
            seen |= names
            for name, paths in pooled.items():
                files.setdefault(name, []).extend(paths)
        if look.hosts == set(self.hosts):
            look.files = {n: p for n, p in files.items() if n not in seen}
        look.down = self._down(now)
        return look

    def _queue(self) -> QueueView:
        """The proxy's queue, with `runnable` counting the jobs a VM of ours could run."""
        return self.proxy.queue(self._shape())

    def _shape(self) -> dict | None:
        """The worker a VM of ours is: its cpus, memory_mb, gpus and the template's images."""
        cfg = self.config
        try:
            images = sorted(load_manifest(Path(cfg.template_dir)).get("contents", {}).get("images", {}))
        except TemplateMissing:
            images = []     # creating a VM fails with the clear error anyway
        return {"cpus": cfg.vcpus, "memory_mb": cfg.memory_mb, "gpus": 0, "images": images} \
            if images else None

    def _our_files(self) -> dict[str, list[str]]:
        files: dict[str, list[str]] = {}
        root = Path(self.config.state_dir)
        if root.is_dir():
            for path in root.iterdir():
                name = path.name[:len(self.config.name_prefix) + 10]
                if domain.is_our_name(name, self.config.name_prefix) \
                        and not path.name.endswith(FAILED_CONSOLE_SUFFIX):
                    files.setdefault(name, []).append(str(path))
        return files

    def _paths(self, name: str) -> dict[str, Path]:
        root = Path(self.config.state_dir).resolve()
        return {"disk": root / (name + DISK_SUFFIX), "seed": root / (name + SEED_SUFFIX),
                "console": root / (name + CONSOLE_SUFFIX)}

    def _place(self, state: ScalerState) -> Host:
        """The host the next VM goes to (policy.place).

        Raises:
            LibvirtUnreachable: no host is reachable.
            VMError: none of them has room.
        """
        reachable = {uri for uri, host in self.hosts.items() if host.reachable}
        if not reachable:
            raise LibvirtUnreachable("no libvirt host is reachable: "
                                     f"{', '.join(sorted(self.hosts))}")
        uri = policy.place(self.config, list(state.vms.values()), reachable)
        if uri is None:
            raise VMError(f"no reachable host has room for another VM "
                          f"({policy.host_limits(self.config)})")
        return self.hosts[uri]

    def host_status(self) -> list[dict]:
        """Each configured host: reachable or not (reopened if due), where its clones
        live, what our VMs take of it, and the room left (None: no per-host limit)."""
        now = self.clock()
        records = list(self.store.load().vms.values())
        rows = []
        for uri in sorted(self.hosts):
            host = self.hosts[uri]
            reachable = host.reconnect_if_due(now)
            room = policy.host_room(self.config, records, [uri])[uri]
            rows.append({"uri": uri, "reachable": reachable, "storage": self.storage.describe(host),
                         **policy.host_use(self.config, records, uri),
                         "lost": sum(1 for r in records if r.host_uri == uri and r.lost),
                         "room": None if room >= policy.NO_LIMIT else room})
        return rows

    def _domain_type(self, host: Host) -> str:
        if host.uri not in self._domain_types:
            wanted = self.config.domain_type
            self._domain_types[host.uri] = (wanted if wanted != "auto"
                                            else "kvm" if host.offers_kvm() else "qemu")
        return self._domain_types[host.uri]

    def _report(self, state: ScalerState, decisions: list[Decision]) -> None:
        """Tell the proxy our VMs and decisions (dashboard, /metrics); a failure costs only the report."""
        vms = [{"name": r.name, "host_uri": r.host_uri, "state": r.state, "worker_name": r.name,
                "created_at": r.created_at} for r in state.vms.values()]
        events = [d.to_json() for d in decisions if d.action is not Action.HOLD]
        try:
            shape = self._shape()
            self.proxy.report(vms, events, [shape] if shape else [])
        except VMError as e:
            log.warning("could not report to the proxy: %s", e)


def _secure_state_dir(state_dir: str) -> None:
    """The state dir 0711 and its files 0600: they hold the scaler's state, each
    clone's disk (its worker secret, once registered) and seed (an enrollment
    token) and console log.

    0711, not 0700: libvirt's QEMU runs as another user (libvirt-qemu) and
    opens a clone's disk and seed by path, so it must pass through the
    directory; it cannot list it. It reads the 0600 files because libvirt
    hands each one to that user while its domain runs (dynamic_ownership, on
    by default in qemu.conf) and back afterwards. docs/SECURITY.md.

    Raises:
        ConfigError: the directory belongs to another user.
    """
    try:
        tightened = make_private(state_dir, dir_mode=0o711)
    except ForeignOwner as e:
        raise ConfigError(str(e)) from None
    if tightened:
        log.warning("state dir %s: removed group/other access from %d file(s) and directories",
                    state_dir, tightened)

