"""The `jobcloud` command.

User commands (run anywhere, against the proxy's API with a stored token):
login, submit, status, logs, fetch, cancel, pin, unpin, resubmit. Admin commands (user,
token, enroll) run on the proxy host against its store and are handed to
`proxy.cli.jobcloud_main`, imported only then: a user's machine needs no Flask.
"""
from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import jobcloud_archive

from . import config as cfgmod
from .api import Client, MultipartBody
from .errors import ClientError, UnsafeArchive

ADMIN_GROUPS = ("user", "token", "enroll", "prices")
FINAL_STATES = ("succeeded", "failed", "cancelled", "timed_out")

# Exit codes. A followed job's own exit code is passed through (1-255), so a
# CLI failure (1) and a job that exited 1 read alike; use --json to tell them apart.
EXIT_OK = 0
EXIT_ERROR = 1        # a client error, or a job that failed without an exit code of its own
EXIT_USAGE = 2        # argparse: wrong arguments
EXIT_TIMED_OUT = 124  # the job hit its time limit (as timeout(1) exits)
EXIT_CANCELLED = 125  # the job was cancelled
EXIT_INTERRUPTED = 130  # Ctrl-C while following; the job keeps running

# Log polling: quick while output flows, backing off to this when the job is quiet.
POLL_MIN_S, POLL_MAX_S = 0.2, 2.0
# Redraw the upload progress bar at most this often.
PROGRESS_EVERY_S = 0.1
# What a fetched output archive may hold: above what a worker sends at most
# (output_max_bytes 1 GiB, output_max_files 10,000 by default, raised by some
# admins), and no ratio limit that a real output (zeros, logs) could trip:
# deflate cannot pass about 1032:1. The member rule is the proxy's and worker's.
FETCH_LIMITS = jobcloud_archive.Limits(max_total_bytes=64 * 2**30, max_entries=1_000_000,
                                       max_ratio=1100)

EPILOG = f"""\
admin commands (on the proxy host, against its store):
  jobcloud user add NAME [--admin] | user passwd NAME | user list | user limits NAME [--max-running N ...]
  jobcloud token create --user NAME [--label L] | token list --user NAME | token revoke ID --user NAME
  jobcloud enroll create [--label L] [--expires S] | enroll list | enroll revoke ID

exit codes: 0 ok; 1 error; 2 wrong arguments; with submit --follow, resubmit --follow
and logs -f the job's: 0 succeeded, its exit code when it failed with one (else 1),
{EXIT_TIMED_OUT} timed out, {EXIT_CANCELLED} cancelled, {EXIT_INTERRUPTED} interrupted (the job keeps running).

The URL and API token are kept in {cfgmod.config_path()}
(or ${cfgmod.ENV_CONFIG}), mode 0600.
"""


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ADMIN_GROUPS:
        from proxy.cli import jobcloud_main  # Flask and the store: proxy host only
        return jobcloud_main(argv)
    args = build_parser().parse_args(argv)
    # Job output is whatever the job printed: never die on an unencodable character.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")
    try:
        return args.run(args, cfgmod.config_path())
    except ClientError as e:
        print(f"jobcloud: {e.message}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("\njobcloud: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jobcloud", description="Run Python ML jobs on a jobcloud proxy.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("login", help="store the proxy URL and your API token")
    p.add_argument("url", nargs="?", metavar="URL",
                   help=f"the proxy (default: the last one, else {cfgmod.DEFAULT_URL})")
    p.add_argument("--token", help="an API token (jcu_...); asked for when not given")
    p.set_defaults(run=cmd_login)

    p = sub.add_parser("submit", help="submit a script as a job")
    p.add_argument("script", metavar="SCRIPT", help="the .py file to run")
    p.add_argument("--data", metavar="ZIP|DIR",
                   help="a .zip dataset, or a directory (zipped for you); unpacked read-only "
                        "into /job/input/data ($JOBCLOUD_DATA)")
    p.add_argument("--requirements", metavar="FILE",
                   help="a requirements.txt: packages installed (wheels only, from the proxy's "
                        "package index) before the script runs, cached on the worker")
    p.add_argument("--array", metavar="A-B[%K]",
                   help="a job array: one job per index A..B ($JOBCLOUD_ARRAY_INDEX), at most K "
                        "running at once; with --params, %%K alone")
    p.add_argument("--params", metavar="FILE",
                   help="a job array with one job per row of a CSV (with a header) or JSON lines "
                        "file: the row is $JOBCLOUD_PARAMS (JSON) and /job/input/params.json")
    _add_settings(p)
    _add_follow(p)
    p.set_defaults(run=cmd_submit)

    p = sub.add_parser("status", help="one job or array, or a table of your jobs")
    p.add_argument("job", nargs="?", metavar="JOB|ARRAY")
    p.add_argument("--limit", type=int, default=50, help="jobs listed (default 50, newest first)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=cmd_status)

    p = sub.add_parser("logs", help="a job's output")
    p.add_argument("job", metavar="JOB")
    p.add_argument("-f", "--follow", action="store_true",
                   help="follow until the job ends; exit with the job's code")
    p.add_argument("--stderr", action="store_true", help="stderr instead of stdout")
    p.set_defaults(run=cmd_logs)

    p = sub.add_parser("fetch", help="download and unpack a job's outputs (an array's: by index)")
    p.add_argument("job", metavar="JOB|ARRAY")
    p.add_argument("-o", "--output", metavar="DIR", help="where to unpack (default: ./JOB)")
    p.set_defaults(run=cmd_fetch)

    p = sub.add_parser("cancel", help="cancel a job, or every unfinished job of an array")
    p.add_argument("job", metavar="JOB|ARRAY")
    p.add_argument("--json", action="store_true", help="print the job as JSON")
    p.set_defaults(run=cmd_cancel)

    for name, keep, text in (("pin", True, "keep a job's files and logs past the retention time"),
                             ("unpin", False, "let a pinned job's files expire again")):
        p = sub.add_parser(name, help=text)
        p.add_argument("job", metavar="JOB")
        p.set_defaults(run=cmd_pin, pinned=keep)

    p = sub.add_parser(
        "resubmit", help="submit a job again with the same script, data and settings",
        description="Submit a job again. The API does not hand a job's script back to its "
                    "owner, so this reads the script and data again from the paths recorded "
                    "when `jobcloud submit` sent the job from this machine (kept beside the "
                    "config file); a job submitted elsewhere, or whose files were moved, "
                    "cannot be resubmitted. Edited files are sent as they are now.")
    p.add_argument("job", metavar="JOB")
    _add_follow(p)
    p.set_defaults(run=cmd_resubmit)

    for group in ADMIN_GROUPS:  # listed in --help; main() hands them to proxy.cli first
        sub.add_parser(group, help="(admin, on the proxy host) see below", add_help=False)
    return parser


def _add_settings(p) -> None:
    p.add_argument("--image", help="job image, e.g. jobcloud/ml (default: the proxy's)")
    p.add_argument("--cpus", type=float)
    p.add_argument("--memory", type=int, metavar="MB", help="memory limit in MB")
    p.add_argument("--timeout", type=int, metavar="S", help="time limit in seconds")
    p.add_argument("--gpus", type=int)
    p.add_argument("--disk", type=int, metavar="MB",
                   help="disk quota in MB for what the job writes (outputs and scratch)")
    p.add_argument("--name", help="a display name (default: the script's)")
    p.add_argument("--webhook", metavar="URL",
                   help="POST a signed notice to URL when the job finishes (allow-listed hosts only)")
    p.add_argument("--after", metavar="ID[,ID...]",
                   help="start only once these jobs (or arrays) of yours succeeded; their outputs "
                        "are read-only in /job/input/after/<name or id>/")
    p.add_argument("--retries", type=int, metavar="N",
                   help="run a failed try again, up to N times (default 0)")
    p.add_argument("--retry-on", dest="retry_on", metavar="CODE[,CODE...]",
                   help="only these exit codes are retried (default: any non-zero exit but an "
                        "OOM kill; never a timeout)")
    p.add_argument("--retry-backoff", dest="retry_backoff", type=int, metavar="S",
                   help="seconds before the first retry, doubling for each next one (default 10)")
    p.add_argument("-e", "--env", action="append", metavar="NAME[=VALUE]",
                   help="an environment variable for the job (repeatable); NAME alone takes "
                        "its value from your environment, read again at each resubmit and "
                        "never written to disk")


def _add_follow(p) -> None:
    p.add_argument("--follow", "-f", action="store_true",
                   help="print the job's output as it runs; exit with the job's code")
    p.add_argument("--json", action="store_true",
                   help="print the job as JSON (with --follow: the final job; output goes to stderr)")


# ------------------------------------------------------------------ commands

def cmd_login(args, path: Path) -> int:
    url = _normal_url(args.url or cfgmod.stored_url(path) or cfgmod.DEFAULT_URL)
    token = args.token or _ask_token()
    if not token:
        raise ClientError("no token given: create one on the proxy's API tokens page")
    me = Client(url, token).me()
    cfgmod.save_config(path, cfgmod.ClientConfig(url=url, token=token))
    print(f"logged in to {url} as {me['name']}{' (admin)' if me.get('is_admin') else ''}")
    return EXIT_OK


def cmd_submit(args, path: Path) -> int:
    record = {"script": os.path.abspath(args.script),
              "data": os.path.abspath(args.data) if args.data else None,
              "requirements": os.path.abspath(args.requirements) if args.requirements else None,
              "params": os.path.abspath(args.params) if getattr(args, "params", None) else None,
              "settings": {k: getattr(args, k) for k in ("image", "cpus", "memory", "timeout",
                                                         "gpus", "disk", "name", "webhook",
                                                         "after", "retries", "retry_on",
                                                         "retry_backoff", "array", "env")}}
    return _submit_and_report(args, path, record)


def cmd_resubmit(args, path: Path) -> int:
    record = cfgmod.find_submission(path, args.job)
    if record is None:
        raise ClientError(f"no local record of how job {args.job} was submitted: resubmit works "
                          "for jobs sent with `jobcloud submit` from this machine")
    return _submit_and_report(args, path, record)


def cmd_status(args, path: Path) -> int:
    client = _client(path)
    if args.job and is_array_id(args.job):
        array = client.array(args.job)
        print(json.dumps(array, indent=2) if args.json else _describe_array(array))
        return EXIT_OK
    if args.job:
        job = client.job(args.job)
        print(json.dumps(job, indent=2) if args.json else _describe(job))
        return EXIT_OK
    jobs = client.jobs(limit=args.limit)
    if args.json:
        print(json.dumps({"jobs": jobs}, indent=2))
    else:
        print(_table(jobs) if jobs else "no jobs yet")
    return EXIT_OK


def cmd_logs(args, path: Path) -> int:
    client = _client(path)
    stream = "stderr" if args.stderr else "stdout"
    out = sys.stderr if args.stderr else sys.stdout
    if args.follow:
        return job_exit_code(follow(client, args.job, {stream: out}))
    offset = 0
    while True:  # one answer carries at most ~1 MiB: read until nothing is left
        page = client.logs(args.job, stream, offset)
        if not page["data"]:
            return EXIT_OK
        out.write(page["data"])
        out.flush()
        offset = page["next_offset"]


def cmd_fetch(args, path: Path) -> int:
    client = _client(path)
    dest = Path(args.output or args.job)
    array = is_array_id(args.job)
    with tempfile.TemporaryFile() as tmp:
        size = (client.download_array_outputs if array else client.download_outputs)(args.job, tmp)
        tmp.seek(0)
        names = extract_safely(tmp, dest)
    print(f"{len(names)} file(s), {_human(size)} zipped, into {dest}/")
    if array:
        if "MISSING.txt" in names:
            print(f"warning: some jobs have no outputs: see {dest}/MISSING.txt", file=sys.stderr)
        return EXIT_OK
    # Files the worker left out, a disk quota filled: said, never silent.
    for warning in client.job(args.job).get("warnings") or []:
        print(f"warning: {warning}", file=sys.stderr)
    return EXIT_OK


def cmd_cancel(args, path: Path) -> int:
    if is_array_id(args.job):
        array = _client(path).cancel_array(args.job)
        print(json.dumps(array, indent=2) if args.json else
              f"array {array['id']}: {array['cancelled']} queued job(s) cancelled, "
              f"{array['stopping']} running job(s) told to stop")
        return EXIT_OK
    job = _client(path).cancel(args.job)
    if args.json:
        print(json.dumps(job, indent=2))
    elif job["state"] in FINAL_STATES:
        print(f"job {job['id']} is {job['state']}")
    else:
        print(f"cancel requested for job {job['id']} ({job['state']})")
    return EXIT_OK


def cmd_pin(args, path: Path) -> int:
    job = _client(path).pin(args.job, args.pinned)
    print(f"job {job['id']} pinned: its files are kept until you unpin it" if job["pinned"] else
          f"job {job['id']} unpinned: its files expire with the retention time")
    return EXIT_OK


# ------------------------------------------------------------------ submit

def _submit_and_report(args, path: Path, record: dict) -> int:
    client = _client(path)
    job = submit(client, record)
    cfgmod.record_submission(path, job["id"], record)
    if "counts" in job:   # a job array's answer
        return _report_array(args, client, job)
    if not args.follow:
        print(json.dumps(job, indent=2) if args.json else
              f"submitted job {job['id']} ({job['name']}, {job['state']})")
        return EXIT_OK
    if args.json:
        final = follow(client, job["id"], {"stdout": sys.stderr, "stderr": sys.stderr})
        print(json.dumps(final, indent=2))
    else:
        print(f"submitted job {job['id']} ({job['name']}); following its output", file=sys.stderr)
        final = follow(client, job["id"], {"stdout": sys.stdout, "stderr": sys.stderr})
        print(f"job {final['id']} {_outcome(final)}", file=sys.stderr)
    return job_exit_code(final)


def submit(client: Client, record: dict) -> dict:
    """Send one job described by a submission record (absolute paths + settings).

    Raises:
        ClientError: a file is missing; any API error of the submission.
    """
    script = record["script"]
    if not os.path.isfile(script):
        raise ClientError(f"no such script: {script}")
    s = record["settings"]
    fields = {key: str(s[opt]) for key, opt in (("name", "name"), ("image", "image"),
                                                  ("cpus", "cpus"), ("memory_mb", "memory"),
                                                  ("timeout_s", "timeout"), ("gpus", "gpus"),
                                                  ("disk_mb", "disk"), ("webhook_url", "webhook"),
                                                  ("after", "after"), ("retries", "retries"),
                                                  ("retry_exit_codes", "retry_on"),
                                                  ("retry_backoff_s", "retry_backoff"),
                                                  ("array", "array"))
              if s.get(opt) is not None}
    env = job_env(s.get("env") or [])
    if env:
        fields["env"] = json.dumps(env)
    files = {"script": (os.path.basename(script), script, "text/x-python")}
    params = record.get("params")
    if params:
        if not os.path.isfile(params):
            raise ClientError(f"no such parameters file: {params}")
        files["params"] = (os.path.basename(params), params, "text/plain")
    requirements = record.get("requirements")
    if requirements:
        if not os.path.isfile(requirements):
            raise ClientError(f"no such requirements file: {requirements}")
        files["requirements"] = ("requirements.txt", requirements, "text/plain")
    with _dataset(record["data"]) as data:
        if data:
            files["dataset"] = (data[0], data[1], "application/zip")
        progress = Progress() if sys.stderr.isatty() else None
        body = MultipartBody(fields, files, on_progress=progress)
        try:
            return client.submit(body)
        finally:
            if progress:
                progress.done()


def is_array_id(ref: str) -> bool:
    """Array ids start with "a", job ids with "j" (the proxy's models.new_id)."""
    return ref.startswith("a")


def _report_array(args, client: Client, array: dict) -> int:
    """A submitted array: printed; with --follow, its counts until none is queued or running
    (exit 0 when every job succeeded, else 1)."""
    if not args.follow:
        print(json.dumps(array, indent=2) if args.json else
              f"submitted array {array['id']} ({array['name']}, {array['size']} jobs)")
        return EXIT_OK
    print(f"submitted array {array['id']} ({array['size']} jobs); following", file=sys.stderr)
    shown = None
    while not array["done"]:
        if _counts_line(array) != shown:
            shown = _counts_line(array)
            print(shown, file=sys.stderr)
        time.sleep(POLL_MAX_S)
        array = client.array(array["id"], limit=1)
    print(json.dumps(array, indent=2) if args.json else _counts_line(array))
    return EXIT_OK if array["counts"]["succeeded"] == array["size"] else EXIT_ERROR


def _counts_line(array: dict) -> str:
    return ", ".join(f"{n} {state}" for state, n in array["counts"].items() if n) or "no jobs"


def _describe_array(array: dict) -> str:
    cap = array["max_running"]
    lines = [f"array {array['id']} ({array['name']}): {array['size']} jobs, {array['spec']}"
             + ("" if cap is None else f", at most {cap} running"),
             f"  {_counts_line(array)}{' (done)' if array['done'] else ''}"]
    for j in array["jobs"][:20]:
        code = "" if j["exit_code"] is None else f" (exit {j['exit_code']})"
        lines.append(f"  [{j['index']}] {j['id']} {j['state']}{code}")
    if len(array["jobs"]) > 20:
        lines.append(f"  ... and {array['size'] - 20} more")
    return "\n".join(lines)


def job_env(options: list[str]) -> dict[str, str]:
    """The job's variables from `-e` options: NAME=VALUE, or NAME for the
    value this shell has (so a secret need not be typed on the command line).

    Raises:
        ClientError: NAME alone for a variable this environment lacks.
    """
    env = {}
    for option in options:
        name, sep, value = option.partition("=")
        if not sep:
            if name not in os.environ:
                raise ClientError(f"-e {name}: no variable {name} in your environment "
                                  f"(give -e {name}=VALUE)")
            value = os.environ[name]
        env[name] = value
    return env


class _dataset:
    """The dataset to send as (file name, path): a zip as is, a directory zipped to a temp file."""

    def __init__(self, data: str | None):
        self.data = data
        self.tmp: str | None = None

    def __enter__(self):
        if not self.data:
            return None
        if os.path.isdir(self.data):
            self.tmp = zip_directory(self.data)
            return (os.path.basename(os.path.normpath(self.data)) or "data") + ".zip", self.tmp
        if os.path.isfile(self.data):
            return os.path.basename(self.data), self.data
        raise ClientError(f"no such file or directory: {self.data}")

    def __exit__(self, *exc):
        if self.tmp:
            os.unlink(self.tmp)


def zip_directory(directory: str) -> str:
    """Zip the regular files under `directory` into a temp file; returns its path.

    Symbolic links are left out: the proxy refuses them in datasets, and one
    could point anywhere on this machine.
    """
    fd, tmp = tempfile.mkstemp(prefix="jobcloud-data-", suffix=".zip")
    try:
        with os.fdopen(fd, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED) as zf:
            for root, dirs, files in os.walk(directory):
                dirs.sort()
                for name in sorted(files):
                    full = os.path.join(root, name)
                    if os.path.islink(full) or not os.path.isfile(full):
                        continue
                    zf.write(full, os.path.relpath(full, directory).replace(os.sep, "/"))
    except OSError as e:
        os.unlink(tmp)
        raise ClientError(f"cannot zip {directory}: {e}") from None
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp


class Progress:
    """An upload progress bar on stderr (only used when stderr is a terminal)."""

    def __init__(self):
        self.last = 0.0
        self.shown = False

    def __call__(self, sent: int, total: int) -> None:
        now = time.monotonic()
        if sent < total and now - self.last < PROGRESS_EVERY_S:
            return
        self.last, self.shown = now, True
        width = 30
        filled = width * sent // max(total, 1)
        sys.stderr.write(f"\ruploading [{'#' * filled}{'.' * (width - filled)}] "
                         f"{100 * sent // max(total, 1):3d}% {_human(sent)} / {_human(total)} ")
        sys.stderr.flush()

    def done(self) -> None:
        if self.shown:
            sys.stderr.write("\n")
            sys.stderr.flush()


# ------------------------------------------------------------------ follow

def follow(client: Client, job_id: str, outputs: dict) -> dict:
    """Print the job's streams as they grow, until it is final; returns the final job.

    Args:
        outputs: stream name ("stdout", "stderr") -> the text file to write it to.

    Each answer carries the job's state read before its logs, so an answer in
    a final state with no new data means the stream is complete. Offsets come
    only from next_offset: nothing is printed twice or skipped. A job that is
    requeued (its worker was lost) starts a new attempt whose output starts
    again at offset 0; that is announced on stderr.
    """
    offsets = dict.fromkeys(outputs, 0)
    attempt = None
    delay = POLL_MIN_S
    while True:
        complete, progressed = True, False
        for stream, out in outputs.items():
            page = client.logs(job_id, stream, offsets[stream])
            if attempt is not None and page["attempt"] != attempt:
                # Attempt 0 never ran: its first start is no restart.
                if attempt > 0:
                    print(f"--- job {job_id} was requeued: attempt {page['attempt']}, "
                          "its output starts again ---", file=sys.stderr)
                offsets = dict.fromkeys(outputs, 0)
                attempt, complete, progressed = page["attempt"], False, True
                break
            attempt = page["attempt"]
            if page["data"]:
                out.write(page["data"])
                out.flush()
                progressed = True
            offsets[stream] = page["next_offset"]
            if page["data"] or page["state"] not in FINAL_STATES:
                complete = False
        if complete:
            return client.job(job_id)
        delay = POLL_MIN_S if progressed else min(delay * 1.5, POLL_MAX_S)
        if not progressed:
            time.sleep(delay)


def job_exit_code(job: dict) -> int:
    """The CLI's exit code for a final job (see EPILOG)."""
    state = job["state"]
    if state == "succeeded":
        return EXIT_OK
    if state == "timed_out":
        return EXIT_TIMED_OUT
    if state == "cancelled":
        return EXIT_CANCELLED
    code = job.get("exit_code")
    return code if isinstance(code, int) and 0 < code < 256 else EXIT_ERROR


# ------------------------------------------------------------------ fetch

def extract_safely(archive, dest: Path) -> list[str]:
    """Unpack a zip into `dest` under the one archive rule (jobcloud_archive, the
    rule datasets pass at the proxy and the worker), after checking every entry.

    Returns:
        The names of the files written.

    Raises:
        UnsafeArchive: an entry breaks the rule (nothing is written then), its
            data is damaged, or `dest` holds a link where the archive writes.
    """
    try:
        return jobcloud_archive.extract(archive, dest, FETCH_LIMITS, what="output archive",
                                        replace=True).names
    except jobcloud_archive.ArchiveError as e:
        raise UnsafeArchive(e.message) from None


# ------------------------------------------------------------------ helpers

def _client(path: Path) -> Client:
    cfg = cfgmod.load_config(path)
    return Client(cfg.url, cfg.token)


def _normal_url(url: str) -> str:
    url = url.strip().rstrip("/")
    return url if "://" in url else "http://" + url


def _ask_token() -> str:
    if sys.stdin.isatty():
        return getpass.getpass("API token (from the proxy's API tokens page): ").strip()
    return sys.stdin.readline().strip()


def _outcome(job: dict) -> str:
    text = job["state"]
    code = job.get("exit_code")
    if code is not None and job["state"] != "succeeded":
        text += f" (exit code {code})"
    # A plain non-zero exit's reason is "exit code N" (worker/sandbox.py): said once, above.
    reasons = [r for r in (job.get("failure_reason") or "").split("; ")
               if r and r != f"exit code {code}"]
    if reasons:
        text += ": " + "; ".join(reasons)
    return text


def _describe(job: dict) -> str:
    r = job["resources"]
    lines = [
        ("job", job["id"]), ("name", job["name"]), ("state", _outcome(job)), ("image", job["image"]),
        ("resources", f"{r['cpus']:g} cpus, {r['memory_mb']} MB, {r['timeout_s']} s, {r['gpus']} gpus"
                      + (f", {r['disk_mb']} MB disk" if r.get("disk_mb") else "")),
        ("script", job["script"]["name"]),
        ("dataset", job["dataset"]["name"] if job.get("dataset") else "-"),
        ("attempt", job["attempt"]), ("submitted", job["submitted_at"]),
        ("started", job["started_at"] or "-"), ("finished", job["finished_at"] or "-"),
        ("outputs", f"expired {job['expired_at']}" if job.get("outputs_expired") else
         _human(job["outputs"]["size"]) if job.get("outputs") else "-"),
    ]
    if job.get("requirements"):
        usage = job.get("usage") or {}
        how = ("cached on the worker" if usage.get("env_cached") else
               f"built in {usage['env_build_s']:.1f} s" if usage.get("env_build_s") is not None
               else "not built yet")
        lines.append(("packages", f"requirements.txt ({_human(job['requirements']['size'])}), {how}"))
    if job.get("env_names"):
        # Names only: the values may be secrets (GET /api/v1/jobs/JOB/env has them).
        lines.append(("env", ", ".join(job["env_names"])))
    lines += _waiting_lines(job)
    # The jobs it runs after and before (given where one job is read).
    for key, label in (("parents", "after"), ("children", "before")):
        if job.get(key):
            lines.append((label, ", ".join(f"{p['id']} ({p['state']})" for p in job[key])))
    if job.get("pinned"):
        lines.append(("pinned", "files kept until unpinned"))
    lines += _try_lines(job)
    return "\n".join(f"{k + ':':<11}{v}" for k, v in lines)


# How `status` names a try's outcome (the proxy's retries.py).
TRY_OUTCOMES = {"retried": "retried", "worker_lost": "worker lost, rerun", "running": "running"}


def _try_lines(job: dict) -> list[tuple[str, str]]:
    """The job's retry policy and one line per try (given where one job is read)."""
    policy, tries = job.get("retry_policy"), job.get("tries") or []
    lines = []
    if policy:
        codes = ",".join(map(str, policy["exit_codes"])) if policy["exit_codes"] else "any non-zero"
        used = (f"{policy['used']} of {policy['retries']} used, on exit codes {codes}, "
                f"back-off {policy['backoff_s']} s doubling")
        lines.append(("retries", used))
    if policy or len(tries) > 1:
        for t in tries:
            outcome = TRY_OUTCOMES.get(t["outcome"], t["state"])
            code = f", exit code {t['exit_code']}" if t.get("exit_code") is not None else ""
            when = f"{t['started_at'] or '-'} to {t['ended_at'] or '-'}"
            lines.append((f"try {t['try']}", f"attempt {t['attempt']}: {outcome}{code}, {when}"))
    return lines


def _waiting_lines(job: dict) -> list[tuple[str, str]]:
    """Why a queued job waits and when it may start (the proxy's `waiting`), and why it
    was accepted without a capacity check (`capacity_note`)."""
    lines = []
    waiting = job.get("waiting")
    if waiting:
        lines.append(("waiting", f"{waiting['reason']}: {waiting['detail']}"))
        estimate = waiting.get("estimate")
        if estimate:
            between = f"start between {estimate['earliest']} and {estimate['latest']}"
            lines.append(("estimate", f"{between} (an estimate)"))
    if job.get("capacity_note"):
        lines.append(("capacity", job["capacity_note"]))
    return lines


def _table(jobs: list[dict]) -> str:
    rows = [("ID", "STATE", "EXIT", "NAME", "IMAGE", "SUBMITTED")]
    rows += [(j["id"], j["state"], "" if j["exit_code"] is None else str(j["exit_code"]),
              j["name"], j["image"], j["submitted_at"] or "") for j in jobs]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _human(n: int | None) -> str:
    size = float(n or 0)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


if __name__ == "__main__":
    sys.exit(main())
