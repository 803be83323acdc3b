"""Issue 10 hole: idempotency conflicts. The same order id (or Idempotency-Key) with a different
payload was answered as a duplicate of the first, and 10 racing postbacks with different values
kept one silently. Now, as Stripe does: the same key with the same parameters → 200 with the same
id; with different parameters → 409 naming the key. Keys are scoped per advertiser
(test_access_conversiones.py); the campaigns here have none, so per campaign. The Idempotency-Key
header gets the rules of the body's order_id. On SQLite and MariaDB."""

from __future__ import annotations

import threading
from importlib import import_module

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from alpes.settings import Settings

POSTBACK = {"affiliate_id": "a1", "campaign_id": "k1", "user_id": "cust", "conversion_value": "99.99",
            "conversion_type": "sale"}


@pytest.fixture
def conversiones(db_url, tmp_path):
    settings = Settings(data_dir=tmp_path, broker_url="pulsar://127.0.0.1:1", conversiones_db_url=db_url)
    app, runtime = import_module("alpes.conversiones.service").build(settings)
    yield app, runtime, import_module("alpes.conversiones.tables")
    runtime.db.dispose()


def _count(runtime, table) -> int:
    with runtime.db.read() as session:
        return session.scalar(select(func.count()).select_from(table))


def _fields(response) -> list:
    return [e["field"] for e in response.json()["errors"]]


def test_the_same_key_with_other_parameters_is_a_409_naming_the_key(conversiones):
    app, runtime, tables = conversiones
    client = TestClient(app)
    first = client.post("/conversiones", json={**POSTBACK, "order_id": "o-1"})
    assert first.status_code == 200 and not first.json()["duplicate"]
    # The same parameters again, in the body or as the header: the same conversion.
    again = client.post("/conversiones", json={**POSTBACK, "order_id": "o-1"})
    by_header = client.post("/conversiones", json=POSTBACK, headers={"Idempotency-Key": "o-1"})
    assert again.status_code == by_header.status_code == 200
    assert again.json()["id"] == by_header.json()["id"] == first.json()["id"] and again.json()["duplicate"]
    for change in ({"conversion_value": "1.00"}, {"user_id": "other"}, {"conversion_type": "lead"},
                   {"currency": "USD"}, {"ip": "203.0.113.1"}, {"customer_email": "x@example.org"}):
        conflict = client.post("/conversiones", json={**POSTBACK, **change, "order_id": "o-1"})
        assert conflict.status_code == 409, (change, conflict.text)
        assert _fields(conflict) == ["order_id"] and "o-1" in conflict.json()["errors"][0]["reason"]
        header = client.post("/conversiones", json={**POSTBACK, **change}, headers={"Idempotency-Key": "o-1"})
        assert header.status_code == 409 and _fields(header) == ["idempotency-key"], header.text
    # Scoped per campaign: the same key on another campaign is another conversion.
    other = client.post("/conversiones", json={**POSTBACK, "campaign_id": "k2", "conversion_value": "5.00",
                                               "order_id": "o-1"})
    assert other.status_code == 200 and other.json()["id"] != first.json()["id"]
    assert _count(runtime, tables.conversiones_view) == 2


def test_ten_racing_postbacks_with_one_key_and_different_values_keep_one_and_refuse_nine(conversiones):
    app, runtime, tables = conversiones
    barrier = threading.Barrier(10)
    answers: list = [None] * 10

    def send(i: int) -> None:
        client = TestClient(app)
        barrier.wait()
        answers[i] = client.post("/conversiones", json={**POSTBACK, "conversion_value": f"{10 + i}.00"},
                                 headers={"Idempotency-Key": "race-1"})

    threads = [threading.Thread(target=send, args=(i,)) for i in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    statuses = sorted(a.status_code for a in answers)
    assert statuses == [200] + [409] * 9, [a.text for a in answers]
    [winner] = [a for a in answers if a.status_code == 200]
    assert all(_fields(a) == ["idempotency-key"] for a in answers if a.status_code == 409)
    assert _count(runtime, tables.conversiones_view) == 1 and _count(runtime, tables.order_keys) == 1
    value = TestClient(app).get(f"/conversiones/{winner.json()['id']}").json()["conversion_value"]
    # A retry of the winner is a duplicate; of any loser, still a conflict.
    retry = TestClient(app).post("/conversiones", json={**POSTBACK, "conversion_value": value},
                                 headers={"Idempotency-Key": "race-1"})
    assert retry.status_code == 200 and retry.json()["id"] == winner.json()["id"]


@pytest.mark.parametrize("key", ["<img src=x onerror=alert(1)>", "tab\there", "a" * 121, "x\u2028y", "bell\x07"])
def test_the_idempotency_key_header_gets_the_order_id_rules(conversiones, key):
    app, runtime, tables = conversiones
    client = TestClient(app)
    body = client.post("/conversiones", json={**POSTBACK, "order_id": key})
    assert body.status_code == 422 and _fields(body) == ["order_id"], body.text
    header = client.post("/conversiones", json=POSTBACK, headers={"Idempotency-Key": key.encode("utf-8")})
    assert header.status_code == 422 and _fields(header) == ["idempotency-key"], header.text
    assert _count(runtime, tables.event_store) == 0 and _count(runtime, tables.order_keys) == 0
