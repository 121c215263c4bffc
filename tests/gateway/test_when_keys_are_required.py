"""When `thinkgate serve` requires API keys: open for one local model on loopback (like vLLM and Ollama) unless
--auth; keyed with a catalog unless --no-auth; never open on a non-loopback address without an explicit
--no-auth (the server refuses to start, saying how to choose)."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from thinkgate.cli import _serve_args, keys_required


def args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    _serve_args(p)
    return p.parse_args(list(argv))


@pytest.mark.parametrize("argv, required", [
    ((), False),  # the default host, 127.0.0.1
    (("--host", "localhost"), False),
    (("--host", "::1"), False),
    (("--host", "127.0.0.2"), False),
    (("--auth",), True),
    (("--host", "0.0.0.0", "--auth"), True),
    (("--config", "catalog.toml"), True),
    (("--config", "catalog.toml", "--host", "0.0.0.0"), True),
    (("--config", "catalog.toml", "--no-auth"), False),
    (("--host", "0.0.0.0", "--no-auth"), False),
])
def test_who_needs_a_key(argv, required):
    assert keys_required(args(*argv)) is required


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.7", "example.com"])
def test_open_on_a_public_address_is_refused(host):
    with pytest.raises(SystemExit, match=f"refusing to serve without API keys on {host}: add --auth"):
        keys_required(args("--host", host))


def test_auth_and_no_auth_together_are_refused(capsys):
    with pytest.raises(SystemExit) as e:
        args("--auth", "--no-auth")
    assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_a_real_server_refuses_to_start_open_on_every_address(tmp_path):
    """Before it loads anything: the refusal comes at once, with a non-zero exit and the choice to make."""
    p = subprocess.run([sys.executable, "-m", "thinkgate.cli", "serve", "--host", "0.0.0.0", "--port", "0",
                        "--model", str(tmp_path / "nothing-here")], capture_output=True, text=True, timeout=120)
    assert p.returncode != 0
    assert "refusing to serve without API keys on 0.0.0.0: add --auth" in p.stderr
    assert "--no-auth (open to anyone who can reach it)" in p.stderr
