"""Traces across the services, in-process (no broker, no lifespan): one postback's spans in all
four services under the trace id of the request's `traceparent`, the events each consumer emits
carrying it on; an OTLP exporter only when its endpoint is configured; the logs' trace and
correlation ids; the signature covering the traceparent."""

from __future__ import annotations

import uuid
from importlib import import_module

import pytest
from fastapi.testclient import TestClient
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from sqlalchemy import select

from alpes.afiliados import handlers as afiliados_handlers
from alpes.contract import SERVICES
from alpes.kernel.inbox import InboxProcessor
from alpes.kernel.messages import IncomingEvent, decode_message, properties_of, utcnow
from alpes.kernel.signing import EventSigner, ForgedMessage
from alpes.kernel.tracing import Tracing, add_trace_ids, current_traceparent, message_parent
from alpes.settings import Settings

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{CALLER_SPAN}-01"


class Pump:
    """Carries every outbox row to each subscription of its topic, as the relay and the broker
    would: the row's envelope properties (properties_of, traceparent included) decoded by
    decode_message into an IncomingEvent for the service's InboxProcessor, one per subscription
    built from its runtime's consumer_specs (and its tracing), as ServiceRuntime.start does.
    `batched`: each subscription gets all new rows of its topic in one batch (one transaction)."""

    def __init__(self, runtimes: dict, batched: bool = False) -> None:
        self.runtimes = runtimes
        self.batched = batched
        self.processors = [(runtime, InboxProcessor(runtime.db, runtime.inbox_table, runtime.outbox, spec.subscription,
                                                    spec.handlers, tracing=runtime.tracing), spec.topic)
                           for runtime in runtimes.values() for spec in runtime.consumer_specs]
        self.sent: set[tuple[str, int]] = set()  # (source service, outbox row id)

    def run(self) -> int:
        delivered = 0
        while True:
            rows = [(source, row) for source, runtime in self.runtimes.items() for row in self._outbox(runtime)
                    if (source, row["id"]) not in self.sent]
            if not rows:
                return delivered
            self.sent.update((source, row["id"]) for source, row in rows)
            for runtime, processor, topic in self.processors:
                events = [self._decode(runtime, processor, source, row) for source, row in rows
                          if row["topic"] == topic]
                for batch in ([events] if self.batched and events else [[e] for e in events]):
                    verdicts = processor.process(batch)
                    assert set(verdicts.values()) == {None}, f"{processor.subscription}: {verdicts}"
                    delivered += len(batch)

    @staticmethod
    def _decode(runtime, processor: InboxProcessor, source: str, row) -> IncomingEvent:
        properties = properties_of(row["event_id"], row["event_type"], row["schema_version"], row["occurred_at"],
                                   row["correlation_id"], row["causation_id"], f"{source}-relay",
                                   row["actor_id"], row["actor_role"], row["traceparent"])
        return decode_message(runtime.registry, row["topic"], processor.subscription, properties,
                              row["partition_key"], row["payload"])

    @staticmethod
    def _outbox(runtime) -> list:
        t = runtime.outbox.table
        with runtime.db.read() as session:
            return session.execute(select(t).order_by(t.c.id)).mappings().all()


@pytest.fixture(params=["one by one", "batched"])
def platform(request, tmp_path):
    """The four services built in-process, each recording its spans into one in-memory exporter."""
    exporter = InMemorySpanExporter()
    clients, runtimes = {}, {}
    for name in SERVICES:
        app, runtime = import_module(f"alpes.{name}.service").build(
            Settings(data_dir=tmp_path / name, broker_url="pulsar://127.0.0.1:1"))
        assert runtime.tracing.provider is None  # no OTLP endpoint here: nothing recorded by default
        runtime.tracing.add_span_processor(SimpleSpanProcessor(exporter))
        clients[name], runtimes[name] = TestClient(app), runtime  # no `with`: no lifespan, relay or jobs
    yield clients, runtimes, Pump(runtimes, batched=request.param == "batched"), exporter
    for runtime in runtimes.values():
        runtime.tracing.shutdown()
        runtime.db.dispose()


def _enabled_affiliate(clients, runtimes, pump) -> str:
    response = clients["afiliados"].post("/afiliados", json={"user_id": "u-trace", "email": "ana@example.com",
                                                             "nombre": "Ana"})
    assert response.status_code == 201, response.text
    afiliados = runtimes["afiliados"]
    # The validation job, run once by hand (no lifespan here).
    assert afiliados_handlers.validate_registered_afiliados(
        afiliados.db, afiliados.outbox, clients["afiliados"].app.state.pii_vault) == 1
    pump.run()
    return response.json()["id"]


def _campaign(clients, pump) -> str:
    response = clients["marketing"].post("/campanas", json={"nombre": "Programa", "porcentaje_comision": "10",
                                                            "periodo_bloqueo_dias": 0})
    assert response.status_code == 201, response.text
    pump.run()
    return response.json()["id"]


def _service_of(span: ReadableSpan) -> str:
    return span.resource.attributes["service.name"]


def _trace_of(traceparent: str | None) -> str | None:
    return traceparent.split("-")[1] if traceparent else None


def test_one_postback_is_one_trace_across_the_four_services(platform):
    clients, runtimes, pump, exporter = platform
    affiliate, campaign = _enabled_affiliate(clients, runtimes, pump), _campaign(clients, pump)
    exporter.clear()
    marks = {name: max([r["id"] for r in Pump._outbox(runtime)], default=0) for name, runtime in runtimes.items()}

    response = clients["conversiones"].post("/conversiones", headers={"traceparent": TRACEPARENT}, json={
        "affiliate_id": affiliate, "campaign_id": campaign, "user_id": "cliente", "conversion_value": "80.00",
        "conversion_type": "sale"})
    assert response.status_code in (200, 201), response.text
    assert response.json()["status"] == "validated", response.json()
    assert pump.run() > 0

    spans = [s for s in exporter.get_finished_spans() if f"{s.context.trace_id:032x}" == TRACE_ID]
    assert {_service_of(s) for s in spans} == set(SERVICES), sorted((_service_of(s), s.name) for s in spans)
    [server] = [s for s in spans if s.kind == SpanKind.SERVER]
    assert (_service_of(server), server.name) == ("conversiones", "POST /conversiones")
    assert server.attributes["http.route"] == "/conversiones" and server.attributes["http.response.status_code"] < 300
    assert f"{server.parent.span_id:016x}" == CALLER_SPAN and server.parent.is_remote
    consumers = [s for s in spans if s.kind == SpanKind.CONSUMER]
    # conversiones too: marketing's answer to the saga's commission request comes back to it.
    assert {_service_of(s) for s in consumers} == set(SERVICES)
    # One tree: every span's parent is the caller's span or another span of the trace.
    ids = {s.context.span_id for s in spans} | {int(CALLER_SPAN, 16)}
    assert all(s.parent is not None and s.parent.span_id in ids for s in spans)
    validated = next(s for s in consumers if s.attributes["alpes.event_type"] == "ConversionValidated"
                     and s.attributes["messaging.consumer.group.name"] == "marketing-consumer")
    assert validated.attributes["messaging.destination.name"] == "conversiones.eventos"
    assert validated.name == "marketing-consumer ConversionValidated"

    # Every event the postback caused, in every service's outbox, carries a traceparent of that trace.
    caused = {name: [r for r in Pump._outbox(runtime) if r["id"] > marks[name]] for name, runtime in runtimes.items()}
    assert caused["conversiones"] and caused["marketing"] and caused["auditoria"]
    for name, rows in caused.items():
        assert all(_trace_of(r["traceparent"]) == TRACE_ID for r in rows), \
            [(name, r["event_type"], r["traceparent"]) for r in rows]
    # The events a consumer emitted name its span as their parent.
    consumer_span_ids = {f"{s.context.span_id:016x}" for s in consumers}
    commission = [r for r in caused["marketing"] if r["event_type"] == "ComisionCalculada"]
    assert commission and all(r["traceparent"].split("-")[2] in consumer_span_ids for r in commission)


def test_a_request_without_traceparent_starts_a_trace_its_events_carry(platform):
    clients, runtimes, pump, exporter = platform
    assert clients["afiliados"].get("/health").status_code in (200, 503)
    assert exporter.get_finished_spans() == ()  # probes and scrapes are not traced
    _enabled_affiliate(clients, runtimes, pump)
    [request] = [s for s in exporter.get_finished_spans() if s.kind == SpanKind.SERVER]
    assert request.name == "POST /afiliados" and request.parent is None
    [registered] = [r for r in Pump._outbox(runtimes["afiliados"]) if r["event_type"] == "AfiliadoRegistrado"]
    assert _trace_of(registered["traceparent"]) == f"{request.context.trace_id:032x}"
    # The validation job starts no span: its event has no traceparent, and its consumers continue
    # the trace named by its correlation id.
    [validated] = [r for r in Pump._outbox(runtimes["afiliados"]) if r["event_type"] == "AfiliadoValidado"]
    assert validated["traceparent"] is None
    audited = [s for s in exporter.get_finished_spans()
               if s.attributes.get("messaging.message.id") == validated["event_id"]]
    assert audited and {f"{s.context.trace_id:032x}" for s in audited} == {uuid.UUID(validated["correlation_id"]).hex}


def test_without_an_endpoint_nothing_is_recorded_yet_the_trace_id_travels(monkeypatch):
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_SDK_DISABLED"):
        monkeypatch.delenv(name, raising=False)
    tracing = Tracing.from_environment("marketing")
    assert tracing.provider is None  # no SDK provider, no processor, no exporter
    event = IncomingEvent("conversiones.eventos", "marketing-consumer", str(uuid.uuid4()), "ConversionValidated", 1,
                          "k", utcnow(), str(uuid.uuid4()), str(uuid.uuid4()), {}, traceparent=TRACEPARENT)
    with tracing.consuming(event, "marketing-consumer") as emitted:
        assert emitted == current_traceparent()
        version, trace_id, span_id, flags = emitted.split("-")
        assert (version, trace_id, flags) == ("00", TRACE_ID, "01") and span_id != CALLER_SPAN
        assert len(emitted) == 55
        logged = add_trace_ids(None, "info", {"event": "x"})
        assert (logged["trace_id"], logged["span_id"], logged["correlation_id"]) == (TRACE_ID, span_id,
                                                                                        event.correlation_id)
    assert current_traceparent() is None and "trace_id" not in add_trace_ids(None, "info", {})


def test_an_endpoint_configured_sets_up_an_otlp_exporter_sending_nothing_yet(monkeypatch):
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    monkeypatch.delenv("OTEL_SDK_DISABLED", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    tracing = Tracing.from_environment("auditoria")
    try:
        assert tracing.provider is not None
        assert tracing.provider.resource.attributes["service.name"] == "auditoria"
        [processor] = tracing.provider._active_span_processor._span_processors
        assert isinstance(processor, BatchSpanProcessor)
        exporter = processor._batch_processor._exporter
        assert isinstance(exporter, OTLPSpanExporter) and exporter._endpoint == "http://127.0.0.1:9/v1/traces"
    finally:
        tracing.shutdown()  # no span was made: nothing to send
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://127.0.0.1:9/traces")
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert Tracing.from_environment("auditoria").provider is None


def test_a_message_without_traceparent_continues_the_trace_of_its_correlation_id():
    correlation, event_id = uuid.uuid4(), uuid.uuid4()
    from opentelemetry import trace

    parent = trace.get_current_span(message_parent(None, str(correlation), str(event_id))).get_span_context()
    assert (parent.trace_id, parent.span_id) == (correlation.int, event_id.int >> 64)
    assert not trace.get_current_span(message_parent(None, "not-a-uuid", "e-1")).get_span_context().is_valid
    given = trace.get_current_span(message_parent(TRACEPARENT, str(correlation), str(event_id))).get_span_context()
    assert f"{given.trace_id:032x}" == TRACE_ID  # a traceparent, when there is one, wins


def test_the_signature_covers_the_traceparent():
    signer = EventSigner([b"k" * 32])
    properties = properties_of(str(uuid.uuid4()), "ConversionValidated", 2, utcnow(), "c", "c", "conversiones-1",
                               traceparent=TRACEPARENT)
    properties["signature"] = signer.sign("conversiones.eventos", "key", properties, b"payload")
    signer.verify("conversiones.eventos", "key", properties, b"payload")
    for forged in ({**properties, "traceparent": f"00-{'1' * 32}-{CALLER_SPAN}-01"},
                   {k: v for k, v in properties.items() if k != "traceparent"}):
        with pytest.raises(ForgedMessage):
            signer.verify("conversiones.eventos", "key", forged, b"payload")
    without = properties_of(str(uuid.uuid4()), "ConversionValidated", 2, utcnow(), "c", "c", "conversiones-1")
    assert "traceparent" not in without
    without["signature"] = signer.sign("conversiones.eventos", "key", without, b"payload")
    signer.verify("conversiones.eventos", "key", without, b"payload")
