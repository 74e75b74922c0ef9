"""Retention and storage quotas (proxy/retention.py): finished jobs' files expire
unless pinned, shared blobs go only when no job needs them, concurrent sweeps
delete each blob once, and submissions past the storage quota are refused.

Jobs run through the real worker protocol (test_dispatch's Hub) on SQLite and on
PostgreSQL. Time is never waited for: a job's finished_at is moved into the past
with SQL, and sweeps are run directly (retention.sweep, the `jobcloud-proxy
sweep` command, or sweeper processes of their own).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import sqlite3
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import requests

from proxy import retention
from proxy.blobs import human_size
from tests.conftest import ROOT, free_port, login, start_gunicorn, stop_gunicorn, wait_until
from tests.test_browser import console_errors, log_in_first_time, page  # noqa: F401  (fixtures)
from tests.test_dispatch import CODE, zip_bytes
from tests.test_dispatch import make_hub  # noqa: F401  (fixture)
from tests.test_webhooks import JOBCLOUD, complete_over_http

DAY = 86400.0
# No background pass during a test: every sweep here is one the test runs.
QUIET = {"retention_sweep_s": 86400.0}


@pytest.fixture
def hub(make_hub):  # noqa: F811
    return make_hub(**QUIET)


def dataset(size: int = 1000, seed: str = "d") -> bytes:
    """A zip of `size` incompressible bytes (stored), distinct for each seed."""
    data = hashlib.shake_256(seed.encode()).digest(size)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("data.bin", data)
    return buf.getvalue()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def submit(hub, user=None, data: bytes | None = None, **fields) -> str:
    if data is not None:
        fields["dataset"] = (io.BytesIO(data), "data.zip")
    return hub.submit(user, **fields)


def run_to_end(hub, worker, job_id: str, outputs: bytes | None = None) -> None:
    """`worker` claims `job_id` (the queue's next job) and posts its result, with `outputs`."""
    [job] = worker.claim()
    assert job["id"] == job_id
    data = {"result": json.dumps({"attempt": job["attempt"], "state": "succeeded",
                                  "exit_code": 0, "stdout": "the job's output\n"})}
    if outputs is not None:
        data["outputs"] = (io.BytesIO(outputs), "outputs.zip", "application/zip")
    r = hub.client.post(f"/api/v1/worker/jobs/{job_id}/result", headers=worker.headers,
                        content_type="multipart/form-data", data=data)
    assert r.status_code == 200, r.get_json()


def log_chunk(hub, worker, job_id: str) -> None:
    [job] = worker.claim()
    assert worker.log(job_id, job["attempt"], 0, "streamed line\n").status_code == 200
    return job


def finished_days_ago(hub, job_ids, days: float) -> None:
    with hub.app.extensions["jobcloud"].db.connection() as conn, conn.transaction():
        for job_id in job_ids:
            conn.execute("UPDATE jobs SET finished_at = ? WHERE id = ?",
                         (time.time() - days * DAY, job_id))


def sweep(hub) -> retention.SweepResult:
    return hub.app.extensions["jobcloud_retention"].run_once()


def stored(hub, blob: str) -> bool:
    return hub.app.extensions["jobcloud"].blobs.path(blob).exists()


# ------------------------------------------------------------------ expiry

def test_expired_outputs_answer_410_and_their_files_and_logs_are_gone(hub):
    worker = hub.register("w")
    data, outputs = dataset(seed="expiry"), zip_bytes(**{"model.txt": "weights"})
    old = submit(hub, data=data)
    job = log_chunk(hub, worker, old)
    r = hub.client.post(f"/api/v1/worker/jobs/{old}/result", headers=worker.headers,
                        content_type="multipart/form-data",
                        data={"result": json.dumps({"attempt": job["attempt"], "state": "succeeded",
                                                    "exit_code": 0, "stdout": "tail\n"}),
                              "outputs": (io.BytesIO(outputs), "o.zip", "application/zip")})
    assert r.status_code == 200
    script = hub.row(old)["script_blob"]
    assert all(stored(hub, b) for b in (script, sha(data), sha(outputs)))

    # Not yet due: 29 days after it finished, with the default 30.
    finished_days_ago(hub, [old], 29)
    assert sweep(hub).expired_jobs == []
    assert hub.client.get(f"/api/v1/jobs/{old}/outputs", headers=hub.alice["headers"]).data == outputs

    finished_days_ago(hub, [old], 31)
    done = sweep(hub)
    assert done.expired_jobs == [old]
    assert done.deleted == {script: len(CODE), sha(data): len(data), sha(outputs): len(outputs)}
    assert not any(stored(hub, b) for b in (script, sha(data), sha(outputs)))

    for path in ("outputs", "logs"):
        r = hub.client.get(f"/api/v1/jobs/{old}/{path}", headers=hub.alice["headers"])
        assert r.status_code == 410 and r.get_json()["error"] == "expired", r.get_json()
    body = hub.job(old)
    assert (body["state"], body["outputs_expired"], body["outputs"]) == ("succeeded", True, None)
    assert body["dataset"]["sha256"] == sha(data)      # the row stays: what was stored
    assert any("Outputs expired" in w for w in body["warnings"])
    with hub.app.extensions["jobcloud"].db.connection() as conn:
        assert conn.query("SELECT * FROM job_logs WHERE job_id = ?", (old,)) == []
        assert conn.query_one("SELECT stdout_tail FROM jobs WHERE id = ?", (old,))["stdout_tail"] is None

    # The page says so, offers no download, and the browser's download is a 410 too.
    login(hub.client, "alice", hub.alice["password"])
    html = hub.client.get(f"/jobs/{old}").get_data(as_text=True)
    assert "Outputs expired" in html and "Download outputs" not in html
    assert hub.client.get(f"/jobs/{old}/outputs").status_code == 410
    # A second sweep finds nothing more to do.
    assert (sweep(hub).expired_jobs, sweep(hub).deleted) == ([], {})


def test_retention_follows_the_users_override_and_zero_keeps_for_ever(make_hub):  # noqa: F811
    hub = make_hub(retention_days=0, **QUIET)
    worker = hub.register("w", slots=8)
    mine, bobs = submit(hub, code="print('a')\n"), submit(hub, hub.bob, code="print('b')\n")
    run_to_end(hub, worker, mine)
    run_to_end(hub, worker, bobs)
    r = hub.client.put("/api/v1/admin/users/bob/limits", headers=hub.admin["headers"],
                       json={"retention_days": 2})
    assert r.status_code == 200 and r.get_json()["retention_days"] == 2
    finished_days_ago(hub, [mine, bobs], 3)
    assert sweep(hub).expired_jobs == [bobs]
    assert hub.job(mine)["outputs_expired"] is False


# ------------------------------------------------------------- shared blobs

def test_a_shared_dataset_stays_while_another_job_needs_it(hub):
    worker = hub.register("w", slots=1)
    shared = dataset(seed="shared")
    first = submit(hub, data=shared)
    run_to_end(hub, worker, first, zip_bytes(**{"a.txt": "first"}))
    # The same dataset again, by another user: one blob, two jobs.
    second = submit(hub, hub.bob, data=shared, code="print('second')\n")
    assert hub.row(second)["dataset_blob"] == hub.row(first)["dataset_blob"] == sha(shared)

    finished_days_ago(hub, [first], 40)
    done = sweep(hub)
    assert done.expired_jobs == [first]
    assert stored(hub, sha(shared))                      # the queued job needs it
    assert sha(shared) not in done.deleted and len(done.deleted) == 2   # first's outputs and script

    # It runs, downloading the dataset, and finishes: still needed while kept.
    [job] = worker.claim()
    r = worker.get(f"/api/v1/worker/jobs/{second}/dataset")
    assert r.status_code == 200 and r.data == shared
    worker.result(second, job["attempt"])
    assert sweep(hub).deleted == {} and stored(hub, sha(shared))

    finished_days_ago(hub, [second], 40)
    done = sweep(hub)
    assert done.expired_jobs == [second] and sha(shared) in done.deleted
    assert not stored(hub, sha(shared))


def test_a_dataset_submitted_again_after_its_file_was_deleted_is_stored_again(hub):
    worker = hub.register("w")
    data = dataset(seed="again")
    old = submit(hub, data=data)
    run_to_end(hub, worker, old)
    finished_days_ago(hub, [old], 40)
    assert sha(data) in sweep(hub).deleted

    new = submit(hub, data=data)
    assert stored(hub, sha(data))
    assert [j["id"] for j in worker.claim()] == [new]
    assert worker.get(f"/api/v1/worker/jobs/{new}/dataset").data == data


# ---------------------------------------------------------------------- pins

def test_a_pinned_job_keeps_its_outputs_until_unpinned(hub):
    worker = hub.register("w")
    outputs = zip_bytes(**{"keep.txt": "precious"})
    job_id = submit(hub)
    run_to_end(hub, worker, job_id, outputs)
    r = hub.client.post(f"/api/v1/jobs/{job_id}/pin", headers=hub.alice["headers"])
    assert r.status_code == 200 and r.get_json()["pinned"] is True
    assert hub.client.post(f"/api/v1/jobs/{job_id}/pin",
                           headers=hub.bob["headers"]).status_code == 404

    finished_days_ago(hub, [job_id], 400)
    assert sweep(hub).expired_jobs == []
    r = hub.client.get(f"/api/v1/jobs/{job_id}/outputs", headers=hub.alice["headers"])
    assert r.status_code == 200 and r.data == outputs

    # Unpinned on the job page's button: the next sweep expires it.
    login(hub.client, "alice", hub.alice["password"])
    html = hub.client.get(f"/jobs/{job_id}").get_data(as_text=True)
    assert "Pinned" in html and ">Unpin</button>" in html
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)
    r = hub.client.post(f"/jobs/{job_id}/pin", data={"csrf_token": csrf, "pinned": "0"})
    assert r.status_code == 302 and hub.job(job_id)["pinned"] is False
    assert sweep(hub).expired_jobs == [job_id] and not stored(hub, sha(outputs))

    # Too late to pin it now.
    r = hub.client.post(f"/api/v1/jobs/{job_id}/pin", headers=hub.alice["headers"])
    assert (r.status_code, r.get_json()["error"]) == (410, "expired")


# -------------------------------------------------------- concurrent sweeps

SWEEPER = """
import json, os, sys, time
from proxy import retention
from proxy.blobs import BlobStore
from proxy.db import open_database

url, data_dir, go = sys.argv[1:4]
db = open_database(url)
blobs = BlobStore(data_dir)
print("ready", flush=True)
while not os.path.exists(go):   # both start together
    time.sleep(0.001)
with db.connection() as conn:
    done = retention.sweep(conn, blobs, default_days=30, batch=2)
print(json.dumps({"expired": done.expired_jobs, "deleted": sorted(done.deleted)}), flush=True)
"""


def test_two_sweeping_processes_delete_each_blob_once_and_nothing_a_live_job_needs(
        hub, tmp_path, database_url):
    worker = hub.register("w", slots=64)
    shared, recent_shared = dataset(seed="shared-queued"), dataset(seed="shared-recent")
    old, expected = [], set()
    for i in range(12):
        data = shared if i < 4 else recent_shared if i == 4 else dataset(seed=f"own-{i}")
        outputs = zip_bytes(**{"out.txt": f"job {i}"})
        job_id = submit(hub, data=data)
        run_to_end(hub, worker, job_id, outputs)
        old.append(job_id)
        expected |= {sha(outputs)} | ({sha(data)} if i > 4 else set())
    finished_days_ago(hub, old, 31)
    # What live jobs need: a queued job (the shared dataset, the common script) and
    # a recent finished one (another dataset).
    recent = submit(hub, hub.bob, data=recent_shared, code="print('recent')\n")
    run_to_end(hub, worker, recent)
    queued = submit(hub, hub.bob, data=shared)   # nobody claims it: it stays queued

    go = tmp_path / "go"
    data_dir = hub.config.data_dir
    script = tmp_path / "sweeper.py"
    script.write_text(SWEEPER)
    procs = [subprocess.Popen([sys.executable, str(script), database_url, data_dir, str(go)],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    for p in procs:
        assert p.stdout.readline().strip() == "ready", p.stderr.read()
    go.touch()
    # While they sweep, the same user submits one of the expiring datasets again:
    # whichever comes first, its file must be there for the new job.
    again = dataset(seed="own-7")
    resubmitted = submit(hub, data=again)
    answers = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        answers.append(json.loads(out.strip().splitlines()[-1]))

    expired = [a["expired"] for a in answers]
    assert sorted(expired[0] + expired[1]) == sorted(old)            # each job expired once
    deleted = [set(a["deleted"]) for a in answers]
    assert not deleted[0] & deleted[1]                               # each blob deleted once
    assert expected - {sha(again)} <= deleted[0] | deleted[1] <= expected
    for job_id in (queued, recent, resubmitted):
        row = hub.row(job_id)
        for column in ("script_blob", "dataset_blob", "output_blob"):
            assert row[column] is None or stored(hub, row[column]), (job_id, column)
    for blob in expected - {sha(again)}:
        assert not stored(hub, blob)
    with hub.app.extensions["jobcloud"].db.connection() as conn:
        assert conn.query("SELECT blob FROM blob_deletions") == []


# --------------------------------------------------------------- the quota

def test_past_the_storage_quota_submissions_are_refused_naming_quota_and_usage(make_hub):  # noqa: F811
    hub = make_hub(storage_quota_mb=1, **QUIET)
    first, second = dataset(700 * 1024, "q1"), dataset(700 * 1024, "q2")
    submit(hub, data=first)
    used = len(CODE) + len(first)

    r = hub.client.post("/api/v1/jobs", headers=hub.alice["headers"],
                        content_type="multipart/form-data",
                        data={"code": CODE, "dataset": (io.BytesIO(second), "d.zip")})
    body = r.get_json()
    assert (r.status_code, body["error"]) == (413, "storage_quota_exceeded")
    assert "storage quota of 1 MiB" in body["detail"] and human_size(used) in body["detail"]
    assert human_size(len(second)) in body["detail"]
    assert not stored(hub, sha(second))
    # The same files again add nothing: accepted.
    submit(hub, data=first)

    # The browser form says the same, on the form.
    login(hub.client, "alice", hub.alice["password"])
    html = hub.client.get("/").get_data(as_text=True)
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)
    r = hub.client.post("/jobs", content_type="multipart/form-data",
                        data={"csrf_token": csrf, "code": CODE,
                              "dataset": (io.BytesIO(second), "d.zip")})
    assert r.status_code == 413
    assert "storage quota of 1 MiB" in r.get_data(as_text=True)

    # An admin's per-user quota overrides the configured one.
    r = hub.client.put("/api/v1/admin/users/alice/limits", headers=hub.admin["headers"],
                       json={"max_storage_mb": 5})
    assert r.status_code == 200
    submit(hub, data=second)


def test_storage_is_shown_on_usage_the_dashboard_and_metrics(hub):
    data = dataset(5000, "shown")
    submit(hub, data=data)
    submit(hub, data=data)                 # the same files: counted once
    submit(hub, hub.bob, data=data)        # another user's jobs: counted for them too
    expected = len(CODE) + len(data)

    [mine] = hub.client.get("/api/v1/usage", headers=hub.alice["headers"]).get_json()["storage"]
    assert (mine["user"], mine["bytes"], mine["quota_bytes"], mine["retention_days"]) == \
        ("alice", expected, 20 * 1024 * 1024 * 1024, 30)
    everyone = {s["user"]: s["bytes"] for s in hub.client.get(
        "/api/v1/usage", headers=hub.admin["headers"]).get_json()["storage"]}
    assert everyone == {"alice": expected, "bob": expected, "root": 0}
    dashboard = hub.client.get("/api/v1/admin/dashboard", headers=hub.admin["headers"]).get_json()
    assert {s["user"]: s["bytes"] for s in dashboard["storage"]} == everyone

    login(hub.client, "alice", hub.alice["password"])
    html = hub.client.get("/usage").get_data(as_text=True)
    assert 'id="usage-storage"' in html and human_size(expected) in html

    metrics = hub.client.get("/metrics").get_data(as_text=True)
    assert f'jobcloud_storage_bytes{{user="alice"}} {float(expected)}' in metrics
    assert f'jobcloud_storage_bytes{{user="bob"}} {float(expected)}' in metrics
    assert 'jobcloud_storage_quota_bytes{user="alice"}' in metrics


# ------------------------------------------------- CLI, under real gunicorn

def test_cli_pin_and_the_sweep_command_against_the_real_proxy(tmp_path):
    """`jobcloud pin`/`unpin` against gunicorn (2 processes), `jobcloud-proxy sweep` on its store."""
    port = free_port()
    data_dir = tmp_path / "live"
    env = dict(os.environ, JOBCLOUD_DATA_DIR=str(data_dir), JOBCLOUD_BIND=f"127.0.0.1:{port}",
               JOBCLOUD_LOG_LEVEL="WARNING")
    env.pop("JOBCLOUD_CONFIG", None)
    env.pop("JOBCLOUD_DATABASE_URL", None)
    server = start_gunicorn(env, port, workers=2)
    url = f"http://127.0.0.1:{port}"
    bin_dir = Path(sys.executable).parent

    def admin(*args):
        return subprocess.run([str(bin_dir / "jobcloud"), *args], env=env, capture_output=True,
                              text=True, check=True).stdout

    client_env = dict(os.environ, JOBCLOUD_CLIENT_CONFIG=str(tmp_path / "client.json"))

    def jobcloud(*args):
        return subprocess.run([JOBCLOUD, *args], env=client_env, capture_output=True, text=True,
                              timeout=60, cwd=tmp_path, check=False)

    try:
        admin("user", "add", "dana")
        token = re.search(r"jcu_\S+", admin("token", "create", "--user", "dana")).group(0)
        enrollment = admin("enroll", "create").strip()
        assert jobcloud("login", url, "--token", token).returncode == 0
        (tmp_path / "kept.py").write_text("print('kept')\n")
        (tmp_path / "gone.py").write_text("print('gone')\n")
        jobs = {}
        api = requests.Session()
        for name in ("kept", "gone"):
            out = jobcloud("submit", f"{name}.py", "--json")
            assert out.returncode == 0, out.stderr
            jobs[name] = json.loads(out.stdout)["id"]
            complete_over_http(api, url, enrollment, jobs[name])
        r = jobcloud("pin", jobs["kept"])
        assert r.returncode == 0 and "pinned" in r.stdout, r.stderr
        r = jobcloud("pin", jobs["gone"])
        r = jobcloud("unpin", jobs["gone"])
        assert r.returncode == 0 and "unpinned" in r.stdout, r.stderr

        db = sqlite3.connect(data_dir / "jobcloud.db")
        with db:
            db.execute("UPDATE jobs SET finished_at = ?", (time.time() - 90 * DAY,))
        db.close()
        r = subprocess.run([str(bin_dir / "jobcloud-proxy"), "sweep"], env=env,
                           capture_output=True, text=True, timeout=60, check=False)
        assert r.returncode == 0, r.stderr
        assert "expired the files of 1 job(s)" in r.stdout

        status = jobcloud("status", jobs["gone"])
        assert status.returncode == 0 and "expired" in status.stdout
        r = jobcloud("logs", jobs["gone"])
        assert r.returncode != 0 and "expired" in r.stderr and "Traceback" not in r.stderr
        assert jobcloud("logs", jobs["kept"]).returncode == 0

        def kept_everywhere():
            # Every gunicorn process answers from the same store.
            return all(requests.get(f"{url}/api/v1/jobs/{jobs['kept']}",
                                    headers={"Authorization": f"Bearer {token}"}).json()["pinned"]
                       for _ in range(4))
        assert wait_until(kept_everywhere, what="the pinned job in every process")
    finally:
        stop_gunicorn(server)


# ------------------------------------------------------ in a real browser

@pytest.mark.live
def test_browser_quota_message_pin_button_and_expired_page(page, console_errors, tmp_path):
    """Chromium against gunicorn with a 1 MiB quota: the form's refusal, the pin
    button, and a job page after its files expired."""
    from playwright.sync_api import expect

    port = free_port()
    data_dir = tmp_path / "live"
    env = dict(os.environ, JOBCLOUD_DATA_DIR=str(data_dir), JOBCLOUD_BIND=f"127.0.0.1:{port}",
               JOBCLOUD_LOG_LEVEL="WARNING", JOBCLOUD_STORAGE_QUOTA_MB="1")
    env.pop("JOBCLOUD_CONFIG", None)
    env.pop("JOBCLOUD_DATABASE_URL", None)
    server = start_gunicorn(env, port, workers=2)
    url = f"http://127.0.0.1:{port}"
    bin_dir = Path(sys.executable).parent
    try:
        created = subprocess.run([str(bin_dir / "jobcloud"), "user", "add", "erin"], env=env,
                                 capture_output=True, text=True, check=True).stdout
        one_time = re.search(r"one-time password: (\S+)", created).group(1)
        log_in_first_time(page, url, "erin", one_time)

        big = tmp_path / "big.zip"
        big.write_bytes(dataset(1536 * 1024, "browser"))
        page.get_by_label("… or paste code").fill("print('too much data')\n")
        page.locator("input[name=dataset]").set_input_files(str(big))
        page.get_by_role("button", name="Submit job").click()
        expect(page.locator("#error")).to_contain_text("storage quota of 1 MiB")

        page.goto(url + "/")
        page.get_by_label("… or paste code").fill("print('keep me')\n")
        page.get_by_role("button", name="Submit job").click()
        expect(page).to_have_url(re.compile(r"/jobs/j[0-9a-f]+$"))
        job_id = page.url.rsplit("/", 1)[1]
        page.get_by_role("button", name="Keep files (pin)").click()
        expect(page.locator(".flash")).to_contain_text("Pinned")
        expect(page.locator("#kept")).to_contain_text("kept until you unpin it")
        page.get_by_role("button", name="Unpin").click()
        expect(page.locator(".flash")).to_contain_text("Unpinned")
        page.get_by_role("button", name="Cancel job").click()
        expect(page.locator("#state")).to_have_text("cancelled")
        expect(page.locator("#kept")).to_contain_text("kept until")

        db = sqlite3.connect(data_dir / "jobcloud.db")
        with db:
            db.execute("UPDATE jobs SET finished_at = ? WHERE id = ?",
                       (time.time() - 60 * DAY, job_id))
        db.close()
        subprocess.run([str(bin_dir / "jobcloud-proxy"), "sweep"], env=env, check=True,
                       capture_output=True, timeout=60)
        page.reload()
        expect(page.locator("#retention")).to_contain_text("Outputs expired")
        expect(page.get_by_role("button", name="Keep files (pin)")).to_have_count(0)
        # The refused submission's 413 is the one error the browser logs.
        assert [e for e in console_errors if "status of 413" not in e] == []
    finally:
        stop_gunicorn(server)


@pytest.mark.parametrize("setting, value", [("retention_days", -1), ("storage_quota_mb", -5),
                                            ("retention_sweep_s", 0)])
def test_retention_settings_are_validated_where_config_is_loaded(setting, value):
    from proxy.config import load_config
    from proxy.errors import ConfigError

    with pytest.raises(ConfigError, match=setting):
        load_config(env={}, overrides={setting: value})
