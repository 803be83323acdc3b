"""Payouts and the payment ledger: plain functions over a session."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from alpes.kernel.db import Database, where_equal
from alpes.kernel.errors import NotFound
from alpes.kernel.messages import IncomingEvent, OutgoingEvent, new_id, utcnow
from alpes.kernel.outbox import Outbox

from . import domain, tables
from .topics import COMISIONES


# -- payouts ---------------------------------------------------------------------------------------
def create_pagos(session: Session, umbral: Decimal, afiliado_id: str | None = None,
                 now: datetime | None = None) -> tuple[list[str], list[OutgoingEvent]]:
    """One payout per affiliate and currency whose approved, unpaid commissions plus outstanding
    negative adjustments reach `umbral`. Its amount is summed from its stored lines in this
    transaction: a payout always equals the sum of its lines, by construction."""
    k, a, lineas = tables.comisiones, tables.ajustes, tables.pago_lineas
    now = now or utcnow()
    query = select(k.c.id, k.c.afiliado_id, k.c.moneda, k.c.monto).where(
        k.c.estado == domain.APROBADA, k.c.pago_id.is_(None)).order_by(
        k.c.afiliado_id, k.c.moneda, k.c.calculada_en, k.c.id).with_for_update()
    if afiliado_id is not None:
        query = query.where(k.c.afiliado_id == afiliado_id)
    grupos: dict[tuple[str, str], list[domain.LineaPago]] = {}
    for row in session.execute(query):
        grupos.setdefault((row.afiliado_id, row.moneda), []).append(domain.LineaPago("comision", row.id, row.monto))
    ids, events = [], []
    for (afiliado, moneda), comisiones in grupos.items():
        ajustes = [domain.LineaPago("ajuste", row.id, row.monto) for row in session.execute(
            select(a.c.id, a.c.monto).where(a.c.afiliado_id == afiliado, a.c.moneda == moneda, a.c.pago_id.is_(None))
            .order_by(a.c.creado_en, a.c.id).with_for_update())]
        propuesta = domain.proponer_pago(afiliado, moneda, comisiones, ajustes, umbral)
        if propuesta is None:
            continue
        pago_id = new_id()
        session.execute(lineas.insert(), [{"pago_id": pago_id, "linea": n, "tipo": linea.tipo,
                                           "referencia_id": linea.referencia_id, "monto": linea.monto}
                                          for n, linea in enumerate(propuesta.lineas, start=1)])
        monto = session.scalar(select(func.sum(lineas.c.monto)).where(lineas.c.pago_id == pago_id))
        session.execute(tables.pagos.insert().values(id=pago_id, afiliado_id=afiliado, moneda=moneda, monto=monto,
                                                     estado=domain.PAGO_PENDIENTE, creado_en=now))
        session.execute(update(k).where(k.c.id.in_([c.referencia_id for c in comisiones])).values(pago_id=pago_id))
        if ajustes:
            session.execute(update(a).where(a.c.id.in_([j.referencia_id for j in ajustes])).values(pago_id=pago_id))
        ids.append(pago_id)
        events.append(OutgoingEvent(COMISIONES, "PagoCreado", pago_id, {
            "id": pago_id, "afiliado_id": afiliado, "moneda": moneda, "monto": monto, "timestamp": now,
            "lineas": [{"tipo": linea.tipo, "referencia_id": linea.referencia_id, "monto": linea.monto}
                       for linea in propuesta.lineas]}))
    return ids, events


def create_due_pagos(db: Database, outbox: Outbox, umbral: Decimal) -> int:
    """The payout scheduler: what POST /pagos does for every affiliate."""
    with db.transaction() as session:
        ids, events = create_pagos(session, umbral)
        outbox.add(session, events)
    return len(ids)


def pay_pago(session: Session, pago_id: str, now: datetime | None = None) -> list[OutgoingEvent]:
    """Mark a payout paid: its commissions become paid (one ComisionPagada each) and PagoRealizado
    lists what it settled. Paying it again changes nothing and emits nothing."""
    t, k, lineas = tables.pagos, tables.comisiones, tables.pago_lineas
    pago = session.execute(select(t).where(t.c.id == pago_id).with_for_update()).mappings().first()
    if pago is None:
        raise NotFound("pago_id", "no payout with this id")
    if pago["estado"] == domain.PAGO_PAGADO:
        return []
    now = now or utcnow()
    session.execute(update(t).where(t.c.id == pago_id).values(estado=domain.PAGO_PAGADO, pagado_en=now))
    lines = session.execute(select(lineas).where(lineas.c.pago_id == pago_id).order_by(lineas.c.linea)).mappings().all()
    comision_ids = [line["referencia_id"] for line in lines if line["tipo"] == "comision"]
    # A commission reversed while its payout waited stays reversed: its adjustment claws it back.
    pagadas = session.execute(select(k).where(k.c.id.in_(comision_ids), k.c.estado == domain.APROBADA)
                              .order_by(k.c.id)).mappings().all()
    events = []
    for row in pagadas:
        session.execute(update(k).where(k.c.id == row["id"]).values(estado=domain.PAGADA, pagada_en=now))
        events.append(OutgoingEvent(COMISIONES, "ComisionPagada", row["id"], {
            "id": row["id"], "conversion_id": row["conversion_id"], "afiliado_id": row["afiliado_id"],
            "pago_id": pago_id, "monto": row["monto"], "moneda": row["moneda"], "timestamp": now},
            correlation_id=row["correlation_id"]))
    events.append(OutgoingEvent(COMISIONES, "PagoRealizado", pago_id, {
        "id": pago_id, "afiliado_id": pago["afiliado_id"], "moneda": pago["moneda"], "monto": pago["monto"],
        "comision_ids": comision_ids, "ajuste_ids": [line["referencia_id"] for line in lines if line["tipo"] == "ajuste"],
        "timestamp": now}))
    return events


def get_pago(session: Session, pago_id: str) -> tuple:
    """The payout's row and its lines in order; NotFound for an unknown id."""
    t, lineas = tables.pagos, tables.pago_lineas
    row = session.execute(select(t).where(t.c.id == pago_id)).mappings().first()
    if row is None:
        raise NotFound("pago_id", "no payout with this id")
    lines = session.execute(select(lineas).where(lineas.c.pago_id == pago_id)
                            .order_by(lineas.c.linea)).mappings().all()
    return row, lines


def list_pagos(session: Session, limit: int, offset: int, **filters) -> list:
    """Oldest first; `filters`: afiliado_id, estado (None: any)."""
    t = tables.pagos
    query = select(t).order_by(t.c.creado_en, t.c.id).limit(limit).offset(offset)
    return session.execute(where_equal(query, t, **filters)).mappings().all()


# -- payment-consumer on comisiones.eventos: the ledger is what the platform owes each affiliate.
# Accruals add, reversals and payouts subtract, adjustments netted in a payout add back what the
# payout withheld; a reversal after a payout leaves the balance negative until then.
def book_accrual(session: Session, event: IncomingEvent) -> list[OutgoingEvent]:
    p = event.payload
    session.execute(tables.ledger_pagos.insert().values(
        afiliado_id=p["afiliado_id"], comision_id=p["id"], tipo="devengo", monto=p["monto"], moneda=p["moneda"],
        registrado_en=utcnow()))
    return []


def book_reversal(session: Session, event: IncomingEvent) -> list[OutgoingEvent]:
    p = event.payload
    session.execute(tables.ledger_pagos.insert().values(
        afiliado_id=p["afiliado_id"], comision_id=p["id"], tipo="reversion", monto=-p["monto"], moneda=p["moneda"],
        registrado_en=utcnow()))
    return []


def book_payout(session: Session, event: IncomingEvent) -> list[OutgoingEvent]:
    """One line per commission the payout paid, one per adjustment it withheld (keyed by the
    reversed commission), from the payout's own lines: their sum is minus the payout's amount."""
    p = event.payload
    lineas, a = tables.pago_lineas, tables.ajustes
    now = utcnow()
    rows = session.execute(select(lineas.c.tipo, lineas.c.referencia_id, lineas.c.monto, a.c.comision_id)
                           .join(a, a.c.id == lineas.c.referencia_id, isouter=True)
                           .where(lineas.c.pago_id == p["id"]).order_by(lineas.c.linea)).all()
    session.execute(tables.ledger_pagos.insert(), [{
        "afiliado_id": p["afiliado_id"], "moneda": p["moneda"], "monto": -row.monto, "registrado_en": now,
        **({"comision_id": row.referencia_id, "tipo": "pago"} if row.tipo == "comision" else
           {"comision_id": row.comision_id, "tipo": "compensacion"})} for row in rows])
    return []


def saldos(session: Session) -> list:
    """The ledger summed per affiliate and currency: (afiliado_id, moneda, lines, balance)."""
    l = tables.ledger_pagos
    return session.execute(select(l.c.afiliado_id, l.c.moneda, func.count(), func.sum(l.c.monto))
                           .group_by(l.c.afiliado_id, l.c.moneda).order_by(l.c.afiliado_id)).all()


def ledger_lines(session: Session, afiliado_id: str | None, limit: int) -> list:
    """The ledger in the order it was written, optionally of one affiliate."""
    l = tables.ledger_pagos
    query = select(l).order_by(l.c.id).limit(limit)
    if afiliado_id:
        query = query.where(l.c.afiliado_id == afiliado_id)
    return session.execute(query).mappings().all()
