"""Transactional outbox: events commit with the state change; a relay publishes them.

Rows carry a status column (not a position cursor: ids can commit out of order on MySQL).
The relay claims pending rows with SELECT ... FOR UPDATE SKIP LOCKED (dropped on SQLite,
where one writer at a time is the rule), publishes, and marks the published rows sent in
the same transaction. A failed publish leaves its row pending; it is retried, never parked.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

import structlog
from sqlalchemy import (
    BigInteger,
    Column,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    func,
    select,
    update,
)
from sqlalchemy.orm import Session

from .codec import SchemaRegistry
from .db import Database, UtcDateTime
from .messages import OutgoingEvent, utcnow

log = structlog.get_logger(__name__)

PENDING = "pending"
SENT = "sent"


def outbox_table(metadata: MetaData) -> Table:
    return Table(
        "outbox",
        metadata,
        Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
        Column("event_id", String(36), nullable=False, unique=True),
        Column("topic", String(120), nullable=False),
        Column("event_type", String(80), nullable=False),
        Column("schema_version", Integer, nullable=False),
        Column("partition_key", String(80), nullable=False),
        Column("payload", LargeBinary, nullable=False),
        Column("occurred_at", UtcDateTime(), nullable=False),
        Column("correlation_id", String(36), nullable=False),
        Column("causation_id", String(36), nullable=False),
        Column("status", String(10), nullable=False, default=PENDING),
        Column("attempts", Integer, nullable=False, default=0),
        Column("last_error", String(500)),
        Column("created_at", UtcDateTime(), nullable=False),
        Column("sent_at", UtcDateTime()),
        Index("ix_outbox_status_id", "status", "id"),
    )


@dataclass(frozen=True)
class PendingMessage:
    row_id: int
    event_id: str
    topic: str
    event_type: str
    schema_version: int
    partition_key: str
    payload: bytes
    occurred_at: datetime
    correlation_id: str
    causation_id: str


class Publisher(Protocol):
    def publish(self, messages: Sequence[PendingMessage]) -> dict[str, str | None]:
        """Publish and wait for the broker's receipts: event_id -> None if stored, else the error."""


class Outbox:
    """Writes integration events into a service's outbox table within the caller's transaction."""

    def __init__(self, table: Table, registry: SchemaRegistry) -> None:
        self.table = table
        self.registry = registry

    def add(self, session: Session, events: Iterable[OutgoingEvent]) -> None:
        rows = []
        now = utcnow()
        for event in events:
            payload, version = self.registry.encode(event.event_type, event.payload)
            rows.append({
                "event_id": event.event_id,
                "topic": event.topic,
                "event_type": event.event_type,
                "schema_version": version,
                "partition_key": event.key,
                "payload": payload,
                "occurred_at": event.occurred_at,
                "correlation_id": event.correlation_id or event.event_id,
                "causation_id": event.causation_id or event.event_id,
                "status": PENDING,
                "attempts": 0,
                "created_at": now,
            })
        if rows:
            session.execute(self.table.insert(), rows)

    def pending_count(self, session: Session) -> int:
        return session.scalar(select(func.count()).select_from(self.table).where(self.table.c.status == PENDING)) or 0


class OutboxRelay:
    """Moves pending outbox rows to the broker; run `run_once` in a loop or `start()` a thread."""

    def __init__(self, db: Database, table: Table, publisher: Publisher, *, batch_size: int = 500,
                 idle_seconds: float = 0.05, max_backoff_seconds: float = 5.0) -> None:
        self.db = db
        self.table = table
        self.publisher = publisher
        self.batch_size = batch_size
        self.idle_seconds = idle_seconds
        self.max_backoff_seconds = max_backoff_seconds
        self.published = 0
        self.failures = 0
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def run_once(self) -> tuple[int, int]:
        """Publish one batch. Returns (published, failed)."""
        t = self.table
        with self.db.transaction() as session:
            claim = (
                select(t)
                .where(t.c.status == PENDING)
                .order_by(t.c.id)
                .limit(self.batch_size)
                .with_for_update(skip_locked=True)
            )
            rows = session.execute(claim).mappings().all()
            if not rows:
                return 0, 0
            messages = [PendingMessage(
                row_id=r["id"], event_id=r["event_id"], topic=r["topic"], event_type=r["event_type"],
                schema_version=r["schema_version"], partition_key=r["partition_key"], payload=r["payload"],
                occurred_at=r["occurred_at"], correlation_id=r["correlation_id"], causation_id=r["causation_id"],
            ) for r in rows]
            try:
                results = self.publisher.publish(messages)
            except Exception as error:  # broker unreachable: nothing was confirmed
                results = {m.event_id: f"{type(error).__name__}: {error}" for m in messages}
            sent_ids = [m.row_id for m in messages if results.get(m.event_id, "no receipt") is None]
            failed = [m for m in messages if results.get(m.event_id, "no receipt") is not None]
            if sent_ids:
                session.execute(update(t).where(t.c.id.in_(sent_ids)).values(status=SENT, sent_at=utcnow()))
            for message in failed:
                session.execute(
                    update(t).where(t.c.id == message.row_id).values(
                        attempts=t.c.attempts + 1,
                        last_error=(results.get(message.event_id) or "no receipt")[:500],
                    )
                )
        self.published += len(sent_ids)
        self.failures += len(failed)
        return len(sent_ids), len(failed)

    def wake(self) -> None:
        """Called after a commit that wrote to the outbox, so the relay does not wait for its tick."""
        self._wake.set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="outbox-relay", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread:
            self._thread.join(timeout)

    def _loop(self) -> None:
        backoff = 0.0
        while not self._stop.is_set():
            try:
                published, failed = self.run_once()
            except Exception as error:  # database down: retry with backoff
                log.warning("outbox relay failed", error=str(error))
                published, failed = 0, 1
            if failed:
                backoff = min(self.max_backoff_seconds, max(0.1, backoff * 2))
                self._stop.wait(backoff)
            else:
                backoff = 0.0
                if published < self.batch_size:
                    self._wake.wait(self.idle_seconds if published else 0.5)
                    self._wake.clear()
