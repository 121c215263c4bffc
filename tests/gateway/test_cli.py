"""`thinkgate db|accounts|keys|codes` on real databases (SQLite, PostgreSQL): what each command stores and
prints, a key's secret alone on stdout (also from a real process), and bad input refused with exit code 2."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys

import pytest
import sqlalchemy as sa

from tests.gateway.dbs import BACKENDS, fresh_database
from thinkgate.cli_gateway import main
from thinkgate.gateway import manage
from thinkgate.gateway.keys import hash_secret
from thinkgate.storage.accounts import AccountStore
from thinkgate.storage.db import Database


@pytest.fixture(params=BACKENDS)
def db(request, tmp_path):
    d = fresh_database(request.param, tmp_path)
    yield d
    d.dispose()


def cli(capsys, db: Database | str, *argv: str) -> tuple[int, str, str]:
    """Run one command as `thinkgate` would (argparse included); its exit code, stdout and stderr."""
    url = db if isinstance(db, str) else db.url
    try:
        rc = main([*argv, "--db", url])
    except SystemExit as e:  # argparse refusing the input
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def test_db_upgrade_creates_the_default_database_serve_uses(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("THINKGATE_DATA_DIR", str(tmp_path / "data"))
    rc = main(["db", "upgrade"])
    out = capsys.readouterr().out
    assert rc == 0 and "migrated to the latest schema" in out
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'data' / 'thinkgate.db'}")
    assert {"accounts", "api_keys", "ledger", "usage"} <= set(sa.inspect(engine).get_table_names())
    engine.dispose()


def test_accounts_create_list_show_and_topup_exactly(capsys, db):
    assert cli(capsys, db, "accounts", "create", "alice", "--balance", "12.50", "--email", "a@example.com")[0] == 0
    rc, out, _ = cli(capsys, db, "accounts", "create", "bob")
    assert rc == 0 and "balance 0 CNY" in out
    rc, out, _ = cli(capsys, db, "accounts", "topup", "alice", "0.00000001")
    assert rc == 0 and "balance 12.50000001 CNY" in out
    store = AccountStore(db)
    assert store.account("alice").balance_units == 1_250_000_001 and store.account("alice").email == "a@example.com"
    rc, out, _ = cli(capsys, db, "accounts", "list")
    lines = out.splitlines()
    assert rc == 0 and lines[0].split()[:3] == ["NAME", "BALANCE", "KEYS"]
    assert lines[1].split()[:3] == ["alice", "12.50000001", "0"] and lines[2].split()[:3] == ["bob", "0", "0"]
    cli(capsys, db, "keys", "create", "--account", "alice", "--name", "alice-1")
    rc, out, _ = cli(capsys, db, "accounts", "show", "alice")
    assert rc == 0 and "balance: 12.50000001" in out and "email: a@example.com" in out
    assert "usage: requests 0," in out and "keys: 1" in out and "alice-1" in out


def test_keys_create_prints_only_the_secret_and_stores_its_limits(capsys, db):
    cli(capsys, db, "accounts", "create", "alice", "--balance", "1")
    rc, out, err = cli(capsys, db, "keys", "create", "--account", "alice", "--name", "ci", "--models", "m1, m2",
                       "--rpm", "60", "--tpm", "10000", "--concurrency", "2", "--limit", "0.5",
                       "--expires", "2099-12-31", "--ips", "10.0.0.0/8,192.168.1.7,::1")
    assert rc == 0
    secret = out.removesuffix("\n")
    assert out == secret + "\n" and secret.startswith("sk-tg-") and "\n" not in secret
    assert secret not in err and "shown only now" in err
    key = AccountStore(db).key("ci")
    assert key.secret_hash == hash_secret(secret) and err.count(key.prefix) == 1
    assert key.models == ["m1", "m2"] and key.ips == ["10.0.0.0/8", "192.168.1.7/32", "::1/128"]
    assert (key.rpm, key.tpm, key.concurrency, key.limit_units) == (60, 10000, 2, 50_000_000)
    assert key.expires_at == dt.datetime(2099, 12, 31, tzinfo=dt.UTC)
    # Listings show the display prefix, never the secret.
    for argv in (("keys", "list"), ("keys", "list", "--account", "alice"), ("keys", "show", "ci"),
                 ("accounts", "show", "alice")):
        rc, out, err = cli(capsys, db, *argv)
        assert rc == 0 and key.prefix in out and secret not in out + err
    rc, out, _ = cli(capsys, db, "keys", "show", "ci")
    assert "limit: 0.5" in out and "status: active" in out and "ips: 10.0.0.0/8,192.168.1.7/32,::1/128" in out
    rc, out, _ = cli(capsys, db, "keys", "list", "--account", "nobody")
    assert rc == 1


def test_an_expiry_datetime_with_an_offset_is_stored_in_utc(capsys, db):
    cli(capsys, db, "accounts", "create", "alice")
    rc, _, _ = cli(capsys, db, "keys", "create", "--account", "alice", "--name", "k", "--expires",
                   "2099-06-01T08:00:00+08:00")
    assert rc == 0 and AccountStore(db).key("k").expires_at == dt.datetime(2099, 6, 1, 0, 0, tzinfo=dt.UTC)


def test_keys_revoke_and_names_that_exist_or_do_not(capsys, db):
    cli(capsys, db, "accounts", "create", "alice")
    cli(capsys, db, "keys", "create", "--account", "alice", "--name", "k")
    rc, out, _ = cli(capsys, db, "keys", "revoke", "k")
    assert rc == 0 and "revoked at" in out and AccountStore(db).key("k").revoked_at is not None
    rc, out, _ = cli(capsys, db, "keys", "revoke", "k")
    assert rc == 0 and "was already revoked" in out
    assert "status: revoked" in cli(capsys, db, "keys", "show", "k")[1]
    for argv, said in ((("accounts", "create", "alice"), "an account named 'alice' exists"),
                       (("keys", "create", "--account", "alice", "--name", "k"), "a key named 'k' exists"),
                       (("keys", "create", "--account", "nobody", "--name", "k2"), "no account named 'nobody'"),
                       (("keys", "revoke", "nope"), "no key named 'nope'"),
                       (("accounts", "topup", "nobody", "1"), "no account named 'nobody'"),
                       (("accounts", "show", "nobody"), "no account named 'nobody'")):
        rc, out, err = cli(capsys, db, *argv)
        assert (rc, out) == (1, "") and said in err, argv


def test_codes_create_prints_each_code_once_and_each_redeems_once(capsys, db):
    cli(capsys, db, "accounts", "create", "alice")
    rc, out, err = cli(capsys, db, "codes", "create", "--amount", "5.5", "--count", "3", "--batch", "spring")
    codes = out.splitlines()
    assert rc == 0 and len(set(codes)) == 3 and all(c.startswith(manage.CODE_PREFIX) for c in codes)
    assert "batch 'spring': 3 single-use codes of 5.5 CNY each" in err and not any(c in err for c in codes)
    store = AccountStore(db)
    acct = store.account("alice")
    assert [manage.redeem(store, acct.id, c) for c in codes + codes[:1]] == [550_000_000] * 3 + [None]
    assert store.account("alice").balance_units == 1_650_000_000


BAD = [
    (("accounts", "create", "a", "--balance", "1.123456789"), "--balance", "at most 8 decimal places"),
    (("accounts", "create", "a", "--balance", "-1"), "--balance", "at least 0"),
    (("accounts", "create", "a", "--balance", "ten"), "--balance", "not an amount of CNY"),
    (("accounts", "create", "a", "--email", "nobody"), "--email", "not an email address"),
    (("accounts", "create", "anonymous"), "name", "reserved"),
    (("accounts", "create", "has space"), "name", "letters, digits"),
    (("accounts", "topup", "a", "0"), "amount", "more than 0"),
    (("keys", "create", "--account", "a", "--name", "sk-tg-" + "x" * 40), "--name", "look like an API key"),
    (("keys", "create", "--account", "a", "--name", "k", "--ips", "10.0.0.1/8"), "--ips", "host bits set"),
    (("keys", "create", "--account", "a", "--name", "k", "--ips", "300.1.1.1"), "--ips", "not an IP address range"),
    (("keys", "create", "--account", "a", "--name", "k", "--ips", "10.0.0.0/8,"), "--ips", "empty entry"),
    (("keys", "create", "--account", "a", "--name", "k", "--expires", "2001-01-01"), "--expires", "in the past"),
    (("keys", "create", "--account", "a", "--name", "k", "--expires", "next week"), "--expires", "not an ISO date"),
    (("keys", "create", "--account", "a", "--name", "k", "--rpm", "0"), "--rpm", "whole number"),
    (("keys", "create", "--account", "a", "--name", "k", "--tpm", "1.5"), "--tpm", "whole number"),
    (("keys", "create", "--account", "a", "--name", "k", "--limit", "0.1.5"), "--limit", "not an amount"),
    (("codes", "create", "--amount", "0", "--count", "1"), "--amount", "more than 0"),
    (("codes", "create", "--amount", "1", "--count", "0"), "--count", "whole number"),
]


@pytest.mark.parametrize(("argv", "option", "said"), BAD, ids=[" ".join(b[0][:2]) + " " + b[1] for b in BAD])
def test_bad_input_is_refused_with_exit_code_2_naming_the_option(capsys, tmp_path, argv, option, said):
    url = f"sqlite:///{tmp_path / 'g.db'}"
    rc, out, err = cli(capsys, url, *argv)
    assert (rc, out) == (2, "") and f"argument {option}" in err and said in err, err
    assert not (tmp_path / "g.db").exists()  # refused before the database was opened


def test_too_many_codes_and_keys_on_the_anonymous_account_exit_2(capsys, db):
    rc, _, err = cli(capsys, db, "codes", "create", "--amount", "1", "--count", str(manage.MAX_CODES + 1))
    assert rc == 2 and "at most" in err
    AccountStore(db).anonymous()
    rc, out, err = cli(capsys, db, "keys", "create", "--account", "anonymous", "--name", "k")
    assert (rc, out) == (2, "") and "holds no keys" in err


def test_a_real_process_prints_the_secret_alone_on_stdout(db):
    """What a script sees: `SECRET=$(thinkgate keys create ...)` captures exactly the secret."""
    env = {**os.environ, "PYTHONWARNINGS": "default"}

    def run(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "thinkgate.cli_gateway", *argv, "--db", db.url],
                              capture_output=True, text=True, env=env, timeout=120)

    assert run("accounts", "create", "alice").returncode == 0
    p = run("keys", "create", "--account", "alice", "--name", "script")
    assert p.returncode == 0 and len(p.stdout.splitlines()) == 1 and p.stdout.startswith("sk-tg-")
    assert AccountStore(db).key("script").secret_hash == hash_secret(p.stdout.strip())
    assert p.stdout.strip() not in p.stderr
    p = run("keys", "create", "--account", "alice", "--name", "x", "--rpm", "-3")
    assert p.returncode == 2 and p.stdout == "" and "argument --rpm" in p.stderr
