"""The worker's input downloads against a real loopback HTTP server that
misbehaves on purpose: a body cut off mid-way (a proxy restarting) is
transient, so the job is handed back and runs again; a persistent error
answer for the blob is a real inputs failure with its reason.

The runner tests stop at the inputs step, before any container: no Docker needed.
"""
from __future__ import annotations

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from worker.client import LeaseLost, ProtocolError, ProxyUnreachable, WorkerClient
from worker.config import load_config
from worker.runner import JobRunner

BODY = b"x" * 200_000


class _Misbehaving(BaseHTTPRequestHandler):
    """GET /<what>: answers as `what` says."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        what = self.path.rsplit("/", 1)[-1]
        self.server.seen.append(what)
        if what == "whole":
            self._head(200, {"Content-Length": str(len(BODY))})
            self.wfile.write(BODY)
        elif what == "cut-length":
            # Promises the whole body, sends a tenth of it, hangs up.
            self._head(200, {"Content-Length": str(len(BODY))})
            self.wfile.write(BODY[:20_000])
            self.close_connection = True
        elif what == "cut-chunked":
            self._head(200, {"Transfer-Encoding": "chunked"})
            self.wfile.write(b"%x\r\n%s\r\n" % (20_000, BODY[:20_000]))
            self.close_connection = True  # no terminating chunk
        elif what.isdigit():
            self._json(int(what), {"error": "internal", "detail": "boom"})
        else:
            self._json(404, {"error": what, "detail": "not here"})

    def _head(self, status: int, headers: dict) -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()

    def _json(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self._head(status, {"Content-Type": "application/json", "Content-Length": str(len(data))})
        self.wfile.write(data)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        # The client hanging up on a connection we cut first is the point here.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


@pytest.fixture
def server():
    srv = _Server(("127.0.0.1", 0), _Misbehaving)
    srv.seen = []
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def client(server):
    c = WorkerClient(f"http://127.0.0.1:{server.server_address[1]}", secret="s", timeout=10)
    yield c
    c.http.close()


def test_a_whole_body_is_written(client, tmp_path):
    client.download("/whole", tmp_path / "f")
    assert (tmp_path / "f").read_bytes() == BODY


@pytest.mark.parametrize("cut", ["cut-length", "cut-chunked"])
def test_a_body_cut_off_mid_way_is_transient(client, server, tmp_path, cut):
    with pytest.raises(ProxyUnreachable, match="cut off"):
        client.download(f"/{cut}", tmp_path / "f")
    # The client is still usable: the broken connection did not go back to the pool.
    client.download("/whole", tmp_path / "g")
    assert (tmp_path / "g").read_bytes() == BODY


@pytest.mark.parametrize("status", [502, 503, 504])
def test_gateway_answers_are_transient(client, tmp_path, status):
    with pytest.raises(ProxyUnreachable) as info:
        client.download(f"/{status}", tmp_path / "f")
    assert info.value.status == status


@pytest.mark.parametrize("status", [500, 501])
def test_other_server_errors_are_a_real_failure(client, tmp_path, status):
    with pytest.raises(ProtocolError) as info:
        client.download(f"/{status}", tmp_path / "f")
    assert not isinstance(info.value, ProxyUnreachable)
    assert info.value.status == status and str(status) in str(info.value)


def test_a_lost_lease_and_a_missing_blob_are_told_apart(client, tmp_path):
    with pytest.raises(LeaseLost):
        client.download("/api/v1/worker/jobs/j1/no_lease", tmp_path / "f")
    with pytest.raises(ProtocolError, match="no_dataset") as info:
        client.download("/api/v1/worker/jobs/j1/no_dataset", tmp_path / "f")
    assert not isinstance(info.value, (LeaseLost, ProxyUnreachable))


def test_a_refused_connection_is_transient(tmp_path):
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Misbehaving)
    port = srv.server_address[1]
    srv.server_close()  # nothing listens there now
    with pytest.raises(ProxyUnreachable):
        WorkerClient(f"http://127.0.0.1:{port}", secret="s", timeout=5).download("/whole", tmp_path / "f")


def run_inputs(client, tmp_path, script_url: str):
    """JobRunner's first steps for a job whose script is at `script_url`: (result, archive)."""
    config = load_config(["--data-dir", str(tmp_path / "data")], env={
        "JOBCLOUD_WORKER_ENROLLMENT_TOKEN": "jce_x", "JOBCLOUD_WORKER_IMAGES": "jobcloud/python"})
    job = {"id": "j1", "attempt": 1, "image": "jobcloud/python", "cpus": 1, "memory_mb": 128,
           "timeout_s": 10, "gpus": 0, "script": {"url": script_url, "sha256": None}, "dataset": None}
    runner = JobRunner(job, client=client, sandbox=None, cache=None, config=config,
                       backoff=lambda n: 0, giving_up=threading.Event(), on_done=lambda r: None)
    try:
        return runner._execute()
    finally:
        runner._clean_up()  # what run() does after: the job's disk is unmounted


def test_a_job_whose_script_download_is_cut_off_is_handed_back(client, tmp_path):
    assert run_inputs(client, tmp_path, "/cut-chunked") == (None, None)


def test_a_job_whose_script_the_proxy_cannot_serve_fails_with_the_reason(client, tmp_path):
    result, archive = run_inputs(client, tmp_path, "/500")
    assert archive is None
    assert result["state"] == "failed"
    assert result["failure_reason"].startswith("inputs: download of /500") and "500" in \
        result["failure_reason"], result
