"""Conversiones: the conversion aggregate, event-sourced.

Its state is the fold of its events; its decisions are new events. Validation reads only
what conversiones learned from its own subscriptions (reference data), never other services.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal

DETECTED = "detected"
VALIDATED = "validated"
REJECTED = "rejected"

CONVERSION_TYPES = ("sale", "purchase", "lead")

# Reasons a conversion is rejected; each travels verbatim in ConversionRejected.reason.
AFFILIATE_UNKNOWN = "affiliate_unknown"
AFFILIATE_SUSPENDED = "affiliate_suspended"
CAMPAIGN_UNKNOWN = "campaign_unknown"
CAMPAIGN_INACTIVE = "campaign_inactive"
CURRENCY_MISMATCH = "currency_mismatch"


@dataclass(frozen=True)
class Detected:
    conversion_id: str
    affiliate_id: str
    campaign_id: str
    user_id: str
    conversion_value: Decimal
    conversion_type: str
    order_id: str | None
    currency: str
    timestamp: datetime


@dataclass(frozen=True)
class Validated:
    timestamp: datetime


@dataclass(frozen=True)
class Rejected:
    reason: str
    timestamp: datetime


DomainEvent = Detected | Validated | Rejected


@dataclass
class Conversion:
    id: str = ""
    version: int = 0
    status: str | None = None
    detected: Detected | None = None
    reason: str | None = None

    def apply(self, event: DomainEvent) -> "Conversion":
        if isinstance(event, Detected):
            self.id, self.status, self.detected = event.conversion_id, DETECTED, event
        elif isinstance(event, Validated):
            self.status = VALIDATED
        elif isinstance(event, Rejected):
            self.status, self.reason = REJECTED, event.reason
        self.version += 1
        return self

    @classmethod
    def rebuild(cls, events: list[DomainEvent]) -> "Conversion":
        conversion = cls()
        for event in events:
            conversion.apply(event)
        return conversion


@dataclass(frozen=True)
class Reference:
    """What conversiones knows of an affiliate and a campaign, learned from marketing.eventos."""

    affiliate_enabled: bool | None  # None: never heard of it
    campaign_active: bool | None
    campaign_currency: str | None
    affiliate_suspended: bool = False  # known, but disabled after a suspension


@dataclass
class Decision:
    events: list[DomainEvent] = field(default_factory=list)

    @property
    def pending(self) -> bool:
        return not self.events


def decide_validation(conversion: Conversion, ref: Reference, now: datetime, grace: timedelta) -> Decision:
    """Validate once the references are known; unknown ones get `grace` time to arrive
    (they may still be on their way through the broker), then the conversion is rejected."""
    if conversion.status != DETECTED or conversion.detected is None:
        return Decision()
    waited_enough = now - conversion.detected.timestamp >= grace
    if ref.affiliate_enabled is None:
        return Decision([Rejected(AFFILIATE_UNKNOWN, now)] if waited_enough else [])
    if ref.affiliate_suspended:  # final whatever the campaign: no need to wait for it
        return Decision([Rejected(AFFILIATE_SUSPENDED, now)])
    if ref.campaign_active is None:
        return Decision([Rejected(CAMPAIGN_UNKNOWN, now)] if waited_enough else [])
    if not ref.affiliate_enabled:
        return Decision([Rejected(AFFILIATE_UNKNOWN, now)])
    if not ref.campaign_active:
        return Decision([Rejected(CAMPAIGN_INACTIVE, now)])
    if ref.campaign_currency != conversion.detected.currency:
        return Decision([Rejected(CURRENCY_MISMATCH, now)])
    return Decision([Validated(now)])
