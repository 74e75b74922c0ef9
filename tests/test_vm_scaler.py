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
import os
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
from vm_provisioning.errors import ConfigError, LibvirtUnreachable, TemplateMissing, UnknownVM, VMError
from vm_provisioning.policy import Action
from vm_provisioning.proxy_client import ProxyClient, QueueView, WorkerView
from vm_provisioning.state import StateStore, VMRecord, VMState

from vm_provisioning import libvirt_host
from vm_provisioning.libvirt_host import open_host
from vm_provisioning.scaler import KEEP_FAILED_CONSOLES, Scaler


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
    h.close()


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
        "virtual_size_bytes": 64 * 1024 * 1024, "files": {},
        "contents": {"images": {"jobcloud/python": "sha256:test", "jobcloud/ml": "sha256:test"}},
        "input_hash": "test"}))
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
    f.write_text('[vm]\nmax_vms = 7\nmin_vms = 1\nlibvirt_uris = ["qemu:///system", "qemu+ssh://h2/system"]\nstorage_pool = "jobcloud"\n')
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
    ({"idle_vms": "5", "max_vms": "4"}, "idle_vms"),
    ({"idle_vms": "-1"}, "idle_vms"),
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
    # draining VMs still take a host's memory: they count toward max_vms
    ([rec("a", VMState.DRAINING)], queue(1, wv("a", 1, state="draining")), 0, ["create", "create"]),
    ([rec("a", VMState.DRAINING), rec("b", VMState.STOPPING), rec("c"), rec("d")],
     queue(50, wv("a", 1, state="draining"), wv("c", 1), wv("d", 1)), 0, ["hold"]),
    # a draining VM that runs nothing is resumed first, even at max and in the cooldown
    ([rec("a", VMState.DRAINING), rec("b"), rec("c"), rec("d")],
     queue(50, wv("a", state="draining"), wv("b", 1), wv("c", 1), wv("d", 1)), 990, ["resume", "hold"]),
    # jobs no VM can run (the proxy's runnable) add nothing
    ([], QueueView(queued=9, running=0, workers={}, runnable=0), 0, []),
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


WARM = replace(CFG, idle_vms=1, step=1)


@pytest.mark.parametrize("cfg, records, q, expected", [
    # nothing queued, no VM: one is cloned to wait for the first job
    (WARM, [], queue(0), ["create"]),
    # one ready VM whose worker holds nothing: enough
    (WARM, [rec("a")], queue(0, wv("a", idle_s=5)), []),
    # its worker runs a job: a replacement, even inside the cooldown (last_up=990)
    (WARM, [rec("a")], queue(0, wv("a", 1, idle_s=None)), ["create"]),
    # a job reserved for it (idle_s None, nothing running yet) takes it too
    (WARM, [rec("a")], queue(1, wv("a", 0, idle_s=None)), ["create"]),
    # a booting VM counts as a future idle one: no second clone while it boots
    (WARM, [rec("a"), rec("b", VMState.BOOTING)], queue(0, wv("a", 1, idle_s=None)), []),
    (replace(WARM, idle_vms=2), [rec("a"), rec("b", VMState.BOOTING)],
     queue(0, wv("a", 1, idle_s=None)), ["create"]),
    # two missing, room for one under max_vms=4: one
    (replace(WARM, idle_vms=2), [rec(n) for n in "abc"],
     queue(0, *(wv(n, 1, idle_s=None) for n in "abc")), ["create"]),
    # at max_vms: a hold that says why
    (WARM, [rec(n) for n in "abcd"], queue(0, *(wv(n, 1, idle_s=None) for n in "abcd")), ["hold"]),
    # a draining VM is going, idle or not: it is no idle VM (and counts toward max_vms)
    (WARM, [rec("a", VMState.DRAINING)], queue(0, wv("a", 1, idle_s=None, state="draining")),
     ["create"]),
    # ... but one that runs nothing is resumed rather than a new one cloned
    (WARM, [rec("a", VMState.DRAINING)], queue(0, wv("a", idle_s=9, state="draining")), ["resume"]),
    # a ready VM whose worker an admin drained through the proxy is not idle either
    (WARM, [rec("a")], queue(0, wv("a", idle_s=9, state="draining")), ["create"]),
])
def test_idle_vms_counting(cfg, records, q, expected):
    got = policy.scale_up(cfg, records, q, now=1000, last_scale_up_at=990)
    assert [d.action.value for d in got] == expected
    warm = "keeping 2 idle VMs warm" if cfg.idle_vms == 2 else "keeping 1 idle VM warm"
    assert all(warm in d.reason for d in got if "queued jobs" not in d.reason)


def test_the_larger_want_wins_and_a_cooled_down_queue_leaves_idle_vms_theirs():
    records, q = [rec("a")], queue(9, wv("a", 1, idle_s=None))
    # out of the cooldown the queue's step of 3 is more than the 1 idle VM missing
    got = policy.scale_up(replace(WARM, step=3), records, q, now=1000, last_scale_up_at=0)
    assert [d.action for d in got] == [Action.CREATE] * 3 and "9 queued jobs" in got[0].reason
    # inside it, the idle VM missing is still cloned
    got = policy.scale_up(replace(WARM, step=3), records, q, now=1000, last_scale_up_at=990)
    assert [d.action for d in got] == [Action.CREATE]
    assert got[0].reason == "0 idle and 0 booting VMs: keeping 1 idle VM warm (idle_vms=1)"
    # below min_vms and idle_vms at once: the larger deficit, not their sum
    got = policy.scale_up(replace(WARM, min_vms=2), [], queue(0), now=1000, last_scale_up_at=990)
    assert [d.action for d in got] == [Action.CREATE] * 2 and "min_vms=2" in got[0].reason


@pytest.mark.parametrize("records, q, idle_vms, expected", [
    # two idle long enough, one kept warm: the idlest goes
    ([rec("a"), rec("b")], queue(0, wv("a", idle_s=400), wv("b", idle_s=900)), 1, ["b"]),
    # the only idle one stays, however long it has been idle
    ([rec("a"), rec("b")], queue(0, wv("a", idle_s=9000), wv("b", 1, idle_s=None)), 1, []),
    # a booting VM is no reason to drain the idle one: only registered idle VMs are counted
    ([rec("a"), rec("b", VMState.BOOTING)], queue(0, wv("a", idle_s=9000)), 1, []),
    # one idle but not for idle_time yet: it counts as the warm one, so the older goes
    ([rec("a"), rec("b")], queue(0, wv("a", idle_s=10), wv("b", idle_s=900)), 1, ["b"]),
    ([rec(n) for n in "abc"], queue(0, *(wv(n, idle_s=999) for n in "abc")), 2, ["c"]),
])
def test_scale_down_keeps_idle_vms_warm(records, q, idle_vms, expected):
    got = policy.scale_down(replace(CFG, idle_vms=idle_vms), records, q)
    assert [d.vm for d in got] == expected and all(d.action is Action.DRAIN for d in got)
    assert all(f"keeping {idle_vms} idle VM" in d.reason for d in got)


def test_pick_for_removal_prefers_booting_then_least_busy():
    records = [rec("busy"), rec("idle"), rec("boot", VMState.BOOTING), rec("gone", VMState.DRAINING)]
    q = queue(0, wv("busy", running=2, idle_s=None), wv("idle", idle_s=50))
    assert policy.pick_for_removal(records, q, 2) == ["boot", "idle"]


def test_vms_on_a_host_out_of_reach_are_left_as_they_are():
    records = [rec("a", VMState.DRAINING, host="gone"), rec("b", VMState.STOPPING, host="gone"),
               rec("c", host="gone"), rec("d", host="h")]
    q = queue(0, wv("a", state="draining"), wv("c", idle_s=999), wv("d", idle_s=999))
    assert policy.retirements(CFG, records, q.workers, set(), now=1000, hosts={"h"}) == []
    assert [d.vm for d in policy.scale_down(CFG, records, q, {"h"})] == ["d"]
    assert policy.pick_for_removal(records, q, 3, {"h"}) == ["d"]


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
    assert proxy.enrollments()[f"vm {vm.name}"]["revoked_at"] is not None
    assert proxy.hub.job(job)["state"] == "queued"
    assert not Path(vm.disk).exists()
    # the job still waits, so the same pass clones a replacement
    assert [d.action for d in decisions][-1] is Action.CREATE


def define_stray(host, scaler_id: str = "") -> str:
    name = domain.new_name("jc-")
    host.define_and_start(domain.domain_xml(domain.DomainSpec(
        name=name, uuid=domain.new_uuid(), mac=domain.new_mac(), domain_type="qemu", memory_mb=256,
        vcpus=1, disk="/x", seed="/y", kernel="/k", initrd="/i", cmdline="", console_log="/z",
        scaler_id=scaler_id)))
    return name


def test_leftovers_of_a_crash_are_cleaned_up(scaler, host, config):
    assert scaler.run_once() == []      # the first pass draws this scaler's id
    ours = define_stray(host, scaler.store.load().scaler_id)
    state_dir = Path(config.state_dir)
    orphan = domain.new_name("jc-")
    for suffix in (".qcow2", "-seed.iso", "-seed.iso.partial"):
        (state_dir / f"{orphan}{suffix}").write_bytes(b"x")
    (state_dir / "notes.txt").write_text("not ours")
    got = actions(scaler.run_once())
    assert sorted(got) == sorted([("cleanup", ours), ("cleanup", orphan)])
    assert not host.exists(ours) and host.exists("test")
    assert sorted(p.name for p in state_dir.iterdir()) == ["notes.txt", "scaler-state.json",
                                                           "scaler.lock"]


def test_domains_named_like_ours_without_our_id_are_left_alone(scaler, host, config):
    scaler.run_once()
    unmarked, foreign = define_stray(host), define_stray(host, "another-scaler")
    # its disk in our state dir is not a leftover of ours either
    (Path(config.state_dir) / f"{foreign}.qcow2").write_bytes(b"x")
    assert scaler.run_once() == []
    assert host.is_active(unmarked) and host.is_active(foreign)
    assert (Path(config.state_dir) / f"{foreign}.qcow2").exists()
    for name in (unmarked, foreign):
        host.destroy_and_undefine(name)


def test_the_scaler_id_is_drawn_once_and_marks_its_domains(scaler, host):
    scaler.up(1)
    vm = only_vm(scaler)
    scaler_id = scaler.store.load().scaler_id
    assert scaler_id and scaler.store.load().scaler_id == scaler_id
    assert domain.scaler_id_of(host.domain_xml(vm.name)) == scaler_id
    meta = ET.fromstring(host.domain_xml(vm.name)).find(f"metadata/{{{domain.METADATA_NS}}}scaler")
    assert meta is not None and meta.get("id") == scaler_id


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


class HookedProxy(ProxyClient):
    """The real admin API client, with hooks each run once right after the named call
    returns: how a test puts another actor's move into the gap between two of the
    scaler's calls (a worker registering, libvirt or the proxy going away)."""

    def __init__(self, config, **hooks):
        super().__init__(config.proxy_url, config.admin_token)
        self.hooks = hooks

    def queue(self, shape=None):
        view = super().queue(shape)
        self._fire("queue")
        return view

    def create_enrollment(self, label, expires_in_s=None):
        made = super().create_enrollment(label, expires_in_s)
        self._fire("create_enrollment")
        return made

    def _fire(self, name):
        hook = self.hooks.pop(name, None)
        if hook:
            hook()


def test_a_draining_vm_that_runs_nothing_is_resumed_before_a_new_one(config, host, proxy):
    scaler = Scaler(replace(config, max_vms=1), hosts=[host])
    scaler.up(1)
    vm = only_vm(scaler)
    worker = proxy.hub.register(vm.name)
    scaler.run_once()
    scaler.drain(vm.name)
    proxy.hub.submit()
    # at max_vms=1 the draining VM still counts; it is resumed, not stopped nor cloned
    assert actions(scaler.run_once()) == [("resume", vm.name)]
    assert only_vm(scaler).state == "ready" and proxy.workers()[vm.name]["state"] == "active"
    assert len(worker.claim()) == 1


def test_a_create_that_fails_does_not_hold_up_retirements(scaler, proxy, template):
    scaler.up(1)
    vm = only_vm(scaler)
    scaler.drain(vm.name)
    shutil.rmtree(template)
    proxy.hub.submit()
    with pytest.raises(TemplateMissing):
        scaler.run_once()
    assert only_vm(scaler).state == "stopping"


def test_idle_vms_keeps_one_warm_and_replaces_it_when_a_job_takes_it(config, host, proxy):
    """idle_vms=1: a VM before any job; a job takes its worker, a replacement is
    cloned in the next pass; the extra idle one is drained after idle_time."""
    scaler = Scaler(replace(config, idle_vms=1, cooldown_s=3600), hosts=[host])
    (d,) = scaler.run_once()
    assert d.action is Action.CREATE and "keeping 1 idle VM warm" in d.reason
    warm = only_vm(scaler)
    worker = proxy.hub.register(warm.name)
    assert actions(scaler.run_once()) == [("ready", warm.name)]
    assert scaler.run_once() == []              # one idle VM: nothing to add
    job = proxy.hub.submit()
    assert [j["id"] for j in worker.claim()] == [job]
    # the job started on the warm VM; the pass that sees it busy clones a replacement,
    # cooldown or not
    (d,) = scaler.run_once()
    assert d.action is Action.CREATE and d.vm != warm.name
    assert d.reason == "0 idle and 0 booting VMs: keeping 1 idle VM warm (idle_vms=1)"
    reported = proxy.admin_get("/api/v1/admin/vms")
    assert reported["events"][0]["reason"] == d.reason
    assert scaler.run_once() == []              # the replacement boots: a future idle VM
    proxy.hub.register(d.vm)
    assert actions(scaler.run_once()) == [("ready", d.vm)]
    assert worker.result(job, 1).status_code == 200
    # two idle now; after idle_time the idlest beyond idle_vms is drained, the other kept
    scaler.config = replace(scaler.config, idle_time_s=0)
    got = scaler.run_once()
    assert [a for a, _ in actions(got)] == ["drain"] and "keeping 1 idle VM warm" in got[0].reason
    assert scaler.run_once()[0].action is Action.STOP
    assert all(a != "drain" for a, _ in actions(scaler.run_once()))
    staying = policy.staying(scaler.store.load().vms.values())
    assert len(staying) == 1 and staying[0].state == "ready"


def test_jobs_no_vm_can_run_add_no_vm(scaler, proxy):
    proxy.hub.submit(gpus=1)
    proxy.hub.submit(memory_mb=4096)        # the VMs have 1536 MiB
    bob = proxy.hub.bob
    r = proxy.hub.client.put("/api/v1/admin/users/bob/limits", json={"max_running": 0},
                             headers=proxy.admin["headers"])
    assert r.status_code == 200
    proxy.hub.submit(user=bob)              # an owner at max_running
    assert scaler.run_once() == []
    proxy.hub.submit()
    assert [d.action for d in scaler.run_once()] == [Action.CREATE]


def test_a_hold_does_not_keep_an_idle_vm_that_cannot_run_the_queue(config, host, proxy):
    scaler = Scaler(replace(config, max_vms=1, idle_time_s=0), hosts=[host])
    scaler.up(1)
    vm = only_vm(scaler)
    proxy.hub.register(vm.name, images=["jobcloud/python"])
    for _ in range(2):
        proxy.hub.submit(image="jobcloud/ml")   # a VM could run them; this VM's worker cannot
    got = scaler.run_once()
    assert [d.action for d in got] == [Action.READY, Action.HOLD, Action.DRAIN]
    assert "max_vms=1" in got[1].reason and got[2].vm == vm.name


def test_stop_rereads_a_worker_that_registered_after_the_pass_looked(config, host, proxy):
    scaler = Scaler(config, hosts=[host])
    scaler.up(1)
    vm = only_vm(scaler)
    scaler.drain(vm.name)                   # drained while it boots: no worker yet
    late = {}
    scaler.proxy = HookedProxy(config, queue=lambda: late.setdefault("w", proxy.hub.register(vm.name)))
    assert actions(scaler.run_once()) == [("drain", vm.name)]
    assert host.is_active(vm.name) and proxy.workers()[vm.name]["state"] == "draining"
    assert only_vm(scaler).state == "draining"
    assert actions(scaler.run_once()) == [("stop", vm.name)]
    assert proxy.workers()[vm.name]["state"] == "revoked"


def test_stop_never_shuts_down_a_vm_whose_worker_runs_a_job(config, host, proxy):
    scaler = Scaler(config, hosts=[host])
    scaler.up(1)
    vm = only_vm(scaler)
    scaler.drain(vm.name)
    job = proxy.hub.submit()

    def register_claim_drain():
        worker = proxy.hub.register(vm.name)
        assert [j["id"] for j in worker.claim()] == [job]
        assert proxy.hub.admin_action(worker, "drain").status_code == 200
    scaler.proxy = HookedProxy(config, queue=register_claim_drain)
    assert "stop" not in [a for a, _ in actions(scaler.run_once())]
    assert host.is_active(vm.name) and proxy.hub.job(job)["state"] == "running"


def test_up_and_down_count_under_the_lock(scaler):
    assert len(scaler.up(2)) == 2
    assert len(scaler.up(1)) == 1
    assert len(scaler.scale_to(delta=-2)) == 2
    assert len(policy.staying(scaler.store.load().vms.values())) == 1
    with pytest.raises(TypeError):
        scaler.scale_to(1, delta=1)


def test_enrollment_tokens_expire_after_the_boot_timeout(scaler, proxy, config):
    scaler.up(1)
    token = proxy.enrollments()[f"vm {only_vm(scaler).name}"]
    assert token["expires_at"] is not None and token["revoked_at"] is None


def test_a_failed_create_deletes_its_files_and_keeps_the_first_error(config, host, proxy):
    def libvirt_and_proxy_go_away():
        host.conn.close()
        proxy.stop()
    scaler = Scaler(config, hosts=[host],
                    proxy=HookedProxy(config, create_enrollment=libvirt_and_proxy_go_away))
    with pytest.raises(LibvirtUnreachable):
        scaler.up(1)
    assert not [p for p in Path(config.state_dir).iterdir() if p.name.startswith("jc-")]
    assert scaler.store.load().vms == {}
    (token,) = [e for label, e in proxy.enrollments().items() if label.startswith("vm ")]
    assert token["expires_at"] is not None     # not revoked (the proxy was gone): it expires


def test_settle_also_reconciles(scaler, host, proxy):
    scaler.up(2)
    a, b = sorted(scaler.store.load().vms)
    host.destroy_and_undefine(a)
    (d,) = scaler.drain(b)
    assert scaler.settle({b}, timeout_s=5, poll_s=0.05) == set()
    assert scaler.store.load().vms == {}        # the vanished one was reconciled too


def test_destroy_drains_first_and_checks_the_jobs_after(config, host, proxy):
    scaler = Scaler(config, hosts=[host])
    scaler.up(1)
    vm = only_vm(scaler)
    worker = proxy.hub.register(vm.name)
    scaler.run_once()
    job = proxy.hub.submit()
    # the worker claims between the command's first look and its check
    scaler.proxy = HookedProxy(config, queue=lambda: worker.claim())
    with pytest.raises(VMError, match="runs 1 job.*draining now"):
        scaler.destroy(vm.name)
    assert host.is_active(vm.name) and proxy.hub.job(job)["state"] == "running"
    assert only_vm(scaler).state == "draining" and proxy.workers()[vm.name]["state"] == "draining"


def test_only_the_newest_failed_consoles_are_kept(scaler, config):
    state_dir = Path(config.state_dir)  # made private (0711) by the scaler at start
    old = [state_dir / f"{domain.new_name('jc-')}-console.failed.log" for _ in range(KEEP_FAILED_CONSOLES)]
    for i, path in enumerate(old):
        path.write_text("old")
        os.utime(path, (1000 + i, 1000 + i))
    scaler.up(1)
    vm = only_vm(scaler)
    Path(vm.console_log).write_text("panic")
    scaler.run_once(now=time.time() + config.boot_timeout_s + 1)
    kept = sorted(p.name for p in state_dir.glob("*-console.failed.log"))
    assert len(kept) == KEEP_FAILED_CONSOLES and f"{vm.name}-console.failed.log" in kept
    assert not old[0].exists() and old[1].exists()


# ----------------------------------------------- hosts that fail, or leave the config

def test_host_backoff_reopens_a_lost_connection_when_due(tmp_path):
    require_libvirt()
    node = tmp_path / "node.xml"
    host = libvirt_host.Host(f"test://{node}", None)
    assert not host.reconnect_if_due(100)            # no node file yet: fails
    node.write_text("<node/>")
    assert not host.reconnect_if_due(100 + libvirt_host.RECONNECT_FIRST_S - 1)   # not due yet
    assert host.reconnect_if_due(100 + libvirt_host.RECONNECT_FIRST_S)
    assert host.domain_names() == set()
    host.conn.close()                                # the connection dies under us
    with pytest.raises(LibvirtUnreachable):
        host.domain_names()
    assert not host.reachable and host.reconnect_if_due(0)    # retried at the next chance
    host.close()


def test_one_dead_host_does_not_stop_the_fleet(config, host, proxy, tmp_path):
    node = tmp_path / "node.xml"
    uri = f"test://{node}"
    # one of two URIs down at start: the scaler starts on the other
    clock = [time.time()]
    scaler = Scaler(replace(config, libvirt_uris=(host.uri, uri)),
                    hosts=[host, libvirt_host.Host(uri, None)], clock=lambda: clock[0])
    proxy.hub.submit()
    assert [d.action for d in scaler.run_once()] == [Action.CREATE]
    assert only_vm(scaler).host_uri == host.uri
    node.write_text("<node/>")
    clock[0] += libvirt_host.RECONNECT_FIRST_S
    scaler.up(1)                                    # it reconnected: the new VM goes there
    second = [r for r in scaler.store.load().vms.values() if r.host_uri == uri]
    assert len(second) == 1
    scaler.hosts[uri].conn.close()                  # libvirt on the second host goes away
    proxy.hub.submit()
    proxy.hub.submit()
    got = scaler.run_once()
    assert all(d.vm != second[0].name for d in got)
    assert second[0].name in scaler.store.load().vms   # left alone, not lost
    # reopened at the next pass: that hypervisor came back empty, so the VM is lost
    assert ("lost", second[0].name) in actions(scaler.run_once())
    scaler.hosts[uri].close()


def test_scaler_starts_when_one_of_several_uris_is_down(config, tmp_path):
    require_libvirt()
    scaler = Scaler(replace(config, libvirt_uris=("test:///default", f"test://{tmp_path}/none.xml")))
    try:
        assert [h.reachable for h in scaler.hosts.values()] == [True, False]
    finally:
        scaler.close()
    with pytest.raises(LibvirtUnreachable, match="cannot connect"):
        Scaler(replace(config, libvirt_uris=(f"test://{tmp_path}/none.xml",)))


def test_a_vm_on_a_host_no_longer_configured_is_left_alone(config, host, proxy, tmp_path):
    (tmp_path / "node.xml").write_text("<node/>")
    second = open_host(f"test://{tmp_path}/node.xml")
    try:
        both = Scaler(replace(config, libvirt_uris=(host.uri, second.uri), idle_time_s=0),
                      hosts=[host, second])
        both.up(2)
        vm = next(r for r in both.store.load().vms.values() if r.host_uri == second.uri)
        proxy.hub.register(vm.name)
        both.run_once()
        one = Scaler(replace(config, idle_time_s=0), hosts=[host])   # the second host removed
        assert all(d.vm != vm.name for d in one.run_once())
        assert all(d.vm != vm.name for d in one.down(2))
        with pytest.raises(VMError, match="not in libvirt_uris"):
            one.destroy(vm.name, force=True)
        assert Path(vm.disk).exists() and second.is_active(vm.name)
        assert vm.name in one.store.load().vms
    finally:
        second.close()


# ------------------------------------------------ the proxy side, SQLite and PostgreSQL

@pytest.fixture
def hub(make_config, database_url):
    from proxy import close_app, create_app

    application = create_app(make_config(database_url=database_url))
    yield Hub(application)
    close_app(application)


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


VM_SHAPE = "cpus=1&memory_mb=1536&gpus=0&images=jobcloud/python,jobcloud/ml"


def test_queue_view_counts_what_a_vm_shaped_worker_could_run(hub):
    h = hub.admin["headers"]
    hub.submit()
    hub.submit(image="jobcloud/ml")
    hub.submit(gpus=1)
    hub.submit(memory_mb=4096)
    bob = hub.bob
    assert hub.client.put("/api/v1/admin/users/bob/limits", json={"max_running": 1},
                          headers=h).status_code == 200
    for _ in range(3):
        hub.submit(user=bob)                # bob can start one more at most
    everything = hub.client.get("/api/v1/admin/queue", headers=h).get_json()
    assert (everything["queued"], everything["runnable"]) == (7, 5)
    view = hub.client.get(f"/api/v1/admin/queue?{VM_SHAPE}", headers=h).get_json()
    assert (view["queued"], view["runnable"]) == (7, 3)
    only_python = VM_SHAPE.replace(",jobcloud/ml", "")
    assert hub.client.get(f"/api/v1/admin/queue?{only_python}", headers=h).get_json()["runnable"] == 2


@pytest.mark.parametrize("query", [
    "cpus=1", "cpus=x&memory_mb=1&gpus=0&images=a", "cpus=nan&memory_mb=1&gpus=0&images=a",
    "cpus=1&memory_mb=1.5&gpus=0&images=a", "cpus=1&memory_mb=1&gpus=-1&images=a",
    "cpus=1&memory_mb=1&gpus=0&images=", "cpus=inf&memory_mb=1&gpus=0&images=a",
])
def test_bad_worker_shapes_are_refused_with_json_400(hub, query):
    r = hub.client.get(f"/api/v1/admin/queue?{query}", headers=hub.admin["headers"])
    assert r.status_code == 400 and r.get_json()["error"] == "invalid_shape"


def test_scaler_events_are_pruned_and_counts_survive(hub):
    def report(n: int, at: float, action: str = "create"):
        hub.call(proxy_vms.record_report, {"events": [{"action": action, "reason": f"r{i}"}
                                                      for i in range(n)]}, at)
    now = time.time()
    report(3, now - proxy_vms.KEEP_EVENTS_S - 10, "remove")     # older than a week
    report(600, now - 60)
    report(600, now)
    events = hub.call(proxy_vms.recent_events, 5000)
    assert len(events) == proxy_vms.KEEP_EVENTS
    assert {e["action"] for e in events} == {"create"}
    assert min(e["at"] for e in events) == now - 60            # the oldest ones went
    assert hub.call(proxy_vms.decision_counts) == {"create": 1200, "remove": 3}
    metrics = hub.client.get("/metrics").get_data(as_text=True)
    assert 'jobcloud_scaler_decisions_total{action="create"} 1200.0' in metrics


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
