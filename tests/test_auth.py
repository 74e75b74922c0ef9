"""Accounts and who is asking: salted password hashes, login/logout with the
session cookie, CSRF on every form, API tokens (page, API, CLI), the admin
role and the one-time password that must be changed first.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from proxy import accounts
from tests.conftest import csrf_from, login

BIN = Path(sys.executable).parent


def _stored_user(app, name: str) -> dict:
    with app.extensions["jobcloud"].db.connection() as conn:
        return accounts.get_user_by_name(conn, name)


# ------------------------------------------------------------------- passwords

def test_passwords_are_stored_as_salted_hashes(app, users):
    users.create("alice", password="same-password-1")
    users.create("bob", password="same-password-1")
    alice, bob = _stored_user(app, "alice"), _stored_user(app, "bob")
    assert "same-password-1" not in alice["password_hash"]
    assert alice["password_hash"] != bob["password_hash"]
    with app.extensions["jobcloud"].db.connection() as conn:
        assert accounts.authenticate(conn, "alice", "same-password-1")["id"] == alice["id"]
        assert accounts.authenticate(conn, "alice", "same-password-2") is None
        assert accounts.authenticate(conn, "nobody", "same-password-1") is None


# --------------------------------------------------------------- login, logout

def test_login_sets_a_session_cookie_and_logout_ends_it(client, users):
    users.create("alice")
    assert client.get("/").status_code == 302
    login(client, "alice", "correct-horse-1")
    cookie = client.get_cookie("jobcloud_session")
    assert cookie is not None and cookie.http_only and cookie.same_site == "Lax"
    page = client.get("/")
    assert page.status_code == 200 and "Log out alice" in page.get_data(as_text=True)

    client.post("/logout", data={"csrf_token": csrf_from(client)})
    r = client.get("/")
    assert r.status_code == 302 and r.headers["Location"].startswith("/login")
    # A copy of the cookie taken before logout does not log anyone in.
    client.set_cookie("jobcloud_session", cookie.value)
    assert client.get("/").status_code == 302


def test_wrong_password_is_refused(client, users):
    users.create("alice")
    token = csrf_from(client, "/login")
    for name, password in (("alice", "wrong-password"), ("nobody", "correct-horse-1")):
        r = client.post("/login", data={"username": name, "password": password, "csrf_token": token})
        assert r.status_code == 401 and "Wrong user name or password" in r.get_data(as_text=True)
    assert client.get("/").status_code == 302


@pytest.mark.parametrize("target", [
    "//evil.example", "///evil.example", "https://evil.example/", "/\\evil.example",
    "/\t/evil.example", "/\r\n/evil.example", "javascript:alert(1)", "evil.example",
])
def test_login_never_redirects_off_site(client, users, target):
    users.create("alice")
    token = csrf_from(client, "/login")
    r = client.post("/login", query_string={"next": target},
                    data={"username": "alice", "password": "correct-horse-1", "csrf_token": token})
    assert r.status_code == 302 and r.headers["Location"] == "/"


def test_login_returns_to_a_local_next(client, users):
    users.create("alice")
    r = client.get("/account/tokens")
    assert r.status_code == 302 and r.headers["Location"] == "/login?next=/account/tokens"
    token = csrf_from(client, "/login")
    r = client.post("/login?next=/account/tokens",
                    data={"username": "alice", "password": "correct-horse-1", "csrf_token": token})
    assert r.headers["Location"] == "/account/tokens"


# ------------------------------------------------------------------------ CSRF

def _forms(client, user, job_id):
    """Every state-changing form: (path, form fields without the token, multipart?)."""
    return {
        "login": ("/login", {"username": user["name"], "password": user["password"]}, False),
        "logout": ("/logout", {}, False),
        "password": ("/account/password", {"current_password": user["password"],
                                           "new_password": "another-pass-1",
                                           "confirm_password": "another-pass-1"}, False),
        "create token": ("/account/tokens", {"label": "laptop"}, False),
        "revoke token": ("/account/tokens", {"revoke": _token_ids(client, user)[0]}, False),
        "submit job": ("/jobs", {"code": "print(1)"}, True),
        "cancel job": (f"/jobs/{job_id}/cancel", {}, False),
    }


def _token_ids(client, user) -> list[str]:
    return [t["id"] for t in client.get("/api/v1/tokens", headers=user["headers"]).json["tokens"]
            if t["revoked_at"] is None]


@pytest.mark.parametrize("form", ["login", "logout", "password", "create token", "revoke token",
                                  "submit job", "cancel job"])
def test_every_form_needs_its_csrf_token(client, users, form):
    alice = users.create("alice")
    job = client.post("/api/v1/jobs", headers=alice["headers"], data={"code": "print(1)"},
                      content_type="multipart/form-data").json
    if form != "login":
        login(client, "alice", alice["password"])
    path, data, multipart = _forms(client, alice, job["id"])[form]
    client.get("/login" if form == "login" else "/")  # the session holds a real token
    for sent in ({}, {"csrf_token": ""}, {"csrf_token": "x" * 43}):
        r = client.post(path, data=dict(data, **sent),
                        content_type="multipart/form-data" if multipart else None)
        assert r.status_code == 403, (sent, r.get_data(as_text=True))

    # Nothing happened.
    api = alice["headers"]
    assert len(client.get("/api/v1/jobs", headers=api).json["jobs"]) == 1
    assert client.get(f"/api/v1/jobs/{job['id']}", headers=api).json["state"] == "queued"
    assert len(_token_ids(client, alice)) == 1
    assert client.get("/").status_code == (302 if form == "login" else 200)
    if form == "password":
        with client.application.extensions["jobcloud"].db.connection() as conn:
            assert accounts.authenticate(conn, "alice", alice["password"]) is not None


def test_api_writes_with_a_session_cookie_need_the_csrf_header(client, users):
    alice = users.create("alice")
    login(client, "alice", alice["password"])
    token = csrf_from(client)  # login starts a new session with a new token
    assert client.get("/api/v1/me").json["name"] == "alice"
    r = client.post("/api/v1/tokens", json={"label": "x"})
    assert r.status_code == 403 and r.json["error"] == "csrf_failed"
    r = client.post("/api/v1/tokens", json={"label": "x"}, headers={"X-CSRF-Token": token})
    assert r.status_code == 201


# ------------------------------------------------------------------ API tokens

def test_tokens_page_creates_lists_and_revokes(client, users):
    alice = users.create("alice")
    login(client, "alice", alice["password"])
    page = client.post("/account/tokens", data={"label": "laptop", "csrf_token": csrf_from(client)})
    token = re.search(r'<code id="new-token">([^<]+)</code>', page.get_data(as_text=True)).group(1)
    assert client.get("/api/v1/me", headers={"Authorization": f"Bearer {token}"}).json["name"] == "alice"

    page = client.get("/account/tokens").get_data(as_text=True)
    assert "laptop" in page and token not in page  # shown once only
    laptop = next(t for t in client.get("/api/v1/tokens", headers=alice["headers"]).json["tokens"]
                  if t["label"] == "laptop")
    client.post("/account/tokens", data={"revoke": laptop["id"], "csrf_token": csrf_from(client)})
    assert client.get("/api/v1/me", headers={"Authorization": f"Bearer {token}"}).status_code == 401
    assert client.get("/api/v1/me", headers=alice["headers"]).status_code == 200


def test_api_creates_lists_and_revokes_tokens(client, users):
    alice, bob = users.create("alice"), users.create("bob")
    r = client.post("/api/v1/tokens", headers=alice["headers"], json={"label": "ci"})
    assert r.status_code == 201 and r.json["token"].startswith("jcu_")
    new = r.json
    auth = {"Authorization": f"Bearer {new['token']}"}
    assert client.get("/api/v1/me", headers=auth).json == {"id": alice["id"], "name": "alice",
                                                           "is_admin": False}
    listed = client.get("/api/v1/tokens", headers=alice["headers"]).json["tokens"]
    assert {t["label"] for t in listed} == {"tests", "ci"}
    assert all("token" not in t for t in listed)
    assert client.post("/api/v1/tokens", headers=alice["headers"], json={"label": 5}).status_code == 400

    # Someone else's token cannot be revoked (nor told apart from a missing one).
    assert client.delete(f"/api/v1/tokens/{new['id']}", headers=bob["headers"]).status_code == 404
    assert client.get("/api/v1/me", headers=auth).status_code == 200
    assert client.delete(f"/api/v1/tokens/{new['id']}", headers=alice["headers"]).status_code == 200
    assert client.get("/api/v1/me", headers=auth).status_code == 401
    assert client.delete(f"/api/v1/tokens/{new['id']}", headers=alice["headers"]).status_code == 404


# --------------------------------------------------------- one-time passwords

def test_first_admin_must_change_the_one_time_password_before_anything_else(app, client):
    with app.extensions["jobcloud"].db.connection() as conn:
        password = accounts.ensure_first_admin(conn)
        assert password and accounts.ensure_first_admin(conn) is None  # only once
    login(client, "admin", password)
    for path in ("/", "/account/tokens", "/jobs/j1", "/job-status/admin"):
        r = client.get(path)
        assert r.status_code == 302 and r.headers["Location"] == "/account/password", path
    for path in ("/api/v1/me", "/api/v1/jobs", "/api/v1/admin/users"):
        r = client.get(path)
        assert r.status_code == 403 and r.json["error"] == "password_change_required", path
    r = client.get("/job-status/admin", headers={"Accept": "application/json"})
    assert r.status_code == 403 and r.json["error"] == "password_change_required"
    assert "one-time password" in client.get("/account/password").get_data(as_text=True)

    token = csrf_from(client, "/account/password")
    for current, new, again in ((password + "x", "my-own-pass-1", "my-own-pass-1"),
                                (password, "my-own-pass-1", "my-own-pass-2"),
                                (password, "short", "short")):
        r = client.post("/account/password", data={"current_password": current, "new_password": new,
                                                   "confirm_password": again, "csrf_token": token})
        assert r.status_code == 400
    assert client.get("/").status_code == 302

    r = client.post("/account/password", data={"current_password": password,
                                               "new_password": "my-own-pass-1",
                                               "confirm_password": "my-own-pass-1",
                                               "csrf_token": token})
    assert r.status_code == 302 and r.headers["Location"] == "/"
    assert client.get("/").status_code == 200
    assert client.get("/api/v1/admin/users").status_code == 200
    assert _stored_user(app, "admin")["must_change_password"] == 0
    with app.extensions["jobcloud"].db.connection() as conn:
        assert accounts.authenticate(conn, "admin", password) is None


def test_changing_the_password_ends_other_sessions(app, users):
    alice = users.create("alice")
    laptop, phone = app.test_client(), app.test_client()
    login(laptop, "alice", alice["password"])
    login(phone, "alice", alice["password"])
    laptop.post("/account/password", data={"current_password": alice["password"],
                                           "new_password": "my-own-pass-1",
                                           "confirm_password": "my-own-pass-1",
                                           "csrf_token": csrf_from(laptop)})
    assert laptop.get("/").status_code == 200
    assert phone.get("/").status_code == 302


# -------------------------------------------------------------------- admins

def test_admin_creates_users_with_one_time_passwords(app, client, users):
    admin, alice = users.create("root", admin=True), users.create("alice")
    assert client.get("/api/v1/me", headers=admin["headers"]).json["is_admin"] is True
    assert client.post("/api/v1/admin/users", headers=alice["headers"],
                       json={"name": "eve"}).status_code == 403

    r = client.post("/api/v1/admin/users", headers=admin["headers"], json={"name": "dave"})
    assert r.status_code == 201 and r.json["is_admin"] is False
    assert client.post("/api/v1/admin/users", headers=admin["headers"],
                       json={"name": "dave"}).status_code == 409
    assert client.post("/api/v1/admin/users", headers=admin["headers"],
                       json={"name": "Bad Name"}).status_code == 400
    login(client, "dave", r.json["one_time_password"])
    assert client.get("/").headers["Location"] == "/account/password"


# ------------------------------------------------------------------------ CLI

def _cli(data_dir: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, JOBCLOUD_DATA_DIR=str(data_dir), JOBCLOUD_LOG_LEVEL="WARNING")
    env.pop("JOBCLOUD_CONFIG", None)
    env.pop("JOBCLOUD_DATABASE_URL", None)
    return subprocess.run([str(BIN / "jobcloud"), *args], env=env, capture_output=True, text=True,
                          timeout=60)


def test_cli_adds_users_and_creates_tokens_the_app_accepts(app, client):
    data_dir = Path(app.extensions["jobcloud"].config.data_dir)
    out = _cli(data_dir, "user", "add", "bob", "--admin")
    assert out.returncode == 0, out.stderr
    password = re.search(r"one-time password: (\S+)", out.stdout).group(1)
    assert _cli(data_dir, "user", "add", "carl").returncode == 0

    out = _cli(data_dir, "token", "create", "--user", "bob")
    assert out.returncode == 0, out.stderr
    token = out.stdout.strip()
    me = client.get("/api/v1/me", headers={"Authorization": f"Bearer {token}"})
    assert me.status_code == 200 and me.json["name"] == "bob" and me.json["is_admin"] is True
    users = client.get("/api/v1/admin/users", headers={"Authorization": f"Bearer {token}"}).json
    assert {(u["name"], u["is_admin"]) for u in users["users"]} == {("bob", True), ("carl", False)}

    login(client, "bob", password)
    assert client.get("/").headers["Location"] == "/account/password"

    out = _cli(data_dir, "user", "add", "bob")
    assert out.returncode == 1 and "already exists" in out.stderr
    out = _cli(data_dir, "token", "create", "--user", "nobody")
    assert out.returncode == 1 and "nobody" in out.stderr
