"""Command lines: `jobcloud-proxy` (serve, init, migrate, reap, sweep) and the admin side of
`jobcloud` (users, API tokens, worker enrollment tokens; also `jobcloud-proxy user ...`)
run on the proxy host against its store.

They find the store as `serve` does (load_config: JOBCLOUD_* variables, the
JOBCLOUD_CONFIG file, else ./var), and only `serve`, `init` and `migrate`
create a new one: an admin command run in another directory, or without the
proxy's settings, names where it looked instead of making an empty database
there and answering "no user 'admin'".
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
from pathlib import Path
from urllib.parse import urlsplit

from . import accounts, datadir, limits, retention, usage, workers
from .blobs import human_size, open_blob_store
from .config import load_config, store_origin
from .db import open_database
from .errors import ProxyError, StoreNotFound

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2
# The admin command groups (jobcloud_main), under `jobcloud` and `jobcloud-proxy` alike.
ADMIN_GROUPS = ("user", "token", "enroll", "prices")
# The commands that may create a new database where the settings point.
CREATING = ("serve", "init", "migrate")


def proxy_main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ADMIN_GROUPS:
        return jobcloud_main(argv, prog="jobcloud-proxy")
    parser = argparse.ArgumentParser(
        prog="jobcloud-proxy", description="The jobcloud proxy.",
        epilog="admin commands: jobcloud-proxy {user,token,enroll,prices} ... "
               "(as `jobcloud user ...`; see jobcloud --help)")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="migrate, create the first admin, run gunicorn")
    serve.add_argument("--bind", help="HOST:PORT (default from config: 127.0.0.1:3000)")
    serve.add_argument("--workers", type=int, help="gunicorn worker processes")
    init = sub.add_parser("init", help="create or migrate the database and the first admin; "
                                       "print its one-time password (nothing if users exist)")
    init.add_argument("--bind", help="HOST:PORT the proxy will serve on (for the login URL)")
    sub.add_parser("migrate", help="create or migrate the database")
    sub.add_parser("reap", help="requeue jobs of lost workers now")
    sub.add_parser("sweep", help="expire finished jobs' files past the retention time and "
                                 "delete the files no job needs, now (one pass)")
    args = parser.parse_args(argv)
    try:
        overrides = {"bind": args.bind} if getattr(args, "bind", None) else {}
        cfg = load_config(overrides=overrides)
        db = _open_store(cfg, create=args.command in CREATING)
        if args.command == "migrate":
            print("schema is current")
        elif args.command == "init":
            with db.connection() as conn:
                password = accounts.ensure_first_admin(conn)
            if password:
                print(_first_start_block(cfg, password))
        elif args.command == "reap":
            with db.connection() as conn, conn.transaction():
                n = workers.reap(conn, lease_timeout_s=cfg.lease_timeout_s,
                                  max_attempts=cfg.max_attempts)
            print(f"requeued or failed {n} job(s)")
        elif args.command == "sweep":
            with db.connection() as conn:
                done = retention.sweep(conn, open_blob_store(cfg),
                                       default_days=cfg.retention_days)
            print(f"expired the files of {len(done.expired_jobs)} job(s); deleted "
                  f"{len(done.deleted)} file(s), {human_size(done.deleted_bytes)}")
        elif args.command == "serve":
            return _serve(cfg, db, args.workers)
    except ProxyError as e:
        print(f"jobcloud-proxy: {e.detail}", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK


def _serve(cfg, db, workers) -> int:
    with db.connection() as conn:
        password = accounts.ensure_first_admin(conn)
    db.close()
    print(f"jobcloud proxy: {cfg.url}", flush=True)
    if password:
        print(_first_start_block(cfg, password), flush=True)
    else:
        print("Log in with your account. A new one-time password for admin: "
              + _passwd_command(cfg), flush=True)
    # gunicorn_conf.py loads the same validated configuration; what this command
    # settled beyond it (the bind and worker count given here, the data directory
    # made absolute before gunicorn changes directory) goes through the environment.
    env = dict(os.environ, JOBCLOUD_BIND=cfg.bind,
               JOBCLOUD_DATA_DIR=os.path.abspath(cfg.data_dir))
    if workers:
        env["JOBCLOUD_GUNICORN_WORKERS"] = str(workers)
    gunicorn = shutil.which("gunicorn") or os.path.join(os.path.dirname(sys.executable), "gunicorn")
    os.execve(gunicorn, [gunicorn, "-c", "python:proxy.gunicorn_conf", "proxy:create_app()"], env)
    return EXIT_ERROR  # not reached


def _open_store(cfg, *, create: bool):
    """The proxy's database where the settings point, migrated.

    Args:
        create: make a new database when there is none (serve, init, migrate);
            otherwise one that is not there is refused, naming the place.

    Raises:
        StoreNotFound: create is False and there is no proxy database there.
        StoreUnavailable, ConfigError: as opening and migrating raise them.
    """
    if not create:
        _require_store(cfg)
    # Before anything is created there: what the commands create (a new
    # database, its WAL) is as private as what the server creates.
    datadir.secure(cfg.data_dir)
    db = open_database(cfg.resolved_database_url)
    try:
        db.migrate()
    except BaseException:
        db.close()
        raise
    return db


def _require_store(cfg) -> None:
    """Raises StoreNotFound, naming where it looked, unless a proxy's database is there."""
    url = cfg.resolved_database_url
    missing = StoreNotFound(
        f"no jobcloud database at {_store_name(cfg)} ({store_origin()}). Run this with "
        "the proxy's settings (JOBCLOUD_DATA_DIR, JOBCLOUD_CONFIG or JOBCLOUD_DATABASE_URL "
        "as `jobcloud-proxy serve` has them); `jobcloud-proxy migrate` creates a new "
        "database there")
    # Looked at before opening: opening a SQLite database creates it, and its directory.
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).is_file():
        raise missing
    db = open_database(url)
    try:
        if not db.has_schema():
            raise missing
    finally:
        db.close()


def _store_name(cfg) -> str:
    """The database file, or the PostgreSQL URL without its password."""
    url = cfg.resolved_database_url
    if url.startswith("sqlite:///"):
        return url[len("sqlite:///"):]
    return _without_password(url)


def _without_password(url: str) -> str:
    """A database URL fit to print: its password, if any, replaced by PASSWORD."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":PASSWORD@", 1)
    return parts._replace(netloc=netloc).geturl()


def _passwd_command(cfg) -> str:
    """`jobcloud-proxy user passwd admin` as it works from any directory of this
    host: with the settings that place this proxy's store and the command's full path."""
    settings = {}
    if os.environ.get("JOBCLOUD_CONFIG"):
        settings["JOBCLOUD_CONFIG"] = os.path.abspath(os.environ["JOBCLOUD_CONFIG"])
    if os.environ.get("JOBCLOUD_DATABASE_URL"):
        settings["JOBCLOUD_DATABASE_URL"] = _without_password(cfg.database_url)
    elif not cfg.database_url:
        # Absolute: the default ./var is this directory's, not the admin's shell's.
        settings["JOBCLOUD_DATA_DIR"] = os.path.abspath(cfg.data_dir)
    program = Path(sys.executable).parent / "jobcloud-proxy"
    command = shlex.quote(str(program)) if program.exists() else "jobcloud-proxy"
    return " ".join([*(f"{k}={shlex.quote(v)}" for k, v in settings.items()),
                     command, "user", "passwd", "admin"])


def _first_start_block(cfg, password: str) -> str:
    """The first start's login, framed so it stands out of the start-up lines."""
    lines = ["jobcloud: first start, the admin account was created.",
             "",
             f"  Log in at:          {cfg.url}/login",
             "  user:               admin",
             f"  one-time password:  {password}",
             "",
             "You choose your own password when you first log in. A new one-time password",
             "for admin, any time, on this host:",
             f"  {_passwd_command(cfg)}"]
    rule = "=" * min(100, max(72, *map(len, lines)))
    return "\n".join([rule, *lines, rule])


def jobcloud_main(argv=None, prog: str = "jobcloud") -> int:
    parser = argparse.ArgumentParser(
        prog=prog, description="jobcloud admin commands (run on the proxy host).")
    sub = parser.add_subparsers(dest="group", required=True)

    user = sub.add_parser("user", help="accounts").add_subparsers(dest="action", required=True)
    add = user.add_parser("add", help="create a user with a one-time password")
    add.add_argument("name")
    add.add_argument("--admin", action="store_true")
    passwd = user.add_parser("passwd", help="give a user a new one-time password")
    passwd.add_argument("name")
    user.add_parser("list", help="list users")
    lim = user.add_parser("limits", help="show or change a user's limits and priority weight")
    lim.add_argument("name")
    for field, (kind, _) in limits.FIELDS.items():
        lim.add_argument("--" + field.replace("_", "-"), type=kind, metavar="N")
    lim.add_argument("--clear", action="append", default=[], choices=sorted(limits.FIELDS),
                     metavar="LIMIT", help="remove a limit (repeatable)")

    token = sub.add_parser("token", help="API tokens").add_subparsers(dest="action", required=True)
    tc = token.add_parser("create", help="create an API token for a user")
    tc.add_argument("--user", default="admin")
    tc.add_argument("--label", default="cli")
    tl = token.add_parser("list", help="list a user's tokens")
    tl.add_argument("--user", default="admin")
    tr = token.add_parser("revoke", help="revoke a token")
    tr.add_argument("token_id")
    tr.add_argument("--user", default="admin")

    enroll = sub.add_parser("enroll", help="worker enrollment tokens").add_subparsers(
        dest="action", required=True)
    ec = enroll.add_parser("create", help="create an enrollment token for workers")
    ec.add_argument("--label", default="workers")
    ec.add_argument("--expires", type=float, metavar="SECONDS", help="expire after SECONDS")
    enroll.add_parser("list", help="list enrollment tokens")
    er = enroll.add_parser("revoke", help="revoke an enrollment token")
    er.add_argument("enrollment_id")

    prices = sub.add_parser("prices", help="show or set the prices jobs are billed at")
    prices.add_argument("--currency", help="currency label, e.g. EUR")
    for field in usage.PRICE_FIELDS:
        prices.add_argument("--" + field.replace("_", "-"), metavar="AMOUNT",
                            help=f"price per {field.split('_')[0].upper()}-hour")

    args = parser.parse_args(argv)
    try:
        cfg = load_config()
        db = _open_store(cfg, create=False)
        try:
            with db.connection() as conn, conn.transaction():
                _admin(conn, args, store=_store_name(cfg))
        finally:
            db.close()
    except ProxyError as e:
        print(f"{prog}: {e.detail}", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK


def _admin(conn, args, store: str) -> None:
    if args.group == "user":
        if args.action == "add":
            password = accounts.generate_password()
            accounts.create_user(conn, args.name, password, admin=args.admin, must_change=True)
            print(f"created {'admin ' if args.admin else ''}user {args.name!r}; "
                  f"one-time password: {password}")
        elif args.action == "passwd":
            found = _user(conn, args.name, store)
            password = accounts.generate_password()
            accounts.set_password(conn, found["id"], password, must_change=True)
            print(f"new one-time password for {args.name!r}: {password}")
        elif args.action == "limits":
            found = _user(conn, args.name, store)
            changes = {f: getattr(args, f) for f in limits.FIELDS if getattr(args, f) is not None}
            changes.update({f: None for f in args.clear})
            current = (limits.set_limits(conn, found["id"], changes) if changes
                       else limits.get_limits(conn, found["id"]))
            for field, value in current.items():
                print(f"{field}\t{'-' if value is None else f'{value:g}'}")
        else:
            for u in accounts.list_users(conn):
                print(f"{u['name']}\t{'admin' if u['is_admin'] else 'user'}")
    elif args.group == "prices":
        changes = {f: getattr(args, f) for f in (*usage.PRICE_FIELDS, "currency")
                   if getattr(args, f) is not None}
        current = (usage.set_prices(conn, changes, "cli") if changes else usage.get_prices(conn))
        for field, value in usage.prices_json(current).items():
            print(f"{field}\t{'-' if value is None else value}")
    elif args.group == "token":
        found = _user(conn, args.user, store)
        if args.action == "create":
            record, token = accounts.create_token(conn, found["id"], args.label)
            print(token)
        elif args.action == "list":
            for t in accounts.list_tokens(conn, found["id"]):
                print(f"{t['id']}\t{t['label']}\t{'revoked' if t['revoked_at'] else 'active'}")
        else:
            accounts.revoke_token(conn, found["id"], args.token_id)
            print(f"revoked {args.token_id}")
    else:
        if args.action == "create":
            record, token = accounts.create_enrollment(conn, args.label, "cli", args.expires)
            print(token)
        elif args.action == "list":
            for e in accounts.list_enrollments(conn):
                print(f"{e['id']}\t{e['label']}\t{'revoked' if e['revoked_at'] else 'active'}")
        else:
            accounts.revoke_enrollment(conn, args.enrollment_id)
            print(f"revoked {args.enrollment_id}")


def _user(conn, name: str, store: str) -> dict:
    found = accounts.get_user_by_name(conn, name)
    if found is None:
        # Where: a database other than the proxy's (another JOBCLOUD_DATA_DIR) has other users.
        raise ProxyError(f"no user {name!r} in {store}")
    return found
