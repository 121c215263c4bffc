"""Render a model's own Jinja chat template the way transformers' `apply_chat_template` does.

Same environment settings (sandboxed, trim/lstrip blocks, loop controls), the same `tojson` (insertion
order, raw Unicode, no HTML escaping) and the same helpers (`raise_exception`, `strftime_now`), so the
prompt bytes match what the model was trained with.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache

from jinja2 import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from thinkgate.errors import InvalidRequestError


class TemplateRaisedError(InvalidRequestError):
    """The template itself rejected the conversation (via raise_exception)."""


def _raise(message: str):
    raise TemplateRaisedError(f"chat template error: {message}", param="messages")


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def _compile(source: str):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def render_chat(template: str, messages: list[dict], tools: list[dict] | None = None,
                add_generation_prompt: bool = True, **kwargs) -> str:
    try:
        return _compile(template).render(messages=messages, tools=tools or None,
                                         add_generation_prompt=add_generation_prompt, **kwargs)
    except TemplateRaisedError:
        raise
    except TemplateError as e:
        raise InvalidRequestError(f"the chat template could not render these messages: {e}", param="messages") from e


def thinking_mode(prompt: str, template: str | None) -> str:
    """How the model's output starts: 'open' (the prompt opened <think>: output begins as reasoning),
    'hybrid' (the model may open <think> itself), or 'none' (the model never thinks)."""
    tail = prompt.rstrip("\n")
    if tail.endswith("<think>"):
        return "open"
    if tail.endswith("</think>"):
        return "none"  # thinking switched off by the template (e.g. enable_thinking=false)
    return "hybrid" if template and "<think>" in template else "none"
