"""Traces across services: W3C trace context from an HTTP request through every consumer.

One `Tracing` per service process, built by the composition root (never at import; no global
TracerProvider is set, so several services in one process, as in tests, keep their own
`service.name`). What travels:

- an HTTP request runs in a server span (kernel/http.py's `Edge`), the child of the request's
  `traceparent` header when it has one, named by the route template;
- every event written to the outbox while a span is current carries that span's `traceparent`
  (kernel/outbox.py; a column of the outbox, a message property on the broker, signed);
- a consumer handles each event in a consumer span whose parent is the event's `traceparent`
  (kernel/inbox.py), so the events its handler emits continue the same trace. An event without
  one (emitted by a periodic job, a lifecycle notice, or published before traces existed) is
  continued in the trace whose id is its correlation id (a UUID is 128 bits, like a trace id), so
  every consumer of it, and everything downstream, still share one trace.

Periodic jobs start no span: a job ticks every fraction of a second, and a root span per tick
would be noise. Their events carry no `traceparent` and are traced from their consumers on.

Export: when OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or OTEL_EXPORTER_OTLP_ENDPOINT is set, spans are
recorded by OpenTelemetry's SDK and sent over OTLP/HTTP in batches (the exporter reads its
endpoint, headers and timeouts from the standard OTEL_* variables). Unset, nothing is recorded:
no SDK span is built, only a non-recording span with fresh ids is made current, so the trace id
still follows the flow (in the messages, the outbox and the logs) for a few microseconds per
request or message (the SDK without any processor would cost about three times more for spans
nobody reads).
"""

from __future__ import annotations

import os
import random
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import NonRecordingSpan, Span, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

_PROPAGATOR = TraceContextTextMapPropagator()
# The correlation id of the event being handled, for the logs (logs.py reads it with the trace id).
_CORRELATION_ID: ContextVar[str | None] = ContextVar("alpes_correlation_id", default=None)
# Operators' probes and scrapes: a span for each would bury the requests that matter.
UNTRACED_PATHS = frozenset({"/health", "/metrics"})


class Tracing:
    """A service's spans: recorded by the SDK once a span processor is added, else only propagated."""

    def __init__(self, service: str) -> None:
        self.service = service
        self.provider: TracerProvider | None = None
        self._tracer: trace.Tracer | None = None

    @classmethod
    def from_environment(cls, service: str) -> Tracing:
        """With an OTLP endpoint configured, spans are exported to it; without one, none is recorded
        (OTEL_SDK_DISABLED=true turns export off too, as it does for every OpenTelemetry SDK)."""
        tracing = cls(service)
        endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        if endpoint and os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() != "true":
            # Imported only when used: a service that exports nothing never loads the exporter.
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            # The exporter reads the endpoint, headers, timeout and compression from OTEL_* itself.
            tracing.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        return tracing

    def add_span_processor(self, processor: SpanProcessor) -> None:
        """Record spans and hand each finished one to `processor` (an exporter's; tests: in memory)."""
        if self.provider is None:
            self.provider = TracerProvider(resource=Resource.create({"service.name": self.service}))
            self._tracer = self.provider.get_tracer("alpes")
        self.provider.add_span_processor(processor)

    def shutdown(self) -> None:
        """Flush what the exporter still holds (the runtime calls it when it stops)."""
        if self.provider is not None:
            self.provider.shutdown()

    @contextmanager
    def span(self, name: str, parent: Context, kind: SpanKind, attributes: Mapping[str, str] | None = None
             ) -> Iterator[Span]:
        """A span made current for the block, the child of `parent`'s span (none in it: a new trace)."""
        if self._tracer is not None:
            with self._tracer.start_as_current_span(name, context=parent, kind=kind, attributes=attributes) as span:
                yield span
            return
        above = trace.get_current_span(parent).get_span_context()
        span = NonRecordingSpan(SpanContext(
            above.trace_id if above.is_valid else _random_id(128), _random_id(64), is_remote=False,
            trace_flags=above.trace_flags if above.is_valid else TraceFlags(TraceFlags.SAMPLED),
            trace_state=above.trace_state if above.is_valid else None))
        token = otel_context.attach(trace.set_span_in_context(span, parent))
        try:
            yield span
        finally:
            otel_context.detach(token)

    @contextmanager
    def consuming(self, event, subscription: str) -> Iterator[str | None]:
        """The handling of one IncomingEvent, as a consumer span of the event's trace; yields the
        `traceparent` the events the handler emits carry."""
        attributes = {"messaging.system": "pulsar", "messaging.operation.type": "process",
                      "messaging.destination.name": event.topic, "messaging.consumer.group.name": subscription,
                      "messaging.message.id": event.event_id, "alpes.event_type": event.event_type,
                      "alpes.correlation_id": event.correlation_id}
        parent = message_parent(event.traceparent, event.correlation_id, event.event_id)
        correlation = _CORRELATION_ID.set(event.correlation_id)
        try:
            with self.span(f"{subscription} {event.event_type}", parent, SpanKind.CONSUMER, attributes) as span:
                yield traceparent_of(span)
        finally:
            _CORRELATION_ID.reset(correlation)


def request_parent(headers: Sequence[tuple[bytes, bytes]]) -> Context:
    """The context a server span of this request descends from: the caller's `traceparent` and
    `tracestate` headers (ASGI raw headers), or none (a new trace)."""
    carrier = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in headers
               if k.lower() in (b"traceparent", b"tracestate")}
    return _PROPAGATOR.extract(carrier)


def message_parent(traceparent: str | None, correlation_id: str, event_id: str) -> Context:
    """The context a consumer span of this message descends from (module docstring)."""
    if traceparent:
        context = _PROPAGATOR.extract({"traceparent": traceparent})
        if trace.get_current_span(context).get_span_context().is_valid:
            return context
    try:
        trace_id, span_id = uuid.UUID(correlation_id).int, uuid.UUID(event_id).int >> 64
    except ValueError:
        return Context()  # not ids of ours: a trace of its own
    if not trace_id or not span_id:
        return Context()
    stand_in = SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED))
    return trace.set_span_in_context(NonRecordingSpan(stand_in), Context())


def traceparent_of(span: Span) -> str | None:
    """The W3C `traceparent` naming `span` (version 00: always 55 characters), None if it has no ids."""
    context = span.get_span_context()
    if not context.is_valid:
        return None
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


def current_traceparent() -> str | None:
    """The `traceparent` of the span current here (a request's, a consumer's), None outside any."""
    return traceparent_of(trace.get_current_span())


def mark_failed(reason: str) -> None:
    """The current span's work failed, though no exception leaves it (e.g. a handler's verdict)."""
    trace.get_current_span().set_status(Status(StatusCode.ERROR, reason))


def add_trace_ids(_logger, _method: str, event_dict: dict) -> dict:
    """structlog processor: the current trace and span ids and the correlation id being handled."""
    context = trace.get_current_span().get_span_context()
    if context.is_valid:
        event_dict.setdefault("trace_id", f"{context.trace_id:032x}")
        event_dict.setdefault("span_id", f"{context.span_id:016x}")
    correlation_id = _CORRELATION_ID.get()
    if correlation_id is not None:
        event_dict.setdefault("correlation_id", correlation_id)
    return event_dict


def _random_id(bits: int) -> int:
    value = 0
    while not value:  # zero is the invalid id
        value = random.getrandbits(bits)
    return value
