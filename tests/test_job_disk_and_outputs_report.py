"""The proxy's side of per-job disk quotas and of the outputs report (issue
12): `disk_mb` validated at submission (400 naming the limit past it) and
handed to the worker in the claim; the worker's report of what it left out of
the archive, and whether the job filled its disk, validated, stored, and shown
in the job's JSON and page.

Through the real app and worker API (test_dispatch's Hub), on SQLite and
PostgreSQL.
"""
from __future__ import annotations

import io
import json
import zipfile

import pytest

from tests.conftest import login
from tests.test_dispatch import make_hub  # noqa: F401  (fixture)
from tests.test_limits import set_limits, submit


@pytest.fixture
def hub(make_hub):  # noqa: F811
    return make_hub()


def test_disk_mb_has_a_default_and_goes_to_the_worker_in_the_claim(hub):
    worker = hub.register("w1")
    defaulted, chosen = hub.submit(), hub.submit(disk_mb=300)
    assert hub.job(defaulted)["resources"]["disk_mb"] == hub.config.default_disk_mb
    claimed = {j["id"]: j["disk_mb"] for j in worker.claim(max_jobs=2)}
    assert claimed == {defaulted: hub.config.default_disk_mb, chosen: 300}


def test_disk_mb_past_the_proxy_or_user_maximum_is_refused_naming_it(hub):
    r = submit(hub, disk_mb=hub.config.max_disk_mb + 1)
    assert (r.status_code, r.get_json()["error"]) == (400, "invalid_resource")
    assert f"disk_mb must be between 1 and {hub.config.max_disk_mb}" in r.get_json()["detail"]
    assert set_limits(hub, "alice", max_disk_mb=100).status_code == 200
    r = submit(hub, disk_mb=101)
    assert (r.status_code, r.get_json()["error"]) == (400, "limit_exceeded")
    assert "max_disk_mb = 100" in r.get_json()["detail"]
    assert submit(hub, disk_mb=100).status_code == 201


REPORT = {"files": 5, "bytes": 1234, "left_out": 7, "left_out_bytes": 70000,
          "reasons": {"file_cap": 3, "size_cap": 1, "symlink": 1, "special_file": 1, "bad_name": 1}}


def post_result(worker, job_id: str, attempt: int, **result):
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr(".jobcloud/left-out.json", "{}")
    return worker.hub.client.post(
        f"/api/v1/worker/jobs/{job_id}/result", headers=worker.headers,
        content_type="multipart/form-data",
        data={"result": json.dumps({"attempt": attempt, "state": "succeeded", "exit_code": 0,
                                    **result}),
              "outputs": (io.BytesIO(archive.getvalue()), "outputs.zip", "application/zip")})


def test_the_outputs_report_and_a_full_disk_reach_the_job_json_and_page(hub):
    worker = hub.register("w1")
    job_id = hub.submit(disk_mb=16)
    [job] = worker.claim()
    r = post_result(worker, job_id, job["attempt"], outputs=REPORT, disk_full=True)
    assert r.status_code == 200, r.get_json()
    body = hub.job(job_id)
    assert body["disk_full"] is True
    outputs = body["outputs"]
    assert (outputs["files"], outputs["left_out"], outputs["left_out_bytes"]) == (5, 7, 70000)
    assert outputs["left_out_reasons"] == REPORT["reasons"]
    assert outputs["manifest"] == ".jobcloud/left-out.json"
    assert body["warnings"] == [
        ("7 output file(s) left out of the archive (1 names no archive can hold, 3 over the file "
         "cap, 1 over the size cap, 1 special files, 1 symlinks); the archive lists them in "
         ".jobcloud/left-out.json."),
        "The job filled its disk quota of 16 MB: writes past it failed (no space left on device)."]
    login(hub.client, hub.alice["name"], hub.alice["password"])
    page = hub.client.get(f"/jobs/{job_id}").get_data(as_text=True)
    assert "7 output file(s) left out of the archive" in page
    assert "filled its disk quota of 16 MB" in page


def test_a_job_that_left_nothing_out_has_no_warning(hub):
    worker = hub.register("w1")
    job_id = hub.submit()
    [job] = worker.claim()
    report = {"files": 2, "bytes": 10, "left_out": 0, "left_out_bytes": 0, "reasons": {}}
    assert post_result(worker, job_id, job["attempt"], outputs=report).status_code == 200
    body = hub.job(job_id)
    assert (body["outputs"]["left_out"], body["warnings"], body["disk_full"]) == (0, [], False)


@pytest.mark.parametrize("extra", [
    {"outputs": {"files": -1}},
    {"outputs": {"reasons": {"too_pretty": 1}}},
    {"outputs": {"reasons": {"size_cap": 2**60}}},
    {"outputs": []},
    {"disk_full": "yes"},
])
def test_malformed_reports_are_refused(hub, extra):
    worker = hub.register("w1")
    job_id = hub.submit()
    [job] = worker.claim()
    r = worker.result(job_id, job["attempt"], **extra)
    assert (r.status_code, r.get_json()["error"]) == (400, "invalid_result"), r.get_json()
