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


# Event types whose aggregate (the payload's `id`) is a campaign, or an advertiser: an advertiser sees
# the records of its own aggregates, and these name theirs by `id` rather than `campana_id`.
CAMPAIGN_EVENTS = frozenset({"CampanaCreada", "CampanaActivada", "CampanaPausada", "CampanaFinalizada",
                             "CampanaActualizada"})
ADVERTISER_EVENTS = frozenset({"AnuncianteRegistrado", "AnuncianteActualizado"})
MAX_OWNER_ID = 80  # what the owner columns hold: a longer value names nothing of ours


@dataclass(frozen=True)
class Owners:
    """What an audited event's payload says it belongs to: its campaign (`campana_id`, `campaign_id`,
    or the campaign itself), the conversion it is about, and its advertiser. Read when reading the
    log: the advertiser owning a campaign or a conversion's campaign may be learnt later."""

    campana_id: str | None
    conversion_id: str | None
    anunciante_id: str | None


def _an_id(value: Any) -> str | None:
    return value if isinstance(value, str) and 0 < len(value) <= MAX_OWNER_ID else None


def owners_of(event_type: str, payload: dict[str, Any]) -> Owners:
    campana = _an_id(payload.get("campana_id")) or _an_id(payload.get("campaign_id"))
    if campana is None and event_type in CAMPAIGN_EVENTS:
        campana = _an_id(payload.get("id"))
    anunciante = _an_id(payload.get("anunciante_id"))
    if anunciante is None and event_type in ADVERTISER_EVENTS:
        anunciante = _an_id(payload.get("id"))
    return Owners(campana, _an_id(payload.get("conversion_id")), anunciante)


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
    # Who caused the event (its principal's id and role, or `system`); None on records audited
    # before events carried an actor.
    actor_id: str | None = None
    actor_role: str | None = None

    def body(self) -> str:
        """What the hash covers. The actor is in it only when the record has one, so a record
        written before actors existed hashes as it did then and the old chain still verifies."""
        body = {
            "seq": self.seq, "event_id": self.event_id, "topic": self.topic, "event_type": self.event_type,
            "schema_version": self.schema_version, "aggregate_id": self.aggregate_id,
            "occurred_at": self.occurred_at.isoformat(), "correlation_id": self.correlation_id,
            "causation_id": self.causation_id, "payload": json.loads(self.payload_json),
        }
        if self.actor_id is not None:
            body["actor_id"] = self.actor_id
        if self.actor_role is not None:
            body["actor_role"] = self.actor_role
        return canonical_json(body)


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
