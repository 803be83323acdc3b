"""ConsumerWorker: receive, decode, process in one transaction, acknowledge; retry and dead-letter."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import pulsar
import structlog

from .broker import BATCH_WAIT_MS, PulsarBroker
from .codec import SchemaRegistry
from .messages import IncomingEvent, TransientFailure, UndecodableMessage, decode_message
from .signing import EventSigner

log = structlog.get_logger(__name__)

# Apache Pulsar: an undecodable message is redelivered this many times (the least the client's
# DeadLetterPolicy accepts is 1) before the client stores it in the dead-letter topic.
POISON_REDELIVERIES = 1


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
    undecodable message is dead-lettered at once (on Apache Pulsar through a nack and the client's
    DeadLetterPolicy: `poison_by_nack`). While the database is unreachable nothing is
    counted as a failure: the worker waits and retries, so an outage never dead-letters good
    messages.

    Retries are this worker's, not the broker's negative acknowledgement, on either broker: the
    embedded one ignores nacks, and Apache Pulsar's redelivery count is not durable (it starts
    again at 0 when the consumer reconnects), so it could not bound the retries. Above all, on
    Apache Pulsar a nacked message comes back after the later events of its key the client had
    already received (measured on 4.0.7, Key_Shared: e1 nacked, then e2, e3, e1 processed), which
    would break per-aggregate order.
    """

    def __init__(self, broker: PulsarBroker, registry: SchemaRegistry, topic: str, subscription: str,
                 process: Callable[[list[IncomingEvent]], dict[str, str | None]], *, consumer_name: str,
                 max_redeliveries: int = 5, on_dead_letter: Callable[[IncomingEvent | None, dict, str], None] | None = None,
                 batch_size: int = 200, retry_delay_seconds: float = 0.5, max_retry_delay_seconds: float = 8.0,
                 signer: EventSigner | None = None, poison_by_nack: int | None = None,
                 batch_wait_ms: int = BATCH_WAIT_MS) -> None:
        self.broker = broker
        # None: this worker stores an undecodable message in the dead-letter topic itself (the
        # embedded broker ignores nacks). N (Apache Pulsar): it negatively acknowledges it and the
        # client's DeadLetterPolicy stores it after N redeliveries (README, "Real Apache Pulsar").
        self.poison_by_nack = poison_by_nack
        self.signer = signer  # with one, a message the platform did not sign is refused like an undecodable one
        self.registry = registry
        self.topic = topic
        self.subscription = subscription
        self.process = process
        self.consumer_name = consumer_name
        self.max_redeliveries = max_redeliveries
        self.on_dead_letter = on_dead_letter or (lambda *_: None)
        self.batch_size = batch_size
        self.batch_wait_ms = batch_wait_ms
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
                                                           consumer_name=self.consumer_name, batch_size=self.batch_size,
                                                           batch_wait_ms=self.batch_wait_ms,
                                                           dead_letter_after=self.poison_by_nack)
                except Exception as error:
                    self.state.last_error = f"subscribe: {error}"
                    self._stop.wait(1.0)
                    continue
            try:
                messages = self._consumer.batch_receive()  # returns within the policy's batch_wait_ms
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
                                       message.partition_key(), message.data(), self.signer)
            except UndecodableMessage as error:
                # Decoding is deterministic: retrying cannot help.
                self.state.undecodable += 1
                self.state.nacked += 1
                self.state.last_error = str(error)[:300]
                if self.poison_by_nack is not None:
                    self._nack_poison(message, str(error))
                    continue
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

    def _nack_poison(self, message, error: str) -> None:
        """Apache Pulsar: negatively acknowledge an undecodable message (it has no order to keep);
        nacked on its last delivery, the client stores it in the dead-letter topic and
        acknowledges it, so that is when it is counted and announced on sistema.eventos."""
        assert self._consumer is not None and self.poison_by_nack is not None
        if message.redelivery_count() >= self.poison_by_nack:
            self.state.dead_lettered += 1
            try:
                self.on_dead_letter(None, message.properties(), error)
            except Exception as failure:
                log.warning("dead-letter notice failed", error=str(failure))
        self._consumer.negative_acknowledge(message)

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
