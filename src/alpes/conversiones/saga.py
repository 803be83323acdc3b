"""The conversion → commission saga, orchestrated by conversiones (it owns the conversion).

One saga per conversion; its id is the conversion id, which is also the correlation id every
event of the flow carries (postback → ConversionDetected → ConversionValidated → marketing's
answer → ComisionCalculada …). The saga log (`sagas`, `saga_pasos`) records each step with its
status and timestamps, written in the same transaction as the event-store append or the inbox
record that causes it (`record_events` is called by the append; the answer handlers by the
consumer). It is not a projection: it also records what is not in the event store (marketing's
answers, retries after timeouts), so `alpes replay conversiones` leaves it as it is.

Steps: detection → validation (done; failed = rejected; waiting while held for review) →
commission (waiting on marketing's answer to ConversionValidated; retried with CommissionRequested
after each timeout; done = ComisionRegistrada; failed = ComisionDenegada or no answer after the
last retry) → compensation (the conversion rejected by an explicit ConversionRejected with
compensation=true) → later facts: refund → commission_reversal (ReversionComisionRegistrada).

Saga states: running (waiting on validation or on marketing), and two terminal ones:
completed (the commission was booked, possibly partial or zero by a cap; or the conversion was
rejected before any commission was due; or it was refunded before one was booked) and
compensated (the validation was undone by a compensating rejection). A refund after completion
adds steps; the saga stays completed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from alpes.kernel.eventstore import StoredEvent
from alpes.kernel.messages import utcnow

from . import domain, tables

RUNNING = "running"
COMPLETED = "completed"
COMPENSATED = "compensated"
TERMINAL_STATES = (COMPLETED, COMPENSATED)

DETECTION = "detection"
VALIDATION = "validation"
COMMISSION = "commission"
COMMISSION_RETRY = "commission_retry"
COMPENSATION = "compensation"
REFUND = "refund"
COMMISSION_REVERSAL = "commission_reversal"

WAITING = "waiting"
DONE = "done"
FAILED = "failed"

# Marketing's reason to deny a commission (ComisionDenegada.razon) that has a compensation
# reason of its own; the others are carried as commission_denied:<razon>.
DENIED_AFFILIATE_SUSPENDED = "afiliado_suspendido_durante_proceso"


@dataclass(frozen=True)
class SagaPolicy:
    """How long conversiones waits for marketing's answer, and how often it asks again before it
    compensates. Long enough by default that a service stopped for a while (its messages wait in
    the broker) is not mistaken for a refusal: 120 s × (1 + 3 retries) = 8 minutes."""

    timeout: timedelta = timedelta(seconds=120)
    max_retries: int = 3

    @property
    def max_attempts(self) -> int:
        return 1 + self.max_retries  # ConversionValidated is the first request


RETRY = "retry"
COMPENSATE = "compensate"


def on_timeout(attempts: int, policy: SagaPolicy) -> str:
    """After `attempts` unanswered requests: ask again, or give up and compensate."""
    return RETRY if attempts < policy.max_attempts else COMPENSATE


def compensation_reason(razon: str) -> str:
    """The reason the compensating ConversionRejected carries for marketing's denial."""
    if razon == DENIED_AFFILIATE_SUSPENDED:
        return domain.AFFILIATE_SUSPENDED_DURING_PROCESSING
    return f"{domain.COMMISSION_DENIED}:{razon}"[:80]


# -- the log ----------------------------------------------------------------------------------
def load(session: Session, saga_id: str, lock: bool = False):
    query = select(tables.sagas).where(tables.sagas.c.saga_id == saga_id)
    if lock:
        query = query.with_for_update()
    return session.execute(query).mappings().first()


def _set(session: Session, saga_id: str, now: datetime, **values) -> None:
    session.execute(update(tables.sagas).where(tables.sagas.c.saga_id == saga_id).values(updated_at=now, **values))


def _open(session: Session, saga_id: str, paso: str, now: datetime, detalle: str | None = None) -> None:
    session.execute(tables.saga_pasos.insert().values(saga_id=saga_id, paso=paso, estado=WAITING, started_at=now,
                                                      detalle=_cut(detalle)))


def _note(session: Session, saga_id: str, paso: str, estado: str, now: datetime, detalle: str | None = None) -> None:
    """A step that started and finished at once."""
    session.execute(tables.saga_pasos.insert().values(saga_id=saga_id, paso=paso, estado=estado, started_at=now,
                                                      finished_at=now, detalle=_cut(detalle)))


def finish(session: Session, saga_id: str, paso: str, estado: str, now: datetime, detalle: str | None = None) -> bool:
    """Finish the step's latest waiting row; False when none waits (nothing changed)."""
    s = tables.saga_pasos
    row_id = session.scalar(select(func.max(s.c.id)).where(s.c.saga_id == saga_id, s.c.paso == paso,
                                                           s.c.estado == WAITING))
    if row_id is None:
        return False
    values = {"estado": estado, "finished_at": now}
    if detalle is not None:
        values["detalle"] = _cut(detalle)
    session.execute(update(s).where(s.c.id == row_id).values(**values))
    return True


def has_step(session: Session, saga_id: str, paso: str, estado: str) -> bool:
    s = tables.saga_pasos
    return session.scalar(select(func.count()).select_from(s).where(
        s.c.saga_id == saga_id, s.c.paso == paso, s.c.estado == estado)) > 0


def _cut(detalle: str | None) -> str | None:
    return None if detalle is None else detalle[:500]


def record_events(session: Session, stored: Sequence[StoredEvent], now: datetime | None = None) -> None:
    """The steps the conversion's own events make, in the append's transaction. A conversion
    recorded before the saga log existed has no saga: its later events are not logged."""
    now = now or utcnow()
    for event in stored:
        saga_id, p = event.stream_id, event.payload
        if event.event_type == "ConversionDetected":
            session.execute(tables.sagas.insert().values(
                saga_id=saga_id, estado=RUNNING, paso_actual=VALIDATION, intentos=0, esperando_desde=None,
                resultado=None, created_at=now, updated_at=now))
            _note(session, saga_id, DETECTION, DONE, now, f"ConversionDetected {p['conversion_value']} {p['currency']}")
            _open(session, saga_id, VALIDATION, now)
            continue
        saga = load(session, saga_id, lock=True)
        if saga is None:
            continue
        if event.event_type == "ConversionHeld":
            s = tables.saga_pasos
            session.execute(update(s).where(s.c.saga_id == saga_id, s.c.paso == VALIDATION, s.c.estado == WAITING)
                            .values(detalle=f"on hold for review: {p['reason']}"))
            _set(session, saga_id, now, paso_actual=VALIDATION)
        elif event.event_type == "ConversionValidated":
            finish(session, saga_id, VALIDATION, DONE, now, "ConversionValidated")
            _open(session, saga_id, COMMISSION, now, "attempt 1: ConversionValidated, waiting for marketing")
            _set(session, saga_id, now, paso_actual=COMMISSION, intentos=1, esperando_desde=now)
        elif event.event_type == "ConversionRejected" and p.get("compensation"):
            finish(session, saga_id, COMMISSION, FAILED, now)  # still waiting when a timeout compensates
            _note(session, saga_id, COMPENSATION, DONE, now, f"ConversionRejected {p['reason']}")
            _set(session, saga_id, now, estado=COMPENSATED, paso_actual=COMPENSATION, esperando_desde=None,
                 resultado=p["reason"])
        elif event.event_type == "ConversionRejected":
            finish(session, saga_id, VALIDATION, FAILED, now, f"ConversionRejected {p['reason']}")
            _set(session, saga_id, now, estado=COMPLETED, paso_actual=VALIDATION, esperando_desde=None,
                 resultado=f"rejected:{p['reason']}")
        elif event.event_type == "ConversionRefunded":
            _note(session, saga_id, REFUND, DONE, now,
                  f"ConversionRefunded {p['refund_type']}" + (f": {p['reason']}" if p.get("reason") else ""))
            _open(session, saga_id, COMMISSION_REVERSAL, now, "waiting for marketing to reverse the commission")
            _set(session, saga_id, now, paso_actual=COMMISSION_REVERSAL)


def record_retry(session: Session, saga_id: str, attempt: int, policy: SagaPolicy, now: datetime) -> None:
    _note(session, saga_id, COMMISSION_RETRY, DONE, now,
          f"attempt {attempt} of {policy.max_attempts}: no answer in {policy.timeout.total_seconds():g} s, "
          "CommissionRequested sent")
    _set(session, saga_id, now, intentos=attempt, esperando_desde=now)


def stop_waiting(session: Session, saga_id: str, now: datetime, estado: str | None = None,
                 resultado: str | None = None) -> None:
    values = {"esperando_desde": None}
    if estado is not None:
        values.update(estado=estado, resultado=resultado)
    _set(session, saga_id, now, **values)


def note(session: Session, saga_id: str, paso: str, estado: str, now: datetime, detalle: str | None = None) -> None:
    """A step that started and finished at once, which becomes the saga's current step."""
    _note(session, saga_id, paso, estado, now, detalle)
    _set(session, saga_id, now, paso_actual=paso)


def view(session: Session, saga_id: str, policy: SagaPolicy) -> dict | None:
    """GET /sagas/{id}: the saga with each step, oldest first."""
    saga = load(session, saga_id)
    if saga is None:
        return None
    s = tables.saga_pasos
    pasos = session.execute(select(s).where(s.c.saga_id == saga_id).order_by(s.c.id)).mappings().all()
    return {**summary(saga, policy), "pasos": [{
        "paso": r["paso"], "estado": r["estado"], "started_at": _iso(r["started_at"]),
        "finished_at": _iso(r["finished_at"]), "detalle": r["detalle"]} for r in pasos]}


def summary(saga, policy: SagaPolicy) -> dict:
    waiting_since = saga["esperando_desde"]
    return {"saga_id": saga["saga_id"], "correlation_id": saga["saga_id"], "conversion_id": saga["saga_id"],
            "estado": saga["estado"], "terminal": saga["estado"] in TERMINAL_STATES,
            "paso_actual": saga["paso_actual"], "intentos": saga["intentos"], "max_intentos": policy.max_attempts,
            "esperando_desde": _iso(waiting_since),
            "deadline": _iso(None if waiting_since is None else waiting_since + policy.timeout),
            "resultado": saga["resultado"], "created_at": _iso(saga["created_at"]),
            "updated_at": _iso(saga["updated_at"])}


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()
