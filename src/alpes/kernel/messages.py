"""Integration event envelope: what travels on the broker and sits in outboxes.

Payload is Avro bytes; the metadata travels as Pulsar message properties so a consumer
can pick the writer schema before it touches the payload.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from .codec import SchemaRegistry


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def new_id() -> str:
    return str(uuid.uuid4())


@dataclass(frozen=True)
class OutgoingEvent:
    """An integration event about to be written to an outbox."""

    topic: str
    event_type: str
    key: str  # partition key: the aggregate id
    payload: dict[str, Any]
    event_id: str = field(default_factory=new_id)
    occurred_at: datetime = field(default_factory=utcnow)
    correlation_id: str | None = None
    causation_id: str | None = None
    # (Avro bytes, writer version) of `payload`, when already encoded (an event-store append):
    # written to the outbox as they are. None: the outbox encodes the payload.
    encoded: tuple[bytes, int] | None = field(default=None, compare=False, repr=False)

    def caused_by(self, incoming: "IncomingEvent") -> "OutgoingEvent":
        """The same event, linked to the message that caused it (same correlation)."""
        return OutgoingEvent(
            topic=self.topic,
            event_type=self.event_type,
            key=self.key,
            payload=self.payload,
            event_id=self.event_id,
            occurred_at=self.occurred_at,
            correlation_id=incoming.correlation_id,
            causation_id=incoming.event_id,
            encoded=self.encoded,
        )


@dataclass(frozen=True)
class IncomingEvent:
    """A decoded integration event handed to a consumer handler."""

    topic: str
    subscription: str
    event_id: str
    event_type: str
    schema_version: int
    key: str
    occurred_at: datetime
    correlation_id: str
    causation_id: str
    payload: dict[str, Any]
    raw: bytes = b""
    # Who caused it (the principal behind the request, or `system`): see kernel/access.py.
    actor_id: str = "system"
    actor_role: str = "system"
    # The W3C trace context of the span that emitted it (kernel/tracing.py); None: none known.
    traceparent: str | None = None


def properties_of(event_id: str, event_type: str, version: int, occurred_at: datetime,
                  correlation_id: str, causation_id: str, producer: str,
                  actor_id: str = "system", actor_role: str = "system",
                  traceparent: str | None = None) -> dict[str, str]:
    """The envelope properties of a message; `traceparent` only when the event has one."""
    properties = {
        "event_id": event_id,
        "event_type": event_type,
        "schema_version": str(version),
        "occurred_at": occurred_at.astimezone(timezone.utc).isoformat(),
        "correlation_id": correlation_id,
        "causation_id": causation_id,
        "producer": producer,
        "actor_id": actor_id,
        "actor_role": actor_role,
    }
    if traceparent:
        properties["traceparent"] = traceparent
    return properties


class TransientFailure(Exception):
    """The database could not be reached or was busy: not the message's fault, retry it later
    without counting it as a failed attempt."""


class UndecodableMessage(ValueError):
    """The message cannot be turned into an event (missing properties, bad Avro)."""


def decode_message(registry: SchemaRegistry, topic: str, subscription: str,
                   properties: dict[str, str], key: str, data: bytes, signer=None) -> IncomingEvent:
    """The event a message carries; UndecodableMessage if it has none, or (with a `signer`,
    kernel.signing.EventSigner) if the platform did not sign it."""
    if signer is not None:
        signer.verify(topic, key, properties, data)
    try:
        event_type = properties["event_type"]
        version = int(properties["schema_version"])
        event_id = properties["event_id"]
        occurred_at = datetime.fromisoformat(properties["occurred_at"])
    except (KeyError, ValueError) as error:
        raise UndecodableMessage(f"bad envelope properties: {error}") from error
    try:
        payload = registry.decode(event_type, data, version)
    except Exception as error:  # fastavro raises many types on corrupt input
        raise UndecodableMessage(f"{event_type} v{version}: {error}") from error
    return IncomingEvent(
        topic=topic,
        subscription=subscription,
        event_id=event_id,
        event_type=event_type,
        schema_version=version,
        key=key,
        occurred_at=occurred_at,
        correlation_id=properties.get("correlation_id") or event_id,
        causation_id=properties.get("causation_id") or event_id,
        payload=payload,
        raw=data,
        # Messages published before actors were recorded carry none: the platform's own doing.
        actor_id=properties.get("actor_id") or "system",
        actor_role=properties.get("actor_role") or "system",
        traceparent=properties.get("traceparent") or None,
    )
