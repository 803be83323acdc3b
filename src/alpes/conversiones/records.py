"""The conversion event stream's records: the store and the mapping between domain events and
the Avro records (ConversionDetected, ConversionValidated, ...) stored and published."""

from __future__ import annotations

from alpes.kernel.codec import SchemaRegistry
from alpes.kernel.eventstore import EventStore, NewEvent, StoredEvent

from . import domain, tables

TOPIC = "conversiones.eventos"
STREAM_TYPE = "conversion"


def event_store(registry: SchemaRegistry) -> EventStore:
    """The conversion event store. The service builds it once (service.py) and hands it down."""
    return EventStore(tables.event_store, registry, STREAM_TYPE)


def to_record(conversion: domain.Conversion, event: domain.DomainEvent, click_id: str | None = None) -> NewEvent:
    """`click_id`: the click the conversion was attributed through (kept beside the stream in
    click_attributions), carried by ConversionValidated."""
    if isinstance(event, domain.Detected):
        return NewEvent("ConversionDetected", {
            "conversion_id": event.conversion_id, "affiliate_id": event.affiliate_id, "campaign_id": event.campaign_id,
            "user_id": event.user_id, "conversion_value": event.conversion_value, "conversion_type": event.conversion_type,
            "order_id": event.order_id, "currency": event.currency, "timestamp": event.timestamp}, event.timestamp)
    d = conversion.detected
    assert d is not None
    if isinstance(event, domain.Validated):
        return NewEvent("ConversionValidated", {
            "conversion_id": d.conversion_id, "affiliate_id": d.affiliate_id, "campaign_id": d.campaign_id,
            "conversion_value": d.conversion_value, "currency": d.currency, "conversion_type": d.conversion_type,
            "timestamp": event.timestamp, "click_id": click_id, "converted_at": d.timestamp}, event.timestamp)
    if isinstance(event, domain.Refunded):
        return NewEvent("ConversionRefunded", {
            "conversion_id": d.conversion_id, "affiliate_id": d.affiliate_id, "campaign_id": d.campaign_id,
            "conversion_value": d.conversion_value, "currency": d.currency, "refund_type": event.refund_type,
            "reason": event.reason, "timestamp": event.timestamp}, event.timestamp)
    if isinstance(event, domain.Held):
        return NewEvent("ConversionHeld", {
            "conversion_id": d.conversion_id, "affiliate_id": d.affiliate_id, "campaign_id": d.campaign_id,
            "reason": event.reason, "timestamp": event.timestamp}, event.timestamp)
    # A compensation carries what undoing the validation needs: when it happened and what it was worth.
    return NewEvent("ConversionRejected", {
        "conversion_id": d.conversion_id, "affiliate_id": d.affiliate_id, "campaign_id": d.campaign_id,
        "reason": event.reason, "timestamp": event.timestamp, "compensation": event.compensation,
        "validated_at": conversion.validated_at if event.compensation else None,
        "conversion_value": d.conversion_value, "currency": d.currency}, event.timestamp)


def from_record(stored: StoredEvent) -> domain.DomainEvent:
    p = stored.payload
    if stored.event_type == "ConversionDetected":
        return domain.Detected(p["conversion_id"], p["affiliate_id"], p["campaign_id"], p["user_id"],
                               p["conversion_value"], p["conversion_type"], p["order_id"], p["currency"], p["timestamp"])
    if stored.event_type == "ConversionValidated":
        return domain.Validated(p["timestamp"])
    if stored.event_type == "ConversionRejected":
        return domain.Rejected(p["reason"], p["timestamp"], p.get("compensation", False))
    if stored.event_type == "ConversionHeld":
        return domain.Held(p["reason"], p["timestamp"])
    if stored.event_type == "ConversionRefunded":
        return domain.Refunded(p["refund_type"], p["reason"], p["timestamp"])
    raise ValueError(f"not a conversion event: {stored.event_type}")
