"""Where each `thinkgate serve` option's value comes from, first found wins: the command line, the environment
(THINKGATE_<OPTION>), the catalog's `[server]` table (the file given by --config or THINKGATE_CONFIG), the
built-in default.

Both are applied as the parser's defaults, the environment's over the table's, so that the command line,
parsed last, wins over both. In the `[server]` table a key is the option's long name without its dashes and
with underscores (--max-waiting: `max_waiting = 32`; a flag: `no_prefix_caching = true`); a value has the
option's type (a number of seconds may be written 30 or 30.5); an unknown key or a wrong value stops the start
naming the file and the key. A few options cannot be written there: --config itself, the one-model options
that --config replaces (its models carry their own), and --admin-token (a secret never lives in the catalog,
as an upstream's api_key does not: THINKGATE_ADMIN_TOKEN)."""

from __future__ import annotations

import argparse
import os
from decimal import Decimal
from typing import Any

ENV_PREFIX = "THINKGATE_"
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off", ""}
NOT_IN_TABLE = {  # dest: why
    "config": "the [server] table is read from the catalog --config names",
    "model": "the catalog's [[models]] name the models",
    "served_model_name": "the catalog's [[models]] name the models",
    "price_input": "each catalog model has its own prices",
    "price_output": "each catalog model has its own prices",
    "price_cached_input": "each catalog model has its own prices",
    "admin_token": "a secret is never written in the catalog: set THINKGATE_ADMIN_TOKEN",
}
PRECEDENCE = ("Each option can also be set as the environment variable THINKGATE_<OPTION> and as a key of the "
              "--config catalog's [server] table (the long name with underscores: max_waiting = 32, "
              "no_prefix_caching = true); the command line wins over the environment, the environment over "
              "[server], [server] over the default.")


def options(p: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in p._actions if a.option_strings and a.dest != "help"]


def env_name(action: argparse.Action) -> str:
    return ENV_PREFIX + action.dest.upper()


def document(p: argparse.ArgumentParser) -> None:
    """Each option's help names its variable and its [server] key; the parser's description, the order."""
    p.description = PRECEDENCE
    for a in options(p):
        where = f"env {env_name(a)}" + ("" if a.dest in NOT_IN_TABLE else f"; [server] {a.dest}")
        a.help = f"{a.help + ' ' if a.help else ''}[{where}]"


def env_defaults(p: argparse.ArgumentParser) -> None:
    """THINKGATE_<OPTION> as the option's default (e.g. THINKGATE_MAX_WAITING=32, THINKGATE_AUTH=1); of --auth
    and --no-auth both in effect, keys are required."""
    for action in options(p):
        raw = os.environ.get(env_name(action))
        if raw is None:
            continue
        name = env_name(action)
        if isinstance(action, argparse._StoreTrueAction):
            if raw.strip().lower() not in _TRUE | _FALSE:
                raise SystemExit(f"{name}={raw!r}: expected 1/0, true/false, yes/no or on/off")
            action.default = raw.strip().lower() in _TRUE
            continue
        try:
            value = action.type(raw) if action.type is not None else raw
        except ValueError:
            raise SystemExit(f"{name}={raw!r}: not a valid value for {action.option_strings[0]}") from None
        if action.choices is not None and value not in action.choices:
            raise SystemExit(f"{name}={raw!r}: choose from {', '.join(map(str, action.choices))}")
        action.default = value


def table_defaults(p: argparse.ArgumentParser, table: dict[str, Any], source: str) -> None:
    """The [server] table's values as defaults of the options the environment leaves unset; every problem in
    the table is listed at once, each with the file and the key."""
    by_dest = {a.dest: a for a in options(p)}
    problems, values = [], {}
    for key, raw in table.items():
        action = by_dest.get(key)
        if action is None:
            problems.append(f"{key}: unknown key (a `thinkgate serve` option's long name with underscores, "
                            "e.g. max_waiting)")
        elif key in NOT_IN_TABLE:
            problems.append(f"{key}: not settable here: {NOT_IN_TABLE[key]}")
        else:
            try:
                values[key] = _value(action, raw)
            except ValueError as e:
                problems.append(f"{key}: {e}")
    if values.get("auth") and values.get("no_auth"):
        problems.append("auth, no_auth: give one of them")
    if problems:
        raise SystemExit(f"catalog {source}: [server] " + ("\n  " if len(problems) > 1 else "") +
                         "\n  ".join(problems))
    for key, value in values.items():
        if env_name(by_dest[key]) not in os.environ:
            by_dest[key].default = value


def _value(action: argparse.Action, raw: Any) -> Any:
    """A TOML value (floats read as Decimal) as the option's type."""
    if isinstance(action, argparse._StoreTrueAction):
        if not isinstance(raw, bool):
            raise ValueError(f"{raw!r} is not true or false")
        return raw
    if action.type is int:
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise ValueError(f"{raw!r} is not a whole number")
        value = raw
    elif action.type is float:
        if isinstance(raw, bool) or not isinstance(raw, int | float | Decimal):
            raise ValueError(f"{raw!r} is not a number")
        value = float(raw)
    else:
        if not isinstance(raw, str):
            raise ValueError(f"{raw!r} is not a string (write it in quotes)")
        value = raw
    if action.choices is not None and value not in action.choices:
        raise ValueError(f"{value!r}: choose from {', '.join(map(str, action.choices))}")
    return value


def parse_serve(parser: argparse.ArgumentParser, serve: argparse.ArgumentParser, argv: list[str] | None):
    """Parse; when serving with a catalog, apply its [server] table and parse again (so the command line and
    the environment still win)."""
    args = parser.parse_args(argv)
    if getattr(args, "fn", None) is not None and getattr(args, "cmd", None) == "serve" and args.config:
        from thinkgate.catalog import CatalogError, load_catalog

        try:
            catalog = load_catalog(args.config)
        except CatalogError as e:
            raise SystemExit(str(e)) from None
        table_defaults(serve, catalog.server, catalog.source)
        args = parser.parse_args(argv)
    return args
