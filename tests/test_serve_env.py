"""Every `thinkgate serve` option is also settable as THINKGATE_<OPTION> and in the catalog's [server] table;
the command line wins over the environment, the environment over [server], [server] over the default; a bad
value stops the start naming the variable or the file and key; --help names each variable and key."""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import httpx
import pytest

from tests.conftest import free_port
from thinkgate import cli
from thinkgate.serve_settings import NOT_IN_TABLE, parse_serve


def serve_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    cli._serve_args(p)
    return p


def test_environment_sets_defaults_the_command_line_wins(monkeypatch):
    monkeypatch.setenv("THINKGATE_MAX_WAITING", "7")
    monkeypatch.setenv("THINKGATE_REQUEST_TIMEOUT", "2.5")
    monkeypatch.setenv("THINKGATE_AUTH", "yes")
    monkeypatch.setenv("THINKGATE_DTYPE", "float32")
    monkeypatch.setenv("THINKGATE_PRICE_INPUT", "0.00275")
    args = serve_parser().parse_args([])
    assert (args.max_waiting, args.request_timeout, args.auth, args.dtype, args.price_input) == \
        (7, 2.5, True, "float32", "0.00275")
    assert args.drain_timeout == 30.0 and args.no_auth is False  # untouched ones keep their defaults
    assert serve_parser().parse_args(["--max-waiting", "3", "--dtype", "auto"]).max_waiting == 3


@pytest.mark.parametrize("name,value", [("THINKGATE_PORT", "eighty"), ("THINKGATE_DEVICE", "tpu"),
                                        ("THINKGATE_NO_AUTH", "maybe")])
def test_a_bad_value_names_the_variable(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit, match=name):
        serve_parser()


def test_help_names_every_variable_and_key_and_the_order():
    p = serve_parser()
    options = [a for a in p._actions if a.option_strings and a.dest != "help"]
    assert len(options) >= 30
    for a in options:
        key = "" if a.dest in NOT_IN_TABLE else f"; [server] {a.dest}"
        assert a.help.endswith(f"[env THINKGATE_{a.dest.upper()}{key}]"), a.help
    assert "[server] max_waiting]" in p.format_help()
    assert "the command line wins over the environment, the environment over [server], [server] over the " \
        "default" in " ".join(p.format_help().split())


def parse(argv: list[str]):
    """As `thinkgate serve` parses: its [server] table applied when --config (or THINKGATE_CONFIG) names one."""
    p = argparse.ArgumentParser()
    serve = p.add_subparsers(dest="cmd").add_parser("serve")
    cli._serve_args(serve)
    serve.set_defaults(fn=cli.cmd_serve)
    return parse_serve(p, serve, ["serve", *argv])


def catalog(tmp_path, server: str, checkpoint: str = "/nonexistent") -> str:
    path = tmp_path / "catalog.toml"
    path.write_text(f"""[server]
{server}

[[models]]
id = "acme/tiny"
price_input_per_1k = 0
price_output_per_1k = 0
[models.backend]
type = "local"
model = "{checkpoint}"
dtype = "float32"
kv_cache_memory = {32 * 2**20}
""")
    return str(path)


TABLE = """max_waiting = 5
request_timeout = 30
drain_timeout = 2.5
dtype = "float32"
no_prefix_caching = true
host = "0.0.0.0"
port = 9123
db = "sqlite:////tmp/x.db"
log_level = "warning"
"""


def test_server_table_sets_defaults_under_the_environment_and_the_command_line(tmp_path, monkeypatch):
    path = catalog(tmp_path, TABLE)
    args = parse(["--config", path])
    assert (args.max_waiting, args.request_timeout, args.drain_timeout, args.dtype, args.no_prefix_caching,
            args.host, args.port, args.db, args.log_level) == \
        (5, 30.0, 2.5, "float32", True, "0.0.0.0", 9123, "sqlite:////tmp/x.db", "warning")
    assert args.max_num_seqs == 32 and args.auth is False  # what the table leaves out keeps its default
    monkeypatch.setenv("THINKGATE_MAX_WAITING", "7")
    monkeypatch.setenv("THINKGATE_DTYPE", "auto")
    args = parse(["--config", path, "--port", "9200"])
    assert (args.max_waiting, args.dtype, args.port, args.drain_timeout) == (7, "auto", 9200, 2.5)
    args = parse(["--config", path, "--max-waiting", "3"])
    assert args.max_waiting == 3  # the command line over the environment over the table
    monkeypatch.setenv("THINKGATE_CONFIG", path)  # the catalog named by the environment: its table too
    monkeypatch.delenv("THINKGATE_MAX_WAITING")
    assert parse([]).max_waiting == 5


def test_without_a_catalog_nothing_is_read(tmp_path):
    assert parse(["--max-waiting", "4"]).max_waiting == 4


@pytest.mark.parametrize("line,message", [
    ("max_waitin = 3", "max_waitin: unknown key"),
    ('max_waiting = "3"', "max_waiting: '3' is not a whole number"),
    ("max_waiting = 3.5", "max_waiting: Decimal('3.5') is not a whole number"),
    ('request_timeout = "soon"', "request_timeout: 'soon' is not a number"),
    ("no_prefix_caching = 1", "no_prefix_caching: 1 is not true or false"),
    ('dtype = "float16"', "dtype: 'float16': choose from auto, bfloat16, float32"),
    ("port = true", "port: True is not a whole number"),
    ('model = "x.gguf"', "model: not settable here: the catalog's [[models]] name the models"),
    ('admin_token = "s3cret"', "admin_token: not settable here: a secret is never written in the catalog"),
    ('config = "other.toml"', "config: not settable here"),
    ("auth = true\nno_auth = true", "auth, no_auth: give one of them"),
])
def test_a_bad_server_key_names_the_file_and_the_key(tmp_path, line, message):
    path = catalog(tmp_path, line)
    with pytest.raises(SystemExit) as e:
        parse(["--config", path])
    assert str(e.value).startswith(f"catalog {path}: [server] ") and message in str(e.value)


def test_every_problem_of_the_table_is_listed_at_once(tmp_path):
    path = catalog(tmp_path, 'max_waitin = 3\nport = "80"\nadmin_token = "x"')
    with pytest.raises(SystemExit) as e:
        parse(["--config", path])
    assert all(k in str(e.value) for k in ("max_waitin:", "port:", "admin_token:"))


def test_thinkgate_serve_takes_its_port_and_auth_from_the_server_table(checkpoints, tmp_path):
    """The real command: it listens on the table's port and serves without keys as the table says."""
    port = free_port()
    path = catalog(tmp_path, f'port = {port}\nno_auth = true\nlog_level = "warning"', str(checkpoints["qwen3"]))
    cmd = [sys.executable, "-m", "thinkgate.cli", "serve", "--config", path, "--db", f"sqlite:///{tmp_path}/g.db"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        r = None
        for _ in range(600):
            assert proc.poll() is None, proc.stdout.read()
            try:
                r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=30, json={
                    "model": "acme/tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
                break
            except httpx.TransportError:
                time.sleep(0.2)
        assert r is not None and r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    finally:
        proc.terminate()
        proc.wait(30)


def test_thinkgate_serve_stops_on_a_bad_server_key(tmp_path):
    path = catalog(tmp_path, "max_waitin = 3")
    done = subprocess.run([sys.executable, "-m", "thinkgate.cli", "serve", "--config", path], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode != 0 and f"catalog {path}: [server] max_waitin: unknown key" in done.stderr


def test_the_example_catalogs_server_table_is_read():
    from pathlib import Path

    example = str(Path(__file__).parents[1] / "examples" / "catalog.toml")
    args = parse(["--config", example])
    assert (args.host, args.port, args.max_waiting, args.drain_timeout) == ("127.0.0.1", 8000, 128, 30.0)
