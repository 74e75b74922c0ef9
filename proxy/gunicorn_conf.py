"""gunicorn settings for the proxy (`gunicorn -c python:proxy.gunicorn_conf 'proxy:create_app()'`).

gevent workers: a claim long-polls for up to claim_wait_max_s and a live page
holds its stream open; as greenlets, thousands of them wait in one process
without an OS thread each, and ordinary requests keep flowing beside them
(docs/ARCHITECTURE.md says why gevent). No state that matters lives in a
process, so any count works.

Slow clients: the head of each request must arrive within `keepalive` seconds
(gunicorn's gevent worker reads it under a gevent.Timeout of that length), so a
client sending its headers a byte at a time is cut off; a waiting connection
costs a greenlet, and at most worker_connections are served per process.

Bind, processes, connections and logs are the proxy's validated configuration
(proxy.config: JOBCLOUD_* variables and the JOBCLOUD_CONFIG file), read once
when gunicorn loads this file, which is the server's entry point: the
connection count the app caps its live streams by is the one gunicorn runs, by
construction, and a mistyped value stops the start with one line naming the
setting instead of a traceback. gunicorn's own flags (--bind, --workers) still
win over what is read here, as they win over any config file.
"""
import json
import signal

from gunicorn import util as _gunicorn_util

from jobcloud_datadir import PRIVATE_UMASK
from proxy import datadir
from proxy.config import load_config
from proxy.errors import ConfigError


def _settings():
    try:
        return load_config()
    except ConfigError as e:
        # SystemExit, not the ConfigError: gunicorn prints a traceback for an
        # exception raised while it imports this file, and only the message matters.
        raise SystemExit(f"jobcloud-proxy: invalid configuration: {e.detail}") from None


_ERROR_CODES = {400: "bad_request", 403: "forbidden", 414: "uri_too_long",
                431: "headers_too_large", 417: "expectation_failed",
                500: "internal_error", 501: "not_implemented"}


def _write_json_error(sock, status_int, reason, mesg):
    """gunicorn's answer to a request it cannot parse (a malformed header or
    request line, limits), as the API's `{"error", "detail"}` JSON instead of
    its HTML page: a client sees one error shape whether the app or the HTTP
    parser refused it. Installed over gunicorn.util.write_error, the one
    function its workers answer such requests with (workers/base.py)."""
    body = json.dumps({"error": _ERROR_CODES.get(status_int, "bad_request"),
                       "detail": mesg or reason}).encode()
    head = (f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
    _gunicorn_util.write_nonblock(sock, head.encode("latin1") + body)


_gunicorn_util.write_error = _write_json_error
_cfg = _settings()
bind = _cfg.bind
workers = _cfg.resolved_gunicorn_workers
worker_class = "gevent"
worker_connections = _cfg.gunicorn_connections
# Long enough for a 2 GiB upload on a slow link and a 30 s long-poll.
timeout = 600
# Above webhook_timeout_s (at most 20, config.py), so a shutdown waits for a POST in flight.
graceful_timeout = 30
# Also the limit on how long the head of a request may take to arrive (slowloris).
keepalive = 5
accesslog = _cfg.access_log
# Workers' heartbeats, claims and log posts stay out of it unless asked for (proxy/accesslog.py).
if not _cfg.access_log_worker_protocol:
    logger_class = "proxy.accesslog.WithoutWorkerProtocol"
errorlog = "-"
# Uploads are streamed by the app; do not let gunicorn cap request lines below defaults.
limit_request_line = 8190
# gunicorn applies its own umask only to the sockets and files it makes (and
# when it daemonizes); the processes' umask is set by on_starting below.
umask = PRIVATE_UMASK
control_socket_disable = not _cfg.gunicorn_control_socket
if _cfg.gunicorn_control_socket:
    control_socket = _cfg.gunicorn_control_socket
# Trust no client's forwarding headers (X-Forwarded-*, SCRIPT_NAME) by default,
# loopback included (see forwarded_allow_ips in config.py).
forwarded_allow_ips = _cfg.forwarded_allow_ips


def on_starting(server):
    """Make the data directory private (proxy.datadir) before anything opens it.

    In the master, before any worker forks: the umask it sets is inherited by
    every process, and a data directory owned by another user stops the start
    with one line (in a worker's create_app it would be gunicorn's "worker
    failed to boot" and a traceback). Not when this file is imported:
    --print-config and --check-config load it too, and must change nothing.
    """
    try:
        datadir.secure(_cfg.data_dir)
    except ConfigError as e:
        raise SystemExit(f"jobcloud-proxy: {e.detail}") from None


def worker_exit(server, worker):
    """Let the process's webhook delivery finish the POST it has in flight before exiting.

    The delivery thread is a daemon: without this, a graceful shutdown would
    end the process in the middle of a POST, and the notice would be sent
    again once its claim expired. It stopped taking new deliveries when the
    shutdown began (post_worker_init's handler), and an attempt ends within
    webhook_timeout_s, which config.py keeps below graceful_timeout.
    """
    deliverer = _deliverer(worker)
    if deliverer is not None:
        deliverer.stop()


def _deliverer(worker):
    return getattr(getattr(worker, "wsgi", None), "extensions", {}).get("jobcloud_webhooks")


def post_worker_init(worker):
    """As soon as a process's graceful shutdown starts: end its live streams and
    claim long-polls, and stop its webhook sender from taking new deliveries
    (proxy.begin_shutdown).

    A worker answers SIGTERM by waiting up to graceful_timeout for its open
    requests, and gunicorn has no hook at that moment (worker_exit runs after
    the wait): so its handler is wrapped here. Streams end at their next poll
    instead of holding the restart, and the sender only finishes the attempt in
    flight, so worker_exit's wait for it fits in what is left of graceful_timeout.
    """
    graceful_exit = worker.handle_exit

    def handle_exit(sig, frame):
        _begin_shutdown(worker)
        graceful_exit(sig, frame)

    signal.signal(signal.SIGTERM, handle_exit)
    # signal.signal undoes gunicorn's siginterrupt(SIGTERM, False): restore it, so
    # a SIGTERM does not interrupt the worker's system calls.
    signal.siginterrupt(signal.SIGTERM, False)


def worker_int(worker):
    """SIGINT/SIGQUIT: the process exits at once, but would still join its
    request threads, so open streams and long-polls must end now too."""
    _begin_shutdown(worker)


def _begin_shutdown(worker):
    from proxy import begin_shutdown  # the app is loaded by now: import at call time

    app = getattr(worker, "wsgi", None)
    if app is not None and hasattr(app, "extensions"):
        begin_shutdown(app)
