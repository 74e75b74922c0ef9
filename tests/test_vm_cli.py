"""`jobcloud-vm`: the admin commands work against the real proxy and libvirt's test
driver, and every failure an admin can meet is one sentence and a non-zero exit,
never a traceback.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import free_port, wait_until
from tests.test_vm_scaler import make_template, proxy, require_libvirt  # noqa: F401  (proxy: fixture)
from vm_provisioning.cli import main


JOBCLOUD_VM = str(Path(sys.executable).parent / "jobcloud-vm")


@pytest.fixture(autouse=True)
def no_vm_env(monkeypatch):
    require_libvirt()
    for key in list(os.environ):
        if key.startswith("JOBCLOUD_VM_"):
            monkeypatch.delenv(key)


@pytest.fixture
def flags(tmp_path, proxy, monkeypatch):
    # The app's log handler writes to the stdout of the test that created it first;
    # in-process, the CLI would log through it after capsys closed that stream.
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [h for h in root.handlers if not getattr(h, "_jobcloud", False)])
    template = make_template(tmp_path / "template")
    return ["--template-dir", str(template), "--state-dir", str(tmp_path / "clones"),
            "--proxy-url", proxy.url, "--admin-token", proxy.admin["token"],
            "--libvirt-uri", "test:///default", "--domain-type", "qemu"]


def run(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_sentence(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jobcloud-vm: "), err
    assert "Traceback" not in err
    return lines[0]


def test_up_list_and_destroy(capsys, flags, proxy):
    code, out, _ = run(capsys, *flags, "up", "1")
    assert code == 0 and out.startswith("create ")
    name = out.split()[1]
    code, out, _ = run(capsys, *flags, "list")
    assert code == 0
    header, row = out.strip().splitlines()
    assert header.split() == ["NAME", "HOST", "STATE", "WORKER", "RUNNING", "AGE"]
    assert row.split()[:5] == [name, "test:///default", "booting", "-", "0"]
    proxy.hub.register(name)
    code, out, _ = run(capsys, *flags, "list", "--json")
    (vm,) = json.loads(out)
    assert (vm["name"], vm["worker"], vm["running"]) == (name, name, 0)
    code, out, _ = run(capsys, *flags, "destroy", name)
    assert code == 0 and out.startswith(f"remove       {name}")
    assert not list((Path(flags[3])).glob(f"{name}*"))
    assert json.loads(run(capsys, *flags, "list", "--json")[1]) == []


def test_autoscale_once_prints_its_decisions(capsys, flags, proxy):
    code, out, _ = run(capsys, *flags, "autoscale", "--once")
    assert (code, out.strip()) == (0, "nothing to do")
    proxy.hub.submit()
    code, out, _ = run(capsys, *flags, "autoscale", "--once")
    assert code == 0 and out.startswith("create ") and "1 queued jobs for 0 workers" in out


def test_unknown_name(capsys, flags):
    code, _, err = run(capsys, *flags, "drain", "jc-ffffffffff")
    assert code == 1 and "no VM named 'jc-ffffffffff'" in one_sentence(err)


def test_missing_template(capsys, flags, tmp_path):
    code, _, err = run(capsys, *flags, "--template-dir", str(tmp_path / "none"), "up", "1")
    assert code == 1 and "no worker VM template" in one_sentence(err)


def test_proxy_refuses_the_admin_token(capsys, flags, proxy):
    code, _, err = run(capsys, *flags, "--admin-token", proxy.hub.alice["token"], "list")
    assert code == 1 and "refused the admin token" in one_sentence(err)


def test_proxy_unreachable(capsys, flags):
    code, _, err = run(capsys, *flags, "--proxy-url", f"http://127.0.0.1:{free_port()}", "list")
    assert code == 1 and "cannot reach the proxy" in one_sentence(err)


@pytest.mark.parametrize("extra, message", [
    (["--domain-type", "xen"], "domain_type must be one of"),
    (["--max-vms", "lots"], "max_vms"),
    (["--admin-token", ""], "no admin token"),
    (["--guest-proxy-url", "http://jobcloud.lab:3000"], "reach the proxy without DNS"),
    (["--guest-proxy-url", "http://"], "guest_proxy_url must be an http:// or https:// URL"),
])
def test_bad_configuration_exits_2(capsys, flags, extra, message):
    code, _, err = run(capsys, *flags, *extra, "list")
    assert code == 2 and message in one_sentence(err)


DEAD_URI = "qemu+unix:///system?socket=/nonexistent"


def test_libvirt_unreachable_through_the_real_entry_point(flags):
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBCLOUD_VM_")}
    only_dead = [f for f in flags if f not in ("--libvirt-uri", "test:///default")]
    done = subprocess.run([JOBCLOUD_VM, *only_dead, "--libvirt-uri", DEAD_URI, "list"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 1
    assert f"cannot connect to libvirt at {DEAD_URI}" in one_sentence(done.stderr)


def test_one_dead_uri_of_two_is_a_warning(capsys, flags):
    code, out, err = run(capsys, *flags, "--libvirt-uri", DEAD_URI, "list", "--json")
    assert code == 0 and json.loads(out) == []


def test_autoscale_daemon_stops_cleanly_on_sigterm(flags, proxy):
    proxy.hub.submit()
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBCLOUD_VM_")}
    daemon = subprocess.Popen([JOBCLOUD_VM, *flags, "--interval-s", "0.2", "autoscale"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        state = Path(flags[3]) / "scaler-state.json"
        wait_until(lambda: state.exists() and json.loads(state.read_text())["vms"],
                   timeout=30, what="the daemon to clone a VM")
        daemon.send_signal(signal.SIGTERM)
        _, err = daemon.communicate(timeout=30)
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
    assert daemon.returncode == 0
    assert "create" in err and "1 queued jobs for 0 workers" in err   # each decision logged with its reason
    assert "Traceback" not in err


def test_build_template_needs_an_image(capsys, flags):
    code, _, err = run(capsys, *flags, "build-template", "--images", " , ")
    assert code == 2 and "--images must name at least one job image" in one_sentence(err)
