"""The messaging kernel against the real embedded broker (pulsar-lite) and a real database.

Outbox → OutboxRelay → PulsarBroker → Key_Shared ConsumerWorker → InboxProcessor → effect
rows, with the broker's own habits left in (it delivers duplicates). A failing message is
retried by the worker and dead-lettered when it keeps failing. Every wait is a bounded poll
against a deadline; the assertions are made on what the database and the broker hold
afterwards.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pulsar
import pytest
from conftest import unique
from sqlalchemy import Column, Integer, MetaData, String, Table, func, select, update

from alpes.kernel import embedded_broker
from alpes.kernel.broker import PulsarBroker
from alpes.kernel.consumer import ConsumerWorker
from alpes.kernel.db import Database
from alpes.kernel.inbox import InboxProcessor, inbox_table
from alpes.kernel.messages import IncomingEvent, OutgoingEvent, utcnow
from alpes.kernel.outbox import (
    PENDING,
    SENT,
    Outbox,
    OutboxRelay,
    PendingMessage,
    outbox_table,
)

EVENT = "AfiliadoValidado"


# -- helpers --------------------------------------------------------------------------------

def wait_until(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    """Poll `predicate` until it holds; fail the test with `what` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout}s waiting for: {what}")
        time.sleep(interval)


def quiet_client(url: str) -> pulsar.Client:
    return pulsar.Client(url, operation_timeout_seconds=10,
                         logger=pulsar.ConsoleLogger(pulsar.LoggerLevel.Error))


def validado(topic: str, key: str, **kwargs) -> OutgoingEvent:
    return OutgoingEvent(topic, EVENT, key, {"id": key, "timestamp": utcnow()}, **kwargs)


def drain(consumer: pulsar.Consumer, expected: int | set[str], timeout: float) -> list[pulsar.Message]:
    """Receive (and ack) messages until `expected` distinct event ids (a count, or these very
    ids) were seen or the deadline passed; returns the first copy of each id seen."""
    seen: dict[str, pulsar.Message] = {}

    def done() -> bool:
        return expected <= seen.keys() if isinstance(expected, set) else len(seen) >= expected

    deadline = time.monotonic() + timeout
    while not done() and time.monotonic() < deadline:
        try:
            message = consumer.receive(timeout_millis=200)
        except pulsar.Timeout:
            continue
        consumer.acknowledge(message)
        seen.setdefault(message.properties().get("event_id", f"?{len(seen)}"), message)
    return list(seen.values())


@dataclass
class Kit:
    """A service's worth of messaging parts over a tiny test-only schema."""

    db: Database
    outbox: Outbox
    effects: Table
    broker_url: str
    registry: object
    _brokers: list[PulsarBroker] = field(default_factory=list)
    _workers: list[ConsumerWorker] = field(default_factory=list)
    _relays: list[OutboxRelay] = field(default_factory=list)
    _clients: list[pulsar.Client] = field(default_factory=list)

    def broker(self, subscription_type: str = "failover") -> PulsarBroker:
        broker = PulsarBroker(self.broker_url, producer_name=f"test-{uuid.uuid4().hex[:6]}",
                              subscription_type=subscription_type)
        self._brokers.append(broker)
        return broker

    def client(self) -> pulsar.Client:
        client = quiet_client(self.broker_url)
        self._clients.append(client)
        return client

    def relay(self, broker: PulsarBroker | None = None) -> OutboxRelay:
        relay = OutboxRelay(self.db, self.outbox.table, broker or self.broker())
        self._relays.append(relay)
        return relay

    def add(self, events: list[OutgoingEvent]) -> None:
        with self.db.transaction() as session:
            self.outbox.add(session, events)

    def relay_all(self, relay: OutboxRelay) -> int:
        total = 0
        for _ in range(100):
            published, failed = relay.run_once()
            assert failed == 0, f"relay failed to publish {failed} messages"
            total += published
            if published == 0:
                return total
        raise AssertionError("outbox never drained")

    def worker(self, topic: str, subscription: str, handler, *, name: str = "w", broker: PulsarBroker | None = None,
               max_redeliveries: int = 5, on_dead_letter=None, batch_size: int = 200) -> tuple[InboxProcessor, ConsumerWorker]:
        processor = InboxProcessor(self.db, self.outbox.table.metadata.tables["inbox"], self.outbox, subscription,
                                   {EVENT: handler})
        worker = ConsumerWorker(broker or self.broker(), self.registry, topic, subscription, processor.process,
                                consumer_name=f"{name}-{uuid.uuid4().hex[:6]}", max_redeliveries=max_redeliveries,
                                on_dead_letter=on_dead_letter, batch_size=batch_size)
        self._workers.append(worker)
        return processor, worker

    def effect_rows(self) -> list[dict]:
        with self.db.engine.connect() as connection:
            return [dict(r) for r in connection.execute(select(self.effects).order_by(self.effects.c.id)).mappings()]

    def effect_count(self) -> int:
        with self.db.engine.connect() as connection:
            return connection.scalar(select(func.count()).select_from(self.effects))

    def outbox_rows(self) -> list[dict]:
        t = self.outbox.table
        with self.db.engine.connect() as connection:
            return [dict(r) for r in connection.execute(select(t).order_by(t.c.id)).mappings()]

    def close(self) -> None:
        for worker in self._workers:
            worker.stop()
        for relay in self._relays:
            relay.stop()
        for broker in self._brokers:
            broker.close()
        for client in self._clients:
            try:
                client.close()
            except Exception:
                pass
        self.db.dispose()


def build_kit(url: str, broker_url: str, registry) -> Kit:
    metadata = MetaData()
    outbox = outbox_table(metadata)
    inbox_table(metadata)
    # Deliberately NOT unique on event_id: a double effect must show up as two rows, not as
    # an integrity error that would only send the message around again.
    effects = Table(
        "effects", metadata,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("event_id", String(36), nullable=False, index=True),
        Column("key", String(80), nullable=False),
        Column("consumer", String(40), nullable=False, default=""),
        Column("seq", Integer),
    )
    db = Database(url)
    metadata.create_all(db.engine)
    return Kit(db=db, outbox=Outbox(outbox, registry), effects=effects, broker_url=broker_url, registry=registry)


@pytest.fixture
def kit(tmp_path: Path, broker_url: str, registry):
    k = build_kit(f"sqlite:///{tmp_path / 'kit.db'}", broker_url, registry)
    yield k
    k.close()


@pytest.fixture
def db_kit(db_url: str, broker_url: str, registry):
    """The same kit on each database backend (SQLite and MariaDB)."""
    k = build_kit(db_url, broker_url, registry)
    yield k
    k.close()


def recording_handler(kit: Kit, seen: list[IncomingEvent] | None = None, consumer: str = "", seq_of=None):
    def handle(session, event: IncomingEvent):
        if seen is not None:
            seen.append(event)
        session.execute(kit.effects.insert().values(
            event_id=event.event_id, key=event.key, consumer=consumer,
            seq=None if seq_of is None else seq_of[event.event_id]))
        return None
    return handle


# -- 1. round trip ----------------------------------------------------------------------------

def test_round_trip_outbox_relay_broker_inbox_exactly_once(db_kit: Kit):
    kit = db_kit
    topic, subscription = unique("t"), "svc-consumer"
    # A raw probe subscription sees exactly what travels on the wire (partition, key, properties).
    probe = kit.client().subscribe(f"persistent://public/default/{topic}", "probe",
                                   consumer_type=pulsar.ConsumerType.Shared,
                                   initial_position=pulsar.InitialPosition.Earliest)
    keys = [f"afiliado-{i}-{uuid.uuid4().hex[:6]}" for i in range(3)]
    correlation = str(uuid.uuid4())
    events: list[OutgoingEvent] = []
    for n in range(5):
        for i, key in enumerate(keys):
            if i == 0:  # caused by something upstream: correlation and causation carried as given
                events.append(validado(topic, key, correlation_id=correlation, causation_id=str(uuid.uuid4())))
            else:  # a root event: both default to its own id
                events.append(validado(topic, key))
    by_id = {e.event_id: e for e in events}
    kit.add(events)

    relay = kit.relay()
    assert kit.relay_all(relay) == len(events)
    rows = kit.outbox_rows()
    assert [r["status"] for r in rows] == [SENT] * len(events)
    assert all(r["sent_at"] is not None for r in rows)

    seen: list[IncomingEvent] = []
    processor, worker = kit.worker(topic, subscription, recording_handler(kit, seen))
    worker.start()
    wait_until(lambda: kit.effect_count() >= len(events), 30, f"{len(events)} effects")
    wait_until(lambda: worker.state.acked >= len(events), 10, "every message acknowledged")
    worker.stop()  # joins the loop: nothing is in flight when we count

    effects = kit.effect_rows()
    assert Counter(r["event_id"] for r in effects) == Counter({e: 1 for e in by_id})
    assert all(r["key"] == by_id[r["event_id"]].key for r in effects)
    assert processor.totals.processed == len(events)
    assert worker.state.nacked == 0 and worker.state.undecodable == 0 and worker.state.dead_lettered == 0

    first_seen = {}
    for event in seen:
        first_seen.setdefault(event.event_id, event)
    assert set(first_seen) == set(by_id)
    for event_id, incoming in first_seen.items():
        sent = by_id[event_id]
        assert incoming.topic == topic and incoming.subscription == subscription
        assert incoming.event_type == EVENT
        assert incoming.schema_version == kit.registry.latest_version(EVENT) == 1
        assert incoming.key == sent.key  # partition key = aggregate id
        assert incoming.correlation_id == (sent.correlation_id or sent.event_id)
        assert incoming.causation_id == (sent.causation_id or sent.event_id)
        assert incoming.occurred_at == sent.occurred_at
        assert incoming.payload == sent.payload  # Avro round trip, aware UTC timestamp included

    # On the wire: properties as the contract says, and one partition per aggregate id.
    wire = drain(probe, len(events), 20)
    assert {m.properties()["event_id"] for m in wire} == set(by_id)
    partitions_of_key: dict[str, set[str]] = defaultdict(set)
    for message in wire:
        props = message.properties()
        sent = by_id[props["event_id"]]
        assert message.partition_key() == sent.key
        assert props["event_type"] == EVENT and props["schema_version"] == "1"
        assert props["correlation_id"] == (sent.correlation_id or sent.event_id)
        assert props["causation_id"] == (sent.causation_id or sent.event_id)
        assert message.event_timestamp() == int(sent.occurred_at.timestamp() * 1000)
        assert message.topic_name().startswith(f"persistent://public/default/{topic}-partition-")
        partitions_of_key[sent.key].add(message.topic_name())
    assert all(len(p) == 1 for p in partitions_of_key.values()), partitions_of_key


# -- 2. duplicates ---------------------------------------------------------------------------

def test_same_event_published_many_times_has_one_effect(db_kit: Kit):
    kit = db_kit
    topic, subscription = unique("t"), "svc-consumer"
    event = validado(topic, f"afiliado-{uuid.uuid4().hex[:8]}")
    kit.add([event])
    broker = kit.broker()
    relay = kit.relay(broker)
    t = kit.outbox.table

    # The relay crashed after publishing but before marking sent, five times over.
    for attempt in range(5):
        assert kit.relay_all(relay) == 1
        if attempt < 4:
            with kit.db.transaction() as session:
                session.execute(update(t).where(t.c.event_id == event.event_id).values(status=PENDING))
    assert [r["status"] for r in kit.outbox_rows()] == [SENT]

    processor, worker = kit.worker(topic, subscription, recording_handler(kit))
    worker.start()
    wait_until(lambda: processor.totals.processed + processor.totals.duplicates >= 5, 30,
               "the five relayed copies consumed")

    # Then a burst of 50 more copies while the consumer is running.
    row = kit.outbox_rows()[0]
    message = PendingMessage(
        row_id=row["id"], event_id=row["event_id"], topic=row["topic"], event_type=row["event_type"],
        schema_version=row["schema_version"], partition_key=row["partition_key"], payload=row["payload"],
        occurred_at=row["occurred_at"], correlation_id=row["correlation_id"], causation_id=row["causation_id"])
    results = broker.publish([message] * 50)
    assert results == {event.event_id: None}
    wait_until(lambda: processor.totals.duplicates >= 54, 30, "54 duplicates recognised")
    wait_until(lambda: worker.state.acked >= 55, 10, "all 55 copies acknowledged")
    worker.stop()

    assert kit.effect_count() == 1
    assert processor.totals.processed == 1
    assert processor.totals.duplicates >= 54  # the broker may add duplicates of its own
    assert worker.state.nacked == 0
    with kit.db.engine.connect() as connection:
        inbox = connection.execute(select(kit.outbox.table.metadata.tables["inbox"])).mappings().all()
    assert [(r["subscription"], r["event_id"]) for r in inbox] == [(subscription, event.event_id)]


# -- 3. redelivery ---------------------------------------------------------------------------

def test_failing_handler_is_redelivered_and_its_effect_commits_once(kit: Kit):
    topic, subscription = unique("t"), "svc-consumer"
    failures_wanted = 3
    events = [validado(topic, f"afiliado-{i}-{uuid.uuid4().hex[:6]}") for i in range(10)]
    flaky = {e.event_id for e in events[::2]}
    attempts: Counter[str] = Counter()
    lock = threading.Lock()

    def handler(session, event: IncomingEvent):
        # The effect is written first; a raise afterwards must roll it back with the inbox row.
        session.execute(kit.effects.insert().values(event_id=event.event_id, key=event.key))
        with lock:
            attempts[event.event_id] += 1
            n = attempts[event.event_id]
        if event.event_id in flaky and n <= failures_wanted:
            raise RuntimeError(f"transient failure {n}")
        return None

    kit.add(events)
    assert kit.relay_all(kit.relay()) == len(events)
    processor, worker = kit.worker(topic, subscription, handler, max_redeliveries=20)
    worker.start()
    wait_until(lambda: kit.effect_count() >= len(events) and processor.totals.processed >= len(events), 40,
               "every event's effect committed")
    worker.stop()

    effects = kit.effect_rows()
    assert Counter(r["event_id"] for r in effects) == Counter({e.event_id: 1 for e in events})
    assert all(attempts[e] > failures_wanted for e in flaky), attempts  # really retried
    # Each flaky event failed `failures_wanted` times; a failure inside a batch attempt (which
    # then falls back to one by one) is not a verdict the worker sees, hence the minus one.
    assert worker.state.nacked >= len(flaky) * (failures_wanted - 1)
    assert worker.state.dead_lettered == 0
    assert processor.totals.processed == len(events)


# -- 4. dead letter --------------------------------------------------------------------------

def test_poison_and_always_failing_messages_go_to_the_dead_letter_topic(kit: Kit):
    topic, subscription = unique("t"), "svc-consumer"
    broker = kit.broker()
    client = kit.client()
    dlq = client.subscribe(broker.dead_letter_topic(topic, subscription), "dlq-probe",
                           consumer_type=pulsar.ConsumerType.Shared,
                           initial_position=pulsar.InitialPosition.Earliest)

    bad = validado(topic, f"bad-{uuid.uuid4().hex[:8]}")
    good_before = [validado(topic, f"good-{i}-{uuid.uuid4().hex[:6]}") for i in range(3)]
    good_after = [validado(topic, f"late-{i}-{uuid.uuid4().hex[:6]}") for i in range(3)]
    handled: Counter[str] = Counter()
    lock = threading.Lock()

    def handler(session, event: IncomingEvent):
        with lock:
            handled[event.event_id] += 1
        session.execute(kit.effects.insert().values(event_id=event.event_id, key=event.key))
        if event.event_id == bad.event_id:
            raise RuntimeError("this one never works")
        return None

    notices: list[tuple[IncomingEvent | None, dict, str]] = []

    def on_dead_letter(event, properties, error):
        with lock:
            notices.append((event, dict(properties), error))

    max_redeliveries = 2
    kit.add([bad, *good_before])
    relay = kit.relay(broker)
    assert kit.relay_all(relay) == 4
    processor, worker = kit.worker(topic, subscription, handler, broker=broker,
                                   max_redeliveries=max_redeliveries, on_dead_letter=on_dead_letter)
    worker.start()

    dead = drain(dlq, 1, 30)
    assert [m.properties()["event_id"] for m in dead] == [bad.event_id]
    assert dead[0].data() == kit.outbox_rows()[0]["payload"]
    assert dead[0].properties()["event_type"] == EVENT
    assert "never works" in dead[0].properties()["dead_letter_error"]
    assert dead[0].partition_key() == bad.key
    assert handled[bad.event_id] >= max_redeliveries + 1
    wait_until(lambda: any(n[0] is not None and n[0].event_id == bad.event_id for n in notices), 10,
               "on_dead_letter called for the failing event")

    # Poison: a raw producer, bad Avro under a known type, and a type nobody knows.
    producer = client.create_producer(broker.topic(topic), block_if_queue_full=True)
    garbage_id, unknown_id = str(uuid.uuid4()), str(uuid.uuid4())
    now = utcnow().isoformat()
    producer.send(b"garbage-not-avro", properties={
        "event_type": EVENT, "schema_version": "1", "event_id": garbage_id, "occurred_at": now},
        partition_key="poison-1")
    producer.send(b"\x00\x00", properties={
        "event_type": "EventoQueNoExiste", "schema_version": "1", "event_id": unknown_id, "occurred_at": now},
        partition_key="poison-2")
    producer.close()
    kit.add(good_after)
    assert kit.relay_all(relay) == 3

    dead = {m.properties()["event_id"]: m for m in drain(dlq, {garbage_id, unknown_id}, 30)}
    assert {garbage_id, unknown_id} <= dead.keys() <= {bad.event_id, garbage_id, unknown_id}
    assert dead[garbage_id].data() == b"garbage-not-avro" and dead[unknown_id].data() == b"\x00\x00"
    assert dead[unknown_id].partition_key() == "poison-2"
    good = [e.event_id for e in good_before + good_after]
    wait_until(lambda: processor.totals.processed >= len(good), 20, "the good messages after the bad ones")
    wait_until(lambda: {n[1].get("event_id") for n in notices if n[0] is None} >= {garbage_id, unknown_id}, 10,
               "on_dead_letter called for both poison messages")
    worker.stop()

    effects = Counter(r["event_id"] for r in kit.effect_rows())
    assert effects == Counter({e: 1 for e in good})  # the failing handler's writes never committed
    assert processor.totals.processed == len(good)
    assert worker.state.undecodable >= 2  # dead-lettered at once: decoding again cannot help
    assert worker.state.dead_lettered >= 3
    # Nothing else reached the dead-letter topic.
    try:
        extra = dlq.receive(timeout_millis=500)
    except pulsar.Timeout:
        extra = None
    assert extra is None or extra.properties()["event_id"] in {bad.event_id, garbage_id, unknown_id}


# -- 5. per-key order with two consumers -----------------------------------------------------

def test_two_key_shared_consumers_keep_per_key_order(kit: Kit):
    topic, subscription = unique("t"), "svc-consumer"
    keys = [f"afiliado-{k:02d}-{uuid.uuid4().hex[:6]}" for k in range(20)]
    per_key = 30
    seq_of: dict[str, int] = {}
    batches: list[list[OutgoingEvent]] = []
    for seq in range(per_key):
        batch = []
        for key in keys:
            event = validado(topic, key)
            seq_of[event.event_id] = seq
            batch.append(event)
        batches.append(batch)

    workers = []
    processors = []
    for name in ("one", "two"):
        processor, worker = kit.worker(topic, subscription, recording_handler(kit, consumer=name, seq_of=seq_of),
                                       name=name, batch_size=50, broker=kit.broker("key_shared"))
        worker.start()
        workers.append(worker)
        processors.append(processor)
    # pulsar-lite 0.2.0 refuses a second client's Key_Shared consumer whose client-side
    # consumer id equals one already in the dispatcher (both clients count from 0): the first
    # subscribe of the second worker times out (10 s) and its retry gets through.
    wait_until(lambda: all(w.connected() for w in workers), 40, "both consumers subscribed")

    relay = kit.relay()
    relay.start()
    for batch in batches:  # thirty transactions, the relay running alongside
        kit.add(batch)
        relay.wake()
    total = len(keys) * per_key
    wait_until(lambda: kit.effect_count() >= total and sum(p.totals.processed for p in processors) >= total, 60,
               f"{total} effects")
    relay.stop()
    for worker in workers:
        worker.stop()

    effects = kit.effect_rows()  # ordered by autoincrement id = commit order
    assert Counter(r["event_id"] for r in effects) == Counter({e: 1 for e in seq_of})
    arrival: dict[str, list[int]] = defaultdict(list)
    for row in effects:
        arrival[row["key"]].append(row["seq"])
    out_of_order = {k: s for k, s in arrival.items() if s != list(range(per_key))}
    assert not out_of_order, f"per-key order broken for {len(out_of_order)} keys: {out_of_order}"
    by_consumer = Counter(r["consumer"] for r in effects)
    assert by_consumer["one"] > 0 and by_consumer["two"] > 0, by_consumer
    assert all(r["status"] == SENT for r in kit.outbox_rows())


def test_failover_standby_takes_over_in_order_and_exactly_once(kit: Kit):
    """The default subscription type: one active consumer per partition, the other instance on
    standby; when the active one leaves mid-stream, the standby continues where it stopped."""
    topic, subscription = unique("t"), "svc-consumer"
    keys = [f"conversion-{k:02d}-{uuid.uuid4().hex[:6]}" for k in range(10)]
    per_key = 20
    seq_of: dict[str, int] = {}
    batches = []
    for seq in range(per_key):
        batch = []
        for key in keys:
            event = validado(topic, key)
            seq_of[event.event_id] = seq
            batch.append(event)
        batches.append(batch)
    workers = {}
    processors = {}
    for name in ("one", "two"):
        processors[name], workers[name] = kit.worker(topic, subscription,
                                                     recording_handler(kit, consumer=name, seq_of=seq_of),
                                                     name=name, batch_size=20)
        workers[name].start()
    wait_until(lambda: all(w.connected() for w in workers.values()), 40, "both consumers subscribed")
    relay = kit.relay()
    for batch in batches[: per_key // 2]:
        kit.add(batch)
    kit.relay_all(relay)
    half = len(keys) * per_key // 2
    wait_until(lambda: kit.effect_count() >= half, 60, f"{half} effects")
    active = Counter(r["consumer"] for r in kit.effect_rows()).most_common(1)[0][0]
    workers[active].stop()  # the active instance leaves; the standby must take over
    for batch in batches[per_key // 2:]:
        kit.add(batch)
    kit.relay_all(relay)
    total = len(keys) * per_key
    wait_until(lambda: len({r["event_id"] for r in kit.effect_rows()}) >= total, 60, f"{total} effects")
    effects = kit.effect_rows()
    assert Counter(r["event_id"] for r in effects) == Counter({e: 1 for e in seq_of})
    arrival: dict[str, list[int]] = defaultdict(list)
    for row in effects:
        arrival[row["key"]].append(row["seq"])
    assert all(s == list(range(per_key)) for s in arrival.values()), arrival
    standby = "two" if active == "one" else "one"
    assert Counter(r["consumer"] for r in effects)[standby] > 0


# -- 6. provisioning -------------------------------------------------------------------------

def test_provisioning_sets_partition_counts_and_durable_subscriptions(tmp_path: Path):
    data = tmp_path / "broker"
    topics = {unique("a"): 4, unique("b"): 6, unique("c"): 8, unique("d"): 2}
    a = next(iter(topics))
    subscriptions = [(t, "sub-x") for t in topics] + [(a, "sub-y")]
    assert embedded_broker.provision_embedded(data, topics, subscriptions) is True
    assert embedded_broker.provision_embedded(data, topics, subscriptions) is False  # idempotent
    with pytest.raises(RuntimeError):  # a contract that changes a partition count is refused
        embedded_broker.provision_embedded(data, {**topics, a: 5}, subscriptions)

    port = embedded_broker.free_port()
    process = embedded_broker.start_broker_process(data, port, default_partitions=1)
    url = f"pulsar://127.0.0.1:{port}"
    client = quiet_client(url)
    try:
        assert embedded_broker.verify_partitions(url, topics) == topics
        fresh = unique("dlq-like")
        assert embedded_broker.verify_partitions(url, {fresh: 1}) == {fresh: 1}

        # Published before any consumer of sub-x / sub-y ever connected...
        producer = client.create_producer(f"persistent://public/default/{a}", block_if_queue_full=True)
        event_id = str(uuid.uuid4())
        producer.send(b"early", properties={"event_id": event_id}, partition_key="k")
        producer.close()
        # ...still delivered to each provisioned subscription. `Latest` would skip it if the
        # subscription were only being created now.
        for sub in ("sub-x", "sub-y"):
            consumer = client.subscribe(f"persistent://public/default/{a}", sub,
                                        consumer_type=pulsar.ConsumerType.KeyShared,
                                        initial_position=pulsar.InitialPosition.Latest)
            got = drain(consumer, 1, 15)
            assert [(m.properties().get("event_id"), m.data()) for m in got] == [(event_id, b"early")], sub
            consumer.close()
    finally:
        client.close()
        embedded_broker.stop_process(process)


class _BrokenProducer:
    """A producer the client left in a failed state: every send raises."""

    def __init__(self) -> None:
        self.closed = False

    def send_async(self, *args, **kwargs) -> None:
        raise pulsar.ProducerBlockedQuotaExceededError("producer is broken")

    def flush(self) -> None:
        raise AssertionError("nothing was handed to this producer: no flush expected")

    def close(self) -> None:
        self.closed = True


def test_a_broken_producer_is_replaced_so_the_outbox_does_not_wedge(kit: Kit):
    topic = unique("t")
    kit.add([validado(topic, f"afiliado-{uuid.uuid4().hex[:8]}")])
    broker = kit.broker()
    relay = kit.relay(broker)
    broken = _BrokenProducer()
    broker._producers[topic] = broken  # as if the client had cached a producer that can no longer send

    published, failed = relay.run_once()
    assert (published, failed) == (0, 1)
    assert broken.closed and broker._producers.get(topic) is not broken
    assert [r["status"] for r in kit.outbox_rows()] == [PENDING]
    assert "producer is broken" in kit.outbox_rows()[0]["last_error"]

    # The next attempt builds a fresh producer and the row goes out.
    assert relay.run_once() == (1, 0)
    assert [r["status"] for r in kit.outbox_rows()] == [SENT]
