"""Who is asking: session cookies, API tokens, worker secrets, CSRF, and the
login / logout / password / token pages.

Browsers authenticate with a signed session cookie (Flask's session, whose key
lives in the database so every process and instance shares it) and every form
carries a CSRF token bound to the session. The API and CLI use bearer tokens;
workers use their own secrets. The three never mix.
"""
from __future__ import annotations

import functools
import hmac
import secrets

from flask import Blueprint, flash, g, redirect, render_template, request, session, url_for

from . import accounts
from .db import get_conn
from .errors import Forbidden, TooManyAttempts, Unauthorized

bp = Blueprint("auth", __name__)


# ------------------------------------------------------------------ resolution

def load_user() -> dict | None:
    """Resolve the caller from a bearer token or the session cookie (cached on g)."""
    if "user" in g:
        return g.user
    g.user, g.auth = None, None
    header = request.headers.get("Authorization", "")
    if header:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("use 'Authorization: Bearer <API token>'", code="bad_auth_header")
        user = accounts.user_for_token(get_conn(), token.strip())
        if user is None:
            raise Unauthorized("the API token is not valid (unknown, revoked, or not a user token)",
                               code="invalid_token")
        g.user, g.auth = user, "token"
        return user
    uid = session.get("uid")
    if uid:
        user = accounts.get_user(get_conn(), uid)
        if user and user["session_epoch"] == session.get("epoch"):
            g.user, g.auth = user, "session"
        else:
            session.clear()
    return g.user


def bearer_token() -> str:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("this endpoint needs 'Authorization: Bearer <token>'", code="missing_token")
    return token.strip()


def api_user() -> dict:
    """The authenticated user for an API call; cookie callers must send the CSRF header to write."""
    user = load_user()
    if user is None:
        raise Unauthorized("log in or send 'Authorization: Bearer <API token>'", code="unauthorized")
    if g.auth == "session" and request.method not in ("GET", "HEAD", "OPTIONS"):
        check_csrf(request.headers.get("X-CSRF-Token"))
    if password_change_pending(user):
        raise Forbidden("change your one-time password first", code="password_change_required")
    return user


def password_change_pending(user: dict) -> bool:
    """True for a browser session still on a one-time password: it may only change it."""
    return bool(user["must_change_password"]) and g.auth == "session"


def api_admin() -> dict:
    user = api_user()
    if not user["is_admin"]:
        raise Forbidden("this needs an admin account", code="admin_only")
    return user


def login_required(view):
    """For HTML pages: redirect to the login page when nobody is logged in."""
    @functools.wraps(view)
    def wrapped(**kwargs):
        user = load_user()
        if user is None:
            return redirect(url_for("auth.login", next=request.path))
        if password_change_pending(user) and request.endpoint != "auth.password":
            flash("Choose your own password before going on.")
            return redirect(url_for("auth.password"))
        return view(**kwargs)
    return wrapped


# ------------------------------------------------------------------------- CSRF

def csrf_token() -> str:
    if "csrf" not in session:
        session["csrf"] = secrets.token_urlsafe(32)
    return session["csrf"]


def check_csrf(sent: str | None) -> None:
    expected = session.get("csrf")
    # Compared as bytes: compare_digest refuses str with non-ASCII characters
    # (TypeError, a 500) and a forged form can send any.
    if not expected or not sent or not hmac.compare_digest(str(expected).encode(), str(sent).encode()):
        raise Forbidden("the form's CSRF token is missing or wrong; reload the page and try again",
                        code="csrf_failed")


# ------------------------------------------------------------------------ pages

@bp.route("/login", methods=["GET", "POST"])
def login():
    error = None
    if request.method == "POST":
        check_csrf(request.form.get("csrf_token"))
        try:
            user = accounts.authenticate(get_conn(), request.form.get("username", ""),
                                         request.form.get("password", ""),
                                         address=request.remote_addr)
        except TooManyAttempts as e:
            return _throttled("login.html", e)
        if user is None:
            error = "Wrong user name or password."
        else:
            session.clear()
            session["uid"], session["epoch"] = user["id"], user["session_epoch"]
            session["csrf"] = secrets.token_urlsafe(32)
            return redirect(_local_path(request.args.get("next", "")) or url_for("web.index"))
    return render_template("login.html", error=error), (401 if error else 200)


def _throttled(template: str, e: TooManyAttempts):
    """The form's page again, saying how long to wait: 429 with Retry-After."""
    return render_template(template, error=e.detail), e.status, e.headers


def _local_path(target: str) -> str | None:
    """`target` when it is a path on this site, else None: no open redirect through ?next=.

    Browsers drop tabs and newlines inside URLs and read '\\' as '/', so
    '/<TAB>/evil.example' leaves the site like '//evil.example' does; any
    control character, space or backslash is refused.
    """
    if not target.startswith("/") or target.startswith("//"):
        return None
    if any(c == "\\" or ord(c) <= 0x20 or ord(c) == 0x7F for c in target):
        return None
    return target


@bp.route("/logout", methods=["POST"])
def logout():
    check_csrf(request.form.get("csrf_token"))
    user = load_user()
    if user is not None and g.auth == "session":
        # The session is a signed cookie: clearing it here does not stop a copy
        # of it from working. A new epoch does (for all of this user's sessions).
        accounts.end_sessions(get_conn(), user["id"])
    session.clear()
    return redirect(url_for("auth.login"))


@bp.route("/account/password", methods=["GET", "POST"])
@login_required
def password():
    error = None
    if request.method == "POST":
        check_csrf(request.form.get("csrf_token"))
        conn = get_conn()
        new = request.form.get("new_password", "")
        try:
            current = accounts.authenticate(conn, g.user["name"],
                                            request.form.get("current_password", ""),
                                            address=request.remote_addr)
        except TooManyAttempts as e:
            return _throttled("password.html", e)
        if current is None:
            error = "Your current password is wrong."
        elif new != request.form.get("confirm_password", ""):
            error = "The two new passwords differ."
        elif len(new) < accounts.MIN_PASSWORD:
            error = f"Passwords must have at least {accounts.MIN_PASSWORD} characters."
        else:
            accounts.set_password(conn, g.user["id"], new)
            user = accounts.get_user(conn, g.user["id"])
            session["epoch"] = user["session_epoch"]
            flash("Password changed.")
            return redirect(url_for("web.index"))
    return render_template("password.html", error=error), (400 if error else 200)


@bp.route("/account/tokens", methods=["GET", "POST"])
@login_required
def tokens():
    conn = get_conn()
    new_token = None
    if request.method == "POST":
        check_csrf(request.form.get("csrf_token"))
        if request.form.get("revoke"):
            accounts.revoke_token(conn, g.user["id"], request.form["revoke"])
            flash("Token revoked.")
        else:
            _, new_token = accounts.create_token(conn, g.user["id"], request.form.get("label", ""))
    return render_template("tokens.html", tokens=accounts.list_tokens(conn, g.user["id"]),
                           new_token=new_token)


def init_app(app):
    app.register_blueprint(bp)
    app.jinja_env.globals["csrf_token"] = csrf_token

    @app.context_processor
    def inject_user():
        try:
            return {"current_user": load_user()}
        except Unauthorized:
            return {"current_user": None}
