"""Pulsar adapter: producers for the outbox relay, Failover/Key_Shared consumers for the inbox.

Payloads are Avro bytes encoded by our codec (Pulsar's AvroSchema needs a schema registry,
which the embedded broker lacks); event type, schema version and ids travel as properties.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pulsar
import structlog

from .codec import SchemaRegistry
from .messages import (
    IncomingEvent,
    TransientFailure,
    UndecodableMessage,
    decode_message,
    properties_of,
)
from .outbox import PendingMessage

log = structlog.get_logger(__name__)


# Both keep per-key order: the partition key picks the partition, and Failover gives each
# partition one active consumer; Key_Shared spreads keys over consumers. The services use
# Key_Shared (settings): pulsar-lite 0.2.0 ignores a Failover consumer's acknowledgements, so
# everything would be delivered again at each reconnect (tools/measure_acks.py); its Key_Shared
# strands a departed consumer's messages instead, which `alpes up` clears by restarting it.
SUBSCRIPTION_TYPES = {"failover": pulsar.ConsumerType.Failover, "key_shared": pulsar.ConsumerType.KeyShared}


def _quiet_logger() -> pulsar.ConsoleLogger:
    return pulsar.ConsoleLogger(pulsar.LoggerLevel.Warn)


ID_SPACER_TOPIC = "alpes-consumer-id-spacer"
CONSUMER_IDS_PER_INSTANCE = 500  # a service process uses ~30 (one per partition) plus retries


def reserve_consumer_ids(client: pulsar.Client, count: int, tenant: str = "public", namespace: str = "default") -> None:
    """Make `client`'s next consumer ids start `count` later, by opening and closing readers.

    pulsar-lite 0.2.0 refuses a consumer whose client-side id equals one already registered on
    the subscription by another connection (the subscribe times out after 10 s), and every
    client numbers its consumers from 0: two instances of a service would collide on every
    subscription. Instance i reserves i * CONSUMER_IDS_PER_INSTANCE ids first. Only done for
    the embedded broker; Apache Pulsar scopes consumer ids per connection.
    """
    from concurrent.futures import ThreadPoolExecutor

    if count <= 0:
        return
    topic = f"persistent://{tenant}/{namespace}/{ID_SPACER_TOPIC}"
    with ThreadPoolExecutor(16) as pool:  # ~2 s for 500 ids instead of ~8 s one after another
        readers = list(pool.map(lambda _: client.create_reader(topic, pulsar.MessageId.latest), range(count)))
    for reader in readers:
        reader.close()


class PulsarBroker:
    """One pulsar.Client per process, created by the composition root, closed on stop."""

    def __init__(self, service_url: str, *, tenant: str = "public", namespace: str = "default",
                 producer_name: str = "alpes", operation_timeout_seconds: int = 10,
                 subscription_type: str = "failover") -> None:
        self.service_url = service_url
        self.subscription_type = SUBSCRIPTION_TYPES[subscription_type]
        self.tenant = tenant
        self.namespace = namespace
        self.producer_name = producer_name
        self.client = pulsar.Client(
            service_url,
            operation_timeout_seconds=operation_timeout_seconds,
            connection_timeout_ms=3000,
            logger=_quiet_logger(),
        )
        self._producers: dict[str, pulsar.Producer] = {}
        self._lock = threading.Lock()

    def topic(self, name: str) -> str:
        return f"persistent://{self.tenant}/{self.namespace}/{name}"

    def dead_letter_topic(self, topic: str, subscription: str) -> str:
        return self.topic(f"{topic}-{subscription}-DLQ")

    # -- producing -------------------------------------------------------------------------
    def producer(self, topic: str) -> pulsar.Producer:
        with self._lock:
            producer = self._producers.get(topic)
            if producer is None:
                producer = self.client.create_producer(
                    self.topic(topic),
                    block_if_queue_full=True,  # the default silently drops on a full queue
                    batching_enabled=True,
                    # Key-based batches: a batch holds one key, so Key_Shared dispatch keeps
                    # each key on one consumer and per-aggregate order holds.
                    batching_type=pulsar.BatchingType.KeyBased,
                    batching_max_publish_delay_ms=2,
                    send_timeout_millis=10000,
                    compression_type=pulsar.CompressionType.LZ4,
                )
                self._producers[topic] = producer
            return producer

    def publish(self, messages: Sequence[PendingMessage]) -> dict[str, str | None]:
        """Send all, wait for every receipt; event_id -> None when the broker stored it."""
        results: dict[str, str | None] = {}
        done = threading.Event()
        remaining = [len(messages)]
        lock = threading.Lock()

        def receipt(event_id: str) -> Callable:
            def callback(result, _message_id) -> None:
                with lock:
                    results[event_id] = None if result == pulsar.Result.Ok else str(result)
                    remaining[0] -= 1
                    if remaining[0] == 0:
                        done.set()
            return callback

        used: dict[str, pulsar.Producer] = {}
        for message in messages:
            try:
                producer = self.producer(message.topic)
                producer.send_async(
                    message.payload,
                    receipt(message.event_id),
                    properties=properties_of(
                        message.event_id, message.event_type, message.schema_version, message.occurred_at,
                        message.correlation_id, message.causation_id, self.producer_name),
                    partition_key=message.partition_key,
                    event_timestamp=int(message.occurred_at.timestamp() * 1000),
                )
            except Exception as error:  # not handed to the client: no receipt will come
                with lock:
                    results[message.event_id] = f"producer: {error}"
                    remaining[0] -= 1
                continue
            used[message.topic] = producer
        for topic, producer in used.items():
            try:
                producer.flush()
            except Exception as error:  # receipts still tell which messages made it
                log.warning("flush failed", topic=topic, error=str(error))
        if remaining[0] > 0:
            done.wait(15)
        with lock:
            failed = [m for m in messages if results.get(m.event_id, "no receipt") is not None]
        failed_topics = {m.topic for m in failed}
        for topic in failed_topics:
            self._discard_producer(topic)
        if failed:
            log.warning("publish failed", topics=sorted(failed_topics), failed=len(failed))
        return results

    def _discard_producer(self, topic: str) -> None:
        """A producer that failed a send may stay broken (a partition producer that timed out at
        creation is not recreated by the client): the next attempt builds a fresh one."""
        with self._lock:
            producer = self._producers.pop(topic, None)
        if producer is not None:
            try:
                producer.close()
            except Exception:
                pass

    # -- consuming -------------------------------------------------------------------------
    def subscribe(self, topic: str, subscription: str, *, consumer_name: str, batch_size: int = 200) -> pulsar.Consumer:
        return self.client.subscribe(
            self.topic(topic),
            subscription,
            consumer_type=self.subscription_type,
            consumer_name=consumer_name,
            initial_position=pulsar.InitialPosition.Earliest,
            receiver_queue_size=1000,
            batch_receive_policy=pulsar.ConsumerBatchReceivePolicy(batch_size, 4 * 1024 * 1024, 20),
        )

    def dead_letter(self, topic: str, subscription: str, message, error: str) -> None:
        """Store `message` in the subscription's dead-letter topic; raises unless the broker confirmed it."""
        properties = {**message.properties(), "REAL_TOPIC": message.topic_name(),
                      "ORIGIN_MESSAGE_ID": str(message.message_id()), "dead_letter_error": error[:500]}
        key = message.partition_key()
        producer = self.producer(f"{topic}-{subscription}-DLQ")  # = dead_letter_topic(topic, subscription)
        producer.send(message.data(), properties=properties, **({"partition_key": key} if key else {}))

    def reachable(self) -> bool:
        try:
            self.client.get_topic_partitions(self.topic("sistema.eventos"))
            return True
        except Exception:
            return False

    def close(self) -> None:
        for producer in list(self._producers.values()):
            try:
                producer.flush()
                producer.close()
            except Exception:
                pass
        self._producers.clear()
        try:
            self.client.close()
        except Exception:
            pass


@dataclass
class ConsumerState:
    topic: str
    subscription: str
    received: int = 0
    acked: int = 0
    nacked: int = 0
    undecodable: int = 0
    dead_lettered: int = 0
    retrying: int = 0
    last_message_at: float | None = None
    last_error: str | None = None
    connected: bool = False
    running: bool = False
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {
            "topic": self.topic, "subscription": self.subscription, "running": self.running,
            "connected": self.connected, "received": self.received, "acked": self.acked,
            "nacked": self.nacked, "undecodable": self.undecodable, "dead_lettered": self.dead_lettered,
            "retrying": self.retrying,
            "last_message_age_s": None if self.last_message_at is None else round(time.time() - self.last_message_at, 3),
            "last_error": self.last_error,
        }


@dataclass
class _Held:
    """A message waiting in this worker: its handling failed, or an earlier event of its key did."""

    message: object
    event: IncomingEvent
    error: str = ""
    failures: int = 0
    due: float = 0.0


class ConsumerWorker:
    """Receive → decode → process (inbox + handler + outbox, one commit) → ack; retry on failure.

    Nothing is acknowledged before its transaction committed. A failed message is retried by
    this worker with exponential backoff, at most `max_redeliveries` times; then it is published
    to the dead-letter topic and acknowledged only once the broker confirmed that copy. Later
    events of the same key wait behind it (per-aggregate order), other keys keep flowing. An
    undecodable message is dead-lettered at once. While the database is unreachable nothing is
    counted as a failure: the worker waits and retries, so an outage never dead-letters good
    messages.

    Retries are not left to the broker's negative acknowledgement: pulsar-lite 0.2.0 ignores
    nacks (its log says "requested redelivery for non-pending message"), and on a real cluster
    the redelivery counter is not durable either (it resets on reconnect).
    """

    def __init__(self, broker: PulsarBroker, registry: SchemaRegistry, topic: str, subscription: str,
                 process: Callable[[list[IncomingEvent]], dict[str, str | None]], *, consumer_name: str,
                 max_redeliveries: int = 5, on_dead_letter: Callable[[IncomingEvent | None, dict, str], None] | None = None,
                 batch_size: int = 200, retry_delay_seconds: float = 0.5, max_retry_delay_seconds: float = 8.0) -> None:
        self.broker = broker
        self.registry = registry
        self.topic = topic
        self.subscription = subscription
        self.process = process
        self.consumer_name = consumer_name
        self.max_redeliveries = max_redeliveries
        self.on_dead_letter = on_dead_letter or (lambda *_: None)
        self.batch_size = batch_size
        self.retry_delay_seconds = retry_delay_seconds
        self.max_retry_delay_seconds = max_retry_delay_seconds
        self.state = ConsumerState(topic, subscription)
        self._consumer: pulsar.Consumer | None = None
        self._held: dict[str, deque[_Held]] = {}  # key -> its waiting messages, in arrival order
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name=f"consumer-{self.topic}-{self.subscription}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        # Held messages stay unacknowledged: closing the consumer hands them back to the broker
        # for another instance (or this one after a restart).
        self._stop.set()
        if self._thread:
            self._thread.join(timeout)
        if self._consumer is not None:
            try:
                self._consumer.close()
            except Exception:
                pass

    def connected(self) -> bool:
        try:
            return self._consumer is not None and self._consumer.is_connected()
        except Exception:
            return False

    def _loop(self) -> None:
        self.state.running = True
        while not self._stop.is_set():
            if self._consumer is None:
                try:
                    self._consumer = self.broker.subscribe(self.topic, self.subscription,
                                                           consumer_name=self.consumer_name, batch_size=self.batch_size)
                except Exception as error:
                    self.state.last_error = f"subscribe: {error}"
                    self._stop.wait(1.0)
                    continue
            try:
                messages = self._consumer.batch_receive()  # returns within the policy's 20 ms
            except Exception as error:
                self.state.last_error = f"receive: {error}"
                self._stop.wait(0.5)
                continue
            self.state.connected = self.connected()
            if messages:
                self._handle(messages)
            self._retry_due()
        self.state.running = False

    def _handle(self, messages: list) -> None:
        self.state.received += len(messages)
        self.state.last_message_at = time.time()
        ready: list[tuple[object, IncomingEvent]] = []
        for message in messages:
            properties = message.properties()
            try:
                event = decode_message(self.registry, self.topic, self.subscription, properties,
                                       message.partition_key(), message.data())
            except UndecodableMessage as error:
                # Decoding is deterministic: retrying cannot help.
                self.state.undecodable += 1
                self.state.nacked += 1
                self.state.last_error = str(error)[:300]
                while not self._dead_letter(message, None, str(error)) and not self._stop.wait(1.0):
                    pass  # the broker refused the copy: it is down, try again
                continue
            if event.key in self._held:
                self._hold(_Held(message, event))  # behind an earlier event of its key
            else:
                ready.append((message, event))
        if not ready:
            return
        verdicts = self._process([event for _, event in ready])
        if verdicts is None:
            return  # stopping while the database is down: everything stays unacknowledged
        for message, event in ready:
            error = verdicts.get(event.event_id, "no verdict")
            if error is None and event.key not in self._held:
                self._ack(message)
            elif event.key in self._held:
                self._hold(_Held(message, event, error or ""))
            else:
                self._hold(self._failed(_Held(message, event), error))

    def _process(self, events: list[IncomingEvent]) -> dict[str, str | None] | None:
        """Process; while the database is unreachable, wait and try again (None: stopping)."""
        delay = self.retry_delay_seconds
        while True:
            try:
                return self.process(events)
            except TransientFailure as error:
                self.state.last_error = f"waiting for the database: {error}"[:300]
                if self._stop.wait(delay):
                    return None
                delay = min(self.max_retry_delay_seconds, delay * 2)

    def _hold(self, entry: _Held) -> None:
        self._held.setdefault(entry.event.key, deque()).append(entry)
        self.state.retrying = sum(len(q) for q in self._held.values())

    def _failed(self, entry: _Held, error: str) -> _Held:
        entry.failures += 1
        entry.error = error
        self.state.nacked += 1
        self.state.last_error = error[:300]
        entry.due = time.monotonic() + min(self.max_retry_delay_seconds,
                                           self.retry_delay_seconds * 2 ** (entry.failures - 1))
        return entry

    def _retry_due(self) -> None:
        now = time.monotonic()
        for key in [k for k, q in self._held.items() if q[0].due <= now]:
            queue = self._held[key]
            while queue and not self._stop.is_set():
                head = queue[0]
                if head.failures > self.max_redeliveries:
                    if not self._dead_letter(head.message, head.event, head.error):
                        head.due = time.monotonic() + self.max_retry_delay_seconds
                        break
                    queue.popleft()
                    continue
                verdicts = self._process([head.event])
                if verdicts is None:
                    return
                error = verdicts.get(head.event.event_id, "no verdict")
                if error is not None:
                    self._failed(head, error)
                    break
                self._ack(head.message)
                queue.popleft()
            if not queue:
                del self._held[key]
        self.state.retrying = sum(len(q) for q in self._held.values())

    def _ack(self, message) -> None:
        assert self._consumer is not None
        self._consumer.acknowledge(message)
        self.state.acked += 1

    def _dead_letter(self, message, event: IncomingEvent | None, error: str) -> bool:
        """Store the message in the dead-letter topic, then acknowledge it; False if not stored."""
        try:
            self.broker.dead_letter(self.topic, self.subscription, message, error)
        except Exception as failure:  # not stored: it stays unacknowledged and is tried again
            log.warning("dead-letter publish failed", topic=self.topic, subscription=self.subscription,
                        error=str(failure)[:300])
            return False
        self.state.dead_lettered += 1
        try:  # say so on sistema.eventos
            self.on_dead_letter(event, message.properties(), error)
        except Exception as failure:
            log.warning("dead-letter notice failed", error=str(failure))
        assert self._consumer is not None
        self._consumer.acknowledge(message)  # only now: the dead-letter copy is stored
        return True
