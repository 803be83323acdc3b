"""The affiliate lifecycle: validated registration data, human actions (approve, suspend,
reactivate) and their propagation afiliados → marketing → conversiones through events."""

from __future__ import annotations

from collections import Counter
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from importlib import import_module

import pytest
from fastapi.testclient import TestClient
from harness import Platform, wait_until
from sqlalchemy import func, select

from alpes.afiliados import domain as afiliados
from alpes.conversiones import domain as conversiones
from alpes.conversiones import reference as conversiones_reference
from alpes.kernel.messages import IncomingEvent, new_id
from alpes.marketing import campaigns
from alpes.settings import Settings

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=timezone.utc)
GRACE = timedelta(seconds=10)


# -- domain: registration rules and transitions ---------------------------------------------------
def test_a_taken_document_rejects_the_registration():
    solicitud = afiliados.SolicitudRegistro("u1", "ana@example.com", "Ana", "CC", "123456", "CO", "paypal")
    assert afiliados.motivos_de_rechazo(solicitud, False, documento_duplicado=True) == ["documento_duplicado"]
    assert afiliados.motivos_de_rechazo(solicitud, True, documento_duplicado=True) == [
        "cuenta_duplicada", "documento_duplicado"]
    assert afiliados.motivos_de_rechazo(solicitud, False) == []


def test_documents_are_compared_without_case():
    assert afiliados.normalizar_documento(" ab123c ") == "AB123C"


@pytest.mark.parametrize("estado, accion, nuevo", [
    ("rechazado", "aprobar", "validado"),
    ("validado", "suspender", "suspendido"),
    ("suspendido", "reactivar", "validado"),
])
def test_allowed_transitions(estado, accion, nuevo):
    assert afiliados.siguiente_estado(estado, accion) == nuevo


@pytest.mark.parametrize("estado, accion", [
    (estado, accion) for accion, (desde, _) in afiliados.TRANSICIONES.items()
    for estado in afiliados.ESTADOS if estado != desde
])
def test_every_other_transition_is_refused(estado, accion):
    with pytest.raises(afiliados.TransicionInvalida, match=estado):
        afiliados.siguiente_estado(estado, accion)


def test_the_country_list_is_iso_alpha_2():
    assert len(afiliados.PAISES) == 249
    assert {"CO", "MX", "ES", "US", "BR"} <= afiliados.PAISES
    assert all(len(code) == 2 and code.isupper() for code in afiliados.PAISES)


# -- domain: conversions of a suspended affiliate -------------------------------------------------
def _detected(at=NOW) -> conversiones.Conversion:
    return conversiones.Conversion.rebuild([conversiones.Detected(
        "c1", "a1", "k1", "u1", Decimal("10.00"), "sale", "o1", "EUR", at)])


SUSPENDED = conversiones.Reference(affiliate_enabled=False, campaign_active=True, campaign_currency="EUR",
                                   affiliate_suspended=True)


def test_a_suspended_affiliate_is_rejected_at_once_with_its_own_reason():
    decision = conversiones.decide_validation(_detected(), SUSPENDED, NOW, GRACE)
    assert [(type(e), e.reason) for e in decision.events] == [(conversiones.Rejected, "affiliate_suspended")]


def test_suspension_does_not_wait_for_an_unknown_campaign():
    ref = conversiones.Reference(False, None, None, affiliate_suspended=True)
    decision = conversiones.decide_validation(_detected(), ref, NOW, GRACE)
    assert [e.reason for e in decision.events] == ["affiliate_suspended"]


def test_a_never_seen_affiliate_is_still_unknown_not_suspended():
    ref = conversiones.Reference(None, True, "EUR")
    assert conversiones.decide_validation(_detected(), ref, NOW, GRACE).pending
    late = conversiones.decide_validation(_detected(NOW - GRACE), ref, NOW, GRACE)
    assert [e.reason for e in late.events] == ["affiliate_unknown"]


def test_a_reactivated_affiliate_validates_again():
    enabled = conversiones.Reference(True, True, "EUR")
    assert [type(e) for e in conversiones.decide_validation(_detected(), enabled, NOW, GRACE).events] == [
        conversiones.Validated]


# -- HTTP, in-process: state and events commit together ------------------------------------------
def _client(name: str, tmp_path):
    settings = Settings(data_dir=tmp_path, broker_url="pulsar://127.0.0.1:1")
    app, runtime = import_module(f"alpes.{name}.service").build(settings)
    tables = import_module(f"alpes.{name}.tables")
    # No `with`: the lifespan (relay, consumers, validation job) does not start; requests still commit.
    return TestClient(app), runtime, tables


@pytest.fixture
def afiliados_api(tmp_path):
    return _client("afiliados", tmp_path)


def _outbox(runtime, tables) -> list[tuple[str, str]]:
    with runtime.db.transaction() as session:
        rows = session.execute(select(tables.outbox).order_by(tables.outbox.c.id)).mappings().all()
    return [(r["event_type"], r["partition_key"]) for r in rows]


def _decoded_outbox(runtime, tables, event_type: str) -> list[dict]:
    with runtime.db.transaction() as session:
        rows = session.execute(select(tables.outbox).where(tables.outbox.c.event_type == event_type)
                               .order_by(tables.outbox.c.id)).mappings().all()
    return [runtime.registry.decode(event_type, r["payload"], r["schema_version"]) for r in rows]


def _count(runtime, table) -> int:
    with runtime.db.transaction() as session:
        return session.scalar(select(func.count()).select_from(table))


def _fields(response) -> set[str]:
    return {e["field"] for e in response.json()["errors"]}


FULL = {"user_id": "u1", "email": "ana@example.com", "nombre": "Ana Pérez", "tipo_documento": "cc",
        "numero_documento": "ab12345", "pais": "co", "metodo_pago": "PayPal"}


def _validate(runtime) -> None:
    """The automatic validation job, run once by hand (the lifespan does not run it here)."""
    next(job for job in runtime.jobs if job.name == "validate-afiliados").run()


def test_registration_with_identity_and_payment_data(afiliados_api):
    client, runtime, tables = afiliados_api
    response = client.post("/afiliados", json=FULL)
    assert response.status_code == 201, response.text
    body = response.json()
    # The document number is never shown whole (tests/test_pii.py): its last characters only.
    assert (body["tipo_documento"], body["numero_documento"], body["pais"], body["metodo_pago"]) == (
        "CC", "****345", "CO", "paypal")
    assert body["motivo_suspension"] is None
    # v3 carries the country; the document and the payment method stay in afiliados (sealed).
    [event] = _decoded_outbox(runtime, tables, "AfiliadoRegistrado")
    assert event["pais"] == "CO" and "numero_documento" not in event and "metodo_pago" not in event
    with runtime.db.transaction() as session:
        assert session.scalar(select(tables.outbox.c.schema_version)) == 3


def test_the_original_body_is_still_a_registration(afiliados_api):
    client, runtime, tables = afiliados_api
    response = client.post("/afiliados", json={"user_id": "u1", "email": "ana@example.com", "nombre": "Ana"})
    assert response.status_code == 201
    body = response.json()
    assert [body[f] for f in ("tipo_documento", "numero_documento", "pais", "metodo_pago")] == [None] * 4
    [event] = _decoded_outbox(runtime, tables, "AfiliadoRegistrado")
    assert event["pais"] is None
    _validate(runtime)
    assert client.get(f"/afiliados/{body['id']}").json()["estado"] == "validado"


@pytest.mark.parametrize("change, field", [
    ({"tipo_documento": "RUT"}, "tipo_documento"),
    ({"tipo_documento": 7}, "tipo_documento"),
    ({"numero_documento": "123"}, "numero_documento"),
    ({"numero_documento": "1" * 21}, "numero_documento"),
    ({"numero_documento": "12-345"}, "numero_documento"),
    ({"numero_documento": "12 345"}, "numero_documento"),
    ({"pais": "XX"}, "pais"),
    ({"pais": "COL"}, "pais"),
    ({"pais": ""}, "pais"),
    ({"metodo_pago": "bitcoin"}, "metodo_pago"),
    ({"tipo_documento": None}, "tipo_documento"),  # a number without its type
    ({"numero_documento": None}, "numero_documento"),  # a type without its number
])
def test_bad_registration_data_answers_422_naming_the_field_and_stores_nothing(afiliados_api, change, field):
    client, runtime, tables = afiliados_api
    response = client.post("/afiliados", json={**FULL, **change})
    assert response.status_code == 422, response.text
    assert field in _fields(response)
    assert _count(runtime, tables.afiliados) == 0 and _count(runtime, tables.outbox) == 0


def test_a_document_already_held_by_another_affiliate_is_rejected(afiliados_api):
    client, runtime, tables = afiliados_api
    first = client.post("/afiliados", json=FULL).json()["id"]
    # Same document, written differently, registered in the same validation batch: the first wins.
    second = client.post("/afiliados", json={**FULL, "user_id": "u2", "email": "otra@example.com",
                                             "numero_documento": "AB12345", "tipo_documento": "CC"}).json()["id"]
    # The same number under another type is the same document (issue 10: it used to pass).
    other_type = client.post("/afiliados", json={**FULL, "user_id": "u3", "email": "tres@example.com",
                                                 "tipo_documento": "PASAPORTE"}).json()["id"]
    _validate(runtime)
    assert client.get(f"/afiliados/{first}").json()["estado"] == "validado"
    rejected = client.get(f"/afiliados/{second}").json()
    assert (rejected["estado"], rejected["motivos"]) == ("rechazado", ["documento_duplicado"])
    assert client.get(f"/afiliados/{other_type}").json()["motivos"] == ["documento_duplicado"]
    assert [(e["id"], e["motivos"]) for e in _decoded_outbox(runtime, tables, "AfiliadoRechazado")] == [
        (second, ["documento_duplicado"]), (other_type, ["documento_duplicado"])]

    # Still taken while its holder is suspended: a suspension cannot be escaped by registering again.
    assert client.post(f"/afiliados/{first}/suspender", json={"motivo": "fraude"}).status_code == 200
    third = client.post("/afiliados", json={**FULL, "user_id": "u4", "email": "cuatro@example.com"}).json()["id"]
    _validate(runtime)
    assert client.get(f"/afiliados/{third}").json()["motivos"] == ["documento_duplicado"]


def test_suspend_reactivate_and_approve_commit_state_and_event_together(afiliados_api):
    client, runtime, tables = afiliados_api
    ana = client.post("/afiliados", json=FULL).json()["id"]
    bot = client.post("/afiliados", json={"user_id": "b", "email": "bot@mailinator.com", "nombre": "Bot"}).json()["id"]
    _validate(runtime)
    before = _outbox(runtime, tables)

    suspended = client.post(f"/afiliados/{ana}/suspender", json={"motivo": "  tráfico incentivado  "})
    assert suspended.status_code == 200, suspended.text
    assert (suspended.json()["estado"], suspended.json()["motivo_suspension"]) == ("suspendido", "tráfico incentivado")
    assert [a["id"] for a in client.get("/afiliados", params={"estado": "suspendido"}).json()["afiliados"]] == [ana]

    reactivated = client.post(f"/afiliados/{ana}/reactivar")
    assert reactivated.status_code == 200
    assert (reactivated.json()["estado"], reactivated.json()["motivo_suspension"]) == ("validado", None)

    approved = client.post(f"/afiliados/{bot}/aprobar")
    assert approved.status_code == 200
    assert approved.json()["estado"] == "validado" and approved.json()["motivos"] == ["email_desechable"]

    assert _outbox(runtime, tables)[len(before):] == [
        ("AfiliadoSuspendido", ana), ("AfiliadoReactivado", ana), ("AfiliadoAprobado", bot)]
    [suspension] = _decoded_outbox(runtime, tables, "AfiliadoSuspendido")
    assert (suspension["id"], suspension["motivo"]) == (ana, "tráfico incentivado")
    assert _decoded_outbox(runtime, tables, "AfiliadoReactivado")[0]["id"] == ana
    assert _decoded_outbox(runtime, tables, "AfiliadoAprobado")[0]["id"] == bot


def test_invalid_transitions_are_409_on_estado_and_change_nothing(afiliados_api):
    client, runtime, tables = afiliados_api
    ana = client.post("/afiliados", json=FULL).json()["id"]
    registered = client.post("/afiliados", json={"user_id": "r", "email": "r@example.com", "nombre": "Rosa"}).json()["id"]
    _validate(runtime)
    registered_still = client.post("/afiliados", json={"user_id": "s", "email": "s@example.com", "nombre": "Sara"}).json()["id"]
    before = _outbox(runtime, tables)
    refused = [
        client.post(f"/afiliados/{ana}/aprobar"),  # validated: nothing to approve
        client.post(f"/afiliados/{ana}/reactivar"),  # not suspended
        client.post(f"/afiliados/{registered_still}/suspender", json={"motivo": "x"}),  # not validated yet
        client.post(f"/afiliados/{registered_still}/aprobar"),  # awaiting the automatic validation
    ]
    for response in refused:
        assert response.status_code == 409, response.text
        assert _fields(response) == {"estado"}
        assert "cannot" in response.json()["detail"]
    assert client.post(f"/afiliados/{ana}/suspender", json={"motivo": "x"}).status_code == 200
    again = client.post(f"/afiliados/{ana}/suspender", json={"motivo": "x"})
    assert again.status_code == 409 and "suspendido" in again.json()["detail"]
    assert client.get(f"/afiliados/{registered}").json()["estado"] == "validado"
    assert client.get(f"/afiliados/{registered_still}").json()["estado"] == "registrado"
    assert _outbox(runtime, tables)[len(before):] == [("AfiliadoSuspendido", ana)]


def test_unknown_affiliate_actions_are_404_and_suspension_needs_a_reason(afiliados_api):
    client, runtime, tables = afiliados_api
    for action in ("aprobar", "reactivar"):
        response = client.post(f"/afiliados/nope/{action}")
        assert response.status_code == 404 and _fields(response) == {"afiliado_id"}
    assert client.post("/afiliados/nope/suspender", json={"motivo": "x"}).status_code == 404
    ana = client.post("/afiliados", json=FULL).json()["id"]
    _validate(runtime)
    for body in ({}, {"motivo": ""}, {"motivo": "   "}, {"motivo": "x" * 501}, {"motivo": "x", "extra": 1}):
        response = client.post(f"/afiliados/{ana}/suspender", json=body)
        assert response.status_code == 422, body
        assert _fields(response) & {"motivo", "extra"}
    assert client.get(f"/afiliados/{ana}").json()["estado"] == "validado"
    assert [t for t, _ in _outbox(runtime, tables)] == ["AfiliadoRegistrado", "AfiliadoValidado"]


# -- consumers: propagation, one handler at a time --------------------------------------------------
def _incoming(topic: str, event_type: str, key: str, payload: dict) -> IncomingEvent:
    event_id = new_id()
    return IncomingEvent(topic, "test", event_id, event_type, 1, key, NOW, event_id, event_id, payload)


def test_marketing_disables_and_re_enables_an_affiliate_once_per_state(tmp_path):
    _, runtime, tables = _client("marketing", tmp_path)
    topic = "afiliados.eventos"

    def handle(handler, event_type, payload):
        with runtime.db.transaction() as session:
            return [(e.event_type, e.payload.get("motivo")) for e in handler(session, _incoming(topic, event_type, "a1", payload))]

    def estado():
        with runtime.db.transaction() as session:
            return session.scalar(select(tables.afiliados.c.estado).where(tables.afiliados.c.afiliado_id == "a1"))

    assert handle(campaigns.enable_afiliado, "AfiliadoValidado", {"id": "a1"}) == [("AfiliadoHabilitado", None)]
    assert handle(campaigns.enable_afiliado, "AfiliadoValidado", {"id": "a1"}) == []  # already enabled
    assert handle(campaigns.disable_afiliado, "AfiliadoSuspendido", {"id": "a1", "motivo": "fraude"}) == [
        ("AfiliadoInhabilitado", "fraude")]
    assert estado() == "inhabilitado"
    assert handle(campaigns.disable_afiliado, "AfiliadoSuspendido", {"id": "a1", "motivo": "fraude"}) == []
    assert handle(campaigns.enable_afiliado, "AfiliadoReactivado", {"id": "a1"}) == [("AfiliadoHabilitado", None)]
    assert estado() == "habilitado"
    # A rejected affiliate a human approves is enabled too.
    handle(campaigns.note_rejected_afiliado, "AfiliadoRechazado", {"id": "a2", "motivos": ["x"]})
    with runtime.db.transaction() as session:
        emitted = campaigns.enable_afiliado(session, _incoming(topic, "AfiliadoAprobado", "a2", {"id": "a2"}))
    assert [e.event_type for e in emitted] == ["AfiliadoHabilitado"]


def test_conversiones_learns_suspension_and_reactivation(tmp_path):
    _, runtime, _ = _client("conversiones", tmp_path)
    topic = "marketing.eventos"

    def learn(handler, event_type):
        with runtime.db.transaction() as session:
            handler(session, _incoming(topic, event_type, "a1", {"afiliado_id": "a1", "motivo": "m"}))
        with runtime.db.transaction() as session:
            return conversiones_reference.reference(session, "a1", "k1")

    enabled = learn(conversiones_reference.learn_afiliado, "AfiliadoHabilitado")
    assert (enabled.affiliate_enabled, enabled.affiliate_suspended) == (True, False)
    suspended = learn(conversiones_reference.learn_afiliado_inhabilitado, "AfiliadoInhabilitado")
    assert (suspended.affiliate_enabled, suspended.affiliate_suspended) == (False, True)
    again = learn(conversiones_reference.learn_afiliado, "AfiliadoHabilitado")
    assert (again.affiliate_enabled, again.affiliate_suspended) == (True, False)
    with runtime.db.transaction() as session:
        assert conversiones_reference.reference(session, "never-seen", "k1").affiliate_enabled is None


# -- end to end through the running platform ---------------------------------------------------------
def test_suspension_and_reactivation_reach_conversion_validation(tmp_path):
    platform = Platform(tmp_path / "alpes").start()
    try:
        registered = platform.post("afiliados", "/afiliados", {**FULL, "email": "e2e@example.com"})
        assert registered.status_code == 201, registered.text
        ana = registered.json()["id"]
        campaign = platform.post("marketing", "/campanas", {"nombre": "Lifecycle", "porcentaje_comision": "10"})
        assert campaign.status_code == 201, campaign.text
        campaign_id = campaign.json()["id"]
        wait_until(lambda: platform.get("afiliados", f"/afiliados/{ana}")["estado"] == "validado", what="ana validated")

        attempts = Counter()

        def postback(phase: str) -> dict:
            attempts[phase] += 1
            response = platform.post("conversiones", "/conversiones", {
                "affiliate_id": ana, "campaign_id": campaign_id, "user_id": "cust", "conversion_value": "50.00",
                "conversion_type": "sale", "order_id": f"{phase}-{attempts[phase]}"})
            assert response.status_code == 200, response.text
            return response.json()

        def decided(phase: str, status: str):
            conversion = platform.get("conversiones", f"/conversiones/{postback(phase)['id']}")
            return conversion if conversion["status"] == status else None

        wait_until(lambda: decided("before", "validated"), what="a conversion validated before the suspension",
                   diagnose=platform.diagnostics)

        suspended = platform.post("afiliados", f"/afiliados/{ana}/suspender", {"motivo": "tráfico incentivado"})
        assert suspended.status_code == 200 and suspended.json()["estado"] == "suspendido"
        rejected = wait_until(lambda: decided("suspended", "rejected"), what="a conversion rejected after the suspension",
                              diagnose=platform.diagnostics)
        assert rejected["reason"] == "affiliate_suspended"

        reactivated = platform.post("afiliados", f"/afiliados/{ana}/reactivar", {})
        assert reactivated.status_code == 200 and reactivated.json()["estado"] == "validado"
        wait_until(lambda: decided("reactivated", "validated"), what="a conversion validated after the reactivation",
                   diagnose=platform.diagnostics)

        def audited():
            events = platform.get("auditoria", "/auditoria/eventos", aggregate_id=ana)["eventos"]
            types = [e["event_type"] for e in events]
            return events if {"AfiliadoSuspendido", "AfiliadoInhabilitado", "AfiliadoReactivado"} <= set(types) \
                and types.count("AfiliadoHabilitado") == 2 else None
        events = wait_until(audited, what="the lifecycle in the audit log", diagnose=platform.diagnostics)
        # Per-key order holds within each topic (audit consumers of different topics interleave freely) ...
        on = lambda topic: [e["event_type"] for e in events if e["topic"] == topic]
        assert [t for t in on("afiliados.eventos") if t in ("AfiliadoSuspendido", "AfiliadoReactivado")] == [
            "AfiliadoSuspendido", "AfiliadoReactivado"]
        assert [t for t in on("marketing.eventos") if t.startswith("Afiliado")] == [
            "AfiliadoHabilitado", "AfiliadoInhabilitado", "AfiliadoHabilitado"]
        # ... and across topics the chain of causes is recorded: each reaction names its cause.
        by_type = {e["event_type"]: e for e in events}
        assert by_type["AfiliadoInhabilitado"]["causation_id"] == by_type["AfiliadoSuspendido"]["event_id"]
        assert Counter(e["event_type"] for e in events)["AfiliadoSuspendido"] == 1
        assert Counter(e["event_type"] for e in events)["AfiliadoReactivado"] == 1
    finally:
        platform.stop()
