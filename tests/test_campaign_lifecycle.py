"""Campaigns: terms (dates, landing URL, budget, windows, segmentation) and lifecycle
(activate, pause, end), each change an event that conversiones acts on."""

from __future__ import annotations

from datetime import datetime, timezone
from decimal import Decimal

import pytest
from sqlalchemy import select

from alpes.kernel.codec import SchemaRegistry
from alpes.kernel.messages import IncomingEvent
from alpes.marketing import domain
from harness import Platform, wait_until
from test_http import _client, _count, _fields


# -- domain -----------------------------------------------------------------------------------
@pytest.mark.parametrize("estado, accion, expected", [
    ("borrador", "activar", ("activa", "CampanaActivada")),
    ("activa", "pausar", ("pausada", "CampanaPausada")),
    ("pausada", "activar", ("activa", "CampanaActivada")),
    ("pausada", "finalizar", ("finalizada", "CampanaFinalizada")),
    ("borrador", "finalizar", ("finalizada", "CampanaFinalizada")),
])
def test_allowed_transitions(estado, accion, expected):
    assert domain.transicion(estado, accion) == expected


@pytest.mark.parametrize("estado, accion", [
    ("borrador", "pausar"), ("activa", "activar"), ("finalizada", "activar"), ("finalizada", "pausar"),
    ("finalizada", "finalizar"),
])
def test_refused_transitions(estado, accion):
    with pytest.raises(domain.TransicionInvalida):
        domain.transicion(estado, accion)


def test_segmentation_admits_only_matching_affiliates():
    seg = domain.Segmentacion(paises=frozenset({"CO", "MX"}), canales=frozenset({"blog"}))
    assert seg.admite("CO", "blog", "moda")
    assert not seg.admite("ES", "blog", "moda")
    assert not seg.admite("MX", "tiktok", None)
    assert domain.Segmentacion().admite(None, None, None)


def test_validity_window():
    start, end = datetime(2026, 1, 1, tzinfo=timezone.utc), datetime(2026, 2, 1, tzinfo=timezone.utc)
    vigencia = domain.Vigencia(start, end)
    assert vigencia.incluye(start) and not vigencia.incluye(end)
    with pytest.raises(ValueError):
        domain.Vigencia(end, start)


# -- marketing over HTTP ------------------------------------------------------------------------
@pytest.fixture
def marketing(tmp_path):
    return _client("marketing", tmp_path)


TERMS = {"nombre": "Verano", "porcentaje_comision": "8", "moneda": "COP",
         "fecha_inicio": "2026-12-01T00:00:00Z", "fecha_fin": "2027-03-01T00:00:00Z",
         "landing_url": "https://tienda.example.com/verano", "presupuesto": "1500000.00",
         "ventana_atribucion_dias": 60, "periodo_bloqueo_dias": 14,
         "segmentacion": {"paises": ["CO", "MX"], "canales": ["blog", "email"], "categorias": ["moda"]},
         "activar": False}


def _outbox(runtime, tables):
    with runtime.db.read() as session:
        return session.execute(select(tables.outbox).order_by(tables.outbox.c.id)).mappings().all()


def test_campaign_terms_are_stored_and_carried_by_campana_creada_v2(marketing):
    client, runtime, tables = marketing
    response = client.post("/campanas", json=TERMS)
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["estado"] == "borrador" and body["presupuesto"] == "1500000.00"
    assert body["segmentacion"] == {"paises": ["CO", "MX"], "canales": ["blog", "email"], "categorias": ["moda"]}
    assert (body["ventana_atribucion_dias"], body["periodo_bloqueo_dias"]) == (60, 14)
    [row] = _outbox(runtime, tables)
    registry = SchemaRegistry.from_directory()
    # Producers write the newest version; the terms are there from v2 on.
    assert (row["event_type"], row["schema_version"]) == ("CampanaCreada", registry.latest_version("CampanaCreada"))
    assert row["schema_version"] >= 2
    payload = registry.decode("CampanaCreada", row["payload"], row["schema_version"])
    assert payload["estado"] == "borrador" and payload["paises"] == ["CO", "MX"]
    assert payload["min_segundos_click_conversion"] is None and body["min_segundos_click_conversion"] is None
    assert payload["fecha_fin"] == datetime(2027, 3, 1, tzinfo=timezone.utc)


@pytest.mark.parametrize("change, field", [
    ({"fecha_fin": "2026-11-01T00:00:00Z"}, "fecha_fin"),
    ({"fecha_inicio": "2026-12-01T00:00:00"}, "fecha_inicio"),  # no time zone: ambiguous
    ({"landing_url": "ftp://tienda.example.com"}, "landing_url"),
    ({"presupuesto": "-5"}, "presupuesto"),
    ({"ventana_atribucion_dias": 0}, "ventana_atribucion_dias"),
    ({"periodo_bloqueo_dias": 400}, "periodo_bloqueo_dias"),
    ({"segmentacion": {"paises": ["col"]}}, "segmentacion.paises.0"),
    ({"segmentacion": {"planetas": ["marte"]}}, "segmentacion.planetas"),
])
def test_bad_terms_answer_422_and_store_nothing(marketing, change, field):
    client, runtime, tables = marketing
    response = client.post("/campanas", json={**TERMS, **change})
    assert response.status_code == 422 and field in _fields(response), response.json()
    assert _count(runtime, tables.campanas) == 0 and _count(runtime, tables.outbox) == 0


def test_lifecycle_changes_commit_with_their_events(marketing):
    client, runtime, tables = marketing
    campana = client.post("/campanas", json=TERMS).json()["id"]
    assert client.post(f"/campanas/{campana}/activar").json()["estado"] == "activa"
    assert client.post(f"/campanas/{campana}/pausar").json()["estado"] == "pausada"
    refused = client.post(f"/campanas/{campana}/pausar")
    assert refused.status_code == 409 and _fields(refused) == {"estado"}
    assert client.post(f"/campanas/{campana}/finalizar").json()["estado"] == "finalizada"
    assert client.post(f"/campanas/{campana}/activar").status_code == 409
    assert client.post("/campanas/nope/activar").status_code == 404
    assert [r["event_type"] for r in _outbox(runtime, tables)] == [
        "CampanaCreada", "CampanaActivada", "CampanaPausada", "CampanaFinalizada"]


def test_a_click_minimum_travels_to_conversiones(marketing, tmp_path):
    """The campaign's too_fast threshold is a term of the campaign, learned by conversiones."""
    from alpes.conversiones import reference as conversiones_reference, tables as conversiones_tables

    client, runtime, tables = marketing
    campana = client.post("/campanas", json={**TERMS, "min_segundos_click_conversion": 20}).json()
    assert campana["min_segundos_click_conversion"] == 20
    assert client.post("/campanas", json={**TERMS, "min_segundos_click_conversion": -1}).status_code == 422
    [row] = _outbox(runtime, tables)
    registry = SchemaRegistry.from_directory()
    payload = registry.decode("CampanaCreada", row["payload"], row["schema_version"])
    event = IncomingEvent("marketing.eventos", "conversiones-consumer", row["event_id"], "CampanaCreada",
                          row["schema_version"], campana["id"], payload["timestamp"], "c", "c", payload)
    _, conversiones_runtime, _ = _client("conversiones", tmp_path / "conversiones")
    with conversiones_runtime.db.transaction() as session:
        conversiones_reference.learn_campana(session, event)
    with conversiones_runtime.db.read() as session:
        learned = session.scalar(select(conversiones_tables.ref_campanas.c.min_segundos_click_conversion))
    assert learned == 20


def test_original_campaign_body_still_creates_an_active_campaign(marketing):
    client, _, _ = marketing
    body = client.post("/campanas", json={"nombre": "X", "porcentaje_comision": 10}).json()
    assert body["estado"] == "activa" and body["ventana_atribucion_dias"] == 30 and body["presupuesto"] is None


# -- conversiones learns the lifecycle from marketing.eventos ------------------------------------
def _incoming(registry, event_type: str, payload: dict, version: int) -> IncomingEvent:
    data, _ = registry.encode(event_type, payload, version)
    return IncomingEvent("marketing.eventos", "conversiones-consumer", f"{event_type}-{version}", event_type, version,
                         payload.get("id", ""), payload["timestamp"], "c", "c",
                         registry.decode(event_type, data, version), data)


def test_conversions_for_a_paused_campaign_are_rejected(tmp_path):
    from alpes.conversiones import reference

    client, runtime, _ = _client("conversiones", tmp_path)
    registry = SchemaRegistry.from_directory()
    now = datetime.now(timezone.utc)
    with runtime.db.transaction() as session:
        # A v1 CampanaCreada (no state field) is read as an active campaign.
        reference.learn_campana(session, _incoming(registry, "CampanaCreada", {
            "id": "k1", "nombre": "n", "porcentaje_comision": Decimal("10"), "moneda": "EUR", "timestamp": now}, 1))
        reference.learn_afiliado(session, _incoming(registry, "AfiliadoHabilitado", {"afiliado_id": "a1", "timestamp": now}, 1))
    postback = {"affiliate_id": "a1", "campaign_id": "k1", "user_id": "u", "conversion_value": "10.00",
                "conversion_type": "sale"}
    assert client.post("/conversiones", json=postback).json()["status"] == "validated"
    with runtime.db.transaction() as session:
        reference.learn_campana_estado(session, _incoming(registry, "CampanaPausada", {"id": "k1", "timestamp": now}, 1))
    paused = client.post("/conversiones", json=postback).json()
    assert client.get(f"/conversiones/{paused['id']}").json()["reason"] == "campaign_inactive"
    with runtime.db.transaction() as session:
        reference.learn_campana_estado(session, _incoming(registry, "CampanaActivada", {"id": "k1", "timestamp": now}, 1))
    assert client.post("/conversiones", json=postback).json()["status"] == "validated"


# -- through the running platform -----------------------------------------------------------------
def test_pausing_a_campaign_stops_its_commissions(tmp_path):
    platform = Platform(tmp_path / "alpes").start()
    try:
        afiliado = platform.post("afiliados", "/afiliados", {"user_id": "u", "email": "p@example.com",
                                                             "nombre": "Pat"}).json()["id"]
        campana = platform.post("marketing", "/campanas", {"nombre": "Pausable", "porcentaje_comision": 10}).json()["id"]
        postback = {"affiliate_id": afiliado, "campaign_id": campana, "user_id": "c", "conversion_value": "50.00",
                    "conversion_type": "sale"}
        wait_until(lambda: platform.post("conversiones", "/conversiones", postback).json()["status"] == "validated",
                   what="campaign and affiliate learned")
        assert platform.post("marketing", f"/campanas/{campana}/pausar", {}).status_code == 200
        rejected = wait_until(lambda: (r := platform.post("conversiones", "/conversiones", postback).json())["status"] == "rejected" and r,
                              what="pause reaches conversiones")
        assert platform.get("conversiones", f"/conversiones/{rejected['id']}")["reason"] == "campaign_inactive"
        assert platform.post("marketing", f"/campanas/{campana}/activar", {}).status_code == 200
        wait_until(lambda: platform.post("conversiones", "/conversiones", postback).json()["status"] == "validated",
                   what="reactivation reaches conversiones")
        trail = wait_until(lambda: (e := platform.get("auditoria", "/auditoria/eventos", aggregate_id=campana)["eventos"])
                           and len(e) >= 3 and e, what="campaign trail audited")
        assert [e["event_type"] for e in trail] == ["CampanaCreada", "CampanaPausada", "CampanaActivada"]
    finally:
        platform.stop()
