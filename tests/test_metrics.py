"""GET /metrics, in-process (no broker, no lifespan): Prometheus text format, latency by route
template with no id in any label, consumer and outbox figures read from the runtime, events
published by type and commission amounts by currency counted by the relay, operators only, and
a Grafana dashboard that asks only for metrics the services expose."""

from __future__ import annotations

import json
import re
import uuid
from decimal import Decimal
from importlib import import_module
from pathlib import Path

import pytest
from access_helpers import bearer, install_key
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from alpes.contract import SERVICES
from alpes.kernel.consumer import ConsumerWorker
from alpes.kernel.http import create_app
from alpes.kernel.inbox import InboxProcessor
from alpes.kernel.messages import OutgoingEvent, utcnow
from alpes.kernel.outbox import OutboxRelay
from alpes.settings import Settings

DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "alpes-dashboard.json"


def _service(name: str, tmp_path, **settings) -> tuple[TestClient, object]:
    app, runtime = import_module(f"alpes.{name}.service").build(
        Settings(data_dir=tmp_path / name, broker_url="pulsar://127.0.0.1:1", **settings))
    return TestClient(app), runtime  # no `with`: the lifespan (relay, consumers) does not start


def _scrape(client: TestClient, **kwargs) -> str:
    response = client.get("/metrics", **kwargs)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=")
    return response.text


def _samples(text: str, name: str) -> dict[frozenset, float]:
    """{labels as a frozenset of (name, value): value} of the samples called `name`."""
    return {frozenset(s.labels.items()): s.value for family in text_string_to_metric_families(text)
            for s in family.samples if s.name == name}


def _value(text: str, name: str, **labels) -> float | None:
    return _samples(text, name).get(frozenset(labels.items()))


class Publisher:
    """Confirms everything (or refuses everything, as an unreachable broker would)."""

    def __init__(self, refuse: bool = False) -> None:
        self.refuse = refuse

    def publish(self, messages):
        return {m.event_id: ("refused" if self.refuse else None) for m in messages}


def _relay(runtime, refuse: bool = False) -> OutboxRelay:
    runtime.relay = OutboxRelay(runtime.db, runtime.outbox.table, Publisher(refuse),
                                on_published=runtime.metrics.published)
    return runtime.relay


def test_latency_is_labelled_by_route_template_and_no_id_reaches_the_scrape(tmp_path):
    client, _ = _service("afiliados", tmp_path)
    afiliado = client.post("/afiliados", json={"user_id": "u1", "email": "ana@example.com", "nombre": "Ana"}).json()["id"]
    unknown = str(uuid.uuid4())
    assert client.get(f"/afiliados/{afiliado}").status_code == 200
    assert client.get(f"/afiliados/{unknown}").status_code == 404
    assert client.get(f"/no-such-path/{unknown}").status_code == 404
    assert client.request("BREW", f"/afiliados/{afiliado}").status_code == 405
    text = _scrape(client)
    count = "alpes_http_request_duration_seconds_count"
    assert _value(text, count, route="/afiliados", method="POST", status="201") == 1
    assert _value(text, count, route="/afiliados/{afiliado_id}", method="GET", status="200") == 1
    assert _value(text, count, route="/afiliados/{afiliado_id}", method="GET", status="404") == 1
    assert _value(text, count, route="unmatched", method="GET", status="404") == 1
    assert _value(text, count, route="/afiliados/{afiliado_id}", method="other", status="405") == 1
    assert afiliado not in text and unknown not in text and "BREW" not in text
    # The scrape itself is counted by the next one.
    assert _value(_scrape(client), count, route="/metrics", method="GET", status="200") == 1


def test_a_request_that_raises_is_counted_as_500(tmp_path):
    _, runtime = _service("auditoria", tmp_path)

    def include(app: FastAPI) -> None:
        @app.get("/boom/{thing}")
        def boom(thing: str):
            raise RuntimeError(thing)
    client = TestClient(create_app("boom", runtime, include), raise_server_exceptions=False)
    assert client.get("/boom/x1").status_code == 500
    assert _value(_scrape(client), "alpes_http_request_duration_seconds_count",
                  route="/boom/{thing}", method="GET", status="500") == 1


def test_relayed_events_count_by_topic_and_type_once_confirmed(tmp_path):
    client, runtime = _service("afiliados", tmp_path)
    for n in range(2):
        client.post("/afiliados", json={"user_id": f"u{n}", "email": f"a{n}@example.com", "nombre": "Ana"})
    text = _scrape(client)
    assert _value(text, "alpes_outbox_pending") == 2
    assert _value(text, "alpes_events_published_total", topic="afiliados.eventos", event_type="AfiliadoRegistrado") is None
    assert _relay(runtime, refuse=True).run_once() == (0, 2)
    text = _scrape(client)
    assert _value(text, "alpes_outbox_publish_failures_total") == 2
    assert _value(text, "alpes_events_published_total", topic="afiliados.eventos", event_type="AfiliadoRegistrado") is None
    assert _relay(runtime).run_once() == (2, 0)
    text = _scrape(client)
    assert _value(text, "alpes_events_published_total", topic="afiliados.eventos", event_type="AfiliadoRegistrado") == 2
    assert _value(text, "alpes_outbox_pending") == 0
    assert _value(text, "alpes_outbox_publish_duration_seconds_count") == 2  # both publish calls, refused or not


def _comision(monto: str, moneda: str) -> OutgoingEvent:
    comision_id = str(uuid.uuid4())
    return OutgoingEvent("comisiones.eventos", "ComisionCalculada", comision_id, {
        "id": comision_id, "conversion_id": str(uuid.uuid4()), "afiliado_id": "af-1", "campana_id": "ca-1",
        "base": Decimal("100.00"), "porcentaje": Decimal(10), "monto": Decimal(monto), "moneda": moneda,
        "timestamp": utcnow(), "regla_id": None, "version_reglas": None, "limitado_por": None})


def test_commission_amounts_are_summed_by_currency_as_decimals_when_published(tmp_path):
    client, runtime = _service("marketing", tmp_path)
    with runtime.unit_of_work() as (_session, emit):
        emit([_comision("0.10", "EUR"), _comision("0.20", "EUR"), _comision("5.00", "USD")])
    assert _value(_scrape(client), "alpes_commission_amount_total", moneda="EUR") is None
    _relay(runtime, refuse=True).run_once()  # not published: not counted
    assert _value(_scrape(client), "alpes_commission_amount_total", moneda="EUR") is None
    _relay(runtime).run_once()
    _relay(runtime).run_once()  # nothing left: nothing counted twice
    text = _scrape(client)
    # 0.10 + 0.20 in floats is 0.30000000000000004; summed as Decimal it is 0.30.
    assert _value(text, "alpes_commission_amount_total", moneda="EUR") == 0.3
    assert _value(text, "alpes_commission_amount_total", moneda="USD") == 5.0
    assert _value(text, "alpes_events_published_total", topic="comisiones.eventos",
                  event_type="ComisionCalculada") == 3


def test_consumer_figures_backlog_and_sagas_are_read_from_the_runtime(tmp_path):
    client, runtime = _service("conversiones", tmp_path)
    spec = runtime.consumer_specs[0]
    processor = InboxProcessor(runtime.db, runtime.inbox_table, runtime.outbox, spec.subscription, spec.handlers)
    worker = ConsumerWorker(None, runtime.registry, spec.topic, spec.subscription, processor.process,
                            consumer_name="test")  # never started: its counts are set below
    runtime.workers.append(worker)
    runtime.processors.append(processor)
    worker.state.received, worker.state.acked, worker.state.dead_lettered, worker.state.retrying = 9, 7, 1, 1
    processor.totals.duplicates = 2
    assert runtime.metrics.timed(spec.topic, spec.subscription, lambda events: {})([]) == {}

    class Backlog:
        def read(self):
            return {(spec.topic, spec.subscription): {"backlog": 42, "source": "test"},
                    ("other.eventos", "unknown"): {"backlog": None, "source": "test"}}
    runtime.backlog = Backlog()
    text = _scrape(client)
    key = {"topic": spec.topic, "subscription": spec.subscription}
    assert _value(text, "alpes_consumer_received_total", **key) == 9
    assert _value(text, "alpes_consumer_acked_total", **key) == 7
    assert _value(text, "alpes_consumer_dead_lettered_total", **key) == 1
    assert _value(text, "alpes_consumer_duplicates_total", **key) == 2
    assert _value(text, "alpes_consumer_retrying", **key) == 1
    assert _value(text, "alpes_consumer_processing_seconds_count", **key) == 1
    assert _samples(text, "alpes_subscription_backlog") == {frozenset(key.items()): 42}  # None: no sample
    assert _value(text, "alpes_sagas", state="running") == 0 and _value(text, "alpes_sagas", state="stuck") == 0
    assert _value(text, "alpes_rate_limiter_degraded") == 0


def test_metrics_are_for_operators_only(tmp_path):
    client, runtime = _service("marketing", tmp_path)
    assert client.get("/metrics").status_code == 200  # protected local mode: no key yet, anonymous is the operator
    client.app.state.access.gate.cache_seconds = 0  # see the keys below at once
    advertiser = install_key(runtime, "advertiser", anunciante_id=str(uuid.uuid4()))
    operator = install_key(runtime, "operator")
    limited = install_key(runtime, "operator", scopes=("campanas:read",))
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers=bearer(advertiser)).status_code == 403
    assert client.get("/metrics", headers=bearer(limited)).status_code == 403
    _scrape(client, headers=bearer(operator))
    required, _ = _service("afiliados", tmp_path, auth="required")
    assert required.get("/metrics").status_code == 401


def _exposed(text: str) -> set[str]:
    """Every series name the scrape declares, samples or not (a consumer family is empty until
    its worker starts): counters end in _total, histograms give _bucket, _sum and _count."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
    return {family.name + suffix for family in text_string_to_metric_families(text)
            for suffix in suffixes.get(family.type, ("",))}


def test_the_dashboard_asks_only_for_exposed_metrics(tmp_path):
    exposed = set()
    for name in SERVICES:
        client, _ = _service(name, tmp_path)
        exposed |= _exposed(_scrape(client))
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    assert exprs, "the dashboard has no query"
    used = set()
    for expr in exprs:
        names = set(re.findall(r"\b(?:alpes|process)_[a-z_]+\b", expr))
        assert names, f"a query that names no metric: {expr}"
        assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), expr
        used |= names
    assert used <= exposed, f"the dashboard asks for metrics no service exposes: {sorted(used - exposed)}"
    # What the dashboard is for: latency by route, backlog, dead letters, outbox, outcomes, money.
    assert {"alpes_http_request_duration_seconds_bucket", "alpes_subscription_backlog",
            "alpes_consumer_dead_lettered_total", "alpes_outbox_pending", "alpes_events_published_total",
            "alpes_commission_amount_total", "alpes_sagas"} <= used
    assert any("ConversionValidated|ConversionRejected|ConversionHeld|ConversionRefunded" in e for e in exprs)


@pytest.mark.parametrize("name", SERVICES)
def test_every_service_serves_metrics_documented_as_text(name, tmp_path):
    client, _ = _service(name, tmp_path)
    operation = client.get("/openapi.json").json()["paths"]["/metrics"]["get"]
    assert "text/plain" in operation["responses"]["200"]["content"]
    assert operation["x-alpes-roles"] == ["operator"] and operation["x-alpes-scope"] == "sistema:read"
    assert "alpes_http_request_duration_seconds" in _scrape(client)
