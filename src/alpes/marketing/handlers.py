"""Marketing use cases and message handlers: plain functions over a session."""

from __future__ import annotations

import json
from datetime import date, datetime
from decimal import Decimal

from sqlalchemy import exists, func, select, update
from sqlalchemy.orm import Session

from alpes.kernel.db import Database, upsert_add
from alpes.kernel.http import Problem
from alpes.kernel.messages import IncomingEvent, OutgoingEvent, new_id, utcnow
from alpes.kernel.outbox import Outbox

from . import domain, tables

MARKETING = "marketing.eventos"
COMISIONES = "comisiones.eventos"


def create_campana(session: Session, nueva: domain.NuevaCampana) -> tuple[str, list[OutgoingEvent]]:
    campana_id = new_id()
    now = utcnow()
    estado = domain.ACTIVA if nueva.activa else domain.BORRADOR
    seg = nueva.segmentacion
    session.execute(tables.campanas.insert().values(
        id=campana_id, nombre=nueva.nombre, porcentaje_comision=nueva.porcentaje_comision, moneda=nueva.moneda,
        estado=estado, creada_en=now, fecha_inicio=nueva.vigencia.fecha_inicio, fecha_fin=nueva.vigencia.fecha_fin,
        landing_url=nueva.landing_url, presupuesto=nueva.presupuesto,
        ventana_atribucion_dias=nueva.ventana_atribucion_dias, periodo_bloqueo_dias=nueva.periodo_bloqueo_dias,
        paises=",".join(sorted(seg.paises)), canales=",".join(sorted(seg.canales)),
        categorias=",".join(sorted(seg.categorias)), min_segundos_click_conversion=nueva.min_segundos_click_conversion,
        modelo_atribucion=nueva.modelo_atribucion))
    return campana_id, [OutgoingEvent(MARKETING, "CampanaCreada", campana_id, {
        "id": campana_id, "nombre": nueva.nombre, "porcentaje_comision": nueva.porcentaje_comision,
        "moneda": nueva.moneda, "timestamp": now, "estado": estado, "fecha_inicio": nueva.vigencia.fecha_inicio,
        "fecha_fin": nueva.vigencia.fecha_fin, "landing_url": nueva.landing_url, "presupuesto": nueva.presupuesto,
        "ventana_atribucion_dias": nueva.ventana_atribucion_dias, "periodo_bloqueo_dias": nueva.periodo_bloqueo_dias,
        "paises": sorted(seg.paises), "canales": sorted(seg.canales), "categorias": sorted(seg.categorias),
        "min_segundos_click_conversion": nueva.min_segundos_click_conversion,
        "modelo_atribucion": nueva.modelo_atribucion})]


def change_campana_estado(session: Session, campana_id: str, accion: str) -> list[OutgoingEvent]:
    """activar / pausar / finalizar: the new state and its event commit together."""
    c = tables.campanas
    estado = session.scalar(select(c.c.estado).where(c.c.id == campana_id).with_for_update())
    if estado is None:
        raise Problem(404, "campana_id", "no campaign with this id")
    try:
        nuevo, evento = domain.transicion(estado, accion)
    except domain.TransicionInvalida as error:
        raise Problem(409, "estado", str(error)) from None
    now = utcnow()
    session.execute(update(c).where(c.c.id == campana_id).values(estado=nuevo, actualizada_en=now))
    return [OutgoingEvent(MARKETING, evento, campana_id, {"id": campana_id, "timestamp": now})]


# -- marketing-consumer on afiliados.eventos ----------------------------------------------
def enable_afiliado(session: Session, event: IncomingEvent) -> list[OutgoingEvent]:
    """A validated, approved or reactivated affiliate may take part in programs: tell conversiones
    through our topic. Idempotent per state: one already enabled is not announced twice."""
    afiliado_id = event.payload["id"]
    if not _set_estado_afiliado(session, afiliado_id, domain.HABILITADO):
        return []
    email_sha256 = session.scalar(select(tables.afiliados.c.email_sha256)
                                  .where(tables.afiliados.c.afiliado_id == afiliado_id))
    return [OutgoingEvent(MARKETING, "AfiliadoHabilitado", afiliado_id,
                          {"afiliado_id": afiliado_id, "timestamp": utcnow(), "email_sha256": email_sha256})] + \
        _change_inscripciones(session, afiliado_id, domain.INSCRIPCION_SUSPENDIDA, domain.INSCRIPCION_ACTIVA,
                              "InscripcionReactivada", {})


def disable_afiliado(session: Session, event: IncomingEvent) -> list[OutgoingEvent]:
    """A suspended affiliate takes part in no program until reactivated: tell conversiones."""
    afiliado_id = event.payload["id"]
    if not _set_estado_afiliado(session, afiliado_id, domain.INHABILITADO):
        return []
    return [OutgoingEvent(MARKETING, "AfiliadoInhabilitado", afiliado_id, {
        "afiliado_id": afiliado_id, "motivo": event.payload["motivo"], "timestamp": utcnow()})] + \
        _change_inscripciones(session, afiliado_id, domain.INSCRIPCION_ACTIVA, domain.INSCRIPCION_SUSPENDIDA,
                              "InscripcionSuspendida", {"motivo": event.payload["motivo"]})


def _change_inscripciones(session: Session, afiliado_id: str, desde: str, hacia: str, evento: str,
                          extra: dict) -> list[OutgoingEvent]:
    """Suspend or reactivate every enrollment of the affiliate, one event each. Keyed by the
    affiliate, like AfiliadoInhabilitado/Habilitado, so conversiones sees them in that order."""
    i = tables.inscripciones
    rows = session.execute(select(i).where(i.c.afiliado_id == afiliado_id, i.c.estado == desde)
                           .order_by(i.c.inscrita_en, i.c.id)).mappings().all()
    now = utcnow()
    events = []
    for row in rows:
        session.execute(update(i).where(i.c.id == row["id"]).values(estado=hacia, actualizada_en=now))
        events.append(OutgoingEvent(MARKETING, evento, afiliado_id, {
            "inscripcion_id": row["id"], "campana_id": row["campana_id"], "afiliado_id": afiliado_id,
            "link_code": row["link_code"], **extra, "timestamp": now}))
    return events


def _set_estado_afiliado(session: Session, afiliado_id: str, estado: str) -> bool:
    """Record the affiliate's state; False when it already was in that state (nothing to announce)."""
    t = tables.afiliados
    actual = session.scalar(select(t.c.estado).where(t.c.afiliado_id == afiliado_id).with_for_update())
    if actual == estado:
        return False
    if actual is None:
        session.execute(t.insert().values(afiliado_id=afiliado_id, estado=estado, actualizado_en=utcnow()))
    else:
        session.execute(update(t).where(t.c.afiliado_id == afiliado_id).values(estado=estado, actualizado_en=utcnow()))
    return True


def note_rejected_afiliado(session: Session, event: IncomingEvent) -> list[OutgoingEvent]:
    t = tables.afiliados
    afiliado_id = event.payload["id"]
    actual = session.scalar(select(t.c.estado).where(t.c.afiliado_id == afiliado_id).with_for_update())
    if actual is None:
        session.execute(t.insert().values(afiliado_id=afiliado_id, estado=domain.RECHAZADO, actualizado_en=utcnow()))
    elif actual == domain.REGISTRADO:  # known only from its registration: now we know it was rejected
        session.execute(update(t).where(t.c.afiliado_id == afiliado_id).values(
            estado=domain.RECHAZADO, actualizado_en=utcnow()))
    return []


def note_registered_afiliado(session: Session, event: IncomingEvent) -> list[OutgoingEvent]:
    """Remember the affiliate's country (v2; None for v1) to check campaign segmentation on enrollment.
    It takes part in nothing until validated or approved."""
    t = tables.afiliados
    afiliado_id, pais = event.payload["id"], event.payload.get("pais")
    email = event.payload.get("email")
    email_sha256 = domain.email_sha256(email) if email else None  # only the hash: see AfiliadoHabilitado
    if session.scalar(select(exists().where(t.c.afiliado_id == afiliado_id))):
        session.execute(update(t).where(t.c.afiliado_id == afiliado_id).values(pais=pais, email_sha256=email_sha256))
    else:
        session.execute(t.insert().values(afiliado_id=afiliado_id, estado=domain.REGISTRADO, pais=pais,
                                          email_sha256=email_sha256, actualizado_en=utcnow()))
    return []


# -- enrollments ------------------------------------------------------------------------------
def enroll_afiliado(session: Session, campana_id: str, afiliado_id: str, canal: str | None,
                    categoria: str | None) -> tuple[str, bool, list[OutgoingEvent]]:
    """Enroll an enabled affiliate in a campaign its segmentation admits; it gets a tracking link.
    Returns (enrollment id, created?, events); enrolling again returns the existing enrollment."""
    c, a, i = tables.campanas, tables.afiliados, tables.inscripciones
    campana = session.execute(select(c).where(c.c.id == campana_id)).mappings().first()
    if campana is None:
        raise Problem(404, "campana_id", "no campaign with this id")
    if campana["estado"] == domain.FINALIZADA:
        raise Problem(409, "estado", "a finished campaign takes no enrollments")
    afiliado = session.execute(select(a).where(a.c.afiliado_id == afiliado_id)).mappings().first()
    if afiliado is None or afiliado["estado"] != domain.HABILITADO:
        estado = "unknown" if afiliado is None else afiliado["estado"]
        raise Problem(409, "afiliado_id", f"only enabled affiliates may enroll (this one: {estado})")
    existing = session.scalar(select(i.c.id).where(i.c.campana_id == campana_id, i.c.afiliado_id == afiliado_id))
    if existing is not None:
        return existing, False, []
    segmentacion = domain.Segmentacion(*(frozenset(v for v in campana[k].split(",") if v)
                                         for k in ("paises", "canales", "categorias")))
    incumplido = segmentacion.criterio_incumplido(afiliado["pais"], canal, categoria)
    if incumplido is not None:
        raise Problem(409, incumplido, f"the campaign's segmentation does not admit this {incumplido}")
    link_code = domain.nuevo_link_code()
    while session.scalar(select(exists().where(i.c.link_code == link_code))):
        link_code = domain.nuevo_link_code()  # 50 random bits: practically never loops
    inscripcion_id, now = new_id(), utcnow()
    session.execute(i.insert().values(id=inscripcion_id, campana_id=campana_id, afiliado_id=afiliado_id,
                                      link_code=link_code, canal=canal, categoria=categoria,
                                      estado=domain.INSCRIPCION_ACTIVA, inscrita_en=now, actualizada_en=now))
    return inscripcion_id, True, [OutgoingEvent(MARKETING, "AfiliadoInscrito", afiliado_id, {
        "inscripcion_id": inscripcion_id, "campana_id": campana_id, "afiliado_id": afiliado_id,
        "link_code": link_code, "timestamp": now})]


# -- marketing-consumer on conversiones.eventos ---------------------------------------------
def calculate_comision(session: Session, event: IncomingEvent) -> list[OutgoingEvent]:
    p = event.payload
    c = tables.comisiones
    if session.scalar(select(exists().where(c.c.conversion_id == p["conversion_id"]))):
        return []  # the unique key on conversion_id guards races; this skips the common duplicate
    if session.scalar(select(exists().where(tables.conversiones_reembolsadas.c.conversion_id == p["conversion_id"]))):
        return []  # refunded before its commission was booked: never booked
    # The campaign row is locked while its budget and caps are read and the commission booked:
    # two conversions of one campaign never both spend the same remaining budget (on SQLite the
    # write lock taken at BEGIN serializes them anyway).
    campana = session.execute(select(tables.campanas).where(tables.campanas.c.id == p["campaign_id"])
                              .with_for_update()).mappings().first()
    if campana is None:
        raise LookupError(f"conversion {p['conversion_id']} names unknown campaign {p['campaign_id']}")
    # The rule version, the tier month and the cap periods are those of the conversion's time
    # (ConversionValidated v2 converted_at), not of its validation: a conversion held for review
    # and approved days later still earns what the rules in force when it happened said. v1
    # events carry only the validation time: that is the best we know.
    momento = p.get("converted_at") or p["timestamp"]
    calculo, explicacion = _calcular_con_reglas(session, campana, p, momento)
    comision_id = new_id()
    now = utcnow()
    session.execute(c.insert().values(
        id=comision_id, conversion_id=p["conversion_id"], afiliado_id=p["affiliate_id"], campana_id=p["campaign_id"],
        base=p["conversion_value"], porcentaje=calculo.porcentaje, monto=calculo.monto, moneda=campana["moneda"],
        estado=domain.PENDIENTE, correlation_id=event.correlation_id, calculada_en=now,
        aprobable_desde=domain.aprobable_desde(now, campana["periodo_bloqueo_dias"]),
        momento_conversion=momento, version_reglas=calculo.version, regla_id=calculo.regla_id, tipo_regla=calculo.tipo,
        limitado_por=calculo.limitado_por, explicacion=json.dumps(explicacion), click_id=p.get("click_id")))
    return [OutgoingEvent(COMISIONES, "ComisionCalculada", comision_id, {
        "id": comision_id, "conversion_id": p["conversion_id"], "afiliado_id": p["affiliate_id"],
        "campana_id": p["campaign_id"], "base": p["conversion_value"], "porcentaje": calculo.porcentaje,
        "monto": calculo.monto, "moneda": campana["moneda"], "timestamp": now, "regla_id": calculo.regla_id,
        "version_reglas": calculo.version, "limitado_por": calculo.limitado_por})]


def _calcular_con_reglas(session: Session, campana, p: dict, momento: datetime) -> tuple[domain.Calculo, dict]:
    """Gather what the rules need (version in force, tier count, what the caps have left) and
    apply them. Spent = every commission booked in the campaign, reversed ones included: a
    reversal does not give budget back (the money may already have been paid).

    Tier count ("the affiliate's approved conversions in the period"): the affiliate's commissions
    in this campaign whose conversion happened in this conversion's calendar month and was
    validated (a commission is booked only for a validated conversion: rejected or held ones have
    none), excluding reversed ones (refunded or charged back: no longer approved). A commission a
    cap cut to zero still counts: its conversion was approved."""
    k = tables.comisiones
    conjunto = domain.version_vigente(load_versiones(session, campana["id"]), momento)
    desde_mes, hasta_mes = domain.ventana_del_periodo("mes", momento)
    del_afiliado = (k.c.campana_id == campana["id"], k.c.afiliado_id == p["affiliate_id"])
    aprobadas_en_el_mes = session.scalar(select(func.count()).select_from(k).where(
        *del_afiliado, k.c.momento_conversion >= desde_mes, k.c.momento_conversion < hasta_mes,
        k.c.estado != domain.REVERTIDA))
    restante_afiliado = None
    tope = conjunto.tope_por_afiliado if conjunto else None
    if tope is not None:
        desde, hasta = domain.ventana_del_periodo(tope.periodo, momento)
        query = select(func.coalesce(func.sum(k.c.monto), 0)).where(*del_afiliado)
        if desde is not None:
            query = query.where(k.c.momento_conversion >= desde, k.c.momento_conversion < hasta)
        restante_afiliado = tope.monto - session.scalar(query)
    restante_presupuesto = None
    if campana["presupuesto"] is not None:
        gastado = session.scalar(select(func.coalesce(func.sum(k.c.monto), 0)).where(k.c.campana_id == campana["id"]))
        restante_presupuesto = campana["presupuesto"] - gastado
    conversion = domain.ConversionACalcular(p["conversion_value"], p["conversion_type"], p["affiliate_id"],
                                            aprobadas_en_el_mes)
    calculo = domain.calcular(conjunto, campana["porcentaje_comision"], conversion, restante_afiliado,
                              restante_presupuesto)
    explicacion = {
        "inputs": {"base": str(conversion.base), "conversion_type": conversion.conversion_type,
                   "momento_conversion": momento.isoformat(), "aprobadas_en_el_mes": aprobadas_en_el_mes,
                   "porcentaje": str(calculo.porcentaje) if calculo.tipo == domain.CPS else None,
                   "monto_fijo": str(calculo.monto_fijo) if calculo.monto_fijo is not None else None},
        "chequeos": list(calculo.chequeos),
        "topes": {"tope_por_afiliado": {"monto": str(tope.monto), "periodo": tope.periodo} if tope else None,
                  "restante_afiliado": _str_or_none(restante_afiliado),
                  "presupuesto": _str_or_none(campana["presupuesto"]),
                  "restante_presupuesto": _str_or_none(restante_presupuesto)},
        "monto_sin_tope": str(calculo.monto_sin_tope)}
    return calculo, explicacion


def _str_or_none(value) -> str | None:
    return None if value is None else str(value)


# -- commission rules: versioned rule sets per campaign ---------------------------------------------
def _regla_json(posicion: int, regla: domain.Regla) -> dict:
    return {"id": domain.regla_id(posicion), "tipo": regla.tipo, "monto": _str_or_none(regla.monto),
            "porcentaje": _str_or_none(regla.porcentaje), "conversion_type": regla.conversion_type,
            "afiliado_id": regla.afiliado_id, "min_aprobadas": regla.min_aprobadas}


def reglas_json(reglas: tuple[domain.Regla, ...]) -> list[dict]:
    return [_regla_json(n, regla) for n, regla in enumerate(reglas, start=1)]


def _conjunto(row) -> domain.ConjuntoReglas:
    reglas = tuple(domain.Regla(r["tipo"], Decimal(r["monto"]) if r["monto"] is not None else None,
                                Decimal(r["porcentaje"]) if r["porcentaje"] is not None else None,
                                r["conversion_type"], r["afiliado_id"], r["min_aprobadas"])
                   for r in json.loads(row["reglas"]))
    tope = domain.Tope(row["tope_monto"], row["tope_periodo"]) if row["tope_monto"] is not None else None
    return domain.ConjuntoReglas(row["version"], row["vigente_desde"], reglas, tope)


def load_versiones(session: Session, campana_id: str) -> list[domain.ConjuntoReglas]:
    r = tables.reglas_comision
    return [_conjunto(row) for row in session.execute(
        select(r).where(r.c.campana_id == campana_id).order_by(r.c.version)).mappings()]


def replace_reglas(session: Session, campana_id: str, reglas: tuple[domain.Regla, ...],
                   tope: domain.Tope | None) -> tuple[int, list[OutgoingEvent]]:
    """A new version of the campaign's rules, in force from now; earlier versions are kept and
    still govern the conversions of their time."""
    c, r = tables.campanas, tables.reglas_comision
    estado = session.scalar(select(c.c.estado).where(c.c.id == campana_id).with_for_update())
    if estado is None:
        raise Problem(404, "campana_id", "no campaign with this id")
    if estado == domain.FINALIZADA:
        raise Problem(409, "estado", "a finished campaign's commission rules cannot change")
    version = (session.scalar(select(func.max(r.c.version)).where(r.c.campana_id == campana_id)) or 0) + 1
    now = utcnow()
    texto = json.dumps(reglas_json(reglas))
    session.execute(r.insert().values(campana_id=campana_id, version=version, vigente_desde=now, reglas=texto,
                                      tope_monto=tope.monto if tope else None,
                                      tope_periodo=tope.periodo if tope else None))
    return version, [OutgoingEvent(MARKETING, "ReglasComisionActualizadas", campana_id, {
        "campana_id": campana_id, "version": version, "reglas": texto, "timestamp": now})]


# -- analytics-consumer on conversiones.eventos ---------------------------------------------
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


def count_refunded(session: Session, event: IncomingEvent) -> list[OutgoingEvent]:
    """On the refund's day; `ingresos` keeps what was validated, the refunded revenue sits beside it."""
    _add_to_analytics(session, event, {"reembolsadas": 1, "ingresos_reembolsados": event.payload["conversion_value"]})
    return []


# -- reporting-consumer and payment-consumer on comisiones.eventos ---------------------------
# The report column holding the amount of commissions in each state.
MONTO_POR_ESTADO = {domain.PENDIENTE: "monto_pendiente", domain.APROBADA: "monto_aprobado",
                    domain.PAGADA: "monto_pagado", domain.REVERTIDA: "monto_revertido"}
# A commission only moves forward: pending → approved → paid, and any of them → reversed.
_ORDEN_ESTADO = {domain.PENDIENTE: 0, domain.APROBADA: 1, domain.PAGADA: 2, domain.REVERTIDA: 3}


def report_comision(session: Session, event: IncomingEvent) -> list[OutgoingEvent]:
    p = event.payload
    dia = p["timestamp"].date()
    upsert_add(session, tables.reporte_comisiones,
               {"dia": dia, "campana_id": p["campana_id"], "afiliado_id": p["afiliado_id"]},
               {"comisiones": 1, "monto": p["monto"], "monto_pendiente": p["monto"], "monto_aprobado": Decimal(0),
                "monto_pagado": Decimal(0), "monto_revertido": Decimal(0)})
    session.execute(tables.reporte_comision_estado.insert().values(
        comision_id=p["id"], dia=dia, campana_id=p["campana_id"], afiliado_id=p["afiliado_id"], monto=p["monto"],
        estado=domain.PENDIENTE))
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


def book_accrual(session: Session, event: IncomingEvent) -> list[OutgoingEvent]:
    p = event.payload
    session.execute(tables.ledger_pagos.insert().values(
        afiliado_id=p["afiliado_id"], comision_id=p["id"], tipo="devengo", monto=p["monto"], moneda=p["moneda"],
        registrado_en=utcnow()))
    return []


# -- the commission lifecycle: approval, reversal, payouts ---------------------------------------
def approve_due_comisiones(db: Database, outbox: Outbox, now: datetime | None = None, batch: int = 200) -> int:
    """The approval scheduler (the broker has no delayed delivery): every pending commission
    whose lock period has passed becomes approved, each with its ComisionAprobada."""
    k = tables.comisiones
    now = now or utcnow()
    with db.transaction() as session:
        rows = session.execute(
            select(k).where(k.c.estado == domain.PENDIENTE, k.c.aprobable_desde <= now)
            .order_by(k.c.aprobable_desde, k.c.id).limit(batch).with_for_update(skip_locked=True)).mappings().all()
        events = []
        for row in rows:
            session.execute(update(k).where(k.c.id == row["id"]).values(estado=domain.APROBADA, aprobada_en=now))
            events.append(OutgoingEvent(COMISIONES, "ComisionAprobada", row["id"], {
                "id": row["id"], "conversion_id": row["conversion_id"], "afiliado_id": row["afiliado_id"],
                "campana_id": row["campana_id"], "monto": row["monto"], "moneda": row["moneda"],
                "calculada_en": row["calculada_en"], "timestamp": now}, correlation_id=row["correlation_id"]))
        outbox.add(session, events)
    return len(rows)


# -- marketing-consumer on conversiones.eventos ---------------------------------------------
def reverse_comision(session: Session, event: IncomingEvent) -> list[OutgoingEvent]:
    """ConversionRefunded → the conversion's commission is reversed, whatever its state, with a
    negative adjustment when it already went into a payout. The refund itself is remembered, so
    a commission arriving after it (or a conversion that never had one) is never booked."""
    p = event.payload
    r = tables.conversiones_reembolsadas
    if session.scalar(select(exists().where(r.c.conversion_id == p["conversion_id"]))):
        return []
    now = utcnow()
    session.execute(r.insert().values(conversion_id=p["conversion_id"], tipo=p["refund_type"], motivo=p["reason"],
                                      reembolsada_en=now))
    row = _comision_de(session, p["conversion_id"], lock=True)
    if row is None or row["estado"] == domain.REVERTIDA:
        return []
    return _revertir_comision(session, row, p["refund_type"], p["reason"], now)


def _revertir_comision(session: Session, row, motivo: str, detalle: str | None, now: datetime) -> list[OutgoingEvent]:
    """Reverse a booked commission (refund or compensation): ComisionRevertida, with a negative
    adjustment when it already went into a payout, and the saga's ReversionComisionRegistrada on
    marketing.eventos (keyed by the conversion), so conversiones logs the reversal step."""
    k = tables.comisiones
    reversion = domain.revertir(row["estado"], row["monto"], en_un_pago=row["pago_id"] is not None)
    ajuste_id = None
    if reversion.ajuste is not None:
        ajuste_id = new_id()
        session.execute(tables.ajustes.insert().values(
            id=ajuste_id, afiliado_id=row["afiliado_id"], comision_id=row["id"], monto=reversion.ajuste,
            moneda=row["moneda"], motivo=motivo, creado_en=now))
    session.execute(update(k).where(k.c.id == row["id"]).values(
        estado=domain.REVERTIDA, revertida_en=now, motivo_reversion=motivo))
    return [OutgoingEvent(COMISIONES, "ComisionRevertida", row["id"], {
        "id": row["id"], "conversion_id": row["conversion_id"], "afiliado_id": row["afiliado_id"],
        "campana_id": row["campana_id"], "monto": row["monto"], "moneda": row["moneda"],
        "estado_anterior": reversion.estado_anterior, "motivo": motivo, "detalle": detalle,
        "ajuste_id": ajuste_id, "ajuste_monto": reversion.ajuste, "timestamp": now}),
        OutgoingEvent(MARKETING, "ReversionComisionRegistrada", row["conversion_id"], {
            "comision_id": row["id"], "conversion_id": row["conversion_id"], "monto": row["monto"],
            "moneda": row["moneda"], "estado_anterior": reversion.estado_anterior, "motivo": motivo,
            "detalle": detalle, "ajuste_monto": reversion.ajuste, "timestamp": now})]


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
        raise Problem(404, "pago_id", "no payout with this id")
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


# -- payment-consumer on comisiones.eventos: the ledger is what the platform owes each affiliate.
# Accruals add, reversals and payouts subtract, adjustments netted in a payout add back what the
# payout withheld; a reversal after a payout leaves the balance negative until then.
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


# -- the conversion → commission saga: marketing's answers on marketing.eventos ---------------------
AFILIADO_SUSPENDIDO_DURANTE_PROCESO = "afiliado_suspendido_durante_proceso"
REEMBOLSADA_ANTES_DE_COMISION = "reembolsada_antes_de_comision"
CONVERSION_RECHAZADA = "conversion_rechazada"
COMPENSACION = "compensacion"  # ComisionRevertida.motivo of a commission undone by the saga


def answer_comision_request(session: Session, event: IncomingEvent) -> list[OutgoingEvent]:
    """ConversionValidated, or CommissionRequested (the saga asking again after a timeout): book the
    conversion's commission at most once and answer conversiones on marketing.eventos, keyed by the
    conversion, in this transaction: ComisionRegistrada (booked, maybe partial or zero by a cap, with
    limitado_por) or ComisionDenegada with its reason. Asked again, the same answer."""
    p = event.payload
    booked = _comision_de(session, p["conversion_id"])
    if booked is not None:
        return [_registrada(booked)]
    d = tables.comisiones_denegadas
    razon = session.scalar(select(d.c.razon).where(d.c.conversion_id == p["conversion_id"]))
    if razon is None:
        razon = _razon_para_denegar(session, p)
        if razon is not None:
            session.execute(d.insert().values(conversion_id=p["conversion_id"], razon=razon, denegada_en=utcnow()))
    if razon is not None:
        return [OutgoingEvent(MARKETING, "ComisionDenegada", p["conversion_id"], {
            "conversion_id": p["conversion_id"], "afiliado_id": p["affiliate_id"], "campana_id": p["campaign_id"],
            "razon": razon, "timestamp": utcnow()})]
    events = list(calculate_comision(session, event))
    booked = _comision_de(session, p["conversion_id"])
    return events + ([_registrada(booked)] if booked is not None else [])


def _razon_para_denegar(session: Session, p: dict) -> str | None:
    """Why no commission is due although conversiones validated the conversion: it was refunded
    first, or the affiliate was suspended between the validation and now (marketing's view)."""
    if session.scalar(select(exists().where(tables.conversiones_reembolsadas.c.conversion_id == p["conversion_id"]))):
        return REEMBOLSADA_ANTES_DE_COMISION
    a = tables.afiliados
    if session.scalar(select(a.c.estado).where(a.c.afiliado_id == p["affiliate_id"])) == domain.INHABILITADO:
        return AFILIADO_SUSPENDIDO_DURANTE_PROCESO
    return None


def _comision_de(session: Session, conversion_id: str, *, lock: bool = False):
    """The conversion's commission row (None: none booked); `lock`: held until the transaction ends."""
    k = tables.comisiones
    query = select(k).where(k.c.conversion_id == conversion_id)
    return session.execute(query.with_for_update() if lock else query).mappings().first()


def _registrada(row) -> OutgoingEvent:
    return OutgoingEvent(MARKETING, "ComisionRegistrada", row["conversion_id"], {
        "comision_id": row["id"], "conversion_id": row["conversion_id"], "afiliado_id": row["afiliado_id"],
        "campana_id": row["campana_id"], "monto": row["monto"], "moneda": row["moneda"],
        "limitado_por": row["limitado_por"], "timestamp": utcnow()})


def undo_compensated_comision(session: Session, event: IncomingEvent) -> list[OutgoingEvent]:
    """ConversionRejected with compensation=true (conversiones undid the validation): a commission
    booked for it (late: after the saga gave up) is reversed, and none is ever booked afterwards.
    Ordinary rejections never had a commission: nothing to do."""
    p = event.payload
    if not p.get("compensation"):
        return []
    d = tables.comisiones_denegadas
    if not session.scalar(select(exists().where(d.c.conversion_id == p["conversion_id"]))):
        session.execute(d.insert().values(conversion_id=p["conversion_id"], razon=CONVERSION_RECHAZADA,
                                          denegada_en=utcnow()))
    row = _comision_de(session, p["conversion_id"], lock=True)
    if row is None or row["estado"] == domain.REVERTIDA:
        return []
    return _revertir_comision(session, row, COMPENSACION, p["reason"], utcnow())


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
