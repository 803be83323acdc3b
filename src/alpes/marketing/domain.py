"""Marketing: programs (campaigns), their commission terms, and the commissions they pay."""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal

CENT = Decimal("0.01")
ACTIVA = "activa"
PENDIENTE = "pendiente"

# What marketing knows of an affiliate, learned on afiliados.eventos.
HABILITADO = "habilitado"
INHABILITADO = "inhabilitado"
RECHAZADO = "rechazado"


def calcular_comision(base: Decimal, porcentaje: Decimal) -> Decimal:
    """Commission of a sale: base × percentage, rounded half-up to the cent. Exact decimals only."""
    if base < 0:
        raise ValueError("a commission base cannot be negative")
    if not (Decimal(0) <= porcentaje <= Decimal(100)):
        raise ValueError("a commission percentage lies between 0 and 100")
    return (base * porcentaje / Decimal(100)).quantize(CENT, rounding=ROUND_HALF_UP)
