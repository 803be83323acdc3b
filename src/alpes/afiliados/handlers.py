"""Afiliados use cases: plain functions over a session; events go back to the caller."""

from __future__ import annotations

from sqlalchemy import exists, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from alpes.kernel.db import Database
from alpes.kernel.errors import Conflict, NotFound
from alpes.kernel.messages import IncomingEvent, OutgoingEvent, new_id, utcnow
from alpes.kernel.outbox import Outbox

from . import domain, tables

TOPIC = "afiliados.eventos"


def register_afiliado(session: Session, solicitud: domain.SolicitudRegistro) -> tuple[str, list[OutgoingEvent]]:
    email = domain.normalizar_email(solicitud.email)
    if session.scalar(select(exists().where(tables.afiliados.c.email == email))):
        raise Conflict("email", "an affiliate with this email is already registered")
    numero_documento = domain.normalizar_documento(solicitud.numero_documento) if solicitud.numero_documento else None
    afiliado_id = new_id()
    now = utcnow()
    try:
        session.execute(tables.afiliados.insert().values(
            id=afiliado_id, user_id=solicitud.user_id, email=email, nombre=solicitud.nombre,
            estado=domain.REGISTRADO, motivos="", registrado_en=now, comisiones=0, ganancias_pendientes=0,
            tipo_documento=solicitud.tipo_documento, numero_documento=numero_documento, pais=solicitud.pais,
            metodo_pago=solicitud.metodo_pago))
        session.flush()
    except IntegrityError:  # a concurrent registration with the same email won the race
        raise Conflict("email", "an affiliate with this email is already registered") from None
    event = OutgoingEvent(TOPIC, "AfiliadoRegistrado", afiliado_id, {
        "id": afiliado_id, "user_id": solicitud.user_id, "email": email, "nombre": solicitud.nombre,
        "tipo_documento": solicitud.tipo_documento, "numero_documento": numero_documento, "pais": solicitud.pais,
        "metodo_pago": solicitud.metodo_pago, "timestamp": now})
    return afiliado_id, [event]


def validate_registered_afiliados(db: Database, outbox: Outbox, batch: int = 100) -> int:
    """The automatic validation step: every registered affiliate ends validated or rejected."""
    a = tables.afiliados
    with db.transaction() as session:
        rows = session.execute(
            select(a).where(a.c.estado == domain.REGISTRADO).order_by(a.c.registrado_en).limit(batch)
            .with_for_update(skip_locked=True)).mappings().all()
        events = []
        for row in rows:
            duplicate = session.scalar(select(exists().where(
                a.c.user_id == row["user_id"], a.c.estado == domain.VALIDADO, a.c.id != row["id"])))
            motivos = domain.motivos_de_rechazo(
                domain.SolicitudRegistro(row["user_id"], row["email"], row["nombre"]), duplicate,
                documento_duplicado=_documento_taken(session, row))
            now = utcnow()
            if motivos:
                session.execute(update(a).where(a.c.id == row["id"]).values(
                    estado=domain.RECHAZADO, motivos=",".join(motivos), validado_en=now))
                events.append(OutgoingEvent(TOPIC, "AfiliadoRechazado", row["id"],
                                            {"id": row["id"], "motivos": motivos, "timestamp": now}))
            else:
                session.execute(update(a).where(a.c.id == row["id"]).values(estado=domain.VALIDADO, validado_en=now))
                events.append(OutgoingEvent(TOPIC, "AfiliadoValidado", row["id"], {"id": row["id"], "timestamp": now}))
        outbox.add(session, events)
        return len(rows)


def _documento_taken(session: Session, row) -> bool:
    """Another affiliate already holds this identity document. A rejected holder does not count
    (its registration never became an account); a suspended one does (no way around a suspension)."""
    if not row["numero_documento"]:
        return False
    a = tables.afiliados
    return bool(session.scalar(select(exists().where(
        a.c.tipo_documento == row["tipo_documento"], a.c.numero_documento == row["numero_documento"],
        a.c.estado.in_([domain.VALIDADO, domain.SUSPENDIDO]), a.c.id != row["id"]))))


# -- actions taken by a human, each a state change and its event committed together ---------
def approve_afiliado(session: Session, afiliado_id: str) -> list[OutgoingEvent]:
    now = utcnow()
    _change_estado(session, afiliado_id, domain.APROBAR, validado_en=now)
    return [OutgoingEvent(TOPIC, "AfiliadoAprobado", afiliado_id, {"id": afiliado_id, "timestamp": now})]


def suspend_afiliado(session: Session, afiliado_id: str, motivo: str) -> list[OutgoingEvent]:
    _change_estado(session, afiliado_id, domain.SUSPENDER, motivo_suspension=motivo)
    return [OutgoingEvent(TOPIC, "AfiliadoSuspendido", afiliado_id,
                          {"id": afiliado_id, "motivo": motivo, "timestamp": utcnow()})]


def reactivate_afiliado(session: Session, afiliado_id: str) -> list[OutgoingEvent]:
    _change_estado(session, afiliado_id, domain.REACTIVAR, motivo_suspension=None)
    return [OutgoingEvent(TOPIC, "AfiliadoReactivado", afiliado_id, {"id": afiliado_id, "timestamp": utcnow()})]


def _change_estado(session: Session, afiliado_id: str, accion: str, **values) -> None:
    a = tables.afiliados
    estado = session.scalar(select(a.c.estado).where(a.c.id == afiliado_id).with_for_update())
    if estado is None:
        raise NotFound("afiliado_id", "no affiliate with this id")
    try:
        nuevo = domain.siguiente_estado(estado, accion)
    except domain.TransicionInvalida as refusal:
        raise Conflict("estado", str(refusal)) from None
    session.execute(update(a).where(a.c.id == afiliado_id).values(estado=nuevo, **values))


def record_comision(session: Session, event: IncomingEvent) -> list[OutgoingEvent]:
    """comisiones.eventos → the affiliate's earnings. Exactly once thanks to the inbox."""
    p = event.payload
    a = tables.afiliados
    session.execute(update(a).where(a.c.id == p["afiliado_id"]).values(
        comisiones=a.c.comisiones + 1, ganancias_pendientes=a.c.ganancias_pendientes + p["monto"]))
    return []


def record_programa(session: Session, event: IncomingEvent) -> list[OutgoingEvent]:
    """marketing.eventos → the catalogue of programs affiliates can see."""
    p = event.payload
    t = tables.programas
    if session.scalar(select(exists().where(t.c.id == p["id"]))) is False:
        session.execute(t.insert().values(id=p["id"], nombre=p["nombre"], porcentaje_comision=p["porcentaje_comision"],
                                          moneda=p["moneda"], creada_en=p["timestamp"]))
    return []


# -- afiliados-consumer on comisiones.eventos: each lifecycle step moves the amount between the
# affiliate's earnings by state, so pending + approved + paid + reversed = everything calculated.
_GANANCIAS_POR_ESTADO = {"pendiente": "ganancias_pendientes", "aprobada": "ganancias_aprobadas",
                         "pagada": "ganancias_pagadas"}


def record_aprobacion(session: Session, event: IncomingEvent) -> list[OutgoingEvent]:
    p = event.payload
    _move_ganancias(session, p["afiliado_id"], p["monto"], "ganancias_pendientes", "ganancias_aprobadas")
    return []


def record_pago(session: Session, event: IncomingEvent) -> list[OutgoingEvent]:
    p = event.payload
    _move_ganancias(session, p["afiliado_id"], p["monto"], "ganancias_aprobadas", "ganancias_pagadas")
    return []


def record_reversion(session: Session, event: IncomingEvent) -> list[OutgoingEvent]:
    """A reversed commission leaves the state it was in; one that had been paid is also owed back
    (marketing carries that negative adjustment into the next payout)."""
    p = event.payload
    _move_ganancias(session, p["afiliado_id"], p["monto"], _GANANCIAS_POR_ESTADO[p["estado_anterior"]],
                    "ganancias_revertidas")
    return []


def _move_ganancias(session: Session, afiliado_id: str, monto, desde: str, hacia: str) -> None:
    a = tables.afiliados
    session.execute(update(a).where(a.c.id == afiliado_id).values(
        {desde: a.c[desde] - monto, hacia: a.c[hacia] + monto}))
