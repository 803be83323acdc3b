"""Prometheus metrics of one service process, served at GET /metrics (kernel/http.py).

Each ServiceRuntime owns one `Metrics` with its own CollectorRegistry (never prometheus_client's
global one), so nothing is registered at import time and several services in one process (tests)
do not mix. Three kinds of figures:

- observed as they happen: HTTP request latency by route template (kernel/http.py's `Edge`), consumer
  batch processing time, outbox publish latency and events published by type (the relay calls
  `published`);
- read at scrape time from what the runtime already counts (`_RuntimeCollector`): consumer
  received/acked/nacked/duplicates/dead-lettered, outbox pending, subscription backlog, plus the
  gauges a composition root registers with `gauge` (conversiones: sagas by state; every service:
  whether its rate limiter fell back from Redis);
- business sums a composition root registers without its domain knowing about Prometheus:
  `on_published(event_type, fn)` hands `fn` each published event's payload, `amounts` keeps money
  as Decimal and turns it into a float only when exposed (Prometheus has no other number type).

Labels are bounded: route templates (never raw paths), known methods, topics, subscriptions,
event types, currencies. No id ever becomes a label.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal
from typing import TYPE_CHECKING

import structlog
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

if TYPE_CHECKING:
    from .runtime import ServiceRuntime

log = structlog.get_logger(__name__)

# The methods a request's latency is labelled with (kernel/http.py's Edge); any other: "other".
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# A scrape-time gauge: label values -> value, read when Prometheus asks.
GaugeReader = Callable[[], Mapping[tuple[str, ...], float]]


class Metrics:
    def __init__(self, runtime: ServiceRuntime) -> None:
        self.runtime = runtime
        self.registry = CollectorRegistry()
        self.http_seconds = Histogram(
            "alpes_http_request_duration_seconds", "HTTP requests by route template, method and status",
            ["route", "method", "status"], registry=self.registry)
        self.processing_seconds = Histogram(
            "alpes_consumer_processing_seconds", "time to process one received batch (one transaction)",
            ["topic", "subscription"], registry=self.registry)
        self.publish_seconds = Histogram(
            "alpes_outbox_publish_duration_seconds", "time for the broker to confirm one relayed batch",
            registry=self.registry)
        self.events_published = Counter(
            "alpes_events_published", "events this process's relay published, by topic and type",
            ["topic", "event_type"], registry=self.registry)
        self._gauges: list[tuple[str, str, Sequence[str], GaugeReader]] = []
        self._observers: dict[str, list[Callable[[dict], None]]] = {}
        self.registry.register(_RuntimeCollector(self))

    # -- what composition roots register -------------------------------------------------------
    def gauge(self, name: str, documentation: str, labels: Sequence[str], read: GaugeReader) -> None:
        """A gauge read at scrape time; one that fails is left out of that scrape (logged)."""
        self._gauges.append((name, documentation, tuple(labels), read))

    def amounts(self, name: str, documentation: str, label: str) -> AmountCounter:
        counter = AmountCounter(name, documentation, label)
        self.registry.register(counter)
        return counter

    def counter(self, name: str, documentation: str, labels: Sequence[str] = ()) -> Counter:
        """A counter of this process's registry; `labels` must take a bounded set of values."""
        return Counter(name, documentation, list(labels), registry=self.registry)

    def histogram(self, name: str, documentation: str, labels: Sequence[str] = ()) -> Histogram:
        return Histogram(name, documentation, list(labels), registry=self.registry)

    def on_published(self, event_type: str, observer: Callable[[dict], None]) -> None:
        """`observer(payload)` for every event of `event_type` this process publishes (decoded at
        its newest schema), once, after the relay recorded it as sent."""
        self._observers.setdefault(event_type, []).append(observer)

    # -- what the runtime calls ------------------------------------------------------------------
    def published(self, sent: Sequence[Mapping], seconds: float) -> None:
        """The relay's hook: the outbox rows of one batch the broker confirmed, and how long it took."""
        self.publish_seconds.observe(seconds)
        for row in sent:
            self.events_published.labels(row["topic"], row["event_type"]).inc()
            for observer in self._observers.get(row["event_type"], ()):
                try:
                    observer(self.runtime.registry.decode(row["event_type"], row["payload"], row["schema_version"]))
                except Exception as error:  # a metric must never stop the relay
                    log.warning("metrics observer failed", event_type=row["event_type"], error=str(error)[:200])

    def timed(self, topic: str, subscription: str, process: Callable) -> Callable:
        """`process` (a subscription's InboxProcessor.process), timed per call when it answers: a
        batch whose handler failed counts, an attempt while the database is unreachable (it raises)
        does not, or an outage would fill the fastest bucket."""
        histogram = self.processing_seconds.labels(topic, subscription)

        def timed_process(events):
            started = time.perf_counter()
            verdicts = process(events)
            histogram.observe(time.perf_counter() - started)
            return verdicts
        return timed_process


class AmountCounter:
    """A counter of money by one label (e.g. currency): sums kept as Decimal, exact; exposed as a
    float, which is what the Prometheus format carries (close enough to graph, not to account)."""

    def __init__(self, name: str, documentation: str, label: str) -> None:
        self.name, self.documentation, self.label = name, documentation, label
        self._sums: dict[str, Decimal] = {}
        self._lock = threading.Lock()

    def add(self, value: str, amount: Decimal) -> None:
        with self._lock:
            self._sums[value] = self._sums.get(value, Decimal(0)) + Decimal(amount)

    def collect(self):
        family = CounterMetricFamily(self.name, self.documentation, labels=[self.label])
        with self._lock:
            for value, total in sorted(self._sums.items()):
                family.add_metric([value], float(total))
        yield family


class _RuntimeCollector:
    """Reads, at scrape time, the counts the runtime keeps anyway (ConsumerState, the inbox's
    totals, the relay, the outbox table, the backlog probe) and the gauges services registered."""

    _CONSUMER = (("received", "messages received"), ("acked", "messages acknowledged"),
                 ("nacked", "failed attempts (undecodable or handler error)"),
                 ("undecodable", "messages that could not be decoded or verified"),
                 ("dead_lettered", "messages stored in the dead-letter topic"))

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self):
        runtime = self.metrics.runtime
        labels = ["topic", "subscription"]
        families = {name: CounterMetricFamily(f"alpes_consumer_{name}", text, labels=labels)
                    for name, text in self._CONSUMER}
        duplicates = CounterMetricFamily("alpes_consumer_duplicates", "redeliveries the inbox had already processed",
                                         labels=labels)
        retrying = GaugeMetricFamily("alpes_consumer_retrying", "messages waiting for a retry", labels=labels)
        for worker, processor in zip(runtime.workers, runtime.processors):
            key = [worker.topic, worker.subscription]
            for name, family in families.items():
                family.add_metric(key, getattr(worker.state, name))
            duplicates.add_metric(key, processor.totals.duplicates)
            retrying.add_metric(key, worker.state.retrying)
        yield from families.values()
        yield duplicates
        yield retrying
        yield from self._outbox(runtime)
        yield self._backlog(runtime)
        for name, documentation, label_names, read in self.metrics._gauges:
            family = GaugeMetricFamily(name, documentation, labels=list(label_names))
            try:
                for values, value in read().items():
                    family.add_metric(list(values), float(value))
            except Exception as error:  # e.g. the database is down: no sample rather than a wrong one
                log.warning("metrics gauge failed", gauge=name, error=str(error)[:200])
            yield family

    @staticmethod
    def _outbox(runtime: ServiceRuntime):
        pending = GaugeMetricFamily("alpes_outbox_pending", "outbox rows not yet published (all instances)")
        try:
            with runtime.db.read() as session:
                pending.add_metric([], runtime.outbox.pending_count(session))
        except Exception as error:
            log.warning("metrics: outbox pending unreadable", error=str(error)[:200])
        yield pending
        failures = CounterMetricFamily("alpes_outbox_publish_failures", "outbox rows the broker did not confirm")
        failures.add_metric([], runtime.relay.failures if runtime.relay else 0)
        yield failures

    @staticmethod
    def _backlog(runtime: ServiceRuntime) -> GaugeMetricFamily:
        family = GaugeMetricFamily("alpes_subscription_backlog", "the subscription's backlog as the broker counts "
                                   "it (messages on Apache Pulsar, stored entries on the embedded broker)",
                                   labels=["topic", "subscription"])
        for (topic, subscription), answer in (runtime.backlog.read() if runtime.backlog else {}).items():
            if answer.get("backlog") is not None:
                family.add_metric([topic, subscription], answer["backlog"])
        return family
