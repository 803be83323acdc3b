"""What the conversiones API reads: the conversions view, the figures, a conversion's stream and
the saga log, each kept to the caller's tenant (tenancy.py): lists are filtered, another tenant's
conversion or saga asked by id is NotFound like one that does not exist. Each opens its own read
session."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from alpes.kernel.db import Database, where_equal
from alpes.kernel.errors import NotFound
from alpes.kernel.eventstore import EventStore, StoredEvent

from . import domain, saga, tables
from .tenancy import Tenant, visible


def conversions(db: Database, *, tenant: Tenant, status: str | None, affiliate_id: str | None,
                campaign_id: str | None, limit: int, offset: int) -> list:
    """View rows of the tenant's conversions, oldest first."""
    v = tables.conversiones_view
    query = select(v).where(visible(tenant, v.c.campaign_id, v.c.affiliate_id)) \
        .order_by(v.c.timestamp, v.c.id).limit(limit).offset(offset)
    query = where_equal(query, v, status=status, affiliate_id=affiliate_id, campaign_id=campaign_id)
    with db.read() as session:
        return session.execute(query).mappings().all()


def conversion(db: Database, conversion_id: str, *, tenant: Tenant):
    """The conversion's view row; NotFound when there is none or it is another tenant's."""
    with db.read() as session:
        return visible_conversion(session, conversion_id, tenant)


def visible_conversion(session: Session, conversion_id: str, tenant: Tenant):
    v = tables.conversiones_view
    row = session.execute(select(v).where(v.c.id == conversion_id, visible(tenant, v.c.campaign_id,
                                                                           v.c.affiliate_id))).mappings().first()
    if row is None:
        raise NotFound("conversion_id", "no conversion with this id")
    return row


def status_of(db: Database, conversion_id: str) -> str:
    v = tables.conversiones_view
    with db.read() as session:
        return session.scalar(select(v.c.status).where(v.c.id == conversion_id)) or domain.DETECTED


def figures(db: Database, *, tenant: Tenant, affiliate_id: str | None, campaign_id: str | None) -> list:
    """The tenant's figure rows per affiliate, campaign and currency."""
    f = tables.conversion_figures
    query = select(f).where(visible(tenant, f.c.campaign_id, f.c.affiliate_id)) \
        .order_by(f.c.affiliate_id, f.c.campaign_id, f.c.currency)
    query = where_equal(query, f, affiliate_id=affiliate_id, campaign_id=campaign_id)
    with db.read() as session:
        return session.execute(query).mappings().all()


def history(db: Database, store: EventStore, conversion_id: str, *, tenant: Tenant) -> list[StoredEvent]:
    """The conversion's stream as stored (upcast to the newest schema of each event); NotFound when
    empty or another tenant's."""
    with db.read() as session:
        visible_conversion(session, conversion_id, tenant)
        events = store.load(session, conversion_id)
    if not events:
        raise NotFound("conversion_id", "no conversion with this id")
    return events


# -- the saga log ------------------------------------------------------------------------------
def sagas(db: Database, policy: saga.SagaPolicy, *, tenant: Tenant, estado: str | None, limit: int,
          offset: int) -> list[dict]:
    """Summaries of the sagas of the tenant's conversions, oldest first, without their steps."""
    s, v = tables.sagas, tables.conversiones_view
    query = select(s).order_by(s.c.created_at, s.c.saga_id).limit(limit).offset(offset)
    if not tenant.everything:  # a saga's id is its conversion's
        query = query.where(s.c.saga_id.in_(select(v.c.id).where(visible(tenant, v.c.campaign_id,
                                                                          v.c.affiliate_id))))
    query = where_equal(query, s, estado=estado)
    with db.read() as session:
        rows = session.execute(query).mappings().all()
    return [saga.summary(r, policy) for r in rows]


def one_saga(db: Database, policy: saga.SagaPolicy, correlation_id: str, *, tenant: Tenant) -> dict:
    """One saga with its steps; NotFound when there is none or its conversion is another tenant's."""
    with db.read() as session:
        found = None
        if tenant.everything or _visible_id(session, correlation_id, tenant):
            found = saga.view(session, correlation_id, policy)
    if found is None:
        raise NotFound("correlation_id", "no saga with this correlation id")
    return found


def _visible_id(session: Session, conversion_id: str, tenant: Tenant) -> bool:
    v = tables.conversiones_view
    return session.scalar(select(v.c.id).where(v.c.id == conversion_id,
                                               visible(tenant, v.c.campaign_id, v.c.affiliate_id))) is not None


def saga_health(db: Database) -> dict:
    """What conversiones adds to /health: how many sagas wait on marketing, and how many of them
    are stuck (past every timeout, still asking; each raised one SagaAtascada alert)."""
    s = tables.sagas
    with db.read() as session:
        counts = dict(session.execute(select(s.c.estado, func.count()).where(s.c.estado.in_(saga.WAITING_STATES))
                                      .group_by(s.c.estado)).all())
    return {"running": counts.get(saga.RUNNING, 0), "stuck": counts.get(saga.STUCK, 0)}
