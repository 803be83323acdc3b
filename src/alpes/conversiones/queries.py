"""What the conversiones API reads: the conversions view, the figures, a conversion's stream and
the saga log. Each opens its own read session."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from alpes.kernel.db import Database, where_equal
from alpes.kernel.errors import NotFound
from alpes.kernel.eventstore import EventStore, StoredEvent

from . import domain, saga, tables


def conversions(db: Database, *, status: str | None, affiliate_id: str | None, campaign_id: str | None,
                limit: int, offset: int) -> list:
    """View rows, oldest first."""
    v = tables.conversiones_view
    query = select(v).order_by(v.c.timestamp, v.c.id).limit(limit).offset(offset)
    query = where_equal(query, v, status=status, affiliate_id=affiliate_id, campaign_id=campaign_id)
    with db.read() as session:
        return session.execute(query).mappings().all()


def conversion(db: Database, conversion_id: str):
    """The conversion's view row; NotFound when there is none."""
    v = tables.conversiones_view
    with db.read() as session:
        row = session.execute(select(v).where(v.c.id == conversion_id)).mappings().first()
    if row is None:
        raise NotFound("conversion_id", "no conversion with this id")
    return row


def status_of(db: Database, conversion_id: str) -> str:
    v = tables.conversiones_view
    with db.read() as session:
        return session.scalar(select(v.c.status).where(v.c.id == conversion_id)) or domain.DETECTED


def conversion_for_order(session: Session, campaign_id: str, order_id: str) -> str | None:
    """The conversion a postback's (campaign, order id) idempotency key already names, if any."""
    k = tables.order_keys
    return session.scalar(select(k.c.conversion_id).where(k.c.campaign_id == campaign_id, k.c.order_id == order_id))


def figures(db: Database, *, affiliate_id: str | None, campaign_id: str | None) -> list:
    """Figure rows per affiliate, campaign and currency."""
    f = tables.conversion_figures
    query = where_equal(select(f).order_by(f.c.affiliate_id, f.c.campaign_id, f.c.currency), f,
                        affiliate_id=affiliate_id, campaign_id=campaign_id)
    with db.read() as session:
        return session.execute(query).mappings().all()


def history(db: Database, store: EventStore, conversion_id: str) -> list[StoredEvent]:
    """The conversion's stream as stored (upcast to the newest schema of each event); NotFound when empty."""
    with db.read() as session:
        events = store.load(session, conversion_id)
    if not events:
        raise NotFound("conversion_id", "no conversion with this id")
    return events


# -- the saga log ------------------------------------------------------------------------------
def sagas(db: Database, policy: saga.SagaPolicy, *, estado: str | None, limit: int, offset: int) -> list[dict]:
    """Saga summaries, oldest first, without their steps."""
    s = tables.sagas
    query = where_equal(select(s).order_by(s.c.created_at, s.c.saga_id).limit(limit).offset(offset), s,
                        estado=estado)
    with db.read() as session:
        rows = session.execute(query).mappings().all()
    return [saga.summary(r, policy) for r in rows]


def one_saga(db: Database, policy: saga.SagaPolicy, correlation_id: str) -> dict:
    """One saga with its steps; NotFound when there is none."""
    with db.read() as session:
        found = saga.view(session, correlation_id, policy)
    if found is None:
        raise NotFound("correlation_id", "no saga with this correlation id")
    return found


def saga_health(db: Database) -> dict:
    """What conversiones adds to /health: how many sagas wait on marketing, and how many of them
    are stuck (past every timeout, still asking; each raised one SagaAtascada alert)."""
    s = tables.sagas
    with db.read() as session:
        counts = dict(session.execute(select(s.c.estado, func.count()).where(s.c.estado.in_(saga.WAITING_STATES))
                                      .group_by(s.c.estado)).all())
    return {"running": counts.get(saga.RUNNING, 0), "stuck": counts.get(saga.STUCK, 0)}
