"""The read side of the conversion streams: the view and the figures, fed by `project` both live
(in each append's transaction) and by the replay that rebuilds them from the event store."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal

from sqlalchemy import bindparam, func, select, update
from sqlalchemy.orm import Session

from alpes.kernel.codec import SchemaRegistry
from alpes.kernel.db import Database, upsert_add
from alpes.kernel.eventstore import StoredEvent

from . import domain, records, tables


def project(session: Session, stored: StoredEvent) -> None:
    """Apply one stored event to every projection: the live path (after each append, in its
    transaction) and the replay (`rebuild_projections`) both come through here."""
    _project_view(session, stored)
    _project_figures(session, stored)


# Built once, values bound at execution: this runs in every append's transaction.
_v = tables.conversiones_view
_VIEW_INSERT = _v.insert()
_SET_STATUS = update(_v).where(_v.c.id == bindparam("conversion_id")).values(
    status=bindparam("new_status"), updated_at=bindparam("new_updated_at"))
_SET_STATUS_AND_REASON = update(_v).where(_v.c.id == bindparam("conversion_id")).values(
    status=bindparam("new_status"), reason=bindparam("new_reason"), updated_at=bindparam("new_updated_at"))
# event type -> (status, the payload field that becomes `reason`, None: reason left as it is)
_STATUS_OF = {"ConversionValidated": (domain.VALIDATED, None), "ConversionRejected": (domain.REJECTED, "reason"),
              "ConversionHeld": (domain.HELD, "reason"), "ConversionRefunded": (domain.REFUNDED, "refund_type")}


def _project_view(session: Session, stored: StoredEvent) -> None:
    p = stored.payload
    if stored.event_type == "ConversionDetected":
        session.execute(_VIEW_INSERT, {
            "id": p["conversion_id"], "affiliate_id": p["affiliate_id"], "campaign_id": p["campaign_id"],
            "user_id": p["user_id"], "conversion_value": p["conversion_value"], "currency": p["currency"],
            "conversion_type": p["conversion_type"], "order_id": p["order_id"], "status": domain.DETECTED,
            "reason": None, "timestamp": p["timestamp"], "updated_at": stored.occurred_at})
        return
    change = _STATUS_OF.get(stored.event_type)
    if change is None:
        return
    status, reason_field = change
    values = {"conversion_id": p["conversion_id"], "new_status": status, "new_updated_at": stored.occurred_at}
    if reason_field is None:
        session.execute(_SET_STATUS, values)
    else:
        session.execute(_SET_STATUS_AND_REASON, {**values, "new_reason": p[reason_field]})


def _project_figures(session: Session, stored: StoredEvent) -> None:
    p = stored.payload
    counts = {"detected": 0, "validated": 0, "rejected": 0, "validated_revenue": Decimal(0)}
    if stored.event_type == "ConversionDetected":
        currency = p["currency"]
        counts["detected"] = 1
    elif stored.event_type == "ConversionValidated":
        currency = p["currency"]
        counts["validated"], counts["validated_revenue"] = 1, p["conversion_value"]
    elif stored.event_type == "ConversionRejected":
        # ConversionRejected v1 carries no currency; the view row, written when the stream's
        # ConversionDetected was projected (always earlier in the stream), has it.
        v = tables.conversiones_view
        row = session.execute(select(v.c.currency, v.c.conversion_value).where(v.c.id == p["conversion_id"])).first()
        currency = row.currency
        counts["rejected"] = 1
        if p.get("compensation"):  # it was counted validated: it moves, never counts as both
            counts["validated"], counts["validated_revenue"] = -1, -row.conversion_value
    else:
        return
    keys = {"affiliate_id": p["affiliate_id"], "campaign_id": p["campaign_id"], "currency": currency}
    upsert_add(session, tables.conversion_figures, keys, counts)


# -- replay (`alpes replay conversiones`, service stopped) --------------------------------------
@dataclass(frozen=True)
class ReplaySummary:
    events: int
    streams: int
    seconds: float


def rebuild_projections(db: Database, registry: SchemaRegistry, progress: Callable[[int, int], None] | None = None,
                        batch: int = 1000) -> ReplaySummary:
    """Delete every conversiones projection and rebuild it from the event store with `project`,
    the function the live path uses. `progress(done, total)` is called after each batch.

    One transaction for the whole rebuild: readers keep seeing the old projections until the
    new ones commit (never a half-built one), and a crash or error midway leaves the old ones
    intact. Batches would bound the transaction's size but expose empty, half-filled tables.
    """
    started = time.perf_counter()
    store = records.event_store(registry)
    events = streams = 0
    last_stream = None
    with db.transaction() as session:
        total = session.scalar(select(func.count()).select_from(tables.event_store))
        for table in tables.projection_tables:
            session.execute(table.delete())
        if progress:
            progress(0, total)
        for stored in store.all_events(session, batch=batch):
            project(session, stored)
            events += 1
            if stored.stream_id != last_stream:  # all_events comes ordered by stream
                streams, last_stream = streams + 1, stored.stream_id
            if progress and events % batch == 0:
                progress(events, total)
        if progress:
            progress(events, max(total, events))
    return ReplaySummary(events, streams, time.perf_counter() - started)
