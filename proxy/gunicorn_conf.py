"""gunicorn settings for the proxy (`gunicorn -c python:proxy.gunicorn_conf 'proxy:create_app()'`).

gthread workers: a claim may long-poll for up to claim_wait_max_s, and a sync
worker would be blocked for that whole time; threads keep the other requests
flowing. No state that matters lives in a process, so any count works.
"""
import multiprocessing
import os
import signal

bind = os.environ.get("JOBCLOUD_BIND", "127.0.0.1:3000")
workers = int(os.environ.get("JOBCLOUD_GUNICORN_WORKERS", max(4, multiprocessing.cpu_count() * 2)))
worker_class = "gthread"
threads = int(os.environ.get("JOBCLOUD_GUNICORN_THREADS", "8"))
# Long enough for a 2 GiB upload on a slow link and a 30 s long-poll.
timeout = 600
graceful_timeout = 30
keepalive = 5
accesslog = os.environ.get("JOBCLOUD_ACCESS_LOG", "-")
errorlog = "-"
# Uploads are streamed by the app; do not let gunicorn cap request lines below defaults.
limit_request_line = 8190
# gunicorn >= 25.1 opens a control socket at one fixed per-user path, which
# several proxies on one host (and the tests) would fight over: off unless a
# path is given.
_control = os.environ.get("JOBCLOUD_GUNICORN_CONTROL_SOCKET", "")
control_socket_disable = not _control
if _control:
    control_socket = _control
# Trust no client's forwarding headers (X-Forwarded-*, SCRIPT_NAME) by default,
# loopback included: a front proxy on this host must be named here explicitly.
forwarded_allow_ips = os.environ.get("JOBCLOUD_FORWARDED_ALLOW_IPS", "")


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
