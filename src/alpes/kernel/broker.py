"""Pulsar adapter: one client per role, producers for the outbox relay, subscriptions for the consumers.

Payloads are Avro bytes encoded by our codec (Pulsar's AvroSchema needs a schema registry, which
the embedded broker lacks); event type, schema version and ids travel as properties. The same
code runs on the embedded broker and on Apache Pulsar; what differs lives in embedded_broker.py.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import pulsar
import structlog

from .messages import properties_of
from .signing import SIGNATURE_PROPERTY, EventSigner
from .outbox import PendingMessage

log = structlog.get_logger(__name__)

# Both keep per-key order: the partition key picks the partition, Failover gives each partition
# one active consumer, Key_Shared spreads keys over consumers (so instances share the work). The
# services default to Key_Shared (settings.subscription_type): on the embedded broker it is also
# the one whose acknowledgements hold (README, "The embedded broker"); on Apache Pulsar every
# subscription needs per-key order only and every service may run several instances (README,
# "Real Apache Pulsar").
# A consumer's batch-receive timeout (ms) unless it is given one (the contract gives each subscription its own).
BATCH_WAIT_MS = 20
SUBSCRIPTION_TYPES = {"failover": pulsar.ConsumerType.Failover, "key_shared": pulsar.ConsumerType.KeyShared}


def _quiet_logger() -> pulsar.ConsoleLogger:
    return pulsar.ConsoleLogger(pulsar.LoggerLevel.Warn)


class PulsarBroker:
    """A pulsar.Client and its producers. The runtime opens one per role (relay, consumers) when
    it starts and closes them when it stops."""

    def __init__(self, service_url: str, *, tenant: str = "public", namespace: str = "default",
                 producer_name: str = "alpes", operation_timeout_seconds: int = 10,
                 subscription_type: str = "failover", signer: EventSigner | None = None,
                 token: str | None = None) -> None:
        self.service_url = service_url
        self.signer = signer  # signs every message published (kernel/signing.py)
        self.subscription_type = SUBSCRIPTION_TYPES[subscription_type]
        self.tenant = tenant
        self.namespace = namespace
        self.producer_name = producer_name
        self.client = pulsar.Client(
            service_url,
            operation_timeout_seconds=operation_timeout_seconds,
            connection_timeout_ms=3000,
            logger=_quiet_logger(),
            # Apache Pulsar with JWT authentication: the service's role (settings.pulsar_token).
            **({"authentication": pulsar.AuthenticationToken(token)} if token else {}),
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
                properties = properties_of(
                    message.event_id, message.event_type, message.schema_version, message.occurred_at,
                    message.correlation_id, message.causation_id, self.producer_name,
                    message.actor_id, message.actor_role, message.traceparent)
                if self.signer is not None:
                    properties[SIGNATURE_PROPERTY] = self.signer.sign(
                        message.topic, message.partition_key, properties, message.payload)
                producer.send_async(
                    message.payload,
                    receipt(message.event_id),
                    properties=properties,
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
    def subscribe(self, topic: str, subscription: str, *, consumer_name: str, batch_size: int = 200,
                  dead_letter_after: int | None = None, batch_wait_ms: int = BATCH_WAIT_MS) -> pulsar.Consumer:
        """`dead_letter_after`: the client's DeadLetterPolicy: a message negatively acknowledged on
        its delivery number `dead_letter_after` + 1 is stored in the subscription's dead-letter
        topic and acknowledged by the client (kernel/consumer.py uses it for undecodable messages)."""
        options = {}
        if dead_letter_after is not None:
            options = {"negative_ack_redelivery_delay_ms": 1000,
                       "dead_letter_policy": pulsar.ConsumerDeadLetterPolicy(
                           max_redeliver_count=dead_letter_after,
                           dead_letter_topic=self.dead_letter_topic(topic, subscription))}
        return self.client.subscribe(
            self.topic(topic),
            subscription,
            consumer_type=self.subscription_type,
            consumer_name=consumer_name,
            initial_position=pulsar.InitialPosition.Earliest,
            receiver_queue_size=1000,
            # batch_receive returns once `batch_size` messages wait, or after `batch_wait_ms`.
            batch_receive_policy=pulsar.ConsumerBatchReceivePolicy(batch_size, 4 * 1024 * 1024, batch_wait_ms),
            **options,
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
