"""`thinkgate db|accounts|keys|codes`: the gateway's database from the command line.

Every command takes `--db URL` (default: the database `thinkgate serve` uses) and migrates it first. A new
key's secret and new top-up codes are shown once, on stdout, one a line and nothing else there, so a script
can capture them; what a command says about them goes to stderr. Bad input: a message naming the option and
exit code 2; an unknown or duplicate name: exit code 1. The checks are gateway/manage.py's, which the admin
HTTP API shares.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the rest is imported when a command runs: `thinkgate serve` and `--help` stay fast
    from thinkgate.storage.accounts import AccountStore
    from thinkgate.storage.ledger import Ledger

KEY_COLUMNS = ("name", "prefix", "account", "status", "limit", "spent", "rpm", "tpm", "concurrency", "expires_at")


def add_gateway_commands(subparsers) -> None:
    """Add `db`, `accounts`, `keys` and `codes` to the `thinkgate` parser's subcommands."""
    dbp = subparsers.add_parser("db", help="the gateway's database")
    dsub = dbp.add_subparsers(dest="db_cmd", required=True)
    _command(dsub, "upgrade", cmd_db_upgrade, "apply the migrations (serve does this on start too)")

    ap = subparsers.add_parser("accounts", help="accounts: balances in CNY, owners of keys")
    asub = ap.add_subparsers(dest="accounts_cmd", required=True)
    p = _command(asub, "create", cmd_accounts_create, "create an account")
    p.add_argument("name", type=_checked("account_name"))
    p.add_argument("--balance", type=_checked("amount"), default=0, metavar="CNY",
                   help="starting balance in CNY, e.g. 10.50 (default 0)")
    p.add_argument("--email", type=_checked("email"), default=None)
    _command(asub, "list", cmd_accounts_list, "list the accounts and their balances")
    p = _command(asub, "show", cmd_accounts_show, "an account's balance, keys and usage totals")
    p.add_argument("name")
    p = _command(asub, "topup", cmd_accounts_topup, "credit an account")
    p.add_argument("name")
    p.add_argument("amount", type=_checked("amount", positive=True), help="CNY, e.g. 10.50")

    kp = subparsers.add_parser("keys", help="API keys (secrets shown once, stored as hashes)")
    ksub = kp.add_subparsers(dest="keys_cmd", required=True)
    p = _command(ksub, "create", cmd_keys_create, "create a key; prints its secret once, alone on stdout")
    p.add_argument("--account", required=True)
    p.add_argument("--name", required=True, type=_checked("name", "key name"))
    p.add_argument("--models", type=_checked("models"), metavar="A,B", help="allowed model ids (default all)")
    for limit, what in (("rpm", "requests per minute"), ("tpm", "tokens per minute"),
                        ("concurrency", "concurrent requests")):
        p.add_argument(f"--{limit}", type=_checked("positive_int", what), metavar="N",
                       help=f"at most N {what}")
    p.add_argument("--limit", type=_checked("amount"), metavar="CNY", help="the key's own spending limit")
    p.add_argument("--expires", type=_checked("expiry"), metavar="DATE",
                   help="ISO date (expires 00:00 UTC that day) or datetime (UTC unless it has an offset)")
    p.add_argument("--ips", type=_checked("cidrs"), metavar="CIDR,...", help="allowed client address ranges")
    p = _command(ksub, "list", cmd_keys_list, "list keys (display prefixes, never secrets)")
    p.add_argument("--account", default=None)
    p = _command(ksub, "show", cmd_keys_show, "one key's limits, spend and status")
    p.add_argument("name")
    p = _command(ksub, "revoke", cmd_keys_revoke, "revoke a key (at once, for every gateway process)")
    p.add_argument("name")

    cp = subparsers.add_parser("codes", help="single-use top-up codes")
    csub = cp.add_subparsers(dest="codes_cmd", required=True)
    p = _command(csub, "create", cmd_codes_create, "create a batch of codes; prints them once, one a line")
    p.add_argument("--amount", required=True, type=_checked("amount", positive=True),
                   metavar="CNY", help="what each code credits")
    p.add_argument("--count", required=True, type=_checked("positive_int", "count"))
    p.add_argument("--batch", type=_checked("name", "batch name"), default=None)


def _checked(check: str, *args, **kw) -> Callable[[str], object]:
    """An argparse `type` from the manage.py check of that name: its message becomes argparse's (exit 2)."""

    def convert(text: str):
        from thinkgate.gateway import manage

        try:
            return getattr(manage, check)(text, *args, **kw)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return convert


def _command(sub, name: str, fn: Callable, help: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=help)
    p.add_argument("--db", default=None, metavar="URL",
                   help="database URL (default: the one `thinkgate serve` uses, SQLite under $THINKGATE_DATA_DIR "
                        "or ~/.local/share/thinkgate)")
    p.set_defaults(fn=lambda args: _run(args, fn))
    return p


def _run(args, fn: Callable) -> int:
    logging.getLogger("alembic").setLevel(logging.WARNING)  # not its INFO lines (plugins, context) on each command
    from thinkgate.storage.accounts import AccountStore, AlreadyExists, NotFound
    from thinkgate.storage.db import Database, redact
    from thinkgate.storage.ledger import Ledger

    db = Database(args.db)
    try:
        try:
            db.upgrade()
        except Exception as e:
            print(f"thinkgate: cannot open the database {redact(db.url)}: {type(e).__name__}: {e}", file=sys.stderr)
            return 1
        return fn(args, AccountStore(db), Ledger(db)) or 0
    except (NotFound, AlreadyExists) as e:
        print(f"thinkgate: {e}", file=sys.stderr)
        return 1
    except ValueError as e:
        print(f"thinkgate: {e}", file=sys.stderr)
        return 2
    finally:
        db.dispose()


def _err(*lines: str) -> None:
    for line in lines:
        print(line, file=sys.stderr)


def _table(rows: list[dict], columns: tuple[str, ...]) -> None:
    cells = [[c.upper() for c in columns]] + [[_show(r[c]) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def _show(v) -> str:
    return "-" if v is None else ",".join(v) if isinstance(v, list) else str(v)


def _fields(view: dict, skip: tuple[str, ...] = ()) -> None:
    for k, v in view.items():
        if k not in skip:
            print(f"{k}: {_show(v)}")


# -- commands (each imports what it uses, as cli.py's do) ---------------------------------------------
def cmd_db_upgrade(args, store: AccountStore, ledger: Ledger) -> int:
    from thinkgate.storage.db import redact

    print(f"{redact(store.db.url)}: migrated to the latest schema")
    return 0


def cmd_accounts_create(args, store: AccountStore, ledger: Ledger) -> int:
    from thinkgate.gateway import manage

    acct = store.create_account(args.name, email=args.email, balance_units=args.balance)
    print(f"created account {acct.name!r}, balance {manage.cny(acct.balance_units)} CNY")
    return 0


def cmd_accounts_list(args, store: AccountStore, ledger: Ledger) -> int:
    from thinkgate.gateway import manage

    nkeys = Counter(k.account_id for k in store.keys())
    rows = [{**manage.account_view(store, ledger, a, with_keys=False), "keys": nkeys[a.id]} for a in store.accounts()]
    _table(rows, ("name", "balance", "keys", "email", "created_at"))
    return 0


def cmd_accounts_show(args, store: AccountStore, ledger: Ledger) -> int:
    from thinkgate.gateway import manage

    view = manage.account_view(store, ledger, store.account(args.name))
    _fields(view, skip=("keys", "usage"))
    print("usage: " + ", ".join(f"{k} {v}" for k, v in view["usage"].items() if k != "cost_number"))
    print(f"keys: {len(view['keys'])}")
    if view["keys"]:
        _table(view["keys"], KEY_COLUMNS)
    return 0


def cmd_accounts_topup(args, store: AccountStore, ledger: Ledger) -> int:
    from thinkgate.gateway import manage

    acct = store.topup(args.name, args.amount)
    print(f"account {acct.name!r}: +{manage.cny(args.amount)} CNY, balance {manage.cny(acct.balance_units)} CNY")
    return 0


def cmd_keys_create(args, store: AccountStore, ledger: Ledger) -> int:
    from thinkgate.gateway import manage

    key, secret = manage.create_key(store, args.account, args.name, models=args.models, ips=args.ips,
                                    limit_units=args.limit, expires_at=args.expires, rpm=args.rpm, tpm=args.tpm,
                                    concurrency=args.concurrency)
    print(secret, flush=True)
    view = manage.key_view(key, args.account)
    _err(f"created key {key.name!r} ({key.prefix}) for account {args.account!r}; its secret (the line on stdout) "
         "is shown only now: store it",
         *(f"  {k}: {_show(v)}" for k, v in view.items() if v is not None and k not in ("name", "prefix", "account")))
    return 0


def cmd_keys_list(args, store: AccountStore, ledger: Ledger) -> int:
    from thinkgate.gateway import manage

    names = {a.id: a.name for a in store.accounts()}
    _table([manage.key_view(k, names[k.account_id]) for k in store.keys(args.account)], KEY_COLUMNS)
    return 0


def cmd_keys_show(args, store: AccountStore, ledger: Ledger) -> int:
    from thinkgate.gateway import manage

    key = store.key(args.name)
    _fields(manage.key_view(key, store.account_by_id(key.account_id).name))
    return 0


def cmd_keys_revoke(args, store: AccountStore, ledger: Ledger) -> int:
    before = store.key(args.name)
    key = store.revoke_key(args.name)
    said = "was already revoked at" if before.revoked_at is not None else "revoked at"
    print(f"key {key.name!r} ({key.prefix}) {said} {key.revoked_at.isoformat()}")
    return 0


def cmd_codes_create(args, store: AccountStore, ledger: Ledger) -> int:
    from thinkgate.gateway import manage

    batch, codes = manage.create_codes(store, args.amount, args.count, args.batch)
    print("\n".join(codes), flush=True)
    _err(f"batch {batch!r}: {len(codes)} single-use codes of {manage.cny(args.amount)} CNY each, shown only now")
    return 0


def main(argv: list[str] | None = None) -> int:
    """These commands alone (`python -m thinkgate.cli_gateway ...`); `thinkgate` itself adds them too."""
    parser = argparse.ArgumentParser(prog="thinkgate", description="manage the gateway's accounts, keys and codes")
    add_gateway_commands(parser.add_subparsers(dest="cmd", required=True))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
