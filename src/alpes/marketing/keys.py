"""API keys: marketing issues and revokes them; every service learns them from marketing.eventos.

Operators manage every key; an advertiser manages the keys of its own advertiser (never an
operator's, never an affiliate's). Affiliates get a key from an operator once validated. The key
is returned once by `issue_key` and stored nowhere: the table and the event keep its SHA-256.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import insert, select, update
from sqlalchemy.orm import Session

from alpes.kernel.access import ADVERTISER, AFFILIATE, ALL_SCOPES, OPERATOR, NewKey, Principal, generate_key
from alpes.kernel.errors import NotAllowed, NotFound, RuleViolated
from alpes.kernel.messages import OutgoingEvent

from . import tables
from .topics import MARKETING

# What a key of each role can ever be scoped to: affiliates only read, but for their own webhook
# endpoints (marketing/webhooks.py), which they manage themselves.
ROLE_SCOPES = {
    OPERATOR: frozenset(ALL_SCOPES),
    ADVERTISER: frozenset(s for s in ALL_SCOPES if not s.startswith("sistema:")),
    AFFILIATE: frozenset(s for s in ALL_SCOPES if s.endswith(":read") and not s.startswith(("sistema", "auditoria",
                                                                                             "claves")))
    | {"webhooks:write"},
}


def issue_key(session: Session, issuer: Principal, *, rol: str, anunciante_id: str | None, afiliado_id: str | None,
              scopes: list[str] | None, nombre: str | None, expira_en: datetime | None,
              now: datetime) -> tuple[NewKey, list[OutgoingEvent]]:
    if issuer.role == ADVERTISER:
        if rol != ADVERTISER:
            raise NotAllowed("rol", "an advertiser issues keys of its own advertiser only")
        if anunciante_id not in (None, issuer.anunciante_id):
            raise NotFound("anunciante_id", "no advertiser with this id")
        anunciante_id = issuer.anunciante_id
    if rol == OPERATOR and (anunciante_id or afiliado_id):
        raise RuleViolated("rol", "an operator key belongs to no advertiser or affiliate")
    if rol == ADVERTISER:
        if not anunciante_id or afiliado_id:
            raise RuleViolated("anunciante_id", "an advertiser key needs anunciante_id (and no afiliado_id)")
        if session.scalar(select(tables.anunciantes.c.id).where(tables.anunciantes.c.id == anunciante_id)) is None:
            raise NotFound("anunciante_id", "no advertiser with this id")
    if rol == AFFILIATE:
        if not afiliado_id or anunciante_id:
            raise RuleViolated("afiliado_id", "an affiliate key needs afiliado_id (and no anunciante_id)")
        estado = session.scalar(select(tables.afiliados.c.estado).where(tables.afiliados.c.afiliado_id == afiliado_id))
        if estado is None:
            raise NotFound("afiliado_id", "no validated affiliate with this id")
    if expira_en is not None and expira_en <= now:
        raise RuleViolated("expira_en", "must be in the future")
    allowed = ROLE_SCOPES[rol]
    chosen = frozenset(scopes) if scopes is not None else allowed
    if not chosen or not chosen <= allowed:
        raise RuleViolated("scopes", f"a {rol} key may have only: {', '.join(sorted(allowed))}")
    if issuer.role == ADVERTISER and not chosen <= issuer.scopes:
        raise NotAllowed("scopes", "a key cannot have scopes its issuer lacks")
    new = generate_key(rol)
    row = dict(key_id=new.key_id, digest=new.digest, rol=rol, anunciante_id=anunciante_id, afiliado_id=afiliado_id,
               scopes=",".join(sorted(chosen)), nombre=nombre, expira_en=expira_en, creada_en=now)
    session.execute(insert(tables.claves_api).values(**row))
    payload = {**row, "scopes": sorted(chosen), "timestamp": now}
    payload.pop("creada_en")
    return new, [OutgoingEvent(MARKETING, "ClaveApiEmitida", new.key_id, payload)]


def revoke_key(session: Session, caller: Principal, key_id: str, now: datetime) -> list[OutgoingEvent]:
    """Revoked from now on, everywhere; revoking a revoked key changes nothing."""
    row = _visible(session, caller).where(tables.claves_api.c.key_id == key_id)
    key = session.execute(row).mappings().first()
    if key is None:
        raise NotFound("key_id", "no key with this id")
    if key["revocada_en"] is not None:
        return []
    session.execute(update(tables.claves_api).where(tables.claves_api.c.key_id == key_id).values(revocada_en=now))
    return [OutgoingEvent(MARKETING, "ClaveApiRevocada", key_id, {"key_id": key_id, "timestamp": now})]


def list_keys(session: Session, caller: Principal) -> list[dict]:
    return [dict(r) for r in session.execute(_visible(session, caller).order_by(tables.claves_api.c.creada_en))
            .mappings()]


def _visible(_session: Session, caller: Principal):
    k = tables.claves_api
    query = select(k.c.key_id, k.c.rol, k.c.anunciante_id, k.c.afiliado_id, k.c.scopes, k.c.nombre, k.c.expira_en,
                   k.c.revocada_en, k.c.creada_en, k.c.usada_en)
    if caller.role != OPERATOR:
        query = query.where(k.c.anunciante_id == caller.anunciante_id, k.c.rol == ADVERTISER)
    return query
