"""A conversion's event stream: load the aggregate from it, and append its new events together
with what each append must change in the same transaction (projections, saga log)."""

from __future__ import annotations

from sqlalchemy.orm import Session

from alpes.kernel.errors import NotFound
from alpes.kernel.eventstore import EventStore
from alpes.kernel.messages import OutgoingEvent

from . import domain, saga
from .projections import project, project_new_stream
from .records import TOPIC, from_record, to_record
from .tracking import attributed_click_id


def load_conversion(session: Session, store: EventStore, conversion_id: str) -> domain.Conversion:
    """The aggregate rebuilt from its stream; NotFound when there is no such stream."""
    stored = store.load(session, conversion_id)
    if not stored:
        raise NotFound("conversion_id", "no conversion with this id")
    return domain.Conversion.rebuild([from_record(e) for e in stored])


_LOOK_UP = object()


def commit_events(session: Session, store: EventStore, conversion: domain.Conversion,
                  events: list[domain.DomainEvent], correlation_id: str, click_id=_LOOK_UP,
                  fresh_stream: bool = False) -> list[OutgoingEvent]:
    """Append to the stream, update the projections and the saga log, and return the integration
    events (for the caller's outbox). A concurrent append raises ConcurrencyConflict. `click_id`:
    the click the conversion was attributed through (None: by ids), when the caller knows it;
    otherwise it is looked up if an event carries it. `fresh_stream`: a new conversion whose id
    this transaction just made (EventStore.append)."""
    expected = conversion.version
    if click_id is _LOOK_UP:
        click_id = None
        if any(isinstance(event, domain.Validated) for event in events):
            click_id = attributed_click_id(session, conversion.id)
    records = []
    for event in events:
        records.append(to_record(conversion, event, click_id))
        conversion.apply(event)
    stored = store.append(session, conversion.id, expected, records, correlation_id, fresh_stream=fresh_stream)
    if expected == 0 and stored[0].event_type == "ConversionDetected":
        project_new_stream(session, stored)
    else:
        for item in stored:
            project(session, item)
    outgoing = []
    for item in stored:
        outgoing.append(OutgoingEvent(TOPIC, item.event_type, item.stream_id, item.payload, event_id=item.event_id,
                                      occurred_at=item.occurred_at, correlation_id=correlation_id,
                                      causation_id=correlation_id,
                                      encoded=None if item.encoded is None else (item.encoded, item.schema_version)))
    saga.record_events(session, stored)  # the saga's steps commit with the events that make them
    return outgoing
