"""Which affiliates and programs each caller may see and change (issue 10's tenant scoping).

- operator: everything.
- advertiser: the affiliates it registered, and those enrolled in one of its programs (read);
  only those it registered it may approve, suspend or reactivate (a suspension is the affiliate's,
  across every advertiser's programs: not for an advertiser that merely enrolled it).
- affiliate: itself.
Anything else is answered as if it did not exist (NotFound), so an id tells nobody whether another
tenant's affiliate exists. The role decides here, never a field of the request.
"""

from __future__ import annotations

from sqlalchemy import exists, false, or_, select, true
from sqlalchemy.orm import Session

from alpes.kernel.access import ADVERTISER, AFFILIATE, OPERATOR, Principal
from alpes.kernel.errors import NotAllowed, NotFound

from . import domain, tables

# What a caller sees of an affiliate's personal data and earnings (api._afiliado shapes it).
COMPLETA = "completa"      # the operator, and the affiliate itself
ANUNCIANTE = "anunciante"  # an advertiser: no document, no payment method, email masked, no earnings


def vista(principal: Principal) -> str:
    return ANUNCIANTE if principal.role == ADVERTISER else COMPLETA


def rol_de_dominio(principal: Principal) -> str:
    """The caller's role in the words of domain.may_override_rejection."""
    return {OPERATOR: domain.OPERADOR, ADVERTISER: domain.ANUNCIANTE, AFFILIATE: "afiliado"}.get(principal.role, "")


def registrante(principal: Principal) -> str | None:
    """Who a new registration is recorded as registered by: the advertiser, or None for an operator."""
    if principal.role == OPERATOR:
        return None
    if principal.role == ADVERTISER and principal.anunciante_id:
        return principal.anunciante_id
    raise NotAllowed(None, "only an operator or an advertiser registers affiliates")


def visibles(principal: Principal):
    """The condition on `afiliados` rows the caller may read."""
    a, i, p = tables.afiliados, tables.inscripciones, tables.programas
    if principal.role == OPERATOR:
        return true()
    if principal.role == ADVERTISER and principal.anunciante_id:
        en_sus_programas = exists().where(i.c.afiliado_id == a.c.id, p.c.id == i.c.campana_id,
                                          p.c.anunciante_id == principal.anunciante_id)
        return or_(a.c.registrado_por_anunciante == principal.anunciante_id, en_sus_programas)
    if principal.role == AFFILIATE and principal.afiliado_id:
        return a.c.id == principal.afiliado_id
    return false()


def modificables(principal: Principal):
    """The condition on `afiliados` rows the caller may approve, suspend or reactivate."""
    a = tables.afiliados
    if principal.role == OPERATOR:
        return true()
    if principal.role == ADVERTISER and principal.anunciante_id:
        return a.c.registrado_por_anunciante == principal.anunciante_id
    return false()


def check_modificable(session: Session, principal: Principal, afiliado_id: str) -> None:
    """NotFound unless the affiliate exists and the caller may change it (locks its row)."""
    a = tables.afiliados
    found = session.scalar(select(a.c.id).where(a.c.id == afiliado_id, modificables(principal)).with_for_update())
    if found is None:
        raise NotFound("afiliado_id", "no affiliate with this id")


def programas_visibles(principal: Principal):
    """The condition on `programas` rows the caller may read: the operator all of them, an advertiser
    its own, an affiliate the catalogue (active programs)."""
    p = tables.programas
    if principal.role == OPERATOR:
        return true()
    if principal.role == ADVERTISER and principal.anunciante_id:
        return p.c.anunciante_id == principal.anunciante_id
    if principal.role == AFFILIATE:
        return p.c.estado == "activa"
    return false()
