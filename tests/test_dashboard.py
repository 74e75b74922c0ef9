"""The admin dashboard: admins only; it shows workers with their slots and last
heartbeat, the scaler's VMs, queued and running jobs per user, jobs per hour.

Jobs and workers go through the real APIs (test_dispatch's Hub); the admin
page is fetched logged in through the real login form. SQLite and PostgreSQL.
"""
from __future__ import annotations

import html
import re

import pytest

from tests.conftest import login
from tests.test_dispatch import make_hub  # noqa: F401  (fixture)


@pytest.fixture
def hub(make_hub):  # noqa: F811
    return make_hub()


def table(page: str, table_id: str) -> list[list[str]]:
    """The text of each cell of the rows of <table id=table_id>."""
    body = re.search(rf'<table id="{table_id}">(.*?)</table>', page, re.S).group(1)
    rows = []
    for row in re.findall(r"<tr>(.*?)</tr>", body, re.S):
        cells = re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)
        if cells:
            rows.append([html.unescape(re.sub(r"<[^>]+>", " ", c)).split() for c in cells])
    return [[" ".join(words) for words in r] for r in rows]


def test_the_dashboard_is_for_admins_only(hub):
    assert hub.client.get("/admin").status_code == 302  # to the login page
    assert hub.client.get("/api/v1/admin/dashboard").status_code == 401
    assert hub.client.get("/api/v1/admin/dashboard",
                          headers=hub.alice["headers"]).status_code == 403
    login(hub.client, "alice", hub.alice["password"])
    page = hub.client.get("/admin")
    assert page.status_code == 403 and "for admins" in page.get_data(as_text=True)
    assert 'href="/admin"' not in hub.client.get("/").get_data(as_text=True)


def test_the_dashboard_shows_workers_vms_queue_by_user_and_jobs_per_hour(hub):
    worker = hub.register("dash-worker", slots=1)
    alice_jobs = [hub.submit() for _ in range(3)]
    bob_jobs = [hub.submit(hub.bob) for _ in range(2)]
    [running] = worker.claim()
    other = hub.register("done-worker", slots=1)
    [finished] = other.claim()
    assert other.result(finished["id"], finished["attempt"]).status_code == 200
    report = {"vms": [{"name": "jc-vm-1", "host_uri": "qemu:///system", "state": "ready",
                       "worker_name": "dash-worker"}],
              "events": [{"action": "scale_up", "reason": "3 jobs queued", "vm_name": "jc-vm-1"}]}
    r = hub.client.put("/api/v1/admin/scaler/report", headers=hub.admin["headers"], json=report)
    assert r.status_code == 200, r.get_json()

    states = {}
    for user, jobs in (("alice", alice_jobs), ("bob", bob_jobs)):
        owner = hub.alice if user == "alice" else hub.bob
        for job_id in jobs:
            state = hub.job(job_id, owner)["state"]
            states.setdefault(user, {"queued": 0, "running": 0, "succeeded": 0})[state] += 1

    login(hub.client, "root", hub.admin["password"])
    page = hub.client.get("/admin")
    assert page.status_code == 200
    text = page.get_data(as_text=True)

    workers = {row[0].split()[0]: row for row in table(text, "workers")}
    assert workers["dash-worker"][1] == "active" and workers["dash-worker"][2] == "1 / 1"
    assert workers["done-worker"][2] == "0 / 1"
    assert workers["dash-worker"][6].startswith(hub.job(running["id"])["started_at"][:10])

    queue = {row[0]: (int(row[1]), int(row[2])) for row in table(text, "queue")}
    assert queue == {user: (s["queued"], s["running"]) for user, s in states.items()
                     if s["queued"] or s["running"]}
    assert sum(q for q, _ in queue.values()) == 3 and sum(r for _, r in queue.values()) == 1

    [vm] = table(text, "vms")
    assert vm[0] == "jc-vm-1" and vm[1] == "ready" and vm[2].startswith("dash-worker")
    assert table(text, "scaler-events")[0][1:3] == ["scale_up", "jc-vm-1"]
    assert text.count("<svg") == 2

    data = hub.client.get("/api/v1/admin/dashboard", headers=hub.admin["headers"]).get_json()
    assert len(data["jobs_per_hour"]) == 24
    # The last two hours: the test may run across the turn of an hour.
    assert sum(h["submitted"] for h in data["jobs_per_hour"][-2:]) == 5
    assert sum(h["finished"] for h in data["jobs_per_hour"][-2:]) == 1
    assert {q["user"]: q["queued"] for q in data["queue"]} == \
        {u: s["queued"] for u, s in states.items() if s["queued"] or s["running"]}
    assert [w["running"] for w in data["workers"] if w["name"] == "dash-worker"] == [1]
