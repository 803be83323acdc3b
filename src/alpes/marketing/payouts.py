"""Payouts and the payment ledger: plain functions over a session.

A payout belongs to an advertiser: it pays one affiliate, in one currency, the commissions of
that advertiser's campaigns (`anunciante_id` null: of the operator's own campaigns), so a brand
only ever pays, and sees, what its own programs owe. Operators create and pay any payout, an
advertiser its own; affiliates read theirs and never create or pay one.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from decimal import Decimal

from sqlalchemy import ColumnElement, false, func, select, true, update
from sqlalchemy.orm import Session

from alpes.kernel.access import ADVERTISER, OPERATOR, SYSTEM, SYSTEM_PRINCIPAL, Principal
from alpes.kernel.db import Database, where_equal
from alpes.kernel.errors import NotAllowed, NotFound
from alpes.kernel.messages import IncomingEvent, OutgoingEvent, new_id, utcnow
from alpes.kernel.outbox import Outbox

from . import domain, tables
from .commissions import campanas_de, rows_visible_to
from .topics import COMISIONES

# "Every advertiser" for create_pagos (None is an advertiser of its own: the operator's campaigns).
TODOS = object()


# -- payouts ---------------------------------------------------------------------------------------
def create_pagos(session: Session, umbral: Decimal, principal: Principal = SYSTEM_PRINCIPAL, *,
                 anunciante_id: str | None | object = TODOS, afiliado_id: str | None = None,
                 now: datetime | None = None) -> tuple[list[str], list[OutgoingEvent]]:
    """One payout per advertiser, affiliate and currency whose approved, unpaid commissions plus
    outstanding negative adjustments reach `umbral`. An advertiser creates its own only (naming
    another advertiser: NotFound); an operator every advertiser's, or `anunciante_id`'s. Its amount
    is summed from its stored lines in this transaction: a payout always equals the sum of its
    lines, by construction."""
    anunciante_id = _payouts_of(principal, anunciante_id)
    k, a, lineas = tables.comisiones, tables.ajustes, tables.pago_lineas
    now = now or utcnow()
    query = select(k.c.id, k.c.afiliado_id, k.c.campana_id, k.c.moneda, k.c.monto).where(
        k.c.estado == domain.APROBADA, k.c.pago_id.is_(None)).order_by(
        k.c.afiliado_id, k.c.moneda, k.c.calculada_en, k.c.id).with_for_update()
    if afiliado_id is not None:
        query = query.where(k.c.afiliado_id == afiliado_id)
    if anunciante_id is not TODOS:
        # The campaign ids are read first, without a lock: the locking read then holds commissions
        # only, never the campaigns a conversion's calculation locks. An owner never changes.
        campana_ids = session.scalars(campanas_de(anunciante_id) if anunciante_id is not None else
                                      select(tables.campanas.c.id).where(tables.campanas.c.anunciante_id.is_(None))).all()
        if not campana_ids:
            return [], []
        query = query.where(k.c.campana_id.in_(campana_ids))
    rows = session.execute(query).all()
    owners = _owners(session, {row.campana_id for row in rows})
    grupos: dict[tuple[str | None, str, str], list[domain.LineaPago]] = {}
    for row in rows:
        grupos.setdefault((owners.get(row.campana_id), row.afiliado_id, row.moneda), []).append(
            domain.LineaPago("comision", row.id, row.monto))
    ids, events = [], []
    for (anunciante, afiliado, moneda) in sorted(grupos, key=lambda g: (g[1], g[2], g[0] or "")):
        comisiones = grupos[(anunciante, afiliado, moneda)]
        ajustes = _ajustes_pendientes(session, anunciante, afiliado, moneda)
        propuesta = domain.proponer_pago(afiliado, moneda, comisiones, ajustes, umbral)
        if propuesta is None:
            continue
        pago_id = new_id()
        session.execute(lineas.insert(), [{"pago_id": pago_id, "linea": n, "tipo": linea.tipo,
                                           "referencia_id": linea.referencia_id, "monto": linea.monto}
                                          for n, linea in enumerate(propuesta.lineas, start=1)])
        monto = session.scalar(select(func.sum(lineas.c.monto)).where(lineas.c.pago_id == pago_id))
        session.execute(tables.pagos.insert().values(id=pago_id, anunciante_id=anunciante, afiliado_id=afiliado,
                                                     moneda=moneda, monto=monto, estado=domain.PAGO_PENDIENTE,
                                                     creado_en=now))
        session.execute(update(k).where(k.c.id.in_([c.referencia_id for c in comisiones])).values(pago_id=pago_id))
        if ajustes:
            session.execute(update(a).where(a.c.id.in_([j.referencia_id for j in ajustes])).values(pago_id=pago_id))
        ids.append(pago_id)
        events.append(OutgoingEvent(COMISIONES, "PagoCreado", pago_id, {
            "id": pago_id, "anunciante_id": anunciante, "afiliado_id": afiliado, "moneda": moneda, "monto": monto,
            "timestamp": now, "lineas": [{"tipo": linea.tipo, "referencia_id": linea.referencia_id,
                                          "monto": linea.monto} for linea in propuesta.lineas]}))
    return ids, events


def _payouts_of(principal: Principal, anunciante_id):
    """Whose payouts the caller may create: an operator (or the scheduler) anyone's, an advertiser
    its own only; an affiliate never (its key cannot reach the route either)."""
    if principal.role in (OPERATOR, SYSTEM):
        return anunciante_id
    if principal.role == ADVERTISER and principal.anunciante_id:
        if anunciante_id not in (TODOS, principal.anunciante_id):
            raise NotFound("anunciante_id", "no advertiser with this id")
        return principal.anunciante_id
    raise NotAllowed(None, "only an operator or the advertiser creates its payouts")


def _owners(session: Session, campana_ids: Iterable[str]) -> dict[str, str | None]:
    """Each campaign's advertiser (None: the operator's)."""
    c = tables.campanas
    ids = sorted(campana_ids)
    return dict(session.execute(select(c.c.id, c.c.anunciante_id).where(c.c.id.in_(ids))).all()) if ids else {}


def _ajustes_pendientes(session: Session, anunciante_id: str | None, afiliado_id: str,
                        moneda: str) -> list[domain.LineaPago]:
    """The affiliate's outstanding negative adjustments in `moneda` that claw back commissions of
    this advertiser's campaigns: one brand's refunds are never netted from another brand's payout."""
    a, k = tables.ajustes, tables.comisiones
    pendientes = session.execute(
        select(a.c.id, a.c.monto, a.c.comision_id).where(a.c.afiliado_id == afiliado_id, a.c.moneda == moneda,
                                                         a.c.pago_id.is_(None))
        .order_by(a.c.creado_en, a.c.id).with_for_update()).all()
    if not pendientes:
        return []
    campana_de = dict(session.execute(select(k.c.id, k.c.campana_id).where(
        k.c.id.in_(sorted({row.comision_id for row in pendientes})))).all())
    owners = _owners(session, set(campana_de.values()))
    return [domain.LineaPago("ajuste", row.id, row.monto) for row in pendientes
            if owners.get(campana_de.get(row.comision_id)) == anunciante_id]


def create_due_pagos(db: Database, outbox: Outbox, umbral: Decimal) -> int:
    """The payout scheduler: what POST /pagos does for every advertiser and affiliate."""
    with db.transaction() as session:
        ids, events = create_pagos(session, umbral)
        outbox.add(session, events)
    return len(ids)


def _paid_by(principal: Principal) -> ColumnElement:
    """Which payouts the caller may pay: an operator any, an advertiser its own, nobody else any."""
    t = tables.pagos
    if principal.role in (OPERATOR, SYSTEM):
        return true()
    if principal.role == ADVERTISER and principal.anunciante_id:
        return t.c.anunciante_id == principal.anunciante_id
    return false()


def _visible(principal: Principal) -> ColumnElement:
    t = tables.pagos
    return rows_visible_to(principal, t.c.afiliado_id, lambda anunciante_id: t.c.anunciante_id == anunciante_id)


def pay_pago(session: Session, pago_id: str, principal: Principal = SYSTEM_PRINCIPAL,
             now: datetime | None = None) -> list[OutgoingEvent]:
    """Mark a payout paid: its commissions become paid (one ComisionPagada each) and PagoRealizado
    lists what it settled. Paying it again changes nothing and emits nothing. Another advertiser's
    payout is NotFound."""
    t, k, lineas = tables.pagos, tables.comisiones, tables.pago_lineas
    pago = session.execute(select(t).where(t.c.id == pago_id, _paid_by(principal)).with_for_update()).mappings().first()
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
        "id": pago_id, "anunciante_id": pago["anunciante_id"], "afiliado_id": pago["afiliado_id"],
        "moneda": pago["moneda"], "monto": pago["monto"], "comision_ids": comision_ids,
        "ajuste_ids": [line["referencia_id"] for line in lines if line["tipo"] == "ajuste"], "timestamp": now}))
    return events


def get_pago(session: Session, pago_id: str, principal: Principal) -> tuple:
    """The payout's row and its lines in order; NotFound for an unknown id or another tenant's."""
    t, lineas = tables.pagos, tables.pago_lineas
    row = session.execute(select(t).where(t.c.id == pago_id, _visible(principal))).mappings().first()
    if row is None:
        raise NotFound("pago_id", "no payout with this id")
    lines = session.execute(select(lineas).where(lineas.c.pago_id == pago_id)
                            .order_by(lineas.c.linea)).mappings().all()
    return row, lines


def list_pagos(session: Session, principal: Principal, limit: int, offset: int, **filters) -> list:
    """Oldest first, the caller's only; `filters`: anunciante_id, afiliado_id, estado (None: any)."""
    t = tables.pagos
    query = select(t).where(_visible(principal)).order_by(t.c.creado_en, t.c.id).limit(limit).offset(offset)
    return session.execute(where_equal(query, t, **filters)).mappings().all()


# -- payment-consumer on comisiones.eventos: the ledger is what the platform owes each affiliate.
# Accruals add, reversals and payouts subtract, adjustments netted in a payout add back what the
# payout withheld; a reversal after a payout leaves the balance negative until then.
_LEDGER_LINE = tables.ledger_pagos.insert()  # built once: one line per commission booked or reversed


def book_accrual(session: Session, event: IncomingEvent) -> list[OutgoingEvent]:
    p = event.payload
    session.execute(_LEDGER_LINE, {"afiliado_id": p["afiliado_id"], "comision_id": p["id"], "tipo": "devengo",
                                   "monto": p["monto"], "moneda": p["moneda"], "registrado_en": utcnow()})
    return []


def book_reversal(session: Session, event: IncomingEvent) -> list[OutgoingEvent]:
    p = event.payload
    session.execute(_LEDGER_LINE, {"afiliado_id": p["afiliado_id"], "comision_id": p["id"], "tipo": "reversion",
                                   "monto": -p["monto"], "moneda": p["moneda"], "registrado_en": utcnow()})
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
    if not rows:  # a payout this service has no lines of: nothing to book (an empty executemany
        return []  # would insert one row of defaults, or fail, and SQLAlchemy deprecates it)
    session.execute(tables.ledger_pagos.insert(), [{
        "afiliado_id": p["afiliado_id"], "moneda": p["moneda"], "monto": -row.monto, "registrado_en": now,
        **({"comision_id": row.referencia_id, "tipo": "pago"} if row.tipo == "comision" else
           {"comision_id": row.comision_id, "tipo": "compensacion"})} for row in rows])
    return []


def _ledger_visible(principal: Principal) -> ColumnElement:
    """An advertiser's lines are those of its campaigns' commissions (a payout line or a withheld
    adjustment is keyed by the commission it pays or claws back)."""
    l, k = tables.ledger_pagos, tables.comisiones
    return rows_visible_to(principal, l.c.afiliado_id, lambda anunciante_id: l.c.comision_id.in_(
        select(k.c.id).where(k.c.campana_id.in_(campanas_de(anunciante_id)))))


def saldos(session: Session, principal: Principal) -> list:
    """The caller's ledger summed per affiliate and currency: (afiliado_id, moneda, lines, balance).
    An advertiser's: what its campaigns owe each affiliate."""
    l = tables.ledger_pagos
    return session.execute(select(l.c.afiliado_id, l.c.moneda, func.count(), func.sum(l.c.monto))
                           .where(_ledger_visible(principal))
                           .group_by(l.c.afiliado_id, l.c.moneda).order_by(l.c.afiliado_id, l.c.moneda)).all()


def ledger_lines(session: Session, principal: Principal, afiliado_id: str | None, limit: int) -> list:
    """The caller's ledger in the order it was written, optionally of one affiliate."""
    l = tables.ledger_pagos
    query = select(l).where(_ledger_visible(principal)).order_by(l.c.id).limit(limit)
    if afiliado_id:
        query = query.where(l.c.afiliado_id == afiliado_id)
    return session.execute(query).mappings().all()
