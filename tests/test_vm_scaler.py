"""The VM scaler: domain XML, naming, policy, reconcile and state, and the proxy's
side of it (queue view, scaler report, /metrics).

The scaler runs against libvirt's own in-process `test:///default` hypervisor
(it defines, starts and stops domains, boots nothing) and the real proxy app,
served on a loopback port, so every call it makes goes through the real admin
API. Workers "in" the VMs register and claim through the real worker API. The
real boot of a real template is tests/test_vm_e2e.py's.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import subprocess
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path

import pytest
from werkzeug.serving import make_server

from proxy import vms as proxy_vms
from tests.conftest import require, wait_until
from tests.test_dispatch import Hub
from vm_provisioning import domain, policy
from vm_provisioning.config import ScalerConfig, guest_url_for, load_config, validate
from vm_provisioning.errors import ConfigError, TemplateMissing, UnknownVM, VMError
from vm_provisioning.policy import Action
from vm_provisioning.proxy_client import QueueView, WorkerView
from vm_provisioning.state import StateStore, VMRecord, VMState

from vm_provisioning.libvirt_host import open_host
from vm_provisioning.scaler import Scaler


def require_libvirt() -> None:
    require(importlib.util.find_spec("libvirt") is not None,
            "libvirt-python not installed (pip install -e '.[vm]'; make test does)")


# ------------------------------------------------------------------- fixtures

class LoopbackProxy:
    """The real proxy app served by werkzeug on a loopback port, plus a Hub to act on it."""

    def __init__(self, app):
        self.hub = Hub(app)
        self.admin = self.hub.admin
        self.server = make_server("127.0.0.1", 0, app, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def stop(self):
        self.server.shutdown()
        self.thread.join()

    def admin_get(self, path: str):
        r = self.hub.client.get(path, headers=self.admin["headers"])
        assert r.status_code == 200, r.get_json()
        return r.get_json()

    def workers(self) -> dict:
        return {w["name"]: w for w in self.admin_get("/api/v1/admin/workers?all=1")["workers"]}

    def enrollments(self) -> dict:
        return {e["label"]: e for e in self.admin_get("/api/v1/admin/enrollment-tokens")["enrollment_tokens"]}


@pytest.fixture
def proxy(app):
    server = LoopbackProxy(app)
    yield server
    server.stop()


@pytest.fixture
def host():
    require_libvirt()
    # One connection per test: each new connection to test:///default is a fresh hypervisor.
    h = open_host("test:///default")
    yield h
    h.conn.close()


def make_template(root: Path) -> Path:
    """A template dir per the manifest contract: a tiny qcow2 and dummy kernel/initrd
    (the test driver boots nothing)."""
    require(shutil.which("qemu-img") is not None, "qemu-img not installed (apt-get install qemu-utils)")
    root.mkdir(parents=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(root / "disk.qcow2"), "64M"], check=True)
    (root / "vmlinuz").write_bytes(b"kernel")
    (root / "initrd.img").write_bytes(b"initrd")
    (root / "manifest.json").write_text(json.dumps({
        "disk": "disk.qcow2", "kernel": "vmlinuz", "initrd": "initrd.img",
        "cmdline": "root=/dev/vda rw console=ttyS0", "disk_format": "qcow2",
        "virtual_size_bytes": 64 * 1024 * 1024, "files": {}, "contents": {}, "input_hash": "test"}))
    return root


@pytest.fixture
def template(tmp_path):
    return make_template(tmp_path / "template")


@pytest.fixture
def config(tmp_path, template, proxy):
    return ScalerConfig(template_dir=str(template), state_dir=str(tmp_path / "clones"),
                        proxy_url=proxy.url, admin_token=proxy.admin["token"],
                        libvirt_uris=("test:///default",), domain_type="qemu",
                        min_vms=0, max_vms=3, step=1, cooldown_s=0, idle_time_s=3600,
                        boot_timeout_s=100, shutdown_timeout_s=30, queue_per_worker=1.0)


@pytest.fixture
def scaler(config, host):
    return Scaler(config, hosts=[host])


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def actions(decisions) -> list[tuple[str, str | None]]:
    return [(d.action.value, d.vm) for d in decisions]


def only_vm(scaler: Scaler) -> VMRecord:
    (record,) = scaler.store.load().vms.values()
    return record


# ----------------------------------------------------------- naming and XML

def test_names_are_unique_recognisable_and_others_are_not_ours():
    names = {domain.new_name("jc-") for _ in range(200)}
    assert len(names) == 200
    assert all(domain.is_our_name(n, "jc-") for n in names)
    for other in ("test", "jc-", "jc-xyz", "jc-0123456789a", "web-0123456789", "JC-0123456789"):
        assert not domain.is_our_name(other, "jc-")
    macs = {domain.new_mac() for _ in range(200)}
    assert len(macs) == 200 and all(m.startswith("52:54:00:") and len(m) == 17 for m in macs)


def test_domain_xml_has_the_parts_a_worker_vm_needs():
    spec = domain.DomainSpec(
        name="jc-0123456789", uuid=domain.new_uuid(), mac="52:54:00:aa:bb:cc", domain_type="kvm",
        memory_mb=1536, vcpus=2, disk="/s/jc-0123456789.qcow2", seed="/s/jc-0123456789-seed.iso",
        kernel="/t/vmlinuz", initrd="/t/initrd.img", cmdline="root=/dev/vda console=ttyS0",
        console_log="/s/jc-0123456789-console.log")
    dom = ET.fromstring(domain.domain_xml(spec))
    assert dom.get("type") == "kvm"
    assert dom.findtext("name") == spec.name and dom.findtext("uuid") == spec.uuid
    assert dom.find("memory").get("unit") == "MiB" and dom.findtext("memory") == "1536"
    assert dom.findtext("vcpu") == "2"
    assert (dom.findtext("os/kernel"), dom.findtext("os/initrd"), dom.findtext("os/cmdline")) == \
        ("/t/vmlinuz", "/t/initrd.img", "root=/dev/vda console=ttyS0")
    disk, cdrom = dom.findall("devices/disk")
    assert (disk.get("device"), disk.find("driver").get("type"), disk.find("source").get("file"),
            disk.find("target").get("bus")) == ("disk", "qcow2", spec.disk, "virtio")
    assert cdrom.get("device") == "cdrom" and cdrom.find("readonly") is not None
    assert cdrom.find("source").get("file") == spec.seed
    nic = dom.find("devices/interface")
    assert nic.get("type") == "user" and nic.find("mac").get("address") == spec.mac
    assert nic.find("model").get("type") == "virtio"
    serial = dom.find("devices/serial")
    assert serial.get("type") == "file" and serial.find("source").get("path") == spec.console_log


def test_domain_xml_is_accepted_by_libvirt(host):
    spec = domain.DomainSpec(
        name=domain.new_name("jc-"), uuid=domain.new_uuid(), mac=domain.new_mac(), domain_type="qemu",
        memory_mb=512, vcpus=1, disk="/nonexistent/d.qcow2", seed="/nonexistent/s.iso",
        kernel="/k", initrd="/i", cmdline="console=ttyS0", console_log="/nonexistent/c.log")
    host.define_and_start(domain.domain_xml(spec))
    assert host.is_active(spec.name)
    defined = ET.fromstring(host.conn.lookupByName(spec.name).XMLDesc())
    assert defined.findtext("uuid") == spec.uuid
    assert defined.find("devices/interface/mac").get("address") == spec.mac
    host.destroy_and_undefine(spec.name)
    assert not host.exists(spec.name)


# ------------------------------------------------------------------ config

def test_config_precedence_flags_over_env_over_file(tmp_path):
    f = tmp_path / "vm.toml"
    f.write_text('[vm]\nmax_vms = 7\nmin_vms = 1\nlibvirt_uris = ["qemu:///system", "qemu+ssh://h2/system"]\n')
    cfg = load_config(env={"JOBCLOUD_VM_MAX_VMS": "5", "JOBCLOUD_VM_DOMAIN_TYPE": "qemu"},
                      overrides={"max_vms": "6", "step": None}, config_file=str(f))
    assert (cfg.max_vms, cfg.min_vms, cfg.domain_type, cfg.step) == (6, 1, "qemu", 1)
    assert cfg.libvirt_uris == ("qemu:///system", "qemu+ssh://h2/system")


@pytest.mark.parametrize("values, message", [
    ({"domain_type": "xen"}, "domain_type"),
    ({"min_vms": "3", "max_vms": "2"}, "min_vms"),
    ({"step": "0"}, "step"),
    ({"idle_time_s": "nan"}, "finite"),
    ({"max_vms": "two"}, "not a valid int"),
    ({"proxy_url": "ftp://x"}, "proxy_url"),
    ({"no_such": "1"}, "unknown setting"),
    ({"name_prefix": "JC_"}, "name_prefix"),
    ({"worker_slots": "0"}, "worker_slots"),
])
def test_config_errors_name_the_setting(values, message):
    with pytest.raises(ConfigError, match=message):
        load_config(env={}, overrides=values)


def test_guest_sees_host_loopback_as_10_0_2_2():
    assert guest_url_for("http://127.0.0.1:3000") == "http://10.0.2.2:3000"
    assert guest_url_for("http://localhost:8080/") == "http://10.0.2.2:8080"
    assert guest_url_for("https://jobs.example.org") == "https://jobs.example.org"
    cfg = ScalerConfig(proxy_url="http://127.0.0.1:9", guest_proxy_url="http://10.0.2.2:77")
    assert cfg.resolved_guest_proxy_url == "http://10.0.2.2:77"


# ------------------------------------------------------------------ policy

CFG = validate(ScalerConfig(min_vms=0, max_vms=4, step=2, cooldown_s=60, idle_time_s=300,
                            boot_timeout_s=120, shutdown_timeout_s=30, queue_per_worker=2.0))


def rec(name: str, state: VMState = VMState.READY, since: float = 0.0, host: str = "h") -> VMRecord:
    return VMRecord(name=name, uuid="u", host_uri=host, mac="m", disk="d", seed="s", console_log="c",
                    state=state.value, created_at=since, state_since=since)


def wv(name: str, running: int = 0, idle_s: float | None = 0.0, state: str = "active") -> WorkerView:
    return WorkerView(id="w" + name, name=name, state=state, slots=1, running=running, idle_s=idle_s)


def queue(queued: int, *workers: WorkerView) -> QueueView:
    return QueueView(queued=queued, running=sum(w.running for w in workers),
                     workers={w.name: w for w in workers})


@pytest.mark.parametrize("records, q, last_up, expected", [
    # nothing queued, nothing running: stay at min 0
    ([], queue(0), 0, []),
    # queued jobs and no worker at all: add a step
    ([], queue(1), 0, ["create", "create"]),
    # 4 queued for 2 workers is 2 per worker: not over the threshold
    ([rec("a"), rec("b")], queue(4, wv("a", 1), wv("b", 1)), 0, []),
    # 5 queued for 2 workers: over; step 2 but max 4 allows 2
    ([rec("a"), rec("b")], queue(5, wv("a", 1), wv("b", 1)), 0, ["create", "create"]),
    # 3 VMs, max 4: only 1 more
    ([rec("a"), rec("b"), rec("c")], queue(50, wv("a"), wv("b"), wv("c")), 0, ["create"]),
    # at max: hold
    ([rec(n) for n in "abcd"], queue(50, *(wv(n) for n in "abcd")), 0, ["hold"]),
    # inside the cooldown: hold
    ([rec("a")], queue(10, wv("a", 1)), 990, ["hold"]),
    # booting VMs count as workers: 3 queued for 2 (1 live, 1 booting) is not over 2
    ([rec("a"), rec("b", VMState.BOOTING)], queue(3, wv("a", 1)), 0, []),
    # draining VMs do not count toward max_vms, and their workers take no new jobs
    ([rec("a", VMState.DRAINING)], queue(1, wv("a", 1, state="draining")), 0, ["create", "create"]),
])
def test_scale_up_table(records, q, last_up, expected):
    got = policy.scale_up(CFG, records, q, now=1000, last_scale_up_at=last_up)
    assert [d.action.value for d in got] == expected
    assert all(d.reason for d in got)


def test_scale_up_to_min_whatever_the_queue():
    cfg = replace(CFG, min_vms=3)
    got = policy.scale_up(cfg, [rec("a")], queue(0, wv("a")), now=0, last_scale_up_at=0)
    assert [d.action for d in got] == [Action.CREATE, Action.CREATE]
    assert "min_vms=3" in got[0].reason


@pytest.mark.parametrize("records, q, min_vms, expected", [
    # idle long enough: drained
    ([rec("a")], queue(0, wv("a", idle_s=301)), 0, ["a"]),
    # not idle long enough
    ([rec("a")], queue(0, wv("a", idle_s=299)), 0, []),
    # running a job: never
    ([rec("a")], queue(0, wv("a", running=1, idle_s=None)), 0, []),
    # min_vms keeps one: the idlest goes
    ([rec("a"), rec("b")], queue(0, wv("a", idle_s=400), wv("b", idle_s=900)), 1, ["b"]),
    # booting VMs are not idle workers
    ([rec("a", VMState.BOOTING)], queue(0), 0, []),
    # already draining: not again
    ([rec("a", VMState.DRAINING)], queue(0, wv("a", idle_s=999, state="draining")), 0, []),
])
def test_scale_down_table(records, q, min_vms, expected):
    got = policy.scale_down(replace(CFG, min_vms=min_vms), records, q)
    assert [d.vm for d in got] == expected and all(d.action is Action.DRAIN for d in got)


@pytest.mark.parametrize("record, worker, active, now, expected", [
    (rec("a", VMState.DRAINING), wv("a", running=1, idle_s=None, state="draining"), True, 10, []),
    (rec("a", VMState.DRAINING), wv("a", state="draining"), True, 10, ["stop"]),
    (rec("a", VMState.DRAINING), None, True, 10, ["stop"]),
    # it registered after the drain (it was booting): drain its worker too
    (rec("a", VMState.DRAINING), wv("a"), True, 10, ["drain"]),
    (rec("a", VMState.STOPPING, since=0), None, False, 10, ["remove"]),
    (rec("a", VMState.STOPPING, since=0), None, True, 10, []),
    (rec("a", VMState.STOPPING, since=0), None, True, 31, ["remove"]),
])
def test_retirement_steps(record, worker, active, now, expected):
    workers = {worker.name: worker} if worker else {}
    got = policy.retirements(CFG, [record], workers, {"a"} if active else set(), now=now)
    assert [d.action.value for d in got] == expected


def test_reconcile_table():
    records = [rec("booting-new", VMState.BOOTING, since=950),
               rec("booting-old", VMState.BOOTING, since=800),
               rec("registered", VMState.BOOTING, since=990),
               rec("vanished", VMState.READY),
               rec("stopped", VMState.READY),
               rec("worker-gone", VMState.READY),
               rec("fine", VMState.READY),
               rec("other-host", VMState.READY, host="no-longer-configured")]
    workers = {n: wv(n) for n in ("registered", "fine", "vanished", "stopped")}
    domains = {"h": {"booting-new", "booting-old", "registered", "stopped", "worker-gone", "fine",
                     "stray-domain"}}
    active = {"booting-new", "booting-old", "registered", "worker-gone", "fine", "stray-domain"}
    files = {"booting-new": ["x"], "stray-files": ["y"], "stray-domain": ["z"]}
    got = {d.vm: d.action.value for d in policy.reconcile(CFG, records, workers, domains, active,
                                                           files, now=1000)}
    assert got == {"booting-old": "replace", "registered": "ready", "vanished": "lost",
                   "stopped": "lost", "worker-gone": "unregistered", "stray-domain": "cleanup",
                   "stray-files": "cleanup"}


def test_pick_for_removal_prefers_booting_then_least_busy():
    records = [rec("busy"), rec("idle"), rec("boot", VMState.BOOTING), rec("gone", VMState.DRAINING)]
    q = queue(0, wv("busy", running=2, idle_s=None), wv("idle", idle_s=50))
    assert policy.pick_for_removal(records, q, 2) == ["boot", "idle"]


# ------------------------------------------------------------------ state

def test_state_file_round_trips_and_is_replaced_atomically(tmp_path):
    store = StateStore(tmp_path / "s")
    with store.locked() as state:
        state.vms["jc-0123456789"] = rec("jc-0123456789", VMState.DRAINING, since=5)
        state.last_scale_up_at = 42.0
    again = StateStore(tmp_path / "s").load()
    assert again.last_scale_up_at == 42.0
    assert again.vms["jc-0123456789"].state == "draining"
    assert not list((tmp_path / "s").glob("*.tmp"))


def test_unreadable_state_file_is_a_clear_error(tmp_path):
    (tmp_path / "scaler-state.json").write_text("{not json")
    with pytest.raises(VMError, match="unreadable"):
        StateStore(tmp_path).load()


# ------------------------------------------- the scaler against libvirt and the proxy

def test_queue_makes_a_linked_clone_with_its_own_identity(scaler, host, proxy, template, tmp_path):
    before = sha256(template / "disk.qcow2")
    proxy.hub.submit()
    decisions = scaler.run_once()
    assert [d.action for d in decisions] == [Action.CREATE]
    vm = only_vm(scaler)
    assert "1 queued jobs for 0 workers" in decisions[0].reason
    assert host.is_active(vm.name) and vm.state == "booting"
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", vm.disk],
                                     capture_output=True, check=True).stdout)
    assert info["format"] == "qcow2"
    assert Path(info["backing-filename"]) == (template / "disk.qcow2").resolve()
    assert Path(vm.seed).stat().st_size > 0
    xml = ET.fromstring(host.conn.lookupByName(vm.name).XMLDesc())
    assert xml.get("type") == "qemu"
    assert xml.find("devices/interface/mac").get("address") == vm.mac
    # a per-VM enrollment token exists in the proxy, and the report reached it
    assert f"vm {vm.name}" in proxy.enrollments()
    listed = proxy.admin_get("/api/v1/admin/vms")
    assert [(v["name"], v["state"]) for v in listed["vms"]] == [(vm.name, "booting")]
    assert listed["events"][0]["action"] == "create"
    metrics = proxy.hub.client.get("/metrics").get_data(as_text=True)
    assert 'jobcloud_vms{state="booting"} 1.0' in metrics
    assert 'jobcloud_scaler_decisions_total{action="create"} 1.0' in metrics
    assert sha256(template / "disk.qcow2") == before


def test_idle_vm_is_drained_stopped_and_removed_without_a_trace(config, host, proxy, template):
    scaler = Scaler(replace(config, idle_time_s=0), hosts=[host])
    before = sha256(template / "disk.qcow2")
    job = proxy.hub.submit()
    scaler.run_once()
    vm = only_vm(scaler)
    worker = proxy.hub.register(vm.name)
    (claimed,) = worker.claim()
    assert claimed["id"] == job
    assert actions(scaler.run_once()) == [("ready", vm.name)]
    # with a running job it is never removed, however idle_time is set
    for _ in range(2):
        assert scaler.run_once() == []
    assert worker.result(job, 1).status_code == 200
    assert actions(scaler.run_once()) == [("drain", vm.name)]
    assert proxy.workers()[vm.name]["state"] == "draining"
    assert actions(scaler.run_once()) == [("stop", vm.name)]
    assert not host.is_active(vm.name)      # the test driver powers off at once
    assert actions(scaler.run_once()) == [("remove", vm.name)]
    assert not host.exists(vm.name)
    assert not any(Path(p).exists() for p in (vm.disk, vm.seed, vm.console_log))
    assert scaler.store.load().vms == {}
    assert proxy.workers()[vm.name]["state"] == "revoked"
    assert proxy.enrollments()[f"vm {vm.name}"]["revoked_at"] is not None
    assert proxy.admin_get("/api/v1/admin/vms")["vms"] == []
    assert sha256(template / "disk.qcow2") == before


def test_boot_timeout_replaces_the_vm_and_keeps_its_console(scaler, host, proxy, config):
    proxy.hub.submit()
    scaler.run_once()
    old = only_vm(scaler)
    Path(old.console_log).write_text("kernel panic\n")
    assert scaler.run_once(now=time.time() + 50) == []
    (d,) = scaler.run_once(now=time.time() + config.boot_timeout_s + 1)
    assert d.action is Action.REPLACE and d.vm == old.name and "replaced by jc-" in d.reason
    new = only_vm(scaler)
    assert new.name != old.name and host.is_active(new.name) and not host.exists(old.name)
    assert not Path(old.disk).exists()
    assert (Path(config.state_dir) / f"{old.name}-console.failed.log").read_text() == "kernel panic\n"


def test_vanished_domain_revokes_its_worker_and_requeues_its_job(scaler, host, proxy):
    job = proxy.hub.submit()
    scaler.run_once()
    vm = only_vm(scaler)
    worker = proxy.hub.register(vm.name)
    assert [j["id"] for j in worker.claim()] == [job]
    scaler.run_once()
    host.destroy_and_undefine(vm.name)      # what `virsh destroy; virsh undefine` does
    decisions = scaler.run_once()
    assert ("lost", vm.name) in actions(decisions)
    assert proxy.workers()[vm.name]["state"] == "revoked"
    assert proxy.hub.job(job)["state"] == "queued"
    assert not Path(vm.disk).exists()
    # the job still waits, so the same pass clones a replacement
    assert [d.action for d in decisions][-1] is Action.CREATE


def test_leftovers_of_a_crash_are_cleaned_up(scaler, host, config):
    stray = domain.new_name("jc-")
    host.define_and_start(domain.domain_xml(domain.DomainSpec(
        name=stray, uuid=domain.new_uuid(), mac=domain.new_mac(), domain_type="qemu", memory_mb=256,
        vcpus=1, disk="/x", seed="/y", kernel="/k", initrd="/i", cmdline="", console_log="/z")))
    state_dir = Path(config.state_dir)
    state_dir.mkdir(parents=True)
    orphan = domain.new_name("jc-")
    for suffix in (".qcow2", "-seed.iso", "-seed.iso.partial"):
        (state_dir / f"{orphan}{suffix}").write_bytes(b"x")
    (state_dir / "notes.txt").write_text("not ours")
    got = actions(scaler.run_once())
    assert sorted(got) == sorted([("cleanup", stray), ("cleanup", orphan)])
    assert not host.exists(stray) and host.exists("test")
    assert sorted(p.name for p in state_dir.iterdir()) == ["notes.txt", "scaler-state.json",
                                                           "scaler.lock"]


def test_state_survives_a_restart_of_the_scaler(scaler, host, proxy, config):
    proxy.hub.submit()
    scaler.run_once()
    vm = only_vm(scaler)
    restarted = Scaler(config, hosts=[host])
    assert [r["name"] for r in restarted.list_vms()] == [vm.name]
    proxy.hub.register(vm.name)
    assert actions(restarted.run_once()) == [("ready", vm.name)]


def test_admin_commands_scale_drain_and_destroy(scaler, host, proxy):
    assert [d.action for d in scaler.up(2)] == [Action.CREATE, Action.CREATE]
    a, b = sorted(scaler.store.load().vms)
    with pytest.raises(UnknownVM):
        scaler.drain("jc-ffffffffff")
    wa = proxy.hub.register(a)
    job = proxy.hub.submit()
    scaler.run_once()
    assert [j["id"] for j in wa.claim()] == [job]
    with pytest.raises(VMError, match="runs 1 job"):
        scaler.destroy(a)
    # down 1 takes the VM that runs nothing
    assert actions(scaler.down(1)) == [("drain", b)]
    assert scaler.settle({b}, timeout_s=5, poll_s=0.05) == set()
    assert not host.exists(b)
    scaler.destroy(a, force=True)
    assert not host.exists(a) and proxy.hub.job(job)["state"] == "queued"
    assert scaler.scale_to(0) == []


def test_new_vms_go_to_the_least_loaded_host(config, host, proxy, tmp_path):
    # A test hypervisor from a node file (an empty one) is separate from test:///default:
    # it stands for a second host.
    (tmp_path / "node.xml").write_text("<node/>")
    second = open_host(f"test://{tmp_path}/node.xml")
    try:
        scaler = Scaler(replace(config, libvirt_uris=(host.uri, second.uri)), hosts=[host, second])
        scaler.up(3)
        by_host = sorted(r.host_uri for r in scaler.store.load().vms.values())
        assert by_host == sorted(["test:///default", "test:///default", second.uri])
        assert len([n for n in second.domain_names() if n.startswith("jc-")]) == 1
        # one pass with nothing queued changes nothing on either host
        assert scaler.run_once() == []
    finally:
        second.conn.close()


def test_daemon_loop_stops_on_its_flag(scaler, proxy):
    proxy.hub.submit()
    stop = threading.Event()
    loop = threading.Thread(target=scaler.run_forever, args=(stop,))
    loop.start()
    try:
        wait_until(lambda: scaler.store.load().vms, timeout=20, what="the daemon to clone a VM")
    finally:
        stop.set()
        loop.join(timeout=20)
    assert not loop.is_alive()


def test_missing_template_is_a_clear_error(config, host, proxy, tmp_path):
    cfg = replace(config, template_dir=str(tmp_path / "nothing"))
    proxy.hub.submit()
    with pytest.raises(TemplateMissing):
        Scaler(cfg, hosts=[host]).run_once()
    assert StateStore(cfg.state_dir).load().vms == {}
    assert not [label for label in proxy.enrollments() if label.startswith("vm ")]


# ------------------------------------------------ the proxy side, SQLite and PostgreSQL

@pytest.fixture
def hub(make_config, database_url):
    from proxy import create_app

    application = create_app(make_config(database_url=database_url))
    yield Hub(application)
    application.extensions["jobcloud"].db.close()


def test_queue_view_counts_and_idle_times(hub):
    for _ in range(3):
        hub.submit()
    busy = hub.register("busy")
    view = hub.client.get("/api/v1/admin/queue", headers=hub.admin["headers"]).get_json()
    assert (view["queued"], view["running"]) == (3, 0)
    assert [(w["name"], w["running"], w["reserved"]) for w in view["workers"]] == [("busy", 0, 0)]
    first, _ = busy.claim(max_jobs=2)
    assert busy.result(first["id"], 1).status_code == 200
    hub.register("idle")
    r = hub.client.get("/api/v1/admin/queue", headers=hub.admin["headers"])
    assert r.status_code == 200
    view = r.get_json()
    workers = {w["name"]: w for w in view["workers"]}
    assert (view["queued"], view["running"]) == (1, 1)
    assert workers["busy"]["running"] == 1 and workers["busy"]["idle_s"] is None
    assert workers["idle"]["running"] == 0 and 0 <= workers["idle"]["idle_s"] < 60
    # measured on the proxy's clock, so the scaler's clock never has to agree
    now = time.time()
    view = hub.call(proxy_vms.queue_view, now + 100)
    idle = {w["name"]: w for w in view["workers"]}["idle"]
    assert 100 <= idle["idle_s"] < 160


def test_scaler_report_is_stored_listed_and_counted(hub):
    h = hub.admin["headers"]
    report = {"vms": [{"name": "jc-0123456789", "host_uri": "qemu:///system", "state": "ready",
                       "worker_name": "jc-0123456789", "created_at": 1000.0},
                      {"name": "jc-abcdefabcd", "host_uri": "qemu:///system", "state": "booting"}],
              "events": [{"action": "create", "reason": "3 queued jobs for 0 workers",
                          "vm_name": "jc-abcdefabcd"}]}
    r = hub.client.put("/api/v1/admin/scaler/report", headers=h, json=report)
    assert r.status_code == 200 and r.get_json() == {"vms": 2, "events": 1}
    hub.client.put("/api/v1/admin/scaler/report", headers=h, json={
        "vms": report["vms"][:1], "events": [{"action": "remove", "reason": "shut down",
                                              "vm_name": "jc-abcdefabcd"}]})
    listed = hub.call(proxy_vms.list_vms)
    assert [(v["name"], v["state"], v["created_at"]) for v in listed] == \
        [("jc-0123456789", "ready", 1000.0)]
    assert [e["action"] for e in hub.call(proxy_vms.recent_events, 10)] == ["remove", "create"]
    assert [e["action"] for e in hub.call(proxy_vms.recent_events, 1)] == ["remove"]
    metrics = hub.client.get("/metrics").get_data(as_text=True)
    assert 'jobcloud_vms{state="ready"} 1.0' in metrics
    assert 'jobcloud_vms{state="booting"} 0.0' in metrics
    assert 'jobcloud_scaler_decisions_total{action="remove"} 1.0' in metrics
    assert "jobcloud_queue_depth 0.0" in metrics


@pytest.mark.parametrize("body", [
    "[]", "not json", '{"vms": {}}', '{"vms": [1]}', '{"vms": [{"name": "x"}]}',
    '{"vms": [{"name": "x", "host_uri": "h", "state": "flying"}]}',
    '{"vms": [{"name": "x", "host_uri": "h", "state": "ready", "created_at": 1e300}]}',
    '{"vms": [{"name": "x", "host_uri": "h", "state": "ready"},'
    ' {"name": "x", "host_uri": "h", "state": "ready"}]}',
    '{"events": [{"action": "DROP TABLE", "reason": "r"}]}',
    '{"events": [{"action": "create", "reason": ""}]}',
    '{"events": [{"action": "create", "reason": "r", "vm_name": 5}]}',
])
def test_bad_scaler_reports_are_refused_with_json_400(hub, body):
    r = hub.client.put("/api/v1/admin/scaler/report", headers=dict(
        hub.admin["headers"], **{"Content-Type": "application/json"}), data=body)
    assert r.status_code == 400
    assert set(r.get_json()) == {"error", "detail"}
    assert hub.call(proxy_vms.list_vms) == []


@pytest.mark.parametrize("method, path", [("GET", "/api/v1/admin/queue"),
                                          ("PUT", "/api/v1/admin/scaler/report"),
                                          ("GET", "/api/v1/admin/vms")])
def test_scaler_endpoints_are_admin_only(hub, method, path):
    r = hub.client.open(path, method=method, json={})
    assert r.status_code == 401 and r.get_json()["error"]
    r = hub.client.open(path, method=method, json={}, headers=hub.alice["headers"])
    assert r.status_code == 403 and r.get_json()["error"] == "admin_only"
