"""Tenant scoping in afiliados (issue 10): who sees and changes which affiliate and program.

Advertiser A onboards an affiliate and runs a program another affiliate joins; advertiser B has its
own. Operator, A, B and affiliates X and Y then try to read and change each other's affiliates by
id and by filter. Reads of another tenant's affiliate answer 404 exactly like an unknown id; lists
are filtered; a refused write stores and emits nothing. Campaign owners and enrollments reach
afiliados through its consumer of marketing.eventos, in any order.
"""

from __future__ import annotations

from datetime import datetime, timezone
from decimal import Decimal
from importlib import import_module

import pytest
from access_helpers import bearer, install_key
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from alpes.afiliados import consumers, tables
from alpes.kernel.codec import SchemaRegistry
from alpes.kernel.messages import IncomingEvent
from alpes.settings import Settings

REGISTRY = SchemaRegistry.from_directory()
# Every test on SQLite and MariaDB (db_url): the scoping is SQL, and both must agree.
NOW = datetime(2026, 12, 5, 12, 0, tzinfo=timezone.utc)
PAPERS = {"tipo_documento": "CC", "numero_documento": "AB12345", "pais": "CO", "metodo_pago": "paypal"}


@pytest.fixture
def afiliados(tmp_path, db_url):
    settings = Settings(data_dir=tmp_path, broker_url="pulsar://127.0.0.1:1", afiliados_db_url=db_url)
    app, runtime = import_module("alpes.afiliados.service").build(settings)
    yield TestClient(app), runtime
    runtime.db.dispose()


def _validate(runtime) -> None:
    next(job for job in runtime.jobs if job.name == "validate-afiliados").run()


def _marketing(runtime, event_type: str, payload: dict, version: int | None = None) -> None:
    """One marketing.eventos message through Avro (written as `version`, read as the newest) and the
    afiliados-consumer's handler for it."""
    version = version or REGISTRY.latest_version(event_type)
    data, _ = REGISTRY.encode(event_type, payload, version)
    event = IncomingEvent("marketing.eventos", "afiliados-consumer", f"{event_type}-{payload.get('id')}-"
                          f"{payload.get('inscripcion_id')}", event_type, version, payload.get("id", ""), NOW, "c", "c",
                          REGISTRY.decode(event_type, data, version), data)
    spec = next(s for s in consumers.consumer_specs() if s.topic == "marketing.eventos")
    with runtime.db.transaction() as session:
        spec.handlers[event_type](session, event)


def _campana(runtime, campana_id: str, anunciante_id: str | None, version: int | None = None) -> None:
    payload = {"id": campana_id, "nombre": f"Programa {campana_id}", "porcentaje_comision": Decimal("12.5"),
               "moneda": "EUR", "timestamp": NOW}
    if anunciante_id is not None:
        payload["anunciante_id"] = anunciante_id
    _marketing(runtime, "CampanaCreada", payload, version)


def _inscribir(runtime, afiliado_id: str, campana_id: str) -> None:
    _marketing(runtime, "AfiliadoInscrito", {"inscripcion_id": f"i-{afiliado_id[:8]}-{campana_id}",
                                             "campana_id": campana_id, "afiliado_id": afiliado_id,
                                             "link_code": "abc", "timestamp": NOW})


def _outbox(runtime) -> int:
    with runtime.db.read() as session:
        return session.scalar(select(func.count()).select_from(tables.outbox))


@pytest.fixture
def world(afiliados):
    """Operator registers X (enrolled in A's program) and Y; A registers RA, B registers RB.
    The enrollment arrives before the program it is in (different partition keys)."""
    client, runtime = afiliados
    keys = {"op": install_key(runtime, "operator"), "A": install_key(runtime, "advertiser", anunciante_id="A"),
            "B": install_key(runtime, "advertiser", anunciante_id="B")}
    h = {name: bearer(key) for name, key in keys.items()}

    def register(who: str, user: str, email: str, **extra) -> str:
        response = client.post("/afiliados", json={"user_id": user, "email": email, "nombre": f"Nombre {user}",
                                                   **extra}, headers=h[who])
        assert response.status_code == 201, response.text
        return response.json()["id"]

    ids = {"X": register("op", "x", "equis@example.com", **PAPERS),
           "Y": register("op", "y", "ye@example.com"),
           "RA": register("A", "ra", "ra.perez@example.com", **{**PAPERS, "numero_documento": "RA99887"}),
           "RB": register("B", "rb", "rb@example.com")}
    _validate(runtime)
    _inscribir(runtime, ids["X"], "kA")
    _campana(runtime, "kA", "A")
    _campana(runtime, "kB", "B")
    h["X"] = bearer(install_key(runtime, "affiliate", afiliado_id=ids["X"]))
    h["Y"] = bearer(install_key(runtime, "affiliate", afiliado_id=ids["Y"]))
    return client, runtime, h, ids


def _ids(response) -> set[str]:
    assert response.status_code == 200, response.text
    return {a["id"] for a in response.json()["afiliados"]}


def test_anonymous_is_refused_once_keys_exist(world):
    client, _, _, ids = world
    assert client.get("/afiliados").status_code == 401
    assert client.get(f"/afiliados/{ids['X']}").status_code == 401
    assert client.post("/afiliados", json={"user_id": "z", "email": "z@example.com", "nombre": "Zeta"}).status_code == 401


def test_lists_are_filtered_to_the_callers_tenant(world):
    client, _, h, ids = world
    assert _ids(client.get("/afiliados", headers=h["op"])) == set(ids.values())
    # A: the one it onboarded and the one in its program (learnt before the program itself).
    assert _ids(client.get("/afiliados", headers=h["A"])) == {ids["RA"], ids["X"]}
    assert _ids(client.get("/afiliados", headers=h["B"])) == {ids["RB"]}
    assert _ids(client.get("/afiliados", headers=h["X"])) == {ids["X"]}
    assert _ids(client.get("/afiliados", headers=h["Y"])) == {ids["Y"]}
    # A filter does not widen the tenant.
    assert _ids(client.get("/afiliados", params={"estado": "validado"}, headers=h["B"])) == {ids["RB"]}
    assert _ids(client.get("/afiliados", params={"estado": "validado", "limit": 1000}, headers=h["Y"])) == {ids["Y"]}


@pytest.mark.parametrize("caller, other", [("A", "RB"), ("A", "Y"), ("B", "RA"), ("B", "X"), ("X", "Y"), ("X", "RA"),
                                           ("Y", "X")])
def test_another_tenants_affiliate_is_not_found_like_an_unknown_id(world, caller, other):
    client, _, h, ids = world
    foreign = client.get(f"/afiliados/{ids[other]}", headers=h[caller])
    unknown = client.get("/afiliados/no-such-affiliate", headers=h[caller])
    assert foreign.status_code == unknown.status_code == 404
    assert foreign.json() == unknown.json()


def test_an_advertiser_sees_the_partner_not_its_papers_nor_its_other_business(world):
    client, _, h, ids = world
    for afiliado in ("RA", "X"):
        response = client.get(f"/afiliados/{ids[afiliado]}", headers=h["A"])
        assert response.status_code == 200, response.text
        seen = response.json()
        assert seen["numero_documento"] is seen["metodo_pago"] is seen["tipo_documento"] is None
        assert "***" in seen["email"] and "@example.com" not in seen["email"]
        assert all(seen[k] is None for k in ("comisiones", "ganancias_pendientes", "ganancias_pagadas"))
        assert not any(doc in response.text for doc in ("AB12345", "****345", "RA99887", "****887"))
        assert "paypal" not in response.text
    listed = client.get("/afiliados", headers=h["A"]).text
    assert "equis@example.com" not in listed and "ra.perez@example.com" not in listed and "paypal" not in listed
    assert client.get(f"/afiliados/{ids['RA']}", headers=h["A"]).json()["registrado_por_anunciante"] == "A"


def test_an_affiliate_and_the_operator_see_the_full_record(world):
    client, _, h, ids = world
    own = client.get(f"/afiliados/{ids['X']}", headers=h["X"]).json()
    assert (own["email"], own["metodo_pago"], own["tipo_documento"]) == ("equis@example.com", "paypal", "CC")
    assert own["numero_documento"] == "****345" and own["ganancias_pendientes"] == "0.00"
    assert client.get(f"/afiliados/{ids['X']}", headers=h["op"]).json() == own
    assert client.get(f"/afiliados/{ids['RA']}", headers=h["op"]).json()["registrado_por_anunciante"] == "A"
    assert client.get(f"/afiliados/{ids['X']}", headers=h["op"]).json()["registrado_por_anunciante"] is None


def test_registrations_record_who_onboarded_and_carry_the_actor(world):
    client, runtime, h, _ = world
    created = client.post("/afiliados", json={"user_id": "n", "email": "nuevo@example.com", "nombre": "Nuevo"},
                          headers=h["B"])
    assert created.status_code == 201 and created.json()["registrado_por_anunciante"] == "B"
    o = tables.outbox
    with runtime.db.read() as session:
        actor = session.execute(select(o.c.actor_id, o.c.actor_role).where(o.c.partition_key == created.json()["id"])
                                ).one()
    assert actor.actor_role == "advertiser" and actor.actor_id not in ("system", "local-operator")
    # Affiliates register nobody (the rule), not even through the advertiser's path.
    assert client.post("/afiliados", json={"user_id": "s", "email": "s@example.com", "nombre": "Sole"},
                       headers=h["X"]).status_code == 403


def test_writes_only_on_affiliates_the_advertiser_onboarded(world):
    client, runtime, h, ids = world
    suspend = {"motivo": "fraude"}
    before = _outbox(runtime)
    # X is in A's program but A did not onboard it: not A's to suspend; B's and the operator's ones neither.
    for caller, target in [("A", "X"), ("A", "RB"), ("A", "Y"), ("B", "RA"), ("B", "X")]:
        response = client.post(f"/afiliados/{ids[target]}/suspender", json=suspend, headers=h[caller])
        assert response.status_code == 404, (caller, target, response.text)
        assert client.post(f"/afiliados/{ids[target]}/aprobar", headers=h[caller]).status_code == 404
    assert _outbox(runtime) == before
    assert {a["estado"] for a in client.get("/afiliados", headers=h["op"]).json()["afiliados"]} == {"validado"}

    assert client.post(f"/afiliados/{ids['RA']}/suspender", json=suspend, headers=h["A"]).json()["estado"] == "suspendido"
    assert client.get(f"/afiliados/{ids['RA']}", headers=h["A"]).json()["motivo_suspension"] == "fraude"
    assert client.post(f"/afiliados/{ids['RA']}/reactivar", headers=h["B"]).status_code == 404
    assert client.post(f"/afiliados/{ids['RA']}/reactivar", headers=h["A"]).json()["estado"] == "validado"
    assert client.post(f"/afiliados/{ids['RB']}/suspender", json=suspend, headers=h["op"]).status_code == 200
    # Affiliates change nobody, themselves included (the rule: 403 before anything is looked up).
    assert client.post(f"/afiliados/{ids['X']}/suspender", json=suspend, headers=h["X"]).status_code == 403
    assert client.post(f"/afiliados/{ids['X']}/aprobar", headers=h["X"]).status_code == 403


def test_overriding_a_rejection(world):
    client, runtime, h, _ = world
    throwaway = client.post("/afiliados", json={"user_id": "t", "email": "t@eu.mailinator.com", "nombre": "Tina"},
                            headers=h["A"]).json()["id"]
    duplicate = client.post("/afiliados", json={"user_id": "d", "email": "ra.perez@example.com", "nombre": "Dora"},
                            headers=h["A"]).json()["id"]
    foreign = client.post("/afiliados", json={"user_id": "f", "email": "f@mailinator.com", "nombre": "Fede"},
                          headers=h["B"]).json()["id"]
    _validate(runtime)
    before = _outbox(runtime)
    # B's rejected affiliate: A cannot approve it, and cannot tell it exists.
    assert client.post(f"/afiliados/{foreign}/aprobar", headers=h["A"]).status_code == 404
    # A duplicate only an operator overrides.
    refused = client.post(f"/afiliados/{duplicate}/aprobar", headers=h["A"])
    assert refused.status_code == 409 and refused.json()["errors"][0]["field"] == "motivos"
    assert _outbox(runtime) == before
    assert client.post(f"/afiliados/{throwaway}/aprobar", headers=h["A"]).json()["estado"] == "validado"
    assert client.post(f"/afiliados/{duplicate}/aprobar", headers=h["op"]).json()["estado"] == "validado"
    assert client.get(f"/afiliados/{foreign}", headers=h["B"]).json()["estado"] == "rechazado"


def test_erasure_is_the_operators(world):
    client, _, h, ids = world
    assert client.delete(f"/afiliados/{ids['RA']}/datos-personales", headers=h["A"]).status_code == 403
    assert client.delete(f"/afiliados/{ids['X']}/datos-personales", headers=h["X"]).status_code == 403
    assert client.get(f"/afiliados/{ids['RA']}", headers=h["op"]).json()["datos_personales_borrados"] is False
    erased = client.delete(f"/afiliados/{ids['RA']}/datos-personales", headers=h["op"])
    assert erased.status_code == 200 and erased.json()["datos_personales_borrados"] is True


def test_programs_operator_all_advertiser_its_own_affiliate_the_active_catalogue(world):
    client, runtime, h, _ = world
    _campana(runtime, "kOld", None, version=1)  # before campaigns had owners: nobody's but the operator's
    _marketing(runtime, "CampanaPausada", {"id": "kB", "timestamp": NOW})

    def programas(who: str) -> list[dict]:
        response = client.get("/programas", headers=h[who])
        assert response.status_code == 200, response.text
        return response.json()["programas"]

    assert {(p["id"], p["anunciante_id"], p["estado"]) for p in programas("op")} == {
        ("kA", "A", "activa"), ("kB", "B", "pausada"), ("kOld", None, "activa")}
    assert [p["id"] for p in programas("A")] == ["kA"]
    assert [p["id"] for p in programas("B")] == ["kB"]
    catalogue = programas("X")
    assert {p["id"] for p in catalogue} == {"kA", "kOld"}  # kB is paused
    assert all(set(p) == {"id", "nombre", "porcentaje_comision", "moneda"} for p in catalogue)
    _marketing(runtime, "CampanaActivada", {"id": "kB", "timestamp": NOW})
    _marketing(runtime, "CampanaFinalizada", {"id": "kA", "timestamp": NOW})
    assert {p["id"] for p in programas("Y")} == {"kB", "kOld"}


def test_an_enrollment_redelivered_or_in_a_program_of_no_one_widens_nothing(world):
    client, runtime, h, ids = world
    _inscribir(runtime, ids["Y"], "kOld")
    _inscribir(runtime, ids["Y"], "kOld")  # redelivered: once
    _campana(runtime, "kOld", None, version=1)
    assert ids["Y"] not in _ids(client.get("/afiliados", headers=h["A"]))
    assert ids["Y"] not in _ids(client.get("/afiliados", headers=h["B"]))
    with runtime.db.read() as session:
        assert session.scalar(select(func.count()).select_from(tables.inscripciones)) == 2
