"""Advertisers (anunciantes, the brands): registered by an operator, they own campaigns, register
the domains their landing URLs may use and sign their postbacks: plain functions over a session.

An advertiser's postback signing secret is derived, never stored or sent on the broker: every
service holding the platform's postback master key computes it from the advertiser's id and the
secret's version (kernel/request_signing.py). Marketing shows it to the advertiser once, when the
advertiser is registered (version 1) and on each rotation; a rotation keeps the previous version
valid for a day so the brand can switch its senders without losing a postback.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal

from sqlalchemy import false, select, update
from sqlalchemy.orm import Session

from alpes.kernel.access import ADVERTISER, OPERATOR, SYSTEM, Principal
from alpes.kernel.errors import NotFound, RuleViolated
from alpes.kernel.messages import OutgoingEvent, new_id
from alpes.kernel.request_signing import advertiser_secret, format_secret

from . import landing, tables
from .topics import MARKETING

# How long the previous secret still signs valid postbacks after a rotation.
PREVIOUS_SECRET_VALID_FOR = timedelta(hours=24)
FIRST_SECRET_VERSION = 1
DOMINIOS_TEXT = tables.anunciantes.c.dominios.type.length  # stored comma-separated


def displayed_secret(master: bytes, anunciante_id: str, version: int) -> str:
    """The secret as the advertiser is shown it (`alpes_sig_<hex>`): computed, never read from storage."""
    return format_secret(advertiser_secret(master, anunciante_id, version))


def register_anunciante(session: Session, *, nombre: str, dominios: list[str],
                        valor_maximo_conversion: Decimal | None, now: datetime) -> tuple[str, list[OutgoingEvent]]:
    """A new advertiser, its secret at version 1. (Operators only: the route's rule says so.)"""
    anunciante_id, dominios = new_id(), _checked(dominios)
    session.execute(tables.anunciantes.insert().values(
        id=anunciante_id, nombre=nombre, dominios=",".join(dominios), valor_maximo_conversion=valor_maximo_conversion,
        secreto_version=FIRST_SECRET_VERSION, creado_en=now, actualizado_en=now))
    return anunciante_id, [OutgoingEvent(MARKETING, "AnuncianteRegistrado", anunciante_id, {
        "id": anunciante_id, "nombre": nombre, "dominios": list(dominios),
        "valor_maximo_conversion": valor_maximo_conversion, "timestamp": now})]


def update_anunciante(session: Session, caller: Principal, anunciante_id: str, *, nombre: str, dominios: list[str],
                      valor_maximo_conversion: Decimal | None, now: datetime) -> list[OutgoingEvent]:
    """Replace the advertiser's name, domains and default maximum conversion value (an operator, or
    the advertiser itself). Campaigns already created keep their landing URL and their maximum."""
    current = get_anunciante(session, caller, anunciante_id, lock=True)
    dominios = _checked(dominios)
    if (current["nombre"], dominios_of(current), current["valor_maximo_conversion"]) == \
            (nombre, dominios, valor_maximo_conversion):
        return []  # nothing changed: nothing to announce
    a = tables.anunciantes
    session.execute(update(a).where(a.c.id == anunciante_id).values(
        nombre=nombre, dominios=",".join(dominios), valor_maximo_conversion=valor_maximo_conversion,
        actualizado_en=now))
    return [OutgoingEvent(MARKETING, "AnuncianteActualizado", anunciante_id, {
        "id": anunciante_id, "nombre": nombre, "dominios": list(dominios),
        "valor_maximo_conversion": valor_maximo_conversion, "timestamp": now})]


def rotate_secret(session: Session, caller: Principal, anunciante_id: str,
                  now: datetime) -> tuple[int, list[OutgoingEvent]]:
    """The next version of the advertiser's postback secret; the one it replaces stays valid for
    PREVIOUS_SECRET_VALID_FOR (any older one is no longer valid). Returns the new version."""
    current = get_anunciante(session, caller, anunciante_id, lock=True)
    version = current["secreto_version"] + 1
    a = tables.anunciantes
    session.execute(update(a).where(a.c.id == anunciante_id).values(
        secreto_version=version, secreto_anterior_hasta=now + PREVIOUS_SECRET_VALID_FOR, actualizado_en=now))
    return version, [OutgoingEvent(MARKETING, "SecretoPostbackRotado", anunciante_id, {
        "anunciante_id": anunciante_id, "version": version, "timestamp": now})]


def get_anunciante(session: Session, caller: Principal, anunciante_id: str, *, lock: bool = False):
    """The advertiser's row if the caller may see it (an operator, or the advertiser itself);
    NotFound otherwise, as for an unknown id."""
    query = _visible(select(tables.anunciantes), caller).where(tables.anunciantes.c.id == anunciante_id)
    row = session.execute(query.with_for_update() if lock else query).mappings().first()
    if row is None:
        raise NotFound("anunciante_id", "no advertiser with this id")
    return row


def list_anunciantes(session: Session, caller: Principal, limit: int, offset: int) -> list:
    """Operators: every advertiser; an advertiser: itself."""
    a = tables.anunciantes
    query = _visible(select(a), caller).order_by(a.c.creado_en, a.c.id).limit(limit).offset(offset)
    return session.execute(query).mappings().all()


def find_anunciante(session: Session, anunciante_id: str):
    """The advertiser's row, whoever asks (campaigns: its domains and default maximum), or None."""
    a = tables.anunciantes
    return session.execute(select(a).where(a.c.id == anunciante_id)).mappings().first()


def dominios_of(row) -> tuple[str, ...]:
    return tuple(d for d in row["dominios"].split(",") if d)


def _checked(dominios: list[str]) -> tuple[str, ...]:
    try:
        checked = landing.parse_domains(dominios)
    except ValueError as error:
        raise RuleViolated("dominios", str(error)) from None
    if len(",".join(checked)) > DOMINIOS_TEXT:
        raise RuleViolated("dominios", f"at most {DOMINIOS_TEXT} characters in all (commas between them included)")
    return checked


def _visible(query, caller: Principal):
    if caller.role in (OPERATOR, SYSTEM):
        return query
    if caller.role == ADVERTISER and caller.anunciante_id:
        return query.where(tables.anunciantes.c.id == caller.anunciante_id)
    return query.where(false())
