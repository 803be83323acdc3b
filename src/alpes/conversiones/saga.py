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
after each timeout; done = ComisionRegistrada; failed = ComisionDenegada) → commission_stuck
(waiting while no answer came after the last retry; done when one finally comes) → compensation
(the conversion rejected by an explicit ConversionRejected with compensation=true) → later facts:
refund → commission_reversal (ReversionComisionRegistrada).

Saga states: running (waiting on validation or on marketing), stuck (no answer after every retry:
an infrastructure delay, never a refusal; it keeps asking with a capped backoff and raises one
SagaAtascada alert on sistema.eventos), and two terminal ones: completed (the commission was booked,
possibly partial or zero by a cap; or the conversion was rejected before any commission was due; or
it was refunded before one was booked) and compensated (the validation was undone by a compensating
rejection: only for marketing's refusal, ComisionDenegada). A refund after completion adds steps;
the saga stays completed.
"""

from __future__ import annotations

import functools

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import bindparam, func, select, update
from sqlalchemy.orm import Session

from alpes.kernel.db import bulk_insert, stop_deferring
from alpes.kernel.eventstore import StoredEvent
from alpes.kernel.messages import utcnow

from . import domain, tables

RUNNING = "running"
STUCK = "stuck"  # not terminal: still waiting on marketing, past every timeout
WAITING_STATES = (RUNNING, STUCK)
COMPLETED = "completed"
COMPENSATED = "compensated"
TERMINAL_STATES = (COMPLETED, COMPENSATED)

DETECTION = "detection"
VALIDATION = "validation"
COMMISSION = "commission"
COMMISSION_RETRY = "commission_retry"
COMMISSION_STUCK = "commission_stuck"
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
    """How long conversiones waits for marketing's answer, how often it asks again before it calls
    the saga stuck, and the longest wait between requests once stuck. Silence is never a refusal:
    a stuck saga keeps asking until an answer comes (default: 120 s × (1 + 3 retries) = 8 minutes
    before it is stuck, then 4, 8, 10, 10 … minutes between requests)."""

    timeout: timedelta = timedelta(seconds=120)
    max_retries: int = 3
    max_backoff: timedelta = timedelta(seconds=600)

    @property
    def max_attempts(self) -> int:
        return 1 + self.max_retries  # ConversionValidated is the first request


RETRY = "retry"
BECOME_STUCK = "stuck"


def on_timeout(attempts: int, policy: SagaPolicy) -> str:
    """After `attempts` unanswered requests: ask again; after the last planned one, ask again and
    be stuck (the caller raises the alert when the saga was not stuck yet)."""
    return RETRY if attempts < policy.max_attempts else BECOME_STUCK


def wait_after(attempt: int, policy: SagaPolicy) -> timedelta:
    """How long the saga waits for an answer to its `attempt`-th request: the timeout for the planned
    ones; stuck, twice as long after each further request, never more than `max_backoff` (nor less
    than the timeout)."""
    beyond = attempt - policy.max_attempts
    if beyond <= 0:
        return policy.timeout
    timeout = policy.timeout.total_seconds()
    doubled = timeout * 2.0 ** min(beyond, 64)  # in float seconds: no timedelta overflow
    return timedelta(seconds=max(timeout, min(doubled, policy.max_backoff.total_seconds())))


def compensation_reason(razon: str) -> str:
    """The reason the compensating ConversionRejected carries for marketing's denial."""
    if razon == DENIED_AFFILIATE_SUSPENDED:
        return domain.AFFILIATE_SUSPENDED_DURING_PROCESSING
    return f"{domain.COMMISSION_DENIED}:{razon}"[:80]


# -- the log ----------------------------------------------------------------------------------
# Built once, values bound at execution: every conversion's events and marketing's answer to it
# come through here (building them per call was a hot spot, issue 11).
_SAGA = select(tables.sagas).where(tables.sagas.c.saga_id == bindparam("saga_id"))
_SAGA_LOCKED = _SAGA.with_for_update()
_s = tables.saga_pasos
_LATEST_WAITING = select(func.max(_s.c.id)).where(
    _s.c.saga_id == bindparam("saga_id"), _s.c.paso == bindparam("paso"), _s.c.estado == WAITING)
_FINISH_STEP = update(_s).where(_s.c.id == bindparam("row_id")).values(
    estado=bindparam("new_estado"), finished_at=bindparam("new_finished_at"))
_FINISH_STEP_SAYING = _FINISH_STEP.values(detalle=bindparam("new_detalle"))


def load(session: Session, saga_id: str, lock: bool = False):
    return session.execute(_SAGA_LOCKED if lock else _SAGA, {"saga_id": saga_id}).mappings().first()


def _set(session: Session, saga_id: str, now: datetime, **values) -> None:
    values["updated_at"] = now
    session.execute(_set_statement(tuple(sorted(values))),
                    {"where_saga_id": saga_id, **{f"new_{column}": value for column, value in values.items()}})


@functools.lru_cache(maxsize=32)
def _set_statement(columns: tuple[str, ...]):
    """The UPDATE of these saga columns, built once per set of columns (a handful exist)."""
    sagas = tables.sagas
    return update(sagas).where(sagas.c.saga_id == bindparam("where_saga_id")).values(
        {column: bindparam(f"new_{column}", type_=sagas.c[column].type) for column in columns})


# Built once (not per call: SQLAlchemy's statement building was a postback's hot spot).
_NEW_STEP = tables.saga_pasos.insert()


def _open(session: Session, saga_id: str, paso: str, now: datetime, detalle: str | None = None) -> None:
    session.execute(_NEW_STEP, _step(saga_id, paso, WAITING, now, None, detalle))


def _note(session: Session, saga_id: str, paso: str, estado: str, now: datetime, detalle: str | None = None) -> None:
    """A step that started and finished at once."""
    session.execute(_NEW_STEP, _step(saga_id, paso, estado, now, now, detalle))


def _step(saga_id: str, paso: str, estado: str, started_at: datetime, finished_at: datetime | None,
          detalle: str | None) -> dict:
    """A saga_pasos row (for _NEW_STEP, or several at once in their order with bulk_insert)."""
    return {"saga_id": saga_id, "paso": paso, "estado": estado, "started_at": started_at,
            "finished_at": finished_at, "detalle": _cut(detalle)}


def finish(session: Session, saga_id: str, paso: str, estado: str, now: datetime, detalle: str | None = None) -> bool:
    """Finish the step's latest waiting row; False when none waits (nothing changed)."""
    row_id = session.scalar(_LATEST_WAITING, {"saga_id": saga_id, "paso": paso})
    if row_id is None:
        return False
    values = {"row_id": row_id, "new_estado": estado, "new_finished_at": now}
    if detalle is None:
        session.execute(_FINISH_STEP, values)
    else:
        session.execute(_FINISH_STEP_SAYING, {**values, "new_detalle": _cut(detalle)})
    return True


# The same reads and writes for many sagas at once (a consumer batch of marketing's answers).
_STATES_LOCKED = select(tables.sagas.c.saga_id, tables.sagas.c.estado).where(
    tables.sagas.c.saga_id.in_(bindparam("ids", expanding=True))).with_for_update()
_LATEST_WAITING_OF = select(_s.c.saga_id, func.max(_s.c.id)).where(
    _s.c.saga_id.in_(bindparam("ids", expanding=True)), _s.c.paso == bindparam("paso"),
    _s.c.estado == WAITING).group_by(_s.c.saga_id)
_END_WAITING = update(tables.sagas).where(tables.sagas.c.saga_id.in_(bindparam("ids", expanding=True))).values(
    esperando_desde=None, reintentar_en=None, estado=bindparam("new_estado"), resultado=bindparam("new_resultado"),
    updated_at=bindparam("new_updated_at"))


def states_of(session: Session, saga_ids: Sequence[str]) -> dict[str, str]:
    """Each existing saga's estado, its row locked (as `load(lock=True)` does one)."""
    return dict(session.execute(_STATES_LOCKED, {"ids": list(saga_ids)}).all())


def latest_waiting(session: Session, saga_ids: Sequence[str], paso: str) -> dict[str, int]:
    """For each of these sagas with a waiting `paso` step, the latest one's row id (what `finish` finishes)."""
    return dict(session.execute(_LATEST_WAITING_OF, {"ids": list(saga_ids), "paso": paso}).all())


def finish_steps(session: Session, steps: Sequence[tuple[int, str]], estado: str, now: datetime) -> None:
    """`finish` for steps already found (row id, detalle), in one executemany."""
    session.execute(_FINISH_STEP_SAYING, [{"row_id": row_id, "new_estado": estado, "new_finished_at": now,
                                           "new_detalle": _cut(detalle)} for row_id, detalle in steps])


def end_waiting(session: Session, saga_ids: Sequence[str], now: datetime, estado: str, resultado: str) -> None:
    """`stop_waiting(..., estado, resultado, stuck=False)` for sagas known not to be stuck, in one statement."""
    session.execute(_END_WAITING, {"ids": list(saga_ids), "new_estado": estado, "new_resultado": resultado,
                                   "new_updated_at": now})


def has_step(session: Session, saga_id: str, paso: str, estado: str) -> bool:
    s = tables.saga_pasos
    return session.scalar(select(func.count()).select_from(s).where(
        s.c.saga_id == saga_id, s.c.paso == paso, s.c.estado == estado)) > 0


_FIRST_REQUEST = "attempt 1: ConversionValidated, waiting for marketing"


def _detected(p: dict) -> str:
    """The detection step's detalle, from ConversionDetected's payload."""
    return f"ConversionDetected {p['conversion_value']} {p['currency']}"


def _cut(detalle: str | None) -> str | None:
    return None if detalle is None else detalle[:500]


def record_events(session: Session, stored: Sequence[StoredEvent], now: datetime | None = None) -> None:
    """The steps the conversion's own events make, in the append's transaction. A conversion
    recorded before the saga log existed has no saga: its later events are not logged."""
    now = now or utcnow()
    validated_at_once = set()
    for event, following in zip(stored, [*stored[1:], None]):
        saga_id, p = event.stream_id, event.payload
        if event.event_id in validated_at_once:
            continue
        if event.event_type == "ConversionDetected" and following is not None \
                and following.event_type == "ConversionValidated" and following.stream_id == saga_id:
            # Detected and validated in one append (a postback validated at once, the usual case):
            # the rows the two steps below would leave, written directly (2 statements, not 8: the
            # steps in one executemany, in their order).
            bulk_insert(session, tables.sagas, [{
                "saga_id": saga_id, "estado": RUNNING, "paso_actual": COMMISSION, "intentos": 1,
                "esperando_desde": now, "reintentar_en": None, "resultado": None, "created_at": now,
                "updated_at": now}])
            bulk_insert(session, tables.saga_pasos, [
                _step(saga_id, DETECTION, DONE, now, now, _detected(p)),
                _step(saga_id, VALIDATION, DONE, now, now, "ConversionValidated"),
                _step(saga_id, COMMISSION, WAITING, now, None, _FIRST_REQUEST)])
            validated_at_once.add(following.event_id)
            continue
        if event.event_type == "ConversionDetected":
            bulk_insert(session, tables.sagas, [{
                "saga_id": saga_id, "estado": RUNNING, "paso_actual": VALIDATION, "intentos": 0,
                "esperando_desde": None, "reintentar_en": None, "resultado": None, "created_at": now,
                "updated_at": now}])
            bulk_insert(session, tables.saga_pasos, [
                _step(saga_id, DETECTION, DONE, now, now, _detected(p)),
                _step(saga_id, VALIDATION, WAITING, now, None, None)])
            continue
        stop_deferring(session)  # the saga's rows this unit may have deferred (a postback's) are read now
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
            _open(session, saga_id, COMMISSION, now, _FIRST_REQUEST)
            _set(session, saga_id, now, paso_actual=COMMISSION, intentos=1, esperando_desde=now,
                 reintentar_en=None)  # None: the plain timeout from esperando_desde
        elif event.event_type == "ConversionRejected" and p.get("compensation"):
            finish(session, saga_id, COMMISSION, FAILED, now)  # the denial's handler finished it already
            _note(session, saga_id, COMPENSATION, DONE, now, f"ConversionRejected {p['reason']}")
            _set(session, saga_id, now, estado=COMPENSATED, paso_actual=COMPENSATION, esperando_desde=None,
                 reintentar_en=None, resultado=p["reason"])
        elif event.event_type == "ConversionRejected":
            finish(session, saga_id, VALIDATION, FAILED, now, f"ConversionRejected {p['reason']}")
            _set(session, saga_id, now, estado=COMPLETED, paso_actual=VALIDATION, esperando_desde=None,
                 reintentar_en=None, resultado=f"rejected:{p['reason']}")
        elif event.event_type == "ConversionRefunded":
            _note(session, saga_id, REFUND, DONE, now,
                  f"ConversionRefunded {p['refund_type']}" + (f": {p['reason']}" if p.get("reason") else ""))
            _open(session, saga_id, COMMISSION_REVERSAL, now, "waiting for marketing to reverse the commission")
            _set(session, saga_id, now, paso_actual=COMMISSION_REVERSAL)


def record_retry(session: Session, saga_id: str, attempt: int, policy: SagaPolicy, now: datetime) -> None:
    """Request `attempt` sent (CommissionRequested); the next one is due after wait_after(attempt)."""
    waited = wait_after(attempt - 1, policy).total_seconds()
    wait = wait_after(attempt, policy)
    planned = f"of {policy.max_attempts}" if attempt <= policy.max_attempts else "(stuck)"
    _note(session, saga_id, COMMISSION_RETRY, DONE, now,
          f"attempt {attempt} {planned}: no answer in {waited:g} s, CommissionRequested sent; "
          f"next in {wait.total_seconds():g} s")
    _set(session, saga_id, now, intentos=attempt, esperando_desde=now, reintentar_en=now + wait)


def record_stuck(session: Session, saga_id: str, attempts: int, policy: SagaPolicy, now: datetime) -> str:
    """The saga is stuck: no answer to any of its `attempts` requests. Not a refusal: it keeps
    asking, and an answer still completes it (or compensates it, when marketing refuses). Returns
    the reason the alert carries."""
    motivo = (f"no answer from marketing to {attempts} commission requests, "
              f"{policy.timeout.total_seconds():g} s apart; asking again every "
              f"{wait_after(attempts + 1, policy).total_seconds():g} s or more, up to "
              f"{policy.max_backoff.total_seconds():g} s, until it answers")
    _open(session, saga_id, COMMISSION_STUCK, now, motivo)
    _set(session, saga_id, now, estado=STUCK)
    return motivo


def stop_waiting(session: Session, saga_id: str, now: datetime, estado: str | None = None,
                 resultado: str | None = None, stuck: bool = True) -> None:
    """No request waits any more; with `estado`, the saga ends there. A stuck step is closed.
    `stuck=False`: the saga's row, read under its lock, says it is not stuck, so no stuck step
    waits (record_stuck opens one only with the stuck state, and nothing leaves that state
    without closing it): not looked for."""
    if stuck:
        finish(session, saga_id, COMMISSION_STUCK, DONE, now, "an answer came: no longer stuck")
    values = {"esperando_desde": None, "reintentar_en": None}
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


def next_request_at(saga, policy: SagaPolicy) -> datetime | None:
    """When the saga asks again if no answer comes (None: it waits for nothing)."""
    waiting_since = saga["esperando_desde"]
    if waiting_since is None:
        return None
    return saga["reintentar_en"] or waiting_since + policy.timeout


def summary(saga, policy: SagaPolicy) -> dict:
    return {"saga_id": saga["saga_id"], "correlation_id": saga["saga_id"], "conversion_id": saga["saga_id"],
            "estado": saga["estado"], "terminal": saga["estado"] in TERMINAL_STATES,
            "paso_actual": saga["paso_actual"], "intentos": saga["intentos"], "max_intentos": policy.max_attempts,
            "esperando_desde": _iso(saga["esperando_desde"]), "deadline": _iso(next_request_at(saga, policy)),
            "resultado": saga["resultado"], "created_at": _iso(saga["created_at"]),
            "updated_at": _iso(saga["updated_at"])}


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()
