"""Real worker VMs, end to end: the template (tests/test_vm_template.py builds
it), libvirt's qemu:///system with software emulation (domain type qemu: KVM
guests do not boot on these machines), the proxy under gunicorn on loopback
(the guest reaches it at 10.0.2.2 through QEMU's user-mode network), the
worker inside the VM running jobs in the VM's own Docker.

Slow (a boot under emulation takes about 40 s), and under CI it runs, never
skips. Each VM's serial console goes to a file whose tail is printed when a
wait fails, so a boot that never reaches the worker can be diagnosed.
"""
from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
import requests

from tests.conftest import ROOT, require, wait_until
from tests.test_vm_template import TEST_TEMPLATE, ensure_test_template
from vm_provisioning import domain
from vm_provisioning.seed import Identity, write_seed

pytestmark = [pytest.mark.slow, pytest.mark.live]

URI = "qemu:///system"
# libvirt's QEMU (user libvirt-qemu) must reach the clones: not under pytest's 0700 tmp dirs.
RUNS = ROOT / "var-vm" / "test-runs"
BOOT_TIMEOUT_S = 420
JOB_TIMEOUT_S = 240


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def template():
    return ensure_test_template()


@pytest.fixture(scope="module")
def qemu():
    """An open connection to qemu:///system (libvirtd started by scripts/libvirt-up.sh)."""
    try:
        import libvirt
    except ImportError:
        require(False, "libvirt-python is not installed (pip install -e '.[vm]')")
    if os.geteuid() == 0 and shutil.which("libvirtd"):
        subprocess.run([str(ROOT / "scripts" / "libvirt-up.sh")], capture_output=True)
    try:
        conn = libvirt.open(URI)
    except libvirt.libvirtError as e:
        require(False, f"libvirtd does not answer on {URI} ({e}): run scripts/libvirt-up.sh")
    yield conn
    conn.close()


class Cluster:
    """The proxy on loopback, an admin and a user with API tokens, and a run dir
    (clones, seeds, consoles) that libvirt's QEMU can read."""

    def __init__(self, url: str, run_dir: Path, admin: str, user: str):
        self.url, self.run_dir = url, run_dir
        self.admin_headers = {"Authorization": f"Bearer {admin}"}
        self.user_headers = {"Authorization": f"Bearer {user}"}
        self.admin_token = admin
        self.guest_url = url.replace("127.0.0.1", "10.0.2.2")

    def enrollment(self) -> str:
        r = requests.post(f"{self.url}/api/v1/admin/enrollment-tokens", json={"label": "vm e2e"},
                          headers=self.admin_headers, timeout=10)
        assert r.status_code == 201, r.text
        return r.json()["token"]

    def workers(self, include_gone: bool = False) -> list[dict]:
        r = requests.get(f"{self.url}/api/v1/admin/workers", params={"all": int(include_gone)},
                         headers=self.admin_headers, timeout=10)
        return r.json()["workers"]

    def worker(self, name: str) -> dict | None:
        return next((w for w in self.workers() if w["name"] == name), None)

    def submit(self, code: str) -> str:
        fields = {"code": code, "image": "jobcloud/python", "cpus": "1", "memory_mb": "256",
                  "timeout_s": "300", "name": "vm-e2e"}
        r = requests.post(f"{self.url}/api/v1/jobs", headers=self.user_headers,
                          files={k: (None, v) for k, v in fields.items()}, timeout=10)
        assert r.status_code == 201, r.text
        return r.json()["id"]

    def job(self, job_id: str) -> dict:
        return requests.get(f"{self.url}/api/v1/jobs/{job_id}", headers=self.user_headers,
                            timeout=10).json()

    def stdout(self, job_id: str) -> str:
        return requests.get(f"{self.url}/api/v1/jobs/{job_id}/logs", params={"stream": "stdout"},
                            headers=self.user_headers, timeout=10).json()["data"]


@pytest.fixture
def cluster(live_server):
    run_dir = RUNS / secrets.token_hex(4)
    run_dir.mkdir(parents=True)
    for d in (RUNS.parent, RUNS, run_dir):
        d.chmod(0o755)
    try:
        live_server.admin("user", "add", "vmadmin", "--admin")
        live_server.admin("user", "add", "alice")
        yield Cluster(live_server.url, run_dir,
                      live_server.admin("token", "create", "--user", "vmadmin"),
                      live_server.admin("token", "create", "--user", "alice"))
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def console_tail(path: Path, lines: int = 60) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        return f"(no console log at {path}: {e})"
    return f"--- last {lines} lines of {path.name} ---\n" + "\n".join(text.splitlines()[-lines:])


def wait_or_show_console(predicate, consoles, timeout: float, what: str, interval: float = 1.0):
    """wait_until, and on a timeout the tail of each VM console log in the failure."""
    try:
        return wait_until(predicate, timeout=timeout, interval=interval, what=what)
    except AssertionError as e:
        logs = "\n".join(console_tail(Path(p)) for p in consoles())
        raise AssertionError(f"{e}\n{logs}") from None


def state_of(cluster: Cluster, job_id: str, *states: str):
    job = cluster.job(job_id)
    return job if job["state"] in states else None


PRINT_JOB = ("import os, platform\n"
             "print('hello from', platform.node(), 'attempt', os.environ['JOBCLOUD_ATTEMPT'], 6 * 7)\n")


# ------------------------------------------- one clone, by hand (no scaler)

def test_a_cloned_vm_registers_and_runs_a_job_in_docker(template, qemu, cluster):
    """A linked clone of the template with its seed boots, its worker registers
    through user-mode networking, and a job runs in Docker inside the VM."""
    name = domain.new_name("jchand-")
    disk, seed = cluster.run_dir / f"{name}.qcow2", cluster.run_dir / f"{name}-seed.iso"
    console = cluster.run_dir / f"{name}-console.log"
    base = TEST_TEMPLATE / template["disk"]
    base_sha = template["files"][template["disk"]]["sha256"]
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2",
                    str(disk)], check=True)
    write_seed(seed, Identity(instance_id=name, hostname=name, worker_name=name,
                              proxy_url=cluster.guest_url, enrollment_token=cluster.enrollment(),
                              slots=1))
    xml = domain.domain_xml(domain.DomainSpec(
        name=name, uuid=domain.new_uuid(), mac=domain.new_mac(), domain_type="qemu",
        memory_mb=1024, vcpus=1, disk=str(disk), seed=str(seed),
        kernel=str(TEST_TEMPLATE / template["kernel"]), initrd=str(TEST_TEMPLATE / template["initrd"]),
        cmdline=template["cmdline"], console_log=str(console)))
    dom = qemu.defineXML(xml)
    try:
        dom.create()
        worker = wait_or_show_console(lambda: cluster.worker(name), lambda: [console],
                                      BOOT_TIMEOUT_S, f"the worker of {name} to register")
        assert worker["state"] == "active" and worker["images"] == ["jobcloud/python"]
        job_id = cluster.submit(PRINT_JOB)
        job = wait_or_show_console(lambda: state_of(cluster, job_id, "succeeded", "failed"),
                                   lambda: [console], JOB_TIMEOUT_S, f"job {job_id} to finish")
        assert job["state"] == "succeeded", (job["failure_reason"], console_tail(console))
        # The VM's worker is the only one this proxy has ever had.
        assert [w["name"] for w in cluster.workers(include_gone=True)] == [name]
        # platform.node() in a job container is its hostname "job": it ran in Docker.
        assert "hello from job attempt 1 42" in cluster.stdout(job_id)
    finally:
        if dom.isActive():
            dom.destroy()
        dom.undefine()
    # The clone wrote to its own overlay only.
    assert subprocess.run(["sha256sum", str(base)], capture_output=True, text=True,
                          check=True).stdout.split()[0] == base_sha


# ------------------------------------------------- the autoscaler's whole story

def run_prefix(base: str) -> str:
    """A name prefix of this run's own: another run of the suite may share
    qemu:///system, and its VMs must not count as this run's (nor be removed by it)."""
    return f"{base}{secrets.token_hex(2)}-"


def our_domains(qemu, prefix: str) -> list[str]:
    return sorted(d.name() for d in qemu.listAllDomains() if domain.is_our_name(d.name(), prefix))


def start_autoscaler(cluster: Cluster, qemu, prefix: str, **settings):
    """The scaler daemon in a thread over the cluster's proxy, every 2 s, its VMs
    named `prefix` + 10 hex digits with their files in run_dir/clones.

    Returns:
        The Scaler, and a function that stops the daemon and destroys and
        undefines every domain named with `prefix` (for a finally block).
    """
    from vm_provisioning.config import ScalerConfig, validate
    from vm_provisioning.scaler import Scaler

    config = validate(ScalerConfig(
        template_dir=str(TEST_TEMPLATE), state_dir=str(cluster.run_dir / "clones"),
        proxy_url=cluster.url, admin_token=cluster.admin_token, domain_type="qemu",
        memory_mb=1024, vcpus=1, worker_slots=1, name_prefix=prefix,
        boot_timeout_s=BOOT_TIMEOUT_S, shutdown_timeout_s=60, interval_s=2, **settings))
    scaler = Scaler(config)
    stop = threading.Event()
    daemon = threading.Thread(target=scaler.run_forever, args=(stop,), name="scaler", daemon=True)
    daemon.start()

    def stop_and_clean_up():
        stop.set()
        daemon.join(timeout=60)
        for name in our_domains(qemu, prefix):
            d = qemu.lookupByName(name)
            if d.isActive():
                d.destroy()
            d.undefine()
    return scaler, stop_and_clean_up


def test_autoscaler_clones_on_demand_retires_idle_and_replaces_a_destroyed_vm(
        template, qemu, cluster):
    """min 0: no VM until a job queues; then a clone runs it; after idle_time the VM
    is drained and removed (no domain, no disk); a VM destroyed mid-job loses its
    worker, the job requeues and finishes on a new VM."""
    prefix = run_prefix("jce2e")
    scaler, stop_autoscaler = start_autoscaler(
        cluster, qemu, prefix, queue_per_worker=1.0, min_vms=0, max_vms=1, step=1, cooldown_s=0,
        idle_time_s=20)
    config, state_dir = scaler.config, Path(scaler.config.state_dir)

    def consoles():
        return sorted(state_dir.glob("*console*.log")) if state_dir.is_dir() else []

    def files_of(name: str) -> list[Path]:
        return sorted(state_dir.glob(f"{name}*")) if state_dir.is_dir() else []

    try:
        # min_vms=0 and nothing queued: three passes later, the scaler has cloned nothing.
        wait_until(lambda: scaler.passes >= 3, timeout=60, what="three passes of the scaler")
        assert our_domains(qemu, prefix) == []

        first_job = cluster.submit(PRINT_JOB)
        vm1 = wait_until(lambda: our_domains(qemu, prefix), timeout=60,
                         what="the scaler to clone a VM for the queued job")[0]
        assert {p.name for p in files_of(vm1)} >= {f"{vm1}.qcow2", f"{vm1}-seed.iso"}
        job = wait_or_show_console(lambda: state_of(cluster, first_job, "succeeded", "failed"),
                                   consoles, BOOT_TIMEOUT_S + JOB_TIMEOUT_S,
                                   f"job {first_job} to finish on {vm1}")
        assert job["state"] == "succeeded", (job["failure_reason"], console_tail(files_of(vm1)[0]))
        assert "hello from job attempt 1 42" in cluster.stdout(first_job)

        # Idle for idle_time: drained, shut down, undefined, its files deleted.
        wait_or_show_console(lambda: not our_domains(qemu, prefix) and not files_of(vm1), consoles,
                             config.idle_time_s + config.shutdown_timeout_s + 120,
                             f"{vm1} to be retired after {config.idle_time_s:g} s idle")
        assert cluster.worker(vm1) is None      # drained, then revoked: no longer live

        # A VM destroyed under a running job: the job requeues and ends on a new VM.
        slow_job = cluster.submit("import os, time\n"
                                  "print('attempt', os.environ['JOBCLOUD_ATTEMPT'], flush=True)\n"
                                  "time.sleep(20)\nprint('done')\n")
        running = wait_or_show_console(lambda: state_of(cluster, slow_job, "running"), consoles,
                                       BOOT_TIMEOUT_S + 60, f"job {slow_job} to start on a new VM")
        vm2 = our_domains(qemu, prefix)[0]
        assert vm2 != vm1 and running["attempt"] == 1
        subprocess.run(["virsh", "-c", URI, "destroy", vm2], check=True, capture_output=True)
        wait_until(lambda: cluster.job(slow_job)["attempt"] >= 2 or
                   cluster.job(slow_job)["state"] == "queued", timeout=120, interval=1,
                   what=f"job {slow_job} to be requeued after {vm2} was destroyed")
        done = wait_or_show_console(lambda: state_of(cluster, slow_job, "succeeded", "failed"),
                                    consoles, BOOT_TIMEOUT_S + JOB_TIMEOUT_S,
                                    f"job {slow_job} to finish on a replacement VM")
        assert done["state"] == "succeeded" and done["attempt"] == 2, done
        assert "attempt 2" in cluster.stdout(slow_job)
        vm3 = our_domains(qemu, prefix)
        assert vm3 and vm2 not in vm3 and not files_of(vm2)
    finally:
        stop_autoscaler()


# ------------------------------------------------------------- a warm VM (idle_vms)

def test_an_idle_vm_kept_warm_starts_a_job_without_a_boot_and_is_replaced(template, qemu, cluster):
    """idle_vms=1: the scaler boots one VM before any job; a job submitted then
    starts on that VM's worker while no other VM exists, a replacement is cloned
    once the job holds the first; once both are idle, the one beyond idle_vms is
    retired after idle_time and the other stays."""
    prefix = run_prefix("jcwarm")
    scaler, stop_autoscaler = start_autoscaler(
        cluster, qemu, prefix, min_vms=0, max_vms=2, idle_vms=1, step=1,
        # one job for one worker is not over the threshold: only idle_vms adds the replacement
        queue_per_worker=1.0, cooldown_s=3600, idle_time_s=20)
    config, state_dir = scaler.config, Path(scaler.config.state_dir)

    def consoles():
        return sorted(state_dir.glob("*console*.log")) if state_dir.is_dir() else []

    def records():
        return scaler.store.load().vms

    try:
        # Nothing queued: the scaler boots one VM to wait for the first job.
        warm = wait_until(lambda: our_domains(qemu, prefix), timeout=60,
                          what="the scaler to clone the idle VM")[0]
        worker = wait_or_show_console(lambda: cluster.worker(warm), consoles, BOOT_TIMEOUT_S,
                                      f"the worker of {warm} to register")
        wait_until(lambda: records().get(warm) and records()[warm].state == "ready", timeout=60,
                   what=f"the scaler to see {warm} ready")
        seen = scaler.passes
        wait_until(lambda: scaler.passes >= seen + 2, timeout=60, what="two more passes")
        assert our_domains(qemu, prefix) == [warm] and list(records()) == [warm]

        submitted = time.time()
        job_id = cluster.submit("import time\nprint('warm start', 6 * 7, flush=True)\n"
                                "time.sleep(10)\n")
        running = wait_or_show_console(lambda: state_of(cluster, job_id, "running"), consoles,
                                       JOB_TIMEOUT_S, f"job {job_id} to start on {warm}")
        # It started on the VM that was already up: no VM was cloned for it.
        assert running["worker_id"] == worker["id"] and running["attempt"] == 1
        assert all(r.created_at >= submitted for name, r in records().items() if name != warm)

        # The job holds the idle VM: a replacement is cloned (cooldown or not), and boots.
        spare = wait_until(lambda: [n for n in our_domains(qemu, prefix) if n != warm], timeout=60,
                           what="the scaler to clone a replacement idle VM")[0]
        assert records()[spare].created_at >= submitted

        def reported_create():
            events = requests.get(f"{cluster.url}/api/v1/admin/vms", headers=cluster.admin_headers,
                                  timeout=10).json()["events"]
            return next((e for e in events if e["action"] == "create" and e["vm_name"] == spare), None)
        # The domain starts mid-pass; the pass reports its decisions when it ends.
        create = wait_until(reported_create, timeout=60, what=f"the scaler to report creating {spare}")
        assert "keeping 1 idle VM warm" in create["reason"]
        done = wait_or_show_console(lambda: state_of(cluster, job_id, "succeeded", "failed"),
                                    consoles, JOB_TIMEOUT_S, f"job {job_id} to finish")
        assert done["state"] == "succeeded", (done["failure_reason"], console_tail(consoles()[0]))
        assert "warm start 42" in cluster.stdout(job_id)
        wait_or_show_console(lambda: cluster.worker(spare), consoles, BOOT_TIMEOUT_S,
                             f"the worker of {spare} to register")

        # Two idle VMs: after idle_time the one beyond idle_vms goes, the other stays.
        left = wait_or_show_console(lambda: len(our_domains(qemu, prefix)) == 1 and len(records()) == 1
                                    and our_domains(qemu, prefix), consoles,
                                    config.idle_time_s + config.shutdown_timeout_s + 120,
                                    "the idle VM beyond idle_vms to be retired")
        seen = scaler.passes
        wait_until(lambda: scaler.passes >= seen + 3, timeout=60, what="three more passes")
        assert our_domains(qemu, prefix) == left and records()[left[0]].state == "ready"
        assert cluster.worker(left[0])["state"] == "active"
    finally:
        stop_autoscaler()
