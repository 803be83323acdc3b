"""Marketing use cases and message handlers: plain functions over a session."""

from __future__ import annotations

from decimal import Decimal

from sqlalchemy import exists, select, update
from sqlalchemy.orm import Session

from alpes.kernel.db import upsert_add
from alpes.kernel.http import Problem
from alpes.kernel.messages import IncomingEvent, OutgoingEvent, new_id, utcnow

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
        categorias=",".join(sorted(seg.categorias))))
    return campana_id, [OutgoingEvent(MARKETING, "CampanaCreada", campana_id, {
        "id": campana_id, "nombre": nueva.nombre, "porcentaje_comision": nueva.porcentaje_comision,
        "moneda": nueva.moneda, "timestamp": now, "estado": estado, "fecha_inicio": nueva.vigencia.fecha_inicio,
        "fecha_fin": nueva.vigencia.fecha_fin, "landing_url": nueva.landing_url, "presupuesto": nueva.presupuesto,
        "ventana_atribucion_dias": nueva.ventana_atribucion_dias, "periodo_bloqueo_dias": nueva.periodo_bloqueo_dias,
        "paises": sorted(seg.paises), "canales": sorted(seg.canales), "categorias": sorted(seg.categorias)})]


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
    return [OutgoingEvent(MARKETING, "AfiliadoHabilitado", afiliado_id,
                          {"afiliado_id": afiliado_id, "timestamp": utcnow()})]


def disable_afiliado(session: Session, event: IncomingEvent) -> list[OutgoingEvent]:
    """A suspended affiliate takes part in no program until reactivated: tell conversiones."""
    afiliado_id = event.payload["id"]
    if not _set_estado_afiliado(session, afiliado_id, domain.INHABILITADO):
        return []
    return [OutgoingEvent(MARKETING, "AfiliadoInhabilitado", afiliado_id, {
        "afiliado_id": afiliado_id, "motivo": event.payload["motivo"], "timestamp": utcnow()})]


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
    if not session.scalar(select(exists().where(t.c.afiliado_id == afiliado_id))):
        session.execute(t.insert().values(afiliado_id=afiliado_id, estado=domain.RECHAZADO, actualizado_en=utcnow()))
    return []


# -- marketing-consumer on conversiones.eventos ---------------------------------------------
def calculate_comision(session: Session, event: IncomingEvent) -> list[OutgoingEvent]:
    p = event.payload
    c = tables.comisiones
    if session.scalar(select(exists().where(c.c.conversion_id == p["conversion_id"]))):
        return []  # the unique key on conversion_id guards races; this skips the common duplicate
    campana = session.execute(select(tables.campanas).where(tables.campanas.c.id == p["campaign_id"])).mappings().first()
    if campana is None:
        raise LookupError(f"conversion {p['conversion_id']} names unknown campaign {p['campaign_id']}")
    monto = domain.calcular_comision(p["conversion_value"], campana["porcentaje_comision"])
    comision_id = new_id()
    now = utcnow()
    session.execute(c.insert().values(
        id=comision_id, conversion_id=p["conversion_id"], afiliado_id=p["affiliate_id"], campana_id=p["campaign_id"],
        base=p["conversion_value"], porcentaje=campana["porcentaje_comision"], monto=monto, moneda=campana["moneda"],
        estado=domain.PENDIENTE, correlation_id=event.correlation_id, calculada_en=now))
    return [OutgoingEvent(COMISIONES, "ComisionCalculada", comision_id, {
        "id": comision_id, "conversion_id": p["conversion_id"], "afiliado_id": p["affiliate_id"],
        "campana_id": p["campaign_id"], "base": p["conversion_value"], "porcentaje": campana["porcentaje_comision"],
        "monto": monto, "moneda": campana["moneda"], "timestamp": now})]


# -- analytics-consumer on conversiones.eventos ---------------------------------------------
def _count_conversion(column: str, with_revenue: bool = False):
    def handler(session: Session, event: IncomingEvent) -> list[OutgoingEvent]:
        p = event.payload
        increments = {column: 1}
        if with_revenue:
            increments["ingresos"] = p["conversion_value"]
        upsert_add(session, tables.analitica_conversiones,
                   {"dia": p["timestamp"].date(), "campana_id": p["campaign_id"], "afiliado_id": p["affiliate_id"]},
                   {"detectadas": 0, "validadas": 0, "rechazadas": 0, "ingresos": Decimal(0), **increments})
        return []
    return handler


count_detected = _count_conversion("detectadas")
count_validated = _count_conversion("validadas", with_revenue=True)
count_rejected = _count_conversion("rechazadas")


# -- reporting-consumer and payment-consumer on comisiones.eventos ---------------------------
def report_comision(session: Session, event: IncomingEvent) -> list[OutgoingEvent]:
    p = event.payload
    upsert_add(session, tables.reporte_comisiones,
               {"dia": p["timestamp"].date(), "campana_id": p["campana_id"], "afiliado_id": p["afiliado_id"]},
               {"comisiones": 1, "monto": p["monto"]})
    return []


def book_accrual(session: Session, event: IncomingEvent) -> list[OutgoingEvent]:
    p = event.payload
    session.execute(tables.ledger_pagos.insert().values(
        afiliado_id=p["afiliado_id"], comision_id=p["id"], tipo="devengo", monto=p["monto"], moneda=p["moneda"],
        registrado_en=utcnow()))
    return []
