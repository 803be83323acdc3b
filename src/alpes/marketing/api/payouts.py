"""HTTP routes of payouts and the payment ledger: parse, call `payouts`, shape the answer."""

from __future__ import annotations

from decimal import Decimal

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict

from alpes.kernel.http import MAX_OFFSET, Identifier
from alpes.kernel.runtime import ServiceRuntime

from .. import payouts


class CrearPagos(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    afiliado_id: Identifier | None = None


def _pago(row) -> dict:
    return {"id": row["id"], "afiliado_id": row["afiliado_id"], "moneda": row["moneda"], "monto": str(row["monto"]),
            "estado": row["estado"], "creado_en": row["creado_en"].isoformat(),
            "pagado_en": row["pagado_en"].isoformat() if row["pagado_en"] else None}


def router(runtime: ServiceRuntime, umbral: Decimal) -> APIRouter:
    """`umbral`: the least a payout may amount to (settings.payout_threshold)."""
    router = APIRouter()

    @router.get("/pagos/saldos", tags=["pagos"])
    def saldos() -> dict:
        """payment-consumer's ledger, summed per affiliate and currency."""
        with runtime.db.read() as session:
            rows = payouts.saldos(session)
        return {"saldos": [{"afiliado_id": a, "moneda": m, "lineas": n, "saldo": str(s)} for a, m, n, s in rows]}

    @router.get("/pagos/ledger", tags=["pagos"])
    def ledger(afiliado_id: str | None = None, limit: int = Query(1000, ge=1, le=10000)) -> dict:
        with runtime.db.read() as session:
            rows = payouts.ledger_lines(session, afiliado_id, limit)
        return {"ledger": [{"id": r["id"], "afiliado_id": r["afiliado_id"], "comision_id": r["comision_id"],
                            "tipo": r["tipo"], "monto": str(r["monto"]), "moneda": r["moneda"],
                            "registrado_en": r["registrado_en"].isoformat()} for r in rows]}

    @router.post("/pagos", tags=["pagos"])
    def crear_pagos(body: CrearPagos | None = None) -> dict:
        """Create the payouts due now: per affiliate and currency, every approved unpaid commission
        plus outstanding negative adjustments, when they reach the threshold. Lists those created."""
        afiliado_id = body.afiliado_id if body else None
        with runtime.unit_of_work() as (session, emit):
            ids, events = payouts.create_pagos(session, umbral, afiliado_id)
            emit(events)
        return {"pagos": [pago(pago_id) for pago_id in ids]}

    @router.get("/pagos", tags=["pagos"])
    def pagos(afiliado_id: str | None = None, estado: str | None = Query(None, pattern="^(pendiente|pagado)$"),
              limit: int = Query(1000, ge=1, le=10000), offset: int = Query(0, ge=0, le=MAX_OFFSET)) -> dict:
        with runtime.db.read() as session:
            rows = payouts.list_pagos(session, limit, offset, afiliado_id=afiliado_id, estado=estado)
        return {"pagos": [_pago(r) for r in rows]}

    @router.get("/pagos/{pago_id}", tags=["pagos"])
    def pago(pago_id: str) -> dict:
        """A payout with its lines (commissions and negative adjustments)."""
        with runtime.db.read() as session:
            row, lines = payouts.get_pago(session, pago_id)
        return {**_pago(row), "lineas": [{"linea": r["linea"], "tipo": r["tipo"], "referencia_id": r["referencia_id"],
                                          "monto": str(r["monto"])} for r in lines]}

    @router.post("/pagos/{pago_id}/pagar", tags=["pagos"])
    def pagar(pago_id: str) -> dict:
        """Mark the payout paid (its commissions become paid); paying it again changes nothing."""
        with runtime.unit_of_work() as (session, emit):
            emit(payouts.pay_pago(session, pago_id))
        return pago(pago_id)

    return router
