"""The worker moving blob bytes straight to and from the S3 store (issue 17,
item 2): a real SeaweedFS (tests/s3server.py), the real proxy with the S3
blob store, the real WorkerClient and, end to end, the real worker daemon and
Docker.

- End to end: a job with a dataset and outputs, and a job that runs after it
  and reads its outputs, succeed; the proxy's own access log shows the worker
  claiming and posting JSON results, but never fetching an input from the
  proxy nor posting a multipart result: the bytes went to the store, whose
  bucket holds them.
- A presigned GET that has expired: the store refuses it, the worker asks the
  proxy's route, which redirects (307) to a fresh URL, and the download
  succeeds, checked against the claim's sha256. Bytes from the store that are
  not the claim's are an input error; a store that cannot be reached is
  transient (the job is handed back), its URL's signature in no message.
- A direct upload whose bytes do not match the sha256 announced: the store
  refuses the PUT (BadDigest), the client raises OutputsRefused and posts no
  result naming those outputs; the runner, told the outputs cannot be
  delivered, posts the job as failed without outputs, with the reason
  (decided here: a final answer, not a job left running until its lease runs
  out, and never a result naming outputs the store does not hold).
"""
from __future__ import annotations

import hashlib
import re
import socket
import threading

import pytest
import requests

from tests.conftest import require, stop_gunicorn, wait_until
from tests.test_dispatch import zip_bytes
from tests.test_worker_protocol import Proxy, make_proxy  # noqa: F401 (a fixture)
from tests.test_worker_sandbox import IMAGE, docker_ready, start_cluster, stop_worker
from worker.client import Archive, OutputsRefused, ProxyUnreachable, StoreUnreachable, WorkerClient
from worker.config import load_config
from worker.errors import InputError
from worker.inputs import fetch_input
from worker.runner import JobRunner

# The access log's line for each request: method, path, status, request Content-Type.
ACCESS_FORMAT = '%(m)s %(U)s %(s)s "%({content-type}i)s"'

PARENT = '''\
import os, pathlib
numbers = (pathlib.Path(os.environ["JOBCLOUD_DATA"]) / "numbers.txt").read_text().split()
out = pathlib.Path(os.environ["JOBCLOUD_OUTPUT"])
(out / "sum.txt").write_text(str(sum(map(int, numbers))))
print("summed", len(numbers))
'''
CHILD = '''\
import os, pathlib
total = (pathlib.Path(os.environ["JOBCLOUD_INPUT"]) / "after" / "adder" / "sum.txt").read_text()
(pathlib.Path(os.environ["JOBCLOUD_OUTPUT"]) / "double.txt").write_text(str(2 * int(total)))
'''


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def stored_keys(s3_server, s3_settings: dict) -> list[str]:
    """The keys of the objects under the settings' blob_url (s3://BUCKET/PREFIX)."""
    bucket, prefix = s3_settings["blob_url"].removeprefix("s3://").split("/", 1)
    return s3_server.keys(prefix + "/", bucket)


class Seen(requests.Session):
    """A requests session that keeps (method, url, status, Location) of each answer."""

    def __init__(self):
        super().__init__()
        self.answers: list[tuple[str, str, int, str | None]] = []
        self.hooks["response"].append(self._keep)

    def _keep(self, response, *args, **kwargs) -> None:
        self.answers.append((response.request.method, response.url, response.status_code,
                             response.headers.get("Location")))

    def to(self, path: str) -> list[tuple]:
        return [a for a in self.answers if a[1].split("?", 1)[0].endswith(path)]


def registered(proxy: Proxy, name: str) -> tuple[WorkerClient, Seen, Seen]:
    """A worker client of `proxy`, with what it asked the proxy and the store."""
    to_proxy, to_store = Seen(), Seen()
    client = WorkerClient(proxy.url, session=to_proxy, store_session=to_store, timeout=10)
    client.register(proxy.enrollment(), name, cpus=2, memory_mb=2048, gpus=0, slots=1,
                    images=[IMAGE])
    return client, to_proxy, to_store


# --------------------------------------------------------------- end to end

def test_a_job_and_its_child_move_their_bytes_through_the_store_only(s3_server, s3_settings,
                                                                     tmp_path):
    ok, reason = docker_ready()
    require(ok, reason)
    access_log = tmp_path / "access.log"
    c = start_cluster(tmp_path / "cluster", slots=1, gunicorn_workers=2, proxy_env={
        "JOBCLOUD_BLOB_URL": s3_settings["blob_url"],
        "JOBCLOUD_S3_ENDPOINT_URL": s3_settings["s3_endpoint_url"],
        "JOBCLOUD_S3_CREDENTIALS_FILE": s3_settings["s3_credentials_file"],
        # The worker's routes too: they are what must not carry blob bytes.
        "JOBCLOUD_ACCESS_LOG_WORKER_PROTOCOL": "true"},
        access_log={"access_log": str(access_log), "access_log_format": ACCESS_FORMAT})

    def worker_lines() -> list[str]:
        return [ln for ln in access_log.read_text().splitlines() if " /api/v1/worker/" in ln]

    try:
        dataset = zip_bytes(**{"numbers.txt": " ".join(map(str, range(1, 101)))})
        parent = c.submit(PARENT, dataset=dataset, name="adder")
        child = c.submit(CHILD, after=parent)
        for job_id in (parent, child):
            job = c.wait(job_id, timeout=90)
            assert job["state"] == "succeeded", (job, c.logs(job_id, "stderr"), c.log_tail())
        # Users' downloads: redirected to the store as well.
        outputs = {job_id: c.outputs(job_id) for job_id in (parent, child)}
        assert outputs[parent].read("sum.txt") == b"5050"
        assert outputs[child].read("double.txt") == b"10100"
        # gunicorn logs a request once it is answered: the last result's line may lag the job.
        def results_logged() -> list[str] | None:
            found = [ln for ln in worker_lines() if "/result " in ln]
            return found if len(found) >= 2 else None
        results = wait_until(results_logged, timeout=10, what="both results in the access log")
    finally:
        stop_worker(c.worker)
        stop_gunicorn(c.server.proc)

    lines = worker_lines()
    # The log is on, with the worker's traffic: claims, upload URLs, results.
    assert any("/api/v1/worker/claim 200" in ln for ln in lines), lines
    assert len([ln for ln in lines if ln.startswith("POST") and "/outputs-upload 200" in ln]) == 2, lines
    # Both results as JSON naming what was PUT to the store; none multipart with the bytes.
    assert len(results) == 2 and all(ln.endswith(' 200 "application/json"') for ln in results), results
    assert not [ln for ln in lines if "multipart" in ln], lines
    # No input came through the proxy: script, dataset, the parent's outputs.
    fetched = [ln for ln in lines
               if re.search(r"/jobs/[^/ ]+/(script|dataset|requirements|after/[^ ]+/outputs) ", ln)]
    assert fetched == [], fetched
    # The worker's log names no presigned URL's signature.
    assert "X-Amz-Signature" not in c.worker_log.read_text()

    # The bucket holds both scripts, the dataset and both output archives.
    stored = stored_hashes(s3_server, s3_settings)
    expected = {sha256(PARENT.encode()), sha256(CHILD.encode()), sha256(dataset)}
    expected |= {sha256(archive.fp.getvalue()) for archive in outputs.values()}
    assert expected <= stored, (expected, stored)


def stored_hashes(s3_server, s3_settings: dict) -> set[str]:
    """The sha256 of every object under the settings' blob_url."""
    s3 = s3_server.client()
    bucket = s3_settings["blob_url"].removeprefix("s3://").split("/", 1)[0]
    return {sha256(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
            for key in stored_keys(s3_server, s3_settings)}


# ------------------------------------------------------ an expired presigned URL

def test_an_expired_input_url_is_replaced_by_the_proxys_redirect(make_proxy, s3_settings,
                                                                 tmp_path):
    # Presigned URLs live 2 s here (S3 dates them to the second: at least 1 s of use).
    proxy = make_proxy(**s3_settings, blob_presign_ttl_s=2)
    client, to_proxy, to_store = registered(proxy, "expired-url")
    code = "print('fetched after its URL expired')\n"
    job_id = proxy.submit(code)
    [held] = client.claim(max_jobs=1).jobs
    direct_url = held["script"]["direct_url"]
    wait_until(lambda: requests.get(direct_url, timeout=10).status_code == 403, timeout=30,
               interval=0.2, what="the store to refuse the claim's expired URL")

    fetch_input(client.download, held["script"], tmp_path / "main.py", "script")

    assert (tmp_path / "main.py").read_text() == code
    # The store refused the claim's URL; the proxy's route answered a fresh one, which worked.
    [(_, _, refused, _)] = [a for a in to_store.answers if a[1] == direct_url]
    assert refused == 403
    [(method, _, status, fresh)] = to_proxy.to(f"/api/v1/worker/jobs/{job_id}/script")
    assert (method, status) == ("GET", 307) and fresh and fresh != direct_url
    assert [a[2] for a in to_store.answers if a[1] == fresh] == [200]


def test_bytes_from_the_store_that_are_not_the_claims_are_an_input_error(make_proxy, s3_settings,
                                                                        tmp_path):
    proxy = make_proxy(**s3_settings)
    client, _, to_store = registered(proxy, "wrong-bytes")
    proxy.call("POST", "/api/v1/jobs", files={
        "code": (None, "print(1)"), "image": (None, IMAGE),
        "dataset": ("data.zip", zip_bytes(**{"a.txt": "a"}), "application/zip")})
    [held] = client.claim(max_jobs=1).jobs
    # A store answering with other bytes: the dataset's, for the script.
    swapped = dict(held["script"], direct_url=held["dataset"]["direct_url"])
    with pytest.raises(InputError, match="script sha256 mismatch"):
        fetch_input(client.download, swapped, tmp_path / "main.py", "script")
    assert [a[2] for a in to_store.answers] == [200]


def test_a_store_that_cannot_be_reached_is_transient_and_its_url_stays_out_of_the_error(tmp_path):
    """Not a reason to ask the proxy (its redirect names the same store): the
    job is handed back, like one whose proxy cannot be reached."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]   # closed when the block ends: nothing listens there
    to_proxy = Seen()
    client = WorkerClient(f"http://127.0.0.1:{port}", secret="s", session=to_proxy, timeout=5)
    with pytest.raises(StoreUnreachable) as info:
        client.download("/api/v1/worker/jobs/j1/script", tmp_path / "main.py",
                        direct_url=f"http://127.0.0.1:{port}/b/k?X-Amz-Signature=s3cr3t")
    assert isinstance(info.value, ProxyUnreachable) and "s3cr3t" not in str(info.value)
    assert f"127.0.0.1:{port}/b/k" in str(info.value) and to_proxy.answers == []


# ------------------------------------------------ outputs the store does not take

def test_a_put_whose_bytes_are_not_the_announced_ones_is_refused_and_no_result_names_them(
        make_proxy, s3_server, s3_settings, tmp_path):
    proxy = make_proxy(**s3_settings)
    client, to_proxy, to_store = registered(proxy, "bad-digest")
    job_id = proxy.submit("print(1)")
    [held] = client.claim(max_jobs=1).jobs
    assert held["outputs_upload"] == "direct"
    before = stored_keys(s3_server, s3_settings)
    assert len(before) == 1, before   # its script
    archive = tmp_path / "outputs.zip"
    archive.write_bytes(zip_bytes(**{"model.txt": "weights"}))
    announced = zip_bytes(**{"model.txt": "other weights"})

    result = {"attempt": held["attempt"], "state": "succeeded", "exit_code": 0}
    with pytest.raises(OutputsRefused, match="BadDigest") as refused:
        client.post_result(job_id, result, Archive(archive, sha256(announced), archive.stat().st_size),
                           upload="direct")
    assert "X-Amz-Signature" not in str(refused.value)

    [(method, _, status, _)] = [a for a in to_store.answers if a[0] == "PUT"]
    assert (method, status) == ("PUT", 400)
    # No result went to the proxy, nothing was stored: the job is still the worker's.
    assert not to_proxy.to(f"/api/v1/worker/jobs/{job_id}/result")
    assert stored_keys(s3_server, s3_settings) == before
    assert proxy.job(job_id)["state"] == "running"


def test_outputs_the_proxy_will_not_take_fail_the_job_without_them(make_proxy, s3_settings,
                                                                   tmp_path):
    """The runner's answer to OutputsRefused: the job fails, without outputs,
    saying why (here the proxy refuses the upload: over its max_output_bytes)."""
    proxy = make_proxy(**s3_settings, max_output_bytes=64)
    client, _, to_store = registered(proxy, "too-large")
    job_id = proxy.submit("print(1)")
    [held] = client.claim(max_jobs=1).jobs
    archive = tmp_path / "outputs.zip"
    archive.write_bytes(zip_bytes(**{"model.txt": "w" * 1000}))
    config = load_config(["--data-dir", str(tmp_path / "worker")], env={
        "JOBCLOUD_WORKER_ENROLLMENT_TOKEN": "jce_x", "JOBCLOUD_WORKER_IMAGES": IMAGE})
    runner = JobRunner(held, client=client, sandbox=None, cache=None, config=config,
                       backoff=lambda n: 0, giving_up=threading.Event(), on_done=lambda r: None)

    runner._post_result({"attempt": held["attempt"], "state": "succeeded", "exit_code": 0,
                         "outputs": {"files": 1, "bytes": 1000}}, archive)

    job = proxy.job(job_id)
    assert job["state"] == "failed", job
    assert job["failure_reason"].startswith("outputs not delivered: ") and "too_large" in \
        job["failure_reason"], job
    assert not [a for a in to_store.answers if a[0] == "PUT"]
    r = requests.get(f"{proxy.url}/api/v1/jobs/{job_id}/outputs", headers=proxy.alice["headers"],
                     timeout=10)
    assert r.status_code == 404 and r.json()["error"] == "no_outputs", r.text
