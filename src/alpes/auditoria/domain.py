"""Auditoria: an append-only, hash-chained record of every business event.

Each record's hash covers the previous record's hash and the record itself, so editing,
deleting or reordering any record breaks every link after it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

GENESIS = "0" * 64

# Audited event types a security reviewer wants to see (the compliance view sees all).
SECURITY_RELEVANT = {
    "ConversionRejected": "reason",
    "AfiliadoRechazado": "motivos",
    "AfiliadoSuspendido": "motivo",
}


def canonical_json(value: Any) -> str:
    def default(item: Any) -> Any:
        if isinstance(item, Decimal):
            return str(item)
        if isinstance(item, datetime):
            return item.isoformat()
        if isinstance(item, bytes):
            return item.hex()
        raise TypeError(f"cannot audit a {type(item).__name__}")
    return json.dumps(value, default=default, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True)
class AuditRecord:
    seq: int
    event_id: str
    topic: str
    event_type: str
    schema_version: int
    aggregate_id: str
    occurred_at: datetime
    correlation_id: str
    causation_id: str
    payload_json: str

    def body(self) -> str:
        return canonical_json({
            "seq": self.seq, "event_id": self.event_id, "topic": self.topic, "event_type": self.event_type,
            "schema_version": self.schema_version, "aggregate_id": self.aggregate_id,
            "occurred_at": self.occurred_at.isoformat(), "correlation_id": self.correlation_id,
            "causation_id": self.causation_id, "payload": json.loads(self.payload_json),
        })


def chain_hash(prev_hash: str, record: AuditRecord) -> str:
    return hashlib.sha256((prev_hash + "\n" + record.body()).encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class BrokenLink:
    seq: int
    problem: str


def verify_chain(records: Iterable[tuple[AuditRecord, str, str]], prev_hash: str = GENESIS,
                 expected_seq: int = 1) -> BrokenLink | None:
    """Walk (record, stored prev_hash, stored hash) in seq order; the first broken link, or None."""
    for record, stored_prev, stored_hash in records:
        if record.seq != expected_seq:
            return BrokenLink(expected_seq, f"record {expected_seq} is missing (found {record.seq})")
        if stored_prev != prev_hash:
            return BrokenLink(record.seq, "previous-hash link does not match the record before it")
        if chain_hash(prev_hash, record) != stored_hash:
            return BrokenLink(record.seq, "record content does not match its hash")
        prev_hash = stored_hash
        expected_seq += 1
    return None
