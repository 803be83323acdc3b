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
            "last_message_age_s": None if self.last_message_at is None else round(time.time() - self.last_message_at, 3),
            "last_error": self.last_error,
        }


class ConsumerWorker:
    """Receive → decode → process (inbox + handler + outbox, one commit) → ack; nack on failure.

    Nothing is acknowledged before its transaction committed; a message that keeps failing is
    redelivered at most `max_redeliveries` times and then lands in the dead-letter topic.
    """

    def __init__(self, broker: PulsarBroker, registry: SchemaRegistry, topic: str, subscription: str,
                 process: Callable[[list[IncomingEvent]], dict[str, str | None]], *, consumer_name: str,
                 max_redeliveries: int = 5, on_dead_letter: Callable[[IncomingEvent | None, dict, str], None] | None = None,
                 batch_size: int = 200) -> None:
        self.broker = broker
        self.registry = registry
        self.topic = topic
        self.subscription = subscription
        self.process = process
        self.consumer_name = consumer_name
        self.max_redeliveries = max_redeliveries
        self.on_dead_letter = on_dead_letter or (lambda *_: None)
        self.batch_size = batch_size
        self.state = ConsumerState(topic, subscription)
        self._consumer: pulsar.Consumer | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name=f"consumer-{self.topic}-{self.subscription}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
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
                messages = self._consumer.batch_receive()
            except Exception as error:
                self.state.last_error = f"receive: {error}"
                self._stop.wait(0.5)
                continue
            self.state.connected = self.connected()
            if messages:
                self._handle(messages)
        self.state.running = False

    def _handle(self, messages: list) -> None:
        consumer = self._consumer
        assert consumer is not None
        self.state.received += len(messages)
        self.state.last_message_at = time.time()
        decoded: list[tuple[object, IncomingEvent]] = []
        for message in messages:
            properties = message.properties()
            try:
                event = decode_message(self.registry, self.topic, self.subscription, properties,
                                       message.partition_key(), message.data())
            except UndecodableMessage as error:
                self.state.undecodable += 1
                self.state.last_error = str(error)[:300]
                self._reject(consumer, message, None, properties, str(error))
                continue
            decoded.append((message, event))
        if not decoded:
            return
        try:
            verdicts = self.process([event for _, event in decoded])
        except Exception as error:  # the database is down: every message goes back
            verdicts = {event.event_id: f"{type(error).__name__}: {error}" for _, event in decoded}
        for message, event in decoded:
            error = verdicts.get(event.event_id, "no verdict")
            if error is None:
                consumer.acknowledge(message)
                self.state.acked += 1
            else:
                self.state.last_error = error[:300]
                self._reject(consumer, message, event, message.properties(), error)

    def _reject(self, consumer, message, event: IncomingEvent | None, properties: dict, error: str) -> None:
        self.state.nacked += 1
        if message.redelivery_count() >= self.max_redeliveries:
            # This nack sends it to the dead-letter topic: say so on sistema.eventos.
            self.state.dead_lettered += 1
            try:
                self.on_dead_letter(event, properties, error)
            except Exception as failure:
                log.warning("dead-letter notice failed", error=str(failure))
        consumer.negative_acknowledge(message)
