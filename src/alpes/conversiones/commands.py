"""Conversiones commands: record a postback, validate pending conversions,
refund and review. The `*_conversion` functions work inside the caller's transaction; the others
run their own units of work for the API and the jobs, with the caller as the events' actor. A
postback, refund or review is only for a campaign the caller may change (tenancy.py): another
advertiser's campaign is refused before anything is stored."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta

from sqlalchemy import bindparam, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from alpes.kernel.db import Database, bulk_insert, pending_rows
from alpes.kernel.access import Principal
from alpes.kernel.errors import Conflict, NotAllowed, NotFound
from alpes.kernel.eventstore import ConcurrencyConflict, EventStore
from alpes.kernel.messages import OutgoingEvent, new_id, utcnow
from alpes.kernel.outbox import Outbox
from alpes.kernel.runtime import ServiceRuntime

from . import domain, queries, tables, tracking
from .reference import PostbackFacts, count_caller_conversion, postback_facts, reference
from .reference import forget_unread_signals as _forget_unread_signals
from .tenancy import EVERYTHING, Tenant, may_change, may_change_owned, tenant_of
from .stream import commit_events, load_conversion

# A command that meets a concurrent append to the same stream reloads and tries again this often.
ATTEMPTS = 3


class IdempotencyConflict(Conflict):
    """The postback's order key names a conversion recorded from other parameters."""

    def __init__(self, key_field: str, order_id: str) -> None:
        name = "Idempotency-Key" if key_field == "idempotency-key" else "order_id"
        super().__init__(key_field, f"{name} {order_id!r} was already used with different parameters (keys are "
                                    f"scoped per advertiser); send the same parameters to retry, or use a new key")


def receive_postback(runtime: ServiceRuntime, store: EventStore, *, affiliate_id: str | None,
                     campaign_id: str | None, click_id: str | None, user_id: str, conversion_value,
                     conversion_type: str, currency: str, order_id: str | None, ip: str | None,
                     customer_email: str | None, now: datetime, grace: timedelta,
                     max_conversions_per_ip: int, caller_key: str | None = None,
                     max_conversions_per_caller: int = 10_000,
                     key_field: str = "order_id", caller: Principal | None = None,
                     clicks: tracking.ClickRecorder | None = None) -> tuple[str, bool, str]:
    """A postback attributed by click_id, or by both ids, from `caller` (None: the platform). Returns
    (conversion id, created?, status). NotAllowed when the campaign is not one the caller may post
    for (another advertiser's, or one not known to be its own). `order_id` is its idempotency key
    (from the body, or the Idempotency-Key header: `key_field` says which, to name it in a
    conflict), scoped per advertiser (per campaign when the campaign has none); the same key with
    other parameters raises IdempotencyConflict. `caller_key` (domain.caller_key) is whom the
    velocity rule counts the postback against besides its `ip`. `clicks` holds the clicks not written yet
    and verifies a click id whose click is not stored (None: only stored clicks attribute)."""
    fingerprint = domain.postback_fingerprint(
        affiliate_id=affiliate_id, campaign_id=campaign_id, click_id=click_id, user_id=user_id,
        conversion_value=conversion_value, currency=currency, conversion_type=conversion_type, ip=ip,
        customer_email=customer_email)
    if click_id is not None:
        if clicks is not None:
            clicks.write_waiting()
        with runtime.db.read() as session:  # clicks never change: reading ahead of the transaction is safe
            attribution = tracking.attribution_of(session, clicks and clicks.click_ids, click_id, affiliate_id, campaign_id, now)
        affiliate_id, campaign_id, click_id = attribution.affiliate_id, attribution.campaign_id, attribution.click_id
    assert affiliate_id is not None and campaign_id is not None
    tenant = EVERYTHING if caller is None else tenant_of(caller)
    email_sha256 = None if customer_email is None else domain.email_sha256(customer_email)
    scope = None
    try:
        # Its inserts are written with its commit group's, one statement per table (group_commit.py):
        # what it reads of other postbacks (order keys, velocity) counts the group's rows not written yet.
        with runtime.unit_of_work(caller, defer_writes=True) as (session, emit):
            # One read first: whose campaign it is (a campaign's owner, once known, never changes)
            # and everything validation needs; a caller it is not for is refused before any write.
            facts = postback_facts(
                session, affiliate_id=affiliate_id, campaign_id=campaign_id, click_id=click_id, ip=ip,
                customer_email_sha256=email_sha256, caller_key=caller_key, now=now,
                max_conversions_per_ip=max_conversions_per_ip, max_conversions_per_caller=max_conversions_per_caller,
                order_id=order_id)
            if not may_change_owned(tenant, facts.owner):
                raise NotAllowed("campaign_id" if click_id is None else "click_id",
                                 "the campaign is not one of yours: post conversions for your own campaigns")
            scope = idempotency_scope(campaign_id, facts.owner)
            conversion_id, created, events = record_conversion(
                session, store, affiliate_id=affiliate_id, campaign_id=campaign_id, user_id=user_id,
                conversion_value=conversion_value, conversion_type=conversion_type, currency=currency,
                order_id=order_id, grace=grace, click_id=click_id, now=now, ip=ip, customer_email=customer_email,
                max_conversions_per_ip=max_conversions_per_ip, fingerprint=fingerprint, key_field=key_field,
                caller_key=caller_key, max_conversions_per_caller=max_conversions_per_caller, scope=scope,
                facts=facts)
            emit(events)
    except IntegrityError:
        if order_id is None or scope is None:
            raise
        # A concurrent postback with the same order id committed first: its id when it had these
        # parameters, a conflict when it had others.
        with runtime.db.read() as session:
            known = order_keys(session, scope, campaign_id, order_id)
        if not known:
            raise
        conversion_id = _same_postback(known, fingerprint, key_field, order_id)
        created = False
    if created:  # what its own events made of it, committed: no need to read it back
        return conversion_id, created, _STATUS_AFTER[events[-1].event_type]
    return conversion_id, created, queries.status_of(runtime.db, conversion_id)


# The status a new conversion's last event leaves it in (the view says the same once projected).
_STATUS_AFTER = {"ConversionDetected": domain.DETECTED, "ConversionValidated": domain.VALIDATED,
                 "ConversionHeld": domain.HELD, "ConversionRejected": domain.REJECTED}


def idempotency_scope(campaign_id: str, anunciante_id: str | None) -> str:
    """Whose order ids must not repeat: the campaign's advertiser's, or the campaign's own when it
    has none (operator-owned) or is not known yet."""
    return f"anunciante:{anunciante_id}" if anunciante_id is not None else f"campana:{campaign_id}"


def order_keys(session: Session, scope: str, campaign_id: str, order_id: str) -> list[tuple[str, str | None]]:
    """The (conversion_id, fingerprint) the order id already names in the scope, or for the
    campaign (a key stored under an earlier scope: per campaign, before its owner was known): in
    the table, and among the keys of the transaction's commit group not written yet."""
    stored = session.execute(_ORDER_KEYS, {"order_id": order_id, "scope": scope, "campaign_id": campaign_id}).all()
    return [*((row.conversion_id, row.fingerprint) for row in stored),
            *((row["conversion_id"], row["fingerprint"]) for row in pending_rows(session, tables.order_keys)
              if row["order_id"] == order_id and (row["scope"] == scope or row["campaign_id"] == campaign_id))]


# Built once, values bound at execution (a postback's statements, see reference.py).
_k = tables.order_keys
_ORDER_KEYS = select(_k.c.conversion_id, _k.c.fingerprint).where(
    _k.c.order_id == bindparam("order_id"), or_(_k.c.scope == bindparam("scope"),
                                                _k.c.campaign_id == bindparam("campaign_id")))


def _same_postback(known: list[tuple[str, str | None]], fingerprint: str | None, key_field: str, order_id: str) -> str:
    """The known conversion's id when the postback repeats it; IdempotencyConflict otherwise.
    Keys stored before fingerprints existed (NULL) cannot be compared: taken as repeats, as then."""
    for conversion_id, stored in known:
        if fingerprint is None or stored is None or stored == fingerprint:
            return conversion_id
    raise IdempotencyConflict(key_field, order_id)


def record_conversion(session: Session, store: EventStore, *, affiliate_id: str, campaign_id: str, user_id: str,
                      conversion_value, conversion_type: str, currency: str, order_id: str | None,
                      grace: timedelta, click_id: str | None = None, now: datetime | None = None,
                      ip: str | None = None, customer_email: str | None = None,
                      max_conversions_per_ip: int = 5, fingerprint: str | None = None, key_field: str = "order_id",
                      caller_key: str | None = None, max_conversions_per_caller: int = 10_000,
                      scope: str | None = None,
                      facts: PostbackFacts | None = None) -> tuple[str, bool, list[OutgoingEvent]]:
    """A postback. Returns (conversion id, created?, events). A known order id (in `scope`:
    idempotency_scope, per campaign by default) returns its conversion when `fingerprint`
    (domain.postback_fingerprint) matches the one stored with it, and raises IdempotencyConflict
    when it does not. `ip`, `customer_email` and `caller_key` are fraud signals: kept beside the
    stream (the email only as its hash), never in events. `facts`: what `postback_facts` read for
    this postback in this transaction, at `now` (read here when not given)."""
    scope = scope or idempotency_scope(campaign_id, None)
    now = now or utcnow()
    email_sha256 = None if customer_email is None else domain.email_sha256(customer_email)
    if facts is None:
        facts = postback_facts(session, affiliate_id=affiliate_id, campaign_id=campaign_id, click_id=click_id, ip=ip,
                               customer_email_sha256=email_sha256, caller_key=caller_key, now=now,
                               max_conversions_per_ip=max_conversions_per_ip,
                               max_conversions_per_caller=max_conversions_per_caller, order_id=order_id)
    # The facts tell a new order id (the usual case) in the scope they computed: nothing more to read.
    if order_id is not None and (facts.order_key_taken or scope != idempotency_scope(campaign_id, facts.owner)):
        known = order_keys(session, scope, campaign_id, order_id)
        if known:
            return _same_postback(known, fingerprint, key_field, order_id), False, []
    conversion_id = new_id()
    if order_id is not None:
        # The durable idempotency key; a concurrent twin fails here and the caller re-reads.
        bulk_insert(session, tables.order_keys, [{"campaign_id": campaign_id, "order_id": order_id,
                                                  "conversion_id": conversion_id, "fingerprint": fingerprint,
                                                  "scope": scope}])
    if click_id is not None:
        bulk_insert(session, tables.click_attributions, [{"conversion_id": conversion_id, "click_id": click_id}])
    if ip is not None or customer_email is not None or caller_key is not None:
        bulk_insert(session, tables.conversion_signals, [{
            "conversion_id": conversion_id, "campaign_id": campaign_id, "ip": None if ip is None else str(ip),
            "detected_at": now, "caller_key": caller_key, "customer_email_sha256": email_sha256}])
    if caller_key is not None:
        count_caller_conversion(session, campaign_id, caller_key, now, conversion_id)
    detected = domain.Detected(conversion_id, affiliate_id, campaign_id, user_id, conversion_value, conversion_type,
                               order_id, currency, now)
    # Decided before anything is appended (validation reads only the references and the signals,
    # read with the facts), so the detection and its verdict go to the stream in one append.
    decision = domain.decide_validation(domain.Conversion().apply(detected), facts.reference, now, grace)
    events = commit_events(session, store, domain.Conversion(), [detected, *decision.events], conversion_id,
                           click_id=click_id, fresh_stream=True)  # conversion_id: new_id() above
    return conversion_id, True, events


def validate_pending(db: Database, store: EventStore, outbox: Outbox, grace: timedelta, batch: int = 200,
                     now: datetime | None = None, max_conversions_per_ip: int = 5,
                     max_conversions_per_caller: int = 10_000) -> int:
    """Decide detected conversions whose references have arrived or whose grace ran out."""
    v = tables.conversiones_view
    decided = 0
    with db.transaction() as session:
        ids = session.scalars(select(v.c.id).where(v.c.status == domain.DETECTED)
                              .order_by(v.c.timestamp).limit(batch).with_for_update(skip_locked=True)).all()
        for conversion_id in ids:
            conversion = load_conversion(session, store, conversion_id)
            assert conversion.detected is not None
            decision = domain.decide_validation(
                conversion, reference(session, conversion.detected.affiliate_id, conversion.detected.campaign_id,
                                      conversion_id, max_conversions_per_ip, max_conversions_per_caller),
                now or utcnow(), grace)
            if decision.pending:
                continue
            outbox.add(session, commit_events(session, store, conversion, decision.events, conversion_id))
            decided += 1
    return decided


def forget_unread_signals(db: Database, now: datetime) -> int:
    """One batch of reference.forget_unread_signals, in its own transaction (the periodic job)."""
    with db.transaction() as session:
        return _forget_unread_signals(session, now)


def _load_changeable(session: Session, store: EventStore, conversion_id: str, tenant: Tenant) -> domain.Conversion:
    """The conversion, when the tenant may change it; NotFound as for an unknown one otherwise."""
    conversion = load_conversion(session, store, conversion_id)
    assert conversion.detected is not None
    if not may_change(session, tenant, conversion.detected.campaign_id):
        raise NotFound("conversion_id", "no conversion with this id")
    return conversion


def refund_conversion(session: Session, store: EventStore, conversion_id: str, refund_type: str,
                      reason: str | None, now: datetime | None = None,
                      tenant: Tenant = EVERYTHING) -> list[OutgoingEvent]:
    """Append ConversionRefunded to a validated conversion's stream (marketing reverses its
    commission on it). NotFound for an unknown conversion (or another tenant's), Conflict on
    `status` when it was not validated; a repeated refund returns no event."""
    conversion = _load_changeable(session, store, conversion_id, tenant)
    try:
        events = domain.decide_refund(conversion, refund_type, reason, now or utcnow())
    except domain.NotRefundable as refusal:
        raise Conflict("status", str(refusal)) from None
    if not events:
        return []
    return commit_events(session, store, conversion, events, conversion_id)


def review_conversion(session: Session, store: EventStore, conversion_id: str, approve: bool,
                      motivo: str | None = None, now: datetime | None = None,
                      tenant: Tenant = EVERYTHING) -> list[OutgoingEvent]:
    """A reviewer approves (ConversionValidated: marketing computes the commission) or rejects
    (ConversionRejected `rejected_in_review:<motivo>`) a held conversion. NotFound when unknown
    (or another tenant's), Conflict on `status` unless on hold."""
    conversion = _load_changeable(session, store, conversion_id, tenant)
    try:
        events = domain.decide_review(conversion, approve, motivo, now or utcnow())
    except domain.NotInReview as refusal:
        raise Conflict("status", str(refusal)) from None
    return commit_events(session, store, conversion, events, conversion_id)


def refund(runtime: ServiceRuntime, store: EventStore, conversion_id: str, refund_type: str,
           reason: str | None, caller: Principal | None = None) -> None:
    """`refund_conversion` by `caller` in its own unit of work, retried on a concurrent append."""
    tenant = EVERYTHING if caller is None else tenant_of(caller)
    _retrying(runtime, lambda session: refund_conversion(session, store, conversion_id, refund_type, reason,
                                                         tenant=tenant), caller)


def review(runtime: ServiceRuntime, store: EventStore, conversion_id: str, approve: bool, motivo: str | None,
           clock: Callable[[], datetime], caller: Principal | None = None) -> None:
    """`review_conversion` by `caller` in its own unit of work, retried on a concurrent append."""
    tenant = EVERYTHING if caller is None else tenant_of(caller)
    _retrying(runtime, lambda session: review_conversion(session, store, conversion_id, approve, motivo, clock(),
                                                         tenant=tenant), caller)


def _retrying(runtime: ServiceRuntime, change: Callable[[Session], list[OutgoingEvent]],
              caller: Principal | None) -> None:
    """Run `change` and emit its events as `caller`'s; when the stream kept moving under every
    attempt, a Conflict tells the caller to retry."""
    for attempt in range(ATTEMPTS):
        try:
            with runtime.unit_of_work(caller) as (session, emit):
                emit(change(session))
            return
        except ConcurrencyConflict:
            if attempt == ATTEMPTS - 1:
                raise Conflict("conversion_id", "the conversion changed meanwhile; retry") from None
