"""Validation and fraud rules in conversiones, each with a named reason: clear violations are
rejected (campaign_outside_dates, self_referral), suspicious conversions are held for manual
review (too_fast, ip_velocity) and a reviewer approves or rejects them. Rules, in-process HTTP
with an injected clock, and a replay that gives back the same projections."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from decimal import Decimal
from importlib import import_module

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from alpes.conversiones import domain
from alpes.conversiones import commands as conversiones_commands
from alpes.conversiones import projections as conversiones_projections
from alpes.conversiones import records as conversiones_records
from alpes.conversiones import reference as conversiones_reference
from alpes.kernel.codec import SchemaRegistry
from alpes.settings import Settings
from test_campaign_lifecycle import _incoming
from test_replay import _snapshot
from test_tracking import Clock, _click, _click_id

REGISTRY = SchemaRegistry.from_directory()
NOW = datetime(2026, 11, 28, 12, 0, tzinfo=timezone.utc)
GRACE = timedelta(seconds=10)


# -- rules ------------------------------------------------------------------------------------
def _detected(at: datetime = NOW) -> domain.Conversion:
    return domain.Conversion().apply(domain.Detected("c1", "a1", "k1", "u", Decimal("10.00"), "sale", None, "EUR", at))


def _reference(**changes) -> domain.Reference:
    known = {"affiliate_enabled": True, "campaign_active": True, "campaign_currency": "EUR"}
    return domain.Reference(**{**known, **changes})


def _decide(conversion: domain.Conversion, **ref) -> domain.DomainEvent:
    [event] = domain.decide_validation(conversion, _reference(**ref), NOW + timedelta(minutes=5), GRACE).events
    return event


@pytest.mark.parametrize("starts, ends, inside", [
    (None, None, True), (NOW, None, True), (None, NOW, True),  # bounds included
    (NOW + timedelta(seconds=1), None, False), (None, NOW - timedelta(seconds=1), False),
])
def test_a_conversion_outside_the_campaign_dates_is_rejected(starts, ends, inside):
    event = _decide(_detected(), campaign_starts_at=starts, campaign_ends_at=ends)
    if inside:
        assert isinstance(event, domain.Validated)
    else:
        assert isinstance(event, domain.Rejected) and event.reason == "campaign_outside_dates"


def test_self_referral_compares_hashes_of_normalized_emails():
    affiliate = domain.email_sha256("ana@example.com")
    assert domain.email_sha256("  Ana@Example.COM ") == affiliate and len(affiliate) == 64
    event = _decide(_detected(), affiliate_email_sha256=affiliate,
                    customer_email_sha256=domain.email_sha256(" ANA@example.com"))
    assert isinstance(event, domain.Rejected) and event.reason == "self_referral"
    other = _decide(_detected(), affiliate_email_sha256=affiliate, customer_email_sha256=domain.email_sha256("bo@x.co"))
    assert isinstance(other, domain.Validated)
    # Neither side known: nothing to compare.
    assert isinstance(_decide(_detected(), affiliate_email_sha256=None, customer_email_sha256=None), domain.Validated)


@pytest.mark.parametrize("after_click, minimum, held", [
    (timedelta(seconds=14), 15, True), (timedelta(seconds=15), 15, False),
    (timedelta(seconds=0), 0, False), (timedelta(seconds=3), None, False),  # None: the campaign sets no minimum
])
def test_a_conversion_too_soon_after_its_click_is_held(after_click, minimum, held):
    event = _decide(_detected(NOW + after_click), clicked_at=NOW, attribution_window=timedelta(days=30),
                    affiliate_enrolled=True, min_seconds_click_to_conversion=minimum)
    if held:
        assert isinstance(event, domain.Held) and event.reason == "too_fast"
    else:
        assert isinstance(event, domain.Validated)


def test_without_a_click_the_minimum_does_not_apply():
    assert isinstance(_decide(_detected(), min_seconds_click_to_conversion=15), domain.Validated)


@pytest.mark.parametrize("same_ip, held", [(None, False), (5, False), (6, True)])
def test_more_conversions_from_one_ip_than_allowed_are_held(same_ip, held):
    event = _decide(_detected(), conversions_from_same_ip=same_ip, max_conversions_per_ip=5)
    assert (isinstance(event, domain.Held) and event.reason == "ip_velocity") is held


def test_clear_violations_win_over_suspicion():
    event = _decide(_detected(NOW + timedelta(seconds=1)), clicked_at=NOW, min_seconds_click_to_conversion=15,
                    campaign_ends_at=NOW - timedelta(days=1))
    assert isinstance(event, domain.Rejected) and event.reason == "campaign_outside_dates"


def test_only_a_held_conversion_is_reviewed():
    held = _detected().apply(domain.Held("too_fast", NOW))
    assert held.status == "on_hold" and held.reason == "too_fast"
    [validated] = domain.decide_review(held, True, None, NOW)
    assert isinstance(validated, domain.Validated)
    [rejected] = domain.decide_review(held, False, "cliente real no existe", NOW)
    assert rejected.reason == "rejected_in_review:cliente real no existe"
    with pytest.raises(domain.NotInReview):
        domain.decide_review(_detected(), True, None, NOW)


# -- in-process HTTP, with an injected clock ------------------------------------------------------
AFFILIATE_EMAIL = "Ana.Partner@Example.com"


@pytest.fixture
def fraud(tmp_path):
    """conversiones knowing campaign k1 (dates around NOW, 15 s click minimum, link `linkcodea1` of a1)
    and affiliate a1 with its email hash (AfiliadoHabilitado v2); its clock is the test's."""
    clock = Clock()
    settings = Settings(data_dir=tmp_path, broker_url="pulsar://127.0.0.1:1", max_conversions_per_ip=2)
    app, runtime = import_module("alpes.conversiones.service").build(settings, clock=clock)
    tables = import_module("alpes.conversiones.tables")
    campana = {"id": "k1", "nombre": "n", "porcentaje_comision": Decimal("10"), "moneda": "EUR", "timestamp": NOW,
               "landing_url": "https://shop.example.com/v", "fecha_inicio": NOW - timedelta(days=1),
               "fecha_fin": NOW + timedelta(days=1)}
    with runtime.db.transaction() as session:
        conversiones_reference.learn_campana(session, _incoming(REGISTRY, "CampanaCreada", campana, 2))
        # The campaign term marketing does not announce yet (CampanaCreada v3 is still to come).
        r = tables.ref_campanas
        session.execute(update(r).where(r.c.campana_id == "k1").values(min_segundos_click_conversion=15))
        conversiones_reference.learn_afiliado(session, _incoming(REGISTRY, "AfiliadoHabilitado", {
            "afiliado_id": "a1", "timestamp": NOW, "email_sha256": domain.email_sha256(AFFILIATE_EMAIL)}, 2))
        conversiones_reference.learn_inscripcion(session, _incoming(REGISTRY, "AfiliadoInscrito", {
            "inscripcion_id": "i1", "campana_id": "k1", "afiliado_id": "a1", "link_code": "linkcodea1",
            "timestamp": NOW}, 1))
    yield TestClient(app), runtime, tables, clock
    runtime.db.dispose()


POSTBACK = {"affiliate_id": "a1", "campaign_id": "k1", "user_id": "cliente", "conversion_value": "80.00",
            "conversion_type": "sale"}


def _outbox_types(runtime, tables) -> list[str]:
    with runtime.db.read() as session:
        return list(session.scalars(select(tables.outbox.c.event_type).order_by(tables.outbox.c.id)))


def _held_too_fast(client, clock) -> str:
    click_id = _click_id(_click(client))
    clock.now = NOW + timedelta(seconds=3)
    body = client.post("/conversiones", json={**POSTBACK, "click_id": click_id}).json()
    assert body["status"] == "on_hold"
    return body["id"]


def test_a_conversion_seconds_after_its_click_is_held_too_fast_and_listed_on_hold(fraud):
    client, runtime, tables, clock = fraud
    conversion_id = _held_too_fast(client, clock)
    assert client.get(f"/conversiones/{conversion_id}").json()["reason"] == "too_fast"
    assert [c["id"] for c in client.get("/conversiones", params={"status": "on_hold"}).json()["conversiones"]] == \
        [conversion_id]
    assert _outbox_types(runtime, tables) == ["ClicksRecorded", "ConversionDetected", "ConversionHeld"]
    history = client.get(f"/conversiones/{conversion_id}/eventos").json()["eventos"]
    assert history[-1]["event_type"] == "ConversionHeld" and history[-1]["payload"]["reason"] == "too_fast"
    # The scheduled validation leaves held conversions to the reviewer.
    assert conversiones_commands.validate_pending(runtime.db, conversiones_records.event_store(REGISTRY),
                                                  runtime.outbox, GRACE, now=NOW + timedelta(hours=1)) == 0
    # Past the minimum, the same click validates.
    click_id = _click_id(_click(client))
    clock.now += timedelta(seconds=15)
    assert client.post("/conversiones", json={**POSTBACK, "click_id": click_id}).json()["status"] == "validated"


def test_approving_a_held_conversion_validates_it_for_its_commission(fraud):
    client, runtime, tables, clock = fraud
    conversion_id = _held_too_fast(client, clock)
    response = client.post(f"/conversiones/{conversion_id}/aprobar")
    assert response.status_code == 200 and response.json()["status"] == "validated"
    assert _outbox_types(runtime, tables)[-1] == "ConversionValidated"
    again = client.post(f"/conversiones/{conversion_id}/aprobar")
    assert again.status_code == 409 and {e["field"] for e in again.json()["errors"]} == {"status"}


def test_rejecting_a_held_conversion_names_the_reviewers_reason(fraud):
    client, runtime, tables, clock = fraud
    conversion_id = _held_too_fast(client, clock)
    response = client.post(f"/conversiones/{conversion_id}/rechazar", json={"motivo": "inyeccion de clicks"})
    assert response.status_code == 200
    assert (response.json()["status"], response.json()["reason"]) == \
        ("rejected", "rejected_in_review:inyeccion de clicks")
    assert _outbox_types(runtime, tables)[-1] == "ConversionRejected"
    assert client.post(f"/conversiones/{conversion_id}/aprobar").status_code == 409


def test_review_refuses_unknown_not_held_and_bad_bodies(fraud):
    client, runtime, tables, clock = fraud
    assert client.post("/conversiones/nope/aprobar").status_code == 404
    assert client.post("/conversiones/nope/rechazar", json={"motivo": "x"}).status_code == 404
    validated = client.post("/conversiones", json=POSTBACK).json()
    assert validated["status"] == "validated"
    refused = client.post(f"/conversiones/{validated['id']}/rechazar", json={"motivo": "x"})
    assert refused.status_code == 409 and {e["field"] for e in refused.json()["errors"]} == {"status"}
    held = _held_too_fast(client, clock)
    before = _outbox_types(runtime, tables)
    for body in ({}, {"motivo": ""}, {"motivo": "x" * 61}, {"motivo": "x", "extra": 1}):
        assert client.post(f"/conversiones/{held}/rechazar", json=body).status_code == 422
    assert _outbox_types(runtime, tables) == before


def test_more_conversions_from_one_ip_within_an_hour_are_held_ip_velocity(fraud):
    client, _, _, clock = fraud
    statuses = []
    for n in range(3):  # the fixture allows 2 per IP and campaign in 60 minutes
        clock.now = NOW + timedelta(minutes=n)
        statuses.append(client.post("/conversiones", json={**POSTBACK, "ip": "203.0.113.7"}).json()["status"])
    assert statuses == ["validated", "validated", "on_hold"]
    assert client.post("/conversiones", json={**POSTBACK, "ip": "2001:db8::1"}).json()["status"] == "validated"
    clock.now = NOW + timedelta(minutes=61)  # the first two have left the hour
    assert client.post("/conversiones", json={**POSTBACK, "ip": "203.0.113.7"}).json()["status"] == "validated"


def test_a_customer_with_the_affiliates_email_is_rejected_self_referral_and_only_its_hash_is_kept(fraud):
    client, runtime, tables, _ = fraud
    body = client.post("/conversiones", json={**POSTBACK, "customer_email": " ana.partner@EXAMPLE.com"}).json()
    assert body["status"] == "rejected"
    assert client.get(f"/conversiones/{body['id']}").json()["reason"] == "self_referral"
    with runtime.db.read() as session:
        [signal] = session.execute(select(tables.conversion_signals)).mappings().all()
        payloads = b"".join(session.scalars(select(tables.outbox.c.payload)))
    assert signal["customer_email_sha256"] == domain.email_sha256(AFFILIATE_EMAIL)
    assert b"partner" not in payloads.lower()  # the email travels in no event
    other = client.post("/conversiones", json={**POSTBACK, "customer_email": "cliente@example.org"}).json()
    assert other["status"] == "validated"


def test_the_service_forgets_a_customers_email_hash_and_ip_once_no_rule_can_read_them(fraud):
    """Its `forget-unread-signals` job, on the service's clock: kept twice the velocity window."""
    client, runtime, tables, clock = fraud
    body = client.post("/conversiones", json={**POSTBACK, "customer_email": "cliente@example.org",
                                              "ip": "203.0.113.7"}).json()
    assert body["status"] == "validated"
    [job] = [j for j in runtime.jobs if j.name == "forget-unread-signals"]

    def stored():
        with runtime.db.read() as session:
            return (session.scalars(select(tables.conversion_signals.c.conversion_id)).all(),
                    session.scalars(select(tables.caller_minutes.c.conversions)).all())

    clock.now = NOW + timedelta(minutes=119)
    assert job.run() == 0 and stored() == ([body["id"]], [1])
    clock.now = NOW + timedelta(minutes=121)
    assert job.run() == 2 and stored() == ([], [])
    assert client.get(f"/conversiones/{body['id']}").json()["status"] == "validated"  # the conversion stays


def test_conversions_outside_the_campaign_dates_are_rejected(fraud):
    client, _, _, clock = fraud
    clock.now = NOW + timedelta(days=1, seconds=1)
    body = client.post("/conversiones", json=POSTBACK).json()
    assert body["status"] == "rejected"
    assert client.get(f"/conversiones/{body['id']}").json()["reason"] == "campaign_outside_dates"


@pytest.mark.parametrize("extra", [{"ip": "999.1.1.1"}, {"ip": "not-an-ip"}, {"customer_email": "nope"}])
def test_malformed_fraud_signals_answer_422(fraud, extra):
    client, runtime, tables, _ = fraud
    response = client.post("/conversiones", json={**POSTBACK, **extra})
    assert response.status_code == 422 and {e["field"] for e in response.json()["errors"]} == set(extra)
    assert _outbox_types(runtime, tables) == []


def test_campaigns_announced_without_a_click_minimum_enforce_none(fraud):
    _, runtime, tables, _ = fraud
    with runtime.db.transaction() as session:
        conversiones_reference.learn_campana(session, _incoming(REGISTRY, "CampanaCreada", {
            "id": "k-old", "nombre": "n", "porcentaje_comision": Decimal("10"), "moneda": "EUR", "timestamp": NOW}, 2))
        r = tables.ref_campanas
        minimums = session.execute(select(r.c.campana_id, r.c.min_segundos_click_conversion)
                                   .where(r.c.campana_id.in_(["k-old", "k1"]))).all()
    assert sorted(minimums) == [("k-old", None), ("k1", 15)]


def test_replay_with_held_and_reviewed_conversions_gives_identical_projections(fraud):
    client, runtime, _, clock = fraud
    approved, rejected, _still_held = (_held_too_fast(client, clock) for _ in range(3))
    client.post(f"/conversiones/{approved}/aprobar")
    client.post(f"/conversiones/{rejected}/rechazar", json={"motivo": "bot"})
    live = _snapshot(runtime.db)
    assert sorted(r["status"] for r in live["conversiones_view"]) == ["on_hold", "rejected", "validated"]
    conversiones_projections.rebuild_projections(runtime.db, REGISTRY)
    assert _snapshot(runtime.db) == live


# -- marketing announces the affiliate's email hash ---------------------------------------------------
def test_marketing_announces_the_affiliates_email_hash_that_conversiones_compares(tmp_path):
    from alpes.marketing import campaigns
    from test_http import _client

    _, marketing, _ = _client("marketing", tmp_path / "marketing")
    with marketing.db.transaction() as session:
        campaigns.note_registered_afiliado(session, _incoming(REGISTRY, "AfiliadoRegistrado", {
            "id": "a1", "user_id": "u", "email": "E@Example.com", "nombre": "n", "pais": "CO", "timestamp": NOW}, 2))
        [enabled] = [e for e in campaigns.enable_afiliado(session, _incoming(
            REGISTRY, "AfiliadoValidado", {"id": "a1", "timestamp": NOW}, 1)) if e.event_type == "AfiliadoHabilitado"]
    assert enabled.payload["email_sha256"] == domain.email_sha256(" e@example.COM ")
    assert "example" not in repr(enabled.payload).lower()  # the email itself travels nowhere
    # conversiones learns it off the wire and rejects a customer with that email as self_referral.
    data, version = REGISTRY.encode("AfiliadoHabilitado", enabled.payload)
    client, conversiones, _ = _client("conversiones", tmp_path / "conversiones")
    with conversiones.db.transaction() as session:
        conversiones_reference.learn_afiliado(session, _incoming(REGISTRY, "AfiliadoHabilitado", REGISTRY.decode(
            "AfiliadoHabilitado", data, version), version))
        conversiones_reference.learn_campana(session, _incoming(REGISTRY, "CampanaCreada", {
            "id": "k1", "nombre": "n", "porcentaje_comision": Decimal("10"), "moneda": "EUR", "timestamp": NOW}, 2))
    body = client.post("/conversiones", json={**POSTBACK, "customer_email": "e@example.com"}).json()
    assert (body["status"], client.get(f"/conversiones/{body['id']}").json()["reason"]) == ("rejected", "self_referral")
