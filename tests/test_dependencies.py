"""Job dependencies (proxy/dependencies.py): `after` on the form, the API and
the CLI; children held back until every parent succeeded; a failed parent
cancelling its dependents transitively; parents' outputs read by the child.

The protocol tests run the real Flask app on SQLite and on a real PostgreSQL
(tests/test_dispatch.py's hub: users and workers over the test client). The
pipeline tests run real gunicorn, a real worker and real Docker containers
(the sandbox tests' module-scoped cluster: skipped without Docker, failed
under CI).
"""
from __future__ import annotations

import io
import itertools
import json
import re
import sqlite3
import time

import pytest

from proxy import dependencies, retention, store
from proxy.errors import ValidationError
from tests.conftest import login, wait_until
from tests.test_client_cli import Cli
from tests.test_dispatch import Hub, hub, make_hub, zip_bytes  # noqa: F401 (fixtures)
from tests.test_worker_sandbox import IMAGE, cluster  # noqa: F401 (a fixture)


def post_result(hub: Hub, worker, job: dict, state: str = "succeeded", outputs: bytes | None = None):
    result = {"attempt": job["attempt"], "state": state,
              "exit_code": 0 if state == "succeeded" else 1}
    data = {"result": json.dumps(result)}
    if outputs is not None:
        data["outputs"] = (io.BytesIO(outputs), "outputs.zip", "application/zip")
    r = hub.client.post(f"/api/v1/worker/jobs/{job['id']}/result", headers=worker.headers,
                        content_type="multipart/form-data", data=data)
    assert r.status_code == 200, r.get_json()


def submit_refused(hub: Hub, user: dict, **fields) -> dict:
    r = hub.client.post("/api/v1/jobs", headers=user["headers"], content_type="multipart/form-data",
                        data={"code": "print(1)", **fields})
    assert r.status_code == 400, r.get_json()
    return r.get_json()


# ------------------------------------------------------- protocol, both databases

def test_a_child_is_claimed_only_after_its_parent_succeeded_and_reads_its_outputs(hub):
    parent = hub.submit(name="prepare data")
    child = hub.submit(name="train", after=parent)
    worker = hub.register("w", slots=4)

    queued = hub.job(child)
    assert queued["state"] == "queued" and queued["waiting"]["reason"] == "dependency"
    assert parent in queued["waiting"]["detail"] and "prepare data" in queued["waiting"]["detail"]
    assert [p["id"] for p in queued["parents"]] == [parent]
    assert queued["parents"][0]["input_dir"] == "/job/input/after/prepare_data/"
    assert [c["id"] for c in hub.job(parent)["children"]] == [child]

    [held] = worker.claim(max_jobs=4)      # a free slot, yet only the parent is handed out
    assert held["id"] == parent and held["after"] == []
    assert hub.row(child)["worker_id"] is None
    # Not a parent's outputs this worker may read: the child is not its job yet.
    assert worker.get(f"/api/v1/worker/jobs/{child}/after/{parent}/outputs").status_code == 404

    archive = zip_bytes(**{"features.csv": "x,y\n1,2\n"})
    post_result(hub, worker, held, outputs=archive)
    [claimed] = worker.claim(max_jobs=4)
    assert claimed["id"] == child
    [entry] = claimed["after"]
    assert (entry["id"], entry["name"]) == (parent, "prepare_data")
    r = worker.get(entry["outputs"]["url"])
    assert r.status_code == 200 and r.data == archive
    # The route serves the parents of the held job, nothing else.
    other = hub.submit()
    assert worker.get(f"/api/v1/worker/jobs/{child}/after/{other}/outputs").status_code == 404
    stranger = hub.register("stranger")
    assert stranger.get(entry["outputs"]["url"]).status_code == 404

    view = hub.job(child)
    assert view["waiting"] is None and view["parents"][0]["state"] == "succeeded"


def test_a_failed_parent_cancels_children_and_grandchildren_with_webhooks(make_hub):
    hub = make_hub(webhook_allowed_hosts="127.0.0.1")
    a = hub.submit(name="a")
    b = hub.submit(name="b", after=a, webhook_url="http://127.0.0.1:9/hook")
    c = hub.submit(name="c", after=b, webhook_url="http://127.0.0.1:9/hook")
    unrelated = hub.submit(name="d")
    worker = hub.register("w", slots=4)
    held = {j["id"]: j for j in worker.claim(max_jobs=4)}
    assert set(held) == {a, unrelated}

    post_result(hub, worker, held[a], state="failed")
    jb, jc = hub.job(b), hub.job(c)
    assert (jb["state"], jb["failure_reason"]) == ("cancelled", f"parent {a} failed")
    assert (jc["state"], jc["failure_reason"]) == ("cancelled",
                                                   f"parent {b} was cancelled: parent {a} failed")
    # Like any other final state: each one's webhook is queued with it.
    assert jb["webhook"]["state"] != "waiting_for_job" and jc["webhook"]["state"] != "waiting_for_job"
    assert hub.job(unrelated)["state"] == "running"


def test_cancelling_a_queued_parent_cancels_its_dependents_at_once(hub):
    a = hub.submit()
    b, b2 = hub.submit(after=a), hub.submit(after=a)
    assert hub.cancel(a).status_code == 200
    for child in (b, b2):
        job = hub.job(child)
        assert (job["state"], job["failure_reason"]) == ("cancelled", f"parent {a} was cancelled")
    # A job that can never start is refused rather than left waiting.
    assert submit_refused(hub, hub.alice, after=a)["error"] == "parent_failed"


def test_every_parent_must_succeed_and_each_gets_its_own_directory(hub):
    first, second = hub.submit(name="same"), hub.submit(name="same")
    child = hub.submit(after=f"{first}, {second}")
    worker = hub.register("w", slots=4)
    held = {j["id"]: j for j in worker.claim(max_jobs=4)}
    assert set(held) == {first, second}
    post_result(hub, worker, held[first], outputs=zip_bytes(**{"one.txt": "1"}))
    assert worker.claim(max_jobs=4) == [] and hub.job(child)["waiting"]["reason"] == "dependency"
    post_result(hub, worker, held[second])
    [claimed] = worker.claim(max_jobs=4)
    # Two parents named alike: each directory is its id; one left no outputs.
    assert {(p["name"], p["outputs"] is None) for p in claimed["after"]} == {(first, False),
                                                                             (second, True)}


def test_after_an_array_means_after_all_of_its_jobs(hub):
    array_id = hub.submit(name="sweep", array="0-2")   # the array's id (arrays.py)
    child = hub.submit(name="summary", after=array_id)
    assert sorted(p["name"] for p in hub.job(child)["parents"]) == ["sweep[0]", "sweep[1]",
                                                                     "sweep[2]"]
    worker = hub.register("w", slots=8)
    held = worker.claim(max_jobs=8)
    assert len(held) == 3 and child not in {j["id"] for j in held}
    for n, job in enumerate(held):
        assert worker.claim(max_jobs=8) == []
        post_result(hub, worker, job, outputs=zip_bytes(**{"part.txt": str(n)}))
    [claimed] = worker.claim(max_jobs=8)
    assert claimed["id"] == child
    assert sorted(p["name"] for p in claimed["after"]) == ["sweep_0", "sweep_1", "sweep_2"]
    # Another user's array reads like an unknown id.
    assert submit_refused(hub, hub.bob, after=array_id)["error"] == "unknown_parent"


def test_parent_jobs_and_dependency_edges_are_bounded_by_settings(make_hub):  # noqa: F811
    """An array in `after` counts each of its jobs (max_parent_jobs), and an
    array after parents makes one edge per job and parent (max_dependency_edges):
    past either, a 400 naming the numbers, and nothing is stored."""
    hub = make_hub(max_parent_jobs=3, max_dependency_edges=6)
    three = hub.submit(array="0-2")
    lone = hub.submit()
    over = submit_refused(hub, hub.alice, after=f"{three},{lone}")
    assert over["error"] == "too_many_parents"
    assert "4 jobs in all" in over["detail"] and "max_parent_jobs = 3" in over["detail"]
    edges = submit_refused(hub, hub.alice, after=three, array="0-2")
    assert edges["error"] == "too_many_dependencies"
    assert "3 jobs each after 3 parent jobs make 9 dependencies" in edges["detail"]
    assert "max_dependency_edges = 6" in edges["detail"]
    count = "SELECT (SELECT COUNT(*) FROM jobs) AS jobs, (SELECT COUNT(*) FROM job_deps) AS deps"
    assert hub.call(lambda conn: conn.query_one(count)) == {"jobs": 4, "deps": 0}
    # At the bounds: two jobs after three parents, six edges.
    hub.submit(after=three, array="0-1")
    assert hub.call(lambda conn: conn.query_one(count)) == {"jobs": 6, "deps": 6}


def test_an_array_after_a_parent_that_fails_meanwhile_is_refused_whole(hub, monkeypatch):
    """A parent that ends badly between the submission's checks and its
    transaction: the submission is refused (400 parent_failed) with nothing
    stored, never an array of cancelled copies made without their webhooks."""
    parent = hub.submit()
    resolve = dependencies.resolve

    def then_the_parent_is_cancelled(conn, *args, **kwargs):
        parents = resolve(conn, *args, **kwargs)
        hub.call(lambda other: store.cancel_job(other, store.get_job(other, parent)))
        return parents

    monkeypatch.setattr(dependencies, "resolve", then_the_parent_is_cancelled)
    blobs = hub.app.extensions["jobcloud"].blobs.blobs
    files = {p for p in blobs.rglob("*") if p.is_file()}
    refused = submit_refused(hub, hub.alice, after=parent, array="0-4")
    assert refused["error"] == "parent_failed" and parent in refused["detail"]
    assert hub.job(parent)["state"] == "cancelled"
    count = "SELECT (SELECT COUNT(*) FROM jobs) AS jobs, (SELECT COUNT(*) FROM job_arrays) AS arrays"
    assert hub.call(lambda conn: conn.query_one(count)) == {"jobs": 1, "arrays": 0}
    assert {p for p in blobs.rglob("*") if p.is_file()} == files


def test_unknown_and_foreign_parents_are_refused_alike(hub):
    mine = hub.submit()
    theirs = hub.submit(user=hub.bob)
    foreign = submit_refused(hub, hub.alice, after=f"{mine},{theirs}")
    unknown = submit_refused(hub, hub.alice, after="j0000000000000000000000000000")
    assert foreign["error"] == unknown["error"] == "unknown_parent"
    assert theirs in foreign["detail"] and "no job or array of yours" in foreign["detail"]
    assert submit_refused(hub, hub.alice, after="x" * 100)["error"] == "unknown_parent"
    too_many = ",".join(f"j{i:030d}" for i in range(dependencies.MAX_PARENTS + 1))
    assert submit_refused(hub, hub.alice, after=too_many)["error"] == "too_many_parents"
    # Nothing was made of the refusals.
    assert hub.job(mine)["children"] == []


def test_a_job_named_as_its_own_parent_is_refused(hub):
    """New jobs cannot form a cycle (their parents exist first); attach checks anyway."""
    job = hub.submit()
    with pytest.raises(ValidationError) as refused:
        hub.call(dependencies.attach, job, [job])
    assert refused.value.code == "dependency_cycle"


def test_retention_keeps_a_parents_outputs_while_a_child_needs_them(make_hub):
    hub = make_hub(retention_days=1)
    worker = hub.register("w", slots=4)
    parent = hub.submit()
    [held] = worker.claim()
    post_result(hub, worker, held, outputs=zip_bytes(**{"model.txt": "weights"}))
    # A child that cannot start yet: its other parent still runs.
    blocker = hub.submit()
    assert [j["id"] for j in worker.claim()] == [blocker]
    child = hub.submit(after=f"{parent},{blocker}")
    later = time.time() + 3 * retention.DAY_S
    hub.call(lambda conn: retention.expire_due(conn, default_days=1, now=later))
    assert hub.job(parent)["outputs_expired"] is False

    assert hub.cancel(child).status_code == 200
    hub.call(lambda conn: retention.expire_due(conn, default_days=1, now=later))
    assert hub.job(parent)["outputs_expired"] is True
    # Outputs gone: a job after it would run without them.
    assert submit_refused(hub, hub.alice, after=parent)["error"] == "parent_expired"


def test_the_form_takes_after_and_the_page_links_parents_and_children(hub):
    parent = hub.submit(name="stage-one")
    csrf = login(hub.client, "alice", hub.alice["password"])
    r = hub.client.post("/jobs", content_type="multipart/form-data", data={
        "csrf_token": csrf, "code": "print(2)", "name": "stage-two", "after": parent})
    assert r.status_code == 302, r.get_data(as_text=True)
    child = r.headers["Location"].rsplit("/", 1)[1]
    r = hub.client.post("/jobs", content_type="multipart/form-data", data={
        "csrf_token": csrf, "code": "print(3)", "after": "j-not-mine"})
    assert r.status_code == 400 and "no job or array of yours" in r.get_data(as_text=True)
    page = hub.client.get(f"/jobs/{child}").get_data(as_text=True)
    assert f'href="/jobs/{parent}"' in page and "stage-one" in page
    assert "/job/input/after/stage-one/" in page and "Waiting for job stage-one" in page
    page = hub.client.get(f"/jobs/{parent}").get_data(as_text=True)
    assert f'href="/jobs/{child}"' in page and "stage-two" in page


def test_dir_names_are_safe_path_components():
    names = dependencies.dir_names([{"id": "j1", "name": "../../etc"}, {"id": "j2", "name": "..."},
                                    {"id": "j3", "name": "CNN w/ dropout"},
                                    {"id": "j4", "name": "j1"}])
    assert names == {"j1": "etc", "j2": "j2", "j3": "CNN_w_dropout", "j4": "j4"}


# ------------------------------------------------ real gunicorn, worker, Docker

STEP_A = '''
import os, time
time.sleep(3)   # long enough for the test to see the next step wait
open(os.path.join(os.environ["JOBCLOUD_OUTPUT"], "count.txt"), "w").write("1")
'''

# Reads the previous step's count, adds one; shows its input is read-only.
NEXT_STEP = '''
import os
src = "/job/input/after/{parent}/count.txt"
n = int(open(src).read()) + 1
try:
    open("/job/input/after/{parent}/x", "w")
except OSError as e:
    print("read-only", type(e).__name__)
print("after:", sorted(os.listdir("/job/input/after")))
open(os.path.join(os.environ["JOBCLOUD_OUTPUT"], "count.txt"), "w").write(str(n))
'''


def test_a_three_step_pipeline_passes_outputs_along(cluster, tmp_path):  # noqa: F811
    a = cluster.submit(STEP_A, name="step-a")
    b = cluster.submit(NEXT_STEP.format(parent="step-a"), name="step-b", after=a)
    # The last step through the CLI: `jobcloud submit --after`.
    cli = Cli(tmp_path / "cfg" / "config.json", tmp_path)
    cli.login(cluster.server.url, cluster.headers["Authorization"].split()[1])
    script = tmp_path / "step_c.py"
    script.write_text(NEXT_STEP.format(parent="step-b"))
    r = cli("submit", str(script), "--image", IMAGE, "--name", "step-c", "--after", b,
            "--timeout", "60", "--memory", "256")
    assert r.returncode == 0, r.stderr
    c = re.search(r"submitted job (\S+)", r.stdout + r.stderr).group(1)

    # While the first step runs, with free slots, the others wait for it: read
    # them, then step a, so both were read while it still ran.
    def while_a_runs():
        later = [cluster.job(b), cluster.job(c)]
        return later if cluster.job(a)["state"] == "running" else None
    for job in wait_until(while_a_runs, what="step a to run"):
        assert job["state"] == "queued" and job["waiting"]["reason"] == "dependency", job
    final = cluster.wait(c, timeout=120)
    assert final["state"] == "succeeded", (final, cluster.logs(c, "stderr"))
    assert cluster.outputs(c).read("count.txt") == b"3"
    out = cluster.logs(c)["data"]
    assert "read-only" in out and "after: ['step-b']" in out
    jobs = [cluster.job(j) for j in (a, b, c)]
    for parent, child in itertools.pairwise(jobs):
        assert child["started_at"] >= parent["finished_at"], (parent, child)
    r = cli("status", c)
    assert r.returncode == 0 and f"{b} (succeeded)" in r.stdout, r.stdout


def test_a_failing_step_cancels_the_rest_of_the_pipeline(cluster):  # noqa: F811
    a = cluster.submit("import sys, time\ntime.sleep(2)\nsys.exit(4)", name="fails")
    b = cluster.submit(NEXT_STEP.format(parent="fails"), after=a)
    c = cluster.submit(NEXT_STEP.format(parent="b"), after=b)
    assert cluster.wait(a)["state"] == "failed"
    jb, jc = cluster.wait(b), cluster.wait(c)
    assert (jb["state"], jb["failure_reason"]) == ("cancelled", f"parent {a} failed")
    assert (jc["state"], jc["failure_reason"]) == ("cancelled",
                                                   f"parent {b} was cancelled: parent {a} failed")
    assert jb["started_at"] is None and jc["started_at"] is None


def test_a_child_whose_parent_outputs_are_gone_fails_with_the_reason(cluster):  # noqa: F811
    """Retention keeps what a waiting child needs (test above); should a
    parent's outputs be marked expired all the same (by hand, in the store),
    the child fails saying so instead of running without them."""
    a = cluster.submit("import os\nopen(os.path.join(os.environ['JOBCLOUD_OUTPUT'], 'f'), 'w')"
                       ".write('x')", name="short-lived")
    assert cluster.wait(a)["state"] == "succeeded"
    blocker = cluster.submit("import time\ntime.sleep(5)", name="blocker")
    b = cluster.submit("print('ran without its inputs')", after=f"{a},{blocker}")
    with sqlite3.connect(cluster.server.data_dir / "jobcloud.db") as db:
        db.execute("UPDATE jobs SET expired_at = ? WHERE id = ?", (time.time(), a))
    jb = cluster.wait(b)
    assert cluster.job(blocker)["state"] == "succeeded"
    assert jb["state"] == "failed" and "parent_expired" in jb["failure_reason"], jb
    assert a in jb["failure_reason"] and "ran without" not in cluster.logs(b)["data"]
