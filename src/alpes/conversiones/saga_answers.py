"""What moves the conversion → commission saga (saga.py) after validation: marketing's answers
(ComisionRegistrada, ComisionDenegada, ReversionComisionRegistrada) and the saga's timer, which
asks again (CommissionRequested) and, after the planned retries, marks the saga stuck (one
SagaAtascada alert on sistema.eventos) and keeps asking with a capped backoff. Only marketing's
refusal compensates; its silence never does."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from alpes.kernel.db import Database
from alpes.kernel.eventstore import EventStore
from alpes.kernel.messages import IncomingEvent, OutgoingEvent, utcnow
from alpes.kernel.outbox import Outbox
from alpes.kernel.runtime import SYSTEM_TOPIC

from . import domain, saga, tables
from .records import TOPIC
from .stream import commit_events, load_conversion
from .tracking import attributed_click_id


def commission_request(session: Session, conversion: domain.Conversion, attempt: int,
                       now: datetime) -> OutgoingEvent:
    """CommissionRequested: the saga asks marketing again, with what ConversionValidated said (its
    validation time stays the `timestamp`, so the rules in force then still apply)."""
    d = conversion.detected
    assert d is not None and conversion.validated_at is not None
    click_id = attributed_click_id(session, conversion.id)
    return OutgoingEvent(TOPIC, "CommissionRequested", conversion.id, {
        "conversion_id": d.conversion_id, "affiliate_id": d.affiliate_id, "campaign_id": d.campaign_id,
        "conversion_value": d.conversion_value, "currency": d.currency, "conversion_type": d.conversion_type,
        "timestamp": conversion.validated_at, "attempt": attempt, "requested_at": now, "converted_at": d.timestamp,
        "click_id": click_id}, occurred_at=now, correlation_id=conversion.id, causation_id=conversion.id)


def stuck_alert(saga_id: str, attempts: int, motivo: str, now: datetime) -> OutgoingEvent:
    """SagaAtascada on sistema.eventos (auditoria's alerting-consumer lists it in /sistema/alertas)."""
    return OutgoingEvent(SYSTEM_TOPIC, "SagaAtascada", saga_id, {
        "servicio": "conversiones", "saga_id": saga_id, "paso": saga.COMMISSION, "intentos": attempts,
        "motivo": motivo, "timestamp": now}, occurred_at=now, correlation_id=saga_id, causation_id=saga_id)


def compensate(session: Session, store: EventStore, conversion: domain.Conversion, reason: str,
               now: datetime) -> list[OutgoingEvent]:
    """Reject a validated conversion whose commission could not be booked: an explicit
    ConversionRejected (compensation=true) in its stream; marketing reverses any commission it
    booked late and never books one afterwards."""
    return commit_events(session, store, conversion, domain.decide_compensation(conversion, reason, now),
                         conversion.id)


# -- marketing's answers (conversiones-consumer on marketing.eventos) ---------------------------
def note_commission_booked(session: Session, event: IncomingEvent) -> list[OutgoingEvent]:
    """ComisionRegistrada: the saga completes. An answer to a retry, or a commission booked
    after the saga compensated (marketing reverses it on the compensating rejection), is logged.
    In a consumer batch (`answers_batch`) it waits for the batch's end, where the batch's answers
    are noted together."""
    p = event.payload
    detalle = f"ComisionRegistrada {p['comision_id']}: {p['monto']} {p['moneda']}" + (
        f", limitado_por {p['limitado_por']}" if p.get("limitado_por") else "")
    waiting = session.info.get(_BOOKED_KEY)
    if waiting is None:
        _note_booked(session, p["conversion_id"], detalle, utcnow())
        return []
    if p["conversion_id"] in waiting:  # a second answer for it in this batch: the first is noted first
        note_waiting_answers(session)
        waiting = session.info[_BOOKED_KEY]
    waiting[p["conversion_id"]] = detalle
    return []


def _note_booked(session: Session, saga_id: str, detalle: str, now: datetime) -> None:
    row = saga.load(session, saga_id, lock=True)
    if row is None:
        return
    if saga.finish(session, row["saga_id"], saga.COMMISSION, saga.DONE, now, detalle):
        if row["estado"] in saga.WAITING_STATES:  # a stuck saga too: the answer was late, not missing
            saga.stop_waiting(session, row["saga_id"], now, saga.COMPLETED, "commission_booked",
                              stuck=row["estado"] == saga.STUCK)
        return
    if row["estado"] == saga.COMPENSATED and not saga.has_step(session, row["saga_id"], saga.COMMISSION, saga.DONE):
        saga.note(session, row["saga_id"], saga.COMMISSION, saga.DONE, now, f"booked late: {detalle}")
    # else a repeated answer (to a retry, or a redelivery): already logged


# Session.info: the batch's booked answers not noted yet (conversion id -> detalle, in arrival order).
_BOOKED_KEY = "conversiones.booked_answers"


@contextmanager
def answers_batch(session: Session) -> Iterator[None]:
    """The conversiones-consumer's batch scope (kernel.inbox.Handlers). Under load most of a batch
    is ComisionRegistrada for running sagas: four statements each, one at a time, inside the write
    turn every postback waits for (issue 11: 18 ms per batch of ~40 at 360 postbacks/s). Here they
    are noted at the batch's end in four statements for all: the sagas read and locked, their
    waiting commission steps found, finished, and the sagas completed. Any other answer (no saga,
    a stuck or ended one, a running one with no waiting step) is then noted as one alone would be.
    A second answer for a saga in the batch, and the subscription's other saga handlers (a denial,
    a reversal), note the waiting answers first, so a saga's answers keep their order."""
    session.info[_BOOKED_KEY] = {}
    try:
        yield None
        note_waiting_answers(session)
    finally:
        session.info.pop(_BOOKED_KEY, None)


def note_waiting_answers(session: Session) -> None:
    """Note the batch's booked answers waiting so far (nothing outside a batch scope)."""
    waiting = session.info.get(_BOOKED_KEY)
    if not waiting:
        return
    session.info[_BOOKED_KEY] = {}
    now = utcnow()
    states = saga.states_of(session, list(waiting))
    steps = saga.latest_waiting(session, [i for i, estado in states.items() if estado == saga.RUNNING],
                                saga.COMMISSION)
    usual = [saga_id for saga_id in waiting if saga_id in steps]
    if usual:
        saga.finish_steps(session, [(steps[saga_id], waiting[saga_id]) for saga_id in usual], saga.DONE, now)
        saga.end_waiting(session, usual, now, saga.COMPLETED, "commission_booked")
    for saga_id, detalle in waiting.items():
        if saga_id in states and saga_id not in steps:
            _note_booked(session, saga_id, detalle, now)


def noting_waiting_answers_first(handler):
    """`handler`, once the batch's booked answers waiting so far are noted (their sagas' order)."""
    def handle(session: Session, event: IncomingEvent, *args):
        note_waiting_answers(session)
        return handler(session, event, *args)
    return handle


def note_commission_denied(session: Session, event: IncomingEvent, store: EventStore) -> list[OutgoingEvent]:
    """ComisionDenegada: the validation is compensated by rejecting the conversion (in this inbox
    transaction). Refunded before a commission was booked: nothing to compensate, the saga completes."""
    p, now = event.payload, utcnow()
    row = saga.load(session, p["conversion_id"], lock=True)
    if row is None or row["estado"] in saga.TERMINAL_STATES:
        return []  # already decided: a repeated answer
    saga.finish(session, row["saga_id"], saga.COMMISSION, saga.FAILED, now, f"ComisionDenegada {p['razon']}")
    saga.finish(session, row["saga_id"], saga.COMMISSION_STUCK, saga.DONE, now, "an answer came: ComisionDenegada")
    conversion = load_conversion(session, store, row["saga_id"])
    if conversion.status == domain.VALIDATED:
        return compensate(session, store, conversion, saga.compensation_reason(p["razon"]), now)
    saga.finish(session, row["saga_id"], saga.COMMISSION_REVERSAL, saga.DONE, now,
                "nothing to reverse: no commission was booked")
    saga.stop_waiting(session, row["saga_id"], now, saga.COMPLETED, f"no_commission:{p['razon']}",
                      stuck=False)  # its stuck step, if any, was closed above
    return []


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


# -- the saga's timer --------------------------------------------------------------------------
def expire_sagas(db: Database, store: EventStore, outbox: Outbox, policy: saga.SagaPolicy,
                 now: datetime | None = None, batch: int = 100) -> int:
    """A saga whose request went unanswered past its wait asks again (CommissionRequested). After
    the planned retries it becomes stuck, once, with a SagaAtascada alert, and keeps asking with a
    capped backoff: a late answer completes it (or compensates it, when marketing refuses), however
    late. Refunded meanwhile too: the answer still tells whether a commission was booked. Timed on
    the real clock."""
    now = now or utcnow()
    s = tables.sagas
    acted = 0
    with db.transaction() as session:
        # Every wait is at least the timeout, so esperando_desde bounds the scan (and its index serves
        # it); reintentar_en is the wait itself (None on sagas logged before it: the plain timeout).
        rows = session.execute(select(s).where(
            s.c.estado.in_(saga.WAITING_STATES), s.c.esperando_desde.is_not(None),
            s.c.esperando_desde <= now - policy.timeout, or_(s.c.reintentar_en.is_(None), s.c.reintentar_en <= now))
            .order_by(s.c.esperando_desde).limit(batch).with_for_update(skip_locked=True)).mappings().all()
        for row in rows:
            conversion = load_conversion(session, store, row["saga_id"])
            if saga.on_timeout(row["intentos"], policy) == saga.BECOME_STUCK and row["estado"] != saga.STUCK:
                motivo = saga.record_stuck(session, row["saga_id"], row["intentos"], policy, now)
                outbox.add(session, [stuck_alert(row["saga_id"], row["intentos"], motivo, now)])
            attempt = row["intentos"] + 1
            saga.record_retry(session, row["saga_id"], attempt, policy, now)
            outbox.add(session, [commission_request(session, conversion, attempt, now)])
            acted += 1
    return acted
