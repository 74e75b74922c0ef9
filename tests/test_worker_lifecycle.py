"""A worker's life (issue 12): a partition longer than the lease does not end
it, only an admin's revoke does (with its exit code), and `make run` stops in
order on Ctrl-C. Real gunicorn, real workers, real Docker."""
from __future__ import annotations

import contextlib
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from tests.conftest import free_port, require, stop_gunicorn, wait_until
from tests.test_worker_sandbox import IMAGE, docker_ready, job_containers, start_cluster, stop_worker
from worker.errors import EXIT_REVOKED

LEASE_S = 3
ROOT = Path(__file__).parent.parent


@pytest.fixture
def short_lease(tmp_path):
    """A proxy with a 3 s lease (0.5 s heartbeats) and one worker of its own."""
    ok, reason = docker_ready()
    require(ok, reason)
    c = start_cluster(tmp_path, slots=2, gunicorn_workers=2, proxy_env={
        "JOBCLOUD_LEASE_TIMEOUT_S": str(LEASE_S), "JOBCLOUD_HEARTBEAT_INTERVAL_S": "0.5"})
    yield c
    stop_worker(c.worker)
    stop_gunicorn(c.server.proc)


def registrations(c) -> int:
    return c.worker_log.read_text().count("registered as ")


def container_exited(job_id: str) -> bool:
    import docker
    found = job_containers(docker.from_env(), job_id)
    return not found or all(ct.status == "exited" for ct in found)


def test_a_proxy_frozen_past_the_lease_does_not_end_the_worker(short_lease):
    c = short_lease
    job_id = c.submit("import time\nprint('started', flush=True)\ntime.sleep(1)\nprint('done')")
    wait_until(lambda: "started" in c.logs(job_id)["data"], timeout=30, what="the job to start")
    frozen_at = time.monotonic()
    os.killpg(c.server.proc.pid, signal.SIGSTOP)
    try:
        # The job ends while the proxy is frozen, and the freeze outlasts the lease.
        wait_until(lambda: container_exited(job_id) and time.monotonic() - frozen_at > LEASE_S + 1,
                   timeout=30, what="the job to end and the lease to run out")
    finally:
        os.killpg(c.server.proc.pid, signal.SIGCONT)

    # The worker's first call finds it silent past its lease; it registers again.
    wait_until(lambda: registrations(c) >= 2, timeout=30, what="the worker to register again")
    assert c.worker.poll() is None, c.log_tail()
    # The job that ended during the freeze had lost its lease: its result was
    # refused, and it ran again. Usually once; on a loaded box a claim that was
    # in flight across the freeze can hand the requeued job to the registration
    # being replaced, which costs one more attempt. Either way every earlier try
    # is one lost with its worker (none of their results was taken).
    job = c.wait(job_id, timeout=60)
    assert job["state"] == "succeeded" and job["attempt"] >= 2, job
    assert [t["outcome"] for t in job["tries"]] == ["worker_lost"] * (job["attempt"] - 1) + ["final"], job["tries"]
    # It goes on claiming and running jobs.
    assert c.run("print('after the partition')")["state"] == "succeeded"
    assert c.worker.poll() is None, c.log_tail()


def test_an_admin_revoke_ends_the_worker_with_its_exit_code(short_lease):
    c = short_lease
    c.server.admin("user", "add", "root", "--admin")
    admin = {"Authorization": "Bearer " + re.search(
        r"jcu_\S+", c.server.admin("token", "create", "--user", "root")).group(0)}
    job_id = c.submit("import time\nprint('started', flush=True)\ntime.sleep(120)")
    wait_until(lambda: "started" in c.logs(job_id)["data"], timeout=30, what="the job to start")
    [me] = requests.get(f"{c.server.url}/api/v1/admin/workers", headers=admin, timeout=10).json()["workers"]
    r = requests.post(f"{c.server.url}/api/v1/admin/workers/{me['id']}/revoke", headers=admin, timeout=10)
    assert r.status_code == 200, r.text
    assert c.worker.wait(timeout=30) == EXIT_REVOKED, c.log_tail()
    assert c.job(job_id)["state"] == "queued"   # handed back for another worker
    assert container_exited(job_id)
    assert registrations(c) == 1


# ---------------------------------------------------------------- make run

@pytest.fixture
def make_run(tmp_path):
    """scripts/run-local.sh started as `make run` starts it, in a process group of
    its own, as a terminal's foreground group would be."""
    ok, reason = docker_ready()
    require(ok, reason)
    port = free_port()
    data_dir = tmp_path / "var"
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
               DATA_DIR=str(data_dir), JOBCLOUD_DATA_DIR=str(data_dir),   # the admin CLI's too
               HOST="127.0.0.1", PORT=str(port),
               WORKER_NAME=f"make-run-{os.getpid()}", JOBCLOUD_LOG_LEVEL="WARNING",
               JOBCLOUD_GUNICORN_WORKERS="2", JOBCLOUD_WORKER_IMAGES=IMAGE,
               JOBCLOUD_WORKER_CLAIM_WAIT_S="5", JOBCLOUD_WORKER_BACKOFF_MAX_S="1")
    for name in ("JOBCLOUD_CONFIG", "JOBCLOUD_DATABASE_URL", "JOBCLOUD_BIND"):
        env.pop(name, None)
    log = tmp_path / "run.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(["bash", str(ROOT / "scripts/run-local.sh")], env=env, cwd=tmp_path,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    run = MakeRun(proc, url, env, data_dir, log)
    try:
        wait_until(run.worker_ready, timeout=60, what="make run's proxy and worker")
        jobcloud = str(Path(sys.executable).parent / "jobcloud")
        subprocess.run([jobcloud, "user", "add", "alice"], env=env, check=True, capture_output=True)
        out = subprocess.run([jobcloud, "token", "create", "--user", "alice"], env=env, check=True,
                             capture_output=True, text=True).stdout
        run.headers = {"Authorization": "Bearer " + re.search(r"jcu_\S+", out).group(0)}
        yield run
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            # Two signals back to back can merge into one: the second once the first is seen.
            with contextlib.suppress(AssertionError):
                wait_until(lambda: "stopping jobcloud" in run.log_text(), timeout=5,
                           what="the script to act on Ctrl-C")
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        _kill_sessions_left(proc.pid)


class MakeRun:
    def __init__(self, proc, url, env, data_dir, log):
        self.proc, self.url, self.env, self.data_dir, self.log = proc, url, env, data_dir, log
        self.headers = {}

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_until(self, predicate, timeout: float, what: str):
        """conftest.wait_until, with the script's output in the failure."""
        try:
            return wait_until(predicate, timeout=timeout, what=what)
        except AssertionError as e:
            lines = [ln for ln in self.log_text().splitlines() if "GET /api/v1/jobs/" not in ln]
            raise AssertionError(f"{e}; make run said:\n" + "\n".join(lines[-40:])) from None

    def worker_ready(self) -> bool:
        assert self.proc.poll() is None, self.log_text()[-3000:]
        return "registered as" in self.log_text()

    def submit(self, code: str) -> str:
        files = {k: (None, str(v)) for k, v in
                 {"code": code, "image": IMAGE, "timeout_s": 300, "memory_mb": 256}.items()}
        r = requests.post(f"{self.url}/api/v1/jobs", headers=self.headers, files=files, timeout=10)
        assert r.status_code == 201, r.text
        return r.json()["id"]

    def job(self, job_id: str) -> dict | None:
        try:
            return requests.get(f"{self.url}/api/v1/jobs/{job_id}", headers=self.headers, timeout=5).json()
        except requests.RequestException:
            return None

    def stored_state(self, job_id: str) -> str:
        """The job's state in the store, read after the proxy is gone."""
        with sqlite3.connect(self.data_dir / "jobcloud.db") as db:
            return db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()[0]

    def started(self, job_id: str) -> bool:
        """The job's script is running: it printed 'started'. (The proxy says
        `running` from the claim on, before the worker has started anything; a
        Ctrl-C in between hands the job back, which is right, but not what
        these tests look at.)"""
        try:
            r = requests.get(f"{self.url}/api/v1/jobs/{job_id}/logs", params={"stream": "stdout"},
                             headers=self.headers, timeout=5)
        except requests.RequestException:
            return False
        return r.status_code == 200 and "started" in r.json()["data"]


def _kill_sessions_left(sid: int) -> None:
    """What the script started in sessions of its own, if a failed test left any."""
    for pid in map(int, filter(str.isdigit, os.listdir("/proc"))):
        try:
            ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == sid:
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass


def _final_block(text: str) -> list[str] | None:
    """The framed block the output ends with (between two rules of '='), if it does."""
    lines = text.rstrip().splitlines()
    rules = [i for i, line in enumerate(lines) if len(line) >= 72 and set(line) == {"="}]
    if len(rules) < 2 or rules[-1] != len(lines) - 1:
        return None
    return lines[rules[-2]:]


def test_make_runs_first_start_ends_with_the_admin_password(make_run, tmp_path):
    block = make_run.wait_until(lambda: _final_block(make_run.log_text()), timeout=30,
                                what="make run to print the first start's password last")
    text = "\n".join(block)
    assert f"Log in at:          {make_run.url}/login" in text
    assert re.search(r"^  user: +admin$", text, re.MULTILINE)
    password = re.search(r"one-time password: +(\S+)", text).group(1)
    hint = block[-2].strip()
    assert hint.endswith("jobcloud-proxy user passwd admin") and "JOBCLOUD_DATA_DIR=" in hint
    output = make_run.log_text()
    assert output.count("one-time password:") == 1
    # The worker protocol stays out of the access log (its register, heartbeats, claims).
    assert "/api/v1/worker" not in output

    s = requests.Session()
    page = s.get(make_run.url + "/login", timeout=10).text
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
    r = s.post(make_run.url + "/login", data={"username": "admin", "password": password,
                                              "csrf_token": csrf}, allow_redirects=False, timeout=10)
    assert r.status_code == 302
    r = s.get(make_run.url + "/", allow_redirects=False, timeout=10)
    assert r.status_code == 302 and r.headers["Location"].endswith("/account/password")
    # How to change it, as printed, from another directory and a shell without the settings.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBCLOUD_")}
    out = subprocess.run(["bash", "-c", hint], cwd=elsewhere, env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "new one-time password for 'admin'" in out.stdout
    assert list(elsewhere.iterdir()) == []


def test_ctrl_c_on_make_run_drains_the_worker_while_the_proxy_answers(make_run):
    job_id = make_run.submit("import time\nprint('started', flush=True)\ntime.sleep(3)")
    wait_until(lambda: make_run.started(job_id), timeout=30, what="the job to start")
    os.killpg(make_run.proc.pid, signal.SIGINT)   # Ctrl-C: the whole foreground group
    # The job finishes and is reported while the proxy still answers.
    job = make_run.wait_until(
        lambda: (j := make_run.job(job_id)) and j["state"] not in ("queued", "running") and j,
        timeout=30, what="the job to finish after Ctrl-C")
    assert job["state"] == "succeeded", job
    assert make_run.proc.wait(timeout=30) == 0, make_run.log_text()[-3000:]
    with pytest.raises(requests.RequestException):
        requests.get(f"{make_run.url}/healthz", timeout=2)


def test_a_second_ctrl_c_stops_the_jobs_at_once_and_hands_them_back(make_run):
    job_id = make_run.submit("import time\nprint('started', flush=True)\ntime.sleep(300)")
    wait_until(lambda: make_run.started(job_id), timeout=30, what="the job to start")
    os.killpg(make_run.proc.pid, signal.SIGINT)
    make_run.wait_until(lambda: "stopping: waiting up to" in make_run.log_text(), timeout=20,
                        what="the worker to begin draining")
    os.killpg(make_run.proc.pid, signal.SIGINT)
    assert make_run.proc.wait(timeout=30) == 0, make_run.log_text()[-3000:]
    # Handed back, not left `running` until the next start.
    assert make_run.stored_state(job_id) == "queued"
    assert container_exited(job_id)


@pytest.mark.parametrize("unit", ["deploy/jobcloud-worker.service",
                                  "vm_provisioning/guest/jobcloud-worker.service"])
def test_systemd_restarts_the_worker_unless_an_admin_ended_it(unit):
    from worker.errors import EXIT_RETIRED
    settings = dict(line.split("=", 1) for line in (ROOT / unit).read_text().splitlines()
                    if "=" in line and not line.startswith("#"))
    assert settings["Restart"] == "always"
    assert settings["StartLimitIntervalSec"] == "0"
    assert set(settings["RestartPreventExitStatus"].split()) == {str(EXIT_RETIRED), str(EXIT_REVOKED)}
