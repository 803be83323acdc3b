"""Persistence tests on SQLite and MariaDB (the `db_url` fixture): migrations, outbox relay,
idempotent inbox, event store and the kernel's column types.

No broker here: the relay publishes to an in-memory fake that records every event id it
confirmed, so "exactly once" and "never lost" are checked by counting.
"""

from __future__ import annotations

import importlib
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import (
    Column,
    Date,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    func,
    inspect,
    select,
    text,
)
from sqlalchemy import event as sa_event
from sqlalchemy.exc import StatementError

from alpes.kernel.codec import SchemaRegistry
from alpes.kernel.db import Database, ScaledDecimal, UtcDateTime, migrate, upsert_add
from alpes.kernel.eventstore import (
    ConcurrencyConflict,
    EventStore,
    NewEvent,
    event_store_table,
)
from alpes.kernel.inbox import InboxProcessor, inbox_table
from alpes.kernel.messages import IncomingEvent, OutgoingEvent, new_id, utcnow
from alpes.kernel.outbox import (
    PENDING,
    SENT,
    Outbox,
    OutboxRelay,
    PendingMessage,
    forget_sent,
    outbox_table,
)

CONTEXTS = ["afiliados", "conversiones", "marketing", "auditoria"]

HYPOTHESIS = settings(max_examples=60, deadline=None, derandomize=True,
                      suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


# --------------------------------------------------------------------------------------------
# Fixtures and helpers
# --------------------------------------------------------------------------------------------


def build_metadata() -> MetaData:
    md = MetaData()
    outbox_table(md)
    inbox_table(md)
    event_store_table(md)
    Table(
        "effects", md,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("subscription", String(120), nullable=False),
        # Deliberately not unique: a duplicated effect must be visible, not refused.
        Column("event_id", String(36), nullable=False),
    )
    Table(
        "money", md,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("grp", String(36), nullable=False, index=True),
        Column("amount", ScaledDecimal(2)),
        Column("rate", ScaledDecimal(4)),
        Column("at", UtcDateTime()),
    )
    Table(
        "counters", md,
        Column("dia", Date, nullable=False),
        Column("key", String(36), nullable=False),
        Column("n", Integer, nullable=False, default=0),
        Column("total", ScaledDecimal(2), nullable=False, default=0),
        PrimaryKeyConstraint("dia", "key", name="pk_counters"),
    )
    return md


class Schema:
    def __init__(self, url: str, registry: SchemaRegistry) -> None:
        self.url = url
        self.registry = registry
        self.md = build_metadata()
        self.db = Database(url)
        self.md.create_all(self.db.engine)
        self.outbox_t = self.md.tables["outbox"]
        self.inbox_t = self.md.tables["inbox"]
        self.store_t = self.md.tables["event_store"]
        self.effects = self.md.tables["effects"]
        self.money = self.md.tables["money"]
        self.counters = self.md.tables["counters"]
        self.outbox = Outbox(self.outbox_t, registry)
        self._others: list[Database] = []

    def another_db(self) -> Database:
        """A second session factory on the same database: another process of the service."""
        db = Database(self.url)
        self._others.append(db)
        return db

    def close(self) -> None:
        for db in [self.db, *self._others]:
            db.dispose()


@pytest.fixture
def schema(db_url, registry):
    s = Schema(db_url, registry)
    yield s
    s.close()


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def outgoing(i: int = 0, topic: str = "sistema.eventos") -> OutgoingEvent:
    return OutgoingEvent(topic=topic, event_type="ServicioIniciado", key=f"inst-{i % 7}",
                         payload={"servicio": "test", "instancia": f"inst-{i}", "timestamp": utcnow()})


def outbox_rows(schema: Schema) -> dict[str, dict]:
    with schema.db.transaction() as s:
        return {r["event_id"]: dict(r) for r in s.execute(select(schema.outbox_t)).mappings()}


class FakePublisher:
    """Records every event id it confirmed. `verdict(message, attempt)` -> None (stored) or an error
    string; `omit` -> no receipt at all for that message; `raises` -> the broker is unreachable."""

    def __init__(self, verdict: Callable[[PendingMessage, int], str | None] | None = None,
                 omit: Callable[[PendingMessage], bool] | None = None, raises: Exception | None = None,
                 delay: float = 0.0) -> None:
        self.verdict = verdict or (lambda m, attempt: None)
        self.omit = omit or (lambda m: False)
        self.raises = raises
        self.delay = delay
        self.published: list[str] = []
        self.batches: list[list[str]] = []
        self.attempts: Counter[str] = Counter()
        self.messages: dict[str, PendingMessage] = {}
        self._lock = threading.Lock()
        self._in_flight = 0
        self.max_in_flight = 0

    def publish(self, messages: Sequence[PendingMessage]) -> dict[str, str | None]:
        with self._lock:
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
        try:
            if self.delay:
                time.sleep(self.delay)
            if self.raises is not None:
                raise self.raises
            results: dict[str, str | None] = {}
            with self._lock:
                self.batches.append([m.event_id for m in messages])
                for m in messages:
                    self.attempts[m.event_id] += 1
                    if self.omit(m):
                        continue
                    error = self.verdict(m, self.attempts[m.event_id])
                    results[m.event_id] = error
                    if error is None:
                        self.published.append(m.event_id)
                        self.messages[m.event_id] = m
            return results
        finally:
            with self._lock:
                self._in_flight -= 1


def run_threads(targets: list[Callable[[], None]], timeout: float = 60.0) -> None:
    errors: list[BaseException] = []

    def wrap(target):
        def run():
            try:
                target()
            except BaseException as error:  # surfaced in the test thread below
                errors.append(error)
        return run

    threads = [threading.Thread(target=wrap(t), daemon=True) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
        assert not t.is_alive(), "thread did not finish in time"
    if errors:
        raise errors[0]


# --------------------------------------------------------------------------------------------
# 1. Migrations
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ctx", CONTEXTS)
def test_migrations_create_exactly_the_context_tables_and_are_idempotent(db_url, ctx):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    metadata = importlib.import_module(f"alpes.{ctx}.tables").metadata
    migrate(db_url, f"alpes.{ctx}:migrations")
    db = Database(db_url)
    try:
        def snapshot():
            inspector = inspect(db.engine)
            names = set(inspector.get_table_names())
            columns = {n: [c["name"] for c in inspector.get_columns(n)] for n in names}
            indexes = {n: sorted(i["name"] for i in inspector.get_indexes(n)) for n in names}
            with db.engine.connect() as connection:
                revision = connection.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
            return names, columns, indexes, revision

        names, columns, indexes, revision = snapshot()
        assert names - {"alembic_version"} == set(metadata.tables)
        assert len(revision) == 1
        # The migrations and tables.py describe the same schema (no drift between the two).
        with db.engine.connect() as connection:
            diff = compare_metadata(MigrationContext.configure(connection), metadata)
        assert diff == []

        if ctx == "auditoria":
            def seeds():
                with db.engine.connect() as connection:
                    head = connection.execute(text("SELECT id, seq FROM audit_head")).all()
                    state = connection.execute(text("SELECT id, verified, highest_seq FROM compliance_state")).all()
                return [tuple(r) for r in head], [tuple(r) for r in state]
            head, state = seeds()
            assert head == [(1, 0)]
            assert state == [(1, 0, 0)]

        migrate(db_url, f"alpes.{ctx}:migrations")  # a no-op at head
        assert snapshot() == (names, columns, indexes, revision)
        if ctx == "auditoria":
            assert seeds() == (head, state)
    finally:
        db.dispose()


# --------------------------------------------------------------------------------------------
# 2. Outbox relay
# --------------------------------------------------------------------------------------------


def test_outbox_rows_are_published_in_id_order_and_marked_sent(schema, registry):
    events = [outgoing(i) for i in range(120)]
    # Several transactions, several rows each: the order of the ids is the order of the commits.
    for start in range(0, len(events), 30):
        with schema.db.transaction() as s:
            schema.outbox.add(s, events[start:start + 30])
    with schema.db.transaction() as s:
        assert schema.outbox.pending_count(s) == 120

    publisher = FakePublisher()
    relay = OutboxRelay(schema.db, schema.outbox_t, publisher, batch_size=50)
    assert [relay.run_once() for _ in range(4)] == [(50, 0), (50, 0), (20, 0), (0, 0)]
    assert publisher.published == [e.event_id for e in events]
    assert [len(b) for b in publisher.batches] == [50, 50, 20]

    rows = outbox_rows(schema)
    by_id = sorted(rows.values(), key=lambda r: r["id"])
    assert [r["event_id"] for r in by_id] == [e.event_id for e in events]
    assert all(r["status"] == SENT and r["sent_at"] is not None and r["attempts"] == 0 for r in by_id)
    assert all(r["sent_at"].tzinfo is not None for r in by_id)
    with schema.db.transaction() as s:
        assert schema.outbox.pending_count(s) == 0

    # What was published is what was written: envelope and Avro payload intact.
    first = publisher.messages[events[0].event_id]
    assert first.topic == "sistema.eventos" and first.event_type == "ServicioIniciado"
    assert first.partition_key == events[0].key
    assert first.occurred_at == events[0].occurred_at
    assert first.correlation_id == events[0].event_id and first.causation_id == events[0].event_id
    decoded = registry.decode(first.event_type, first.payload, first.schema_version)
    assert decoded == events[0].payload


def test_outbox_rolled_back_transaction_leaves_no_row(schema):
    committed = outgoing(1)
    with schema.db.transaction() as s:
        s.execute(schema.effects.insert().values(subscription="state", event_id=committed.event_id))
        schema.outbox.add(s, [committed])

    with pytest.raises(RuntimeError):
        with schema.db.transaction() as s:
            s.execute(schema.effects.insert().values(subscription="state", event_id="rolled-back"))
            schema.outbox.add(s, [outgoing(2), outgoing(3)])
            raise RuntimeError("the use case failed after writing its events")

    assert set(outbox_rows(schema)) == {committed.event_id}
    with schema.db.transaction() as s:
        assert s.scalars(select(schema.effects.c.event_id)).all() == [committed.event_id]

    publisher = FakePublisher()
    relay = OutboxRelay(schema.db, schema.outbox_t, publisher)
    assert relay.run_once() == (1, 0)
    assert publisher.published == [committed.event_id]


def test_outbox_failed_messages_stay_pending_and_are_retried(schema):
    events = [outgoing(i) for i in range(10)]
    with schema.db.transaction() as s:
        schema.outbox.add(s, events)
    refused = {events[2].event_id, events[5].event_id}
    silent = {events[7].event_id}  # the broker gave no receipt for it
    healed = threading.Event()

    def verdict(m, attempt):
        if m.event_id in refused and not healed.is_set():
            return f"TopicTerminated: attempt {attempt}"
        return None

    publisher = FakePublisher(verdict=verdict, omit=lambda m: m.event_id in silent and not healed.is_set())
    relay = OutboxRelay(schema.db, schema.outbox_t, publisher, batch_size=100)

    assert relay.run_once() == (7, 3)
    rows = outbox_rows(schema)
    for e in events:
        row = rows[e.event_id]
        if e.event_id in refused | silent:
            assert row["status"] == PENDING and row["attempts"] == 1 and row["sent_at"] is None
        else:
            assert row["status"] == SENT and row["attempts"] == 0 and row["last_error"] is None
    assert all(rows[i]["last_error"] == "TopicTerminated: attempt 1" for i in refused)
    assert rows[events[7].event_id]["last_error"] == "no receipt"

    assert relay.run_once() == (0, 3)  # still failing: still pending, attempts counted
    rows = outbox_rows(schema)
    assert all(rows[i]["attempts"] == 2 and rows[i]["status"] == PENDING for i in refused | silent)
    assert all(rows[i]["last_error"] == "TopicTerminated: attempt 2" for i in refused)

    healed.set()
    assert relay.run_once() == (3, 0)
    assert relay.run_once() == (0, 0)
    rows = outbox_rows(schema)
    assert all(r["status"] == SENT for r in rows.values())
    # Never lost, never published twice.
    assert sorted(publisher.published) == sorted(e.event_id for e in events)
    assert len(publisher.published) == len(events)
    # The retried ones went out after the others, still in id order among themselves.
    assert publisher.published[-3:] == [events[2].event_id, events[5].event_id, events[7].event_id]
    assert (relay.published, relay.failures) == (10, 6)


def test_outbox_publisher_that_raises_leaves_everything_pending(schema):
    events = [outgoing(i) for i in range(25)]
    with schema.db.transaction() as s:
        schema.outbox.add(s, events)
    down = FakePublisher(raises=ConnectionError("broker unreachable"))
    relay = OutboxRelay(schema.db, schema.outbox_t, down, batch_size=100)
    assert relay.run_once() == (0, 25)
    assert relay.run_once() == (0, 25)
    rows = outbox_rows(schema)
    assert all(r["status"] == PENDING and r["attempts"] == 2 for r in rows.values())
    assert all(r["last_error"] == "ConnectionError: broker unreachable" for r in rows.values())
    assert down.published == []

    up = FakePublisher()
    relay = OutboxRelay(schema.db, schema.outbox_t, up, batch_size=100)
    assert relay.run_once() == (25, 0)
    assert up.published == [e.event_id for e in events]
    assert all(r["status"] == SENT for r in outbox_rows(schema).values())


def test_sent_outbox_rows_are_forgotten_once_kept_long_enough_and_pending_ones_never(schema):
    """`forget_sent` deletes the sent rows sent before the cutoff, from the oldest, a batch at a
    time; a row sent late (retried) does not hold back older ones, and a pending row never goes."""
    events = [outgoing(i) for i in range(10)]
    with schema.db.transaction() as s:
        schema.outbox.add(s, events)
    refused = {e.event_id for e in events[1::3]}  # ids 2, 5, 8 by position: stay pending
    relay = OutboxRelay(schema.db, schema.outbox_t, FakePublisher(lambda m, attempt: "full" if m.event_id in refused
                                                                  else None), batch_size=100)
    assert relay.run_once() == (7, 3)
    now, t = utcnow(), schema.outbox_t
    sent_ids = sorted(r["id"] for r in outbox_rows(schema).values() if r["status"] == SENT)
    # Sent 25 h ago but for the first (retried, sent an hour ago) and every third after it.
    recent = set(sent_ids[::3])
    with schema.db.transaction() as s:
        for row_id in sent_ids:
            s.execute(t.update().where(t.c.id == row_id).values(
                sent_at=now - (timedelta(hours=1) if row_id in recent else timedelta(hours=25))))
    cutoff = now - timedelta(hours=24)
    assert [forget_sent(schema.db, t, cutoff, batch=3) for _ in range(4)] == [2, 1, 1, 0]
    rows = outbox_rows(schema)
    assert sorted(r["id"] for r in rows.values() if r["status"] == SENT) == sorted(recent)
    assert {e for e, r in rows.items() if r["status"] == PENDING} == refused
    with schema.db.transaction() as s:  # the relay goes on from where it was
        assert schema.outbox.pending_count(s) == 3


@pytest.mark.parametrize("ctx", CONTEXTS)
def test_every_service_forgets_its_sent_events_after_the_hours_it_is_told(tmp_path, ctx):
    from alpes.settings import Settings

    settings = Settings(data_dir=tmp_path, broker_url="pulsar://127.0.0.1:1", outbox_keep_sent_hours=1)
    _app, runtime = importlib.import_module(f"alpes.{ctx}.service").build(settings)
    try:
        [job] = [j for j in runtime.jobs if j.name == "forget-sent-events"]
        t = runtime.outbox.table
        with runtime.db.transaction() as s:
            runtime.outbox.add(s, [outgoing(0), outgoing(1)])
            first, second = s.scalars(select(t.c.id).order_by(t.c.id)).all()
            s.execute(t.update().values(status=SENT))
            s.execute(t.update().where(t.c.id == first).values(sent_at=utcnow() - timedelta(minutes=61)))
            s.execute(t.update().where(t.c.id == second).values(sent_at=utcnow() - timedelta(minutes=59)))
        assert job.run() == 1 and job.run() == 0
        with runtime.db.read() as s:
            assert s.scalars(select(t.c.id)).all() == [second]
    finally:
        runtime.db.dispose()


def test_outbox_relay_thread_retries_until_everything_is_sent(schema):
    """The background loop: a broker outage backs off and retries; nothing is parked."""
    outage = {"left": 3}

    class Flaky(FakePublisher):
        def publish(self, messages):
            with self._lock:
                if outage["left"] > 0:
                    outage["left"] -= 1
                    raise ConnectionError("broker restarting")
            return super().publish(messages)

    publisher = Flaky()
    relay = OutboxRelay(schema.db, schema.outbox_t, publisher, batch_size=20, idle_seconds=0.01,
                        max_backoff_seconds=0.2)
    relay.start()
    try:
        events = [outgoing(i) for i in range(45)]
        _commit_and_wait(schema, relay, publisher, [events[start:start + 15] for start in range(0, 45, 15)], 20)
    finally:
        relay.stop()
    assert outage["left"] == 0
    assert sorted(publisher.published) == sorted(e.event_id for e in events)
    assert len(set(publisher.published)) == 45
    assert all(r["status"] == SENT for r in outbox_rows(schema).values())


def test_woken_by_a_commit_the_relay_waits_for_the_next_commits_to_publish_them_together(schema):
    """`coalesce_seconds`: the commits that follow the one that woke the relay within that time go
    in its batch (under load a batch per commit costs more CPU per event than the wait)."""
    publisher = FakePublisher()
    relay = OutboxRelay(schema.db, schema.outbox_t, publisher, idle_seconds=0.01, coalesce_seconds=0.3)
    relay.start()
    try:
        time.sleep(0.05)  # the relay found nothing and waits to be woken
        events = [outgoing(i) for i in range(3)]
        _commit_and_wait(schema, relay, publisher, [[e] for e in events], 10)  # three requests' commits
    finally:
        relay.stop()
    assert publisher.batches == [[e.event_id for e in events]]


def _commit_and_wait(schema: Schema, relay: OutboxRelay, publisher: FakePublisher,
                     groups: list[list[OutgoingEvent]], timeout: float) -> None:
    """Each group of events in a transaction of its own, waking the relay after each commit (as
    the runtime does); then until the publisher has seen them all, or `timeout` seconds."""
    for group in groups:
        with schema.db.transaction() as s:
            schema.outbox.add(s, group)
        relay.wake()
    total = sum(len(group) for group in groups)
    deadline = time.monotonic() + timeout
    while len(publisher.published) < total and time.monotonic() < deadline:
        time.sleep(0.01)


# --------------------------------------------------------------------------------------------
# 3. Concurrent relays
# --------------------------------------------------------------------------------------------


def test_two_relays_publish_every_event_exactly_once(schema):
    total = 2000
    events = [outgoing(i) for i in range(total)]
    with schema.db.transaction() as s:
        schema.outbox.add(s, events)

    # Every 17th message is refused on its first attempt: retries race with fresh claims too.
    flaky = {e.event_id for e in events[::17]}
    publisher = FakePublisher(verdict=lambda m, attempt: "Timeout" if m.event_id in flaky and attempt == 1 else None,
                              delay=0.002)
    relays = [OutboxRelay(db, schema.outbox_t, publisher, batch_size=50)
              for db in (schema.another_db(), schema.another_db())]
    barrier = threading.Barrier(len(relays))

    def drain(relay: OutboxRelay) -> Callable[[], None]:
        def run():
            barrier.wait()
            deadline = time.monotonic() + 45
            while time.monotonic() < deadline:
                published, failed = relay.run_once()
                time.sleep(0.003)  # a window for the other relay (SQLite's busy wait would starve it)
                if published or failed:
                    continue
                with relay.db.transaction() as s:  # rows the other relay holds are still pending
                    if schema.outbox.pending_count(s) == 0:
                        return
                time.sleep(0.005)
            raise AssertionError("relay did not drain the outbox in time")
        return run

    run_threads([drain(r) for r in relays])

    counts = Counter(publisher.published)
    duplicates = [i for i, n in counts.items() if n > 1]
    missing = {e.event_id for e in events} - set(counts)
    assert duplicates == [] and missing == set()
    assert len(publisher.published) == total
    assert all(publisher.attempts[i] == 2 for i in flaky)
    assert sum(r.published for r in relays) == total
    assert sum(r.failures for r in relays) == len(flaky)
    rows = outbox_rows(schema)
    assert all(r["status"] == SENT for r in rows.values())
    assert all(r["attempts"] == (1 if i in flaky else 0) for i, r in rows.items())
    if is_sqlite(schema.url):
        # One writer at a time: the claim-publish-mark transactions never overlap.
        assert publisher.max_in_flight == 1
    else:
        # SKIP LOCKED: the relays claimed disjoint batches at the same time, neither waited.
        assert publisher.max_in_flight == 2
        assert all(r.published > 0 for r in relays)


# --------------------------------------------------------------------------------------------
# 4. Inbox
# --------------------------------------------------------------------------------------------


def incoming(event_id: str | None = None, *, fail: bool = False, emit: bool = True) -> IncomingEvent:
    event_id = event_id or new_id()
    return IncomingEvent(
        topic="afiliados.eventos", subscription="ignored-here", event_id=event_id, event_type="AfiliadoValidado",
        schema_version=1, key=f"af-{event_id[:4]}", occurred_at=utcnow(), correlation_id=new_id(),
        causation_id=new_id(), payload={"id": event_id, "fail": fail, "emit": emit})


def processor(schema: Schema, subscription: str, db: Database | None = None) -> InboxProcessor:
    effects = schema.effects

    def handler(session, event: IncomingEvent):
        session.execute(effects.insert().values(subscription=subscription, event_id=event.event_id))
        if event.payload["fail"]:
            raise RuntimeError(f"cannot handle {event.event_id}")
        if not event.payload["emit"]:
            return None
        return [OutgoingEvent(topic="marketing.eventos", event_type="AfiliadoValidado", key=event.key,
                              payload={"id": event.event_id, "timestamp": utcnow()},
                              event_id=str(uuid.uuid5(uuid.NAMESPACE_URL, f"{subscription}/{event.event_id}")))]

    return InboxProcessor(db or schema.db, schema.inbox_t, schema.outbox, subscription,
                          {"AfiliadoValidado": handler})


def effect_counts(schema: Schema, subscription: str | None = None) -> Counter[str]:
    query = select(schema.effects.c.event_id)
    if subscription:
        query = query.where(schema.effects.c.subscription == subscription)
    with schema.db.transaction() as s:
        return Counter(s.scalars(query))


def inbox_ids(schema: Schema, subscription: str) -> list[str]:
    with schema.db.transaction() as s:
        return s.scalars(select(schema.inbox_t.c.event_id).where(schema.inbox_t.c.subscription == subscription)).all()


def outbox_by_cause(schema: Schema) -> Counter[str]:
    return Counter(r["causation_id"] for r in outbox_rows(schema).values())


def test_inbox_same_event_twice_applies_once(schema):
    p = processor(schema, "marketing-consumer")
    event = incoming()
    assert p.process([event]) == {event.event_id: None}
    assert p.process([event]) == {event.event_id: None}  # redelivery: acknowledged, skipped
    assert effect_counts(schema) == {event.event_id: 1}
    assert inbox_ids(schema, "marketing-consumer") == [event.event_id]
    assert (p.totals.processed, p.totals.duplicates) == (1, 1)

    rows = list(outbox_rows(schema).values())
    assert len(rows) == 1
    assert rows[0]["causation_id"] == event.event_id and rows[0]["correlation_id"] == event.correlation_id
    assert rows[0]["status"] == PENDING


def test_inbox_batch_with_duplicates_applies_each_once(schema):
    p = processor(schema, "marketing-consumer")
    a, b, c = incoming(), incoming(emit=False), incoming()
    p.process([a])
    verdicts = p.process([a, b, b, c, a, c])  # one already done, the rest twice in the batch
    assert verdicts == {a.event_id: None, b.event_id: None, c.event_id: None}
    assert effect_counts(schema) == {a.event_id: 1, b.event_id: 1, c.event_id: 1}
    assert sorted(inbox_ids(schema, "marketing-consumer")) == sorted([a.event_id, b.event_id, c.event_id])
    assert outbox_by_cause(schema) == {a.event_id: 1, c.event_id: 1}  # b emits nothing
    assert (p.totals.processed, p.totals.duplicates) == (3, 4)  # a twice, b once, c once


def test_inbox_failing_handler_in_a_batch_spares_the_others(schema):
    p = processor(schema, "marketing-consumer")
    good = [incoming() for _ in range(4)]
    bad = incoming(fail=True)
    batch = [good[0], good[1], bad, good[2], good[3]]
    verdicts = p.process(batch)
    assert all(verdicts[e.event_id] is None for e in good)
    assert verdicts[bad.event_id] is not None and "RuntimeError" in verdicts[bad.event_id]
    assert effect_counts(schema) == {e.event_id: 1 for e in good}  # bad's partial effect rolled back
    assert sorted(inbox_ids(schema, "marketing-consumer")) == sorted(e.event_id for e in good)
    assert outbox_by_cause(schema) == {e.event_id: 1 for e in good}

    # Redelivered later, the bad one fails again on its own and still leaves nothing behind.
    again = p.process([bad, good[0]])
    assert again[good[0].event_id] is None and again[bad.event_id] is not None
    assert effect_counts(schema) == {e.event_id: 1 for e in good}
    assert bad.event_id not in inbox_ids(schema, "marketing-consumer")
    assert bad.event_id not in outbox_by_cause(schema)

    single = p.process([bad])
    assert single[bad.event_id] is not None
    assert bad.event_id not in effect_counts(schema)


def test_inbox_wakes_the_relay_only_after_a_commit_that_wrote_the_outbox(schema):
    """The relay's wake-up (`after_commit`) follows a commit with events to publish, one by one or
    in a batch; a batch that emitted nothing, or only redeliveries, sends it to look for nothing."""
    wakes = []
    p = processor(schema, "marketing-consumer")
    p.after_commit = lambda: wakes.append(len(outbox_rows(schema)))
    quiet = [incoming(emit=False) for _ in range(3)]
    p.process(quiet)
    p.process(quiet[:1])
    assert wakes == []
    p.process([incoming()])
    p.process([incoming(emit=False), incoming(), incoming(emit=False)])
    assert wakes == [1, 2]  # each after its commit: the rows were there to publish
    p.process([incoming(fail=True), incoming(emit=False)])  # one by one: the failure emits nothing
    assert wakes == [1, 2]


def test_inbox_an_event_type_no_handler_takes_is_acknowledged_without_a_trace(schema):
    """No handler: nothing to do once, so no inbox row and no transaction; the events around it in
    its batch are handled as usual."""
    p = processor(schema, "marketing-consumer")

    def other() -> IncomingEvent:
        return IncomingEvent(topic="afiliados.eventos", subscription="x", event_id=new_id(),
                             event_type="AfiliadoRechazado", schema_version=1, key="k", occurred_at=utcnow(),
                             correlation_id=new_id(), causation_id=new_id(), payload={})
    first = other()
    statements = []
    sa_event.listen(schema.db.engine, "before_cursor_execute", lambda *args: statements.append(args[2]))
    assert p.process([first]) == {first.event_id: None}
    assert statements == [] and inbox_ids(schema, "marketing-consumer") == []
    handled, second = incoming(), other()
    assert p.process([first, handled, second]) == {first.event_id: None, handled.event_id: None, second.event_id: None}
    assert inbox_ids(schema, "marketing-consumer") == [handled.event_id]
    assert (p.totals.ignored, p.totals.processed) == (3, 1)


def deliver_until_done(p: InboxProcessor, batch: list[IncomingEvent], rounds: int = 20) -> int:
    """At-least-once delivery: nacked messages come back until acknowledged. Returns nacks seen."""
    nacks = 0
    pending = batch
    for _ in range(rounds):
        verdicts = p.process(pending)
        retry = {i for i, error in verdicts.items() if error is not None}
        nacks += len(retry)
        pending = [e for e in pending if e.event_id in retry]
        if not pending:
            return nacks
    raise AssertionError(f"still failing after {rounds} deliveries: {p.process(pending)}")


def test_inbox_two_processors_racing_apply_each_effect_once(schema):
    events = [incoming(emit=i % 3 != 0) for i in range(240)]
    processors = [processor(schema, "marketing-consumer", schema.another_db()) for _ in range(2)]
    barrier = threading.Barrier(2)

    def consume(p: InboxProcessor, order: list[IncomingEvent], size: int) -> Callable[[], None]:
        def run():
            barrier.wait()
            for start in range(0, len(order), size):
                deliver_until_done(p, order[start:start + size])
                time.sleep(0.003)  # a window for the other writer (SQLite's busy wait would starve it)
        return run

    # Same events, one in order and one reversed with another batch size: overlapping batches
    # in opposite orders (the worst case for lock ordering on MariaDB).
    run_threads([consume(processors[0], events, 20), consume(processors[1], events[::-1], 15)])

    assert effect_counts(schema) == {e.event_id: 1 for e in events}
    assert Counter(inbox_ids(schema, "marketing-consumer")) == {e.event_id: 1 for e in events}
    assert outbox_by_cause(schema) == {e.event_id: 1 for e in events if e.payload["emit"]}
    # Every delivery was acknowledged once by each processor: processed by one, a duplicate for the other.
    assert sum(p.totals.processed for p in processors) == len(events)
    assert sum(p.totals.duplicates for p in processors) == len(events)


def test_inbox_different_subscriptions_each_apply_their_own_effect_once(schema):
    events = [incoming() for _ in range(60)]
    subscriptions = ["audit-consumer", "marketing-consumer"]
    processors = [processor(schema, sub, schema.another_db()) for sub in subscriptions]
    barrier = threading.Barrier(2)

    def consume(p: InboxProcessor) -> Callable[[], None]:
        def run():
            barrier.wait()
            for _ in range(2):  # everything delivered twice
                for start in range(0, len(events), 25):
                    deliver_until_done(p, events[start:start + 25])
        return run

    run_threads([consume(p) for p in processors])
    for sub in subscriptions:
        assert effect_counts(schema, sub) == {e.event_id: 1 for e in events}
        assert Counter(inbox_ids(schema, sub)) == {e.event_id: 1 for e in events}
    assert outbox_by_cause(schema) == {e.event_id: 2 for e in events}  # one per subscription
    assert all(p.totals.processed == 60 and p.totals.duplicates == 60 for p in processors)


# --------------------------------------------------------------------------------------------
# 5. Event store
# --------------------------------------------------------------------------------------------


def detected(conversion_id: str, value: str, *, order_id: str | None = "ord-1", currency: str = "USD") -> dict:
    return {
        "conversion_id": conversion_id, "affiliate_id": new_id(), "campaign_id": new_id(), "user_id": "u-1",
        "conversion_value": Decimal(value), "conversion_type": "sale",
        "timestamp": datetime(2026, 3, 29, 1, 59, 59, 999999, tzinfo=timezone.utc),
        "order_id": order_id, "currency": currency,
    }


def test_event_store_round_trip_keeps_money_and_time(schema, registry):
    store = EventStore(schema.store_t, registry, "conversion")
    stream = new_id()
    madrid = timezone(timedelta(hours=2))
    occurred = datetime(2026, 7, 1, 12, 30, 45, 123456, tzinfo=madrid)
    payloads = [detected(stream, "12345678901.23"), detected(stream, "0.01", order_id=None, currency="EUR")]
    correlation = new_id()
    with schema.db.transaction() as s:
        appended = store.append(s, stream, 0, [NewEvent("ConversionDetected", p, occurred) for p in payloads],
                                correlation)
    assert [e.version for e in appended] == [1, 2]

    with schema.db.transaction() as s:
        loaded = store.load(s, stream)
    assert [e.version for e in loaded] == [1, 2]
    assert [e.payload for e in loaded] == payloads
    assert [e.event_id for e in loaded] == [e.event_id for e in appended]
    assert all(e.schema_version == registry.latest_version("ConversionDetected") for e in loaded)
    assert all(e.correlation_id == correlation for e in loaded)
    value = loaded[0].payload["conversion_value"]
    assert isinstance(value, Decimal) and str(value) == "12345678901.23"
    assert loaded[0].payload["timestamp"].tzinfo is not None
    assert loaded[0].payload["timestamp"].microsecond == 999999
    assert loaded[0].occurred_at == occurred
    assert loaded[0].occurred_at.utcoffset() == timedelta(0) and loaded[0].occurred_at.microsecond == 123456

    with schema.db.transaction() as s:
        assert [e.event_id for e in store.all_events(s, batch=1)] == [e.event_id for e in appended]


def test_event_store_stale_version_conflicts_and_transaction_stays_usable(schema, registry):
    store = EventStore(schema.store_t, registry, "conversion")
    stream = new_id()
    at = utcnow()
    first = [NewEvent("ConversionDetected", detected(stream, "10.00"), at, event_id=new_id()) for _ in range(2)]
    with schema.db.transaction() as s:
        store.append(s, stream, 0, first, "c")

    late = [NewEvent("ConversionDetected", detected(stream, "99.99"), at, event_id=new_id()) for _ in range(3)]
    with schema.db.transaction() as s:
        s.execute(schema.effects.insert().values(subscription="before", event_id="x"))
        with pytest.raises(ConcurrencyConflict):
            store.append(s, stream, 1, late, "c")  # versions 2..4: 2 is taken, 3 and 4 are not
        # Nothing of the rejected batch is visible, not even its free versions.
        assert [e.event_id for e in store.load(s, stream)] == [e.event_id for e in first]
        # The transaction goes on: reload, decide again, append, and other writes still commit.
        retried = store.append(s, stream, 2, late, "c")
        s.execute(schema.effects.insert().values(subscription="after", event_id="y"))
    assert [e.version for e in retried] == [3, 4, 5]

    with schema.db.transaction() as s:
        loaded = store.load(s, stream)
        assert [e.version for e in loaded] == [1, 2, 3, 4, 5]
        assert [e.event_id for e in loaded] == [e.event_id for e in first + late]
        assert sorted(s.scalars(select(schema.effects.c.subscription))) == ["after", "before"]

    with schema.db.transaction() as s:
        with pytest.raises(ConcurrencyConflict):
            store.append(s, stream, 0, [NewEvent("ConversionDetected", detected(stream, "1.00"), at)], "c")
    with schema.db.transaction() as s:
        assert len(store.load(s, stream)) == 5

    # An append is all or nothing even when the clash is on a later row (here an event id already
    # stored): the free version 6 must not be left behind in the transaction.
    fresh = NewEvent("ConversionDetected", detected(stream, "5.00"), at, event_id=new_id())
    with schema.db.transaction() as s:
        with pytest.raises(ConcurrencyConflict):
            store.append(s, stream, 5, [fresh, late[0]], "c")
        assert [e.version for e in store.load(s, stream)] == [1, 2, 3, 4, 5]
        store.append(s, stream, 5, [fresh], "c")
    with schema.db.transaction() as s:
        assert [e.event_id for e in store.load(s, stream)] == [e.event_id for e in first + late + [fresh]]


def test_event_store_concurrent_writers_retry_on_conflict(schema, registry):
    """Optimistic concurrency: writers reload and retry; the stream stays gapless, nothing lost."""
    store = EventStore(schema.store_t, registry, "conversion")
    stream = new_id()
    per_writer, writers = 8, 3
    conflicts = Counter()
    written: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(writers)

    def writer(n: int) -> Callable[[], None]:
        db = schema.another_db()

        def run():
            barrier.wait()
            for i in range(per_writer):
                event = NewEvent("ConversionDetected", detected(stream, f"{n}.{i:02d}"), utcnow(), event_id=new_id())
                for _ in range(200):
                    try:
                        with db.transaction() as s:
                            version = len(store.load(s, stream))
                            store.append(s, stream, version, [event], "c")
                        break
                    except ConcurrencyConflict:
                        conflicts[n] += 1
                else:
                    raise AssertionError("writer starved")
                with lock:
                    written.append(event.event_id)
        return run

    run_threads([writer(n) for n in range(writers)])
    with schema.db.transaction() as s:
        loaded = store.load(s, stream)
    assert [e.version for e in loaded] == list(range(1, per_writer * writers + 1))
    assert sorted(e.event_id for e in loaded) == sorted(written)


def test_event_store_upcasts_v1_events_on_load(schema, registry):
    store = EventStore(schema.store_t, registry, "conversion")
    stream = new_id()
    v1 = detected(stream, "42.50")
    del v1["order_id"], v1["currency"]
    data, version = registry.encode("ConversionDetected", v1, version=1)
    assert version == 1
    at = utcnow()
    with schema.db.transaction() as s:
        s.execute(schema.store_t.insert().values(
            stream_id=stream, version=1, event_id=new_id(), stream_type="conversion", event_type="ConversionDetected",
            schema_version=1, payload=data, occurred_at=at, recorded_at=at, correlation_id="c"))
    with schema.db.transaction() as s:
        [loaded] = store.load(s, stream)
        # New events go on after the old one, at the newest schema version.
        store.append(s, stream, 1, [NewEvent("ConversionDetected", detected(stream, "1.00"), at)], "c")
    assert loaded.schema_version == 1
    assert loaded.payload == {**v1, "order_id": None, "currency": "EUR"}
    with schema.db.transaction() as s:
        assert [e.schema_version for e in store.load(s, stream)] == [1, 2]


# --------------------------------------------------------------------------------------------
# 6. Column types and upsert_add
# --------------------------------------------------------------------------------------------

BIGINT_CENTS = Decimal(2**63 - 1).scaleb(-2)  # the largest amount ScaledDecimal(2) can hold


def test_scaled_decimal_exact_money_and_sums(schema):
    values = [Decimal("12345678901.23"), Decimal("0.10"), Decimal("-0.01"), Decimal("7"), Decimal("1E+2"),
              BIGINT_CENTS, -BIGINT_CENTS]
    group, dimes, null = new_id(), new_id(), new_id()
    with schema.db.transaction() as s:
        s.execute(schema.money.insert(), [{"grp": group, "amount": v} for v in values])
        s.execute(schema.money.insert(), [{"grp": dimes, "amount": Decimal("0.10")} for _ in range(1000)])
        s.execute(schema.money.insert().values(grp=null, amount=None))
    money = schema.money.c
    with schema.db.transaction() as s:
        back = s.scalars(select(money.amount).where(money.grp == group).order_by(money.id)).all()
        assert back == values
        assert all(isinstance(v, Decimal) for v in back)
        assert str(back[0]) == "12345678901.23"
        # 1000 x 0.10 is exactly 100.00 in SQL (it would not be with floats).
        total = s.scalar(select(func.sum(money.amount)).where(money.grp == dimes))
        assert total == Decimal("100.00") and isinstance(total, Decimal)
        # Comparisons against the column bind the literal through the type (units, not euros).
        small = s.scalar(select(func.sum(money.amount)).where(
            money.grp == group, money.amount < Decimal(10**12), money.amount > -Decimal(10**12)))
        assert small == Decimal("12345679008.32")
        assert s.scalar(select(money.amount).where(money.grp == null)) is None


# Eight of these sum without leaving BIGINT in any order (SQLite's SUM raises on overflow).
SUMMABLE = (BIGINT_CENTS / 8).quantize(Decimal("0.01"), rounding="ROUND_DOWN")


@HYPOTHESIS
@given(amounts=st.lists(st.decimals(min_value=-SUMMABLE, max_value=SUMMABLE, places=2,
                                    allow_nan=False, allow_infinity=False), min_size=1, max_size=8),
       rate=st.decimals(min_value=0, max_value=100, places=4, allow_nan=False, allow_infinity=False))
def test_scaled_decimal_round_trip_property(schema, amounts, rate):
    group = new_id()
    with schema.db.transaction() as s:
        s.execute(schema.money.insert(), [{"grp": group, "amount": a, "rate": rate} for a in amounts])
    with schema.db.transaction() as s:
        rows = s.execute(select(schema.money.c.amount, schema.money.c.rate).where(schema.money.c.grp == group)
                         .order_by(schema.money.c.id)).all()
        assert [r.amount for r in rows] == amounts
        assert all(r.rate == rate for r in rows)
        total = s.scalar(select(func.sum(schema.money.c.amount)).where(schema.money.c.grp == group))
        assert total == sum(amounts, Decimal(0))


def _rejected(schema: Schema, **values) -> None:
    group = new_id()
    with pytest.raises((StatementError, ValueError)) as raised:
        with schema.db.transaction() as s:
            s.execute(schema.money.insert().values(grp=group, **values))
    error = raised.value
    assert isinstance(getattr(error, "orig", error), ValueError), repr(error)
    with schema.db.transaction() as s:
        assert s.scalar(select(func.count()).select_from(schema.money).where(schema.money.c.grp == group)) == 0


@pytest.mark.parametrize("amount", ["0.001", "1.005", "-12345678901.239", "0.0000001",
                                    # more significant digits than the default decimal context keeps
                                    "1.00000000000000000000000000001", "12345678901.2300000000000000000000001"])
def test_scaled_decimal_rejects_more_places_than_its_scale(schema, amount):
    _rejected(schema, amount=Decimal(amount))


def test_scaled_decimal_scale_four_rejects_five_places(schema):
    _rejected(schema, rate=Decimal("12.34565"))
    with schema.db.transaction() as s:
        s.execute(schema.money.insert().values(grp="ok", rate=Decimal("12.3456"), amount=Decimal("12.30000")))
    with schema.db.transaction() as s:
        row = s.execute(select(schema.money.c.rate, schema.money.c.amount).where(schema.money.c.grp == "ok")).one()
    assert row == (Decimal("12.3456"), Decimal("12.30"))  # trailing zeros are not extra places


@HYPOTHESIS
@given(digits=st.integers(min_value=-10**32, max_value=10**32).filter(lambda n: n % 10 != 0),
       places=st.integers(min_value=3, max_value=34))
def test_scaled_decimal_rejection_property(schema, digits, places):
    amount = Decimal(f"{digits}E-{places}")  # exactly `places` decimals, the last one non-zero
    _rejected(schema, amount=amount)


@HYPOTHESIS
@given(moment=st.datetimes(min_value=datetime(1970, 1, 2), max_value=datetime(2999, 12, 31),
                           timezones=st.sampled_from([timezone.utc, timezone(timedelta(hours=5, minutes=30)),
                                                      timezone(timedelta(hours=-8)),
                                                      timezone(timedelta(hours=14))])))
def test_utc_datetime_round_trip_property(schema, moment):
    group = new_id()
    with schema.db.transaction() as s:
        s.execute(schema.money.insert().values(grp=group, at=moment))
    with schema.db.transaction() as s:
        back = s.scalar(select(schema.money.c.at).where(schema.money.c.grp == group))
    assert back == moment
    assert back.tzinfo == timezone.utc
    assert back.microsecond == moment.microsecond


def test_utc_datetime_compares_instants_and_refuses_naive(schema):
    utc_noon = datetime(2026, 6, 1, 12, 0, 0, 1, tzinfo=timezone.utc)
    with schema.db.transaction() as s:
        s.execute(schema.money.insert().values(grp="t", at=utc_noon))
    plus_two = timezone(timedelta(hours=2))
    with schema.db.transaction() as s:
        # 14:00:00.000000 at +02:00 is one microsecond before the stored instant.
        found = s.scalars(select(schema.money.c.at).where(
            schema.money.c.at > datetime(2026, 6, 1, 14, 0, 0, 0, tzinfo=plus_two))).all()
        assert found == [utc_noon]
        assert s.scalars(select(schema.money.c.at).where(
            schema.money.c.at > datetime(2026, 6, 1, 14, 0, 0, 1, tzinfo=plus_two))).all() == []
    with pytest.raises((StatementError, ValueError)):
        with schema.db.transaction() as s:
            s.execute(schema.money.insert().values(grp="naive", at=datetime(2026, 6, 1, 12, 0)))
    with schema.db.transaction() as s:
        assert s.scalar(select(func.count()).select_from(schema.money).where(schema.money.c.grp == "naive")) == 0


def test_upsert_add_inserts_then_increments(schema):
    today = date(2026, 5, 1)
    with schema.db.transaction() as s:
        upsert_add(s, schema.counters, {"dia": today, "key": "a"}, {"n": 1, "total": Decimal("12345678901.23")})
    with schema.db.transaction() as s:
        upsert_add(s, schema.counters, {"dia": today, "key": "a"}, {"n": 2, "total": Decimal("0.77")})
        upsert_add(s, schema.counters, {"dia": today, "key": "b"}, {"n": 5, "total": Decimal("-1.50")})
        upsert_add(s, schema.counters, {"dia": today + timedelta(days=1), "key": "a"}, {"n": 1, "total": Decimal(0)})
    with schema.db.transaction() as s:
        rows = {(r.dia, r.key): (r.n, r.total) for r in s.execute(select(schema.counters))}
    assert rows == {
        (today, "a"): (3, Decimal("12345678902.00")),
        (today, "b"): (5, Decimal("-1.50")),
        (today + timedelta(days=1), "a"): (1, Decimal("0.00")),
    }


def test_upsert_add_concurrent_increments_sum_exactly(schema):
    today = date(2026, 5, 1)
    threads, per_thread = 4, 40
    keys = ["hot", "warm"]

    def amount(t: int, i: int) -> Decimal:
        return Decimal(t * 1000 + i).scaleb(-2) + Decimal("1000000000.01")

    barrier = threading.Barrier(threads)

    def worker(t: int) -> Callable[[], None]:
        db = schema.another_db()

        def run():
            barrier.wait()
            for i in range(per_thread):
                with db.transaction() as s:
                    upsert_add(s, schema.counters, {"dia": today, "key": keys[i % 2]}, {"n": 1, "total": amount(t, i)})
        return run

    run_threads([worker(t) for t in range(threads)])
    expected = {k: (0, Decimal(0)) for k in keys}
    for t in range(threads):
        for i in range(per_thread):
            n, total = expected[keys[i % 2]]
            expected[keys[i % 2]] = (n + 1, total + amount(t, i))
    with schema.db.transaction() as s:
        rows = {r.key: (r.n, r.total) for r in s.execute(select(schema.counters))}
    assert rows == expected
