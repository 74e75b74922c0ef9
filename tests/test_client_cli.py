"""The user side of `jobcloud` (client/), run as the real console script in a
subprocess against the real proxy under gunicorn, and, for following, fetching
and exit codes, a real worker on the real Docker engine.

Each command gets its own config file through JOBCLOUD_CLIENT_CONFIG, so the
tests never read or write the user's ~/.config.
"""
from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from client.cli import EXIT_CANCELLED, extract_safely
from client.errors import UnsafeArchive
from tests.conftest import LiveServer, free_port, start_gunicorn, stop_gunicorn
from tests.zips import HOSTILE
# The sandbox tests' module-scoped proxy + real worker (skips without Docker, fails under CI).
from tests.test_worker_sandbox import IMAGE, cluster  # noqa: F401 (a fixture)

JOBCLOUD = str(Path(sys.executable).parent / "jobcloud")


class Cli:
    """Runs `jobcloud` with one config file; the result has rc, out, err."""

    def __init__(self, config: Path, cwd: Path):
        self.config = config
        self.cwd = cwd

    def __call__(self, *args: str, stdin: str | None = None, timeout: float = 90):
        env = dict(os.environ, JOBCLOUD_CLIENT_CONFIG=str(self.config))
        r = subprocess.run([JOBCLOUD, *args], env=env, cwd=self.cwd, input=stdin, text=True,
                           capture_output=True, timeout=timeout)
        assert "Traceback" not in r.stderr, r.stderr
        return r

    def login(self, url: str, token: str):
        r = self("login", url, "--token", token)
        assert r.returncode == 0, r.stderr
        return r


def new_user(server, name: str) -> str:
    server.admin("user", "add", name)
    return re.search(r"jcu_\S+", server.admin("token", "create", "--user", name)).group(0)


@pytest.fixture
def cli(tmp_path):
    return Cli(tmp_path / "cfg" / "config.json", tmp_path)


# ------------------------------------------------------------ proxy only

def test_login_stores_url_and_token_privately(live_server, cli):
    token = new_user(live_server, "bob")
    r = cli("login", live_server.url, stdin=token + "\n")  # asked for, read from a pipe
    assert r.returncode == 0, r.stderr
    assert f"logged in to {live_server.url} as bob" in r.stdout
    assert stat.S_IMODE(cli.config.stat().st_mode) == 0o600
    assert stat.S_IMODE(cli.config.parent.stat().st_mode) == 0o700
    assert json.loads(cli.config.read_text()) == {"url": live_server.url, "token": token}

    r = cli("status", "--json")
    assert r.returncode == 0 and json.loads(r.stdout) == {"jobs": []}
    # The admin groups still reach the proxy's store through the same command.
    assert "bob\tuser" in live_server.admin("user", "list")


def test_api_errors_are_clear_messages(live_server, cli, tmp_path):
    r = cli("status")
    assert r.returncode == 1 and "not logged in" in r.stderr and "jobcloud login" in r.stderr

    r = cli("login", live_server.url, "--token", "jcu_wrong")
    assert r.returncode == 1
    assert "not logged in or token revoked: run jobcloud login" in r.stderr
    assert not cli.config.exists()

    cli.login(live_server.url, new_user(live_server, "carol"))
    r = cli("status", "nosuchjob")
    assert r.returncode == 1 and r.stderr == "jobcloud: no job 'nosuchjob'\n"
    script = tmp_path / "hello.py"
    script.write_text("print('hi')\n")
    r = cli("submit", str(script), "--image", "no/such-image")
    assert r.returncode == 1 and "unknown image 'no/such-image'" in r.stderr
    r = cli("submit", str(script), "--data", str(tmp_path / "missing"))
    assert r.returncode == 1 and "no such file or directory" in r.stderr
    r = cli("resubmit", "nosuchjob")
    assert r.returncode == 1 and "no local record" in r.stderr

    token_id = live_server.admin("token", "list", "--user", "carol").split("\t")[0]
    live_server.admin("token", "revoke", token_id, "--user", "carol")
    r = cli("status")
    assert r.returncode == 1 and "not logged in or token revoked" in r.stderr


def test_too_large_names_the_limit_and_proxy_down_cannot_reach(tmp_path, cli):
    port = free_port()
    env = dict(os.environ, JOBCLOUD_DATA_DIR=str(tmp_path / "proxy"), JOBCLOUD_BIND=f"127.0.0.1:{port}",
               JOBCLOUD_LOG_LEVEL="WARNING", JOBCLOUD_MAX_SCRIPT_BYTES="1000")
    env.pop("JOBCLOUD_CONFIG", None)
    env.pop("JOBCLOUD_DATABASE_URL", None)
    proc = start_gunicorn(env, port, workers=1)
    url = f"http://127.0.0.1:{port}"
    try:
        cli.login(url, new_user(LiveServer(url, proc, env, tmp_path / "proxy"), "dave"))
        big = tmp_path / "big.py"
        big.write_text("x = 1\n" * 1000)
        r = cli("submit", str(big))
        assert r.returncode == 1
        assert "upload too large" in r.stderr and "1000" in r.stderr.replace(",", ""), r.stderr
    finally:
        stop_gunicorn(proc)
    r = cli("status")
    assert r.returncode == 1 and f"cannot reach {url}" in r.stderr


def test_fetch_refuses_unsafe_archives(tmp_path):
    for name in ["../escape.txt", "/abs.txt", "a/../../b.txt"]:
        path = tmp_path / "bad.zip"
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("ok.txt", "fine")
            zf.writestr(name, "evil")
        with pytest.raises(UnsafeArchive):
            extract_safely(path, tmp_path / "out")
        assert not (tmp_path / "out" / "ok.txt").exists(), "nothing is written from a bad archive"
    link = zipfile.ZipInfo("link")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    with zipfile.ZipFile(tmp_path / "link.zip", "w") as zf:
        zf.writestr(link, "/etc/passwd")
    with pytest.raises(UnsafeArchive, match="link"):
        extract_safely(tmp_path / "link.zip", tmp_path / "out")


@pytest.mark.parametrize("name, archive, code, words", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_fetch_refuses_what_the_proxy_refuses(tmp_path, name, archive, code, words):
    """The same rule as intake and the worker (jobcloud_archive), before a byte is written."""
    (tmp_path / "outputs.zip").write_bytes(archive)
    with pytest.raises(UnsafeArchive) as refused:
        extract_safely(tmp_path / "outputs.zip", tmp_path / "out")
    for word in words:
        assert word.lower() in str(refused.value).lower(), (word, str(refused.value))
    assert not any((tmp_path / "out").rglob("*")), "nothing is written from a bad archive"


def test_fetch_never_writes_through_a_link_in_the_destination(tmp_path):
    """An existing link in the folder fetched into, as a directory or as a file, is
    refused without naming a path of this machine; nothing outside is touched."""
    outside = tmp_path / "outside"
    outside.mkdir()
    for link, member in (("sub", "sub/a.txt"), ("a.txt", "a.txt")):
        dest = tmp_path / f"out-{link}"
        dest.mkdir()
        os.symlink(outside / link, dest / link)
        (tmp_path / "o.zip").write_bytes(_zip_of(member))
        with pytest.raises(UnsafeArchive, match="link") as refused:
            extract_safely(tmp_path / "o.zip", dest)
        assert str(tmp_path) not in str(refused.value)
    assert list(outside.iterdir()) == []


def _zip_of(*names: str) -> bytes:
    import io
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name in names:
            zf.writestr(name, "x")
    return buf.getvalue()


# ------------------------------------------------------------ proxy + worker

@pytest.fixture
def user_cli(cluster, cli):
    cli.login(cluster.server.url, cluster.headers["Authorization"].split()[1])
    return cli


def _job_id(text: str) -> str:
    return re.search(r"submitted job (\S+)", text).group(1)


def test_submit_directory_follow_and_fetch(user_cli, tmp_path):
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "numbers.txt").write_text("1\n2\n3\n")
    (data / "sub" / "note.txt").write_text("nested")
    script = tmp_path / "train.py"
    script.write_text(
        "import os\n"
        "d = os.environ['JOBCLOUD_DATA']\n"
        "total = sum(int(x) for x in open(os.path.join(d, 'numbers.txt')))\n"
        "print('total', total, open(os.path.join(d, 'sub', 'note.txt')).read())\n"
        "os.makedirs(os.path.join(os.environ['JOBCLOUD_OUTPUT'], 'model'), exist_ok=True)\n"
        "open(os.path.join(os.environ['JOBCLOUD_OUTPUT'], 'model', 'result.txt'), 'w')"
        ".write(str(total))\n")
    r = user_cli("submit", str(script), "--data", str(data), "--image", IMAGE, "--memory", "256",
                 "--timeout", "60", "--name", "sum it", "--follow")
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert r.stdout == "total 6 nested\n"
    job_id = _job_id(r.stderr)
    assert f"job {job_id} succeeded" in r.stderr
    assert "requeued" not in r.stderr

    r = user_cli("fetch", job_id, "-o", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out" / "model" / "result.txt").read_text() == "6"

    r = user_cli("status", job_id, "--json")
    job = json.loads(r.stdout)
    assert job["name"] == "sum it" and job["dataset"]["name"] == "data.zip"
    assert job["resources"]["memory_mb"] == 256
    r = user_cli("status")
    assert job_id in r.stdout and "succeeded" in r.stdout


def test_follow_exits_with_the_jobs_exit_code(user_cli, tmp_path):
    script = tmp_path / "fail.py"
    script.write_text("import sys\nprint('about to fail', flush=True)\n"
                      "print('oops', file=sys.stderr)\nsys.exit(3)\n")
    r = user_cli("submit", str(script), "--image", IMAGE, "--follow")
    assert r.returncode == 3, (r.stdout, r.stderr)
    assert r.stdout == "about to fail\n" and "oops\n" in r.stderr
    # The exit code is said once (the worker's reason is "exit code 3" too).
    assert re.search(r"^job j[0-9a-f]+ failed \(exit code 3\)$", r.stderr, re.MULTILINE), r.stderr
    assert r.stderr.count("exit code 3") == 1

    r = user_cli("submit", str(script), "--image", IMAGE, "--follow", "--json")
    assert r.returncode == 3
    job = json.loads(r.stdout)  # the output went to stderr: stdout is the final job only
    assert job["state"] == "failed" and job["exit_code"] == 3
    assert job["failure_reason"] == "exit code 3"
    status = user_cli("status", job["id"]).stdout
    assert re.search(r"^state: +failed \(exit code 3\)$", status, re.MULTILINE), status
    r = user_cli("logs", job["id"], "-f")
    assert r.returncode == 3 and r.stdout == "about to fail\n"
    r = user_cli("logs", job["id"], "--stderr")
    assert r.returncode == 0 and r.stderr == "oops\n"


def test_logs_follow_prints_every_line_once(user_cli, tmp_path):
    script = tmp_path / "count.py"
    script.write_text("import time\nfor i in range(300):\n"
                      "    print(f'line {i}', flush=True)\n"
                      "    if i % 30 == 0:\n        time.sleep(0.2)\n")
    r = user_cli("submit", str(script), "--image", IMAGE, "--json")
    assert r.returncode == 0, r.stderr
    job = json.loads(r.stdout)
    # Not over yet (a waiting worker, woken by the submission, may have claimed it already).
    assert job["state"] in ("queued", "running")
    r = user_cli("logs", job["id"], "-f")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [f"line {i}" for i in range(300)]


def test_cancel_and_resubmit(user_cli, tmp_path):
    script = tmp_path / "sleepy.py"
    script.write_text("import time\nprint('started', flush=True)\ntime.sleep(120)\n")
    r = user_cli("submit", str(script), "--image", IMAGE, "--timeout", "300", "--name", "sleepy",
                 "--json")
    first = json.loads(r.stdout)

    r = user_cli("resubmit", first["id"], "--json")
    assert r.returncode == 0, r.stderr
    second = json.loads(r.stdout)
    assert second["id"] != first["id"]
    assert (second["name"], second["script"], second["resources"]) == \
           (first["name"], first["script"], first["resources"])

    for job in (first, second):
        r = user_cli("cancel", job["id"], "--json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["id"] == job["id"]
        r = user_cli("logs", job["id"], "-f")
        assert r.returncode == EXIT_CANCELLED, (r.stdout, r.stderr)
        assert r.stdout in ("", "started\n")
    r = user_cli("cancel", first["id"])  # 409 from the API
    assert r.returncode == 1 and r.stderr == f"jobcloud: job {first['id']} is already cancelled\n"


class ScriptedProxyAnswers:
    """The log pages a proxy would answer, in order (for the follow loop's own logic)."""

    def __init__(self, pages):
        self.pages = list(pages)

    def logs(self, job_id, stream, offset):
        self.last = self.pages.pop(0)
        assert offset == self.last["offset"], "the follow loop asked from the wrong offset"
        return self.last

    def job(self, job_id):
        return {"id": job_id, "state": self.last["state"]}


def test_follow_announces_a_restart_only_when_a_started_attempt_is_replaced():
    import io

    from client.cli import follow

    def page(attempt, state, data, start, end):
        return {"attempt": attempt, "state": state, "data": data, "offset": start,
                "next_offset": end, "job_id": "j1", "stream": "stdout"}

    # Queued (attempt 0) -> first run: no restart notice, output printed once.
    out, err = io.StringIO(), io.StringIO()
    answers = ScriptedProxyAnswers([page(0, "queued", "", 0, 0), page(1, "running", "a\n", 0, 2),
                                    page(1, "running", "a\n", 0, 2), page(1, "succeeded", "", 2, 2)])
    import contextlib
    with contextlib.redirect_stderr(err):
        follow(answers, "j1", {"stdout": out})
    assert out.getvalue() == "a\n" and "requeued" not in err.getvalue()

    # A run that was under way is replaced by attempt 2: announced, output starts over.
    out, err = io.StringIO(), io.StringIO()
    answers = ScriptedProxyAnswers([page(1, "running", "x\n", 0, 2), page(2, "running", "", 2, 2),
                                    page(2, "running", "y\n", 0, 2), page(2, "succeeded", "", 2, 2)])
    with contextlib.redirect_stderr(err):
        follow(answers, "j1", {"stdout": out})
    assert out.getvalue() == "x\ny\n" and "attempt 2" in err.getvalue()
