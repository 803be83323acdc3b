"""Conversiones: the conversion aggregate, event-sourced.

Its state is the fold of its events; its decisions are new events. Validation reads only
what conversiones learned from its own subscriptions (reference data), never other services.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

DETECTED = "detected"
VALIDATED = "validated"
REJECTED = "rejected"
REFUNDED = "refunded"
HELD = "on_hold"  # a suspicious conversion waiting for a person's decision

CONVERSION_TYPES = ("sale", "purchase", "lead")

# Reasons a conversion is rejected; each travels verbatim in ConversionRejected.reason.
AFFILIATE_UNKNOWN = "affiliate_unknown"
AFFILIATE_SUSPENDED = "affiliate_suspended"
CAMPAIGN_UNKNOWN = "campaign_unknown"
CAMPAIGN_INACTIVE = "campaign_inactive"
CURRENCY_MISMATCH = "currency_mismatch"
AFFILIATE_NOT_ENROLLED = "affiliate_not_enrolled"
OUTSIDE_ATTRIBUTION_WINDOW = "outside_attribution_window"
CAMPAIGN_OUTSIDE_DATES = "campaign_outside_dates"
SELF_REFERRAL = "self_referral"
REJECTED_IN_REVIEW = "rejected_in_review"  # followed by ":<motivo>"
# Compensations of the conversion → commission saga: a validated conversion rejected afterwards.
AFFILIATE_SUSPENDED_DURING_PROCESSING = "affiliate_suspended_during_processing"
# No longer decided (silence is not a refusal: the saga is stuck and keeps asking); kept because
# conversions compensated for it before that still carry it in their streams.
COMMISSION_NOT_CONFIRMED = "commission_not_confirmed"
COMMISSION_DENIED = "commission_denied"  # followed by ":<razon>" for a denial with no reason of its own

# Reasons a conversion is put on hold for manual review (ConversionHeld.reason).
TOO_FAST = "too_fast"  # click-to-conversion faster than a person buys: click injection (Everflow)
IP_VELOCITY = "ip_velocity"  # too many conversions from one address for one campaign
CALLER_VELOCITY = "caller_velocity"  # too many conversions from one caller (postback sender) for one campaign
VALUE_ABOVE_MAXIMUM = "value_above_maximum"  # worth more than the campaign's maximum conversion value

DEFAULT_MIN_SECONDS_CLICK_TO_CONVERSION = 15
IP_VELOCITY_WINDOW = timedelta(minutes=60)


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
    compensation: bool = False  # a validated conversion rejected by the saga's compensation


@dataclass(frozen=True)
class Held:
    reason: str
    timestamp: datetime


@dataclass(frozen=True)
class Refunded:
    refund_type: str
    reason: str | None
    timestamp: datetime


DomainEvent = Detected | Validated | Rejected | Held | Refunded


@dataclass
class Conversion:
    id: str = ""
    version: int = 0
    status: str | None = None
    detected: Detected | None = None
    reason: str | None = None
    validated_at: datetime | None = None  # a compensation undoes the validation of that moment

    def apply(self, event: DomainEvent) -> "Conversion":
        if isinstance(event, Detected):
            self.id, self.status, self.detected = event.conversion_id, DETECTED, event
        elif isinstance(event, Validated):
            self.status, self.validated_at = VALIDATED, event.timestamp
        elif isinstance(event, Rejected):
            self.status, self.reason = REJECTED, event.reason
        elif isinstance(event, Held):
            self.status, self.reason = HELD, event.reason
        elif isinstance(event, Refunded):
            self.status = REFUNDED
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
    # None: not enforced (a campaign nobody enrolled in takes id-based postbacks from any affiliate).
    affiliate_enrolled: bool | None = None
    # The click the conversion was attributed through, and the campaign's window for it.
    clicked_at: datetime | None = None
    attribution_window: timedelta | None = None
    # Fraud rules. Dates: None is open-ended. The minimum only applies to click-attributed conversions.
    campaign_starts_at: datetime | None = None
    campaign_ends_at: datetime | None = None
    min_seconds_click_to_conversion: int | None = None  # None: the campaign does not enforce one
    affiliate_email_sha256: str | None = None
    customer_email_sha256: str | None = None
    # Conversions for the campaign from this conversion's IP in the hour up to it (itself included);
    # None: the postback carried no IP.
    conversions_from_same_ip: int | None = None
    max_conversions_per_ip: int = 5
    # The same from this conversion's caller (caller_key), with or without an IP: leaving `ip` out
    # does not leave a postback uncounted. None: no caller recorded (conversions from before it).
    conversions_from_same_caller: int | None = None
    max_conversions_per_caller: int = 10_000
    # The campaign's maximum conversion value, in its currency (CampanaCreada v5); None: no maximum.
    max_conversion_value: Decimal | None = None


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
    if ref.affiliate_enrolled is False:
        # The enrollment may still be on its way through the broker: wait like for unknown references.
        return Decision([Rejected(AFFILIATE_NOT_ENROLLED, now)] if waited_enough else [])
    if ref.clicked_at is not None and ref.attribution_window is not None and \
            not within_attribution_window(ref.clicked_at, conversion.detected.timestamp, ref.attribution_window):
        return Decision([Rejected(OUTSIDE_ATTRIBUTION_WINDOW, now)])
    fraud = fraud_verdict(conversion.detected, ref)
    if fraud is not None:
        return Decision([fraud(now)])
    return Decision([Validated(now)])


def fraud_verdict(detected: Detected, ref: Reference):
    """The first fraud rule the conversion breaks, as a partial event to stamp (Rejected for clear
    violations, Held for suspicious ones), or None. Clear violations are checked first: a conversion
    that must be rejected is not worth a reviewer's time."""
    converted_at = detected.timestamp
    if not within_campaign_dates(converted_at, ref.campaign_starts_at, ref.campaign_ends_at):
        return lambda now: Rejected(CAMPAIGN_OUTSIDE_DATES, now)
    if ref.affiliate_email_sha256 is not None and ref.customer_email_sha256 == ref.affiliate_email_sha256:
        return lambda now: Rejected(SELF_REFERRAL, now)
    if ref.max_conversion_value is not None and detected.conversion_value > ref.max_conversion_value:
        return lambda now: Held(VALUE_ABOVE_MAXIMUM, now)
    if ref.clicked_at is not None and ref.min_seconds_click_to_conversion is not None and \
            converted_at - ref.clicked_at < timedelta(seconds=ref.min_seconds_click_to_conversion):
        return lambda now: Held(TOO_FAST, now)
    if ref.conversions_from_same_ip is not None and ref.conversions_from_same_ip > ref.max_conversions_per_ip:
        return lambda now: Held(IP_VELOCITY, now)
    if ref.conversions_from_same_caller is not None and \
            ref.conversions_from_same_caller > ref.max_conversions_per_caller:
        return lambda now: Held(CALLER_VELOCITY, now)
    return None


def caller_key(address: ipaddress.IPv4Address | ipaddress.IPv6Address | None, api_key_id: str | None = None) -> str:
    """Whom the velocity rule counts a postback against, besides the customer's `ip`: its API key (or
    a signed request's advertiser), else the address it came from (anonymous local callers); IPv6
    per /64 (one subscriber's prefix: its addresses rotate freely); no address shares one key."""
    if api_key_id is not None:
        return f"key:{api_key_id}"[:80]
    if address is None:
        return "ip:unknown"
    if isinstance(address, ipaddress.IPv6Address):
        return f"net:{ipaddress.IPv6Network((address, 64), strict=False)}"
    return f"ip:{address}"


def postback_fingerprint(*, affiliate_id: str | None, campaign_id: str | None, click_id: str | None, user_id: str,
                         conversion_value: Decimal, currency: str, conversion_type: str, ip: str | None,
                         customer_email: str | None) -> str:
    """sha256 of a postback's parameters as the caller sent them (not of what attribution made of
    them), canonical: the same postback always gives the same fingerprint, any other value another.
    Stored with its order key: the same key with other parameters is a conflict, not a duplicate."""
    canonical = json.dumps({
        "affiliate_id": affiliate_id, "campaign_id": campaign_id, "click_id": click_id, "user_id": user_id,
        "conversion_value": str(conversion_value), "currency": currency, "conversion_type": conversion_type,
        "ip": None if ip is None else str(ipaddress.ip_address(ip)),
        "customer_email_sha256": None if customer_email is None else email_sha256(customer_email),
    }, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def within_campaign_dates(converted_at: datetime, starts_at: datetime | None, ends_at: datetime | None) -> bool:
    """Bounds included; a missing bound is open. Measured at the conversion's time, like the window."""
    return (starts_at is None or starts_at <= converted_at) and (ends_at is None or converted_at <= ends_at)


def email_sha256(email: str) -> str:
    """The hash both sides compare: of the address stripped and lower-cased (never the address itself)."""
    return hashlib.sha256(email.strip().lower().encode()).hexdigest()


# -- manual review ------------------------------------------------------------------------------
class NotInReview(ValueError):
    pass


def decide_review(conversion: Conversion, approve: bool, motivo: str | None, now: datetime) -> list[DomainEvent]:
    """A reviewer's decision on a held conversion: Validated, or Rejected with `rejected_in_review:<motivo>`."""
    if conversion.status != HELD:
        raise NotInReview(f"only a conversion on hold is reviewed; this one is {conversion.status!r}")
    if approve:
        return [Validated(now)]
    return [Rejected(f"{REJECTED_IN_REVIEW}:{motivo}", now)]


def within_attribution_window(clicked_at: datetime, converted_at: datetime, window: timedelta) -> bool:
    """A click earns the conversions that happen within the window after it (bounds included).
    Measured at the conversion's time, not at validation time: a late decision changes nothing."""
    return timedelta(0) <= converted_at - clicked_at <= window


# Attribution models (per campaign, announced in CampanaCreada v4): which of a visitor's clicks on
# the campaign, within its window before the conversion, earns the conversion.
LAST_CLICK = "ultimo_click"  # the default: the click that closed the sale
FIRST_CLICK = "primer_click"  # the affiliate who brought the visitor first
ATTRIBUTION_MODELS = (LAST_CLICK, FIRST_CLICK)


@dataclass(frozen=True)
class Click:
    click_id: str
    clicked_at: datetime


def attributed_click(presented: Click, visitor_clicks: list[Click], model: str, converted_at: datetime,
                     window: timedelta) -> Click:
    """The click a conversion is attributed through. `presented` is the click id the postback carried;
    `visitor_clicks` are the same visitor's clicks on the same campaign (the presented one among them;
    empty when the click carried no visitor id). Only clicks within the window before the conversion
    compete: the latest wins under last click, the earliest under first click (ties: the click id, so
    the choice is stable). None qualifying: the presented click itself, which the window rule then judges."""
    if model not in ATTRIBUTION_MODELS:
        raise ValueError(f"unknown attribution model {model!r}")
    eligible = sorted((c for c in visitor_clicks if within_attribution_window(c.clicked_at, converted_at, window)),
                      key=lambda c: (c.clicked_at, c.click_id))
    if not eligible:
        return presented
    return eligible[-1] if model == LAST_CLICK else eligible[0]


CLICK_ID_PARAM = "alpes_click_id"  # the landing URL parameter that carries the click id
VISITOR_COOKIE = "alpes_vid"
VISITOR_COOKIE_MAX_AGE = 400 * 24 * 3600  # the longest browsers keep a cookie (RFC 6265bis caps at 400 days)
# `<visitor id: 32 hex>.<HMAC-SHA256 of it: 64 hex>`
_VISITOR_COOKIE = re.compile(r"([0-9a-f]{32})\.([0-9a-f]{64})")


class VisitorCookies:
    """The `alpes_vid` cookie ties a visitor's clicks together for attribution, so it must be
    unforgeable: its value is the visitor id and an HMAC of it, under a key derived from the
    platform's signing keys (ALPES_EVENT_SIGNING_KEYS: the first signs, all verify, so a rotation
    keeps cookies valid). What leaves conversiones (ClicksRecorded) is only a keyed hash of the id,
    under yet another derived key: neither the id nor a way to forge a cookie for it."""

    def __init__(self, signing_keys: Sequence[bytes]) -> None:
        if not signing_keys:
            raise ValueError("at least one signing key is needed")
        self._cookie_keys = [_derive(key, b"alpes visitor cookie v1") for key in signing_keys]
        self._hash_key = _derive(signing_keys[0], b"alpes visitor hash v1")

    def cookie_for(self, visitor_id: str) -> str:
        return f"{visitor_id}.{self._mac(self._cookie_keys[0], visitor_id)}"

    def visitor_of(self, cookie: str | None) -> str | None:
        """The visitor id of a cookie one of our keys signed; None for anything else."""
        match = _VISITOR_COOKIE.fullmatch(cookie or "")
        if match is None:
            return None
        visitor_id, mac = match.groups()
        if any(hmac.compare_digest(mac, self._mac(key, visitor_id)) for key in self._cookie_keys):
            return visitor_id
        return None

    def visitor_id_or_new(self, cookie: str | None) -> str:
        """The visitor's id from its signed cookie, else a new random one: an unsigned, forged or
        mangled cookie is ignored (the visitor starts afresh) and never reaches the database."""
        return self.visitor_of(cookie) or secrets.token_hex(16)

    def visitor_hash(self, visitor_id: str) -> str:
        """What events say of the visitor: 128 bits of a keyed hash (links a visitor's clicks for
        analytics, useless as a cookie)."""
        return self._mac(self._hash_key, visitor_id)[:32]

    @staticmethod
    def _mac(key: bytes, visitor_id: str) -> str:
        return hmac.new(key, visitor_id.encode("ascii"), hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class SignedClick:
    """What a click id says by itself: the tracking link followed and when."""

    link_code: str
    clicked_at: datetime


class ClickIds:
    """Click ids are self-contained, signed tokens: `<link code>.<24 characters>`, the characters
    being base64url of the click's time (ms, 6 bytes), 5 random bytes and a 56-bit HMAC of all that
    and the link code, under a key derived from the signing keys (the first signs, all verify). A
    postback naming a click is attributed from the token when the click's row is not stored (the
    redirect answers before the row is written: tracking.ClickRecorder), so no crash can lose an
    attribution. 35 characters with today's 10-character link codes: within the 36 of an id."""

    MAX_LINK_CODE = 11  # so that the id fits the 36 characters every click_id column and field allows

    def __init__(self, signing_keys: Sequence[bytes]) -> None:
        if not signing_keys:
            raise ValueError("at least one signing key is needed")
        self._keys = [_derive(key, b"alpes click id v1") for key in signing_keys]

    def new(self, link_code: str, clicked_at: datetime) -> tuple[str, datetime]:
        """A new click id for a click on `link_code` at `clicked_at`, and that time as the id keeps
        it (to the millisecond): the row must say what the id says."""
        if not _LINK_CODE.fullmatch(link_code):
            raise ValueError(f"a link code of 1-{self.MAX_LINK_CODE} letters, digits, '-' or '_' is needed")
        millis = int(clicked_at.timestamp() * 1000)
        body = millis.to_bytes(6, "big") + secrets.token_bytes(5)
        token = base64.urlsafe_b64encode(body + self._mac(self._keys[0], link_code, body)).decode("ascii")
        return f"{link_code}.{token}", _from_millis(millis)

    def verified(self, click_id: str) -> SignedClick | None:
        """The click a genuine id names; None for anything one of our keys did not sign."""
        parsed = _parse_click_id(click_id)
        if parsed is None:
            return None
        click, body, mac = parsed
        if not any(hmac.compare_digest(mac, self._mac(key, click.link_code, body)) for key in self._keys):
            return None
        return click

    @staticmethod
    def _mac(key: bytes, link_code: str, body: bytes) -> bytes:
        return hmac.new(key, link_code.encode("ascii") + b"." + body, hashlib.sha256).digest()[:7]


_LINK_CODE = re.compile(r"[A-Za-z0-9_-]{1,%d}" % ClickIds.MAX_LINK_CODE)
_CLICK_ID = re.compile(r"([A-Za-z0-9_-]{1,%d})\.([A-Za-z0-9_-]{24})" % ClickIds.MAX_LINK_CODE)


def _parse_click_id(click_id: str) -> tuple[SignedClick, bytes, bytes] | None:
    """(what the id says, the bytes its HMAC covers besides the link code, its HMAC); None for
    what is not a click token (a uuid click id, or anything else)."""
    match = _CLICK_ID.fullmatch(click_id or "")
    if match is None:
        return None
    raw = base64.urlsafe_b64decode(match.group(2))
    body = raw[:11]
    return SignedClick(match.group(1), _from_millis(int.from_bytes(body[:6], "big"))), body, raw[11:]


def click_of_stored_id(click_id: str) -> SignedClick | None:
    """What a click id this service already accepted says (its signature was checked when the
    postback naming it was attributed, so it is not checked again); None for a uuid click id
    (clicks recorded before ids were tokens), whose row says it."""
    parsed = _parse_click_id(click_id)
    return None if parsed is None else parsed[0]


def _from_millis(millis: int) -> datetime:
    return _EPOCH + timedelta(milliseconds=millis)


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def _derive(key: bytes, purpose: bytes) -> bytes:
    return hmac.new(key, purpose, hashlib.sha256).digest()


def landing_with_click_id(landing_url: str, click_id: str) -> str:
    """The landing URL with `alpes_click_id` appended, keeping its query and fragment."""
    parts = urlsplit(landing_url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    query = [(k, v) for k, v in query if k != CLICK_ID_PARAM] + [(CLICK_ID_PARAM, click_id)]
    return urlunsplit(parts._replace(query=urlencode(query)))


def landing_template(landing_url: str) -> tuple[str, str]:
    """The Location a redirect answers, cut where the click id goes: `before + click_id + after` is
    `landing_with_click_id(landing_url, click_id)` as a redirect sends it (percent-quoted as
    Starlette's RedirectResponse does). Built once per link, not per click: click ids are made only
    of characters neither the query nor the quoting changes."""
    marker = "ALPESCLICKIDMARKER"
    quoted = quote(landing_with_click_id(landing_url, marker), safe=":/%#?=@[]!$&'()*+,;")
    before, _, after = quoted.rpartition(f"{CLICK_ID_PARAM}={marker}")
    return before + f"{CLICK_ID_PARAM}=", after


# -- refunds -------------------------------------------------------------------------------------
REFUND_TYPES = ("reembolso", "contracargo")  # a refund by the brand, or a chargeback by the bank


class NotRefundable(ValueError):
    pass


def decide_refund(conversion: Conversion, refund_type: str, reason: str | None, now: datetime) -> list[DomainEvent]:
    """Only a validated conversion is refunded; refunding it again is the same refund (no event)."""
    if refund_type not in REFUND_TYPES:
        raise ValueError(f"refund_type must be one of {', '.join(REFUND_TYPES)}")
    if conversion.status == REFUNDED:
        return []
    if conversion.status != VALIDATED:
        raise NotRefundable(f"a conversion in status {conversion.status!r} cannot be refunded")
    return [Refunded(refund_type, reason, now)]


# -- compensation (the conversion → commission saga) ----------------------------------------------
class NotCompensable(ValueError):
    pass


def decide_compensation(conversion: Conversion, reason: str, now: datetime) -> list[DomainEvent]:
    """Undo a validation whose commission could not be booked: the conversion is rejected by an
    explicit event (never a silent rollback). Only a validated conversion is compensated; one
    already rejected is the same compensation (no event); any other status is refused."""
    if conversion.status == REJECTED:
        return []
    if conversion.status != VALIDATED:
        raise NotCompensable(f"a conversion in status {conversion.status!r} cannot be compensated")
    return [Rejected(reason, now, compensation=True)]
