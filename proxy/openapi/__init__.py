"""The OpenAPI 3 document of the user, admin and worker APIs: the contract
between the proxy and its clients, served at /api/v1/openapi.json.
tests/test_openapi.py checks that every route the app serves is described
here and nothing else is.

Built in Python from a few builders (builders.py) rather than kept as a static
JSON file: every operation's error answers and every page's redirect and CSRF
answers are written once, not forty times, and the reasons behind a shape stay
beside it as comments. The parts are split by who calls the routes: the
people's API (api_paths.py), the worker protocol (worker_paths.py), the
browser pages (page_paths.py), and the shapes they share (schemas.py).
"""
from __future__ import annotations

from flask import Blueprint, jsonify

from .api_paths import api_paths
from .builders import MALFORMED
from .page_paths import page_paths
from .schemas import SCHEMAS
from .worker_paths import worker_paths

bp = Blueprint("openapi", __name__)

SECURITY_SCHEMES = {
    "userToken": {"type": "http", "scheme": "bearer", "description": "API token (jcu_...)"},
    "session": {"type": "apiKey", "in": "cookie", "name": "jobcloud_session"},
    "workerSecret": {"type": "http", "scheme": "bearer", "description": "worker secret (jcw_...)"},
    "enrollmentToken": {"type": "http", "scheme": "bearer",
                        "description": "enrollment token (jce_...)"},
    "metricsToken": {"type": "http", "scheme": "bearer",
                     "description": "the proxy's metrics_token setting (/metrics only)"},
}


def build_document() -> dict:
    """The whole document, built fresh (it is small, and nothing may mutate a shared one).

    Returns:
        The OpenAPI 3.1 document as a JSON-ready dict.
    """
    paths = {**api_paths(), **worker_paths(), **page_paths()}
    # Any request may be malformed below the routes (a header gunicorn cannot
    # parse): gunicorn answers it 400 with the same JSON error (gunicorn_conf),
    # so every operation documents a 400, its own where it has one.
    for operations in paths.values():
        for operation in operations.values():
            operation["responses"].setdefault("400", MALFORMED)
    return {
        "openapi": "3.1.0",
        "info": {"title": "jobcloud proxy API", "version": "1"},
        "paths": paths,
        "components": {"schemas": SCHEMAS, "securitySchemes": SECURITY_SCHEMES},
    }


@bp.route("/api/v1/openapi.json", methods=["GET"])
def document():
    return jsonify(build_document())
