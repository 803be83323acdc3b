"""Append-only event store: one stream per aggregate, optimistic concurrency on (stream, version).

Payloads are Avro bytes with their writer schema version, so reading an old event is the
same fastavro resolution (upcasting) the consumers use on the wire.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import (
    Column,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    bindparam,
    or_,
    select,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from .codec import SchemaRegistry
from .db import UtcDateTime, bulk_insert, stop_deferring
from .messages import new_id, utcnow


class ConcurrencyConflict(Exception):
    """Someone appended to the stream first: reload the aggregate and decide again."""


def event_store_table(metadata: MetaData) -> Table:
    return Table(
        "event_store",
        metadata,
        Column("stream_id", String(64), nullable=False),
        Column("version", Integer, nullable=False),
        Column("event_id", String(36), nullable=False, unique=True),
        Column("stream_type", String(60), nullable=False),
        Column("event_type", String(80), nullable=False),
        Column("schema_version", Integer, nullable=False),
        Column("payload", LargeBinary, nullable=False),
        Column("occurred_at", UtcDateTime(), nullable=False),
        Column("recorded_at", UtcDateTime(), nullable=False),
        Column("correlation_id", String(36), nullable=False),
        PrimaryKeyConstraint("stream_id", "version", name="pk_event_store"),
    )


@dataclass(frozen=True)
class StoredEvent:
    stream_id: str
    version: int
    event_id: str
    event_type: str
    schema_version: int
    payload: dict[str, Any]
    occurred_at: datetime
    correlation_id: str
    # The Avro bytes of `payload` (writer version `schema_version`) when this process just encoded
    # them (an append): the outbox writes them as they are instead of encoding the payload again.
    encoded: bytes | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class NewEvent:
    event_type: str
    payload: dict[str, Any]
    occurred_at: datetime
    event_id: str = ""


class EventStore:
    def __init__(self, table: Table, registry: SchemaRegistry, stream_type: str) -> None:
        self.table = table
        self.registry = registry
        self.stream_type = stream_type

    def load(self, session: Session, stream_id: str) -> list[StoredEvent]:
        t = self.table
        rows = session.execute(select(t).where(t.c.stream_id == stream_id).order_by(t.c.version)).mappings().all()
        return [self._stored(r) for r in rows]

    def append(self, session: Session, stream_id: str, expected_version: int, events: Sequence[NewEvent],
               correlation_id: str, *, fresh_stream: bool = False) -> list[StoredEvent]:
        """Append after `expected_version`; a taken version raises ConcurrencyConflict.
        `fresh_stream`: the first events of a stream whose id this transaction just made (a new
        uuid), which nobody else can append to: no savepoint around the insert (two statements
        fewer on a hot path). The primary key still refuses a taken version; the IntegrityError
        then ends the caller's whole unit of work, as there is nothing to reload and retry."""
        stored, rows = [], []
        now = utcnow()
        for offset, event in enumerate(events, start=1):
            payload, version = self.registry.encode(event.event_type, event.payload)
            event_id = event.event_id or new_id()
            rows.append({
                "stream_id": stream_id, "version": expected_version + offset, "event_id": event_id,
                "stream_type": self.stream_type, "event_type": event.event_type, "schema_version": version,
                "payload": payload, "occurred_at": event.occurred_at, "recorded_at": now,
                "correlation_id": correlation_id,
            })
            stored.append(StoredEvent(stream_id, expected_version + offset, event_id, event.event_type, version,
                                      event.payload, event.occurred_at, correlation_id, payload))
        if fresh_stream:
            if expected_version != 0:
                raise ValueError("a fresh stream starts at version 0")
            bulk_insert(session, self.table, rows)
            return stored
        stop_deferring(session)  # the primary key must refuse a taken version now, in the savepoint
        try:
            with session.begin_nested():
                bulk_insert(session, self.table, rows)
        except IntegrityError as error:
            raise ConcurrencyConflict(f"stream {stream_id} moved past version {expected_version}") from error
        return stored

    def all_events(self, session: Session, batch: int = 1000) -> Iterator[StoredEvent]:
        """Every event in a stable order, for rebuilding projections."""
        for chunk in self.chunks(session, batch):
            yield from chunk

    def chunks(self, session: Session, batch: int = 20_000) -> Iterator[list[StoredEvent]]:
        """Every event in primary-key order (stream, version), `batch` at a time, decoded with
        one fastavro reader per (event type, writer version). Keyset pagination on the primary
        key: each query is a range scan from where the last one stopped (`stream_id >= s` bounds
        it on every backend), never an OFFSET, and no cursor stays open while the caller writes
        on the same connection."""
        t = self.table
        columns = (t.c.stream_id, t.c.version, t.c.event_id, t.c.event_type, t.c.schema_version, t.c.payload,
                   t.c.occurred_at, t.c.correlation_id)
        first = select(*columns).order_by(t.c.stream_id, t.c.version).limit(batch)
        after = (select(*columns)
                 .where(t.c.stream_id >= bindparam("s"),
                        or_(t.c.stream_id > bindparam("s"), t.c.version > bindparam("v")))
                 .order_by(t.c.stream_id, t.c.version).limit(batch))
        decoders: dict[tuple[str, int], Callable[[bytes], dict[str, Any]]] = {}
        rows = session.execute(first).all()
        while rows:
            chunk = []
            for stream_id, version, event_id, event_type, schema_version, payload, occurred_at, correlation_id in rows:
                decode = decoders.get((event_type, schema_version))
                if decode is None:
                    decode = decoders[(event_type, schema_version)] = self.registry.decoder(event_type, schema_version)
                chunk.append(StoredEvent(stream_id, version, event_id, event_type, schema_version, decode(payload),
                                         occurred_at, correlation_id))
            yield chunk
            if len(rows) < batch:
                return
            rows = session.execute(after, {"s": chunk[-1].stream_id, "v": chunk[-1].version}).all()

    def _stored(self, row) -> StoredEvent:
        return StoredEvent(
            stream_id=row["stream_id"], version=row["version"], event_id=row["event_id"],
            event_type=row["event_type"], schema_version=row["schema_version"],
            payload=self.registry.decode(row["event_type"], row["payload"], row["schema_version"]),
            occurred_at=row["occurred_at"], correlation_id=row["correlation_id"])
