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


# ------------------------------------------------------------ the worker protocol

def test_the_worker_answers_document_their_orders(document):
    """Claim, heartbeat and a result with claim_next all carry the worker's orders."""
    schemas = document["components"]["schemas"]
    assert {"jobs", "cancel", "drain"} <= set(schemas["ClaimAnswer"]["required"])
    assert {"cancel", "unknown", "drain"} <= set(schemas["HeartbeatAnswer"]["required"])
    result = schemas["ResultAnswer"]
    assert {"jobs", "cancel", "drain"} <= set(result["properties"])
    assert result["dependentRequired"]["jobs"] == ["cancel", "drain"]
    assert "claim_next" in result["description"]
    answers = {path.rsplit("/", 1)[-1]: ops["post"]["responses"]
               for path, ops in document["paths"].items() if "/worker" in path and "post" in ops}
    assert answers["claim"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ClaimAnswer"}
    assert answers["heartbeat"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/HeartbeatAnswer"}
    assert answers["result"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ResultAnswer"}


def test_the_real_worker_answers_are_the_documented_ones(client, users, document):
    """Each answer of the worker protocol, from the real app, carries every key its
    schema requires and no key it does not describe: a field the proxy adds
    without documenting it fails here."""
    schemas = document["components"]["schemas"]
    alice = users.create("alice")
    r = client.post("/api/v1/workers/register", headers=_bearer(users.enrollment()), json={
        "name": "w1", "cpus": 4, "memory_mb": 4096, "gpus": 0, "slots": 1,
        "images": ["jobcloud/python"]})
    assert r.status_code == 201, r.json
    _conforms(r.json, schemas["RegisterAnswer"], schemas)
    worker = _bearer(r.json["secret"])
    first, second = (_submit(client, alice) for _ in range(2))

    claim = client.post("/api/v1/worker/claim", headers=worker, json={"max_jobs": 1}).json
    _conforms(claim, schemas["ClaimAnswer"], schemas)
    assert [j["id"] for j in claim["jobs"]] == [first]
    attempt = claim["jobs"][0]["attempt"]
    assert client.post(f"/api/v1/jobs/{first}/cancel", headers=alice["headers"]).status_code == 200

    beat = client.post("/api/v1/worker/heartbeat", headers=worker,
                       json={"running": [first, "j-gone"]}).json
    _conforms(beat, schemas["HeartbeatAnswer"], schemas)
    assert beat["cancel"] == [first] and beat["unknown"] == ["j-gone"]

    chained = client.post(f"/api/v1/worker/jobs/{first}/result", headers=worker, json={
        "attempt": attempt, "state": "cancelled", "exit_code": None, "claim_next": 1}).json
    _conforms(chained, schemas["ResultAnswer"], schemas)
    assert [j["id"] for j in chained["jobs"]] == [second]
    assert chained["cancel"] == [] and chained["drain"] is False

    plain = client.post(f"/api/v1/worker/jobs/{second}/result", headers=worker, json={
        "attempt": chained["jobs"][0]["attempt"], "state": "succeeded", "exit_code": 0}).json
    _conforms(plain, schemas["ResultAnswer"], schemas)
    assert not {"jobs", "cancel", "drain"} & set(plain)


def _bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def _submit(client, user) -> str:
    r = client.post("/api/v1/jobs", headers=user["headers"], data={"code": "print(1)\n"},
                    content_type="multipart/form-data")
    assert r.status_code == 201, r.json
    return r.json["id"]


JSON_TYPES = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array",
              dict: "object", type(None): "null"}


def _conforms(answer: dict, schema: dict, schemas: dict) -> None:
    """The keys and JSON types of `answer` match `schema` (the subset this document uses)."""
    properties = schema["properties"]
    assert set(schema.get("required", ())) <= set(answer), ("missing", answer)
    assert set(answer) <= set(properties), ("not documented", set(answer) - set(properties))
    for key, needs in schema.get("dependentRequired", {}).items():
        if key in answer:
            assert set(needs) <= set(answer), (key, "comes without", needs)
    for key, value in answer.items():
        _has_type(value, properties[key], schemas, key)


def _has_type(value, schema: dict, schemas: dict, where: str) -> None:
    if "$ref" in schema:
        target = schemas[schema["$ref"].rsplit("/", 1)[-1]]
        assert isinstance(value, dict), where
        _conforms(value, target, schemas)
        return
    allowed = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
    kind = JSON_TYPES[type(value)]
    assert kind in allowed or (kind == "integer" and "number" in allowed), (where, value, allowed)
    if kind == "array" and "items" in schema:
        for item in value:
            _has_type(item, schema["items"], schemas, where + "[]")
