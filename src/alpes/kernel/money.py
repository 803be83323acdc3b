"""Validation of money and percentages arriving over HTTP (exact decimals, never floats)."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import Annotated

from pydantic import BeforeValidator

# ISO 4217 codes the platform books. Money in an unknown currency is refused, not guessed.
CURRENCIES = frozenset({
    "EUR", "USD", "GBP", "COP", "MXN", "BRL", "ARS", "CLP", "PEN", "CAD", "AUD", "CHF", "JPY", "SEK", "NOK", "DKK", "PLN",
})
MAX_AMOUNT = Decimal("9999999999999.99")


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


def _currency(value) -> str:
    if not isinstance(value, str) or value.upper() not in CURRENCIES:
        raise ValueError(f"must be one of {', '.join(sorted(CURRENCIES))}")
    return value.upper()


Amount = Annotated[Decimal, BeforeValidator(_amount)]
Percentage = Annotated[Decimal, BeforeValidator(_percentage)]
Currency = Annotated[str, BeforeValidator(_currency)]
