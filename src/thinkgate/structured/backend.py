"""Constrained decoding behind a small interface.

A backend compiles a JSON schema (or the builtin "any JSON object" grammar) for one tokenizer; each
request gets a `Matcher` that says which tokens may come next, accepts the sampled token, can roll back,
and knows when the grammar is complete. Compilation results are cached by schema. Every matcher bounds the
digits of a number (structured/bounds.py), so a constrained answer cannot loop on digits to the token cap.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # annotations only: a gateway of upstream models alone never imports torch
    import torch


class GrammarError(ValueError):
    """The schema or grammar cannot be compiled (the message names what is unsupported)."""


class Matcher(Protocol):
    def allowed_mask(self) -> torch.Tensor:
        """bool [vocab]: tokens allowed next."""

    def accept(self, token: int) -> bool:
        """Advance by one sampled token; False if the token broke the grammar."""

    def rollback(self, n: int) -> None: ...

    def is_terminated(self) -> bool:
        """The grammar is complete: nothing but end-of-sequence may follow."""

    def is_accepting(self) -> bool: ...


class GrammarBackend(Protocol):
    name: str

    def json_schema(self, schema: dict, strict: bool = True) -> Matcher: ...

    def json_object(self) -> Matcher: ...

    def lark(self, grammar: str, schema: dict | None = None) -> Matcher:
        """A Lark grammar (llguidance dialect: `%json {schema}` and `<[token id]>` are allowed); `schema` is
        the JSON schema it embeds, whose values may need longer numbers than the default bounds."""


def schema_key(schema: dict) -> str:
    return json.dumps(schema, sort_keys=True, separators=(",", ":"))


BACKENDS = ("llguidance", "xgrammar")


def xgrammar_installed() -> bool:
    try:
        import xgrammar  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_grammar_backend(name: str, device_type: str) -> str:
    """`auto`: xgrammar on a GPU when the extra is installed (its masks are ~10x cheaper, which matters
    when a step takes a few ms), else llguidance."""
    if name == "auto":
        return "xgrammar" if device_type == "cuda" and xgrammar_installed() else "llguidance"
    if name not in BACKENDS:
        raise ValueError(f"unknown grammar backend {name!r}; choose auto, {' or '.join(BACKENDS)}")
    return name


def make_backend(tokenizer, eos_ids: list[int], name: str = "llguidance") -> GrammarBackend:
    """`llguidance` (the default, always installed) or `xgrammar` (the optional extra, for GPU servers)."""
    if name == "llguidance":
        from thinkgate.structured.llguidance_backend import LLGuidanceBackend

        return LLGuidanceBackend(tokenizer, eos_ids)
    if name == "xgrammar":
        if not xgrammar_installed():
            raise ValueError("the xgrammar backend needs the optional extra: pip install 'thinkgate[xgrammar]'")
        from thinkgate.structured.xgrammar_backend import XGrammarBackend

        return XGrammarBackend(tokenizer, eos_ids)
    raise ValueError(f"unknown grammar backend {name!r}; available: {', '.join(BACKENDS)}")
