"""Service runtime: the moving parts every service shares (relay, consumers, jobs, health).

A context's composition root builds one of these with its own tables and handlers; the
runtime owns no domain knowledge. Lifecycle announcements (started, stopped, degraded,
recovered) and dead-letter notices go through the outbox like every other event.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import structlog
from sqlalchemy import Table
from sqlalchemy.orm import Session

from .backlog import BacklogProbe
from .broker import BATCH_WAIT_MS, PulsarBroker
from .codec import SchemaRegistry
from .consumer import POISON_REDELIVERIES, ConsumerWorker
from .db import Database
from .inbox import Handler, InboxProcessor
from .messages import IncomingEvent, OutgoingEvent, utcnow
from .metrics import Metrics
from .outbox import Actor, Outbox, OutboxRelay
from .signing import EventSigner
from .tracing import Tracing

if TYPE_CHECKING:
    from .embedded_broker import EmbeddedBrokerQuirks

log = structlog.get_logger(__name__)

SYSTEM_TOPIC = "sistema.eventos"


@dataclass
class ConsumerSpec:
    topic: str
    subscription: str
    handlers: dict[str, Handler]
    # How long the consumer waits to fill a batch (ms); the composition root sets the contract's.
    batch_wait_ms: int = BATCH_WAIT_MS


@dataclass
class PeriodicJob:
    """`run()` does one unit of work in its own transaction and returns how much it did;
    the runtime calls it again at once while it finds work, else after `interval` seconds."""

    name: str
    interval: float
    run: Callable[[], int]
    # False: every instance runs it for itself (work held in its own memory), not one at a time.
    exclusive: bool = True
    # Called once when the service stops, after the job's loop ended and before the outbox's last
    # flush (work held in memory goes to the database, and its events with the outbox).
    on_stop: Callable[[], None] | None = None


class ServiceRuntime:
    def __init__(self, service: str, db: Database, registry: SchemaRegistry, outbox_table: Table,
                 inbox_table: Table, broker_url: str, *, tenant: str = "public", namespace: str = "default",
                 consumers: list[ConsumerSpec] | None = None, jobs: list[PeriodicJob] | None = None,
                 max_redeliveries: int = 5, consumer_batch_size: int = 200,
                 subscription_type: str = "failover", instance_index: int = 0,
                 quirks: EmbeddedBrokerQuirks | None = None, backlog: BacklogProbe | None = None,
                 signer: EventSigner | None = None, broker_token: str | None = None,
                 tracing: Tracing | None = None) -> None:
        self.service = service
        # This process's spans (kernel/tracing.py): exported when the composition root found an
        # OTLP endpoint; by default only propagated.
        self.tracing = tracing or Tracing(service)
        self.broker_token = broker_token  # this service's JWT on Apache Pulsar with authentication
        # Signs what this service publishes and verifies what it consumes (kernel/signing.py).
        self.signer = signer
        self.instance = f"{service}-{socket.gethostname()}-{os.getpid()}"
        # Which of the service's instances this is (`alpes up --instances`); several share one
        # database and the service's subscriptions.
        self.instance_index = instance_index
        # Set only on the embedded broker (composition root): what this process does for its quirks.
        self.quirks = quirks
        self.backlog = backlog
        self.db = db
        self.registry = registry
        self.outbox = Outbox(outbox_table, registry)
        self.inbox_table = inbox_table
        self.broker_url = broker_url
        self.tenant = tenant
        self.namespace = namespace
        self.consumer_specs = consumers or []
        self.jobs = jobs or []
        self.max_redeliveries = max_redeliveries
        self.subscription_type = subscription_type
        self.consumer_batch_size = consumer_batch_size
        self.broker: PulsarBroker | None = None
        self._clients: list[PulsarBroker] = []
        self.relay: OutboxRelay | None = None
        self.workers: list[ConsumerWorker] = []
        self.processors: list[InboxProcessor] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._degraded_reason: str | None = None
        self.started_at: float | None = None
        # (topic, subscription) -> the last message this process sent to its dead-letter topic.
        self._last_dead_letter: dict[tuple[str, str], dict] = {}
        # A service's own figures in /health, by key (conversiones: its sagas); informative, they
        # do not change `status`. One that fails shows its error instead.
        self.health_reports: dict[str, Callable[[], dict]] = {}
        # This process's Prometheus registry and figures, served at GET /metrics (kernel/metrics.py).
        self.metrics = Metrics(self)

    # -- unit of work used by HTTP handlers ------------------------------------------------
    @contextmanager
    def unit_of_work(self, actor: Actor | None = None, *, defer_writes: bool = False
                     ) -> Iterator[tuple[Session, Callable[[list[OutgoingEvent]], None]]]:
        """`with runtime.unit_of_work(caller) as (session, emit): ...` state and events commit together;
        the events carry `actor` (the request's principal; None: `system`) as who caused them.
        `defer_writes`: Database.transaction's."""
        with self.db.transaction(defer_writes) as session:
            yield session, lambda events: self.outbox.add(session, events, actor)
        self.wake_relay()

    @property
    def running(self) -> bool:
        """Started and not stopping: its jobs run."""
        return self.started_at is not None and not self._stop.is_set()

    def wake_relay(self) -> None:
        if self.relay is not None:
            self.relay.wake()

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        self.started_at = time.time()
        self.broker = self._client("relay")
        self.relay = OutboxRelay(self.db, self.outbox.table, self.broker, on_published=self.metrics.published)
        self._announce("ServicioIniciado", {})
        self.relay.start()
        consumers = self._client("consumers")
        if self.quirks is not None and self.consumer_specs:
            self.quirks.prepare_consumer_client(consumers.client, self.tenant, self.namespace)
        for spec in self.consumer_specs:
            processor = InboxProcessor(self.db, self.inbox_table, self.outbox, spec.subscription,
                                       spec.handlers, after_commit=self.wake_relay, tracing=self.tracing)
            # One client for all of this process's consumers: the client numbers its consumers, so
            # ids stay distinct within the process (the embedded broker checks them per
            # subscription name across topics and connections; see embedded_broker.py).
            worker = ConsumerWorker(
                consumers, self.registry, spec.topic, spec.subscription,
                self.metrics.timed(spec.topic, spec.subscription, processor.process),
                consumer_name=f"{self.instance}-{spec.topic}-{spec.subscription}",
                max_redeliveries=self.max_redeliveries, batch_size=self.consumer_batch_size,
                batch_wait_ms=spec.batch_wait_ms, on_dead_letter=self._dead_letter_notice(spec), signer=self.signer,
                # Undecodable messages: Apache Pulsar's nack + the client's DeadLetterPolicy; the
                # embedded broker ignores nacks, so there the worker stores them itself.
                poison_by_nack=None if self.quirks is not None else POISON_REDELIVERIES)
            self.processors.append(processor)
            self.workers.append(worker)
            worker.start()
        for job in self.jobs:
            self._spawn(f"job-{job.name}", self._job_loop, job)
        self._spawn("watchdog", self._watchdog)
        log.info("service started", service=self.service, instance=self.instance)

    def _client(self, role: str) -> PulsarBroker:
        broker = PulsarBroker(self.broker_url, tenant=self.tenant, namespace=self.namespace,
                              producer_name=f"{self.instance}-{role}", subscription_type=self.subscription_type,
                              signer=self.signer, token=self.broker_token)
        self._clients.append(broker)
        return broker

    def stop(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        for worker in self.workers:
            worker.stop()
        for thread in self._threads:
            thread.join(5)
        for job in self.jobs:
            if job.on_stop is not None:
                try:
                    job.on_stop()
                except Exception as error:  # the database is gone: what it held is lost, say so
                    log.warning("job could not finish on stop", job=job.name, error=str(error)[:300])
        try:
            self._announce("ServicioDetenido", {})
            if self.relay is not None:
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline and self.relay.run_once()[0]:
                    pass
        except Exception as error:  # stopping because the db or broker is gone: not fatal
            log.warning("could not flush outbox on stop", error=str(error))
        if self.relay is not None:
            self.relay.stop()
        for client in self._clients:
            client.close()
        self.tracing.shutdown()
        self.db.dispose()

    def _spawn(self, name: str, target: Callable, *args) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _job_loop(self, job: PeriodicJob) -> None:
        while not self._stop.is_set():
            try:
                # One instance at a time runs a job on a shared SQLite file (the others skip this
                # tick); on MariaDB the job's own row locks keep instances apart.
                with self.db.exclusive(f"job-{job.name}", blocking=False) if job.exclusive \
                        else nullcontext(True) as mine:
                    done = job.run() if mine else 0
            except Exception as error:
                log.warning("job failed", job=job.name, error=str(error)[:300])
                done = 0
            if done:
                self.wake_relay()
            else:
                self._stop.wait(job.interval)

    # -- lifecycle events on sistema.eventos -------------------------------------------------
    def announce(self, event_type: str, extra: dict) -> None:
        """A lifecycle event (ServicioDegradado {motivo}, ServicioRecuperado) from outside the runtime,
        e.g. the rate limiter losing its Redis."""
        self._announce(event_type, extra)

    def _announce(self, event_type: str, extra: dict) -> None:
        payload = {"servicio": self.service, "instancia": self.instance, "timestamp": utcnow(), **extra}
        with self.db.transaction() as session:
            self.outbox.add(session, [OutgoingEvent(SYSTEM_TOPIC, event_type, self.service, payload)])
        self.wake_relay()

    def _dead_letter_notice(self, spec: ConsumerSpec) -> Callable[[IncomingEvent | None, dict, str], None]:
        def notice(event: IncomingEvent | None, properties: dict, error: str) -> None:
            payload = {
                "servicio": self.service, "topic": spec.topic, "subscription": spec.subscription,
                "event_id": (event.event_id if event else properties.get("event_id")) or "unknown",
                "event_type": (event.event_type if event else properties.get("event_type")) or "unknown",
                "error": error[:500], "timestamp": utcnow(),
            }
            self._last_dead_letter[(spec.topic, spec.subscription)] = {
                "event_id": payload["event_id"], "event_type": payload["event_type"], "error": payload["error"][:200],
                "at": payload["timestamp"].isoformat()}
            with self.db.transaction() as session:
                self.outbox.add(session, [OutgoingEvent(SYSTEM_TOPIC, "MensajeEnviadoADeadLetter", self.service, payload)])
            self.wake_relay()
        return notice

    def _watchdog(self) -> None:
        while not self._stop.wait(2.0):
            report = self.health()
            problems = [name for name in ("database", "broker") if not report[name]["ok"]]
            reason = ", ".join(f"{p} unreachable" for p in problems) or None
            if reason == self._degraded_reason:
                continue
            try:
                if reason:
                    self._announce("ServicioDegradado", {"motivo": reason})
                else:
                    self._announce("ServicioRecuperado", {})
                self._degraded_reason = reason
            except Exception:
                # The database itself is down: nothing can be recorded; try again next tick.
                log.warning("service degraded", service=self.service, reason=reason)

    # -- health --------------------------------------------------------------------------
    def health(self) -> dict:
        database = {"ok": True}
        pending = None
        try:
            with self.db.read() as session:
                pending = self.outbox.pending_count(session)
        except Exception as error:
            database = {"ok": False, "error": str(error)[:200]}
        broker = {"ok": _tcp_reachable(self.broker_url), "url": self.broker_url}
        consumers = []
        backlog = self.backlog.read() if self.backlog else {}
        for worker in self.workers:
            state = worker.state.as_dict()
            state["connected"] = worker.connected()
            # The subscription's backlog as the broker counts it (all instances together); the
            # source says what the number is on each broker. None: not known.
            state["backlog"] = backlog.get((worker.topic, worker.subscription), {"backlog": None, "source": None})
            state["subscription_type"] = self.subscription_type
            state["dead_letter_topic"] = f"{worker.topic}-{worker.subscription}-DLQ"
            state["last_dead_letter"] = self._last_dead_letter.get((worker.topic, worker.subscription))
            consumers.append(state)
        ok = database["ok"] and broker["ok"]
        report = {
            "status": "ok" if ok else "degraded",
            "service": self.service,
            "instance": self.instance,
            "instance_index": self.instance_index,
            "uptime_s": round(time.time() - (self.started_at or time.time()), 1),
            "database": database,
            "broker": broker,
            "outbox": {"pending": pending,
                       "published": self.relay.published if self.relay else 0,
                       "publish_failures": self.relay.failures if self.relay else 0},
            "consumers": consumers,
            # Since this process started: each subscription's count is its `dead_lettered`.
            "dead_letters": {"total": sum(c["dead_lettered"] for c in consumers),
                             "subscriptions": sorted(c["subscription"] + "@" + c["topic"] for c in consumers
                                                     if c["dead_lettered"])},
        }
        for name, extra in self.health_reports.items():
            try:
                report[name] = extra()
            except Exception as error:  # the database is down: already said above
                report[name] = {"error": str(error)[:200]}
        return report


def _tcp_reachable(service_url: str, timeout: float = 1.0) -> bool:
    parsed = urlparse(service_url)
    try:
        with socket.create_connection((parsed.hostname or "127.0.0.1", parsed.port or 6650), timeout=timeout):
            return True
    except OSError:
        return False

