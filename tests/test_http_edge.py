"""The leaner HTTP edge (issue 11): conversiones' routes served by LeanRoute answer exactly what
FastAPI's own handler answers (values, statuses, the 4xx bodies naming field and reason, the order
of authentication and validation), a route LeanRoute cannot plan keeps FastAPI's handler, and the
one middleware layer (Edge) still counts, traces and refuses as the four layers it replaced did."""

from __future__ import annotations

import json
import re
from importlib import import_module

from access_helpers import bearer, install_key
from fastapi import BackgroundTasks, FastAPI
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

from alpes.kernel.lean_route import LeanRoute, lean_handler
from alpes.settings import Settings

POSTBACK = {"affiliate_id": "a1", "campaign_id": "k1", "user_id": "cust", "conversion_value": "99.99",
            "conversion_type": "sale"}
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


def _conversiones(tmp_path, monkeypatch=None, lean: bool = True, **settings):
    if not lean:  # the same service with FastAPI's generic handler on every route
        monkeypatch.setattr(import_module("alpes.conversiones.api"), "LeanRoute", APIRoute)
    app, runtime = import_module("alpes.conversiones.service").build(
        Settings(data_dir=tmp_path, broker_url="pulsar://127.0.0.1:1", **settings))
    if not lean:
        monkeypatch.undo()
    return app, runtime


def _routes(app) -> list[APIRoute]:
    """The app's API routes, those of included routers too (FastAPI keeps those behind a wrapper)."""
    found, pending = [], list(app.routes)
    while pending:
        route = pending.pop()
        included = getattr(route, "original_router", None)
        pending.extend(included.routes if included is not None else [])
        found += [route] if isinstance(route, APIRoute) else []
    return found


# What differs between two services by design: the ids they make up and the times they stamp.
_MADE_UP = re.compile(r"^([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|\d{4}-\d\d-\d\dT[\d:.]+(\+00:00|Z)?)$")


def _masked(value):
    if isinstance(value, dict):
        return {k: _masked(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_masked(v) for v in value]
    return "*" if isinstance(value, str) and _MADE_UP.match(value) else value


def _answer(response) -> tuple:
    try:
        body = _masked(response.json())
    except ValueError:
        body = response.content
    headers = {k: response.headers.get(k) for k in ("content-type", "www-authenticate", "retry-after", "location")}
    if headers["location"]:
        headers["location"] = headers["location"].split("alpes_click_id=")[0]
    return response.status_code, body, headers


JSON = {"content-type": "application/json"}
# (method, path, httpx keyword arguments): good and bad postbacks and reads, as callers send them.
REQUESTS = [
    ("POST", "/conversiones", {"json": POSTBACK}),
    ("POST", "/conversiones", {"json": {**POSTBACK, "order_id": "o-1"}}),
    ("POST", "/conversiones", {"json": {**POSTBACK, "order_id": "o-1"}}),  # the same order: the same answer
    ("POST", "/conversiones", {"json": {**POSTBACK, "order_id": "o-1", "conversion_value": "1.00"}}),  # 409
    ("POST", "/conversiones", {"json": POSTBACK, "headers": {"Idempotency-Key": "o-1"}}),
    ("POST", "/conversiones", {"json": POSTBACK, "headers": {"Idempotency-Key": "k" * 121}}),
    ("POST", "/conversiones", {"json": POSTBACK, "headers": {"Idempotency-Key": "<b>"}}),
    ("POST", "/conversiones", {"json": {**POSTBACK, "user_id": None, "surprise": 1, "ip": "999.1.1.1"}}),
    ("POST", "/conversiones", {"json": {**POSTBACK, "conversion_value": 12.345, "customer_email": "x"}}),
    ("POST", "/conversiones", {"json": {"user_id": "u", "conversion_value": "1.00", "conversion_type": "sale"}}),
    ("POST", "/conversiones", {"json": [1, 2]}),
    ("POST", "/conversiones", {"content": b"null", "headers": JSON}),
    ("POST", "/conversiones", {"content": b'{"user_id": ', "headers": JSON}),
    ("POST", "/conversiones", {"content": b"", "headers": JSON}),
    ("POST", "/conversiones", {"content": json.dumps({**POSTBACK, "user_id": "v"}).encode(),
                               "headers": {"content-type": "application/vnd.alpes+json; charset=utf-8"}}),
    ("POST", "/conversiones", {"content": json.dumps(POSTBACK).encode(), "headers": {"content-type": "text/x+json"}}),
    ("GET", "/conversiones?limit=0&status=bogus", {}),
    ("GET", "/conversiones?limit=2&offset=1", {}),
    ("GET", "/conversiones?campaign_id=k1", {}),
    ("GET", "/conversiones/cifras", {}),
    ("GET", "/conversiones/nope", {}),
    ("GET", "/conversiones/nope/eventos", {}),
    ("POST", "/conversiones/nope/aprobar", {}),
    ("POST", "/conversiones/nope/rechazar", {"json": {"motivo": ""}}),
    ("POST", "/conversiones/nope/reembolso", {"json": {"conversion_id": "other"}}),
    ("GET", "/r/nope", {}),
    ("GET", "/sagas?estado=bogus&limit=0", {}),
    ("GET", "/sagas?limit=5", {}),
    ("GET", "/sagas/nope", {}),
]


def test_lean_routes_answer_what_fastapis_handler_answers(tmp_path, monkeypatch):
    answers, documents = {}, {}
    for lean in (True, False):
        app, runtime = _conversiones(tmp_path / str(lean), monkeypatch, lean=lean, auth="required")
        postback = next(r for r in _routes(app) if r.path == "/conversiones" and "POST" in r.methods)
        assert isinstance(postback, LeanRoute) is lean
        client = TestClient(app)
        headers = bearer(install_key(runtime, "operator"))
        answers[lean] = [_answer(client.request(method, path, **{**kwargs, "headers": {**headers, **kwargs.get(
            "headers", {})}})) for method, path, kwargs in REQUESTS]
        documents[lean] = client.get("/openapi.json").json()
        runtime.db.dispose()
    for request, lean, generic in zip(REQUESTS, answers[True], answers[False]):
        assert lean == generic, request
    assert documents[True] == documents[False]  # declared and documented alike
    assert "Postback" in json.dumps(documents[True]["paths"]["/conversiones"]["post"]["requestBody"])
    statuses = [status for status, _, _ in answers[True]]
    assert statuses[:5] == [200, 200, 200, 409, 200] and 401 not in statuses and {404, 422} <= set(statuses)


def test_lean_routes_authenticate_after_reading_the_body_as_fastapi_does(tmp_path, monkeypatch):
    """No key: 401 with the challenge; no key and broken JSON: the JSON error first, as before."""
    answers = {}
    for lean in (True, False):
        app, runtime = _conversiones(tmp_path / str(lean), monkeypatch, lean=lean, auth="required")
        client = TestClient(app)
        answers[lean] = [_answer(client.post("/conversiones", json=POSTBACK)),
                         _answer(client.post("/conversiones", content=b"{", headers=JSON)),
                         _answer(client.post("/conversiones", json=POSTBACK, headers=bearer("alpes_op_x_y"))),
                         _answer(client.get("/conversiones?limit=0"))]
        runtime.db.dispose()
    assert answers[True] == answers[False]
    assert [status for status, _, _ in answers[True]] == [401, 422, 401, 401]


def test_a_route_lean_route_cannot_plan_keeps_fastapis_handler():
    ran = []

    def later(tasks: BackgroundTasks) -> dict:
        tasks.add_task(ran.append, "task")
        return {"ok": True}

    route = LeanRoute("/later", later, methods=["POST"])
    assert lean_handler(route) is None  # BackgroundTasks: only FastAPI's handler runs them
    app = FastAPI()
    app.router.add_api_route("/later", later, methods=["POST"], route_class_override=LeanRoute)
    assert TestClient(app).post("/later").json() == {"ok": True} and ran == ["task"]


def _count(text: str, **labels) -> float | None:
    return next((s.value for family in text_string_to_metric_families(text) for s in family.samples
                 if s.name == "alpes_http_request_duration_seconds_count" and s.labels == labels), None)


def test_the_one_edge_layer_counts_traces_and_refuses(tmp_path):
    app, runtime = _conversiones(tmp_path, auth="required", rate_limit_postbacks_per_key=2)
    exporter = InMemorySpanExporter()
    runtime.tracing.add_span_processor(SimpleSpanProcessor(exporter))
    client = TestClient(app)
    key = bearer(install_key(runtime, "operator"))
    accepted = client.post("/conversiones", json=POSTBACK, headers={**key, "traceparent": TRACEPARENT})
    assert accepted.status_code == 200
    assert client.post("/conversiones", json={**POSTBACK, "user_id": "u2"}, headers=key).status_code == 200
    limited = client.post("/conversiones", json={**POSTBACK, "user_id": "u3"}, headers=key)
    assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
    too_large = client.post("/conversiones", content=b'{"user_id": "' + b"x" * 70_000 + b'"}', headers=JSON)
    assert too_large.status_code == 413 and too_large.json()["errors"][0]["field"] == "body"
    form = client.post("/conversiones", content=b"a=1", headers={"content-type": "application/x-www-form-urlencoded"})
    assert form.status_code == 415
    deep = client.post("/conversiones", content=b"[" * 100_000 + b"]" * 100_000, headers=JSON)
    assert deep.status_code in (413, 422)
    text = client.get("/metrics", headers=key).text
    assert _count(text, route="/conversiones", method="POST", status="200") == 2
    assert _count(text, route="/conversiones", method="POST", status="429") == 1
    assert _count(text, route="unmatched", method="POST", status="413") >= 1
    assert _count(text, route="unmatched", method="POST", status="415") == 1
    client.request("BREW1", "/conversiones")
    client.request("BREW2", "/conversiones")
    assert _count(client.get("/metrics", headers=key).text, route="/conversiones", method="other", status="405") == 2
    spans = [s for s in exporter.get_finished_spans() if s.kind.name == "SERVER"]
    continued = [s for s in spans if f"{s.context.trace_id:032x}" == TRACE_ID]
    assert [s.name for s in continued] == ["POST /conversiones"]
    assert continued[0].parent.span_id == int(TRACEPARENT.split("-")[2], 16)
    assert continued[0].attributes["http.route"] == "/conversiones"
    assert continued[0].attributes["http.response.status_code"] == 200
    refused = [s for s in spans if s.attributes.get("http.response.status_code") == 415]
    assert [s.name for s in refused] == ["POST"]  # refused before routing: no template to name it by
    assert not [s for s in spans if s.name.startswith("GET /metrics")]  # scrapes are not traced
    runtime.db.dispose()
