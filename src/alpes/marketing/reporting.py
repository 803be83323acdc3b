"""Reporting: the two read models (conversion analytics, commissions by state) kept by their
consumers, and the report built from them with its rates. Plain functions over a session."""

from __future__ import annotations

from datetime import date
from decimal import ROUND_HALF_UP, Decimal

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from alpes.kernel.access import ADVERTISER, AFFILIATE, Principal
from alpes.kernel.db import upsert_add, where_equal
from alpes.kernel.errors import NotFound, RuleViolated
from alpes.kernel.messages import IncomingEvent, OutgoingEvent

from . import domain, tables
from .commissions import campanas_de, de_sus_campanas, rows_visible_to


# -- analytics-consumer on conversiones.eventos: conversions per day, campaign and affiliate -------
def _add_to_analytics(session: Session, event: IncomingEvent, increments: dict, dia: date | None = None) -> None:
    """Add to the event's day (or `dia`) for its campaign and affiliate."""
    p = event.payload
    upsert_add(session, tables.analitica_conversiones,
               {"dia": dia or p["timestamp"].date(), "campana_id": p["campaign_id"], "afiliado_id": p["affiliate_id"]},
               {"detectadas": 0, "validadas": 0, "rechazadas": 0, "ingresos": Decimal(0), "clicks": 0,
                "reembolsadas": 0, "ingresos_reembolsados": Decimal(0), **increments})


def _count_conversion(column: str, with_revenue: bool = False):
    def handler(session: Session, event: IncomingEvent) -> list[OutgoingEvent]:
        increments = {column: 1}
        if with_revenue:
            increments["ingresos"] = event.payload["conversion_value"]
        _add_to_analytics(session, event, increments)
        return []
    return handler


count_detected = _count_conversion("detectadas")
count_validated = _count_conversion("validadas", with_revenue=True)
count_rejected = _count_conversion("rechazadas")


def count_click(session: Session, event: IncomingEvent) -> list[OutgoingEvent]:
    _add_to_analytics(session, event, {"clicks": 1})
    return []


def count_clicks(session: Session, event: IncomingEvent) -> list[OutgoingEvent]:
    """ClicksRecorded: one link's clicks, each on its own day (one upsert per day in the batch)."""
    per_day: dict[date, int] = {}
    for click in event.payload["clicks"]:
        day = click["timestamp"].date()
        per_day[day] = per_day.get(day, 0) + 1
    for day, clicks in per_day.items():
        _add_to_analytics(session, event, {"clicks": clicks}, dia=day)
    return []


def count_refunded(session: Session, event: IncomingEvent) -> list[OutgoingEvent]:
    """On the refund's day; `ingresos` keeps what was validated, the refunded revenue sits beside it."""
    _add_to_analytics(session, event, {"reembolsadas": 1, "ingresos_reembolsados": event.payload["conversion_value"]})
    return []


def count_rejected_conversion(session: Session, event: IncomingEvent) -> list[OutgoingEvent]:
    """ConversionRejected. A compensation (v2, compensation=true) undoes a validation counted on
    the day it was validated: there it moves from `validadas` (and its revenue) to `rechazadas`,
    so a validated-then-compensated conversion never counts as both."""
    p = event.payload
    if not (p.get("compensation") and p.get("validated_at") and p.get("conversion_value") is not None):
        return count_rejected(session, event)
    _add_to_analytics(session, event, {"validadas": -1, "rechazadas": 1, "ingresos": -p["conversion_value"]},
                      dia=p["validated_at"].date())
    return []


# -- reporting-consumer on comisiones.eventos: commission amounts by state -------------------------
# The report column holding the amount of commissions in each state.
MONTO_POR_ESTADO = {domain.PENDIENTE: "monto_pendiente", domain.APROBADA: "monto_aprobado",
                    domain.PAGADA: "monto_pagado", domain.REVERTIDA: "monto_revertido"}
# A commission only moves forward: pending → approved → paid, and any of them → reversed.
_ORDEN_ESTADO = {domain.PENDIENTE: 0, domain.APROBADA: 1, domain.PAGADA: 2, domain.REVERTIDA: 3}


_REPORTED_STATE = tables.reporte_comision_estado.insert()  # built once: one per commission


def report_comision(session: Session, event: IncomingEvent) -> list[OutgoingEvent]:
    p = event.payload
    dia = p["timestamp"].date()
    upsert_add(session, tables.reporte_comisiones,
               {"dia": dia, "campana_id": p["campana_id"], "afiliado_id": p["afiliado_id"]},
               {"comisiones": 1, "monto": p["monto"], "monto_pendiente": p["monto"], "monto_aprobado": Decimal(0),
                "monto_pagado": Decimal(0), "monto_revertido": Decimal(0)})
    session.execute(_REPORTED_STATE, {"comision_id": p["id"], "dia": dia, "campana_id": p["campana_id"],
                                      "afiliado_id": p["afiliado_id"], "monto": p["monto"], "estado": domain.PENDIENTE})
    return []


def _move_reported_comision(estado: str):
    """Move the commission's amount from its reported state to `estado`, on the day it was
    calculated, so each day's split always adds up to its `monto`. Same topic and key as its
    ComisionCalculada, so that came first; a commission calculated before this report kept
    state (no row) stays counted where it was."""
    def handler(session: Session, event: IncomingEvent) -> list[OutgoingEvent]:
        r = tables.reporte_comision_estado
        row = session.execute(select(r).where(r.c.comision_id == event.payload["id"]).with_for_update()).mappings().first()
        if row is None or _ORDEN_ESTADO[row["estado"]] >= _ORDEN_ESTADO[estado]:
            return []
        upsert_add(session, tables.reporte_comisiones,
                   {"dia": row["dia"], "campana_id": row["campana_id"], "afiliado_id": row["afiliado_id"]},
                   {MONTO_POR_ESTADO[row["estado"]]: -row["monto"], MONTO_POR_ESTADO[estado]: row["monto"]})
        session.execute(update(r).where(r.c.comision_id == row["comision_id"]).values(estado=estado))
        return []
    return handler


report_approved_comision = _move_reported_comision(domain.APROBADA)
report_paid_comision = _move_reported_comision(domain.PAGADA)
report_reversed_comision = _move_reported_comision(domain.REVERTIDA)


# -- the report: both read models merged, summed and with their rates ------------------------------
_CONTADORES = ("clicks", "detectadas", "validadas", "rechazadas", "reembolsadas", "comisiones")
_IMPORTES = ("ingresos", "ingresos_reembolsados", "monto", "monto_pendiente", "monto_aprobado", "monto_pagado",
             "monto_revertido")
_RATE = Decimal("0.0001")


def report(session: Session, principal: Principal, desde: date | None, hasta: date | None,
           campana_id: str | None = None, afiliado_id: str | None = None) -> list[dict]:
    """One line per day, campaign and affiliate (optionally of one campaign or affiliate), of the
    caller's tenant only: a filter naming another tenant's campaign or affiliate yields nothing."""
    lines = _report_lines(session, principal, desde, hasta, campana_id=campana_id, afiliado_id=afiliado_id)
    return _summed(lines, lambda line: (line["dia"], line["campana_id"], line["afiliado_id"]))


def grouped_report(session: Session, principal: Principal, desde: date | None, hasta: date | None, agrupar: str,
                   **one) -> list[dict]:
    """One campaign or one affiliate (`one`: campana_id= or afiliado_id=) across all the others,
    per day (`agrupar="dia"`) or one line for the period ("total"), per currency. Asking for a
    campaign of another advertiser, or an affiliate for another affiliate, is NotFound; an
    advertiser asking for an affiliate sees that affiliate in its own campaigns only."""
    _check_subject(session, principal, **one)
    return _summed(_report_lines(session, principal, desde, hasta, **one), _por(agrupar), **one)


def _check_subject(session: Session, principal: Principal, campana_id: str | None = None,
                   afiliado_id: str | None = None) -> None:
    """The campaign or affiliate a report is about must be one the caller may ask for: otherwise
    NotFound, exactly as for one that does not exist (whether it does is not the caller's business)."""
    if campana_id is not None and principal.role == ADVERTISER:
        c = tables.campanas
        if session.scalar(select(c.c.id).where(c.c.id == campana_id,
                                               c.c.id.in_(campanas_de(principal.anunciante_id)))) is None:
            raise NotFound("campana_id", "no campaign with this id")
    if afiliado_id is not None and principal.role == AFFILIATE and afiliado_id != principal.afiliado_id:
        raise NotFound("afiliado_id", "no affiliate with this id")
    if afiliado_id is not None and principal.role == ADVERTISER:
        # An advertiser asks about the affiliates of its programs only: enrolled in one of its
        # campaigns, or with a commission in one (a campaign without enrollments takes any affiliate).
        own = campanas_de(principal.anunciante_id)
        i, k = tables.inscripciones, tables.comisiones
        if all(session.scalar(select(t.c.afiliado_id).where(t.c.afiliado_id == afiliado_id, t.c.campana_id.in_(own))
                              .limit(1)) is None for t in (i, k)):
            raise NotFound("afiliado_id", "no affiliate with this id")


def _report_lines(session: Session, principal: Principal, desde: date | None, hasta: date | None,
                  **filters) -> list[dict]:
    """The stored figures per day, campaign and affiliate of the caller's tenant, both read models merged."""
    if desde and hasta and desde > hasta:
        raise RuleViolated("desde", "desde is after hasta")
    lines: dict[tuple, dict] = {}
    for table, fields in ((tables.analitica_conversiones, ("clicks", "detectadas", "validadas", "rechazadas",
                                                           "reembolsadas", "ingresos", "ingresos_reembolsados")),
                          (tables.reporte_comisiones, ("comisiones", "monto", "monto_pendiente", "monto_aprobado",
                                                       "monto_pagado", "monto_revertido"))):
        query = where_equal(select(table), table, **filters).where(
            rows_visible_to(principal, table.c.afiliado_id, de_sus_campanas(table.c.campana_id)))
        if desde:
            query = query.where(table.c.dia >= desde)
        if hasta:
            query = query.where(table.c.dia <= hasta)
        for r in session.execute(query).mappings():
            line = lines.setdefault((r["dia"], r["campana_id"], r["afiliado_id"]), {
                "dia": r["dia"].isoformat(), "campana_id": r["campana_id"], "afiliado_id": r["afiliado_id"],
                **{f: 0 for f in _CONTADORES}, **{f: Decimal("0.00") for f in _IMPORTES}})
            for f in fields:
                line[f] += r[f]
    # Money is summed per currency only: each line carries its campaign's currency.
    c = tables.campanas
    campana_ids = {key[1] for key in lines}
    monedas = dict(session.execute(select(c.c.id, c.c.moneda).where(c.c.id.in_(sorted(campana_ids)))).all()) \
        if campana_ids else {}
    for (_, campana_id, _), line in lines.items():
        line["moneda"] = monedas.get(campana_id)
    return [lines[key] for key in sorted(lines)]


def _por(agrupar: str):
    """Per day or for the whole period (None), and per currency: amounts of different
    currencies are never added together."""
    if agrupar == "dia":
        return lambda line: (line["dia"], line["moneda"] or "")
    return lambda line: (None, line["moneda"] or "")


def _summed(lines: list[dict], key, **fixed) -> list[dict]:
    """Sum the lines sharing a key (its first element: a day, or None for the whole period), then
    add the derived figures. A campaign or affiliate that differs within a group (e.g. the
    campaigns of a per-day affiliate report) becomes None, unless given in `fixed`."""
    groups: dict = {}
    for line in lines:
        k = key(line)
        group = groups.get(k)
        if group is None:
            group = groups[k] = {**line, **fixed}
            if k[0] is None:
                group["dia"] = None
            continue
        for f in _CONTADORES + _IMPORTES:
            group[f] += line[f]
        for f in ("campana_id", "afiliado_id"):
            if f not in fixed and group[f] != line[f]:
                group[f] = None
    return [_with_rates(groups[k]) for k in groups]


def _ratio(numerator, denominator) -> str | None:
    return str((Decimal(numerator) / denominator).quantize(_RATE, rounding=ROUND_HALF_UP)) if denominator else None


def _with_rates(line: dict) -> dict:
    """Conversion rates and EPC. tasa_conversion is validated per click when there were clicks,
    else validated per detected conversion (postbacks without tracked clicks); tasa_conversion_base
    says which. EPC: commission earned (pending + approved + paid, not reversed) per click."""
    ganada = line["monto_pendiente"] + line["monto_aprobado"] + line["monto_pagado"]
    line["tasa_validacion"] = _ratio(line["validadas"], line["detectadas"])
    line["tasa_conversion_clicks"] = _ratio(line["validadas"], line["clicks"])
    base = "clicks" if line["clicks"] else "detectadas"
    line["tasa_conversion"] = line["tasa_conversion_clicks"] if line["clicks"] else line["tasa_validacion"]
    line["tasa_conversion_base"] = base
    line["comision_ganada"] = ganada
    line["epc"] = _ratio(ganada, line["clicks"])
    for f in _IMPORTES + ("comision_ganada",):
        line[f] = str(line[f])
    return line
