"""Issue 14 in a real Chromium and the real `jobcloud` command, against gunicorn:
the upload form shows the `no_capacity` refusal as its error message; a queued
job's page says why it waits, with an estimated start, and follows the reason
live as the cluster changes; `jobcloud status JOB` prints the same, and
`jobcloud submit` prints the refusal.

The worker is one registered over the HTTP worker protocol (the test speaks it
with requests), so its capacity is exactly what the test says.
"""
from __future__ import annotations

import re

import pytest
import requests

from tests.conftest import wait_until
from tests.test_browser import console_errors, page  # noqa: F401  (fixtures)
from tests.test_browser_live import log_in
from tests.test_client_cli import Cli, new_user

PYTHON = "jobcloud/python"


class HttpWorker:
    """A worker speaking the worker protocol over HTTP, 2 CPUs, 4096 MiB, one slot."""

    def __init__(self, server, name: str = "w1"):
        self.url = server.url
        enrollment = server.admin("enroll", "create").strip()
        r = requests.post(f"{self.url}/api/v1/workers/register",
                          headers={"Authorization": f"Bearer {enrollment}"},
                          json={"name": name, "cpus": 2, "memory_mb": 4096, "gpus": 0,
                                "slots": 1, "images": [PYTHON]}, timeout=10)
        assert r.status_code == 201, r.text
        self.headers = {"Authorization": f"Bearer {r.json()['secret']}"}

    def post(self, path: str, body: dict) -> dict:
        r = requests.post(f"{self.url}/api/v1/worker/{path}", headers=self.headers, json=body,
                          timeout=10)
        assert r.status_code == 200, r.text
        return r.json()

    def claim(self) -> list[dict]:
        return self.post("claim", {"max_jobs": 1, "wait_s": 0})["jobs"]

    def finish(self, job: dict) -> None:
        self.post(f"jobs/{job['id']}/result", {"attempt": job["attempt"], "state": "succeeded",
                                               "exit_code": 0, "wall_seconds": 2.0})


@pytest.mark.live
def test_form_refusal_and_the_waiting_line_live(page, console_errors, live_server):
    from playwright.sync_api import expect

    created = live_server.admin("user", "add", "alice")
    log_in(page, live_server.url, "alice", re.search(r"one-time password: (\S+)", created).group(1))
    worker = HttpWorker(live_server)

    # An impossible job: the form says why, as it shows other validation errors.
    page.get_by_label("… or paste code").fill("print('too big')\n")
    page.get_by_label(re.compile("^CPUs")).fill("4")
    page.get_by_role("button", name="Submit job").click()
    expect(page.locator("#error")).to_contain_text(
        "no worker can run this job: asks 4 CPUs; the only worker has 2, "
        "the scaler reported no VM shape")

    def submit(name: str) -> str:
        page.goto(live_server.url + "/")
        page.get_by_label("Job name").fill(name)
        page.get_by_label("… or paste code").fill("print('hi')\n")
        page.get_by_role("button", name="Submit job").click()
        expect(page).to_have_url(re.compile(r"/jobs/j[0-9a-f]+$"))
        return page.url.rsplit("/", 1)[1]

    first = submit("first")
    expect(page.locator("#waiting-detail")).to_contain_text("Starting on worker w1")
    submit("second")
    # The one slot is taken by the first job: this one waits for it, with an estimate.
    expect(page.locator("#waiting")).to_have_attribute("data-reason", "free_slot")
    expect(page.locator("#waiting-detail")).to_contain_text(
        "Waiting for a free slot: position 1 in the queue, 1 among your queued jobs")
    expect(page.locator("#waiting-estimate")).to_be_visible()
    expect(page.locator("#waiting-estimate")).to_contain_text("Estimated start between")
    expect(page.locator("#waiting-basis")).to_contain_text("An estimate")

    # The first job runs and ends: the slot is free, and this job's page says so
    # without a reload (nothing of this job changed: its stream reads it again).
    [claimed] = worker.claim()
    assert claimed["id"] == first
    worker.finish(claimed)
    expect(page.locator("#waiting-detail")).to_contain_text(
        "a slot is free: it should start within moments", timeout=20_000)
    # The worker's next claim takes it: running, and nothing waits any more.
    [claimed] = worker.claim()
    expect(page.locator("#state")).to_have_text("running")
    expect(page.locator("#waiting-detail")).to_have_text("")
    expect(page.locator("#waiting-estimate")).to_be_hidden()
    # The refused form's answer is a 400, as it should be: the browser logs that one.
    assert [e for e in console_errors if "status of 400" not in e or not e.endswith("/jobs)")] == []


@pytest.mark.live
def test_cli_status_says_why_and_submit_prints_the_refusal(live_server, tmp_path):
    cli = Cli(tmp_path / "cfg" / "config.json", tmp_path)
    cli.login(live_server.url, new_user(live_server, "dora"))
    script = tmp_path / "job.py"
    script.write_text("print('hi')\n")

    # A fresh cluster: accepted, and the job says so.
    r = cli("submit", str(script), "--cpus", "4")
    assert r.returncode == 0, r.stderr
    fresh = re.search(r"submitted job (j[0-9a-f]+)", r.stdout).group(1)
    r = cli("status", fresh)
    assert r.returncode == 0, r.stderr
    assert "waiting:   no_workers: The cluster has no live workers" in r.stdout
    assert "capacity:  Accepted without a capacity check" in r.stdout

    worker = HttpWorker(live_server)
    r = cli("submit", str(script), "--cpus", "4")
    assert r.returncode == 1
    assert ("no worker can run this job: asks 4 CPUs; the only worker has 2, "
            "the scaler reported no VM shape") in r.stderr

    ids = [re.search(r"submitted job (j[0-9a-f]+)", cli("submit", str(script)).stdout).group(1)
           for _ in range(2)]
    wait_until(lambda: "starting" in cli("status", ids[0]).stdout, what="the first job reserved")
    r = cli("status", ids[1])
    assert "waiting:   free_slot: Waiting for a free slot: position 1 in the queue" in r.stdout
    assert re.search(r"estimate:  start between \S+ and \S+ \(an estimate\)", r.stdout), r.stdout
    assert worker.claim()
