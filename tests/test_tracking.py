"""Enrollment (marketing), tracking links and clicks, and click attribution with the campaign's
window (conversiones): rules, in-process HTTP, and once through the running platform."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from decimal import Decimal
from importlib import import_module
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from alpes.conversiones import domain as conversiones_domain
from alpes.conversiones import commands as conversiones_commands
from alpes.conversiones import records as conversiones_records
from alpes.conversiones import reference as conversiones_reference
from alpes.kernel.codec import SchemaRegistry
from alpes.kernel.proxies import parse_networks, resolve
from alpes.marketing import domain as marketing_domain
from alpes.marketing import campaigns
from alpes.settings import Settings
from harness import Platform, wait_until
from test_campaign_lifecycle import _incoming
from test_http import _client, _count, _fields

REGISTRY = SchemaRegistry.from_directory()
NOW = datetime(2026, 11, 28, 12, 0, tzinfo=timezone.utc)


# -- rules --------------------------------------------------------------------------------------
@pytest.mark.parametrize("converted_after, inside", [
    (timedelta(0), True), (timedelta(days=7), True), (timedelta(days=7, seconds=1), False),
    (timedelta(seconds=-1), False),  # a conversion before its click is not the click's
])
def test_attribution_window_counts_from_the_click_to_the_conversion(converted_after, inside):
    assert conversiones_domain.within_attribution_window(NOW, NOW + converted_after, timedelta(days=7)) is inside


def _detected(at: datetime) -> conversiones_domain.Conversion:
    return conversiones_domain.Conversion().apply(conversiones_domain.Detected(
        "c1", "a1", "k1", "u", Decimal("10.00"), "sale", None, "EUR", at))


def _reference(**changes) -> conversiones_domain.Reference:
    known = {"affiliate_enabled": True, "campaign_active": True, "campaign_currency": "EUR"}
    return conversiones_domain.Reference(**{**known, **changes})


def test_a_conversion_after_the_window_is_rejected_even_when_decided_late():
    late = _detected(NOW + timedelta(days=31))
    window = {"clicked_at": NOW, "attribution_window": timedelta(days=30), "affiliate_enrolled": True}
    [rejected] = conversiones_domain.decide_validation(late, _reference(**window), NOW + timedelta(days=40),
                                                       timedelta(seconds=10)).events
    assert rejected.reason == "outside_attribution_window"
    # Decided long after the window closed, but converted inside it: validated.
    on_time = _detected(NOW + timedelta(days=29))
    decision = conversiones_domain.decide_validation(on_time, _reference(**window), NOW + timedelta(days=40),
                                                     timedelta(seconds=10))
    assert isinstance(decision.events[0], conversiones_domain.Validated)


def test_a_non_enrolled_affiliate_waits_for_its_enrollment_then_is_rejected():
    conversion = _detected(NOW)
    grace = timedelta(seconds=10)
    assert conversiones_domain.decide_validation(conversion, _reference(affiliate_enrolled=False), NOW, grace).pending
    [rejected] = conversiones_domain.decide_validation(conversion, _reference(affiliate_enrolled=False),
                                                       NOW + grace, grace).events
    assert rejected.reason == "affiliate_not_enrolled"
    # Not enforced (None) for a campaign nobody enrolled in: the original postback contract.
    assert conversiones_domain.decide_validation(conversion, _reference(), NOW, grace).events


@pytest.mark.parametrize("landing", [
    "https://shop.example.com/v?utm=a&utm=b#top", "https://shop.example.com",
    "https://shop.example.com/p?alpes_click_id=old&q=ñ ü", "https://x.example/ALPESCLICKIDMARKER?a=ALPESCLICKIDMARKER",
    "https://x.example/a b/?q=%41&r=<x>"])
def test_the_location_cut_once_per_link_is_the_landing_url_with_the_click_id_as_redirects_send_it(landing):
    from starlette.responses import RedirectResponse
    before, after = conversiones_domain.landing_template(landing)
    for click_id in ("linkcodea1.AaIiBsoAO2fDr71z9O2rhcP_", "3f2b6c1e-8f0a-4c1e-9a57-8d2f6f1a0b7c"):
        expected = RedirectResponse(conversiones_domain.landing_with_click_id(landing, click_id)).headers["location"]
        assert before + click_id + after == expected


def test_landing_url_keeps_its_query_and_fragment_and_gets_the_click_id():
    url = conversiones_domain.landing_with_click_id("https://shop.example.com/v?utm=a&utm=b#top", "ck")
    parts = urlsplit(url)
    assert parse_qs(parts.query) == {"utm": ["a", "b"], "alpes_click_id": ["ck"]} and parts.fragment == "top"
    assert conversiones_domain.landing_with_click_id("https://shop.example.com", "ck") == \
        "https://shop.example.com?alpes_click_id=ck"


def test_client_ip_is_the_right_most_untrusted_forwarded_hop_from_a_trusted_proxy_else_the_peer():
    trusted = parse_networks("10.0.0.0/8")
    assert str(resolve("10.0.0.2", "203.0.113.9, 10.0.0.1", None, trusted)[0]) == "203.0.113.9"
    assert str(resolve("10.0.0.2", None, None, trusted)[0]) == "10.0.0.2"
    # X-Forwarded-For from anyone else is only a header (issue 10): the peer it is.
    assert str(resolve("198.51.100.7", "203.0.113.9", None, trusted)[0]) == "198.51.100.7"


def test_link_codes_are_short_url_safe_and_unique():
    codes = {marketing_domain.nuevo_link_code() for _ in range(5000)}
    assert len(codes) == 5000
    assert all(len(c) == 10 and c.isalnum() and c == c.lower() for c in codes)


def test_segmentation_names_the_criterion_an_affiliate_fails():
    seg = marketing_domain.Segmentacion(paises=frozenset({"CO"}), canales=frozenset({"blog"}))
    assert seg.criterio_incumplido("CO", "blog", "moda") is None
    assert seg.criterio_incumplido(None, "blog", None) == "pais"  # country unknown: not admitted
    assert seg.criterio_incumplido("CO", "tiktok", None) == "canal"


# -- enrollment in marketing, in-process ------------------------------------------------------------
@pytest.fixture
def marketing(tmp_path):
    return _client("marketing", tmp_path)


def _learn_affiliate(runtime, afiliado_id: str, pais: str | None, enabled: bool = True) -> None:
    with runtime.db.transaction() as session:
        campaigns.note_registered_afiliado(session, _incoming(REGISTRY, "AfiliadoRegistrado", {
            "id": afiliado_id, "user_id": "u", "email": "e@example.com", "nombre": "n", "pais": pais,
            "timestamp": NOW}, 2))
        if enabled:
            campaigns.enable_afiliado(session, _incoming(REGISTRY, "AfiliadoValidado", {
                "id": afiliado_id, "timestamp": NOW}, 1))


def _outbox(runtime, tables, event_type: str) -> list[dict]:
    with runtime.db.read() as session:
        rows = session.execute(select(tables.outbox).where(tables.outbox.c.event_type == event_type)
                               .order_by(tables.outbox.c.id)).mappings().all()
    return [REGISTRY.decode(event_type, r["payload"], r["schema_version"]) | {"_key": r["partition_key"]} for r in rows]


SEGMENTED = {"nombre": "Moda CO", "porcentaje_comision": "10", "landing_url": "https://shop.example.com/moda",
             "segmentacion": {"paises": ["CO"], "canales": ["blog"]}}


def test_enrollment_gives_a_tracking_link_and_announces_it(marketing):
    client, runtime, tables = marketing
    _learn_affiliate(runtime, "a1", "CO")
    campana = client.post("/campanas", json=SEGMENTED).json()["id"]
    response = client.post(f"/campanas/{campana}/inscripciones", json={"afiliado_id": "a1", "canal": "blog"})
    assert response.status_code == 201, response.text
    inscripcion = response.json()
    assert inscripcion["estado"] == "activa" and len(inscripcion["link_code"]) == 10
    again = client.post(f"/campanas/{campana}/inscripciones", json={"afiliado_id": "a1", "canal": "blog"})
    assert again.status_code == 200 and again.json() == inscripcion
    assert client.get(f"/campanas/{campana}/inscripciones").json()["inscripciones"] == [inscripcion]
    [event] = _outbox(runtime, tables, "AfiliadoInscrito")
    assert (event["inscripcion_id"], event["campana_id"], event["afiliado_id"], event["link_code"], event["_key"]) == \
        (inscripcion["id"], campana, "a1", inscripcion["link_code"], "a1")


@pytest.mark.parametrize("pais, enabled, body, status, field", [
    ("ES", True, {"canal": "blog"}, 409, "pais"),
    (None, True, {"canal": "blog"}, 409, "pais"),
    ("CO", True, {"canal": "tiktok"}, 409, "canal"),
    ("CO", False, {"canal": "blog"}, 409, "afiliado_id"),
    ("CO", True, {"canal": "Blog!"}, 422, "canal"),
    ("CO", True, {"canal": "blog", "extra": 1}, 422, "extra"),
])
def test_refused_enrollments_name_the_field_and_store_nothing(marketing, pais, enabled, body, status, field):
    client, runtime, tables = marketing
    _learn_affiliate(runtime, "a1", pais, enabled)
    campana = client.post("/campanas", json=SEGMENTED).json()["id"]
    response = client.post(f"/campanas/{campana}/inscripciones", json={"afiliado_id": "a1", **body})
    assert response.status_code == status and field in _fields(response), response.json()
    assert _count(runtime, tables.inscripciones) == 0 and _outbox(runtime, tables, "AfiliadoInscrito") == []


def test_unknown_affiliate_unknown_or_finished_campaign_refuse_enrollment(marketing):
    client, runtime, _ = marketing
    _learn_affiliate(runtime, "a1", "CO")
    campana = client.post("/campanas", json={"nombre": "Corta", "porcentaje_comision": "5"}).json()["id"]
    assert _fields(client.post(f"/campanas/{campana}/inscripciones", json={"afiliado_id": "zz"})) == {"afiliado_id"}
    assert client.post("/campanas/nope/inscripciones", json={"afiliado_id": "a1"}).status_code == 404
    assert client.get("/campanas/nope/inscripciones").status_code == 404
    client.post(f"/campanas/{campana}/finalizar")
    finished = client.post(f"/campanas/{campana}/inscripciones", json={"afiliado_id": "a1"})
    assert finished.status_code == 409 and _fields(finished) == {"estado"}


def test_disabling_an_affiliate_suspends_its_enrollments_and_enabling_reactivates_them(marketing):
    client, runtime, tables = marketing
    _learn_affiliate(runtime, "a1", "CO")
    campanas = [client.post("/campanas", json={"nombre": f"K{n}", "porcentaje_comision": "5"}).json()["id"]
                for n in range(2)]
    links = [client.post(f"/campanas/{k}/inscripciones", json={"afiliado_id": "a1"}).json()["link_code"]
             for k in campanas]
    with runtime.db.transaction() as session:
        # What the inbox does with a handler's events: into the outbox, in the same transaction.
        runtime.outbox.add(session, campaigns.disable_afiliado(session, _incoming(
            REGISTRY, "AfiliadoSuspendido", {"id": "a1", "motivo": "fraude", "timestamp": NOW}, 1)))
    assert {i["estado"] for k in campanas for i in client.get(f"/campanas/{k}/inscripciones").json()["inscripciones"]} \
        == {"suspendida"}
    suspended = _outbox(runtime, tables, "InscripcionSuspendida")
    assert sorted(e["link_code"] for e in suspended) == sorted(links)
    assert {(e["motivo"], e["_key"]) for e in suspended} == {("fraude", "a1")}
    with runtime.db.transaction() as session:
        runtime.outbox.add(session, campaigns.enable_afiliado(session, _incoming(
            REGISTRY, "AfiliadoReactivado", {"id": "a1", "timestamp": NOW}, 1)))
    assert sorted(e["link_code"] for e in _outbox(runtime, tables, "InscripcionReactivada")) == sorted(links)
    assert {i["estado"] for i in client.get(f"/campanas/{campanas[0]}/inscripciones").json()["inscripciones"]} \
        == {"activa"}


# -- tracking links and attribution in conversiones, in-process with an injected clock -------------
class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def tracking(tmp_path):
    """conversiones knowing campaign k1 (landing URL, 7-day window), affiliate a1 enrolled with link
    `linkcodea1`; its clock is the test's."""
    clock = Clock()
    settings = Settings(data_dir=tmp_path, broker_url="pulsar://127.0.0.1:1", trusted_proxies="10.0.0.0/8")
    app, runtime = import_module("alpes.conversiones.service").build(settings, clock=clock)
    with runtime.db.transaction() as session:
        for event_type, payload, version in (
            ("CampanaCreada", {"id": "k1", "nombre": "n", "porcentaje_comision": Decimal("10"), "moneda": "EUR",
                               "timestamp": NOW, "landing_url": "https://shop.example.com/v?utm_source=alpes",
                               "ventana_atribucion_dias": 7}, 2),
            ("CampanaCreada", {"id": "k-bare", "nombre": "n", "porcentaje_comision": Decimal("10"), "moneda": "EUR",
                               "timestamp": NOW}, 2),
            ("AfiliadoHabilitado", {"afiliado_id": "a1", "timestamp": NOW}, 1),
            ("AfiliadoHabilitado", {"afiliado_id": "a2", "timestamp": NOW}, 1),
            ("AfiliadoInscrito", {"inscripcion_id": "i1", "campana_id": "k1", "afiliado_id": "a1",
                                  "link_code": "linkcodea1", "timestamp": NOW}, 1),
            ("AfiliadoInscrito", {"inscripcion_id": "i2", "campana_id": "k-bare", "afiliado_id": "a1",
                                  "link_code": "linkbare01", "timestamp": NOW}, 1),
        ):
            handler = {"CampanaCreada": conversiones_reference.learn_campana,
                       "AfiliadoHabilitado": conversiones_reference.learn_afiliado,
                       "AfiliadoInscrito": conversiones_reference.learn_inscripcion}[event_type]
            handler(session, _incoming(REGISTRY, event_type, payload, version))
    return TestClient(app), runtime, import_module("alpes.conversiones.tables"), clock


def _click(client, code: str = "linkcodea1", **headers) -> httpx.Response:
    return client.get(f"/r/{code}", headers=headers, follow_redirects=False)


def _click_id(response: httpx.Response) -> str:
    [click_id] = parse_qs(urlsplit(response.headers["location"]).query)["alpes_click_id"]
    return click_id


def test_a_tracking_link_records_the_click_and_redirects_with_its_id(tracking):
    client, runtime, tables, _ = tracking
    behind_proxy = TestClient(client.app, client=("10.0.0.2", 40000))  # one of ALPES_TRUSTED_PROXIES
    response = _click(behind_proxy, **{"X-Forwarded-For": "203.0.113.9, 10.0.0.1", "User-Agent": "Mozilla/5.0",
                                       "Referer": "https://blog.example.org/post"})
    assert response.status_code == 302
    location = urlsplit(response.headers["location"])
    assert (location.netloc, location.path) == ("shop.example.com", "/v")
    assert parse_qs(location.query)["utm_source"] == ["alpes"]
    with runtime.db.read() as session:
        [click] = session.execute(select(tables.clicks)).mappings().all()
    assert click["id"] == _click_id(response)
    assert (click["link_code"], click["affiliate_id"], click["campaign_id"], click["clicked_at"], click["ip"],
            click["user_agent"], click["referrer"]) == ("linkcodea1", "a1", "k1", NOW, "203.0.113.9", "Mozilla/5.0",
                                                        "https://blog.example.org/post")
    with runtime.db.read() as session:
        [row] = session.execute(select(tables.outbox)).mappings().all()
    event = REGISTRY.decode("ClicksRecorded", row["payload"], row["schema_version"])
    assert (row["event_type"], row["topic"], row["partition_key"]) == ("ClicksRecorded", "conversiones.eventos", "k1")
    assert (event["link_code"], event["affiliate_id"], event["campaign_id"], event["timestamp"]) == \
        ("linkcodea1", "a1", "k1", NOW) and "ip" not in event
    assert event["clicks"] == [{"click_id": click["id"], "timestamp": NOW, "user_agent": "Mozilla/5.0",
                                "referrer": "https://blog.example.org/post", "visitor_hash": event["clicks"][0]["visitor_hash"]}]
    assert len(event["clicks"][0]["visitor_hash"]) == 32 and "ip" not in event["clicks"][0]
    assert _click(client).status_code == 302 and _count(runtime, tables.clicks) == 2  # every click counts


def test_unknown_suspended_and_inactive_links_answer_404_without_a_click(tracking):
    client, runtime, tables, _ = tracking
    assert _click(client, "nolinkhere").status_code == 404
    no_landing = _click(client, "linkbare01")
    assert no_landing.status_code == 404 and no_landing.json()["detail"] == "campaign has no landing URL"
    with runtime.db.transaction() as session:
        conversiones_reference.learn_inscripcion_estado(session, _incoming(REGISTRY, "InscripcionSuspendida", {
            "inscripcion_id": "i1", "campana_id": "k1", "afiliado_id": "a1", "link_code": "linkcodea1",
            "motivo": "fraude", "timestamp": NOW}, 1))
    assert _click(client).status_code == 404
    with runtime.db.transaction() as session:
        conversiones_reference.learn_inscripcion_estado(session, _incoming(REGISTRY, "InscripcionReactivada", {
            "inscripcion_id": "i1", "campana_id": "k1", "afiliado_id": "a1", "link_code": "linkcodea1",
            "timestamp": NOW}, 1))
        conversiones_reference.learn_campana_estado(session, _incoming(REGISTRY, "CampanaPausada", {
            "id": "k1", "timestamp": NOW}, 1))
    paused = _click(client)
    assert paused.status_code == 404 and "location" not in paused.headers
    assert _count(runtime, tables.clicks) == 0 and _count(runtime, tables.outbox) == 0


POSTBACK = {"user_id": "cliente", "conversion_value": "80.00", "conversion_type": "sale"}


def test_a_postback_with_a_click_id_is_attributed_to_the_click_within_the_window(tracking):
    client, _, _, clock = tracking
    click_id = _click_id(_click(client))
    clock.now = NOW + timedelta(days=7)  # the last moment of a 7-day window
    body = client.post("/conversiones", json={**POSTBACK, "click_id": click_id}).json()
    assert body["status"] == "validated"
    conversion = client.get(f"/conversiones/{body['id']}").json()
    assert (conversion["affiliate_id"], conversion["campaign_id"]) == ("a1", "k1")


def test_a_postback_after_the_window_is_rejected_outside_attribution_window(tracking):
    client, _, _, clock = tracking
    click_id = _click_id(_click(client))
    clock.now = NOW + timedelta(days=7, seconds=1)
    body = client.post("/conversiones", json={**POSTBACK, "click_id": click_id}).json()
    assert body["status"] == "rejected"
    assert client.get(f"/conversiones/{body['id']}").json()["reason"] == "outside_attribution_window"


@pytest.mark.parametrize("body, fields", [
    ({}, {"affiliate_id", "campaign_id"}),
    ({"affiliate_id": "a1"}, {"campaign_id"}),
    ({"click_id": "no-such-click"}, {"click_id"}),
    ({"click_id": "bad id!"}, {"click_id"}),
])
def test_postbacks_without_attribution_answer_422_and_store_nothing(tracking, body, fields):
    client, runtime, tables, _ = tracking
    response = client.post("/conversiones", json={**POSTBACK, **body})
    assert response.status_code == 422 and _fields(response) == fields, response.json()
    assert _count(runtime, tables.event_store) == 0 and _count(runtime, tables.click_attributions) == 0


def test_ids_that_contradict_the_click_answer_422(tracking):
    client, runtime, tables, _ = tracking
    click_id = _click_id(_click(client))
    response = client.post("/conversiones", json={**POSTBACK, "click_id": click_id, "affiliate_id": "a2"})
    assert response.status_code == 422 and _fields(response) == {"affiliate_id"}
    assert _count(runtime, tables.event_store) == 0


def test_id_postbacks_to_a_campaign_with_enrollments_need_an_enrolled_affiliate(tracking):
    client, runtime, _, clock = tracking
    enrolled = client.post("/conversiones", json={**POSTBACK, "affiliate_id": "a1", "campaign_id": "k1"}).json()
    assert enrolled["status"] == "validated"
    outsider = client.post("/conversiones", json={**POSTBACK, "affiliate_id": "a2", "campaign_id": "k1"}).json()
    assert outsider["status"] == "detected"  # its enrollment may still be on its way: it waits the grace time
    store = conversiones_records.event_store(runtime.registry)
    conversiones_commands.validate_pending(runtime.db, store, runtime.outbox, timedelta(seconds=10),
                                           now=NOW + timedelta(seconds=10))
    assert client.get(f"/conversiones/{outsider['id']}").json()["reason"] == "affiliate_not_enrolled"


# -- through the running platform ------------------------------------------------------------------
def test_enroll_click_and_convert_through_the_platform(tmp_path):
    platform = Platform(tmp_path / "alpes").start()
    try:
        afiliado = platform.post("afiliados", "/afiliados", {"user_id": "u", "email": "t@example.com", "nombre": "Tina",
                                                             "pais": "CO"}).json()["id"]
        campana = platform.post("marketing", "/campanas", {
            "nombre": "Clicks", "porcentaje_comision": "10", "landing_url": "https://shop.example.com/oferta?ref=x",
            "segmentacion": {"paises": ["CO"]}}).json()["id"]
        inscripcion = wait_until(
            lambda: (r := platform.post("marketing", f"/campanas/{campana}/inscripciones", {"afiliado_id": afiliado}))
            .status_code in (200, 201) and r.json(), what="marketing knows the enabled affiliate and its country")
        redirect = wait_until(
            lambda: (r := platform.http.get(platform.url("conversiones") + f"/r/{inscripcion['link_code']}",
                                            headers={"User-Agent": "e2e"}, follow_redirects=False))
            .status_code == 302 and r, what="conversiones knows the enrollment and the campaign's landing URL")
        location = urlsplit(redirect.headers["location"])
        assert (location.netloc, location.path, parse_qs(location.query)["ref"]) == ("shop.example.com", "/oferta", ["x"])
        click_id = _click_id(redirect)
        conversion = platform.post("conversiones", "/conversiones", {**POSTBACK, "click_id": click_id}).json()
        validated = wait_until(lambda: platform.get("conversiones", f"/conversiones/{conversion['id']}")["status"]
                               == "validated", what="the attributed conversion validated", diagnose=platform.diagnostics)
        assert validated
        detail = platform.get("conversiones", f"/conversiones/{conversion['id']}")
        assert (detail["affiliate_id"], detail["campaign_id"]) == (afiliado, campana)
        [comision] = wait_until(lambda: platform.get("marketing", "/comisiones", conversion_id=conversion["id"])
                                ["comisiones"], what="the commission of the attributed conversion")
        assert (comision["afiliado_id"], comision["monto"]) == (afiliado, "8.00")
        audited = wait_until(lambda: platform.get("auditoria", "/auditoria/eventos", event_type="ClicksRecorded",
                                                  aggregate_id=campana)["eventos"], what="the click audited")
        assert [c["click_id"] for e in audited for c in e["payload"]["clicks"]] == [click_id]
    finally:
        platform.stop()
