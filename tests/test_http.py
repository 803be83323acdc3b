"""HTTP contract of each service, in-process (no broker): 4xx on bad input, nothing half-written,
state and its events committed together in the outbox."""

from __future__ import annotations

from importlib import import_module

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError

from alpes.settings import Settings


def _client(name: str, tmp_path) -> tuple[TestClient, object, object]:
    settings = Settings(data_dir=tmp_path, broker_url="pulsar://127.0.0.1:1")
    app, runtime = import_module(f"alpes.{name}.service").build(settings)
    tables = import_module(f"alpes.{name}.tables")
    # No `with`: the lifespan (relay, consumers) does not start; requests still commit.
    return TestClient(app), runtime, tables


def _count(runtime, table) -> int:
    with runtime.db.transaction() as session:
        return session.scalar(select(func.count()).select_from(table))


def _fields(response) -> set[str]:
    return {e["field"] for e in response.json()["errors"]}


@pytest.fixture
def afiliados(tmp_path):
    return _client("afiliados", tmp_path)


@pytest.fixture
def marketing(tmp_path):
    return _client("marketing", tmp_path)


@pytest.fixture
def conversiones(tmp_path):
    return _client("conversiones", tmp_path)


def test_register_affiliate_commits_row_and_event_together(afiliados):
    client, runtime, tables = afiliados
    response = client.post("/afiliados", json={"user_id": "u1", "email": "Ana@Example.com", "nombre": "Ana"})
    assert response.status_code == 201
    body = response.json()
    assert body["email"] == "ana@example.com" and body["estado"] == "registrado"
    with runtime.db.transaction() as session:
        rows = session.execute(select(tables.outbox)).mappings().all()
    assert [(r["event_type"], r["partition_key"], r["topic"], r["status"]) for r in rows] == [
        ("AfiliadoRegistrado", body["id"], "afiliados.eventos", "pending")]
    assert client.get(f"/afiliados/{body['id']}").json()["id"] == body["id"]
    assert [a["id"] for a in client.get("/afiliados").json()["afiliados"]] == [body["id"]]


def test_a_deadlock_at_commit_answers_503_retry_and_stores_nothing(afiliados, monkeypatch):
    """MariaDB picks a victim among concurrent writers (error 1213): that request's unit of work
    is rolled back whole and the caller is told to retry, not handed a bare 500."""
    client, runtime, tables = afiliados

    def deadlocked(session, events, actor=None):  # after the affiliate row was added to the session
        raise OperationalError("INSERT INTO outbox ...", {}, Exception(1213, "Deadlock found when trying to get lock"))
    monkeypatch.setattr(runtime.outbox, "add", deadlocked)
    response = client.post("/afiliados", json={"user_id": "u1", "email": "ana@example.com", "nombre": "Ana"})
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert response.json()["detail"].endswith("retry") and "INSERT" not in response.text
    assert _count(runtime, tables.afiliados) == 0 and _count(runtime, tables.outbox) == 0
    monkeypatch.undo()
    assert client.post("/afiliados", json={"user_id": "u1", "email": "ana@example.com", "nombre": "Ana"}).status_code == 201
    assert "503" in client.get("/openapi.json").json()["paths"]["/afiliados"]["post"]["responses"]


def test_duplicate_email_is_registered_like_any_other_then_rejected(afiliados):
    """No 409: it would tell anyone whether an address is registered (issue 10). The validation
    rejects it (`cuenta_duplicada`, tests/test_affiliate_validation.py)."""
    client, runtime, tables = afiliados
    assert client.post("/afiliados", json={"user_id": "u1", "email": "a@b.co", "nombre": "Ana"}).status_code == 201
    response = client.post("/afiliados", json={"user_id": "u2", "email": "A@B.co", "nombre": "Bea"})
    assert response.status_code == 201 and response.json()["estado"] == "registrado"
    assert _count(runtime, tables.afiliados) == 2 and _count(runtime, tables.outbox) == 2


@pytest.mark.parametrize("body, field", [
    ({"email": "a@b.co", "nombre": "Ana"}, "user_id"),
    ({"user_id": "u", "email": "nope", "nombre": "Ana"}, "email"),
    ({"user_id": "u", "email": "a@b.co", "nombre": ""}, "nombre"),
    ({"user_id": "u", "email": "a@b.co", "nombre": "x" * 201}, "nombre"),
    ({"user_id": "u", "email": "a@b.co", "nombre": "Ana", "admin": True}, "admin"),
    ({"user_id": 5, "email": "a@b.co", "nombre": "Ana"}, "user_id"),
])
def test_bad_affiliate_bodies_answer_422_and_store_nothing(afiliados, body, field):
    client, runtime, tables = afiliados
    response = client.post("/afiliados", json=body)
    assert response.status_code == 422
    assert field in _fields(response)
    assert _count(runtime, tables.afiliados) == 0 and _count(runtime, tables.outbox) == 0


def test_unknown_affiliate_is_404(afiliados):
    client, _, _ = afiliados
    response = client.get("/afiliados/nope")
    assert response.status_code == 404 and _fields(response) == {"afiliado_id"}


def test_create_campaign_with_exact_percentage(marketing):
    client, runtime, tables = marketing
    response = client.post("/campanas", json={"nombre": "BF", "porcentaje_comision": "12.3456", "moneda": "usd"})
    assert response.status_code == 201
    body = response.json()
    assert body["porcentaje_comision"] == "12.3456" and body["moneda"] == "USD"
    assert client.get(f"/campanas/{body['id']}").json() == body
    with runtime.db.transaction() as session:
        assert session.scalar(select(tables.outbox.c.event_type)) == "CampanaCreada"


@pytest.mark.parametrize("body, field", [
    ({"nombre": "X", "porcentaje_comision": 150}, "porcentaje_comision"),
    ({"nombre": "X", "porcentaje_comision": -1}, "porcentaje_comision"),
    ({"nombre": "X", "porcentaje_comision": "abc"}, "porcentaje_comision"),
    ({"nombre": "X", "porcentaje_comision": "1.23456"}, "porcentaje_comision"),
    ({"nombre": "X", "porcentaje_comision": "NaN"}, "porcentaje_comision"),
    ({"nombre": "X", "porcentaje_comision": True}, "porcentaje_comision"),
    ({"nombre": "X", "porcentaje_comision": 10, "moneda": "XXX"}, "moneda"),
    ({"porcentaje_comision": 10}, "nombre"),
])
def test_bad_campaigns_answer_422_and_store_nothing(marketing, body, field):
    client, runtime, tables = marketing
    response = client.post("/campanas", json=body)
    assert response.status_code == 422 and field in _fields(response)
    assert _count(runtime, tables.campanas) == 0 and _count(runtime, tables.outbox) == 0


POSTBACK = {"affiliate_id": "a1", "campaign_id": "k1", "user_id": "cust", "conversion_value": "99.99",
            "conversion_type": "sale"}


def test_postback_answers_200_with_id_and_is_idempotent_by_order_id(conversiones):
    client, runtime, tables = conversiones
    first = client.post("/conversiones", json={**POSTBACK, "order_id": "o-1"})
    assert first.status_code == 200
    again = client.post("/conversiones", json={**POSTBACK, "order_id": "o-1"})
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"] and again.json()["duplicate"]
    # The same key with other parameters is a conflict, not a duplicate (issue 10; test_holes_idempotency).
    assert client.post("/conversiones", json={**POSTBACK, "order_id": "o-1", "conversion_value": "1.00"}
                       ).status_code == 409
    by_header = client.post("/conversiones", json=POSTBACK, headers={"Idempotency-Key": "o-1"})
    assert by_header.json()["id"] == first.json()["id"]
    other_campaign = client.post("/conversiones", json={**POSTBACK, "campaign_id": "k2", "order_id": "o-1"})
    assert other_campaign.json()["id"] != first.json()["id"]  # order ids are unique per campaign
    assert _count(runtime, tables.conversiones_view) == 2
    with runtime.db.transaction() as session:
        stored = session.execute(select(tables.event_store)).mappings().all()
        outbox = session.execute(select(tables.outbox).order_by(tables.outbox.c.id)).mappings().all()
    assert sorted(r["event_type"] for r in stored) == ["ConversionDetected", "ConversionDetected"]
    assert [r["event_id"] for r in outbox] == [r["event_id"] for r in sorted(stored, key=lambda r: r["recorded_at"])]


def test_conversion_list_is_oldest_first_with_contract_fields(conversiones):
    client, _, _ = conversiones
    ids = [client.post("/conversiones", json={**POSTBACK, "user_id": f"c{i}"}).json()["id"] for i in range(5)]
    listed = client.get("/conversiones").json()["conversiones"]
    assert [c["id"] for c in listed] == ids
    assert {"id", "affiliate_id", "campaign_id", "user_id", "conversion_value", "conversion_type", "status",
            "timestamp"} <= set(listed[0])
    assert listed[0]["conversion_value"] == "99.99" and listed[0]["status"] == "detected"
    history = client.get(f"/conversiones/{ids[0]}/eventos").json()["eventos"]
    assert [e["event_type"] for e in history] == ["ConversionDetected"] and history[0]["schema_version"] == 2


@pytest.mark.parametrize("change, field", [
    ({"conversion_value": -5}, "conversion_value"),
    ({"conversion_value": 0}, "conversion_value"),
    ({"conversion_value": "1e400"}, "conversion_value"),
    ({"conversion_value": "10.001"}, "conversion_value"),
    ({"conversion_value": "Infinity"}, "conversion_value"),
    ({"conversion_value": "ten"}, "conversion_value"),
    ({"conversion_value": 10**14}, "conversion_value"),
    ({"currency": "ZZZ"}, "currency"),
    ({"conversion_type": "refund"}, "conversion_type"),
    ({"affiliate_id": "a1'; DROP TABLE x;--"}, "affiliate_id"),
    ({"affiliate_id": ""}, "affiliate_id"),
    ({"order_id": "o" * 121}, "order_id"),
    ({"surprise": 1}, "surprise"),
])
def test_bad_postbacks_answer_422_and_store_nothing(conversiones, change, field):
    client, runtime, tables = conversiones
    response = client.post("/conversiones", json={**POSTBACK, **change})
    assert response.status_code == 422 and field in _fields(response), response.json()
    assert _count(runtime, tables.event_store) == 0 and _count(runtime, tables.outbox) == 0


def test_wrong_content_type_and_broken_json_are_4xx(conversiones):
    client, runtime, tables = conversiones
    wrong = client.post("/conversiones", content=b"affiliate_id=a1", headers={"content-type": "text/plain"})
    assert wrong.status_code == 415 and _fields(wrong) == {"content-type"}
    assert client.post("/conversiones", content=b"{not json", headers={"content-type": "application/json"}).status_code == 422
    assert _count(runtime, tables.event_store) == 0


def test_health_tells_the_truth_when_the_broker_is_unreachable(conversiones):
    client, _, _ = conversiones
    response = client.get("/health")
    assert response.status_code == 503
    body = response.json()
    assert body["broker"]["ok"] is False and body["database"]["ok"] is True
    assert body["outbox"]["pending"] == 0
