"""The deployment examples (README, "Deploying"), checked where they cannot run: the compose file parses and every
thinkgate command in it parses with thinkgate's own argument parser; the gateways share one database and one
Redis and sit behind the load balancer; the catalogs name the models the vLLM and SGLang scripts serve."""

from __future__ import annotations

import argparse
import re
import subprocess
from pathlib import Path

import pytest

from thinkgate.catalog import load_catalog
from thinkgate.cli import _serve_args
from thinkgate.cli_gateway import add_gateway_commands

yaml = pytest.importorskip("yaml")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
FLAGSHIP = "qwen/qwen3-235b-a22b-thinking-2507"
SERVED = "Qwen/Qwen3-235B-A22B-Thinking-2507"
ENV = {"POSTGRES_PASSWORD": "pw", "THINKGATE_ADMIN_TOKEN": "admin", "VLLM_API_KEY": "k", "SGLANG_API_KEY": "s"}


def thinkgate_parser() -> argparse.ArgumentParser:
    """`thinkgate`'s parser for the commands the examples use: serve (its real options) and db/accounts/keys."""
    root = argparse.ArgumentParser(prog="thinkgate", exit_on_error=False)
    sub = root.add_subparsers(dest="cmd", required=True)
    _serve_args(sub.add_parser("serve"))
    add_gateway_commands(sub)
    return root


def interpolate(value, env: dict):
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?message}, in every string of a parsed file."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if isinstance(value, str):
        def sub(m):
            name, op, rest = m.group(1), m.group(2), m.group(3)
            if name in env:
                return env[name]
            assert op == ":-", f"${{{name}}} has no value and no default"
            return rest or ""
        return re.sub(r"\$\{([A-Z_][A-Z0-9_]*)(?:(:[-?])([^}]*))?\}", sub, value)
    return value


@pytest.fixture(scope="module")
def compose() -> dict:
    return interpolate(yaml.safe_load((EXAMPLES / "compose.yaml").read_text()), ENV)


def test_every_thinkgate_command_in_the_compose_file_parses(compose):
    parser = thinkgate_parser()
    commands = {name: s["command"] for name, s in compose["services"].items()
                if s.get("image") == "thinkgate:local"}
    assert set(commands) == {"migrate", "gateway-1", "gateway-2"}
    parsed = {}
    for name, argv in commands.items():
        assert all(isinstance(a, str) for a in argv), name
        try:
            parsed[name] = parser.parse_args(argv)
        except (argparse.ArgumentError, SystemExit) as e:  # an unknown or misspelt flag
            pytest.fail(f"{name}: thinkgate {' '.join(argv)}: {e}")
    assert (parsed["migrate"].cmd, parsed["migrate"].db_cmd) == ("db", "upgrade")
    gateways = [parsed["gateway-1"], parsed["gateway-2"]]
    for g in gateways:
        assert g.cmd == "serve" and g.auth and g.admin_token == "admin" and g.host == "0.0.0.0"
        assert g.config == "/etc/thinkgate/catalog.toml" and g.redis == "redis://redis:6379/0"
        assert g.db == parsed["migrate"].db == "postgresql+psycopg://thinkgate:pw@postgres:5432/thinkgate"
    volumes = compose["services"]["gateway-1"]["volumes"]
    assert "./gateway-catalog.toml:/etc/thinkgate/catalog.toml:ro" in volumes
    assert compose["services"]["gateway-1"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"


def test_the_load_balancer_spreads_over_both_gateways_and_streams_unbuffered(compose):
    lb = compose["services"]["lb"]
    assert "./nginx.conf:/etc/nginx/nginx.conf:ro" in lb["volumes"] and set(lb["depends_on"]) == {"gateway-1",
                                                                                                    "gateway-2"}
    conf = (EXAMPLES / "nginx.conf").read_text()
    servers = re.findall(r"^\s*server (gateway-\d):(\d+)", conf, re.M)
    assert servers == [("gateway-1", "8000"), ("gateway-2", "8000")]
    assert "proxy_buffering off;" in conf and "listen 8080;" in conf
    assert "proxy_set_header Host $http_host;" in conf  # the port kept: the console writes it into its samples
    assert not any("ports" in compose["services"][g] for g in ("gateway-1", "gateway-2"))  # only via the balancer


def test_the_compose_file_needs_its_secrets():
    raw = yaml.safe_load((EXAMPLES / "compose.yaml").read_text())
    with pytest.raises(AssertionError, match="has no value and no default"):
        interpolate(raw, {})
    example = dict(line.split("=", 1) for line in (EXAMPLES / "compose.env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    assert set(example) == set(ENV)


def test_the_catalogs_name_what_the_vllm_and_sglang_scripts_serve():
    scripts = {name: (EXAMPLES / name).read_text() for name in ("vllm.sh", "sglang.sh")}
    for name, text in scripts.items():
        subprocess.run(["bash", "-n", str(EXAMPLES / name)], check=True)  # valid shell
        assert f"--served-model-name {SERVED}" in text, name
    assert "--reasoning-parser deepseek_r1" in scripts["vllm.sh"] and "--tool-call-parser hermes" in scripts["vllm.sh"]
    assert "--enable-expert-parallel" in scripts["vllm.sh"] and "--port 8000" in scripts["vllm.sh"]
    assert "--reasoning-parser qwen3-thinking" in scripts["sglang.sh"] and "--tool-call-parser qwen25" in \
        scripts["sglang.sh"] and "--ep-size" in scripts["sglang.sh"] and "--port 30000" in scripts["sglang.sh"]
    gateway = {m.id: m for m in load_catalog(EXAMPLES / "gateway-catalog.toml").models}
    assert list(gateway) == [FLAGSHIP] and gateway[FLAGSHIP].local_backend is None
    vllm, sglang = gateway[FLAGSHIP].backends
    assert (vllm.name, vllm.base_url, vllm.api_key_env) == ("vllm", "http://vllm.internal:8000/v1", "VLLM_API_KEY")
    assert (sglang.name, sglang.base_url, sglang.api_key_env) == ("sglang", "http://sglang.internal:30000/v1",
                                                                  "SGLANG_API_KEY")
    assert vllm.remote_model == sglang.remote_model == SERVED
    main = {m.id: m for m in load_catalog(EXAMPLES / "catalog.toml").models}[FLAGSHIP].backends[0]
    assert (main.base_url, main.api_key_env, main.remote_model) == (vllm.base_url, vllm.api_key_env, SERVED)
