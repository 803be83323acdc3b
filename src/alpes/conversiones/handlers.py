"""Conversiones use cases: record postbacks, validate, learn reference data, project."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal

from sqlalchemy import exists, func, select, update
from sqlalchemy.orm import Session

from alpes.kernel.codec import SchemaRegistry
from alpes.kernel.db import Database, upsert_add
from alpes.kernel.eventstore import EventStore, NewEvent, StoredEvent
from alpes.kernel.http import Problem
from alpes.kernel.messages import IncomingEvent, OutgoingEvent, new_id, utcnow
from alpes.kernel.outbox import Outbox

from . import domain, saga, tables

TOPIC = "conversiones.eventos"
STREAM_TYPE = "conversion"


def event_store(registry) -> EventStore:
    return EventStore(tables.event_store, registry, STREAM_TYPE)


# -- mapping between domain events and their Avro records --------------------------------
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


# -- projections ---------------------------------------------------------------------------
def project(session: Session, stored: StoredEvent) -> None:
    """Apply one stored event to every projection: the live path (after each append, in its
    transaction) and the replay (`rebuild_projections`) both come through here."""
    _project_view(session, stored)
    _project_figures(session, stored)


def _project_view(session: Session, stored: StoredEvent) -> None:
    v = tables.conversiones_view
    p = stored.payload
    if stored.event_type == "ConversionDetected":
        session.execute(v.insert().values(
            id=p["conversion_id"], affiliate_id=p["affiliate_id"], campaign_id=p["campaign_id"], user_id=p["user_id"],
            conversion_value=p["conversion_value"], currency=p["currency"], conversion_type=p["conversion_type"],
            order_id=p["order_id"], status=domain.DETECTED, reason=None, timestamp=p["timestamp"],
            updated_at=stored.occurred_at))
    elif stored.event_type == "ConversionValidated":
        session.execute(update(v).where(v.c.id == p["conversion_id"]).values(
            status=domain.VALIDATED, updated_at=stored.occurred_at))
    elif stored.event_type == "ConversionRejected":
        session.execute(update(v).where(v.c.id == p["conversion_id"]).values(
            status=domain.REJECTED, reason=p["reason"], updated_at=stored.occurred_at))
    elif stored.event_type == "ConversionHeld":
        session.execute(update(v).where(v.c.id == p["conversion_id"]).values(
            status=domain.HELD, reason=p["reason"], updated_at=stored.occurred_at))
    elif stored.event_type == "ConversionRefunded":
        session.execute(update(v).where(v.c.id == p["conversion_id"]).values(
            status=domain.REFUNDED, reason=p["refund_type"], updated_at=stored.occurred_at))


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


@dataclass(frozen=True)
class ReplaySummary:
    events: int
    streams: int
    seconds: float


def rebuild_projections(db: Database, registry: SchemaRegistry, progress: Callable[[int, int], None] | None = None,
                        batch: int = 1000) -> ReplaySummary:
    """Delete every conversiones projection and rebuild it from the event store with `project`,
    the function the live path uses. `progress(done, total)` is called after each batch.

    One transaction for the whole rebuild: readers keep seeing the old projections until the
    new ones commit (never a half-built one), and a crash or error midway leaves the old ones
    intact. Batches would bound the transaction's size but expose empty, half-filled tables.
    """
    started = time.perf_counter()
    store = event_store(registry)
    events = streams = 0
    last_stream = None
    with db.transaction() as session:
        total = session.scalar(select(func.count()).select_from(tables.event_store))
        for table in tables.projection_tables:
            session.execute(table.delete())
        if progress:
            progress(0, total)
        for stored in store.all_events(session, batch=batch):
            project(session, stored)
            events += 1
            if stored.stream_id != last_stream:  # all_events comes ordered by stream
                streams, last_stream = streams + 1, stored.stream_id
            if progress and events % batch == 0:
                progress(events, total)
        if progress:
            progress(events, max(total, events))
    return ReplaySummary(events, streams, time.perf_counter() - started)


def _attributed_click_id(session: Session, conversion_id: str) -> str | None:
    """The click a conversion was attributed through (None: attributed by ids)."""
    a = tables.click_attributions
    return session.scalar(select(a.c.click_id).where(a.c.conversion_id == conversion_id))


def _commit_events(session: Session, store: EventStore, conversion: domain.Conversion,
                   events: list[domain.DomainEvent], correlation_id: str) -> list[OutgoingEvent]:
    """Append to the stream, update the projection, and return the integration events."""
    expected = conversion.version
    click_id = None
    if any(isinstance(event, domain.Validated) for event in events):
        click_id = _attributed_click_id(session, conversion.id)
    records = []
    for event in events:
        records.append(to_record(conversion, event, click_id))
        conversion.apply(event)
    stored = store.append(session, conversion.id, expected, records, correlation_id)
    outgoing = []
    for item in stored:
        project(session, item)
        outgoing.append(OutgoingEvent(TOPIC, item.event_type, item.stream_id, item.payload, event_id=item.event_id,
                                      occurred_at=item.occurred_at, correlation_id=correlation_id,
                                      causation_id=correlation_id))
    saga.record_events(session, stored)  # the saga's steps commit with the events that make them
    return outgoing


def reference(session: Session, affiliate_id: str, campaign_id: str,
              conversion_id: str | None = None, max_conversions_per_ip: int = 5) -> domain.Reference:
    affiliate = session.execute(select(tables.ref_afiliados.c.estado, tables.ref_afiliados.c.email_sha256)
                                .where(tables.ref_afiliados.c.afiliado_id == affiliate_id)).first()
    a = None if affiliate is None else affiliate.estado
    rc = tables.ref_campanas
    c = session.execute(select(rc.c.estado, rc.c.moneda, rc.c.ventana_atribucion_dias, rc.c.fecha_inicio,
                               rc.c.fecha_fin, rc.c.min_segundos_click_conversion)
                        .where(rc.c.campana_id == campaign_id)).first()
    click = None
    if conversion_id is not None:
        k, ca = tables.clicks, tables.click_attributions
        click = session.execute(select(k.c.clicked_at, k.c.link_code).join(ca, ca.c.click_id == k.c.id)
                                .where(ca.c.conversion_id == conversion_id)).first()
    signals = None if conversion_id is None else session.execute(
        select(tables.conversion_signals).where(tables.conversion_signals.c.conversion_id == conversion_id)).first()
    return domain.Reference(
        affiliate_enabled=None if a is None else a == AFILIADO_HABILITADO,
        campaign_active=None if c is None else c.estado == "activa",
        campaign_currency=None if c is None else c.moneda,
        affiliate_suspended=a == AFILIADO_SUSPENDIDO,
        affiliate_enrolled=_enrolled(session, affiliate_id, campaign_id, None if click is None else click.link_code),
        clicked_at=None if click is None else click.clicked_at,
        attribution_window=None if c is None else timedelta(days=c.ventana_atribucion_dias),
        campaign_starts_at=None if c is None else c.fecha_inicio,
        campaign_ends_at=None if c is None else c.fecha_fin,
        min_seconds_click_to_conversion=None if c is None else c.min_segundos_click_conversion,
        affiliate_email_sha256=None if affiliate is None else affiliate.email_sha256,
        customer_email_sha256=None if signals is None else signals.customer_email_sha256,
        conversions_from_same_ip=None if signals is None else _conversions_from_same_ip(session, signals),
        max_conversions_per_ip=max_conversions_per_ip)


def _conversions_from_same_ip(session: Session, signals) -> int | None:
    """Conversions for the campaign from the signal's IP in the hour up to it, itself included."""
    if signals.ip is None:
        return None
    t = tables.conversion_signals
    return session.scalar(select(func.count()).select_from(t).where(
        t.c.campaign_id == signals.campaign_id, t.c.ip == signals.ip,
        t.c.detected_at > signals.detected_at - domain.IP_VELOCITY_WINDOW, t.c.detected_at <= signals.detected_at))


def _enrolled(session: Session, affiliate_id: str, campaign_id: str, link_code: str | None) -> bool | None:
    """Through a click: its link's enrollment must be active. By ids: an active enrollment, but
    only for a campaign somebody enrolled in (None: not enforced, the original postback contract)."""
    i = tables.ref_inscripciones
    if link_code is not None:
        return bool(session.scalar(select(i.c.activa).where(i.c.link_code == link_code)))
    if not session.scalar(select(exists().where(i.c.campana_id == campaign_id))):
        return None
    return bool(session.scalar(select(exists().where(
        i.c.campana_id == campaign_id, i.c.afiliado_id == affiliate_id, i.c.activa.is_(True)))))


# -- tracking links and clicks ---------------------------------------------------------------
def record_click(session: Session, link_code: str, *, ip: str | None, user_agent: str | None,
                 referrer: str | None, now: datetime | None = None,
                 visitor_id: str | None = None) -> tuple[str, str, list[OutgoingEvent]]:
    """A visit to a tracking link: store the click, answer where to redirect (the campaign's
    landing URL with the click id) and ClickRecorded. Unknown or inactive links get a 404 and store nothing.
    `visitor_id` (the visitor's cookie) ties the visitor's clicks together for attribution."""
    i, c = tables.ref_inscripciones, tables.ref_campanas
    link = session.execute(select(i.c.afiliado_id, i.c.campana_id, i.c.activa, c.c.estado, c.c.landing_url)
                           .join(c, c.c.campana_id == i.c.campana_id, isouter=True)
                           .where(i.c.link_code == link_code)).first()
    if link is None:
        raise Problem(404, "link_code", "no tracking link with this code")
    if not link.activa:
        raise Problem(404, "link_code", "this tracking link is suspended")
    if link.estado != "activa":
        raise Problem(404, "link_code", "the link's campaign is not active")
    if not link.landing_url:
        raise Problem(404, "link_code", "campaign has no landing URL")
    click_id, clicked_at = new_id(), now or utcnow()
    user_agent = user_agent[:500] if user_agent else None
    referrer = referrer[:2000] if referrer else None
    session.execute(tables.clicks.insert().values(
        id=click_id, link_code=link_code, affiliate_id=link.afiliado_id, campaign_id=link.campana_id,
        clicked_at=clicked_at, ip=ip, user_agent=user_agent, referrer=referrer, visitor_id=visitor_id))
    # The IP stays in the clicks table (personal data): the event carries what analytics needs.
    event = OutgoingEvent(TOPIC, "ClickRecorded", click_id, {
        "click_id": click_id, "link_code": link_code, "affiliate_id": link.afiliado_id,
        "campaign_id": link.campana_id, "timestamp": clicked_at, "user_agent": user_agent, "referrer": referrer,
        "visitor_id": visitor_id})
    return click_id, domain.landing_with_click_id(link.landing_url, click_id), [event]


@dataclass(frozen=True)
class Attribution:
    affiliate_id: str
    campaign_id: str
    click_id: str  # the click that earns the conversion (may differ from the one the postback named)


def attribution_of(session: Session, click_id: str, affiliate_id: str | None, campaign_id: str | None,
                   converted_at: datetime) -> Attribution:
    """Whom a postback's click_id attributes it to. Ids given beside it must agree with that click.
    When the click carries a visitor id, the visitor's clicks on the same campaign within its window
    before the conversion compete under the campaign's model (last click by default, or first click);
    the winner's affiliate earns the conversion."""
    k = tables.clicks
    click = session.execute(select(k.c.id, k.c.affiliate_id, k.c.campaign_id, k.c.clicked_at, k.c.visitor_id)
                            .where(k.c.id == click_id)).first()
    if click is None:
        raise Problem(422, "click_id", "no click with this id")
    for field, given, clicked in (("affiliate_id", affiliate_id, click.affiliate_id),
                                  ("campaign_id", campaign_id, click.campaign_id)):
        if given is not None and given != clicked:
            raise Problem(422, field, f"differs from the {field} of the click")
    if click.visitor_id is None:
        return Attribution(click.affiliate_id, click.campaign_id, click.id)  # nothing ties it to other clicks
    rc = tables.ref_campanas
    campana = session.execute(select(rc.c.modelo_atribucion, rc.c.ventana_atribucion_dias)
                              .where(rc.c.campana_id == click.campaign_id)).first()
    if campana is None:  # the campaign is not known yet (the click is): its own click, judged at validation
        return Attribution(click.affiliate_id, click.campaign_id, click.id)
    window = timedelta(days=campana.ventana_atribucion_dias)
    rows = session.execute(select(k.c.id, k.c.affiliate_id, k.c.clicked_at).where(
        k.c.campaign_id == click.campaign_id, k.c.visitor_id == click.visitor_id,
        k.c.clicked_at >= converted_at - window, k.c.clicked_at <= converted_at)).all()
    chosen = domain.attributed_click(domain.Click(click.id, click.clicked_at),
                                     [domain.Click(r.id, r.clicked_at) for r in rows],
                                     campana.modelo_atribucion, converted_at, window)
    affiliate = {r.id: r.affiliate_id for r in rows}.get(chosen.click_id, click.affiliate_id)
    return Attribution(affiliate, click.campaign_id, chosen.click_id)


# -- commands --------------------------------------------------------------------------------
def record_conversion(session: Session, store: EventStore, *, affiliate_id: str, campaign_id: str, user_id: str,
                      conversion_value, conversion_type: str, currency: str, order_id: str | None,
                      grace: timedelta, click_id: str | None = None, now: datetime | None = None,
                      ip: str | None = None, customer_email: str | None = None,
                      max_conversions_per_ip: int = 5) -> tuple[str, bool, list[OutgoingEvent]]:
    """A postback. Returns (conversion id, created?, events). A known order id returns its conversion.
    `ip` and `customer_email` are fraud signals: kept beside the stream (the email only as its
    hash), never in events."""
    if order_id is not None:
        known = session.scalar(select(tables.order_keys.c.conversion_id).where(
            tables.order_keys.c.campaign_id == campaign_id, tables.order_keys.c.order_id == order_id))
        if known is not None:
            return known, False, []
    conversion_id = new_id()
    if order_id is not None:
        # The durable idempotency key; a concurrent twin fails here and the caller re-reads.
        session.execute(tables.order_keys.insert().values(
            campaign_id=campaign_id, order_id=order_id, conversion_id=conversion_id))
    if click_id is not None:
        session.execute(tables.click_attributions.insert().values(conversion_id=conversion_id, click_id=click_id))
    now = now or utcnow()
    if ip is not None or customer_email is not None:
        session.execute(tables.conversion_signals.insert().values(
            conversion_id=conversion_id, campaign_id=campaign_id, ip=ip, detected_at=now,
            customer_email_sha256=None if customer_email is None else domain.email_sha256(customer_email)))
    conversion = domain.Conversion()
    detected = domain.Detected(conversion_id, affiliate_id, campaign_id, user_id, conversion_value, conversion_type,
                               order_id, currency, now)
    correlation_id = conversion_id
    events = _commit_events(session, store, conversion, [detected], correlation_id)
    decision = domain.decide_validation(
        conversion, reference(session, affiliate_id, campaign_id, conversion_id, max_conversions_per_ip), now, grace)
    if not decision.pending:
        events += _commit_events(session, store, conversion, decision.events, correlation_id)
    return conversion_id, True, events


def validate_pending(db: Database, store: EventStore, outbox: Outbox, grace: timedelta, batch: int = 200,
                     now: datetime | None = None, max_conversions_per_ip: int = 5) -> int:
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
                                      conversion_id, max_conversions_per_ip), now or utcnow(), grace)
            if decision.pending:
                continue
            outbox.add(session, _commit_events(session, store, conversion, decision.events, conversion_id))
            decided += 1
    return decided


# -- conversiones-consumer on marketing.eventos ---------------------------------------------
def learn_campana(session: Session, event: IncomingEvent) -> list[OutgoingEvent]:
    p = event.payload
    t = tables.ref_campanas
    if not session.scalar(select(exists().where(t.c.campana_id == p["id"]))):
        # v1 events carry no state: they were created active (the v2 reader default).
        session.execute(t.insert().values(campana_id=p["id"], estado=p["estado"], moneda=p["moneda"],
                                          landing_url=p["landing_url"],
                                          ventana_atribucion_dias=p["ventana_atribucion_dias"],
                                          fecha_inicio=p["fecha_inicio"], fecha_fin=p["fecha_fin"],
                                          # Not announced yet by marketing (a CampanaCreada v3 term): None.
                                          min_segundos_click_conversion=p.get("min_segundos_click_conversion"),
                                          # v1-v3 read the v4 default: last click.
                                          modelo_atribucion=p.get("modelo_atribucion") or domain.LAST_CLICK,
                                          updated_at=utcnow()))
    return []


def learn_inscripcion(session: Session, event: IncomingEvent) -> list[OutgoingEvent]:
    """AfiliadoInscrito: its link code now redirects and attributes to the affiliate and campaign."""
    p = event.payload
    i = tables.ref_inscripciones
    if not session.scalar(select(exists().where(i.c.link_code == p["link_code"]))):
        session.execute(i.insert().values(link_code=p["link_code"], inscripcion_id=p["inscripcion_id"],
                                          afiliado_id=p["afiliado_id"], campana_id=p["campana_id"], activa=True,
                                          updated_at=utcnow()))
    return []


def learn_inscripcion_estado(session: Session, event: IncomingEvent) -> list[OutgoingEvent]:
    """InscripcionSuspendida / InscripcionReactivada: a suspended link neither redirects nor attributes."""
    i = tables.ref_inscripciones
    session.execute(update(i).where(i.c.inscripcion_id == event.payload["inscripcion_id"]).values(
        activa=event.event_type == "InscripcionReactivada", updated_at=utcnow()))
    return []


_CAMPAIGN_STATE = {"CampanaActivada": "activa", "CampanaPausada": "pausada", "CampanaFinalizada": "finalizada"}


def learn_campana_estado(session: Session, event: IncomingEvent) -> list[OutgoingEvent]:
    """Activated, paused or ended: only an active campaign validates conversions."""
    t = tables.ref_campanas
    session.execute(update(t).where(t.c.campana_id == event.payload["id"]).values(
        estado=_CAMPAIGN_STATE[event.event_type], updated_at=utcnow()))
    return []


# What conversiones knows of an affiliate (ref_afiliados.estado), as marketing announced it.
AFILIADO_HABILITADO = "habilitado"
AFILIADO_SUSPENDIDO = "suspendido"


def learn_afiliado(session: Session, event: IncomingEvent) -> list[OutgoingEvent]:
    """AfiliadoHabilitado: enabled for the first time, or again after a suspension. v2 carries the
    hash of the affiliate's email (self-referral check); v1 and a null hash keep what was known."""
    _learn_estado_afiliado(session, event.payload["afiliado_id"], AFILIADO_HABILITADO)
    if event.payload.get("email_sha256") is not None:
        t = tables.ref_afiliados
        session.execute(update(t).where(t.c.afiliado_id == event.payload["afiliado_id"]).values(
            email_sha256=event.payload["email_sha256"]))
    return []


def learn_afiliado_inhabilitado(session: Session, event: IncomingEvent) -> list[OutgoingEvent]:
    """AfiliadoInhabilitado: its new conversions are rejected until it is enabled again."""
    _learn_estado_afiliado(session, event.payload["afiliado_id"], AFILIADO_SUSPENDIDO)
    return []


def _learn_estado_afiliado(session: Session, afiliado_id: str, estado: str) -> None:
    t = tables.ref_afiliados
    if session.scalar(select(exists().where(t.c.afiliado_id == afiliado_id))):
        session.execute(update(t).where(t.c.afiliado_id == afiliado_id).values(estado=estado, updated_at=utcnow()))
    else:
        session.execute(t.insert().values(afiliado_id=afiliado_id, estado=estado, updated_at=utcnow()))


def load_conversion(session: Session, store: EventStore, conversion_id: str) -> domain.Conversion:
    """The aggregate rebuilt from its stream; 404 when there is no such stream."""
    stored = store.load(session, conversion_id)
    if not stored:
        raise Problem(404, "conversion_id", "no conversion with this id")
    return domain.Conversion.rebuild([from_record(e) for e in stored])


def refund_conversion(session: Session, store: EventStore, conversion_id: str, refund_type: str,
                      reason: str | None, now: datetime | None = None) -> list[OutgoingEvent]:
    """Append ConversionRefunded to a validated conversion's stream (marketing reverses its
    commission on it). 404 for an unknown conversion, 409 on `status` when it was not validated;
    a repeated refund returns no event."""
    conversion = load_conversion(session, store, conversion_id)
    try:
        events = domain.decide_refund(conversion, refund_type, reason, now or utcnow())
    except domain.NotRefundable as refusal:
        raise Problem(409, "status", str(refusal)) from None
    if not events:
        return []
    return _commit_events(session, store, conversion, events, conversion_id)


def review_conversion(session: Session, store: EventStore, conversion_id: str, approve: bool,
                      motivo: str | None = None, now: datetime | None = None) -> list[OutgoingEvent]:
    """A reviewer approves (ConversionValidated: marketing computes the commission) or rejects
    (ConversionRejected `rejected_in_review:<motivo>`) a held conversion. 404 unknown, 409 on
    `status` unless on hold."""
    conversion = load_conversion(session, store, conversion_id)
    try:
        events = domain.decide_review(conversion, approve, motivo, now or utcnow())
    except domain.NotInReview as refusal:
        raise Problem(409, "status", str(refusal)) from None
    return _commit_events(session, store, conversion, events, conversion_id)


# -- the conversion → commission saga (see saga.py): marketing's answers and the timeouts -------
def commission_request(session: Session, conversion: domain.Conversion, attempt: int,
                       now: datetime) -> OutgoingEvent:
    """CommissionRequested: the saga asks marketing again, with what ConversionValidated said (its
    validation time stays the `timestamp`, so the rules in force then still apply)."""
    d = conversion.detected
    assert d is not None and conversion.validated_at is not None
    click_id = _attributed_click_id(session, conversion.id)
    return OutgoingEvent(TOPIC, "CommissionRequested", conversion.id, {
        "conversion_id": d.conversion_id, "affiliate_id": d.affiliate_id, "campaign_id": d.campaign_id,
        "conversion_value": d.conversion_value, "currency": d.currency, "conversion_type": d.conversion_type,
        "timestamp": conversion.validated_at, "attempt": attempt, "requested_at": now, "converted_at": d.timestamp,
        "click_id": click_id}, occurred_at=now, correlation_id=conversion.id, causation_id=conversion.id)


def compensate(session: Session, store: EventStore, conversion: domain.Conversion, reason: str,
               now: datetime) -> list[OutgoingEvent]:
    """Reject a validated conversion whose commission could not be booked: an explicit
    ConversionRejected (compensation=true) in its stream; marketing reverses any commission it
    booked late and never books one afterwards."""
    return _commit_events(session, store, conversion, domain.decide_compensation(conversion, reason, now),
                          conversion.id)


def note_commission_booked(session: Session, event: IncomingEvent) -> list[OutgoingEvent]:
    """ComisionRegistrada: the saga completes. An answer to a retry, or a commission booked
    after the saga compensated (marketing reverses it on the compensating rejection), is logged."""
    p, now = event.payload, utcnow()
    row = saga.load(session, p["conversion_id"], lock=True)
    if row is None:
        return []
    detalle = f"ComisionRegistrada {p['comision_id']}: {p['monto']} {p['moneda']}" + (
        f", limitado_por {p['limitado_por']}" if p.get("limitado_por") else "")
    if saga.finish(session, row["saga_id"], saga.COMMISSION, saga.DONE, now, detalle):
        if row["estado"] == saga.RUNNING:
            saga.stop_waiting(session, row["saga_id"], now, saga.COMPLETED, "commission_booked")
        return []
    if row["estado"] == saga.COMPENSATED and not saga.has_step(session, row["saga_id"], saga.COMMISSION, saga.DONE):
        saga.note(session, row["saga_id"], saga.COMMISSION, saga.DONE, now, f"booked late: {detalle}")
    return []  # a repeated answer (to a retry, or a redelivery): already logged


def note_commission_denied(store: EventStore):
    """ComisionDenegada: the validation is compensated by rejecting the conversion (in this inbox
    transaction). Refunded before a commission was booked: nothing to compensate, the saga completes."""
    def handler(session: Session, event: IncomingEvent) -> list[OutgoingEvent]:
        p, now = event.payload, utcnow()
        row = saga.load(session, p["conversion_id"], lock=True)
        if row is None or row["estado"] in saga.TERMINAL_STATES:
            return []  # already decided: a repeated answer
        saga.finish(session, row["saga_id"], saga.COMMISSION, saga.FAILED, now, f"ComisionDenegada {p['razon']}")
        conversion = load_conversion(session, store, row["saga_id"])
        if conversion.status == domain.VALIDATED:
            return compensate(session, store, conversion, saga.compensation_reason(p["razon"]), now)
        saga.finish(session, row["saga_id"], saga.COMMISSION_REVERSAL, saga.DONE, now,
                    "nothing to reverse: no commission was booked")
        saga.stop_waiting(session, row["saga_id"], now, saga.COMPLETED, f"no_commission:{p['razon']}")
        return []
    return handler


def note_commission_reversed(session: Session, event: IncomingEvent) -> list[OutgoingEvent]:
    """ReversionComisionRegistrada: marketing reversed the commission (refund or compensation)."""
    p, now = event.payload, utcnow()
    row = saga.load(session, p["conversion_id"], lock=True)
    if row is None:
        return []
    detalle = (f"ComisionRevertida {p['comision_id']}: {p['monto']} {p['moneda']} was {p['estado_anterior']} "
               f"({p['motivo']})")
    if p.get("ajuste_monto") is not None:
        detalle += f"; adjustment {p['ajuste_monto']} withheld from the next payout"
    if not saga.finish(session, row["saga_id"], saga.COMMISSION_REVERSAL, saga.DONE, now, detalle):
        saga.note(session, row["saga_id"], saga.COMMISSION_REVERSAL, saga.DONE, now, detalle)
    return []


def expire_sagas(db: Database, store: EventStore, outbox: Outbox, policy: saga.SagaPolicy,
                 now: datetime | None = None, batch: int = 100) -> int:
    """The saga's timer: a saga waiting on marketing longer than the policy's timeout asks again
    (CommissionRequested), and after the last attempt compensates. Measured on the real clock."""
    now = now or utcnow()
    s = tables.sagas
    acted = 0
    with db.transaction() as session:
        rows = session.execute(select(s).where(s.c.estado == saga.RUNNING, s.c.esperando_desde.is_not(None),
                                               s.c.esperando_desde <= now - policy.timeout)
                               .order_by(s.c.esperando_desde).limit(batch).with_for_update(skip_locked=True)
                               ).mappings().all()
        for row in rows:
            conversion = load_conversion(session, store, row["saga_id"])
            if saga.on_timeout(row["intentos"], policy) == saga.RETRY:
                # Refunded meanwhile too: the answer still tells whether a commission was booked.
                attempt = row["intentos"] + 1
                saga.record_retry(session, row["saga_id"], attempt, policy, now)
                outbox.add(session, [commission_request(session, conversion, attempt, now)])
            elif conversion.status != domain.VALIDATED:
                # Refunded: nothing to compensate; marketing reverses or never books it on its own.
                saga.finish(session, row["saga_id"], saga.COMMISSION, saga.FAILED, now,
                            f"no answer after {row['intentos']} attempts; the conversion is {conversion.status}")
                saga.stop_waiting(session, row["saga_id"], now, saga.COMPLETED, f"unconfirmed:{conversion.status}")
            else:
                saga.finish(session, row["saga_id"], saga.COMMISSION, saga.FAILED, now,
                            f"no answer after {row['intentos']} attempts")
                outbox.add(session, compensate(session, store, conversion, domain.COMMISSION_NOT_CONFIRMED, now))
            acted += 1
    return acted
