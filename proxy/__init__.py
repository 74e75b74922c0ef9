"""jobcloud proxy: the Flask application that owns jobs, users and workers.

`create_app()` is the application factory (gunicorn: ``proxy:create_app()``).
It reads the configuration once, opens the store, applies migrations and
wires the blueprints; nothing is created at import time.
"""
from __future__ import annotations

import logging
import secrets
import sys
import time

from flask import Flask, jsonify, make_response, render_template, request
from werkzeug.exceptions import HTTPException

from . import retention, webhooks
from .appstate import AppState
from .blobs import human_size, open_blob_store
from .config import Config, load_config
from .db import Database, close_conn, open_database
from .errors import ProxyError
from .models import iso
from .wakeups import Listener

log = logging.getLogger("proxy")


def create_app(config: Config | None = None) -> Flask:
    """Build the proxy application.

    Args:
        config: a validated Config; read from the environment when None.
    """
    config = config or load_config()
    _setup_logging(config.log_level)
    db = open_database(config.resolved_database_url)
    db.migrate()
    blobs = open_blob_store(config)

    app = Flask(__name__)
    app.extensions["jobcloud"] = AppState(config=config, db=db, blobs=blobs,
                                          wakeups=Listener(db, poll_s=config.wakeup_poll_s))
    app.config.update(
        SECRET_KEY=_secret_key(db),
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_NAME="jobcloud_session",
        # Form bodies are parsed by our streaming parser (uploads.py); these
        # bound werkzeug's own parser for the small login/token forms.
        MAX_FORM_MEMORY_SIZE=64 * 1024,
        MAX_FORM_PARTS=32,
    )
    from . import admin_api, api, auth, dashboard, live, openapi, ops, web, worker_api

    auth.init_app(app)
    app.jinja_env.filters["timestamp"] = _timestamp
    # UTC ISO 8601, for <time datetime>: static/live.js shows it in the browser's time zone.
    app.jinja_env.filters["iso"] = iso
    app.jinja_env.filters["filesize"] = human_size
    for module in (web, api, worker_api, admin_api, ops, openapi, live, dashboard):
        app.register_blueprint(module.bp)
    if config.webhook_allowed_hosts:
        # One delivery thread per process (gunicorn forks before create_app);
        # claims are atomic in the database, so processes never send twice.
        app.extensions["jobcloud_webhooks"] = webhooks.Deliverer.from_config(db, config).start()
    # One retention sweeper per process, like the webhook sender: the sweep is
    # safe with any number of them (retention.py).
    app.extensions["jobcloud_retention"] = retention.Sweeper.from_config(db, blobs, config).start()
    app.teardown_appcontext(close_conn)
    _register_error_handlers(app)
    app.after_request(_security_headers)
    return app


def begin_shutdown(app: Flask) -> None:
    """This process's graceful shutdown has begun (gunicorn_conf.py calls this
    from the worker's SIGTERM handler): end live streams and claim long-polls at
    their next look, since gunicorn waits for open requests up to its
    graceful_timeout (clients reconnect to another process and resume), and stop
    the webhook sender from taking new deliveries and the retention sweeper
    after its batch. Only sets flags: safe in a signal handler."""
    state = app.extensions["jobcloud"]
    state.stopping.set()
    state.wakeups.wake_all()
    _stop_background(app, timeout=0)


def close_app(app: Flask) -> None:
    """Stop this app's background threads, then close its store.

    For code that builds apps inside a longer-lived process (the tests make
    hundreds): a webhook sender or sweeper left running would use the store after
    it was closed, opening it again. Joins the threads: a webhook attempt in
    flight ends within webhook_timeout_s, a sweep after its batch.
    """
    state = app.extensions["jobcloud"]
    state.stopping.set()
    _stop_background(app, timeout=None)
    state.wakeups.close()
    state.db.close()


def _stop_background(app: Flask, timeout: float | None) -> None:
    """Stop the app's webhook sender (when webhooks are on) and retention sweeper:
    timeout 0 only sets their flags (signal handlers), None waits until they end."""
    for name in ("jobcloud_webhooks", "jobcloud_retention"):
        worker = app.extensions.get(name)
        if worker is not None:
            worker.stop(timeout=timeout)


def _secret_key(db: Database) -> str:
    # Shared by every process and instance through the database, so a session
    # cookie made by one gunicorn worker is valid in all of them.
    with db.connection() as conn:
        with conn.transaction():
            conn.execute("INSERT INTO settings (key, value) VALUES ('secret_key', ?)"
                         " ON CONFLICT DO NOTHING", (secrets.token_hex(32),))
        return conn.query_one("SELECT value FROM settings WHERE key = 'secret_key'")["value"]


def _wants_json() -> bool:
    if request.path.startswith("/api/") or request.path in ("/healthz", "/metrics"):
        return True
    best = request.accept_mimetypes.best_match(["text/html", "application/json"])
    return best == "application/json"


def _register_error_handlers(app: Flask) -> None:
    @app.errorhandler(ProxyError)
    def proxy_error(e: ProxyError):
        if e.status >= 500:
            log.error("%s: %s", e.code, e.detail)
        response = _error_response(e.status, e.code, e.detail)
        response.headers.update(e.headers)
        return response

    @app.errorhandler(HTTPException)
    def http_error(e: HTTPException):
        code = (e.name or "error").lower().replace(" ", "_")
        response = _error_response(e.code or 500, code, e.description or e.name)
        # Keep what the exception says about the answer, e.g. Allow on a 405.
        for name, value in e.get_headers():
            if name.lower() != "content-type":
                response.headers[name] = value
        return response

    @app.errorhandler(Exception)
    def unexpected(e: Exception):
        log.exception("unhandled error on %s %s", request.method, request.path)
        return _error_response(500, "internal_error", "something went wrong on our side")


def _error_response(status: int, code: str, detail: str):
    if _wants_json():
        body = jsonify({"error": code, "detail": detail})
    else:
        body = render_template("error.html", status=status, code=code, detail=detail)
    response = make_response(body)
    response.status_code = status
    return response


def _security_headers(response):
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("X-Frame-Options", "DENY")
    response.headers.setdefault("Referrer-Policy", "same-origin")
    response.headers.setdefault(
        "Content-Security-Policy",
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        "frame-ancestors 'none'; form-action 'self'")
    return response


def _timestamp(ts) -> str:
    if ts is None:
        return ""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _setup_logging(level: str) -> None:
    root = logging.getLogger()
    if not any(getattr(h, "_jobcloud", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler._jobcloud = True
        root.addHandler(handler)
    root.setLevel(level.upper())
