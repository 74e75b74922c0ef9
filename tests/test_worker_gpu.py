"""GPU jobs: what can be checked without an NVIDIA GPU (none on the build machines).

The real device passthrough needs a GPU host with the NVIDIA container toolkit;
here we check the two decisions the worker makes: how many GPUs it reports (from
nvidia-smi, faked below and named so), and that a container gets a GPU device
request exactly when its job asked for GPUs.
"""
import os
import stat

from worker.daemon import count_nvidia_gpus
from worker.sandbox import JobSpec, Policy, Sandbox

POLICY = Policy(pids_limit=256, tmpfs_mb=64, nofile=1024, fsize_bytes=1 << 30)


def spec(gpus: int) -> JobSpec:
    return JobSpec(job_id="j1", attempt=1, image="jobcloud/ml", cpus=1.0, memory_mb=512, gpus=gpus,
                   timeout_s=60)


def lockdown(gpus: int, tmp_path) -> dict:
    # No engine call happens in _lockdown: the client is not needed.
    return Sandbox(None, owner="w", policy=POLICY)._lockdown(spec(gpus), tmp_path / "in", tmp_path / "out")


def test_gpu_device_request_only_when_the_job_asks(tmp_path):
    assert "device_requests" not in lockdown(0, tmp_path)
    [request] = lockdown(2, tmp_path)["device_requests"]
    assert request["Count"] == 2 and request["Capabilities"] == [["gpu"]]


def test_a_gpu_job_keeps_every_other_lockdown(tmp_path):
    kwargs = lockdown(1, tmp_path)
    assert kwargs["network_mode"] == "none" and kwargs["read_only"] is True
    assert kwargs["cap_drop"] == ["ALL"] and kwargs["security_opt"] == ["no-new-privileges"]
    assert kwargs["mem_limit"] == kwargs["memswap_limit"] == "512m"
    assert all("docker.sock" not in m["Source"] for m in kwargs["mounts"])


def _fake_nvidia_smi(tmp_path, body: str) -> str:
    tool = tmp_path / "nvidia-smi"
    tool.write_text("#!/bin/sh\n" + body)
    tool.chmod(tool.stat().st_mode | stat.S_IXUSR)
    return str(tmp_path)


def test_gpus_counted_from_fake_nvidia_smi(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", _fake_nvidia_smi(tmp_path, "printf '0\\n1\\n'\n") + os.pathsep
                       + os.environ["PATH"])
    assert count_nvidia_gpus() == 2


def test_no_gpus_when_fake_nvidia_smi_fails_or_is_absent(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", _fake_nvidia_smi(tmp_path, "exit 9\n"))
    assert count_nvidia_gpus() == 0
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert count_nvidia_gpus() == 0
