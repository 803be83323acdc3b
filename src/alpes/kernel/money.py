"""Validation of money and percentages arriving over HTTP (exact decimals, never floats).

Strict: a decimal string is taken only in the form the OpenAPI publishes (AMOUNT_PATTERN,
PERCENTAGE_PATTERN: ASCII digits, an optional point and decimals). Python's Decimal() would also
take full-width or other Unicode digits, `_` separators, surrounding whitespace, signs and
exponents (`"１２３"`, `"5_000"`, `" 5 "`, `"1E+2"`): all refused here. JSON numbers stay accepted,
as documented (`type: number`), read through their shortest exact representation."""

from __future__ import annotations

import math
import re
from decimal import Decimal, InvalidOperation
from typing import Annotated

from pydantic import BeforeValidator, WithJsonSchema

# ISO 4217 codes the platform books. Money in an unknown currency is refused, not guessed.
CURRENCIES = frozenset({
    "EUR", "USD", "GBP", "COP", "MXN", "BRL", "ARS", "CLP", "PEN", "CAD", "AUD", "CHF", "JPY", "SEK", "NOK", "DKK", "PLN",
})
MAX_AMOUNT = Decimal("9999999999999.99")
# ISO 4217 minor units where they are not 2: no yen or Chilean peso has cents.
MINOR_UNITS = {"JPY": 0, "CLP": 0}


# What the OpenAPI publishes for decimal strings (and all a string may be): ASCII only, no sign,
# exponent, separators, spaces or leading zeros, no more places than the type takes.
AMOUNT_PATTERN = re.compile(r"(0\.(0[1-9]|[1-9][0-9]?)|[1-9][0-9]{0,12}(\.[0-9]{1,2})?)")
PERCENTAGE_PATTERN = re.compile(r"(100(\.0{1,4})?|[0-9]{1,2}(\.[0-9]{1,4})?)")
# The lexical form checked first, so the reason says what is wrong with the writing; the range and
# places checks after it give their own reasons; the pattern last (leading or trailing zeros).
_DECIMAL_TEXT = re.compile(r"[0-9]+(\.[0-9]+)?")
_NOT_TEXT = ("must be a decimal string of ASCII digits 0-9 with an optional point and decimals (e.g. 12.50): "
             "no sign, exponent, spaces, separators or other digits")


def _number(value) -> Decimal:
    if isinstance(value, bool) or value is None:
        raise ValueError("must be a decimal number")
    if isinstance(value, str):
        # fullmatch: `$` would let a trailing newline through; [0-9] is ASCII, unlike \d.
        if not _DECIMAL_TEXT.fullmatch(value):
            raise ValueError(_NOT_TEXT)
        return Decimal(value)
    if isinstance(value, Decimal):  # from our own code, not from JSON
        return value
    if isinstance(value, int):
        return Decimal(value)
    if isinstance(value, float):  # a JSON number: its shortest repr is the literal the caller wrote
        if not math.isfinite(value):
            raise ValueError("must be a finite decimal number")
        try:
            return Decimal(repr(value))
        except (InvalidOperation, ValueError):
            raise ValueError("must be a decimal number") from None
    raise ValueError("must be a decimal number")


def _decimal(value, *, places: int, low: Decimal, high: Decimal, low_inclusive: bool,
             pattern: re.Pattern[str]) -> Decimal:
    number = _number(value)
    if not number.is_finite():
        raise ValueError("must be a finite decimal number")
    if number.as_tuple().exponent < -places and number != number.quantize(Decimal(1).scaleb(-places)):
        raise ValueError(f"at most {places} decimal places")
    if number < low or (number == low and not low_inclusive):
        raise ValueError(f"must be {'at least' if low_inclusive else 'greater than'} {low}")
    if number > high:
        raise ValueError(f"must be at most {high}")
    if isinstance(value, str) and not pattern.fullmatch(value):
        raise ValueError(f"must be written as the pattern ^{pattern.pattern}$ (no leading zeros, "
                         f"at most {places} decimal places)")
    return number.quantize(Decimal(1).scaleb(-places))


def _amount(value) -> Decimal:
    return _decimal(value, places=2, low=Decimal(0), high=MAX_AMOUNT, low_inclusive=False, pattern=AMOUNT_PATTERN)


def _percentage(value) -> Decimal:
    return _decimal(value, places=4, low=Decimal(0), high=Decimal(100), low_inclusive=True,
                    pattern=PERCENTAGE_PATTERN)


def check_places(amount: Decimal, currency: str | None) -> Decimal:
    """`amount` (already an Amount) in `currency`: refused when it has more decimals than the
    currency has minor units (an unknown currency is reported on its own field)."""
    places = MINOR_UNITS.get(currency or "", 2)
    if amount != amount.quantize(Decimal(1).scaleb(-places)):
        raise ValueError(f"{currency} takes at most {places} decimal places")
    return amount


def _currency(value) -> str:
    if not isinstance(value, str) or value.upper() not in CURRENCIES:
        raise ValueError(f"must be one of {', '.join(sorted(CURRENCIES))}")
    return value.upper()


# What the OpenAPI says, so clients (and schemathesis) know: decimal strings (numbers are taken too).
_AMOUNT_SCHEMA = {"anyOf": [
    {"type": "string", "pattern": f"^{AMOUNT_PATTERN.pattern}$"},
    {"type": "number", "exclusiveMinimum": 0, "maximum": float(MAX_AMOUNT)}],
    "description": "exact decimal, more than 0, at most 2 places (0 for JPY and CLP), a string preferably"}
_PERCENTAGE_SCHEMA = {"anyOf": [
    {"type": "string", "pattern": f"^{PERCENTAGE_PATTERN.pattern}$"},
    {"type": "number", "minimum": 0, "maximum": 100}],
    "description": "exact decimal from 0 to 100, at most 4 places, a string preferably"}

Amount = Annotated[Decimal, BeforeValidator(_amount), WithJsonSchema(_AMOUNT_SCHEMA)]
Percentage = Annotated[Decimal, BeforeValidator(_percentage), WithJsonSchema(_PERCENTAGE_SCHEMA)]
Currency = Annotated[str, BeforeValidator(_currency), WithJsonSchema({"type": "string", "enum": sorted(CURRENCIES),
                                                                      "description": "ISO 4217 code"})]
