"""A job's own environment variables (proxy/jobenv.py, worker/sandbox.py).

Through the app on SQLite and PostgreSQL: the three ways the API takes them,
every refusal as a 400 naming the variable, names in the job's JSON and page,
values to the owner only, and in the worker's claim. Then for real: a job
submitted with `jobcloud submit -e` reads its variables in a pre-started
container of a real worker, and no value shows up in the proxy's log, its
access log (the worker protocol included) or the worker's log; and the
upload form in a real browser.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import subprocess
import sys

import pytest
import requests

from proxy import close_app, create_app
from proxy.jobenv import RESERVED_NAMES
from tests.conftest import (LiveServer, Users, csrf_from, free_port, login, require,
                            stop_gunicorn, wait_until)
from tests.test_browser import console_errors, first_login, page  # noqa: F401  (fixtures)
from tests.test_client_cli import Cli
from tests.test_worker_prestart import docker_client, one_waiting  # noqa: F401 (a fixture)
from tests.test_worker_sandbox import IMAGE, Cluster, docker_ready, start_worker, stop_worker
from worker.sandbox import JobSpec, job_environment

WORKER = {"name": "w1", "cpus": 4, "memory_mb": 4096, "gpus": 0, "slots": 8, "images": [IMAGE]}


# Small bounds, so "too many" and "too long" are cheap to reach.
BOUNDS = {"job_env_max_vars": 3, "job_env_max_value_bytes": 16}


@pytest.fixture
def env_app(make_app):
    """On SQLite, then on PostgreSQL."""
    return make_app(**BOUNDS)


def _submit(client, user, env=None, **fields):
    data = {"code": "print(1)\n", "image": IMAGE, **fields}
    if env is not None:
        data["env"] = env
    return client.post("/api/v1/jobs", headers=user["headers"], data=data,
                       content_type="multipart/form-data")


def test_env_as_json_lines_or_repeated_parts_reaches_the_claim_and_only_the_owner(env_app):
    client, users = env_app.test_client(), Users(env_app)
    alice, bob, root = users.create("alice"), users.create("bob"), users.create("root", admin=True)

    as_json = _submit(client, alice, json.dumps({"API_KEY": "s3cr=t value ", "lr": "0.1"}))
    as_lines = _submit(client, alice, "# tuning\r\nMODE=fast\r\n\r\nEMPTY=\r\nEQ=a=b\r\n")
    repeated = _submit(client, alice, ["A=1", "B=two words"])
    plain = _submit(client, alice)
    for r in (as_json, as_lines, repeated, plain):
        assert r.status_code == 201, r.json
    assert as_json.json["env_names"] == ["API_KEY", "lr"]
    assert as_lines.json["env_names"] == ["MODE", "EMPTY", "EQ"]
    assert repeated.json["env_names"] == ["A", "B"] and plain.json["env_names"] == []

    job_id = as_json.json["id"]
    # Values in no JSON view of the job: its own, the list, the cancel answer.
    views = [client.get(f"/api/v1/jobs/{job_id}", headers=alice["headers"]).json,
             client.get("/api/v1/jobs", headers=alice["headers"]).json]
    assert all("s3cr=t" not in json.dumps(v) for v in views)
    assert views[0]["env_names"] == ["API_KEY", "lr"]

    r = client.get(f"/api/v1/jobs/{job_id}/env", headers=alice["headers"])
    assert r.status_code == 200 and r.json == {"job_id": job_id,
                                               "env": {"API_KEY": "s3cr=t value ", "lr": "0.1"}}
    lines = client.get(f"/api/v1/jobs/{as_lines.json['id']}/env", headers=alice["headers"]).json
    assert lines["env"] == {"MODE": "fast", "EMPTY": "", "EQ": "a=b"}
    r = client.get(f"/api/v1/jobs/{job_id}/env", headers=root["headers"])
    assert r.status_code == 403 and r.json["error"] == "env_owner_only"
    r = client.get(f"/api/v1/jobs/{job_id}/env", headers=bob["headers"])
    assert r.status_code == 404 and r.json["error"] == "job_not_found"

    # The job page: names, never values.
    login(client, "alice", alice["password"])
    page = client.get(f"/jobs/{job_id}").get_data(as_text=True)
    assert re.search(r'id="env-vars">API_KEY, lr ', page) and "s3cr=t" not in page
    # The upload form's text area: NAME=value lines, as a browser sends them.
    form = client.get("/").get_data(as_text=True)
    assert '<textarea name="env"' in form
    r = client.post("/jobs", content_type="multipart/form-data", data={
        "csrf_token": csrf_from(client), "code": "print(1)", "env": "SEED=7\r\nNOTE=a b\r\n"})
    assert r.status_code == 302, r.get_data(as_text=True)
    from_form = r.headers["Location"].rsplit("/", 1)[1]
    assert client.get(f"/api/v1/jobs/{from_form}/env", headers=alice["headers"]).json["env"] == {
        "SEED": "7", "NOTE": "a b"}
    r = client.post("/jobs", content_type="multipart/form-data", data={
        "csrf_token": csrf_from(client), "code": "print(1)", "env": "LD_PRELOAD=/x.so"})
    assert r.status_code == 400 and "LD_PRELOAD is reserved" in r.get_data(as_text=True)

    registered = client.post("/api/v1/workers/register", json=WORKER,
                             headers={"Authorization": f"Bearer {users.enrollment()}"})
    worker = {"Authorization": f"Bearer {registered.json['secret']}"}
    claimed = client.post("/api/v1/worker/claim", json={"max_jobs": 8}, headers=worker).json["jobs"]
    by_id = {j["id"]: j["env"] for j in claimed}
    assert len(by_id) == 5
    assert by_id[job_id] == {"API_KEY": "s3cr=t value ", "lr": "0.1"}
    assert by_id[repeated.json["id"]] == {"A": "1", "B": "two words"}
    assert by_id[plain.json["id"]] == {}


REFUSED = [
    ("PATH=/tmp/evil", "PATH"), ("LD_PRELOAD=/job/output/x.so", "LD_PRELOAD"),
    ("JOBCLOUD_JOB_ID=j1", "JOBCLOUD_JOB_ID"), ("HOME=/job/output", "HOME"),
    ("PYTHONPATH=/job/output", "PYTHONPATH"), ("OMP_THREAD_LIMIT=64", "OMP_THREAD_LIMIT"),
    ("1ST=x", "'1ST'"), ("A-B=x", "'A-B'"), ("X" * 129 + "=1", "'XXXX"),
    ("A=1\nA=2", "A is given twice"), ("A=1\nB=2\nC=3\nD=4", "more than 3"),
    ("A=" + "x" * 17, "longer than 16 bytes"), ("A=\u00e9" * 1 + "x" * 15, "longer than 16"),
    ("just text", "line 1 is not NAME=value"), ('{"A": 1}', "must be a string"),
    ('{"A": "x\\u0000y"}', "NUL"), ('{"A": "\\ud800"}', "not valid Unicode"),
    ('{"A": "1",', "not a valid JSON object"), ('{"A": ["x"]}', "must be a string"),
    ("[" * 900, "line 1 is not NAME=value"), ('{"a":' + "[" * 1010, "env is "),
    (["A=1", "B=2", "C=3", "D=4"], "more than 3"), (["A=1", "A=2"], "A is given twice"),
]


def test_bad_env_is_a_clear_400_that_quotes_no_value(make_config):
    app = create_app(make_config(**BOUNDS))
    try:
        client, users = app.test_client(), Users(app)
        alice = users.create("alice")
        for env, names in REFUSED:
            r = _submit(client, alice, env)
            assert r.status_code == 400 and r.json["error"] == "invalid_env", (env, r.json)
            assert names in r.json["detail"], (env, r.json)
            for secret in ("/tmp/evil", "x.so", "/job/output", "xxxxxxxx"):
                assert secret not in r.json["detail"], (env, r.json)
        # Over the field's byte limit: refused while the form is read.
        r = _submit(client, alice, "A=" + "x" * 5000)
        assert r.status_code == 413 and "'env'" in r.json["detail"], r.json
        assert client.get("/api/v1/jobs", headers=alice["headers"]).json["jobs"] == []
    finally:
        close_app(app)


def test_every_name_the_worker_sets_is_reserved_and_wins_anyway():
    """The worker's own variables are what the proxy refuses; should one come
    through (an older proxy), the worker's value is the one the job sees."""
    spec = JobSpec(job_id="j1", attempt=2, image=IMAGE, cpus=2.5, memory_mb=256, gpus=0,
                   timeout_s=10, user_env=(("HOME", "/evil"), ("JOBCLOUD_JOB_ID", "j2"),
                                           ("GOTO_NUM_THREADS", "64"), ("MINE", "ok")))
    env = job_environment(spec)
    assert env["HOME"] == "/tmp" and env["JOBCLOUD_JOB_ID"] == "j1" and env["MINE"] == "ok"
    assert {k: env[k] for k in ("OMP_THREAD_LIMIT", "GOTO_NUM_THREADS", "LOKY_MAX_CPU_COUNT",
                                "NUMEXPR_MAX_THREADS")} == dict.fromkeys(
        ("OMP_THREAD_LIMIT", "GOTO_NUM_THREADS", "LOKY_MAX_CPU_COUNT", "NUMEXPR_MAX_THREADS"), "2")
    # joblib hands these on unchanged to its workers when the job has them (sandbox.thread_limits).
    assert "OMP_NUM_THREADS" not in env and "OPENBLAS_NUM_THREADS" not in env
    own = {k for k in env if not k.startswith("JOBCLOUD_")} - {"MINE"}
    assert own <= RESERVED_NAMES, own - RESERVED_NAMES
    # A requirements build (worker/pyenv.py) runs pip: none of the job's own variables.
    from dataclasses import replace
    assert "MINE" not in job_environment(replace(spec, build=True))


# ------------------------------------------------------------------ for real

SCRIPT = '''\
import hashlib, json, os, re
mounts = open("/proc/self/mountinfo").read()
print(json.dumps({
    "container": re.search(r"/containers/([0-9a-f]{64})/hostname", mounts).group(1),
    "secret_sha256": hashlib.sha256(os.environ["SECRET_TOKEN"].encode()).hexdigest(),
    "mode": os.environ.get("MODE"), "home": os.environ.get("HOME"),
    "job_id": os.environ.get("JOBCLOUD_JOB_ID"), "threads": os.environ.get("OMP_THREAD_LIMIT")}))
'''


@pytest.fixture
def logged_cluster(tmp_path):
    """The real proxy (gunicorn) logging at DEBUG, its access log kept with the
    worker protocol in it, and one worker with a pre-started container."""
    ok, reason = docker_ready()
    require(ok, reason)
    port = free_port()
    env = dict(os.environ, JOBCLOUD_DATA_DIR=str(tmp_path / "proxy"),
               JOBCLOUD_BIND=f"127.0.0.1:{port}", JOBCLOUD_LOG_LEVEL="DEBUG",
               JOBCLOUD_ACCESS_LOG_WORKER_PROTOCOL="true", JOBCLOUD_HEARTBEAT_INTERVAL_S="1",
               JOBCLOUD_LEASE_TIMEOUT_S="20")
    env.pop("JOBCLOUD_CONFIG", None)
    env.pop("JOBCLOUD_DATABASE_URL", None)
    proxy_log, access_log = tmp_path / "proxy.log", tmp_path / "access.log"
    with open(proxy_log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "python:proxy.gunicorn_conf", "--workers", "2",
             "--access-logfile", str(access_log), "proxy:create_app()"],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    worker = None
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: _healthy(url, proc), timeout=30, what="gunicorn to answer /healthz")
        server = LiveServer(url, proc, env, tmp_path / "proxy")
        server.admin("user", "add", "alice")
        token = re.search(r"jcu_\S+", server.admin("token", "create", "--user", "alice")).group(0)
        enrollment = re.search(r"jce_\S+", server.admin("enroll", "create")).group(0)
        worker_log = tmp_path / "worker.log"
        worker, worker_env = start_worker(url, enrollment, tmp_path / "worker", worker_log,
                                          slots=1, prestart="true")
        cluster = Cluster(server, token, worker, tmp_path / "worker", worker_log, worker_env)
        cluster.token, cluster.logs_paths = token, (proxy_log, access_log, worker_log)
        yield cluster
    finally:
        if worker is not None:
            stop_worker(worker)
        stop_gunicorn(proc)


def _healthy(url: str, proc: subprocess.Popen) -> bool:
    assert proc.poll() is None, "gunicorn exited"
    try:
        return requests.get(f"{url}/healthz", timeout=2).status_code == 200
    except requests.RequestException:
        return False


@pytest.mark.live
def test_a_job_reads_its_env_and_no_log_holds_a_value(logged_cluster, docker_client, tmp_path,
                                                       monkeypatch):
    c = logged_cluster
    # The job takes the container already waiting: its launcher hands it the variables.
    waiting = one_waiting(docker_client, c)
    secret = "sk-" + secrets.token_hex(16)
    cli = Cli(tmp_path / "cfg" / "config.json", tmp_path)
    cli.login(c.server.url, c.token)
    script = tmp_path / "show_env.py"
    script.write_text(SCRIPT)
    # -e NAME takes the value from the caller's environment: never on the command line.
    monkeypatch.setenv("SECRET_TOKEN", secret)
    r = cli("submit", str(script), "--image", IMAGE, "--memory", "256", "-e", "SECRET_TOKEN",
            "-e", "MODE=fast", "--json")
    assert r.returncode == 0, r.stderr
    job_id = json.loads(r.stdout)["id"]
    assert secret not in r.stdout and secret not in r.stderr
    # A reserved name is refused at once, with the reason; nothing is queued.
    refused = requests.post(f"{c.server.url}/api/v1/jobs", headers=c.headers, timeout=30, files={
        "code": (None, "print(1)"), "env": (None, f"LD_PRELOAD={secret}")})
    assert refused.status_code == 400 and refused.json()["error"] == "invalid_env"
    assert "LD_PRELOAD is reserved" in refused.json()["detail"]

    job = c.wait(job_id, timeout=90)
    out = c.logs(job_id)["data"]
    assert job["state"] == "succeeded", (job, out, c.logs(job_id, "stderr")["data"])
    seen = json.loads(out.strip().splitlines()[-1])
    assert seen == {"container": waiting, "mode": "fast", "home": "/tmp", "job_id": job_id,
                    "secret_sha256": hashlib.sha256(secret.encode()).hexdigest(),
                    "threads": "1"}, seen
    assert job["env_names"] == ["SECRET_TOKEN", "MODE"] and secret not in json.dumps(job)
    shown = cli("status", job_id)
    assert "SECRET_TOKEN, MODE" in shown.stdout and secret not in shown.stdout
    values = requests.get(f"{c.server.url}/api/v1/jobs/{job_id}/env", headers=c.headers,
                          timeout=10).json()
    assert values["env"] == {"SECRET_TOKEN": secret, "MODE": "fast"}
    proxy_log, access_log, worker_log = c.logs_paths

    stop_worker(c.worker)
    stop_gunicorn(c.server.proc)
    texts = {p.name: p.read_text(errors="replace") for p in (proxy_log, access_log, worker_log)}
    # The right logs, and not empty: the proxy's boot, the job in the worker's.
    assert "Booting worker" in texts["proxy.log"] and job_id in texts["worker.log"]
    assert "/api/v1/worker/claim" in texts["access.log"], texts["access.log"][-2000:]
    assert f"/api/v1/jobs/{job_id}/env" in texts["access.log"]
    for name, text in texts.items():
        assert secret not in text, name


@pytest.mark.live
def test_the_upload_form_takes_env_lines_and_the_page_shows_names_only(page, console_errors,
                                                                      live_server):
    from playwright.sync_api import expect

    url = live_server.url
    first_login(page, url, live_server, "carol")

    page.locator('textarea[name="code"]').fill("print(1)")
    page.get_by_label("Environment variables").fill("SEED=7\nAPI_KEY=hunter2-secret\n")
    page.get_by_role("button", name="Submit job").click()
    expect(page).to_have_url(re.compile(re.escape(url) + r"/jobs/j[0-9a-f]+$"))
    expect(page.locator("#env-vars")).to_contain_text("SEED, API_KEY")
    assert "hunter2-secret" not in page.content()
    assert console_errors == []
