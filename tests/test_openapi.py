"""The OpenAPI document is the contract: it describes exactly the routes the app
serves, and the API answers its errors as JSON {"error", "detail"}.
"""
import re

import pytest

IGNORED_METHODS = {"HEAD", "OPTIONS"}  # added by Flask to every route


def _served(app) -> set[tuple[str, str]]:
    routes = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule.rule)
        routes |= {(path, m.lower()) for m in rule.methods - IGNORED_METHODS}
    return routes


@pytest.fixture
def document(client):
    r = client.get("/api/v1/openapi.json")
    assert r.status_code == 200 and r.mimetype == "application/json"
    return r.json


def test_document_is_openapi_3(document):
    assert document["openapi"].startswith("3.")
    assert document["info"]["title"] and document["info"]["version"]
    schemes = document["components"]["securitySchemes"]
    for path, operations in document["paths"].items():
        assert path.startswith("/")
        for method, op in operations.items():
            assert method in {"get", "post", "put", "patch", "delete"}, (path, method)
            assert op["responses"], (path, method)
            for requirement in op.get("security", []):
                assert set(requirement) <= set(schemes), (path, method)
            declared = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
            assert declared == set(re.findall(r"{(\w+)}", path)), (path, method)


def test_document_lists_exactly_the_served_routes(app, document):
    documented = {(path, method) for path, ops in document["paths"].items() for method in ops}
    served = _served(app)
    assert served - documented == set(), "served but not documented"
    assert documented - served == set(), "documented but not served"


def test_every_schema_reference_resolves(document):
    text = str(document)
    for name in re.findall(r"#/components/schemas/(\w+)", text):
        assert name in document["components"]["schemas"], name


@pytest.mark.parametrize("method, path, status", [
    ("GET", "/api/v1/no-such-thing", 404),
    ("GET", "/api/v1/jobs/j1/nothing", 404),
    ("POST", "/api/v1/worker/nothing", 404),
    ("PUT", "/api/v1/jobs", 405),
    ("DELETE", "/api/v1/jobs/j1", 405),
    ("GET", "/api/v1/worker/claim", 405),
    ("POST", "/api/v1/openapi.json", 405),
])
def test_api_errors_are_json(client, users, method, path, status):
    alice = users.create("alice")
    for headers in ({}, alice["headers"], {"Accept": "text/html"}):
        r = client.open(path, method=method, headers=headers)
        assert r.status_code == status, (headers, r.status_code)
        assert r.mimetype == "application/json", headers
        assert set(r.json) == {"error", "detail"} and r.json["error"] and r.json["detail"]


def test_malformed_api_input_is_a_json_400_not_a_500(client, users):
    alice = users.create("alice")
    for method, path, kwargs in [
        ("POST", "/api/v1/jobs", {"data": "not a form", "content_type": "text/plain"}),
        ("POST", "/api/v1/jobs", {"data": b"--x\r\ngarbage",
                                  "content_type": "multipart/form-data; boundary=x"}),
        ("POST", "/api/v1/tokens", {"data": "[1, 2]", "content_type": "application/json"}),
        ("GET", "/api/v1/jobs?limit=many", {}),
        ("GET", "/api/v1/jobs/" + "j" * 100, {}),
    ]:
        r = client.open(path, method=method, headers=alice["headers"], **kwargs)
        assert 400 <= r.status_code < 500, (path, kwargs, r.status_code)
        assert set(r.json) == {"error", "detail"}, (path, kwargs)
