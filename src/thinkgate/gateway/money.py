"""Exact money. Amounts are integers of 1e-8 CNY ("units"); prices are integer units per 1000 tokens.

The one rounding rule: a request's cost is the exact sum of its token counts times the per-1000 prices,
divided by 1000 and rounded UP to a whole unit, once per request. A price with more than 8 decimal places
of CNY per 1000 tokens is refused rather than rounded. Floats never hold money: values come in as strings
or Decimals and go out as Decimals (a JSON number is written from the Decimal's exact digits).
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

UNITS_PER_CNY = 10**8


def to_units(amount: str | int | Decimal) -> int:
    """CNY (string, int or Decimal; never float) -> units, exactly; ValueError if not a whole number of units."""
    if isinstance(amount, float):
        raise TypeError("money is never a float: pass a string or a Decimal")
    try:
        d = Decimal(amount) * UNITS_PER_CNY
    except InvalidOperation:
        raise ValueError(f"{amount!r} is not an amount of CNY") from None
    if not d.is_finite() or d != d.to_integral_value():
        raise ValueError(f"{amount!r} CNY has more than 8 decimal places")
    return int(d)


def to_cny(units: int) -> Decimal:
    return (Decimal(units) / UNITS_PER_CNY).normalize() if units else Decimal(0)


def json_number(units: int) -> float:
    """A JSON number for `usage.cost`. Exact: every whole number of units below 2**53 survives the float, and
    its shortest repr (what JSON encoders write) is the decimal value."""
    return float(to_cny(units))


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class Price:
    """CNY per 1000 tokens, held as units. Reasoning tokens are output tokens."""

    input_per_1k: int = 0
    output_per_1k: int = 0
    cached_input_per_1k: int | None = None  # None: cached prompt tokens cost the input price

    @classmethod
    def cny(cls, input_per_1k, output_per_1k, cached_input_per_1k=None) -> Price:
        return cls(to_units(input_per_1k), to_units(output_per_1k),
                   None if cached_input_per_1k is None else to_units(cached_input_per_1k))

    @property
    def is_free(self) -> bool:
        return self.input_per_1k == 0 and self.output_per_1k == 0 and not self.cached_input_per_1k

    def cost(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> int:
        cached = min(cached_tokens, prompt_tokens)
        cached_price = self.input_per_1k if self.cached_input_per_1k is None else self.cached_input_per_1k
        milli = ((prompt_tokens - cached) * self.input_per_1k + cached * cached_price
                 + completion_tokens * self.output_per_1k)
        return ceil_div(milli, 1000)

    def describe(self) -> str:
        cached = "-" if self.cached_input_per_1k is None else str(self.cached_input_per_1k)
        return f"{self.input_per_1k}/{self.output_per_1k}/{cached} units per 1k"
