"""Bounds on what a JSON grammar lets a model repeat forever: the digits of a number.

JSON and JSON Schema put no limit on a number's length, and neither grammar backend does: a greedy small model
can write `1000000000...` until max_tokens (issue 21). Both backends' matchers are wrapped here by one lexical
bound, the same for llguidance and xgrammar and for the tool-call grammar: at most `int_digits` digits before
the point (16, as llama.cpp's grammars), `frac_digits` after it (16) and `exp_digits` in an exponent (3: a
double's exponent has at most 3). A schema whose own values need more (a `minimum` of 10^20, a `const` with
20 digits) raises the bound to what it needs, up to `MAX_DIGITS`; beyond that the request is refused by name.

The `time` and `date-time` string formats end in fractional seconds of any length in llguidance's grammar (a
model looped on them too): both backends write them as patterns with at most 6 fraction digits
(`FORMAT_PATTERNS`, which also allow only real calendar days; 28 in February).

Whitespace between JSON tokens needs no bound here: both backends are compiled for compact JSON (`,` and `:`
with no whitespace around them, none before or after the value), so there is no whitespace to repeat.

The bound is lexical (it follows the answer's text: strings, numbers and the three parts of a number), so it
knows nothing of which value the grammar is in; where the grammar needs more digits to finish a number than
the bound leaves (an exclusive minimum reached with the last allowed digit), that digit is refused instead, by
asking the grammar whether a comma, bracket, point, exponent or the end may follow it; the grammar's own mask
is used as is only if nothing would be left.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from decimal import ROUND_CEILING, Decimal

import torch

from thinkgate.structured.backend import GrammarError

MAX_DIGITS = 40  # any 128-bit integer; a schema whose values need more digits is refused


@dataclass(frozen=True)
class NumberBounds:
    int_digits: int = 16
    frac_digits: int = 16
    exp_digits: int = 3

    def of(self, mode: int) -> int:
        return (self.int_digits, self.frac_digits, self.exp_digits)[mode - INT]


DEFAULT_BOUNDS = NumberBounds()

# Lexer modes: outside strings and numbers, in a string, after a backslash in a string, and the three digit
# runs of a number (the count in a run is the lexer's second field).
OUT, STR, ESC, INT, FRAC, EXP = range(6)
_DIGITS = frozenset(b"0123456789")


def lex(data: bytes, mode: int, count: int, bounds: NumberBounds | None = None):
    """Advance the lexer over `data`. Returns (mode, count, lead, runs): `lead` is how many digits extended the
    run the lexer started in, `runs` the longest later run of each number part ([int, frac, exp]); with
    `bounds`, returns None as soon as a run passes its bound."""
    lead, leading, runs = 0, mode >= INT, [0, 0, 0]
    for ch in data:
        if mode == STR:
            mode = ESC if ch == 0x5C else OUT if ch == 0x22 else STR
            continue
        if mode == ESC:
            mode = STR
            continue
        if mode >= INT:
            if ch in _DIGITS:
                count += 1
                if leading:
                    lead += 1
                else:
                    runs[mode - INT] = max(runs[mode - INT], count)
                if bounds is not None and count > bounds.of(mode):
                    return None
                continue
            leading = False
            if mode == INT and ch == 0x2E:  # '.'
                mode, count = FRAC, 0
                continue
            if mode in (INT, FRAC) and ch in (0x65, 0x45):  # 'e' 'E'
                mode, count = EXP, 0
                continue
            if mode == EXP and count == 0 and ch in (0x2B, 0x2D):  # exponent sign
                continue
            mode = OUT  # the number ended: this character is read outside it
        if ch == 0x22:
            mode = STR
        elif ch == 0x2D:
            mode, count = INT, 0
        elif ch in _DIGITS:
            mode, count = INT, 1
            runs[0] = max(runs[0], 1)
            if bounds is not None and count > bounds.int_digits:
                return None
    return mode, count, lead, runs


class NumberLexicon:
    """For one tokenizer: how each token that holds a digit moves the lexer from each mode (a few hundred
    tokens of a 150k vocabulary), so a step's mask costs a few tensor operations."""

    def __init__(self, token_bytes: list[bytes], special: set[int], vocab: int, eos_ids: list[int]):
        self.vocab = vocab
        self.text = [b"" if i in special else b for i, b in enumerate(token_bytes)]
        ids = [i for i, b in enumerate(self.text) if any(c in _DIGITS for c in b)]
        self.ids = torch.tensor(ids, dtype=torch.long)
        table = [[lex(self.text[i], mode, 0) for i in ids] for mode in range(6)]
        self.lead = [torch.tensor([r[2] for r in rows], dtype=torch.int32) for rows in table]
        self.runs = [torch.tensor([r[3] for r in rows], dtype=torch.int32).reshape(-1, 3) for rows in table]
        # Where each token leaves the lexer: in the run it started in (all digits), or in a mode and count of
        # its own.
        self.stays = [torch.tensor([r[0] == mode and r[2] == len(self.text[i])
                                    for r, i in zip(rows, ids, strict=True)], dtype=torch.bool)
                      for mode, rows in enumerate(table)]
        self.end_mode = [torch.tensor([r[0] for r in rows], dtype=torch.int32) for rows in table]
        self.end_count = [torch.tensor([r[1] for r in rows], dtype=torch.int32) for rows in table]
        self._plans: dict = {}
        # What may follow a number's digit run in our compact JSON: the first byte of anything else that may
        # (a token is allowed only if its first byte is), the end of the answer, or the tool-call grammar's
        # newline.
        single = {b: i for i, b in enumerate(self.text) if len(b) == 1}
        self.exits = [single[bytes([c])] for c in b',}].eE\n' if bytes([c]) in single] + list(eos_ids)
        self.digit_first = torch.zeros(vocab, dtype=torch.bool)
        first = [i for i, b in enumerate(self.text[:vocab]) if b[:1] and b[0] in _DIGITS]
        self.digit_first[first] = True

    def plan(self, mode: int, count: int, bounds: NumberBounds) -> tuple[torch.Tensor, list[int]]:
        """For a lexer state: the tokens that would take a digit run past its bound, and those that would
        leave one full (no further digit may follow). Cached: a state repeats at every step in a string."""
        key = (mode, count, bounds)
        plan = self._plans.get(key)
        if plan is None:
            limit = torch.tensor([0, 0, 0, bounds.int_digits, bounds.frac_digits, bounds.exp_digits],
                                 dtype=torch.int32)
            over = (self.runs[mode] > limit[INT:]).any(dim=1)
            ends_full = (self.end_mode[mode] >= INT) & (self.end_count[mode] == limit[self.end_mode[mode].long()])
            if mode >= INT:
                over |= self.lead[mode] + count > bounds.of(mode)
                ends_full = torch.where(self.stays[mode], self.lead[mode] + count == bounds.of(mode), ends_full)
            plan = (self.ids[over], self.ids[ends_full & ~over].tolist())
            self._plans[key] = plan
        return plan


class BoundedMatcher:
    """A backend's matcher with the number bounds applied on top of its mask."""

    def __init__(self, inner, lexicon: NumberLexicon, bounds: NumberBounds):
        self.inner = inner
        self.lexicon = lexicon
        self.bounds = bounds
        self.state = (OUT, 0)
        self._history: list[tuple[int, int]] = []

    def allowed_mask(self) -> torch.Tensor:
        mask = self.inner.allowed_mask()
        over, fills = self.lexicon.plan(*self.state, self.bounds)
        refused = [t for t in fills if mask[t] and not self._can_leave_run(t)]
        if not refused and not (len(over) and mask[over].any()):
            return mask
        narrowed = mask.clone()
        narrowed[over] = False
        narrowed[refused] = False
        if narrowed.any():
            return narrowed
        return mask  # nothing left: the grammar needs these digits to finish (see the module's docstring)

    def _can_leave_run(self, token: int) -> bool:
        """After `token` fills a digit run, the grammar allows something other than another digit."""
        return self.inner.accepts_after(token, self.lexicon.exits)

    def accept(self, token: int) -> bool:
        ok = self.inner.accept(token)
        if ok:
            self._history.append(self.state)
            text = self.lexicon.text[token] if token < len(self.lexicon.text) else b""
            mode, count, _, _ = lex(text, *self.state)
            self.state = (mode, count)
        return ok

    def rollback(self, n: int) -> None:
        self.inner.rollback(n)
        if n > 0:
            self.state = self._history[-n]
            del self._history[-n:]

    def is_terminated(self) -> bool:
        return self.inner.is_terminated()

    def is_accepting(self) -> bool:
        return self.inner.is_accepting()


_YEAR = "[1-9][0-9]{3}"
_MONTH_DAY = ("((0[13578]|1[02])-(0[1-9]|[12][0-9]|3[01])|(0[469]|11)-(0[1-9]|[12][0-9]|30)"
              "|02-(0[1-9]|1[0-9]|2[0-8]))")
_TIME = r"([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9]([.][0-9]{1,6}|)(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])"
FORMAT_PATTERNS = {
    "date": f"^{_YEAR}-{_MONTH_DAY}$",
    "date-time": f"^{_YEAR}-{_MONTH_DAY}T{_TIME}$",
    "time": f"^{_TIME}$",
}
_DATA = ("enum", "const", "default", "examples", "required", "description", "title")


def bound_time_formats(schema):
    """A copy of `schema` with `time` and `date-time` strings (without a pattern or length of their own) as
    `FORMAT_PATTERNS`: at most 6 digits of fractional seconds."""
    if isinstance(schema, list):
        return [bound_time_formats(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: (v if k in _DATA else bound_time_formats(v)) for k, v in schema.items()}
    fmt = schema.get("format")
    if fmt in ("time", "date-time") and not {"pattern", "minLength", "maxLength"} & set(schema):
        out.pop("format")
        out["pattern"] = FORMAT_PATTERNS[fmt]
    return out


# -- the bounds a schema needs ----------------------------------------------------------------------------

_NOT_SCHEMA = ("description", "title", "examples", "default", "$comment", "pattern", "format", "required")


def bounds_for(schema) -> NumberBounds:
    """The default bounds, raised where the schema's own values need more digits: a const or enum number (as
    either backend writes it), or a range whose every value is longer. GrammarError past MAX_DIGITS."""
    need = {"int": DEFAULT_BOUNDS.int_digits, "frac": DEFAULT_BOUNDS.frac_digits, "exp": DEFAULT_BOUNDS.exp_digits}
    _walk(schema, need)
    return NumberBounds(need["int"], need["frac"], need["exp"])


def _raise(need: dict, part: str, digits: int, keyword: str, value, margin: int = 0) -> None:
    """Values need `digits` in `part`; the bound allows `margin` more (see _range_need)."""
    if digits > MAX_DIGITS:
        what = {"int": "digits before the decimal point", "frac": "digits after the decimal point",
                "exp": "exponent digits"}[part]
        raise GrammarError(f"{keyword} {json.dumps(value)} needs {digits} {what}; structured outputs allow at "
                           f"most {MAX_DIGITS} in a number")
    need[part] = max(need[part], digits + margin)


def _walk(node, need: dict) -> None:
    if isinstance(node, list):
        for item in node:
            _walk(item, need)
        return
    if not isinstance(node, dict):
        return
    _range_need(node, need)
    for key, value in node.items():
        if key in ("const", "enum"):
            for number in _numbers(value if key == "enum" else [value]):
                for part, digits in _literal_digits(number).items():
                    _raise(need, part, digits, key, number)
        elif key not in _NOT_SCHEMA:
            _walk(value, need)


def _numbers(values) -> list:
    out = []
    for v in values if isinstance(values, list) else [values]:
        if isinstance(v, bool) or v is None or isinstance(v, str):
            continue
        if isinstance(v, int | float):
            out.append(v)
        elif isinstance(v, dict):
            out.extend(_numbers(list(v.values())))
        elif isinstance(v, list):
            out.extend(_numbers(v))
    return out


def _literal_digits(v) -> dict:
    """Digits of each part of `v` as the backends write it: llguidance in full decimal (1e20 as 21 digits),
    xgrammar with 17 significant digits (0.1 as 0.10000000000000001)."""
    if isinstance(v, int):
        return {"int": len(str(abs(v)))}
    if not math.isfinite(v):
        return {}
    forms = [format(Decimal(repr(v)), "f"), f"{v:.17g}", repr(v)]
    need = {"int": 0, "frac": 0, "exp": 0}
    for form in forms:
        mantissa, _, exponent = form.lstrip("-").lower().partition("e")
        whole, _, frac = mantissa.partition(".")
        need["int"] = max(need["int"], len(whole))
        need["frac"] = max(need["frac"], len(frac))
        need["exp"] = max(need["exp"], len(exponent.lstrip("+-")))
    return need


def _range_need(node: dict, need: dict) -> None:
    """A range whose values all have more than the default digits before the point: allow one digit more than
    its smallest value has, so that any prefix the grammar allows can still reach the range (a prefix of that
    length is past the range's lower end)."""
    lo, lo_excl = _bound(node, "minimum", "exclusiveMinimum", max)
    hi, hi_excl = _bound(node, "maximum", "exclusiveMaximum", min)
    smallest = None
    if lo is not None and lo > 0:
        smallest, keyword = lo, "minimum"
    elif hi is not None and hi < 0:
        smallest, keyword = -hi, "maximum"
    if smallest is not None:
        digits = len(str(int(smallest.to_integral_value(rounding=ROUND_CEILING))))
        if digits + 1 > DEFAULT_BOUNDS.int_digits:
            _raise(need, "int", digits, keyword, node.get(keyword, node.get("exclusive" + keyword.title())), 1)
    multiple = node.get("multipleOf")
    if isinstance(multiple, int | float) and not isinstance(multiple, bool):
        for part, digits in _literal_digits(multiple).items():
            if part == "frac":
                _raise(need, part, digits, "multipleOf", multiple)
    if lo is not None and hi is not None and "integer" not in _types(node):
        _fraction_need(lo, lo_excl, hi, hi_excl, need, node)


def _types(node: dict) -> set:
    t = node.get("type")
    return {t} if isinstance(t, str) else set(t) if isinstance(t, list) else set()


def _bound(node: dict, inclusive: str, exclusive: str, pick):
    """(value, exclusive?) of the tighter of the two keywords (draft 4's boolean exclusive form too)."""
    found = []
    v = node.get(inclusive)
    if _is_number(v):
        found.append((Decimal(repr(v)), node.get(exclusive) is True))
    v = node.get(exclusive)
    if _is_number(v):
        found.append((Decimal(repr(v)), True))
    if not found:
        return None, False
    best = pick(d for d, _ in found)
    return best, any(e for d, e in found if d == best)


def _is_number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _fraction_need(lo: Decimal, lo_excl: bool, hi: Decimal, hi_excl: bool, need: dict, node: dict) -> None:
    """A range so narrow that no number with the default fraction digits lies in it: the fewest that do."""
    for digits in range(DEFAULT_BOUNDS.frac_digits, MAX_DIGITS + 1):
        v = lo.scaleb(digits).to_integral_value(rounding=ROUND_CEILING).scaleb(-digits)
        if lo_excl and v == lo:
            v += Decimal(1).scaleb(-digits)
        if v < hi or (v == hi and not hi_excl):
            if digits > DEFAULT_BOUNDS.frac_digits:
                _raise(need, "frac", digits, "minimum", node.get("minimum", node.get("exclusiveMinimum")), 1)
            return
    if lo < hi or (lo == hi and not (lo_excl or hi_excl)):
        _raise(need, "frac", MAX_DIGITS + 1, "minimum", node.get("minimum", node.get("exclusiveMinimum")))
