"""The read side of the conversion streams: the view and the figures, fed by `project` both live
(in each append's transaction) and by the replay that rebuilds them from the event store."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from decimal import Decimal

from sqlalchemy import bindparam, func, select, text, update
from sqlalchemy.orm import Session

from alpes.kernel.codec import SchemaRegistry
from alpes.kernel.db import Database, bulk_insert, upsert_add
from alpes.kernel.eventstore import StoredEvent

from . import domain, records, tables


def project(session: Session, stored: StoredEvent) -> None:
    """Apply one stored event to every projection: the live path (after each append, in its
    transaction) and the replay (`rebuild_projections`) both come through here."""
    _project_view(session, stored)
    _project_figures(session, stored)


def project_new_stream(session: Session, stored: list[StoredEvent]) -> None:
    """`project` for the first append of a stream (its ConversionDetected, and the verdict a
    postback appends with it): the same rows, folded in memory as the replay folds them, so the
    view row is inserted as the events leave it and each figures row is added to once (2
    statements, not 4)."""
    fold = _Fold()
    for item in stored:
        fold.apply(session, item)
    bulk_insert(session, tables.conversiones_view, fold.take_rows())
    for row in fold.figure_rows():
        upsert_add(session, tables.conversion_figures,
                   {key: row[key] for key in _FIGURE_KEYS}, {column: row[column] for column in _FIGURE_COLUMNS})


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


# Figures' counters, in the order of _Fold.figures' lists, and the key they are counted by.
_FIGURE_COLUMNS = ("detected", "validated", "rejected", "validated_revenue")
_FIGURE_KEYS = ("affiliate_id", "campaign_id", "currency")


class _Fold:
    """The projections of a run of events, folded in memory: the same rules as `project`, row by
    row, without a statement per event. A view row is kept until its stream can no longer change
    in this replay (the store is read in stream order), then written with its final state."""

    def __init__(self) -> None:
        self.rows: dict[str, dict] = {}   # conversion id -> the view row being built
        self.figures: dict[tuple[str, str, str], list] = {}

    def apply(self, session: Session, stored: StoredEvent) -> None:
        p, kind = stored.payload, stored.event_type
        row = self.rows.get(p["conversion_id"])
        if kind == "ConversionDetected":
            if row is not None:  # the live path's insert would fail on the primary key too
                raise ValueError(f"conversion {p['conversion_id']} detected twice")
            self.rows[p["conversion_id"]] = row = {
                "id": p["conversion_id"], "affiliate_id": p["affiliate_id"], "campaign_id": p["campaign_id"],
                "user_id": p["user_id"], "conversion_value": p["conversion_value"], "currency": p["currency"],
                "conversion_type": p["conversion_type"], "order_id": p["order_id"], "status": domain.DETECTED,
                "reason": None, "timestamp": p["timestamp"], "updated_at": stored.occurred_at}
            self._count(p, p["currency"], 1, 0, 0, Decimal(0))
            return
        if kind not in _VIEW_CHANGES:
            return
        if row is None:
            # Not built in this run (its row was written in an earlier chunk, or never detected):
            # the live path's statement on the stored row; the figures stay in memory.
            _project_view(session, stored)
            if kind == "ConversionRejected":
                v = tables.conversiones_view
                row = session.execute(select(v.c.currency, v.c.conversion_value)
                                      .where(v.c.id == p["conversion_id"])).mappings().first()
        else:
            status, reason_field = _VIEW_CHANGES[kind]
            row["status"], row["updated_at"] = status, stored.occurred_at
            if reason_field:
                row["reason"] = p[reason_field]
        if kind == "ConversionValidated":
            self._count(p, p["currency"], 0, 1, 0, p["conversion_value"])
        elif kind == "ConversionRejected":
            # ConversionRejected v1 carries no currency: the view row's (as in _project_figures).
            if p.get("compensation"):  # it was counted validated: it moves, never counts as both
                self._count(p, row["currency"], 0, -1, 1, -row["conversion_value"])
            else:
                self._count(p, row["currency"], 0, 0, 1, Decimal(0))

    def _count(self, p: dict, currency: str, detected: int, validated: int, rejected: int, revenue: Decimal) -> None:
        key = (p["affiliate_id"], p["campaign_id"], currency)
        counts = self.figures.get(key)
        if counts is None:
            self.figures[key] = [detected, validated, rejected, revenue]
        else:
            counts[0] += detected
            counts[1] += validated
            counts[2] += rejected
            counts[3] += revenue

    def take_rows(self, keep: str | None = None) -> list[dict]:
        """The finished view rows (all but `keep`'s, whose stream may go on in the next chunk)."""
        kept = self.rows.pop(keep, None) if keep is not None else None
        rows, self.rows = list(self.rows.values()), {}
        if kept is not None:
            self.rows[keep] = kept
        return rows

    def figure_rows(self) -> list[dict]:
        return [{"affiliate_id": a, "campaign_id": k, "currency": c, **dict(zip(_FIGURE_COLUMNS, counts))}
                for (a, k, c), counts in self.figures.items()]


# What each later event does to the view row: its status, and the payload field kept as its reason.
_VIEW_CHANGES = {
    "ConversionValidated": (domain.VALIDATED, None),
    "ConversionRejected": (domain.REJECTED, "reason"),
    "ConversionHeld": (domain.HELD, "reason"),
    "ConversionRefunded": (domain.REFUNDED, "refund_type"),
}


def rebuild_projections(db: Database, registry: SchemaRegistry, progress: Callable[[int, int], None] | None = None,
                        batch: int = 20_000) -> ReplaySummary:
    """Delete every conversiones projection and rebuild it from the event store, by the rules of
    `project` (the live path), folded in memory. `progress(done, total)` is called after each batch.

    The store is read in primary-key order (stream, version) in chunks of `batch` events; the
    view rows a chunk finished are written with one executemany, the figures (a few rows per
    affiliate, campaign and currency) at the end.

    One transaction for the whole rebuild: readers keep seeing the old projections until the
    new ones commit (never a half-built one), and a crash or error midway leaves the old ones
    intact. Batches would bound the transaction's size but expose empty, half-filled tables.
    """
    started = time.perf_counter()
    store = records.event_store(registry)
    fold = _Fold()
    events = streams = 0
    last_stream = None
    with db.transaction() as session, _rebuild_pragmas(session):
        total = session.scalar(select(func.count()).select_from(tables.event_store))
        for table in tables.projection_tables:
            session.execute(table.delete())
        if progress:
            progress(0, total)
        for chunk in store.chunks(session, batch=batch):
            for stored in chunk:
                fold.apply(session, stored)
                if stored.stream_id != last_stream:  # chunks come ordered by stream
                    streams, last_stream = streams + 1, stored.stream_id
            events += len(chunk)
            bulk_insert(session, tables.conversiones_view, fold.take_rows(keep=last_stream))
            if progress:
                progress(events, max(total, events))
        bulk_insert(session, tables.conversiones_view, fold.take_rows())
        bulk_insert(session, tables.conversion_figures, fold.figure_rows())
        if progress:
            progress(events, max(total, events))
    return ReplaySummary(events, streams, time.perf_counter() - started)


@contextmanager
def _rebuild_pragmas(session: Session) -> Iterator[None]:
    """SQLite: a page cache large enough for the rebuilt indexes, for this rebuild only (the
    connection goes back to the pool with its own setting). Durability is untouched: same
    journal, same fsync at the commit."""
    if session.get_bind().dialect.name != "sqlite":
        yield
        return
    before = session.execute(text("PRAGMA cache_size")).scalar()
    session.execute(text("PRAGMA cache_size=-262144"))  # 256 MiB
    try:
        yield
    finally:
        session.execute(text(f"PRAGMA cache_size={int(before)}"))
