"""Pulsar adapter: producers for the outbox relay, Key_Shared consumers for the inbox.

Payloads are Avro bytes encoded by our codec (Pulsar's AvroSchema needs a schema registry,
which the embedded broker lacks); event type, schema version and ids travel as properties.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pulsar
import structlog

from .codec import SchemaRegistry
from .messages import IncomingEvent, UndecodableMessage, decode_message, properties_of
from .outbox import PendingMessage

log = structlog.get_logger(__name__)


def _quiet_logger() -> pulsar.ConsoleLogger:
    return pulsar.ConsoleLogger(pulsar.LoggerLevel.Warn)


class PulsarBroker:
    """One pulsar.Client per process, created by the composition root, closed on stop."""

    def __init__(self, service_url: str, *, tenant: str = "public", namespace: str = "default",
                 producer_name: str = "alpes", operation_timeout_seconds: int = 10) -> None:
        self.service_url = service_url
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

        used: set[str] = set()
        for message in messages:
            try:
                producer = self.producer(message.topic)
            except Exception as error:
                with lock:
                    results[message.event_id] = f"producer: {error}"
                    remaining[0] -= 1
                continue
            used.add(message.topic)
            producer.send_async(
                message.payload,
                receipt(message.event_id),
                properties=properties_of(
                    message.event_id, message.event_type, message.schema_version, message.occurred_at,
                    message.correlation_id, message.causation_id, self.producer_name),
                partition_key=message.partition_key,
                event_timestamp=int(message.occurred_at.timestamp() * 1000),
            )
        for topic in used:
            try:
                self._producers[topic].flush()
            except Exception as error:  # receipts still tell which messages made it
                log.warning("flush failed", topic=topic, error=str(error))
        if remaining[0] > 0:
            done.wait(15)
        return results

    # -- consuming -------------------------------------------------------------------------
    def subscribe(self, topic: str, subscription: str, *, max_redeliveries: int, consumer_name: str,
                  batch_size: int = 200) -> pulsar.Consumer:
        return self.client.subscribe(
            self.topic(topic),
            subscription,
            consumer_type=pulsar.ConsumerType.KeyShared,
            consumer_name=consumer_name,
            initial_position=pulsar.InitialPosition.Earliest,
            receiver_queue_size=1000,
            negative_ack_redelivery_delay_ms=500,
            # A consumer that dies holding messages releases them when its connection drops;
            # this also re-delivers the ones a stuck handler never answered.
            unacked_messages_timeout_ms=60000,
            batch_receive_policy=pulsar.ConsumerBatchReceivePolicy(batch_size, 4 * 1024 * 1024, 20),
            dead_letter_policy=pulsar.ConsumerDeadLetterPolicy(
                max_redeliver_count=max_redeliveries,
                dead_letter_topic=self.dead_letter_topic(topic, subscription),
            ),
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
class _Retry:
    """A message whose handling failed, waiting in this worker for its next attempt."""

    message: object
    event: IncomingEvent | None  # None: undecodable, it can only be dead-lettered
    properties: dict
    error: str = ""
    failures: int = 0
    due: float = 0.0
    dead: bool = False  # attempts exhausted: only the dead-letter publish is left to do


class ConsumerWorker:
    """Receive → decode → process (inbox + handler + outbox, one commit) → ack; retry on failure.

    Nothing is acknowledged before its transaction committed. A failed message is retried by
    this worker (exponential backoff, other messages keep flowing) at most `max_redeliveries`
    times; then it is published to the dead-letter topic and acknowledged only once the broker
    confirmed the dead-letter copy. An undecodable message is dead-lettered at once.

    Retries are not left to the broker's negative acknowledgement: pulsar-lite 0.2.0 ignores
    every nack (its log says "requested redelivery for non-pending message" for messages it
    just dispatched) and replays a Key_Shared message at most once, so a nacked message never
    came back and never reached the dead-letter topic. On a real cluster the nack redelivery
    counter is not durable either (it resets on reconnect). With the default delays a message
    is dead-lettered ~15 s after its first failure, well inside the 60 s unacked timeout.
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
        self._retries: list[_Retry] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name=f"consumer-{self.topic}-{self.subscription}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        # Messages still waiting for a retry stay unacknowledged: closing the consumer hands
        # them back to the broker for another instance (or this one after a restart).
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
                    self._consumer = self.broker.subscribe(
                        self.topic, self.subscription, max_redeliveries=self.max_redeliveries,
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
        decoded: list[tuple[object, IncomingEvent]] = []
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
                self._dead_letter(_Retry(message, None, properties, str(error), failures=1))
                continue
            decoded.append((message, event))
        if not decoded:
            return
        try:
            verdicts = self.process([event for _, event in decoded])
        except Exception as error:  # the database is down: every message is retried
            verdicts = {event.event_id: f"{type(error).__name__}: {error}" for _, event in decoded}
        for message, event in decoded:
            error = verdicts.get(event.event_id, "no verdict")
            if error is None:
                self._ack(message)
            else:
                self._failed(_Retry(message, event, message.properties()), error)

    def _ack(self, message) -> None:
        assert self._consumer is not None
        self._consumer.acknowledge(message)
        self.state.acked += 1

    def _failed(self, entry: _Retry, error: str) -> None:
        entry.failures += 1
        entry.error = error
        self.state.nacked += 1
        self.state.last_error = error[:300]
        if entry.failures > self.max_redeliveries:
            self._dead_letter(entry)
            return
        delay = min(self.max_retry_delay_seconds, self.retry_delay_seconds * 2 ** (entry.failures - 1))
        self._schedule(entry, delay)

    def _schedule(self, entry: _Retry, delay: float) -> None:
        entry.due = time.monotonic() + delay
        self._retries.append(entry)
        self.state.retrying = len(self._retries)

    def _retry_due(self) -> None:
        if not self._retries:
            return
        now = time.monotonic()
        due = sorted((r for r in self._retries if r.due <= now), key=lambda r: r.due)
        if not due:
            return
        self._retries = [r for r in self._retries if r.due > now]
        self.state.retrying = len(self._retries)
        for entry in due:
            if entry.dead:
                self._dead_letter(entry)
                continue
            assert entry.event is not None
            try:
                error = self.process([entry.event]).get(entry.event.event_id, "no verdict")
            except Exception as failure:
                error = f"{type(failure).__name__}: {failure}"
            if error is None:
                self._ack(entry.message)
            else:
                self._failed(entry, error)

    def _dead_letter(self, entry: _Retry) -> None:
        entry.dead = True
        try:
            self.broker.dead_letter(self.topic, self.subscription, entry.message, entry.error)
        except Exception as failure:  # not stored: keep the message unacknowledged, try again later
            log.warning("dead-letter publish failed", topic=self.topic, subscription=self.subscription,
                        error=str(failure)[:300])
            self._schedule(entry, self.max_retry_delay_seconds)
            return
        self.state.dead_lettered += 1
        try:  # say so on sistema.eventos
            self.on_dead_letter(entry.event, entry.properties, entry.error)
        except Exception as failure:
            log.warning("dead-letter notice failed", error=str(failure))
        assert self._consumer is not None
        self._consumer.acknowledge(entry.message)  # only now: the dead-letter copy is stored
