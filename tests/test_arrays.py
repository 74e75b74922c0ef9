"""Job arrays (proxy/arrays.py, issue 15 item 1): one submission of N jobs
sharing one stored script and dataset, their index and parameters row, the
%N cap held by the dispatcher across workers, the array's JSON, cancel all,
fetch all, and the refusals.

The first part runs the real Flask app on SQLite and on a real PostgreSQL,
with workers speaking the real worker protocol (test_dispatch's Hub). The
second runs real jobs: gunicorn, the worker daemon, Docker, and the CLI.
"""
from __future__ import annotations

import csv
import io
import json
import re
import zipfile
from datetime import datetime
from itertools import pairwise

import pytest
import requests

from proxy import arrays, close_app, create_app, retention, retries
from tests.conftest import require, stop_gunicorn, wait_until
from tests.test_browser import console_errors, first_login, page  # noqa: F401  (fixtures)
from tests.test_dispatch import CODE, Hub, zip_bytes
from tests.test_dispatch import make_hub  # noqa: F401  (fixture)
from tests.test_worker_sandbox import IMAGE, docker_ready, start_cluster, stop_worker

DAY = 86400.0
QUIET = {"retention_sweep_s": 86400.0, "queue_unmet_capacity": True}
FINAL = ("succeeded", "failed", "cancelled", "timed_out")


@pytest.fixture
def hub(make_hub):  # noqa: F811
    return make_hub(**QUIET)


def submit_array(hub, user=None, code: str = CODE, expect: int = 201, **fields):
    """POST /api/v1/jobs with array fields; the answer's JSON (an array, or an error)."""
    data = {"code": code, **{k: v if isinstance(v, tuple) else str(v) for k, v in fields.items()}}
    r = hub.client.post("/api/v1/jobs", headers=(user or hub.alice)["headers"], data=data,
                        content_type="multipart/form-data")
    assert r.status_code == expect, r.get_json()
    return r.get_json()


def get_array(hub, array_id: str, user=None, **params) -> dict:
    r = hub.client.get(f"/api/v1/arrays/{array_id}", headers=(user or hub.alice)["headers"],
                       query_string=params)
    assert r.status_code == 200, r.get_json()
    return r.get_json()


def post_result(hub, worker, job: dict, outputs: bytes | None = None, state: str = "succeeded"):
    data = {"result": json.dumps({"attempt": job["attempt"], "state": state,
                                  "exit_code": 0 if state == "succeeded" else 1})}
    if outputs is not None:
        data["outputs"] = (io.BytesIO(outputs), "outputs.zip", "application/zip")
    r = hub.client.post(f"/api/v1/worker/jobs/{job['id']}/result", headers=worker.headers,
                        content_type="multipart/form-data", data=data)
    assert r.status_code == 200, r.get_json()


def blob_files(hub) -> set[str]:
    root = hub.app.extensions["jobcloud"].blobs.blobs
    return {p.name for p in root.rglob("*") if p.is_file()}


# ------------------------------------------------------------ submission

def test_a_range_makes_n_jobs_sharing_one_script_and_dataset(hub):
    dataset = zip_bytes(**{"x.txt": "shared"})
    array = submit_array(hub, array="3-7", name="sweep", env="LR=0.1", retries=2,
                         dataset=(io.BytesIO(dataset), "data.zip"))
    assert (array["size"], array["spec"], array["max_running"], array["name"]) == (5, "3-7", None,
                                                                                   "sweep")
    assert array["counts"]["queued"] == 5 and not array["done"]
    assert [j["index"] for j in array["jobs"]] == [3, 4, 5, 6, 7]
    rows = [hub.row(j["id"]) for j in array["jobs"]]
    # One stored script and one dataset, referred to by all five rows.
    assert len({r["script_blob"] for r in rows}) == 1 and len({r["dataset_blob"] for r in rows}) == 1
    assert blob_files(hub) == {rows[0]["script_blob"], rows[0]["dataset_blob"]}
    # Every job's JSON names its array and index; jobs queue in index order.
    job = hub.job(array["jobs"][2]["id"])
    assert job["name"] == "sweep[5]"
    assert (job["array"]["id"], job["array"]["index"], job["array"]["params"]) == (array["id"], 5,
                                                                                   None)
    assert [j["id"] for j in array["jobs"]] == sorted(j["id"] for j in array["jobs"])
    # What other features set on the first job's row, every copy has (arrays.expand).
    assert job["env_names"] == ["LR"] and job["retry_policy"]["retries"] == 2
    # A single index is an array of one.
    single = submit_array(hub, array="5")
    assert (single["size"], [j["index"] for j in single["jobs"]]) == (1, [5])


def test_the_array_json_pages_its_jobs_by_index(hub):
    array = submit_array(hub, array="0-24")
    first = get_array(hub, array["id"], limit=10)
    assert [j["index"] for j in first["jobs"]] == list(range(10))
    second = hub.client.get(first["next"], headers=hub.alice["headers"]).get_json()
    assert [j["index"] for j in second["jobs"]] == list(range(10, 20))
    last = get_array(hub, array["id"], after=19, limit=10)
    assert [j["index"] for j in last["jobs"]] == list(range(20, 25)) and last["next"] is None


@pytest.mark.parametrize("fields, code, words", [
    ({"array": "7-3"}, "invalid_array", "end before start"),
    ({"array": "0-9%0"}, "invalid_array", "%0"),
    ({"array": "0-"}, "invalid_array", "range A-B"),
    ({"array": "-1-4"}, "invalid_array", "range A-B"),
    ({"array": "a-b"}, "invalid_array", "range A-B"),
    ({"array": "%4"}, "invalid_array", "parameters file"),
    ({"array": "0-5"}, "array_too_large", "max_array_size = 5"),
    ({"array": "0-1", "params": (b"a\n1\n", "p.csv")}, "array_and_params", "not both"),
    ({"params": (b"", "p.csv")}, "invalid_params", "no rows"),
    ({"params": (b"lr,depth\n", "p.csv")}, "invalid_params", "no rows"),
    ({"params": (b"lr,depth\n0.1,3\n0.2\n", "p.csv")}, "invalid_params", "line 3"),
    ({"params": (b"lr,lr\n1,2\n", "p.csv")}, "invalid_params", "line 1"),
    ({"params": (b'{"lr": 0.1}\n{"lr": \n', "p.jsonl")}, "invalid_params", "line 2"),
    ({"params": (b'{"lr": 0.1}\n\n[1, 2]\n', "p.jsonl")}, "invalid_params", "line 3"),
    ({"params": (b'{"lr": NaN}\n', "p.jsonl")}, "invalid_params", "NaN is not a JSON value"),
    ({"params": (b'{"a": 1}\n{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n", "p.jsonl")},
     "invalid_params", "line 2"),
    ({"params": (b"\xff\xfe\x00", "p.csv")}, "invalid_params", "UTF-8"),
    ({"params": (b"a\n" + b"1\n" * 6, "p.csv")}, "array_too_large", "max_array_size = 5"),
])
def test_malformed_arrays_are_clear_400s_and_store_nothing(make_hub, fields, code,  # noqa: F811
                                                           words):
    hub = make_hub(max_array_size=5, **QUIET)
    fields = {k: (io.BytesIO(v[0]), v[1]) if isinstance(v, tuple) else v for k, v in fields.items()}
    error = submit_array(hub, expect=400, **fields)
    assert error["error"] == code and words in error["detail"], error
    assert hub.call(lambda c: c.query_one("SELECT COUNT(*) AS n FROM jobs")["n"]) == 0
    assert hub.call(lambda c: c.query_one("SELECT COUNT(*) AS n FROM job_arrays")["n"]) == 0
    assert blob_files(hub) == set()


def test_an_array_counts_whole_against_max_queued(hub):
    admin = hub.admin
    r = hub.client.put(f"/api/v1/admin/users/{hub.alice['name']}/limits",
                       headers=admin["headers"], json={"max_queued": 10})
    assert r.status_code == 200, r.get_json()
    r = hub.client.post("/api/v1/jobs", headers=hub.alice["headers"], content_type="multipart/form-data",
                        data={"code": CODE, "array": "0-10"})
    assert r.status_code == 429 and "max_queued" in r.get_json()["detail"]
    assert submit_array(hub, array="0-9")["size"] == 10


def test_another_user_gets_404_for_everything_of_an_array(hub):
    array = submit_array(hub, array="0-2")
    base = f"/api/v1/arrays/{array['id']}"
    for method, path in (("get", base), ("post", f"{base}/cancel"), ("get", f"{base}/outputs")):
        r = getattr(hub.client, method)(path, headers=hub.bob["headers"])
        assert (r.status_code, r.get_json()["error"]) == (404, "array_not_found"), path
    assert get_array(hub, array["id"], user=hub.admin)["size"] == 3   # admins see all
    assert get_array(hub, array["id"])["counts"]["queued"] == 3       # bob's cancel did nothing
    r = hub.client.get("/api/v1/arrays/a-no-such-array", headers=hub.alice["headers"])
    assert r.status_code == 404


# ------------------------------------------------------------ running

def test_claims_carry_index_and_params_row_and_results_fill_the_counts(hub):
    rows = [{"lr": "0.1", "depth": "3"}, {"lr": "0.01", "depth": "5"}]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=["lr", "depth"])
    writer.writeheader()
    writer.writerows(rows)
    # With a parameters file, `array` may hold the cap alone.
    array = submit_array(hub, array="%1",
                         params=(io.BytesIO(text.getvalue().encode()), "grid.csv"))
    assert (array["size"], array["spec"], array["params"], array["max_running"]) == (
        2, "grid.csv", "grid.csv", 1)
    worker = hub.register("w", slots=4)
    [first] = worker.claim(max_jobs=4)
    assert (first["array"]["id"], first["array"]["index"], first["array"]["params"]) == (
        array["id"], 0, rows[0])
    post_result(hub, worker, first)
    [second] = worker.claim(max_jobs=4)
    assert (second["array"]["index"], second["array"]["params"]) == (1, rows[1])
    assert hub.job(second["id"])["array"]["params"] == rows[1]
    post_result(hub, worker, second, state="failed")
    done = get_array(hub, array["id"])
    assert done["done"] and (done["counts"]["succeeded"], done["counts"]["failed"]) == (1, 1)


def test_the_cap_holds_across_workers_and_frees_a_slot_per_finished_job(hub):
    array = submit_array(hub, array="0-5%2")
    loner = hub.submit()   # a lone job of the same user is not held back by the cap
    workers = [hub.register(f"w{i}", slots=3) for i in range(2)]
    held = [j for w in workers for j in w.claim(max_jobs=3)]
    in_array = [j for j in held if j["array"]]
    assert len(in_array) == 2 and loner in [j["id"] for j in held]
    # Claims again: nothing more of the array while two of it are running.
    assert [j for w in workers for j in w.claim(max_jobs=3)] == []
    queued = [j for j in get_array(hub, array["id"])["jobs"] if j["state"] == "queued"]
    waiting = hub.job(queued[0]["id"])["waiting"]
    assert (waiting["reason"], waiting["array"]) == ("array_cap", {
        "id": array["id"], "active": 2, "max_running": 2})
    board = hub.client.get("/api/v1/admin/dashboard", headers=hub.admin["headers"]).get_json()
    assert {j["id"]: j["waiting"]["reason"] for j in board["queued_jobs"]}[queued[0]["id"]] == \
        "array_cap"
    owner = {j["id"]: w for w in workers for j in held if hub.row(j["id"])["worker_id"] == w.id}
    post_result(hub, owner[in_array[0]["id"]], in_array[0])
    more = [j for w in workers for j in w.claim(max_jobs=3)]
    assert len(more) == 1 and more[0]["array"]["id"] == array["id"]
    assert get_array(hub, array["id"])["counts"] == {
        "queued": 3, "running": 2, "succeeded": 1, "failed": 0, "cancelled": 0, "timed_out": 0}


def test_a_job_whose_id_fell_inside_a_full_arrays_range_is_still_placed(hub):
    """The cap steps over a full array's queued jobs by id; another job of the
    same user with an id among them (made on a proxy whose clock is behind)
    is not stepped over with them."""
    array = submit_array(hub, array="0-3%1")
    ids = [j["id"] for j in array["jobs"]]
    loner = hub.submit()
    skewed = ids[1] + "0"   # sorts after the array's job 1, before its job 2
    assert ids[1] < skewed < ids[2]
    hub.call(lambda conn: conn.execute("UPDATE jobs SET id = ? WHERE id = ?", (skewed, loner)))
    worker = hub.register("w", slots=2)
    assert sorted(j["id"] for j in worker.claim(max_jobs=2)) == sorted([ids[0], skewed])


def test_cancel_all_ends_the_queued_and_stops_the_running(hub):
    array = submit_array(hub, array="0-4")
    worker = hub.register("w", slots=2)
    running = worker.claim(max_jobs=2)
    r = hub.client.post(f"/api/v1/arrays/{array['id']}/cancel", headers=hub.alice["headers"])
    assert r.status_code == 200, r.get_json()
    answer = r.get_json()
    assert (answer["cancelled"], answer["stopping"]) == (3, 2)
    assert answer["counts"]["cancelled"] == 3 and answer["counts"]["running"] == 2
    # The worker hears it as an order, like a single job's cancel.
    assert sorted(worker.heartbeat([j["id"] for j in running])["cancel"]) == sorted(
        j["id"] for j in running)
    assert hub.job(array["jobs"][4]["id"])["failure_reason"].startswith("cancelled by user")


def test_cancel_all_also_ends_a_job_retried_between_its_steps(hub, monkeypatch):
    """A running job that fails and is retried after cancel all ended the
    queued (so it is queued again) is cancelled too: it never runs again."""
    array = submit_array(hub, array="0-2", retries=1)
    worker = hub.register("w", slots=2)
    first, second = worker.claim(max_jobs=2)
    cancel_queued = arrays._cancel_queued
    retried = []

    def then_a_try_fails(conn, *args):
        n = cancel_queued(conn, *args)
        if not retried:
            post_result(hub, worker, first, state="failed")   # exit 1: retried (retries=1)
            retried.append(hub.row(first["id"])["state"])
        return n

    monkeypatch.setattr(arrays, "_cancel_queued", then_a_try_fails)
    answer = hub.call(arrays.cancel, {"id": array["id"]})
    assert retried == ["queued"]
    assert answer == {"cancelled": 2, "stopping": 1}
    assert hub.row(first["id"])["state"] == "cancelled"
    assert (hub.row(second["id"])["state"], hub.row(second["id"])["cancel_requested"]) == (
        "running", 1)
    assert worker.claim(max_jobs=2) == []


def test_a_try_failing_while_cancel_all_marks_it_is_not_retried(pg_url, make_config,
                                                                 monkeypatch):
    """PostgreSQL, whose transactions interleave: a failed try's result reads
    its job as retryable, cancel all marks the job and commits, then the
    retry's update finds it marked: the job ends instead of queueing again."""
    app = create_app(make_config(database_url=pg_url, log_level="WARNING", **QUIET))
    try:
        hub = Hub(app)
        array = submit_array(hub, array="0-0", retries=1)
        worker = hub.register("w", slots=1)
        [job] = worker.claim(max_jobs=1)
        backoff_s = retries.backoff_s

        def and_meanwhile_cancel_all(*args):
            # Called between the retry's read and its update; another connection.
            assert hub.call(arrays.cancel, {"id": array["id"]}) == {"cancelled": 0, "stopping": 1}
            return backoff_s(*args)

        monkeypatch.setattr(retries, "backoff_s", and_meanwhile_cancel_all)
        post_result(hub, worker, job, state="failed")
        row = hub.row(job["id"])
        assert (row["state"], row["retries_used"], row["cancel_requested"]) == ("failed", 0, 1)
    finally:
        close_app(app)


def test_fetch_all_is_one_zip_by_index_with_the_missing_listed(hub):
    array = submit_array(hub, array="0-3")
    worker = hub.register("w", slots=4)
    claimed = {j["array"]["index"]: j for j in worker.claim(max_jobs=4)}
    post_result(hub, worker, claimed[0], zip_bytes(**{"model.txt": "zero", "sub/m.json": "{}"}))
    post_result(hub, worker, claimed[1], zip_bytes(**{"model.txt": "one"}))
    post_result(hub, worker, claimed[2], state="failed")   # no outputs
    r = hub.client.get(f"/api/v1/arrays/{array['id']}/outputs", headers=hub.alice["headers"])
    assert r.status_code == 200 and r.mimetype == "application/zip"
    assert r.headers["Content-Disposition"].startswith("attachment")
    assert r.is_streamed
    with zipfile.ZipFile(io.BytesIO(r.data)) as z:
        assert sorted(z.namelist()) == ["0/model.txt", "0/sub/m.json", "1/model.txt",
                                        "MISSING.txt"]
        assert z.read("1/model.txt") == b"one"
        missing = z.read("MISSING.txt").decode().splitlines()
    assert [line.split("\t")[0] for line in missing[1:]] == ["2", "3"]
    assert "no outputs" in missing[1] and "not finished" in missing[2]


def test_a_blob_shared_by_array_jobs_stays_until_none_needs_it_and_counts_once(hub):
    dataset = zip_bytes(**{"x.txt": "shared" * 100})
    array = submit_array(hub, array="0-2", dataset=(io.BytesIO(dataset), "data.zip"))
    ids = [j["id"] for j in array["jobs"]]
    first = hub.row(ids[0])
    with hub.app.extensions["jobcloud"].db.connection() as conn:
        used = retention.storage_of(conn, hub.alice["id"])
    assert used == first["script_size"] + first["dataset_size"]      # once, not three times
    # Two of them end and expire; the third, still queued, needs both files.
    for job_id in ids[:2]:
        assert hub.cancel(job_id).status_code == 200
    with hub.app.extensions["jobcloud"].db.connection() as conn, conn.transaction():
        conn.execute("UPDATE jobs SET finished_at = finished_at - ? WHERE id IN (?, ?)",
                     (40 * DAY, *ids[:2]))
    done = hub.app.extensions["jobcloud_retention"].run_once()
    assert sorted(done.expired_jobs) == sorted(ids[:2]) and done.deleted == {}
    assert blob_files(hub) == {first["script_blob"], first["dataset_blob"]}
    # The last one ends and expires: now both files go.
    assert hub.cancel(ids[2]).status_code == 200
    with hub.app.extensions["jobcloud"].db.connection() as conn, conn.transaction():
        conn.execute("UPDATE jobs SET finished_at = finished_at - ? WHERE id = ?",
                     (40 * DAY, ids[2]))
    done = hub.app.extensions["jobcloud_retention"].run_once()
    assert done.expired_jobs == [ids[2]]
    assert set(done.deleted) == {first["script_blob"], first["dataset_blob"]}
    assert blob_files(hub) == set()


# ------------------------------------------------------------ real jobs

@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """gunicorn, one worker daemon with 2 slots, Docker: shared by the tests below."""
    ok, reason = docker_ready()
    require(ok, reason)
    c = start_cluster(tmp_path_factory.mktemp("arrays"), slots=2, gunicorn_workers=2,
                      proxy_env={"JOBCLOUD_STATUS_REFRESH_S": "1"})
    try:
        yield c
    finally:
        stop_worker(c.worker)
        stop_gunicorn(c.server.proc)


@pytest.fixture
def cli(cluster, tmp_path):
    from tests.test_client_cli import Cli

    c = Cli(tmp_path / "cfg" / "config.json", tmp_path)
    c.login(cluster.server.url, cluster.headers["Authorization"].split()[1])
    return c


def live_array(cluster, array_id: str) -> dict:
    r = requests.get(f"{cluster.server.url}/api/v1/arrays/{array_id}", headers=cluster.headers,
                     timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def wait_array(cluster, array_id: str, timeout: float = 120) -> dict:
    try:
        return wait_until(lambda: (a := live_array(cluster, array_id))["done"] and a,
                          timeout=timeout, interval=0.2, what=f"array {array_id} to finish")
    except AssertionError as e:
        raise AssertionError(f"{e}: {live_array(cluster, array_id)['counts']}\n"
                             f"worker log:\n{cluster.log_tail()}") from None


def submit_live(cluster, code: str, params: tuple[str, bytes] | None = None, **fields) -> dict:
    data = {"code": code, "image": IMAGE, "timeout_s": 60, "memory_mb": 256, **fields}
    files = {k: (None, str(v)) for k, v in data.items()}
    if params:
        files["params"] = (params[0], params[1], "text/plain")
    r = requests.post(f"{cluster.server.url}/api/v1/jobs", headers=cluster.headers, files=files,
                      timeout=30)
    assert r.status_code == 201, r.text
    return r.json()


INDEX_SCRIPT = """\
import os
index = os.environ["JOBCLOUD_ARRAY_INDEX"]
print("index", index, "of", os.environ["JOBCLOUD_ARRAY_ID"])
if index != "2":
    with open(os.path.join(os.environ["JOBCLOUD_OUTPUT"], "result.txt"), "w") as f:
        f.write(f"result of {index}")
"""


def test_cli_range_array_each_job_sees_its_index_and_fetch_is_laid_out_by_index(cluster, cli,
                                                                                tmp_path):
    script = tmp_path / "sweep.py"
    script.write_text(INDEX_SCRIPT)
    r = cli("submit", str(script), "--array", "0-3", "--image", IMAGE, "--memory", "256",
            "--timeout", "60")
    assert r.returncode == 0, r.stderr
    array_id = re.search(r"submitted array (a[0-9a-f]+) \(sweep, 4 jobs\)", r.stdout).group(1)
    array = wait_array(cluster, array_id)
    assert array["counts"]["succeeded"] == 4, array
    for job in array["jobs"]:
        out = cluster.logs(job["id"])["data"]
        assert out == f"index {job['index']} of {array_id}\n", out

    r = cli("status", array_id)
    assert r.returncode == 0 and "4 succeeded (done)" in r.stdout, r.stdout
    r = cli("fetch", array_id, "-o", str(tmp_path / "all"))
    assert r.returncode == 0, r.stderr
    assert "MISSING.txt" in r.stderr
    found = sorted(str(p.relative_to(tmp_path / "all")) for p in (tmp_path / "all").rglob("*")
                   if p.is_file())
    assert found == ["0/result.txt", "1/result.txt", "3/result.txt", "MISSING.txt"]
    assert (tmp_path / "all" / "3" / "result.txt").read_text() == "result of 3"
    assert "\t".join(["2", array["jobs"][2]["id"], "succeeded", "no outputs"]) in \
        (tmp_path / "all" / "MISSING.txt").read_text()


def test_a_cap_of_one_never_runs_two_at_once_on_two_slots(cluster):
    array = submit_live(cluster, "import time; time.sleep(0.5)", array="0-3%1")
    assert array["max_running"] == 1
    done = wait_array(cluster, array["id"])
    assert done["counts"]["succeeded"] == 4, done
    # The proxy's own records: each job started (was claimed) only after the
    # previous one's result was in.
    spans = sorted((datetime.fromisoformat(j["started_at"]),
                    datetime.fromisoformat(j["finished_at"])) for j in done["jobs"])
    for (_, end), (start, _) in pairwise(spans):
        assert start >= end, spans


PARAMS_SCRIPT = """\
import json, os
from_env = json.loads(os.environ["JOBCLOUD_PARAMS"])
with open("/job/input/params.json") as f:
    from_file = json.load(f)
assert from_env == from_file, (from_env, from_file)
print(json.dumps({"index": int(os.environ["JOBCLOUD_ARRAY_INDEX"]), "params": from_env}))
"""


@pytest.mark.parametrize("name, text, rows", [
    ("grid.csv", "lr,layers\n0.1,2\n0.01,3\n", [{"lr": "0.1", "layers": "2"},
                                                 {"lr": "0.01", "layers": "3"}]),
    ("grid.jsonl", '{"lr": 0.1, "layers": [8, 8]}\n\n{"lr": 0.01, "name": "big"}\n',
     [{"lr": 0.1, "layers": [8, 8]}, {"lr": 0.01, "name": "big"}]),
])
def test_params_file_rows_arrive_as_jobcloud_params_and_params_json(cluster, name, text, rows):
    array = submit_live(cluster, PARAMS_SCRIPT, params=(name, text.encode()))
    assert (array["size"], array["params"]) == (2, name)
    done = wait_array(cluster, array["id"])
    assert done["counts"]["succeeded"] == 2, done
    seen = [json.loads(cluster.logs(j["id"])["data"]) for j in done["jobs"]]
    assert seen == [{"index": i, "params": row} for i, row in enumerate(rows)]


def test_cli_sends_the_params_file_and_shows_the_proxys_refusal(cli, tmp_path):
    script, params = tmp_path / "grid.py", tmp_path / "grid.csv"
    script.write_text("print(1)\n")
    params.write_text("lr,depth\n0.1,3\n0.2\n")
    r = cli("submit", str(script), "--params", str(params), "--image", IMAGE)
    assert r.returncode == 1 and "parameters file, line 3" in r.stderr, (r.stdout, r.stderr)


def test_cli_cancel_all_stops_the_running_and_ends_the_queued(cluster, cli):
    array = submit_live(cluster, "import time; print('started', flush=True); time.sleep(60)",
                        array="0-3%1")
    first = array["jobs"][0]["id"]
    wait_until(lambda: "started" in cluster.logs(first)["data"], timeout=60,
               what="the first job to start")
    r = cli("cancel", array["id"])
    assert r.returncode == 0, r.stderr
    assert "3 queued job(s) cancelled, 1 running job(s) told to stop" in r.stdout
    done = wait_array(cluster, array["id"], timeout=60)
    assert done["counts"]["cancelled"] == 4, done


def test_browser_array_form_live_page_job_link_download_and_cancel_all(
        page, console_errors, cluster, tmp_path):  # noqa: F811  (fixtures)
    from playwright.sync_api import expect

    url = cluster.server.url
    first_login(page, url, cluster.server, "dora")

    page.get_by_label("… or paste code").fill(INDEX_SCRIPT)
    page.get_by_label("Range, e.g. 0-99%8").fill("0-2%1")
    page.locator("input[name=memory_mb]").fill("256")
    page.get_by_role("button", name="Submit job").click()
    expect(page).to_have_url(re.compile(r"/arrays/a[0-9a-f]+$"))
    array_id = page.url.rsplit("/", 1)[1]
    # The page follows the jobs by itself (static/array.js): no reload here.
    expect(page.locator('[data-count="succeeded"]')).to_have_text("3", timeout=120_000)
    expect(page.locator("#array-state")).to_have_text("done")
    with page.expect_download() as info:
        page.locator("#fetch-all").click()
    saved = tmp_path / "all.zip"
    info.value.save_as(saved)
    with zipfile.ZipFile(saved) as zf:
        assert sorted(zf.namelist()) == ["0/result.txt", "1/result.txt", "MISSING.txt"]
    page.locator('tr[data-index="1"] a').click()
    expect(page.locator("#array")).to_contain_text(f"{array_id}, index 1")

    page.goto(url + "/")
    page.get_by_label("… or paste code").fill("import time; time.sleep(60)")
    page.get_by_label("Range, e.g. 0-99%8").fill("0-3%1")
    page.locator("input[name=memory_mb]").fill("256")
    page.get_by_role("button", name="Submit job").click()
    expect(page).to_have_url(re.compile(r"/arrays/a[0-9a-f]+$"))
    page.get_by_role("button", name="Cancel all").click()
    expect(page.locator(".flash")).to_contain_text("Cancelled")
    expect(page.locator('[data-count="cancelled"]')).to_have_text("4", timeout=60_000)
    assert console_errors == []
