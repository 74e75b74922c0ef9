"""Command lines: `jobcloud-proxy` (serve, migrate, reap) and the admin side of
`jobcloud` (users, API tokens, worker enrollment tokens) run on the proxy host
against its store.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys

from . import accounts, datadir, limits, usage, workers
from .config import load_config
from .db import open_database
from .errors import ProxyError

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


def proxy_main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="jobcloud-proxy", description="The jobcloud proxy.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="migrate, create the first admin, run gunicorn")
    serve.add_argument("--bind", help="HOST:PORT (default from config: 127.0.0.1:3000)")
    serve.add_argument("--workers", type=int, help="gunicorn worker processes")
    sub.add_parser("migrate", help="apply database migrations")
    sub.add_parser("reap", help="requeue jobs of lost workers now")
    args = parser.parse_args(argv)
    try:
        overrides = {"bind": args.bind} if getattr(args, "bind", None) else {}
        cfg = load_config(overrides=overrides)
        datadir.secure(cfg.data_dir)
        db = open_database(cfg.resolved_database_url)
        db.migrate()
        if args.command == "migrate":
            print("schema is current")
        elif args.command == "reap":
            with db.connection() as conn, conn.transaction():
                n = workers.reap(conn, lease_timeout_s=cfg.lease_timeout_s,
                                  max_attempts=cfg.max_attempts)
            print(f"requeued or failed {n} job(s)")
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
        print("First start: created the admin account.\n"
              f"  Log in at {cfg.url}/login as 'admin' with the one-time password: {password}\n"
              "  (you will be asked to choose your own password)", flush=True)
    else:
        print("Log in with your account. Forgot the admin password? "
              "Run: jobcloud user passwd admin", flush=True)
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


def jobcloud_main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="jobcloud", description="jobcloud admin commands (run on the proxy host).")
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
        # The admin commands open the same database: what they create (a new
        # database, its WAL) must be as private as what the server creates.
        datadir.secure(cfg.data_dir)
        db = open_database(cfg.resolved_database_url)
        db.migrate()
        with db.connection() as conn, conn.transaction():
            _admin(conn, args)
    except ProxyError as e:
        print(f"jobcloud: {e.detail}", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK


def _admin(conn, args) -> None:
    if args.group == "user":
        if args.action == "add":
            password = accounts.generate_password()
            accounts.create_user(conn, args.name, password, admin=args.admin, must_change=True)
            print(f"created {'admin ' if args.admin else ''}user {args.name!r}; "
                  f"one-time password: {password}")
        elif args.action == "passwd":
            found = _user(conn, args.name)
            password = accounts.generate_password()
            accounts.set_password(conn, found["id"], password, must_change=True)
            print(f"new one-time password for {args.name!r}: {password}")
        elif args.action == "limits":
            found = _user(conn, args.name)
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
        found = _user(conn, args.user)
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


def _user(conn, name: str) -> dict:
    found = accounts.get_user_by_name(conn, name)
    if found is None:
        raise ProxyError(f"no user {name!r}")
    return found
