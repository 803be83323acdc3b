"""Who sees and changes what in conversiones: an operator (and the platform itself) everything; an
advertiser the conversions of the campaigns it owns (and what hangs off them: figures, streams,
sagas); an affiliate its own conversions and figures, without the customer's data. Anything else
is nothing. Queries filter with `visible`, commands check with `may_change`; the routes turn the
caller into a `Tenant` with `tenant_of`."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import ColumnElement, false, select, true
from sqlalchemy.orm import Session

from alpes.kernel.access import ADVERTISER, AFFILIATE, OPERATOR, SYSTEM, Principal

from . import tables


@dataclass(frozen=True)
class Tenant:
    everything: bool = False
    anunciante_id: str | None = None
    afiliado_id: str | None = None

    @property
    def sees_customers(self) -> bool:
        """The customer's data (user id, address, email hash) is for the platform and the brand only."""
        return self.everything or self.anunciante_id is not None


EVERYTHING = Tenant(everything=True)
NOTHING = Tenant()


def tenant_of(principal: Principal) -> Tenant:
    """A key of a tenant's role without its tenant (it should not exist) sees nothing, never everything."""
    if principal.role in (OPERATOR, SYSTEM):
        return EVERYTHING
    if principal.role == ADVERTISER and principal.anunciante_id:
        return Tenant(anunciante_id=principal.anunciante_id)
    if principal.role == AFFILIATE and principal.afiliado_id:
        return Tenant(afiliado_id=principal.afiliado_id)
    return NOTHING


def campaigns_of(anunciante_id: str):
    """The ids of the campaigns the advertiser owns, as a subquery."""
    rc = tables.ref_campanas
    return select(rc.c.campana_id).where(rc.c.anunciante_id == anunciante_id)


def visible(tenant: Tenant, campaign_id: ColumnElement, affiliate_id: ColumnElement) -> ColumnElement[bool]:
    """The condition on a row's campaign and affiliate columns that keeps it to the tenant."""
    if tenant.everything:
        return true()
    if tenant.anunciante_id is not None:
        return campaign_id.in_(campaigns_of(tenant.anunciante_id))
    if tenant.afiliado_id is not None:
        return affiliate_id == tenant.afiliado_id
    return false()


def may_change(session: Session, tenant: Tenant, campaign_id: str) -> bool:
    """Whether the tenant may post, refund or review conversions of the campaign: the operator any,
    an advertiser the campaigns known to be its own (an unknown campaign is nobody's), nobody else."""
    if tenant.everything:
        return True
    if tenant.anunciante_id is None:
        return False
    rc = tables.ref_campanas
    return may_change_owned(tenant, session.scalar(select(rc.c.anunciante_id).where(rc.c.campana_id == campaign_id)))


def may_change_owned(tenant: Tenant, owner: str | None) -> bool:
    """`may_change` for a campaign whose owner (None: operator-owned or unknown) the caller read."""
    return tenant.everything or (tenant.anunciante_id is not None and owner == tenant.anunciante_id)
