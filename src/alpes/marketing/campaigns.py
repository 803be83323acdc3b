"""Campaigns, enrollments and marketing's copy of each affiliate's state: plain functions over a session.

Every campaign has an owner (its advertiser; none: the operator's). Callers are kept to their
tenant here: an advertiser reads and changes its own campaigns, an affiliate reads those it is
enrolled in (and only its own enrollment), an operator everything; anything else is NotFound.
"""

from __future__ import annotations

import re
from decimal import Decimal

from sqlalchemy import bindparam, exists, false, select, update
from sqlalchemy.orm import Session

from alpes.kernel.access import ADVERTISER, AFFILIATE, OPERATOR, SYSTEM, Principal
from alpes.kernel.db import forget_in_transaction, where_equal
from alpes.kernel.errors import Conflict, NotAllowed, NotFound, RuleViolated
from alpes.kernel.messages import IncomingEvent, OutgoingEvent, new_id, utcnow
from alpes.kernel.money import MINOR_UNITS, check_places

from . import advertisers, domain, landing, tables
from .topics import MARKETING

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


# -- campaigns -------------------------------------------------------------------------------------
def create_campana(session: Session, caller: Principal, nueva: domain.NuevaCampana, *,
                   anunciante_id: str | None = None, https_only: bool = True) -> tuple[str, list[OutgoingEvent]]:
    """A campaign owned by the calling advertiser, or by the advertiser an operator names (None: the
    operator's own). Its landing URL must be on the owner's registered domains (landing.py); its
    maximum conversion value defaults to the owner's."""
    anunciante = _owner(session, caller, anunciante_id)
    if nueva.landing_url is not None:
        dominios = advertisers.dominios_of(anunciante) if anunciante is not None else None
        try:
            landing.check_landing_url(nueva.landing_url, dominios, https_only)
        except ValueError as error:
            raise RuleViolated("landing_url", str(error)) from None
    maximo = nueva.valor_maximo_conversion
    if maximo is None and anunciante is not None:
        maximo = domain.maximo_en_moneda(anunciante["valor_maximo_conversion"], MINOR_UNITS.get(nueva.moneda, 2))
    owner = anunciante["id"] if anunciante is not None else None
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
        modelo_atribucion=nueva.modelo_atribucion, anunciante_id=owner, valor_maximo_conversion=maximo))
    return campana_id, [OutgoingEvent(MARKETING, "CampanaCreada", campana_id, {
        "id": campana_id, "nombre": nueva.nombre, "porcentaje_comision": nueva.porcentaje_comision,
        "moneda": nueva.moneda, "timestamp": now, "estado": estado, "fecha_inicio": nueva.vigencia.fecha_inicio,
        "fecha_fin": nueva.vigencia.fecha_fin, "landing_url": nueva.landing_url, "presupuesto": nueva.presupuesto,
        "ventana_atribucion_dias": nueva.ventana_atribucion_dias, "periodo_bloqueo_dias": nueva.periodo_bloqueo_dias,
        "paises": sorted(seg.paises), "canales": sorted(seg.canales), "categorias": sorted(seg.categorias),
        "min_segundos_click_conversion": nueva.min_segundos_click_conversion,
        "modelo_atribucion": nueva.modelo_atribucion, "anunciante_id": owner, "valor_maximo_conversion": maximo})]


def _owner(session: Session, caller: Principal, anunciante_id: str | None):
    """The advertiser row that will own a new campaign, or None for an operator's own campaign.
    An advertiser always owns what it creates (naming another advertiser: 404, as if unknown)."""
    if caller.role == ADVERTISER:
        if anunciante_id not in (None, caller.anunciante_id) or not caller.anunciante_id:
            raise NotFound("anunciante_id", "no advertiser with this id")
        anunciante_id = caller.anunciante_id
    elif caller.role not in (OPERATOR, SYSTEM):
        raise NotAllowed(None, "only operators and advertisers create campaigns")
    if anunciante_id is None:
        return None
    row = advertisers.find_anunciante(session, anunciante_id)
    if row is None:
        raise NotFound("anunciante_id", "no advertiser with this id")
    return row


def change_campana_estado(session: Session, caller: Principal, campana_id: str, accion: str) -> list[OutgoingEvent]:
    """activar / pausar / finalizar: the new state and its event commit together (own campaigns only)."""
    estado = owned_campana(session, caller, campana_id, lock=True)["estado"]
    try:
        nuevo, evento = domain.transicion(estado, accion)
    except domain.TransicionInvalida as error:
        raise Conflict("estado", str(error)) from None
    now = utcnow()
    c = tables.campanas
    session.execute(update(c).where(c.c.id == campana_id).values(estado=nuevo, actualizada_en=now))
    return [OutgoingEvent(MARKETING, evento, campana_id, {"id": campana_id, "timestamp": now})]


# The campaign's running total of commissions booked (tables.gasto_por_campana), reversed ones
# included: a reversal gives no budget back.
_GASTADO = select(tables.gasto_por_campana.c.monto).where(tables.gasto_por_campana.c.campana_id == bindparam("campana_id"))


def gastado_de_campana(session: Session, campana_id: str) -> Decimal:
    """What the campaign has spent of its budget: what the budget cap (commissions.py) reads, and
    what a lowered budget may not go below."""
    return session.scalar(_GASTADO, {"campana_id": campana_id}) or Decimal("0.00")


def update_campana(session: Session, caller: Principal, campana_id: str, nuevos: dict, *,
                   https_only: bool = True) -> list[OutgoingEvent]:
    """Change the terms of a campaign that may change while it runs (domain.TERMINOS_EDITABLES; a
    term left out of `nuevos` stays). The new terms and CampanaActualizada, carrying all of them,
    commit together; nothing changed: nothing announced. Own campaigns only (NotFound otherwise);
    a finished one, or a budget below what it already spent: Conflict."""
    campana = owned_campana(session, caller, campana_id, lock=True)  # as commissions do: spent cannot move
    if campana["estado"] == domain.FINALIZADA:
        raise Conflict("estado", "a finished campaign's terms cannot change")
    for termino in nuevos:
        if termino not in domain.TERMINOS_EDITABLES:
            raise RuleViolated(termino, "not a term that may change while the campaign runs")
        if nuevos[termino] is None and termino not in domain.TERMINOS_OPCIONALES and campana[termino] is not None:
            raise RuleViolated(termino, "cannot be removed" + (
                ": the campaign's tracking links redirect to it" if termino == "landing_url" else ""))
    for termino in ("presupuesto", "valor_maximo_conversion"):
        if nuevos.get(termino) is not None:
            try:
                check_places(nuevos[termino], campana["moneda"])
            except ValueError as error:
                raise RuleViolated(termino, str(error)) from None
    now = utcnow()
    fecha_fin = nuevos.get("fecha_fin")
    if fecha_fin is not None and fecha_fin != campana["fecha_fin"]:
        if campana["fecha_inicio"] is not None and fecha_fin <= campana["fecha_inicio"]:
            raise RuleViolated("fecha_fin", "must be after fecha_inicio")
        if fecha_fin <= now:  # conversions already made before it would be judged out of the campaign
            raise RuleViolated("fecha_fin", "cannot move into the past: finish the campaign to end it now")
    if nuevos.get("landing_url") is not None and nuevos["landing_url"] != campana["landing_url"]:
        dominios = None  # an operator's own campaign: no domain list, every other refusal
        if campana["anunciante_id"] is not None:
            anunciante = advertisers.find_anunciante(session, campana["anunciante_id"])
            dominios = advertisers.dominios_of(anunciante) if anunciante is not None else ()
        try:
            landing.check_landing_url(nuevos["landing_url"], dominios, https_only)
        except ValueError as error:
            raise RuleViolated("landing_url", str(error)) from None
    if nuevos.get("presupuesto") is not None and nuevos["presupuesto"] != campana["presupuesto"]:
        gastado = gastado_de_campana(session, campana_id)  # as the budget cap counts it
        if nuevos["presupuesto"] < gastado:
            raise Conflict("presupuesto", f"below what the campaign has already spent ({gastado} {campana['moneda']})")
    cambios = domain.terminos_cambiados(campana, nuevos)
    if not cambios:
        return []
    c = tables.campanas
    session.execute(update(c).where(c.c.id == campana_id).values(
        **{t: nuevos[t] for t in cambios}, actualizada_en=now))
    terminos = {t: nuevos[t] if t in cambios else campana[t] for t in domain.TERMINOS_EDITABLES}
    return [OutgoingEvent(MARKETING, "CampanaActualizada", campana_id, {
        "id": campana_id, **terminos, "cambios": list(cambios), "timestamp": now})]


def get_campana(session: Session, campana_id: str):
    """The campaign's row, whoever asks (internal use: the routes go through visible_campana or
    owned_campana); NotFound for an unknown id."""
    c = tables.campanas
    row = session.execute(select(c).where(c.c.id == campana_id)).mappings().first()
    if row is None:
        raise NotFound("campana_id", "no campaign with this id")
    return row


def visible_campana(session: Session, caller: Principal, campana_id: str):
    """The campaign's row if the caller may read it: operators any, an advertiser its own, an
    affiliate those it is enrolled in. Another tenant's campaign is NotFound, as an unknown one."""
    c = tables.campanas
    row = session.execute(visible_to(select(c), caller).where(c.c.id == campana_id)).mappings().first()
    if row is None:
        raise NotFound("campana_id", "no campaign with this id")
    return row


def owned_campana(session: Session, caller: Principal, campana_id: str, *, lock: bool = False):
    """The campaign's row if the caller may change it: operators any, an advertiser its own (an
    affiliate none). Anything else is NotFound, as an unknown id: existence is not told."""
    c = tables.campanas
    query = _owned_by(select(c), caller).where(c.c.id == campana_id)
    row = session.execute(query.with_for_update() if lock else query).mappings().first()
    if row is None:
        raise NotFound("campana_id", "no campaign with this id")
    if lock:  # about to change it or its rules: what this transaction kept of them is no longer true
        forget_in_transaction(session, kept_campana_key(campana_id))
        forget_in_transaction(session, kept_reglas_key(campana_id))
    return row


# What a transaction that locked a campaign keeps of it and of its rule versions (commissions.py,
# kernel.db.once_per_transaction): every change to either locks the row here first, and drops them.
def kept_campana_key(campana_id: str) -> str:
    return f"marketing.campana.{campana_id}"


def kept_reglas_key(campana_id: str) -> str:
    return f"marketing.reglas.{campana_id}"


def visible_to(query, caller: Principal):
    """`query` (over campanas) kept to the campaigns the caller may read."""
    c, i = tables.campanas, tables.inscripciones
    if caller.role in (OPERATOR, SYSTEM):
        return query
    if caller.role == ADVERTISER and caller.anunciante_id:
        return query.where(c.c.anunciante_id == caller.anunciante_id)
    if caller.role == AFFILIATE and caller.afiliado_id:
        return query.where(c.c.id.in_(select(i.c.campana_id).where(i.c.afiliado_id == caller.afiliado_id)))
    return query.where(false())


def visible_campana_ids(caller: Principal):
    """A subquery of the ids of the campaigns the caller may read, or None for all of them
    (operators): what hangs off a campaign (commissions, reports, payouts) filters by it."""
    if caller.role in (OPERATOR, SYSTEM):
        return None
    return visible_to(select(tables.campanas.c.id), caller)


def _owned_by(query, caller: Principal):
    c = tables.campanas
    if caller.role in (OPERATOR, SYSTEM):
        return query
    if caller.role == ADVERTISER and caller.anunciante_id:
        return query.where(c.c.anunciante_id == caller.anunciante_id)
    return query.where(false())


def list_campanas(session: Session, caller: Principal, limit: int, offset: int) -> list:
    c = tables.campanas
    query = visible_to(select(c), caller).order_by(c.c.creada_en, c.c.id).limit(limit).offset(offset)
    return session.execute(query).mappings().all()


# -- enrollments -----------------------------------------------------------------------------------
def enroll_afiliado(session: Session, caller: Principal, campana_id: str, afiliado_id: str, canal: str | None,
                    categoria: str | None) -> tuple[str, bool, list[OutgoingEvent]]:
    """Enroll an enabled affiliate in a campaign its segmentation admits; it gets a tracking link.
    Only the campaign's owner (or an operator) enrolls: an affiliate never enrolls anyone, itself
    included. Returns (enrollment id, created?, events); enrolling again returns the existing one."""
    a, i = tables.afiliados, tables.inscripciones
    campana = owned_campana(session, caller, campana_id)
    if campana["estado"] == domain.FINALIZADA:
        raise Conflict("estado", "a finished campaign takes no enrollments")
    afiliado = session.execute(select(a).where(a.c.afiliado_id == afiliado_id)).mappings().first()
    if afiliado is None or afiliado["estado"] != domain.HABILITADO:
        estado = "unknown" if afiliado is None else afiliado["estado"]
        raise Conflict("afiliado_id", f"only enabled affiliates may enroll (this one: {estado})")
    existing = inscripcion_id_de(session, campana_id, afiliado_id)
    if existing is not None:
        return existing, False, []
    segmentacion = domain.Segmentacion(*(frozenset(v for v in campana[k].split(",") if v)
                                         for k in ("paises", "canales", "categorias")))
    incumplido = segmentacion.criterio_incumplido(afiliado["pais"], canal, categoria)
    if incumplido is not None:
        raise Conflict(incumplido, f"the campaign's segmentation does not admit this {incumplido}")
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


def inscripcion_id_de(session: Session, campana_id: str, afiliado_id: str) -> str | None:
    """The id of the affiliate's enrollment in the campaign, if it is enrolled."""
    i = tables.inscripciones
    return session.scalar(select(i.c.id).where(i.c.campana_id == campana_id, i.c.afiliado_id == afiliado_id))


def get_inscripcion(session: Session, inscripcion_id: str):
    i = tables.inscripciones
    return session.execute(select(i).where(i.c.id == inscripcion_id)).mappings().one()


def list_inscripciones(session: Session, caller: Principal, campana_id: str, estado: str | None) -> list:
    """The campaign's enrollments, oldest first; an affiliate sees its own enrollment only (its
    link), never the other affiliates of the program. NotFound for a campaign the caller cannot see."""
    visible_campana(session, caller, campana_id)
    i = tables.inscripciones
    query = where_equal(select(i).order_by(i.c.inscrita_en, i.c.id).where(i.c.campana_id == campana_id),
                        i, estado=estado)
    if caller.role not in (OPERATOR, SYSTEM, ADVERTISER):
        query = query.where(i.c.afiliado_id == caller.afiliado_id) if caller.afiliado_id else query.where(false())
    return session.execute(query).mappings().all()


# -- marketing-consumer on afiliados.eventos: which affiliates may take part -----------------------
def note_registered_afiliado(session: Session, event: IncomingEvent) -> list[OutgoingEvent]:
    """Remember the affiliate's country (v2; None for v1) to check campaign segmentation on enrollment.
    It takes part in nothing until validated or approved."""
    t = tables.afiliados
    afiliado_id, pais = event.payload["id"], event.payload.get("pais")
    if event.schema_version >= 3:  # the email is sealed (never hashed, never an address): its hash is given
        given = event.payload.get("email_sha256")
        email_sha256 = given if isinstance(given, str) and _SHA256_HEX.fullmatch(given) else None
    else:  # v1/v2 (written before the personal data was sealed): the address, hashed here and not kept
        email = event.payload.get("email")
        email_sha256 = domain.email_sha256(email) if email else None  # only the hash: see AfiliadoHabilitado
    if session.scalar(select(exists().where(t.c.afiliado_id == afiliado_id))):
        session.execute(update(t).where(t.c.afiliado_id == afiliado_id).values(pais=pais, email_sha256=email_sha256))
    else:
        session.execute(t.insert().values(afiliado_id=afiliado_id, estado=domain.REGISTRADO, pais=pais,
                                          email_sha256=email_sha256, actualizado_en=utcnow()))
    return []


def forget_personal_data(session: Session, event: IncomingEvent) -> list[OutgoingEvent]:
    """DatosPersonalesBorrados: the affiliate's email hash is derived from its personal data: forgotten.
    (conversiones keeps the one it was given: see README, personal data.)"""
    t = tables.afiliados
    session.execute(update(t).where(t.c.afiliado_id == event.payload["id"]).values(email_sha256=None))
    return []


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
