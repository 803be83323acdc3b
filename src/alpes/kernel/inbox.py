"""Idempotent inbox: a consumer's effect and its (subscription, event_id) commit together.

The inbox row is inserted first, inside the consumer's transaction; a unique-key violation
means "already done". A batch is handled in one transaction (one commit for many messages);
if anything in it fails, its messages are retried one by one so a single bad message cannot
hold back the others and each gets its own verdict.

Each event is handled in a consumer span of its own trace (kernel/tracing.py); the events its
handler emits carry that span's `traceparent`.

A subscription's handlers may come as `Handlers` with a `batch` scope: entered around a batch's
handlers, inside its transaction, so they can leave their writes for one statement at its end
(auditoria's chain), and their announcements for one event at its end (the list the scope yields).
The one-by-one retry runs without it: each handler then writes and announces as it goes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import structlog
from sqlalchemy import Column, MetaData, PrimaryKeyConstraint, String, Table, bindparam, select
from sqlalchemy.exc import (
    DisconnectionError,
    IntegrityError,
    InterfaceError,
    OperationalError,
)
from sqlalchemy.orm import Session

from .db import Database, UtcDateTime
from .messages import IncomingEvent, OutgoingEvent, TransientFailure, utcnow
from .outbox import Outbox, wrote_in
from .tracing import Tracing, mark_failed

log = structlog.get_logger(__name__)

Handler = Callable[[Session, IncomingEvent], Sequence[OutgoingEvent] | None]
BatchScope = Callable[[Session], AbstractContextManager[list[OutgoingEvent] | None]]


class Handlers(dict):
    """A subscription's handlers by event type, and its optional `batch` scope: `batch(session)` is
    entered before a batch's first handler runs and left after its last, in the batch's
    transaction and before its outbox write. Left normally, it writes what the handlers left it,
    and the events it put in the list it yielded (if it yields one) go to the outbox after the
    handlers' own, continuing the batch's first event's trace and correlation; left by an error,
    it drops it (the transaction is rolled back and the batch retried one by one, without the
    scope)."""

    def __init__(self, handlers: Mapping[str, Handler] | None = None, *, batch: BatchScope | None = None) -> None:
        super().__init__(handlers or {})
        self.batch = batch


def inbox_table(metadata: MetaData) -> Table:
    return Table(
        "inbox",
        metadata,
        Column("subscription", String(120), nullable=False),
        Column("event_id", String(36), nullable=False),
        Column("event_type", String(80), nullable=False),
        Column("processed_at", UtcDateTime(), nullable=False),
        PrimaryKeyConstraint("subscription", "event_id", name="pk_inbox"),
    )


class _AlreadyProcessed(Exception):
    pass


@dataclass
class Outcome:
    processed: int = 0
    duplicates: int = 0
    ignored: int = 0


class InboxProcessor:
    """Runs a subscription's handlers exactly once per event id. Knows nothing of the broker."""

    def __init__(self, db: Database, inbox: Table, outbox: Outbox, subscription: str,
                 handlers: dict[str, Handler], after_commit: Callable[[], None] | None = None,
                 tracing: Tracing | None = None) -> None:
        """`tracing`: the service's (kernel/tracing.py); None: spans propagated, never recorded."""
        self.db = db
        self.tracing = tracing or Tracing("unknown")
        self.inbox = inbox
        self.outbox = outbox
        self.subscription = subscription
        self.handlers = handlers
        # Called after a commit that wrote outbox rows (the relay's wake-up): a batch that emitted
        # nothing does not send the relay to look for rows (a read and a file lock each time).
        self.after_commit = after_commit or (lambda: None)
        self.totals = Outcome()
        self._inbox_insert = inbox.insert()  # built once: not per batch
        self._done = select(inbox.c.event_id).where(inbox.c.subscription == subscription,
                                                    inbox.c.event_id.in_(bindparam("ids", expanding=True)))

    def process(self, events: Sequence[IncomingEvent]) -> dict[str, str | None]:
        """Handle a batch; returns event_id -> None (done, ack it) or the error (nack it)."""
        if not events:
            return {}
        acted = [e for e in events if self.handlers.get(e.event_type) is not None]
        if len(acted) < len(events):
            # An event this subscription does not act on has no effect to make once: it is
            # acknowledged without a transaction or an inbox row (it would change nothing).
            self._count(Outcome(ignored=len(events) - len(acted)))
            return {e.event_id: None for e in events} | self.process(acted)
        if len(events) > 1:
            try:
                outcome, wrote = self._process_batch(events)
                self._count(outcome)
                if wrote:
                    self.after_commit()
                return {e.event_id: None for e in events}
            except Exception as error:
                log.info("batch failed, retrying one by one", subscription=self.subscription,
                         size=len(events), error=str(error)[:200])
        verdicts: dict[str, str | None] = {}
        failed_keys: set[str] = set()
        for event in events:
            if event.key in failed_keys:
                # Per-aggregate order: never apply an event before an earlier one of its key.
                verdicts[event.event_id] = "blocked: an earlier event of this key failed"
                continue
            verdicts[event.event_id] = self._process_single(event)
            if verdicts[event.event_id] is not None:
                failed_keys.add(event.key)
        return verdicts

    def _process_batch(self, events: Sequence[IncomingEvent]) -> tuple[Outcome, bool]:
        """Returns what happened and whether the outbox was written."""
        outcome = Outcome()
        with self.db.transaction() as session:
            ids = list({e.event_id for e in events})
            # Only an optimisation: the unique key still guards against a concurrent instance,
            # whose insert makes this commit fail and sends the batch down the one-by-one path.
            done = set(session.scalars(self._done, {"ids": ids}))
            fresh: list[IncomingEvent] = []
            for event in events:
                if event.event_id in done:
                    outcome.duplicates += 1
                    continue
                done.add(event.event_id)
                fresh.append(event)
            if fresh:
                session.execute(self._inbox_insert, [self._inbox_row(e) for e in fresh])
            # The batch's events go to the outbox in one statement at its end (same transaction,
            # same order); the outbox's hooks (marketing's webhook deliveries) run as each
            # handler emits them.
            emitted: list[dict] = []
            batch = getattr(self.handlers, "batch", None)
            first_traceparent = None
            with batch(session) if batch is not None and fresh else nullcontext() as at_end:
                for event in fresh:
                    with self.tracing.consuming(event, self.subscription) as traceparent:
                        outcome.processed += self._handle(session, event, traceparent, emitted)
                    first_traceparent = first_traceparent or traceparent
            if at_end:
                # The batch's own events: the whole batch caused them; they continue the first
                # event's trace and correlation (one parent, as a message has).
                at_end = [e.caused_by(fresh[0]) for e in at_end]
                emitted.extend(self.outbox.rows(at_end, traceparent=first_traceparent))
                self.outbox.run_hooks(session, at_end)
            if emitted:
                self.outbox.write(session, emitted)
            outcome.ignored = len(fresh) - outcome.processed
            wrote = wrote_in(session)
        return outcome, wrote

    def _process_single(self, event: IncomingEvent) -> str | None:
        # The span covers the commit, and the failure logged below carries the trace's ids.
        with self.tracing.consuming(event, self.subscription) as traceparent:
            return self._process_one(event, traceparent)

    def _process_one(self, event: IncomingEvent, traceparent: str | None) -> str | None:
        try:
            with self.db.transaction() as session:
                try:
                    session.execute(self._inbox_insert, self._inbox_row(event))
                except IntegrityError:
                    raise _AlreadyProcessed from None
                handled = self._handle(session, event, traceparent)
                wrote = wrote_in(session)
        except _AlreadyProcessed:
            self._count(Outcome(duplicates=1))
            return None
        except (OperationalError, InterfaceError, DisconnectionError) as error:
            raise TransientFailure(str(error)[:300]) from error
        except Exception as error:
            log.warning("handler failed", subscription=self.subscription, event_type=event.event_type,
                        event_id=event.event_id, error=str(error)[:300])
            mark_failed(str(error)[:300])
            return f"{type(error).__name__}: {error}"[:500]
        self._count(Outcome(processed=handled, ignored=1 - handled))
        if wrote:
            self.after_commit()
        return None

    def _handle(self, session: Session, event: IncomingEvent, traceparent: str | None,
                emitted_rows: list[dict] | None = None) -> int:
        """Run the event's handler; its events go to the outbox now, or into `emitted_rows` for
        the caller to write before its commit."""
        handler = self.handlers.get(event.event_type)
        if handler is None:
            return 0  # a type handled by no one (process() leaves these out)
        emitted = [e.caused_by(event) for e in handler(session, event) or ()]
        if emitted_rows is None:
            self.outbox.add(session, emitted, traceparent=traceparent)
        else:
            emitted_rows.extend(self.outbox.rows(emitted, traceparent=traceparent))
            self.outbox.run_hooks(session, emitted)
        return 1

    def _inbox_row(self, event: IncomingEvent) -> dict:
        return {"subscription": self.subscription, "event_id": event.event_id,
                "event_type": event.event_type, "processed_at": utcnow()}

    def _count(self, outcome: Outcome) -> None:
        self.totals.processed += outcome.processed
        self.totals.duplicates += outcome.duplicates
        self.totals.ignored += outcome.ignored
