"""Validation of money and percentages arriving over HTTP (exact decimals, never floats)."""

from __future__ import annotations

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


def _decimal(value, *, places: int, low: Decimal, high: Decimal, low_inclusive: bool) -> Decimal:
    if isinstance(value, bool) or value is None:
        raise ValueError("must be a decimal number")
    try:
        number = Decimal(str(value)) if not isinstance(value, Decimal) else value
    except (InvalidOperation, ValueError):
        raise ValueError("must be a decimal number") from None
    if not number.is_finite():
        raise ValueError("must be a finite decimal number")
    if number.as_tuple().exponent < -places and number != number.quantize(Decimal(1).scaleb(-places)):
        raise ValueError(f"at most {places} decimal places")
    if number < low or (number == low and not low_inclusive):
        raise ValueError(f"must be {'at least' if low_inclusive else 'greater than'} {low}")
    if number > high:
        raise ValueError(f"must be at most {high}")
    return number.quantize(Decimal(1).scaleb(-places))


def _amount(value) -> Decimal:
    return _decimal(value, places=2, low=Decimal(0), high=MAX_AMOUNT, low_inclusive=False)


def _percentage(value) -> Decimal:
    return _decimal(value, places=4, low=Decimal(0), high=Decimal(100), low_inclusive=True)


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
    {"type": "string", "pattern": r"^(0\.(0[1-9]|[1-9][0-9]?)|[1-9][0-9]{0,12}(\.[0-9]{1,2})?)$"},
    {"type": "number", "exclusiveMinimum": 0, "maximum": float(MAX_AMOUNT)}],
    "description": "exact decimal, more than 0, at most 2 places (0 for JPY and CLP), a string preferably"}
_PERCENTAGE_SCHEMA = {"anyOf": [
    {"type": "string", "pattern": r"^(100(\.0{1,4})?|[0-9]{1,2}(\.[0-9]{1,4})?)$"},
    {"type": "number", "minimum": 0, "maximum": 100}],
    "description": "exact decimal from 0 to 100, at most 4 places, a string preferably"}

Amount = Annotated[Decimal, BeforeValidator(_amount), WithJsonSchema(_AMOUNT_SCHEMA)]
Percentage = Annotated[Decimal, BeforeValidator(_percentage), WithJsonSchema(_PERCENTAGE_SCHEMA)]
Currency = Annotated[str, BeforeValidator(_currency), WithJsonSchema({"type": "string", "enum": sorted(CURRENCIES),
                                                                      "description": "ISO 4217 code"})]
