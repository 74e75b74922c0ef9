"""Two proxy instances that share nothing but PostgreSQL and an S3 store
(separate data directories, no shared filesystem) serve one cluster: submit at
one, claim and upload via the other, download from either; the retention
sweep and the webhook sender stay exactly-once across them.

Real gunicorn processes, a real PostgreSQL and a real SeaweedFS.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import requests

from proxy import close_app, create_app
from proxy.config import load_config
from tests.conftest import (
    Users,
    free_port,
    register_worker,
    start_gunicorn,
    stop_gunicorn,
    wait_until,
)
from tests.test_webhooks import Receiver

pytestmark = [pytest.mark.live, pytest.mark.postgres]

ADMIN = str(Path(sys.executable).parent / "jobcloud-proxy")


def _zip(**members: str) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, text in members.items():
            zf.writestr(name, text)
    return buf.getvalue()


class Proxy:
    def __init__(self, env: dict, port: int, data_dir: Path):
        self.env, self.data_dir = env, data_dir
        self.url = f"http://127.0.0.1:{port}"
        self.proc = start_gunicorn(env, port, workers=2)

    def sweep(self) -> subprocess.Popen:
        return subprocess.Popen([ADMIN, "sweep"], env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)


@pytest.fixture
def cluster(tmp_path, pg_url, s3_settings):
    """Two proxies (own data dirs) on one PostgreSQL database and one bucket prefix."""
    receiver = Receiver()
    settings = dict(s3_settings, database_url=pg_url, webhook_allowed_hosts="127.0.0.1",
                    webhook_poll_s="0.02", webhook_backoff_s="0.05", log_level="WARNING")
    # The schema and the users, made once through the proxy's own code.
    setup = create_app(load_config(env={}, overrides=dict(
        settings, data_dir=str(tmp_path / "setup"), webhook_allowed_hosts=("127.0.0.1",),
        webhook_poll_s=0.02, webhook_backoff_s=0.05)))
    users = Users(setup)
    alice, enrollment = users.create("alice"), users.enrollment()
    close_app(setup)
    proxies = []
    for name in ("a", "b"):
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("JOBCLOUD_")}
        env.update({f"JOBCLOUD_{k.upper()}": str(v) for k, v in settings.items()})
        env.update(JOBCLOUD_DATA_DIR=str(tmp_path / name), JOBCLOUD_BIND=f"127.0.0.1:{port}")
        proxies.append(Proxy(env, port, tmp_path / name))
    yield proxies, alice, enrollment, receiver
    for p in proxies:
        stop_gunicorn(p.proc)
    receiver.close()


def test_two_proxies_with_separate_data_dirs_serve_one_cluster(cluster, s3_server, pg_url):
    (a, b), alice, enrollment, receiver = cluster
    dataset = _zip(**{"train.csv": "x,y\n1,2\n"})
    # Submitted at A.
    r = requests.post(f"{a.url}/api/v1/jobs", headers=alice["headers"], timeout=30,
                      data={"code": "print(1)\n", "webhook_url": receiver.url},
                      files={"dataset": ("data.zip", dataset, "application/zip")})
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]

    # A worker of B's claims it and gets its inputs from the store.
    worker = register_worker(b.url, enrollment, "w1")
    r = requests.post(f"{b.url}/api/v1/worker/claim", headers=worker, timeout=30,
                      json={"max_jobs": 1, "wait_s": 5})
    [job] = r.json()["jobs"]
    assert job["id"] == job_id
    got = requests.get(job["dataset"]["direct_url"], timeout=30)
    assert got.status_code == 200 and got.content == dataset

    # Its outputs go up to the store by B's presigned PUT, the result to B.
    archive = _zip(**{"model.txt": "weights"})
    sha = hashlib.sha256(archive).hexdigest()
    r = requests.post(f"{b.url}/api/v1/worker/jobs/{job_id}/outputs-upload", headers=worker,
                      json={"attempt": job["attempt"], "sha256": sha, "size": len(archive)},
                      timeout=30)
    put = r.json()
    assert requests.put(put["url"], data=archive, headers=put["headers"],
                        timeout=30).status_code == 200
    r = requests.post(f"{b.url}/api/v1/worker/jobs/{job_id}/result", headers=worker, timeout=30,
                      json={"attempt": job["attempt"], "state": "succeeded", "exit_code": 0,
                            "outputs_upload": {"sha256": sha, "size": len(archive)}})
    assert r.status_code == 200 and r.json()["applied"], r.text

    # Downloadable from either proxy: both send the user to the store.
    for proxy in (a, b):
        r = requests.get(f"{proxy.url}/api/v1/jobs/{job_id}/outputs", headers=alice["headers"],
                         timeout=30)
        assert r.status_code == 200 and r.content == archive
        assert r.history and r.history[0].status_code == 307
    # Neither proxy keeps a blob of its own: only its (empty) upload scratch space.
    for proxy in (a, b):
        assert not (proxy.data_dir / "blobs").exists() or \
            not any(p.is_file() for p in (proxy.data_dir / "blobs").rglob("*"))
        assert list((proxy.data_dir / "tmp").iterdir()) == []

    # The webhook: sent once, though both proxies' senders poll the same table.
    wait_until(lambda: any(json.loads(q["body"]).get("job", {}).get("id") == job_id
                           for q in receiver.requests), what="the webhook")
    import psycopg

    with psycopg.connect(pg_url) as conn:
        def settled():
            return conn.execute("SELECT state FROM webhook_deliveries WHERE job_id = %s",
                                (job_id,)).fetchall() == [("delivered",)]
        wait_until(settled, what="the delivery to be recorded")
    sent = [q for q in receiver.requests if json.loads(q["body"]).get("job", {}).get("id") == job_id]
    assert len(sent) == 1, sent

    # Retention: the job expires; both proxies sweep at once; each object is
    # deleted once, by one of them, and the store holds nothing of it after.
    with psycopg.connect(pg_url) as conn:
        conn.execute("UPDATE jobs SET finished_at = %s WHERE id = %s",
                     (time.time() - 40 * 86400, job_id))
    prefix = s3_settings_prefix(a.env)
    assert len(s3_server.keys(prefix)) == 3
    sweeps = [p.sweep() for p in (a, b)]
    deleted = 0
    for s in sweeps:
        out, err = s.communicate(timeout=120)
        assert s.returncode == 0, err
        deleted += int(out.split("deleted ")[1].split(" file")[0])
    assert deleted == 3
    assert s3_server.keys(prefix) == []
    r = requests.get(f"{b.url}/api/v1/jobs/{job_id}/outputs", headers=alice["headers"],
                     timeout=30)
    assert r.status_code == 410 and r.json()["error"] == "expired"


def s3_settings_prefix(env: dict) -> str:
    return env["JOBCLOUD_BLOB_URL"].split("/", 3)[3] + "/"
