"""HTTP routes of payouts and the payment ledger: parse, call `payouts`, shape the answer.
Each caller sees its tenant's payouts and ledger only; operators and the owning advertiser
create and pay payouts (payouts.py keeps them so)."""

from __future__ import annotations

from decimal import Decimal

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict

from alpes.kernel.http import MAX_OFFSET, Identifier
from alpes.kernel.http_access import Caller
from alpes.kernel.runtime import ServiceRuntime

from .. import payouts


class CrearPagos(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    # An advertiser: its own (naming another → 404); an operator: that advertiser's only (default: all).
    anunciante_id: Identifier | None = None
    afiliado_id: Identifier | None = None


def _pago(row) -> dict:
    return {"id": row["id"], "anunciante_id": row["anunciante_id"], "afiliado_id": row["afiliado_id"],
            "moneda": row["moneda"], "monto": str(row["monto"]), "estado": row["estado"],
            "creado_en": row["creado_en"].isoformat(),
            "pagado_en": row["pagado_en"].isoformat() if row["pagado_en"] else None}


def router(runtime: ServiceRuntime, umbral: Decimal) -> APIRouter:
    """`umbral`: the least a payout may amount to (settings.payout_threshold)."""
    router = APIRouter()

    @router.get("/pagos/saldos", tags=["pagos"])
    def saldos(caller: Caller) -> dict:
        """payment-consumer's ledger, summed per affiliate and currency (an advertiser: what its
        campaigns owe; an affiliate: its own balance)."""
        with runtime.db.read() as session:
            rows = payouts.saldos(session, caller)
        return {"saldos": [{"afiliado_id": a, "moneda": m, "lineas": n, "saldo": str(s)} for a, m, n, s in rows]}

    @router.get("/pagos/ledger", tags=["pagos"])
    def ledger(caller: Caller, afiliado_id: str | None = None, limit: int = Query(1000, ge=1, le=10000)) -> dict:
        with runtime.db.read() as session:
            rows = payouts.ledger_lines(session, caller, afiliado_id, limit)
        return {"ledger": [{"id": r["id"], "afiliado_id": r["afiliado_id"], "comision_id": r["comision_id"],
                            "tipo": r["tipo"], "monto": str(r["monto"]), "moneda": r["moneda"],
                            "registrado_en": r["registrado_en"].isoformat()} for r in rows]}

    @router.post("/pagos", tags=["pagos"])
    def crear_pagos(caller: Caller, body: CrearPagos | None = None) -> dict:
        """Create the payouts due now: per advertiser, affiliate and currency, every approved unpaid
        commission of the advertiser's campaigns plus outstanding negative adjustments, when they
        reach the threshold. An advertiser creates its own only. Lists those created."""
        body = body or CrearPagos()
        anunciante_id = payouts.TODOS if body.anunciante_id is None else body.anunciante_id
        with runtime.unit_of_work(caller) as (session, emit):
            ids, events = payouts.create_pagos(session, umbral, caller, anunciante_id=anunciante_id,
                                               afiliado_id=body.afiliado_id)
            emit(events)
        return {"pagos": [pago(pago_id, caller) for pago_id in ids]}

    @router.get("/pagos", tags=["pagos"])
    def pagos(caller: Caller, anunciante_id: str | None = None, afiliado_id: str | None = None,
              estado: str | None = Query(None, pattern="^(pendiente|pagado)$"),
              limit: int = Query(1000, ge=1, le=10000), offset: int = Query(0, ge=0, le=MAX_OFFSET)) -> dict:
        with runtime.db.read() as session:
            rows = payouts.list_pagos(session, caller, limit, offset, anunciante_id=anunciante_id,
                                      afiliado_id=afiliado_id, estado=estado)
        return {"pagos": [_pago(r) for r in rows]}

    @router.get("/pagos/{pago_id}", tags=["pagos"])
    def pago(pago_id: str, caller: Caller) -> dict:
        """A payout with its lines (commissions and negative adjustments)."""
        with runtime.db.read() as session:
            row, lines = payouts.get_pago(session, pago_id, caller)
        return {**_pago(row), "lineas": [{"linea": r["linea"], "tipo": r["tipo"], "referencia_id": r["referencia_id"],
                                          "monto": str(r["monto"])} for r in lines]}

    @router.post("/pagos/{pago_id}/pagar", tags=["pagos"])
    def pagar(pago_id: str, caller: Caller) -> dict:
        """Mark the payout paid (its commissions become paid); paying it again changes nothing.
        An operator pays any payout, an advertiser its own (another's: 404)."""
        with runtime.unit_of_work(caller) as (session, emit):
            emit(payouts.pay_pago(session, pago_id, caller))
        return pago(pago_id, caller)

    return router
