"""Per-job Python packages (issue 15 item 5): a requirements.txt with the job,
checked at submission (proxy/requirements.py), built by the worker from wheels
only and installed offline, cached for later jobs (worker/pyenv.py).

Real components: the Flask app and gunicorn, the Docker engine with
jobcloud/python, PyPI for the real wheels (six, tomli, and docopt 0.6.2, which
has only an sdist). Tests that need PyPI skip locally when it cannot be
reached and fail under CI. The offline cases use a package index served by
the test on a loopback port (PEP 691 JSON and the files, real wheel archives
built here).
"""
from __future__ import annotations

import base64
import hashlib
import http.server
import io
import json
import os
import subprocess
import threading
import time
import zipfile

import pytest
import requests

from tests.conftest import free_port, require, stop_gunicorn, wait_until
from tests.test_browser import console_errors, first_login, page  # noqa: F401  (fixtures)
from tests.test_worker_sandbox import IMAGE, docker_ready, start_cluster, stop_worker

PEP691 = "application/vnd.pypi.simple.v1+json"


# ------------------------------------------------------------ a loopback index

def make_wheel(name: str, version: str, files: dict[str, str],
               tag: str = "py3-none-any") -> tuple[str, bytes]:
    """A real wheel archive (METADATA, WHEEL, RECORD): pip downloads and installs it."""
    dist = f"{name}-{version}.dist-info"
    contents = dict(files)
    contents[f"{dist}/METADATA"] = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    contents[f"{dist}/WHEEL"] = (f"Wheel-Version: 1.0\nGenerator: jobcloud-tests\n"
                                 f"Root-Is-Purelib: true\nTag: {tag}\n")
    record = []
    for path, text in contents.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record.append(f"{path},sha256={digest.decode()},{len(text.encode())}")
    record.append(f"{dist}/RECORD,,")
    contents[f"{dist}/RECORD"] = "\n".join(record) + "\n"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for path, text in contents.items():
            zf.writestr(path, text)
    return f"{name.replace('-', '_')}-{version}-{tag}.whl", buf.getvalue()


class FakeIndex:
    """A PEP 691 simple index on a loopback port: {project: [(filename, bytes)]}.

    Binds every address, so a container could try to reach it through the
    host's bridge address; counts the requests per path."""

    def __init__(self, projects: dict[str, list[tuple[str, bytes]]]):
        self.projects = projects
        self.hits: dict[str, int] = {}
        # An Event: each request waits until it is set (a slow index).
        self.delay: threading.Event | None = None
        self.port = free_port()
        index = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                index.hits[self.path] = index.hits.get(self.path, 0) + 1
                if index.delay is not None:
                    index.delay.wait(30)
                parts = self.path.strip("/").split("/")
                if parts[0] == "simple" and len(parts) == 2 and parts[1] in index.projects:
                    body = json.dumps({"meta": {"api-version": "1.0"}, "name": parts[1], "files": [
                        {"filename": f, "url": f"/files/{f}",
                         "hashes": {"sha256": hashlib.sha256(data).hexdigest()}}
                        for f, data in index.projects[parts[1]]]}).encode()
                    return self._send(200, PEP691, body)
                if parts[0] == "files" and len(parts) == 2:
                    for files in index.projects.values():
                        for f, data in files:
                            if f == parts[1]:
                                return self._send(200, "application/octet-stream", data)
                return self._send(404, "text/plain", b"not found")

            def _send(self, status, ctype, body):
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("0.0.0.0", self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/simple"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_index():
    made = []

    def make(projects):
        index = FakeIndex(projects)
        made.append(index)
        return index
    yield make
    for index in made:
        index.close()


def pypi_reachable() -> tuple[bool, str]:
    try:
        r = requests.get("https://pypi.org/simple/six/", headers={"Accept": PEP691}, timeout=10)
        return r.status_code == 200, f"PyPI answered {r.status_code}"
    except requests.RequestException as e:
        return False, f"PyPI (https://pypi.org/simple) not reachable: {type(e).__name__}"


def require_pypi() -> None:
    ok, reason = pypi_reachable()
    require(ok, reason)


def submit(client, user, requirements: bytes | None, code: str = "print(1)"):
    data = {"code": code}
    if requirements is not None:
        data["requirements"] = (io.BytesIO(requirements), "requirements.txt")
    return client.post("/api/v1/jobs", headers=user["headers"], content_type="multipart/form-data",
                       data=data)


# ------------------------------------------------------------- at submission

@pytest.mark.parametrize("text, line, says", [
    (b"six\n-e git+https://example.org/x.git#egg=x\n", 2, "-e"),
    (b"--index-url https://evil.example/simple\nsix\n", 1, "--index-url"),
    (b"-r other.txt\n", 1, "-r"),
    (b"-c constraints.txt\n", 1, "-c"),
    (b"six @ https://example.org/six.whl\n", 1, "URL"),
    (b"./local/pkg\n", 1, "path"),
    (b"# fine\nsix==1.16.0 --no-binary six\n", 2, "option"),
    (b"six\nSix>=1\n", 2, "again"),
    (b"six==1.16.0 --hash=md5:abc\n", 1, "hash"),
    (b"six>=1 --hash=sha256:" + b"a" * 64 + b"\n", 1, "exact version"),
    (b"six; os_nam == 'posix'\n", 1, "requirement"),
    (b"not a requirement!\n", 1, "requirement"),
    (b"six\x00\n", 1, "control"),
])
def test_malformed_lines_are_refused_naming_the_line(make_config, text, line, says):
    from proxy import close_app, create_app
    from tests.conftest import Users
    # The index is never asked for a malformed file: a closed port proves it.
    app = create_app(make_config(package_index_url=f"http://127.0.0.1:{free_port()}/simple"))
    try:
        user = Users(app).create("alice")
        r = submit(app.test_client(), user, text)
        assert r.status_code == 400, r.get_data(as_text=True)
        assert r.json["error"] == "invalid_requirements"
        assert f"line {line} of the requirements file" in r.json["detail"]
        assert says in r.json["detail"]
    finally:
        close_app(app)


def test_too_many_lines_and_bytes_are_refused(client, users):
    alice = users.create("alice")
    many = "".join(f"pkg{i}\n" for i in range(201)).encode()
    r = submit(client, alice, many)
    assert r.status_code == 400 and "line 201" in r.json["detail"], r.json
    r = submit(client, alice, b"# " + b"x" * (64 * 1024) + b"\n")
    assert r.status_code == 413 and r.json["error"] == "too_large", r.json


def test_requirements_are_normalised_stored_and_counted_like_a_script(make_config, fake_index,
                                                                     database_url):
    from proxy import close_app, create_app, retention
    from tests.conftest import Users
    index = fake_index({"six": [make_wheel("six", "1.16.0", {"six.py": ""})],
                        "tomli": [make_wheel("tomli", "2.0.1", {"tomli/__init__.py": ""})]})
    app = create_app(make_config(package_index_url=index.url, database_url=database_url))
    try:
        alice = Users(app).create("alice")
        client = app.test_client()
        first = submit(client, alice, b"# the two we need\nTomli>=2 ; python_version >= '3.8'\n"
                                      b"six==1.16.0\nnever; python_version < '3'\n")
        assert first.status_code == 201, first.get_data(as_text=True)
        second = submit(client, alice, b"six == 1.16.0\r\ntomli >= 2\r\n")
        assert second.status_code == 201, second.get_data(as_text=True)
        normalised = b"six==1.16.0\ntomli>=2\n"
        for job in (first.json, second.json):
            assert job["requirements"] == {"sha256": hashlib.sha256(normalised).hexdigest(),
                                           "size": len(normalised)}
            assert job["usage"]["env_cached"] is None and job["usage"]["env_build_s"] is None
        blobs = app.extensions["jobcloud"].blobs
        assert blobs.path(first.json["requirements"]["sha256"]).read_bytes() == normalised
        # Asked once per project: the second submission was answered from the cache.
        assert index.hits == {"/simple/six/": 1, "/simple/tomli/": 1}
        with app.extensions["jobcloud"].db.connection() as conn:
            script = conn.query_one("SELECT script_size FROM jobs WHERE id = ?",
                                    (first.json["id"],))["script_size"]
            # One script and one requirements file, each stored (and counted) once.
            assert retention.storage_of(conn, alice["id"]) == script + len(normalised)
            assert retention.is_referenced(conn, first.json["requirements"]["sha256"])
    finally:
        close_app(app)


def test_the_form_takes_a_requirements_file_and_the_page_shows_the_environment(make_config,
                                                                               fake_index):
    from proxy import close_app, create_app
    from tests.conftest import Users, csrf_from, login
    index = fake_index({"six": [make_wheel("six", "1.16.0", {"six.py": ""})]})
    app = create_app(make_config(package_index_url=index.url))
    try:
        alice = Users(app).create("alice")
        client = app.test_client()
        login(client, "alice", alice["password"])
        form = client.get("/new").get_data(as_text=True)
        assert 'name="requirements"' in form
        r = client.post("/jobs", content_type="multipart/form-data", data={
            "csrf_token": csrf_from(client, "/new"), "code": "import six",
            "requirements": (io.BytesIO(b"six==1.16.0\n"), "requirements.txt")})
        assert r.status_code in (302, 303), r.get_data(as_text=True)
        job_id = r.headers["Location"].rsplit("/", 1)[1]
        page = client.get(f"/jobs/{job_id}").get_data(as_text=True)
        assert "Requirements" in page and "installed from wheels into /job/env" in page
        # What the worker reported shows once the job ran: built, or cached.
        with app.extensions["jobcloud"].db.connection() as conn, conn.transaction():
            conn.execute("UPDATE jobs SET env_cached = 0, env_build_s = 12.5 WHERE id = ?", (job_id,))
        assert "environment built in 12.5 s" in client.get(f"/jobs/{job_id}").get_data(as_text=True)
        with app.extensions["jobcloud"].db.connection() as conn, conn.transaction():
            conn.execute("UPDATE jobs SET env_cached = 1, env_build_s = NULL WHERE id = ?", (job_id,))
        assert "environment cached on the worker" in client.get(f"/jobs/{job_id}").get_data(as_text=True)
        # A form refusal names the line, as the API's does.
        r = client.post("/jobs", content_type="multipart/form-data", data={
            "csrf_token": csrf_from(client, "/new"), "code": "import six",
            "requirements": (io.BytesIO(b"six\n-e .\n"), "requirements.txt")})
        assert "line 2 of the requirements file" in r.get_data(as_text=True)
    finally:
        close_app(app)


def test_expired_jobs_requirements_blob_is_deleted(make_config, fake_index):
    from proxy import close_app, create_app, retention
    from tests.conftest import Users
    index = fake_index({"six": [make_wheel("six", "1.16.0", {"six.py": ""})]})
    app = create_app(make_config(package_index_url=index.url))
    try:
        alice = Users(app).create("alice")
        job = submit(app.test_client(), alice, b"six==1.16.0\n").json
        st = app.extensions["jobcloud"]
        blob = job["requirements"]["sha256"]
        with st.db.connection() as conn, conn.transaction():
            conn.execute("UPDATE jobs SET state = 'succeeded', finished_at = ? WHERE id = ?",
                         (time.time() - 400 * 86400, job["id"]))
        with st.db.connection() as conn:
            result = retention.sweep(conn, st.blobs, default_days=30)
        assert job["id"] in result.expired_jobs and blob in result.deleted
        assert not st.blobs.path(blob).exists()
    finally:
        close_app(app)


def test_sdist_only_wrong_python_and_unknown_packages_are_refused_offline(make_config, fake_index):
    from proxy import close_app, create_app
    from tests.conftest import Users
    index = fake_index({
        "onlysdist": [("onlysdist-1.0.tar.gz", b"sdist")],
        "newpy": [make_wheel("newpy", "1.0", {"newpy.py": ""}, tag="cp312-cp312-manylinux_2_17_x86_64")],
        "mixed": [("mixed-2.0.tar.gz", b"sdist"), make_wheel("mixed", "1.0", {"mixed.py": ""})],
    })
    app = create_app(make_config(package_index_url=index.url))
    try:
        alice = Users(app).create("alice")
        client = app.test_client()
        r = submit(client, alice, b"onlysdist==1.0\n")
        assert r.status_code == 400 and r.json["error"] == "sdist_only", r.json
        assert "asks for onlysdist==1.0 which has no wheel" in r.json["detail"]
        r = submit(client, alice, b"newpy\n")
        assert r.status_code == 400 and r.json["error"] == "sdist_only", r.json
        r = submit(client, alice, b"mixed==2.0\n")
        assert r.status_code == 400 and r.json["error"] == "sdist_only", r.json
        # Version 1.0 has a wheel: a range that includes it is fine (pip picks it).
        assert submit(client, alice, b"mixed<=2.0\n").status_code == 201
        r = submit(client, alice, b"mixed==3.0\n")
        assert r.status_code == 400 and r.json["error"] == "no_matching_version", r.json
        r = submit(client, alice, b"nosuchthing\n")
        assert r.status_code == 400 and r.json["error"] == "unknown_package", r.json
        # Nothing of the refused submissions was kept.
        assert len(client.get("/api/v1/jobs", headers=alice["headers"]).json["jobs"]) == 1
    finally:
        close_app(app)


def test_an_unreachable_index_is_a_503_not_a_silent_accept(make_config):
    from proxy import close_app, create_app
    from tests.conftest import Users
    app = create_app(make_config(package_index_url=f"http://127.0.0.1:{free_port()}/simple"))
    try:
        alice = Users(app).create("alice")
        r = submit(app.test_client(), alice, b"six\n")
        assert r.status_code == 503 and r.json["error"] == "package_index_unreachable", r.json
        assert "could not be reached" in r.json["detail"]
    finally:
        close_app(app)


def test_a_slow_index_is_a_503_at_the_check_deadline(make_config, fake_index):
    """The index answers nothing until released: the submission ends with 503
    at package_index_check_timeout_s, not after one timeout per requirement."""
    from proxy import close_app, create_app
    from tests.conftest import Users
    names = [f"pkg{n}" for n in range(12)]
    index = fake_index({name: [make_wheel(name, "1.0", {f"{name}.py": ""})] for name in names})
    release = threading.Event()
    index.delay = release
    app = create_app(make_config(package_index_url=index.url, package_index_check_timeout_s=1))
    try:
        alice = Users(app).create("alice")
        r = submit(app.test_client(), alice, "".join(f"{n}\n" for n in names).encode())
        assert r.status_code == 503 and r.json["error"] == "package_index_unreachable", r.json
        assert "within 1 s (package_index_check_timeout_s)" in r.json["detail"]
        # Asked concurrently: more than one request was out when the deadline came.
        assert sum(index.hits.values()) > 1, index.hits
        release.set()
        assert submit(app.test_client(), alice, b"pkg0\n").status_code == 201
    finally:
        release.set()
        close_app(app)


def test_with_the_index_check_off_only_the_syntax_is_checked(make_config):
    from proxy import close_app, create_app
    from tests.conftest import Users
    app = create_app(make_config(package_index_url=f"http://127.0.0.1:{free_port()}/simple",
                                 package_index_check=False))
    try:
        alice = Users(app).create("alice")
        assert submit(app.test_client(), alice, b"six\n").status_code == 201
        assert submit(app.test_client(), alice, b"-e .\n").status_code == 400
    finally:
        close_app(app)


def test_package_index_settings_are_validated(make_config):
    from proxy.errors import ConfigError
    with pytest.raises(ConfigError, match="package_index_url"):
        make_config(package_index_url="ftp://mirror.example/simple")
    with pytest.raises(ConfigError, match="package_index_check_timeout_s"):
        make_config(package_index_check_timeout_s=0)
    from worker.config import ConfigError as WorkerConfigError, load_config
    with pytest.raises(WorkerConfigError, match="pyenv_cache_mb"):
        load_config([], env={"JOBCLOUD_WORKER_ENROLLMENT_TOKEN": "t",
                             "JOBCLOUD_WORKER_PYENV_CACHE_MB": "0"})
    with pytest.raises(WorkerConfigError, match="package_index_url"):
        load_config([], env={"JOBCLOUD_WORKER_ENROLLMENT_TOKEN": "t",
                             "JOBCLOUD_WORKER_PACKAGE_INDEX_URL": "file:///opt/wheels"})


def test_an_sdist_only_package_on_pypi_is_refused(client, users):
    require_pypi()
    alice = users.create("alice")
    # docopt 0.6.2 (its only release) was published as a source distribution only.
    r = submit(client, alice, b"docopt==0.6.2\n")
    assert r.status_code == 400, r.get_data(as_text=True)
    assert r.json["error"] == "sdist_only"
    assert "asks for docopt==0.6.2 which has no wheel" in r.json["detail"]


# -------------------------------------------------------- the worker's build

FAKE_PIP = '''\
import os, socket, sys
print("fake pip ran as uid", os.getuid(), "args", " ".join(sys.argv[1:3]))
names = [l.split(":")[0].strip() for l in open("/proc/net/dev").read().splitlines()[2:]]
print("interfaces", ",".join(sorted(names)))
s = socket.socket()
s.settimeout(3)
try:
    s.connect((%r, %d))
    print("CONNECTED")
except OSError as e:
    print("blocked", type(e).__name__)
try:
    open("/usr/lib/jobcloud-probe", "w")
    print("ROOT WRITABLE")
except OSError:
    print("root read-only")
os.makedirs("/job/output/site/probe_pkg")
open("/job/output/site/probe_pkg/__init__.py", "w").write("VALUE = 42\\n")
'''


def _bridge_address() -> str:
    """An address of this host a container could reach on a network (docker0's)."""
    out = subprocess.run(["ip", "-4", "-o", "addr", "show", "docker0"], capture_output=True,
                         text=True).stdout.split()
    return out[out.index("inet") + 1].split("/")[0] if "inet" in out else "192.0.2.1"


@pytest.fixture
def probe_builds(tmp_path, fake_index):
    """An EnvCache on the real engine whose index serves a stand-in for pip
    (FAKE_PIP: it reports what it sees, then writes an environment) and small
    real wheels probe-dep, other-dep and third-dep."""
    ok, reason = docker_ready()
    require(ok, reason)
    import docker
    from worker.pyenv import EnvCache
    from worker.sandbox import JobSpec, Policy, Sandbox
    index = fake_index({})
    index.projects["pip"] = [make_wheel("pip", "99.0", {
        "pip/__init__.py": "", "pip/__main__.py": FAKE_PIP % (_bridge_address(), index.port)})]
    for name in ("probe-dep", "other-dep", "third-dep"):
        index.projects[name] = [make_wheel(name, "1.0", {f"{name.replace('-', '_')}.py": ""})]
    engine = docker.from_env(timeout=30)
    sandbox = Sandbox(engine, owner=f"pyenv-test-{os.getpid()}", policy=Policy(
        pids_limit=64, tmpfs_mb=16, nofile=256, fsize_bytes=1 << 28))

    def make(max_bytes: int = 1 << 30):
        return EnvCache(tmp_path / "pyenv", max_bytes, sandbox=sandbox, job_uid=700_000)
    spec = JobSpec(job_id="jpyenvtest", attempt=1, image=IMAGE, cpus=1, memory_mb=128, gpus=0,
                   timeout_s=60)
    yield make, spec, index, engine, sandbox
    for c in engine.containers.list(all=True, filters={"label": f"jobcloud.worker={sandbox.owner}"}):
        c.remove(force=True)


def test_the_install_runs_without_network_as_the_job_user_on_a_read_only_root(probe_builds):
    """What runs in the build container (here a stand-in for pip, served by the
    index the worker was told to use) sees no network, not even the host's
    bridge where the index listens, and cannot write the image."""
    make, spec, index, engine, sandbox = probe_builds
    envs = make()
    out = []
    env = envs.acquire(spec, "probe-dep==1.0\n", index.url, on_output=out.append,
                       stop_reason=lambda: None)
    log = b"".join(out).decode()
    try:
        assert "fake pip ran as uid 700000 args install" in log, log
        assert "interfaces lo\n" in log and "blocked" in log and "CONNECTED" not in log, log
        assert "root read-only" in log, log
        # The stand-in ran, and the wheels came from the index the worker was given.
        assert index.hits.get("/files/probe_dep-1.0-py3-none-any.whl") == 1, index.hits
        assert (env.path / "site" / "probe_pkg" / "__init__.py").read_text() == "VALUE = 42\n"
        assert not env.cached
        assert engine.containers.list(all=True, filters={"label": f"jobcloud.worker={sandbox.owner}"}) == []
    finally:
        envs.release(env.key)


def test_concurrent_jobs_build_once_and_the_cache_evicts_least_recently_used(probe_builds):
    make, spec, index, engine, sandbox = probe_builds
    # Room for two environments: each the stand-in's one file, "VALUE = 42\n".
    envs = make(max_bytes=2 * len("VALUE = 42\n"))
    got, logs = {}, {}

    def acquire(requirement: str, out=None):
        return envs.acquire(spec, requirement, index.url, stop_reason=lambda: None,
                            on_output=(out.append if out is not None else lambda _: None))

    def job(n):
        out = []
        got[n] = acquire("probe-dep==1.0\n", out)
        logs[n] = b"".join(out).decode()
    threads = [threading.Thread(target=job, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    # One build for both: one download of the wheel, one environment.
    assert index.hits.get("/files/probe_dep-1.0-py3-none-any.whl") == 1, index.hits
    assert sorted(e.cached for e in got.values()) == [False, True], (got, logs)
    assert got[0].path == got[1].path
    waiter = next(n for n, e in got.items() if e.cached)
    assert "== waiting for another job's build" in logs[waiter], logs[waiter]
    assert got[waiter].build_s is not None   # it waited: that time is its build time
    probe = got[0].path

    other = acquire("other-dep==1.0\n")
    for e in [*got.values(), other]:
        envs.release(e.key)
    envs.release(acquire("other-dep==1.0\n").key)   # used again: the most recent
    third = acquire("third-dep==1.0\n")
    # Three past the room for two: the least recently used one went.
    assert not probe.exists() and other.path.is_dir() and third.path.is_dir()

    # One in use is never evicted, however old.
    held = acquire("other-dep==1.0\n")
    envs.release(third.key)
    again = acquire("probe-dep==1.0\n")
    assert not again.cached and held.path.is_dir() and not third.path.exists()
    envs.release(held.key)
    envs.release(again.key)


def test_a_job_cancelled_during_its_build_ends_cancelled_and_leaves_nothing(probe_builds):
    make, spec, index, engine, sandbox = probe_builds
    envs = make()
    asked = threading.Event()

    def on_output(data: bytes):
        if b"$ pip download" in data:
            asked.set()   # the owner cancels while pip downloads
    got = envs.acquire(spec, "probe-dep==1.0\n", index.url, on_output=on_output,
                       stop_reason=lambda: "cancelled" if asked.is_set() else None)
    assert got.state == "cancelled", got
    assert list(envs.envs.iterdir()) == [] and list(envs.tmp.iterdir()) == []
    assert envs._in_use == {}


def test_a_worker_not_running_as_root_opens_the_build_output_to_the_job():
    """As make_job_dir does for a job's directory: a worker that cannot chown
    the build's output to the job's uid opens it to all instead of failing
    every requirements job (here: this root process as nobody for the call)."""
    import shutil
    import tempfile
    from pathlib import Path
    from worker.pyenv import _writable_by
    require(os.geteuid() == 0, "switching to another user needs root")
    # Not under tmp_path: its parents are root's alone.
    top = Path(tempfile.mkdtemp(prefix="jobcloud-nonroot-"))
    try:
        os.chmod(top, 0o755)
        output = top / "output"
        output.mkdir(mode=0o755)
        os.chown(output, 65534, 65534)
        os.seteuid(65534)
        try:
            _writable_by(output, 700_000)
        finally:
            os.seteuid(0)
        assert output.stat().st_mode & 0o777 == 0o777
        # As root it is the job's, as before.
        _writable_by(output, 700_000)
        assert output.stat().st_uid == 700_000
    finally:
        shutil.rmtree(top)


def test_a_build_the_worker_disk_cannot_hold_fails_cleanly_and_frees_the_waiting_container(
        tmp_path, fake_index):
    """The worker's build directory is a file (as a full or broken disk: an
    OSError inside the build, not pip's): the job fails with a reason that
    names no path of the worker, and the waiting container it took is removed."""
    ok, reason = docker_ready()
    require(ok, reason)
    import docker
    from tests.test_worker_prestart import exists, one_waiting
    index = fake_index({"six": [make_wheel("six", "1.16.0", {"six.py": ""})]})
    cluster = start_cluster(tmp_path, slots=1, gunicorn_workers=1, prestart="true",
                            proxy_env={"JOBCLOUD_PACKAGE_INDEX_URL": index.url},
                            name=f"envdisk-{os.getpid()}")
    engine = docker.from_env(timeout=30)
    try:
        waiting = one_waiting(engine, cluster)
        build_dir = cluster.data_dir / "pyenv" / "tmp"
        build_dir.rmdir()
        build_dir.write_text("not a directory\n")
        job = cluster.wait(submit_with(cluster, "print(1)", b"six==1.16.0\n"))
        assert job["state"] == "failed", job
        assert job["failure_reason"].startswith(
            "env_build_failed: this worker could not build it: Not a directory"), job
        assert str(tmp_path) not in job["failure_reason"], job
        wait_until(lambda: not exists(engine, waiting), timeout=30,
                   what="the waiting container the job took to be removed")
    finally:
        stop_worker(cluster.worker)
        stop_gunicorn(cluster.server.proc)
        engine.close()


def test_a_host_without_pip_runs_the_index_pip_wheel(tmp_path):
    """Worker VMs have no python3-pip: the worker then fetches pip's wheel from
    the index (its sha256 checked) and runs it, on the host and in the build."""
    ok, reason = docker_ready()
    require(ok, reason)
    require_pypi()
    import docker
    from worker.pyenv import EnvCache
    from worker.sandbox import JobSpec, Policy, Sandbox
    engine = docker.from_env(timeout=30)
    sandbox = Sandbox(engine, owner=f"pyenv-nopip-{os.getpid()}", policy=Policy(
        pids_limit=64, tmpfs_mb=16, nofile=256, fsize_bytes=1 << 28))
    envs = EnvCache(tmp_path / "pyenv", 1 << 30, sandbox=sandbox, job_uid=700_000, pip=None)
    spec = JobSpec(job_id="jpyenvnopip", attempt=1, image=IMAGE, cpus=1, memory_mb=256, gpus=0,
                   timeout_s=120)
    out = []
    env = envs.acquire(spec, "six==1.16.0\n", "https://pypi.org/simple", on_output=out.append,
                       stop_reason=lambda: None)
    try:
        log = b"".join(out).decode()
        assert "$ fetching pip's wheel from the package index" in log, log
        assert "Successfully installed six-1.16.0" in log, log
        assert (env.path / "site" / "six.py").is_file()
    finally:
        envs.release(env.key)


# ------------------------------------------------------------ end to end

@pytest.fixture(scope="module")
def pypi_cluster(tmp_path_factory):
    ok, reason = docker_ready()
    require(ok, reason)
    require_pypi()
    c = start_cluster(tmp_path_factory.mktemp("pyenv"), slots=2, gunicorn_workers=2)
    try:
        yield c
    finally:
        stop_worker(c.worker)
        stop_gunicorn(c.server.proc)


def submit_with(cluster, code: str, requirements: bytes) -> str:
    files = {"code": (None, code), "image": (None, IMAGE), "timeout_s": (None, "120"),
             "memory_mb": (None, "256"),
             "requirements": ("requirements.txt", requirements, "text/plain")}
    r = requests.post(f"{cluster.server.url}/api/v1/jobs", headers=cluster.headers, files=files,
                      timeout=60)
    assert r.status_code == 201, r.text
    return r.json()["id"]


class BuildWatch:
    """The build containers Docker creates while it is open, watched live (the
    engine's event log keeps only the latest events, and other tests' containers
    push older ones out)."""

    def __init__(self):
        import docker
        self.created: list[str] = []
        self._stream = docker.from_env(timeout=30).events(decode=True, filters={
            "type": "container", "event": "create", "label": "jobcloud.build=1"})
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self):
        try:
            for event in self._stream:
                self.created.append(event["Actor"]["Attributes"].get("jobcloud.job", "?"))
        except Exception:  # the stream closed under the reader: the watch is over
            pass

    def of(self, job_id: str) -> int:
        return self.created.count(job_id)

    def close(self):
        self._stream.close()


@pytest.fixture
def build_watch():
    watch = BuildWatch()
    yield watch
    watch.close()


USES_PACKAGES = '''\
import os, six, tomli
print("six", six.__version__, "from", os.path.dirname(six.__file__))
print("tomli", tomli.loads("a = 1")["a"])
try:
    open(six.__file__, "a")
    print("ENV WRITABLE")
except OSError as e:
    print("env write refused", e.errno)
for line in open("/proc/self/mounts"):
    if line.split()[1] == "/job/env":
        print("env mount", line.split()[3])
'''


def test_a_job_gets_its_packages_and_the_next_one_the_cached_environment(pypi_cluster, build_watch):
    c = pypi_cluster
    first = submit_with(c, USES_PACKAGES, b"six==1.16.0\ntomli==2.0.1\n")
    job = c.wait(first, timeout=240)
    out = c.logs(first)["data"]
    assert job["state"] == "succeeded", (job, out, c.logs(first, "stderr")["data"], c.log_tail())
    assert out.startswith("== building environment"), out
    assert "six 1.16.0 from /job/env/site" in out and "tomli 1" in out
    assert out.index("== running the script ==") < out.index("six 1.16.0")
    # Mounted read-only (not only files the job's uid does not own).
    assert "env write refused" in out and "ENV WRITABLE" not in out and "env mount ro," in out
    assert job["usage"]["env_cached"] is False and job["usage"]["env_build_s"] > 0, job["usage"]
    assert build_watch.of(first) == 1, build_watch.created

    # Same requirements, spelled otherwise: the same environment, no build.
    second = submit_with(c, USES_PACKAGES, b"# again\ntomli == 2.0.1\nSix==1.16.0\n")
    job = c.wait(second, timeout=120)
    out = c.logs(second)["data"]
    assert job["state"] == "succeeded", (job, out)
    assert job["usage"]["env_cached"] is True and job["usage"]["env_build_s"] is None, job["usage"]
    assert "== environment cached: no build ==" in out and "pip" not in out, out
    assert build_watch.of(second) == 0, build_watch.created
    assert "six 1.16.0 from /job/env/site" in out

    page = requests.get(f"{c.server.url}/api/v1/jobs/{second}", headers=c.headers, timeout=10).json()
    assert page["requirements"]["size"] == len(b"six==1.16.0\ntomli==2.0.1\n")


def test_a_build_failure_fails_the_job_with_pips_message(pypi_cluster):
    c = pypi_cluster
    # A real wheel, a wrong hash: pip's hash check refuses it at download.
    job_id = submit_with(c, "print('never runs')",
                         b"six==1.16.0 --hash=sha256:" + b"0" * 64 + b"\n")
    job = c.wait(job_id, timeout=240)
    out = c.logs(job_id)["data"]
    assert job["state"] == "failed", (job, out)
    assert job["failure_reason"].startswith("env_build_failed: downloading wheels:"), job
    assert "HASHES" in job["failure_reason"], job
    assert "never runs" not in out and "== environment build failed" in out, out
    assert job["exit_code"] is None and job["usage"]["env_cached"] is False
    # Nothing of it stays: no build container, and not the waiting container
    # (prestart) its slot had taken; the idle worker keeps one per slot.
    import docker
    engine = docker.from_env(timeout=30)
    mine = {"label": f"jobcloud.worker={c.worker_env['JOBCLOUD_WORKER_NAME']}"}
    wait_until(lambda: len(engine.api.containers(all=True, filters=mine)) <= 2, timeout=30,
               what="the worker to hold only its waiting containers")


def test_the_cli_submits_a_requirements_file(pypi_cluster, tmp_path):
    from tests.test_client_cli import Cli
    c = pypi_cluster
    cli = Cli(tmp_path / "cfg" / "config.json", tmp_path)
    cli.login(c.server.url, c.headers["Authorization"].split()[1])
    (tmp_path / "uses.py").write_text(USES_PACKAGES)
    (tmp_path / "requirements.txt").write_text("six==1.16.0\ntomli==2.0.1\n")
    r = cli("submit", "uses.py", "--requirements", "requirements.txt", "--image", IMAGE,
            "--memory", "256", "--follow", timeout=240)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert "six 1.16.0 from /job/env/site" in r.stdout, r.stdout
    job_id = r.stderr.split("submitted job ")[1].split()[0]
    r = cli("status", job_id)
    assert r.returncode == 0 and "requirements.txt (" in r.stdout, r.stdout
    assert "cached on the worker" in r.stdout or "built in" in r.stdout, r.stdout
    (tmp_path / "bad.txt").write_text("six\n--extra-index-url https://evil.example/simple\n")
    r = cli("submit", "uses.py", "--requirements", "bad.txt", "--image", IMAGE)
    assert r.returncode != 0 and "line 2 of the requirements file" in r.stderr, r.stderr


@pytest.mark.live
def test_the_browser_form_sends_a_requirements_file(tmp_path, fake_index, page, console_errors):
    import re
    from playwright.sync_api import expect
    from tests.conftest import LiveServer, start_gunicorn
    index = fake_index({"six": [make_wheel("six", "1.16.0", {"six.py": ""})]})
    port = free_port()
    env = dict(os.environ, JOBCLOUD_DATA_DIR=str(tmp_path / "live"),
               JOBCLOUD_BIND=f"127.0.0.1:{port}", JOBCLOUD_LOG_LEVEL="WARNING",
               JOBCLOUD_PACKAGE_INDEX_URL=index.url)
    env.pop("JOBCLOUD_CONFIG", None)
    env.pop("JOBCLOUD_DATABASE_URL", None)
    server = LiveServer(f"http://127.0.0.1:{port}", start_gunicorn(env, port, workers=2), env,
                        tmp_path / "live")
    try:
        first_login(page, server.url, server, "dora")

        good, bad = tmp_path / "requirements.txt", tmp_path / "bad.txt"
        good.write_text("Six == 1.16.0  # pinned\n")
        bad.write_text("six\n--index-url https://evil.example/simple\n")
        page.get_by_label("… or paste code").fill("import six\n")
        page.get_by_label(re.compile("Python packages")).set_input_files(str(bad))
        page.get_by_role("button", name="Submit job").click()
        expect(page.locator("main")).to_contain_text("line 2 of the requirements file")
        # The refusal is a 400, which the browser logs; nothing else may be.
        assert [e for e in console_errors if "status of 400" not in e] == []
        console_errors.clear()

        page.goto(server.url + "/")
        page.get_by_label("… or paste code").fill("import six\n")
        page.get_by_label(re.compile("Python packages")).set_input_files(str(good))
        page.get_by_role("button", name="Submit job").click()
        expect(page).to_have_url(re.compile(r"/jobs/j[0-9a-f]+$"))
        expect(page.locator("#requirements")).to_contain_text("installed from wheels into /job/env")
        assert index.hits.get("/simple/six/") == 1
        assert console_errors == []
    finally:
        stop_gunicorn(server.proc)
