"""Afiliados use cases: plain functions over a session; events go back to the caller."""

from __future__ import annotations

from sqlalchemy import and_, bindparam, exists, or_, select, update
from sqlalchemy.orm import Session

from alpes.kernel.access import Principal
from alpes.kernel.codec import SchemaRegistry
from alpes.kernel.db import Database
from alpes.kernel.errors import Conflict, NotFound
from alpes.kernel.messages import IncomingEvent, OutgoingEvent, new_id, utcnow
from alpes.kernel.outbox import Outbox

from . import domain, pii, tables, tenancy

TOPIC = "afiliados.eventos"


def register_afiliado(session: Session, solicitud: domain.SolicitudRegistro, vault: pii.Vault,
                      registrado_por_anunciante: str | None = None) -> tuple[str, list[OutgoingEvent]]:
    """Store the registration, its personal data sealed with a new data key of its own. A taken
    email is not refused here: the answer must not tell whether an address is registered, so the
    registration is stored like any other and the validation rejects it (cuenta_duplicada).
    `registrado_por_anunciante`: the advertiser onboarding it (None: an operator)."""
    email = domain.normalizar_email(solicitud.email)
    numero_documento = domain.normalizar_documento(solicitud.numero_documento) if solicitud.numero_documento else None
    afiliado_id = new_id()
    now = utcnow()
    key = vault.create_key(session, afiliado_id)
    datos = pii.DatosPersonales(email, solicitud.nombre, numero_documento, solicitud.metodo_pago)
    session.execute(tables.afiliados.insert().values(
        id=afiliado_id, user_id=solicitud.user_id, estado=domain.REGISTRADO, motivos="", registrado_en=now,
        comisiones=0, ganancias_pendientes=0, tipo_documento=solicitud.tipo_documento, pais=solicitud.pais,
        datos_personales=vault.seal_datos(key, afiliado_id, datos), registrado_por_anunciante=registrado_por_anunciante,
        **_indices(vault, datos)))
    return afiliado_id, [_registrado(afiliado_id, solicitud.user_id, datos, solicitud.pais, now, key)]


def _registrado(afiliado_id: str, user_id: str, datos: pii.DatosPersonales | None, pais: str | None,
                timestamp, key: bytes | None) -> OutgoingEvent:
    """AfiliadoRegistrado v3: what others need (country, the email's hash for self-referral), the
    email and name sealed with the affiliate's key (empty once erased), no document, no payment method."""
    def sealed(field: str, value: str) -> str:
        return "" if key is None or datos is None else pii.Vault.seal_event_field(key, afiliado_id, field, value)
    return OutgoingEvent(TOPIC, "AfiliadoRegistrado", afiliado_id, {
        "id": afiliado_id, "user_id": user_id, "email": sealed("email", datos.email if datos else ""),
        "nombre": sealed("nombre", datos.nombre if datos else ""), "pais": pais,
        "email_sha256": domain.email_sha256(datos.email) if datos and key else None, "timestamp": timestamp})


def _indices(vault: pii.Vault, datos: pii.DatosPersonales) -> dict:
    return {"email_indice": vault.index("email", domain.normalizar_email(datos.email)),
            "documento_indice": vault.index("documento", domain.normalizar_documento(datos.numero_documento))
            if datos.numero_documento else None}


def personal_data(session: Session, vault: pii.Vault, rows) -> dict[str, pii.DatosPersonales | None]:
    """Each row's personal data, None once erased. Legacy rows not sealed yet are read in clear."""
    keys = vault.keys(session, [r["id"] for r in rows if r["datos_personales"]])
    found: dict[str, pii.DatosPersonales | None] = {}
    for row in rows:
        if row["datos_borrados_en"] is not None:
            found[row["id"]] = None
        elif row["datos_personales"]:
            key = keys.get(row["id"])
            found[row["id"]] = None if key is None else vault.open_datos(key, row["id"], row["datos_personales"])
        elif row["email"] is not None:
            found[row["id"]] = pii.DatosPersonales(row["email"], row["nombre"] or "", row["numero_documento"],
                                                   row["metodo_pago"])
        else:
            found[row["id"]] = None
    return found


def validate_registered_afiliados(db: Database, outbox: Outbox, vault: pii.Vault, batch: int = 100) -> int:
    """The automatic validation step: every registered affiliate ends validated or rejected."""
    a = tables.afiliados
    with db.transaction() as session:
        rows = session.execute(
            select(a).where(a.c.estado == domain.REGISTRADO).order_by(a.c.registrado_en, a.c.id).limit(batch)
            .with_for_update(skip_locked=True)).mappings().all()
        datos_de = personal_data(session, vault, rows)
        events = []
        for row in rows:
            datos = datos_de[row["id"]]
            now = utcnow()
            if datos is None:  # erased before it was validated: nothing left to validate
                motivos = ["datos_borrados"]
            else:
                # A legacy row not sealed yet has no indexes: computed from its clear data.
                indices = _indices(vault, datos)
                duplicate = session.scalar(select(exists().where(
                    a.c.user_id == row["user_id"], a.c.estado == domain.VALIDADO, a.c.id != row["id"])))
                motivos = domain.motivos_de_rechazo(
                    domain.SolicitudRegistro(row["user_id"], datos.email, datos.nombre), duplicate,
                    documento_duplicado=_taken(session, a.c.documento_indice, indices["documento_indice"], row),
                    email_duplicado=_taken(session, a.c.email_indice, indices["email_indice"], row))
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


def _taken(session: Session, column, value: str | None, row) -> bool:
    """Another affiliate already holds this email / identity document (compared by blind index: the
    document's normalized number whatever its type, so a passport number re-registered as an ID card
    is still the same document). A validated or suspended holder counts (no way around a suspension);
    a rejected one does not (its registration never became an account); one registered earlier and not
    validated yet counts too, so of two registrations racing over instances the first one wins."""
    if not value:
        return False
    a = tables.afiliados
    earlier = or_(a.c.registrado_en < row["registrado_en"],
                  and_(a.c.registrado_en == row["registrado_en"], a.c.id < row["id"]))
    return bool(session.scalar(select(exists().where(
        column == value, a.c.id != row["id"],
        or_(a.c.estado.in_([domain.VALIDADO, domain.SUSPENDIDO]), and_(a.c.estado == domain.REGISTRADO, earlier))))))


# -- actions taken by a human, each a state change and its event committed together ---------
def approve_afiliado(session: Session, afiliado_id: str, principal: Principal) -> list[OutgoingEvent]:
    """An operator approves any rejected affiliate, an advertiser only one it registered and not a
    duplicate (domain.may_override_rejection); one it may not change is not found."""
    a = tables.afiliados
    tenancy.check_modificable(session, principal, afiliado_id)
    motivos = session.scalar(select(a.c.motivos).where(a.c.id == afiliado_id))
    motivos = [m for m in (motivos or "").split(",") if m]
    if motivos and not domain.may_override_rejection(tenancy.rol_de_dominio(principal), motivos):
        raise Conflict("motivos", f"an {principal.role} may not override this rejection ({', '.join(motivos)}): "
                                  "a duplicate only an operator may approve")
    now = utcnow()
    _change_estado(session, afiliado_id, domain.APROBAR, validado_en=now)
    return [OutgoingEvent(TOPIC, "AfiliadoAprobado", afiliado_id, {"id": afiliado_id, "timestamp": now})]


def suspend_afiliado(session: Session, afiliado_id: str, motivo: str, principal: Principal) -> list[OutgoingEvent]:
    tenancy.check_modificable(session, principal, afiliado_id)
    _change_estado(session, afiliado_id, domain.SUSPENDER, motivo_suspension=motivo)
    return [OutgoingEvent(TOPIC, "AfiliadoSuspendido", afiliado_id,
                          {"id": afiliado_id, "motivo": motivo, "timestamp": utcnow()})]


def reactivate_afiliado(session: Session, afiliado_id: str, principal: Principal) -> list[OutgoingEvent]:
    tenancy.check_modificable(session, principal, afiliado_id)
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


# -- erasure of the personal data (crypto-shredding) -------------------------------------------------
def erase_personal_data(session: Session, afiliado_id: str, vault: pii.Vault) -> list[OutgoingEvent]:
    """Shred the affiliate's data key: its sealed data here, in its events, in the broker and in
    the audit log become unreadable at once, and the audit chain is left as it was. The rest of
    the affiliate (state, earnings) stays. A second erasure does nothing (no second event).
    The blind index of the document is kept while the affiliate is suspended, so a suspension is not
    escaped by erasing and registering again (a pseudonym only the service's key can compute)."""
    a = tables.afiliados
    row = session.execute(select(a).where(a.c.id == afiliado_id).with_for_update()).mappings().first()
    if row is None:
        raise NotFound("afiliado_id", "no affiliate with this id")
    if row["datos_borrados_en"] is not None:
        return []
    documento_indice = None
    if row["estado"] == domain.SUSPENDIDO:
        documento_indice = row["documento_indice"] or (
            vault.index("documento", row["numero_documento"]) if row["numero_documento"] else None)
    now = utcnow()
    vault.shred(session, afiliado_id)
    session.execute(update(a).where(a.c.id == afiliado_id).values(
        datos_personales=None, email_indice=None, documento_indice=documento_indice, datos_borrados_en=now,
        email=None, nombre=None, numero_documento=None, metodo_pago=None))
    return [OutgoingEvent(TOPIC, "DatosPersonalesBorrados", afiliado_id, {"id": afiliado_id, "timestamp": now})]


# -- sealing what was written in clear before the personal data was sealed -----------------------------
def seal_personal_data(db: Database, vault: pii.Vault, registry: SchemaRegistry, batch: int = 200) -> int:
    """Legacy rows (migration 0004 kept their clear columns) get a data key, their data sealed and
    their clear columns emptied; legacy AfiliadoRegistrado v1/v2 in the outbox (pending or sent)
    are re-encoded as v3, so no clear copy stays in the service. Returns how much it sealed."""
    a, o = tables.afiliados, tables.outbox
    with db.transaction() as session:
        rows = session.execute(select(a).where(
            a.c.datos_personales.is_(None), a.c.datos_borrados_en.is_(None), a.c.email.is_not(None))
            .order_by(a.c.registrado_en, a.c.id).limit(batch).with_for_update(skip_locked=True)).mappings().all()
        for row in rows:
            key = vault.key(session, row["id"]) or vault.create_key(session, row["id"])
            datos = pii.DatosPersonales(row["email"], row["nombre"] or "", row["numero_documento"], row["metodo_pago"])
            session.execute(update(a).where(a.c.id == row["id"]).values(
                datos_personales=vault.seal_datos(key, row["id"], datos), **_indices(vault, datos),
                email=None, nombre=None, numero_documento=None, metodo_pago=None))
        sealed = len(rows)
        events = session.execute(select(o).where(o.c.event_type == "AfiliadoRegistrado", o.c.schema_version < 3)
                                 .order_by(o.c.id).limit(batch).with_for_update(skip_locked=True)).mappings().all()
        for event in events:
            old = registry.decode("AfiliadoRegistrado", event["payload"], event["schema_version"],
                                  event["schema_version"])
            afiliado = session.execute(select(a).where(a.c.id == old["id"])).mappings().first()
            if afiliado is not None and afiliado["datos_borrados_en"] is None and afiliado["datos_personales"] is None:
                continue  # its row is not sealed yet (next batch): then its event
            key = vault.key(session, old["id"]) if afiliado is not None else None
            datos = pii.DatosPersonales(old["email"], old["nombre"]) if key is not None else None
            v3 = _registrado(old["id"], old["user_id"], datos, old.get("pais"), old["timestamp"], key).payload
            payload, version = registry.encode("AfiliadoRegistrado", v3)
            session.execute(update(o).where(o.c.id == event["id"]).values(payload=payload, schema_version=version))
            sealed += 1
        return sealed


# Built once (values bound at execution): one per commission, building it per call cost most of
# the handler's CPU (issue 11).
_EARNED = update(tables.afiliados).where(tables.afiliados.c.id == bindparam("afiliado")).values(
    comisiones=tables.afiliados.c.comisiones + 1,
    ganancias_pendientes=tables.afiliados.c.ganancias_pendientes
    + bindparam("monto", type_=tables.afiliados.c.ganancias_pendientes.type))


def record_comision(session: Session, event: IncomingEvent) -> list[OutgoingEvent]:
    """comisiones.eventos → the affiliate's earnings. Exactly once thanks to the inbox."""
    session.execute(_EARNED, {"afiliado": event.payload["afiliado_id"], "monto": event.payload["monto"]})
    return []


# -- afiliados-consumer on marketing.eventos: the programs, their owners and enrollments ----------------
def record_programa(session: Session, event: IncomingEvent) -> list[OutgoingEvent]:
    """CampanaCreada → the catalogue of programs affiliates can see, with its owner (v5; null before)."""
    p = event.payload
    t = tables.programas
    if session.scalar(select(exists().where(t.c.id == p["id"]))) is False:
        session.execute(t.insert().values(id=p["id"], nombre=p["nombre"], porcentaje_comision=p["porcentaje_comision"],
                                          moneda=p["moneda"], creada_en=p["timestamp"],
                                          anunciante_id=p.get("anunciante_id"), estado=p.get("estado") or "activa"))
    return []


_ESTADO_DE_PROGRAMA = {"CampanaActivada": "activa", "CampanaPausada": "pausada", "CampanaFinalizada": "finalizada"}


def record_programa_estado(session: Session, event: IncomingEvent) -> list[OutgoingEvent]:
    """The campaign's lifecycle (same partition key as its CampanaCreada, so after it)."""
    t = tables.programas
    session.execute(update(t).where(t.c.id == event.payload["id"]).values(estado=_ESTADO_DE_PROGRAMA[event.event_type]))
    return []


def record_programa_nombre(session: Session, event: IncomingEvent) -> list[OutgoingEvent]:
    """CampanaActualizada: the catalogue shows the program's name (the only changed term it keeps),
    set to the one the event carries, so a redelivery sets it again."""
    t = tables.programas
    session.execute(update(t).where(t.c.id == event.payload["id"]).values(nombre=event.payload["nombre"]))
    return []


def record_inscripcion(session: Session, event: IncomingEvent) -> list[OutgoingEvent]:
    """AfiliadoInscrito → the affiliate is in the campaign's program (whose owner may arrive later)."""
    p = event.payload
    i = tables.inscripciones
    if session.scalar(select(exists().where(i.c.id == p["inscripcion_id"]))) is False:
        session.execute(i.insert().values(id=p["inscripcion_id"], campana_id=p["campana_id"],
                                          afiliado_id=p["afiliado_id"], inscrita_en=p["timestamp"]))
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
