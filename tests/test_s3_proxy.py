"""The proxy on the S3 blob store (blob_url = s3://...), against a real
S3-compatible server (SeaweedFS on loopback): submissions go to the store,
workers get presigned URLs and upload outputs by presigned PUT, users'
downloads are redirected (or streamed), and a store that is down refuses a
submission whole. The worker's side is tests/test_worker_s3.py; two proxies
sharing the store are tests/test_s3_cluster.py.
"""
from __future__ import annotations

import hashlib
import io
import time
import zipfile

import pytest
import requests

from proxy import retention
from tests.conftest import free_port
from tests.test_dispatch import Hub, hub, make_hub, zip_bytes  # noqa: F401 (fixtures)


@pytest.fixture
def s3_hub(make_hub, s3_settings):
    return make_hub(**s3_settings)


def keys(hub: Hub) -> list[str]:
    st = hub.app.extensions["jobcloud"]
    pages = st.blobs.client.get_paginator("list_objects_v2").paginate(
        Bucket=st.blobs.bucket, Prefix=st.blobs.prefix + "/")
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def tmp_files(hub: Hub) -> list:
    return list(hub.app.extensions["jobcloud"].blobs.tmp.iterdir())


def submit_with_dataset(hub: Hub, dataset: bytes) -> str:
    r = hub.client.post("/api/v1/jobs", headers=hub.alice["headers"], data={
        "code": "print(1)\n", "dataset": (io.BytesIO(dataset), "data.zip")},
        content_type="multipart/form-data")
    assert r.status_code == 201, r.get_json()
    return r.get_json()["id"]


def put_outputs(worker, job: dict, archive: bytes, sha256: str | None = None) -> requests.Response:
    """Ask for the presigned PUT and send `archive` to it, as a worker does."""
    sha = sha256 or hashlib.sha256(archive).hexdigest()
    r = worker.post(f"jobs/{job['id']}/outputs-upload",
                    {"attempt": job["attempt"], "sha256": sha, "size": len(archive)})
    assert r.status_code == 200, r.get_json()
    put = r.get_json()
    assert put["method"] == "PUT"
    return requests.put(put["url"], data=archive, headers=put["headers"], timeout=30)


def test_a_job_runs_through_the_store_with_the_proxy_out_of_the_data_path(s3_hub):
    hub = s3_hub
    dataset = zip_bytes(**{"train.csv": "a,b\n1,2\n" * 1000})
    job_id = submit_with_dataset(hub, dataset)
    row = hub.row(job_id)
    # Stored in the bucket under random names, the sha256 kept beside them.
    assert len(keys(hub)) == 2 and tmp_files(hub) == []
    assert row["dataset_sha256"] == hashlib.sha256(dataset).hexdigest()
    assert row["dataset_blob"] != row["dataset_sha256"]

    worker = hub.register("w1")
    [job] = worker.claim()
    assert job["outputs_upload"] == "direct"
    for kind, expected in (("script", b"print(1)\n"), ("dataset", dataset)):
        entry = job[kind]
        # Straight from the store, no keys, no proxy.
        got = requests.get(entry["direct_url"], timeout=30)
        assert got.status_code == 200 and got.content == expected
        assert hashlib.sha256(got.content).hexdigest() == entry["sha256"]
        # The proxy's route (the fallback) sends the worker to the store too.
        via = worker.get(entry["url"])
        assert via.status_code == 307 and via.headers["Location"].startswith(
            hub.config.s3_endpoint_url)
        assert requests.get(via.headers["Location"], timeout=30).content == expected

    archive = zip_bytes(**{"model.txt": "weights"})
    assert put_outputs(worker, job, archive).status_code == 200
    sha = hashlib.sha256(archive).hexdigest()
    r = worker.result(job["id"], job["attempt"],
                      outputs_upload={"sha256": sha, "size": len(archive)})
    assert r.status_code == 200 and r.get_json()["applied"], r.get_json()
    final = hub.job(job_id)
    assert final["state"] == "succeeded" and final["outputs"]["sha256"] == sha

    # The owner's download: a redirect to a presigned URL naming the file.
    r = hub.client.get(f"/api/v1/jobs/{job_id}/outputs", headers=hub.alice["headers"])
    assert r.status_code == 307
    got = requests.get(r.headers["Location"], timeout=30)
    assert got.content == archive
    assert got.headers["Content-Disposition"].startswith("attachment; filename=")
    # Anyone else: not found, and no URL.
    r = hub.client.get(f"/api/v1/jobs/{job_id}/outputs", headers=hub.bob["headers"])
    assert r.status_code == 404 and "Location" not in r.headers


def test_users_downloads_can_be_streamed_through_the_proxy(make_hub, s3_settings):
    hub = make_hub(blob_user_downloads="stream", **s3_settings)
    hub.submit()
    worker = hub.register("w1")
    [job] = worker.claim()
    archive = zip_bytes(**{"a.txt": "x" * 5000})
    put_outputs(worker, job, archive)
    r = worker.result(job["id"], job["attempt"], outputs_upload={
        "sha256": hashlib.sha256(archive).hexdigest(), "size": len(archive)})
    assert r.status_code == 200
    r = hub.client.get(f"/api/v1/jobs/{job['id']}/outputs", headers=hub.alice["headers"])
    assert r.status_code == 200 and r.data == archive
    assert r.headers["X-Content-Type-Options"] == "nosniff"
    assert r.headers["Content-Disposition"].startswith("attachment;")


def test_a_result_whose_upload_is_not_the_announced_archive_is_refused(s3_hub):
    hub = s3_hub
    hub.submit()
    worker = hub.register("w1")
    [job] = worker.claim()
    archive = zip_bytes(**{"a.txt": "real"})
    sha = hashlib.sha256(archive).hexdigest()
    # Nothing uploaded yet.
    r = worker.result(job["id"], job["attempt"], outputs_upload={"sha256": sha,
                                                                 "size": len(archive)})
    assert r.status_code == 400 and r.get_json()["error"] == "outputs_missing"
    # Other bytes than announced: the store refuses the PUT itself.
    forged = zip_bytes(**{"a.txt": "forged"})
    assert put_outputs(worker, job, forged, sha256=sha).status_code == 400
    r = worker.result(job["id"], job["attempt"], outputs_upload={"sha256": sha,
                                                                 "size": len(archive)})
    assert r.status_code == 400 and r.get_json()["error"] == "outputs_missing"
    # A result naming a hash it did not upload: refused, the job still held.
    put_outputs(worker, job, archive)
    other = hashlib.sha256(b"something else").hexdigest()
    r = worker.result(job["id"], job["attempt"], outputs_upload={"sha256": other,
                                                                 "size": len(archive)})
    assert r.status_code == 400 and r.get_json()["error"] == "outputs_missing"
    r = worker.result(job["id"], job["attempt"], outputs_upload={"sha256": sha, "size": 3})
    assert r.status_code == 400 and r.get_json()["error"] == "outputs_mismatch"
    assert hub.job(job["id"])["state"] == "running"
    # Not a zip archive, announced truthfully: refused as such.
    junk = b"not a zip at all" * 100
    put_outputs(worker, job, junk)
    r = worker.result(job["id"], job["attempt"], outputs_upload={
        "sha256": hashlib.sha256(junk).hexdigest(), "size": len(junk)})
    assert r.status_code == 400 and r.get_json()["error"] == "invalid_outputs"
    r = worker.result(job["id"], job["attempt"], outputs_upload={"sha256": sha,
                                                                 "size": len(archive)})
    assert r.status_code == 200 and hub.job(job["id"])["state"] == "succeeded"


def test_outputs_upload_is_only_for_the_lease_holder_and_within_the_limit(make_hub, s3_settings):
    hub = make_hub(max_output_bytes=1000, **s3_settings)
    hub.submit()
    holder, other = hub.register("w1"), hub.register("w2")
    [job] = holder.claim()
    body = {"attempt": job["attempt"], "sha256": "ab" * 32, "size": 10}
    r = other.post(f"jobs/{job['id']}/outputs-upload", body)
    assert r.status_code == 409, r.get_json()
    r = holder.post(f"jobs/{job['id']}/outputs-upload", dict(body, size=1001))
    assert r.status_code == 413 and r.get_json()["error"] == "too_large"
    for bad in ({"sha256": "AB" * 32}, {"sha256": "ab"}, {"size": 0}, {"size": "10"}):
        r = holder.post(f"jobs/{job['id']}/outputs-upload", dict(body, **bad))
        assert r.status_code == 400 and r.get_json()["error"] == "invalid_outputs", bad
    # A name is derived from the job, the try and the hash: another job's is another name.
    r = holder.post(f"jobs/{job['id']}/outputs-upload", body)
    assert r.status_code == 200 and job["id"] not in r.get_json()["url"]


def test_the_local_store_refuses_direct_uploads_and_gives_no_presigned_urls(hub):
    hub.submit()
    worker = hub.register("w1")
    [job] = worker.claim()
    assert job["outputs_upload"] == "proxy" and "direct_url" not in job["script"]
    r = worker.post(f"jobs/{job['id']}/outputs-upload",
                    {"attempt": job["attempt"], "sha256": "ab" * 32, "size": 10})
    assert r.status_code == 400 and r.get_json()["error"] == "direct_upload_unavailable"
    r = worker.result(job["id"], job["attempt"], outputs_upload={"sha256": "ab" * 32,
                                                                 "size": 10})
    assert r.status_code == 400 and r.get_json()["error"] == "direct_upload_unavailable"


def test_a_store_that_is_down_refuses_the_submission_whole(make_hub, s3_settings):
    hub = make_hub(**dict(s3_settings, s3_endpoint_url=f"http://127.0.0.1:{free_port()}"))
    for dataset in (None, zip_bytes(**{"big.bin": "x"}) + b"", _big_zip()):
        data = {"code": "print(1)\n"}
        if dataset is not None:
            data["dataset"] = (io.BytesIO(dataset), "data.zip")
        r = hub.client.post("/api/v1/jobs", headers=hub.alice["headers"], data=data,
                            content_type="multipart/form-data")
        assert r.status_code == 503, r.get_json()
        assert r.get_json()["error"] == "blob_store_unavailable"
        assert "cannot be reached" in r.get_json()["detail"]
    r = hub.client.get("/api/v1/jobs", headers=hub.alice["headers"])
    assert r.get_json()["jobs"] == [] and tmp_files(hub) == []


def test_the_retention_sweep_deletes_expired_objects_from_the_store(make_hub, s3_settings):
    hub = make_hub(retention_days=1, **s3_settings)
    job_id = submit_with_dataset(hub, zip_bytes(**{"d.txt": "data"}))
    worker = hub.register("w1")
    [job] = worker.claim()
    archive = zip_bytes(**{"o.txt": "out"})
    put_outputs(worker, job, archive)
    worker.result(job["id"], job["attempt"], outputs_upload={
        "sha256": hashlib.sha256(archive).hexdigest(), "size": len(archive)})
    assert len(keys(hub)) == 3
    blobs = hub.app.extensions["jobcloud"].blobs
    done = hub.call(retention.sweep, blobs, default_days=1, now=time.time() + 3 * 86400)
    assert job_id in done.expired_jobs and len(done.deleted) == 3
    assert keys(hub) == []
    r = hub.client.get(f"/api/v1/jobs/{job_id}/outputs", headers=hub.alice["headers"])
    assert r.status_code == 410


def test_an_arrays_outputs_are_fetched_from_the_store_as_one_archive(s3_hub):
    hub = s3_hub
    r = hub.client.post("/api/v1/jobs", headers=hub.alice["headers"],
                        data={"code": "print(1)\n", "array": "0-1"},
                        content_type="multipart/form-data")
    assert r.status_code == 201, r.get_json()
    array_id = r.get_json()["id"]
    worker = hub.register("w1")
    for job in worker.claim(max_jobs=2):
        archive = zip_bytes(**{"i.txt": job["id"]})
        put_outputs(worker, job, archive)
        worker.result(job["id"], job["attempt"], outputs_upload={
            "sha256": hashlib.sha256(archive).hexdigest(), "size": len(archive)})
    r = hub.client.get(f"/api/v1/arrays/{array_id}/outputs", headers=hub.alice["headers"])
    assert r.status_code == 200
    with zipfile.ZipFile(io.BytesIO(r.data)) as zf:
        names = sorted(zf.namelist())
    assert names[:2] == ["0/i.txt", "1/i.txt"]
    assert tmp_files(hub) == []


def _big_zip() -> bytes:
    """A dataset past one multipart part, so its upload begins while it arrives."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("noise.bin", bytes(range(256)) * (40 * 1024 * 10))
    return buf.getvalue()


def test_objects_no_job_names_are_deleted_once_they_are_old(s3_hub):
    hub = s3_hub
    job_id = hub.submit()
    st = hub.app.extensions["jobcloud"]
    blobs = st.blobs
    # A worker PUT its outputs and never posted the result (it crashed).
    orphan = "0f" * 32
    blobs.client.put_object(Bucket=blobs.bucket, Key=blobs.key(orphan), Body=b"PK")
    assert len(keys(hub)) == 2
    # Fresh: left alone (it may be a result on its way).
    done = hub.call(retention.sweep, blobs, default_days=30)
    assert done.orphans == 0 and len(keys(hub)) == 2
    # Old enough: deleted; the job's script is not.
    later = time.time() + retention.ORPHAN_AGE_S + 60
    done = hub.call(retention.sweep, blobs, default_days=30, now=later)
    assert done.orphans == 1 and set(done.deleted) == {orphan}
    assert keys(hub) == [blobs.key(hub.row(job_id)["script_blob"])]
