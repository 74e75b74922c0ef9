"""The scaler on two real libvirt hosts with storage pools (issue 17, item 4).

Host one is the machine's libvirtd (qemu:///system, started by
scripts/libvirt-up.sh); host two is a second libvirtd this module starts in
session mode as user `nobody`, with its own socket, state and storage pool, and
reaches as qemu+unix:///session?socket=... : two daemons that share nothing but
the kernel, as two hypervisor hosts would. Templates and clones go to each
host's pool over the libvirt connection (storage_pool), never by path.

The guests are real QEMU processes under TCG that boot nothing worth the wait:
the "kernel" is a 36-byte multiboot image that halts at once, so a domain runs,
costs no CPU and is destroyed like any other (QEMU opens every disk and the
kernel and initrd volumes as it starts, so a running domain shows the pool's
backing chain is usable). The workers "in" them register and claim through the
real proxy, as in tests/test_vm_scaler.py. A real guest's boot and registration
are tests/test_vm_e2e.py's (on qemu:///system): the same template and seed,
whether its disk is a file or a volume; booting one here too cost 75-340 s of
`make test` on this 2-core box.
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import struct
import subprocess
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path

import pytest

from tests.conftest import ROOT, require, wait_until
from tests.test_vm_scaler import actions, proxy, require_libvirt  # noqa: F401  (proxy: fixture)
from vm_provisioning import policy
from vm_provisioning.cli import main
from vm_provisioning.config import ScalerConfig, load_config
from vm_provisioning.errors import ConfigError, VMError
from vm_provisioning.libvirt_host import open_host
from vm_provisioning.policy import Action
from vm_provisioning.scaler import Scaler
from vm_provisioning.state import VMRecord
from vm_provisioning.storage import HASH_SUFFIX, PoolStorage

SYSTEM = "qemu:///system"
# Not the other VM tests' prefixes, and this run's own: another run of the suite may
# share qemu:///system, and the teardown removes every domain with this prefix.
PREFIX = f"jmh{secrets.token_hex(2)}-"
KEEPALIVE_S = 1
# A TCG boot takes 40-140 s here, more on a loaded machine.


def multiboot_halt() -> bytes:
    """A multiboot kernel (flat, a.out kludge) whose code is `cli; hlt; jmp $-1`."""
    magic, flags, load, header = 0x1BADB002, 0x00010000, 0x100000, 32
    code = bytes.fromhex("faf4ebfd")
    end = load + header + len(code)
    return struct.pack("<8I", magic, flags, (-(magic + flags)) & 0xFFFFFFFF, load, load, end, end,
                       load + header) + code


def make_template(root: Path, disk_mb: int = 16) -> Path:
    require(shutil.which("qemu-img") is not None, "qemu-img not installed (apt-get install qemu-utils)")
    root.mkdir(parents=True, exist_ok=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(root / "disk.qcow2"),
                    f"{disk_mb}M"], check=True)
    (root / "vmlinuz").write_bytes(multiboot_halt())
    (root / "initrd.img").write_bytes(b"initrd")
    (root / "manifest.json").write_text(json.dumps({
        "disk": "disk.qcow2", "kernel": "vmlinuz", "initrd": "initrd.img", "cmdline": "halt",
        "disk_format": "qcow2", "virtual_size_bytes": disk_mb * 1024 * 1024, "files": {},
        "contents": {"images": {"jobcloud/python": "sha256:test"}}, "input_hash": "test"}))
    return root


# ------------------------------------------------------------------- the two hosts

class SecondDaemon:
    """A libvirtd in session mode as `nobody`: its own socket, config, state and pool dir."""

    def __init__(self):
        self.root = Path(tempfile.mkdtemp(prefix="jobcloud-host2-"))
        self.pool_dir = self.root / "pool"
        self.socket = self.root / "run" / "libvirt" / "libvirt-sock"
        self.uri = f"qemu+unix:///session?socket={self.socket}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        for sub in ("run", "config/libvirt", "cache", "data", "pool"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        # QEMU's own stdout/stderr to a file, not through a virtlogd this daemon would
        # spawn and leave running after it.
        (self.root / "config" / "libvirt" / "qemu.conf").write_text('stdio_handler = "file"\n')
        subprocess.run(["chown", "-R", "nobody:nogroup", str(self.root)], check=True)
        os.chmod(self.root / "run", 0o700)
        env = {"HOME": str(self.root), "XDG_RUNTIME_DIR": str(self.root / "run"),
               "XDG_CONFIG_HOME": str(self.root / "config"), "XDG_CACHE_HOME": str(self.root / "cache"),
               "XDG_DATA_HOME": str(self.root / "data"), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
        self.socket.unlink(missing_ok=True)
        with open(self.root / "libvirtd.log", "ab") as log:
            self.proc = subprocess.Popen(
                ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "libvirtd"],
                env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)
        wait_until(lambda: self.socket.exists() or self.proc.poll() is not None, timeout=30,
                   what="the second libvirtd's socket")
        assert self.proc.poll() is None, (self.root / "libvirtd.log").read_text()[-2000:]

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.signal(signal.SIGCONT)
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.proc.wait()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def second_daemon():
    require_libvirt()
    require(os.geteuid() == 0, "the second libvirtd is started as nobody: needs root")
    require(shutil.which("libvirtd") is not None and shutil.which("setpriv") is not None,
            "libvirtd or setpriv missing: run scripts/system-deps.sh (make test does)")
    daemon = SecondDaemon()
    daemon.start()
    yield daemon
    daemon.stop()


@pytest.fixture(scope="module")
def system_daemon():
    require_libvirt()
    if os.geteuid() == 0 and shutil.which("libvirtd"):
        subprocess.run([str(ROOT / "scripts" / "libvirt-up.sh")], capture_output=True, check=False)
    try:
        host = open_host(SYSTEM)
    except VMError as e:
        require(False, f"libvirtd does not answer on {SYSTEM} ({e}): run scripts/libvirt-up.sh")
    host.close()
    return SYSTEM


@pytest.fixture
def pool_name(system_daemon, second_daemon):
    """A pool name of this test's own: created by the scaler on host one (under
    /var/lib/libvirt/images, which libvirt's QEMU can reach), defined beforehand on host two
    in its daemon's own directory, as an admin would where the scaler cannot create it."""
    name = "jobcloud-test-" + secrets.token_hex(4)
    host2 = open_host(second_daemon.uri)
    host2.conn.storagePoolCreateXML(
        f"<pool type='dir'><name>{name}</name><target><path>{second_daemon.pool_dir}</path>"
        "</target></pool>", 0)
    host2.close()
    yield name
    for uri in (system_daemon, second_daemon.uri):
        second_daemon.signal(signal.SIGCONT)
        host = open_host(uri)
        try:
            for dom in host.conn.listAllDomains(0):
                if dom.name().startswith(PREFIX):
                    host.destroy_and_undefine(dom.name())
            if name in host.conn.listStoragePools():
                pool = host.conn.storagePoolLookupByName(name)
                pool.refresh(0)
                for vol in pool.listAllVolumes(0):
                    vol.delete(0)
                pool.destroy()
                if uri == SYSTEM:
                    pool.delete(0)      # its directory, which the scaler made
                    pool.undefine()
        finally:
            host.close()


@pytest.fixture
def config(tmp_path, proxy, pool_name, system_daemon, second_daemon):
    return ScalerConfig(template_dir=str(make_template(tmp_path / "template")),
                        state_dir=str(tmp_path / "state"), proxy_url=proxy.url,
                        admin_token=proxy.admin["token"],
                        libvirt_uris=(system_daemon, second_daemon.uri), domain_type="qemu",
                        storage_pool=pool_name, name_prefix=PREFIX, memory_mb=64, vcpus=1,
                        min_vms=0, max_vms=4, step=1, cooldown_s=0, idle_time_s=3600,
                        boot_timeout_s=600, shutdown_timeout_s=0, queue_per_worker=0.5,
                        libvirt_keepalive_s=KEEPALIVE_S, host_lost_after_s=0)


@pytest.fixture
def make_scaler(config):
    made = []

    def make(**changes) -> Scaler:
        scaler = Scaler(replace(config, **changes))
        made.append(scaler)
        return scaler
    yield make
    for scaler in made:
        scaler.close()


def vms_by_host(scaler: Scaler) -> dict[str, list[VMRecord]]:
    out: dict[str, list[VMRecord]] = {}
    for r in scaler.store.load().vms.values():
        out.setdefault(r.host_uri, []).append(r)
    return out


def pool_files(scaler: Scaler, uri: str) -> dict[str, str]:
    return scaler.hosts[uri].volumes(scaler.config.storage_pool)


def template_copies(volumes) -> list[str]:
    return sorted(n for n in volumes if n.startswith(PREFIX + "template-") and n.endswith("disk.qcow2"))


# ------------------------------------------------------------------------ tests

def test_clones_on_both_hosts_within_their_room_and_retires_one_on_each(make_scaler, proxy, config):
    scaler = make_scaler(host_max_vms=1)
    assert [d.action for d in scaler.up(2)] == [Action.CREATE, Action.CREATE]
    placed = vms_by_host(scaler)
    assert sorted(placed) == sorted(config.libvirt_uris) and all(len(v) == 1 for v in placed.values())
    for uri, (vm,) in placed.items():
        host = scaler.hosts[uri]
        assert host.is_active(vm.name)
        volumes = pool_files(scaler, uri)
        (copy,) = template_copies(volumes)          # the template went to each host once
        assert copy + HASH_SUFFIX in volumes
        # the clone is a volume of the pool, backed by that host's copy of the template
        assert vm.disk == volumes[f"{vm.name}.qcow2"] and vm.seed == volumes[f"{vm.name}-seed.iso"]
        assert host.volume_backing(config.storage_pool, f"{vm.name}.qcow2") == volumes[copy]
        disk = ET.fromstring(host.domain_xml(vm.name)).find("devices/disk/source").get("file")
        kernel = ET.fromstring(host.domain_xml(vm.name)).findtext("os/kernel")
        assert disk == vm.disk and kernel.startswith(str(Path(volumes[copy]).parent))
    # no room left on either host: the queue is held, and an admin's up says why
    proxy.hub.submit(memory_mb=64)
    proxy.hub.submit(memory_mb=64)
    (hold,) = scaler.run_once()
    assert hold.action is Action.HOLD and "every reachable host is full (host_max_vms=1)" in hold.reason
    with pytest.raises(VMError, match="no reachable host has room.*host_max_vms=1"):
        scaler.up(1)
    rows = {r["uri"]: r for r in scaler.host_status()}
    assert all((r["reachable"], r["vms"], r["vcpus"], r["memory_mb"], r["room"]) == (True, 1, 1, 64, 0)
               for r in rows.values())
    # a worker in each registers; each VM is then retired: drained, stopped, removed
    for vms in placed.values():
        proxy.hub.register(vms[0].name)
    assert sorted(a for a, _ in actions(scaler.run_once()) if a != "hold") == ["ready", "ready"]
    names = {vms[0].name for vms in placed.values()}
    for name in names:
        scaler.drain(name)
    assert scaler.settle(names, timeout_s=60, poll_s=0.2) == set()
    for uri, (vm,) in placed.items():
        assert not scaler.hosts[uri].exists(vm.name)
        left = pool_files(scaler, uri)
        assert not [n for n in left if n.startswith(vm.name)]      # disk, seed, console log
        assert template_copies(left)                               # the copy stays for the next
        assert proxy.workers()[vm.name]["state"] == "revoked"


def test_the_template_is_uploaded_once_per_host_and_again_when_it_differs(make_scaler, config):
    template = Path(config.template_dir)
    manifest = json.loads((template / "manifest.json").read_text())
    scaler = make_scaler()
    for uri, host in scaler.hosts.items():
        make_template(template)                     # the same first template on each host
        first = PoolStorage(config).boot_files(host, template, manifest)
        os.utime(first.disk, ns=(1, 1))             # an upload would write it anew
        again = PoolStorage(config).boot_files(host, template, manifest)   # no cache of hashes
        assert again == first and os.stat(first.disk).st_mtime_ns == 1
        # a copy whose hash sidecar does not match (an upload cut short) is uploaded again
        Path(first.disk + HASH_SUFFIX).write_text("0" * 64)
        assert PoolStorage(config).boot_files(host, template, manifest) == first
        assert os.stat(first.disk).st_mtime_ns != 1
        # a clone keeps its backing copy when the template changes ...
        clone = host.create_overlay(config.storage_pool, f"{PREFIX}0123456789.qcow2", first.disk, 2**24)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(template / "disk.qcow2"), "32M"],
                       check=True)
        second = PoolStorage(config).boot_files(host, template, manifest)
        assert second.disk != first.disk and second.kernel == first.kernel
        assert template_copies(pool_files(scaler, uri)) == sorted(
            Path(p).name for p in (first.disk, second.disk))
        # ... and the old copy goes with the next upload once nothing is backed by it
        host.delete_volume(config.storage_pool, Path(clone).name)
        make_template(template, disk_mb=8)
        third = PoolStorage(config).boot_files(host, template, manifest)
        left = pool_files(scaler, uri)
        assert template_copies(left) == [Path(third.disk).name]
        assert Path(first.disk).name + HASH_SUFFIX not in left


def test_a_host_that_stops_answering_loses_its_vms_and_is_used_again(make_scaler, proxy,
                                                                     second_daemon, config):
    scaler = make_scaler()
    scaler.up(2)
    placed = {uri: vms[0] for uri, vms in vms_by_host(scaler).items()}
    here, there = placed[SYSTEM], placed[second_daemon.uri]
    jobs = [proxy.hub.submit(memory_mb=64), proxy.hub.submit(memory_mb=64)]
    workers = {vm.name: proxy.hub.register(vm.name) for vm in (here, there)}
    claimed = {vm.name: [j["id"] for j in workers[vm.name].claim()] for vm in (here, there)}
    assert sorted(j for ids in claimed.values() for j in ids) == sorted(jobs)
    assert sorted(a for a, _ in actions(scaler.run_once())) == ["ready", "ready"]

    second_daemon.signal(signal.SIGSTOP)        # host two hangs: no error, no answer
    try:
        got = scaler.run_once()
    finally:
        second_daemon.signal(signal.SIGCONT)
    # keepalive dropped the hung connection; its VM's worker was revoked, its job requeued,
    # and the pass went on to clone a replacement on the host that answers
    assert actions(got)[0] == ("lost", there.name)
    assert f"its host {second_daemon.uri} has not answered" in got[0].reason
    assert proxy.workers()[there.name]["state"] == "revoked"
    (lost_job,) = claimed[there.name]
    assert proxy.hub.job(lost_job)["state"] == "queued"
    created = [d.vm for d in got if d.action is Action.CREATE]
    assert len(created) == 1 and scaler.store.load().vms[created[0]].host_uri == SYSTEM
    record = scaler.store.load().vms[there.name]
    assert record.lost and record.state == "stopping"
    assert not scaler.hosts[second_daemon.uri].reachable
    assert {r["uri"]: r["reachable"] for r in scaler.host_status()} == {
        SYSTEM: True, second_daemon.uri: True}      # host_status reopens what is due

    # it answers again: the lost VM's domain and volumes go, and the host takes new VMs
    assert ("remove", there.name) in actions(scaler.run_once())
    assert not scaler.hosts[second_daemon.uri].exists(there.name)
    assert not [n for n in pool_files(scaler, second_daemon.uri) if n.startswith(there.name)]
    (d,) = scaler.up(1)
    assert scaler.store.load().vms[d.vm].host_uri == second_daemon.uri
    assert scaler.hosts[second_daemon.uri].is_active(d.vm)


def test_jobcloud_vm_hosts_shows_each_host(make_scaler, config, capsys, monkeypatch):
    # The app's log handler writes to the stdout of the test that created it first (as
    # in tests/test_vm_cli.py): in-process, the CLI would log through it after capsys closed it.
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [h for h in root.handlers if not getattr(h, "_jobcloud", False)])
    scaler = make_scaler()
    (d,) = scaler.up(1)
    placed = scaler.store.load().vms[d.vm].host_uri
    flags = ["--template-dir", config.template_dir, "--state-dir", config.state_dir,
             "--proxy-url", config.proxy_url, "--admin-token", config.admin_token,
             "--storage-pool", config.storage_pool, "--name-prefix", PREFIX, "--memory-mb", "64",
             "--host-max-vms", "2", "--host-max-memory-mb", "1024", "--domain-type", "qemu",
             *(f for uri in config.libvirt_uris for f in ("--libvirt-uri", uri))]
    capsys.readouterr()
    assert main([*flags, "hosts", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert sorted((r["uri"], r["vms"], r["room"]) for r in rows) == sorted(
        [(uri, 1, 1) if uri == placed else (uri, 0, 2) for uri in config.libvirt_uris])
    assert all(r["reachable"] and r["storage"] == f"pool {config.storage_pool}" for r in rows)
    assert main([*flags, "hosts"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["HOST", "STATE", "VMS"] and len(table) == 3


# ------------------------------------------------------------ pure: policy and config

def rec(name: str, host: str, vcpus: int = 0, memory_mb: int = 0, lost: bool = False) -> VMRecord:
    return VMRecord(name=name, uuid="u", host_uri=host, mac="m", disk="d", seed="s", console_log="c",
                    vcpus=vcpus, memory_mb=memory_mb, lost=lost,
                    state="stopping" if lost else "ready")


@pytest.mark.parametrize("limits, records, expected", [
    ({}, [rec("a", "h1")], {"h1": policy.NO_LIMIT, "h2": policy.NO_LIMIT}),
    ({"host_max_vms": 2}, [rec("a", "h1"), rec("b", "h1")], {"h1": 0, "h2": 2}),
    # vCPUs and memory: the records' own shapes, the configured one for new VMs
    ({"host_max_vcpus": 5}, [rec("a", "h1", vcpus=4)], {"h1": 0, "h2": 2}),
    ({"host_max_memory_mb": 4096}, [rec("a", "h1", memory_mb=1024), rec("b", "h2")],
     {"h1": 2, "h2": 1}),
    ({"host_max_vms": 3, "host_max_memory_mb": 8192}, [], {"h1": 3, "h2": 3}),
    # Hosts that differ: an entry over the defaults for its host only.
    ({"host_max_vms": 3, "host_limits": ("h2 vms=1 memory_mb=16384",)},
     [rec("a", "h2")], {"h1": 3, "h2": 0}),
    ({"host_limits": ("h1 vcpus=8", "h2 memory_mb=4096")}, [rec("a", "h1", vcpus=2)],
     {"h1": 3, "h2": 2}),
])
def test_host_room(limits, records, expected):
    cfg = ScalerConfig(vcpus=2, memory_mb=1536, libvirt_uris=("h1", "h2"), **limits)
    assert policy.host_room(cfg, records, ["h1", "h2"]) == expected


def test_placement_picks_a_host_with_room_and_lost_vms_leave_max_vms():
    cfg = ScalerConfig(host_max_vms=2, max_vms=3, min_vms=0)
    records = [rec("a", "h1"), rec("b", "h2"), rec("c", "h2")]
    assert policy.place(cfg, records, {"h1", "h2"}) == "h1"
    assert policy.place(cfg, records + [rec("d", "h1")], {"h1", "h2"}) is None
    q = policy.QueueView(queued=9, running=0, workers={})
    # three VMs at max_vms=3: held; the same three with two lost on a dead host: room for one
    (hold,) = policy.scale_up(cfg, records, q, now=1000, last_scale_up_at=0, hosts={"h1"})
    assert hold.action is Action.HOLD and "max_vms=3" in hold.reason
    lost = [rec("a", "h1"), rec("b", "h2", lost=True), rec("c", "h2", lost=True)]
    assert [d.action for d in policy.scale_up(cfg, lost, q, now=1000, last_scale_up_at=0,
                                              hosts={"h1"})] == [Action.CREATE]
    # a lost VM is removed when its host is back, whatever its state said
    assert [(d.action, d.vm) for d in policy.retirements(cfg, lost, {}, set(), now=0, hosts={"h2"})] \
        == [(Action.REMOVE, "b"), (Action.REMOVE, "c")]


@pytest.mark.parametrize("values, message", [
    ({"host_max_vcpus": "1", "vcpus": "2"}, "host_max_vcpus"),
    ({"host_max_memory_mb": "512"}, "host_max_memory_mb"),
    ({"host_max_vms": "-1"}, "host_max_vms"),
    ({"storage_pool": "a/b"}, "storage_pool"),
    ({"storage_pool": "p", "pool_dir": "relative/dir"}, "pool_dir"),
    ({"libvirt_keepalive_s": "-1"}, "libvirt_keepalive_s"),
    ({"host_lost_after_s": "inf"}, "host_lost_after_s"),
    ({"host_limits": "qemu:///system"}, "is not \"URI vms=N"),
    ({"host_limits": "qemu:///system vms=2 disks=3"}, "is not \"URI vms=N"),
    ({"host_limits": "qemu:///system vms=-2"}, "is not \"URI vms=N"),
    ({"host_limits": "qemu:///system vms=1, qemu:///system vms=2"}, "is not \"URI vms=N"),
    ({"host_limits": "qemu+ssh://elsewhere/system vms=1"}, "not one of libvirt_uris"),
    ({"host_limits": "qemu:///system vcpus=1", "vcpus": "2"}, "vcpus for qemu:///system"),
    ({"host_limits": "qemu:///system memory_mb=100"}, "memory_mb for qemu:///system"),
    ({"libvirt_uris": "qemu:///system,qemu+ssh://root@vm2/system"}, "needs storage_pool"),
])
def test_multihost_settings_are_validated(values, message):
    with pytest.raises(ConfigError, match=message):
        load_config(env={}, overrides=values)
    cfg = load_config(env={"JOBCLOUD_VM_STORAGE_POOL": "jobcloud", "JOBCLOUD_VM_HOST_MAX_VMS": "3",
                           "JOBCLOUD_VM_HOST_LIMITS": "qemu:///system vms=5 vcpus=16"})
    assert cfg.limits_for("qemu:///system") == {"vms": 5, "vcpus": 16, "memory_mb": 0}
    assert (cfg.storage_pool, cfg.resolved_pool_dir, cfg.host_max_vms) == \
        ("jobcloud", "/var/lib/libvirt/images/jobcloud", 3)
