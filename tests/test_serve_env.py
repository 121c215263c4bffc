"""Every `thinkgate serve` option is also settable as THINKGATE_<OPTION>; the command line wins; a bad value
stops the start naming the variable; --help names each variable."""

from __future__ import annotations

import argparse

import pytest

from thinkgate import cli


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


def test_help_names_every_variable():
    p = serve_parser()
    options = [a for a in p._actions if a.option_strings and a.dest != "help"]
    assert len(options) >= 30
    assert all(f"[env THINKGATE_{a.dest.upper()}]" in a.help for a in options)
