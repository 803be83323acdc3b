"""Editing a running campaign's terms (PUT /campanas/{id}): what may change and what may not, the
owner only, CampanaActualizada committed with the change, and the services that keep a copy of the
terms (conversiones: the maximum value, the end, the landing page, the click minimum; afiliados:
the program's name; auditoria: the advertiser's log) applying it once, however often delivered."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from importlib import import_module

import pytest
from access_helpers import bearer, install_key
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.exc import DBAPIError
from test_access_marketing_campaigns import REGISTRY, World, _build, _outbox
from test_http import _count, _fields

from alpes.kernel.access import SYSTEM_PRINCIPAL
from alpes.kernel.db import Database, migrate
from alpes.kernel.errors import Conflict
from alpes.kernel.inbox import InboxProcessor
from alpes.kernel.messages import IncomingEvent, new_id
from alpes.marketing import campaigns, commissions, domain
from alpes.marketing import tables as marketing_tables
from alpes.settings import Settings

NEXT_YEAR = datetime.now(UTC).replace(microsecond=0) + timedelta(days=365)


@pytest.fixture
def world(tmp_path):
    return World(*_build(tmp_path))


def _put(world: World, key: str, campana: str, **terms):
    return world.client.put(f"/campanas/{campana}", headers=bearer(key), json=terms)


def _row(world: World, campana: str) -> dict:
    c = world.tables.campanas
    with world.runtime.db.read() as session:
        return dict(session.execute(select(c).where(c.c.id == campana)).mappings().one())


def _book_commission(runtime, campana: str, value: str) -> None:
    """A validated conversion of `value` in the campaign (10 %), booked as the marketing consumer would."""
    payload = {"conversion_id": new_id(), "affiliate_id": "X", "campaign_id": campana,
               "conversion_value": Decimal(value), "currency": "EUR", "conversion_type": "sale",
               "timestamp": datetime.now(UTC)}
    event = IncomingEvent("conversiones.eventos", "test", new_id(), "ConversionValidated", 1, campana,
                          payload["timestamp"], "c", "c", payload)
    with runtime.db.transaction() as session:
        commissions.calculate_comision(session, event)


# -- marketing over HTTP --------------------------------------------------------------------------
def test_an_advertiser_changes_its_campaigns_terms_and_campana_actualizada_carries_them_all(world):
    answer = _put(world, world.adv_a, world.camp_a, nombre="Invierno", presupuesto="750.00",
                  fecha_fin=NEXT_YEAR.isoformat(), landing_url="https://brand-a.com/invierno",
                  valor_maximo_conversion="60.00", min_segundos_click_conversion=5, periodo_bloqueo_dias=7)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert (body["nombre"], body["presupuesto"], body["landing_url"], body["valor_maximo_conversion"],
            body["min_segundos_click_conversion"], body["periodo_bloqueo_dias"]) == (
        "Invierno", "750.00", "https://brand-a.com/invierno", "60.00", 5, 7)
    assert datetime.fromisoformat(body["fecha_fin"]) == NEXT_YEAR
    # What may not change stayed: the currency, the owner, the rate.
    assert (body["moneda"], body["anunciante_id"], body["porcentaje_comision"]) == ("EUR", world.a_id, "10.0000")
    assert world.get(world.adv_a, f"/campanas/{world.camp_a}").json() == body
    [event] = _outbox(world.runtime, world.tables, "CampanaActualizada")
    assert (event["topic"], event["partition_key"]) == ("marketing.eventos", world.camp_a)
    p = event["payload"]
    assert (p["id"], p["nombre"], p["presupuesto"], p["fecha_fin"], p["valor_maximo_conversion"]) == (
        world.camp_a, "Invierno", Decimal("750.00"), NEXT_YEAR, Decimal("60.00"))
    assert p["cambios"] == ["nombre", "presupuesto", "fecha_fin", "landing_url", "valor_maximo_conversion",
                            "min_segundos_click_conversion", "periodo_bloqueo_dias"]


def test_terms_left_out_stay_null_clears_and_the_same_terms_announce_nothing(world):
    assert _put(world, world.adv_a, world.camp_a, presupuesto="300.00").status_code == 200
    assert _put(world, world.adv_a, world.camp_a, nombre="Solo el nombre").json()["presupuesto"] == "300.00"
    before = world.outbox_count()
    again = _put(world, world.adv_a, world.camp_a, nombre="Solo el nombre", presupuesto="300.0")
    assert again.status_code == 200 and world.outbox_count() == before  # 300.0 is 300.00: nothing changed
    cleared = _put(world, world.adv_a, world.camp_a, presupuesto=None, valor_maximo_conversion=None)
    assert cleared.status_code == 200 and cleared.json()["presupuesto"] is None
    assert cleared.json()["valor_maximo_conversion"] is None
    last = _outbox(world.runtime, world.tables, "CampanaActualizada")[-1]["payload"]
    assert last["cambios"] == ["presupuesto", "valor_maximo_conversion"] and last["nombre"] == "Solo el nombre"
    assert last["presupuesto"] is None and last["valor_maximo_conversion"] is None
    # A campaign with no landing page: null for it is no change (only removing one is refused).
    sin_landing, before = world.create(world.adv_a), world.outbox_count()
    assert _put(world, world.adv_a, sin_landing, landing_url=None).status_code == 200
    assert world.outbox_count() == before


def test_only_the_owner_or_an_operator_changes_a_campaign(world):
    before, row = world.outbox_count(), _row(world, world.camp_a)
    assert _put(world, world.adv_b, world.camp_a, nombre="Hijacked").status_code == 404
    assert _put(world, world.adv_a, world.camp_b, nombre="Hijacked").status_code == 404
    assert _put(world, world.adv_a, "no-such-campaign", nombre="X").status_code == 404
    assert _put(world, world.aff_x, world.camp_a, nombre="Hijacked").status_code == 403
    assert world.client.put(f"/campanas/{world.camp_a}", json={"nombre": "Hijacked"}).status_code == 401
    assert world.outbox_count() == before and _row(world, world.camp_a) == row
    assert _put(world, world.op, world.camp_a, nombre="By the operator").json()["nombre"] == "By the operator"
    # An operator's own campaign: any public landing host (no domain list), as at creation.
    assert _put(world, world.op, world.camp_op, landing_url="https://other.example.org/").status_code == 200


@pytest.mark.parametrize("terms, field", [
    ({"moneda": "USD"}, "moneda"),
    ({"anunciante_id": "someone-else"}, "anunciante_id"),
    ({"porcentaje_comision": "90"}, "porcentaje_comision"),
    ({"fecha_inicio": "2030-01-01T00:00:00Z"}, "fecha_inicio"),
    ({"segmentacion": {"paises": ["CO"]}}, "segmentacion"),
    ({"nombre": None}, "nombre"),
    ({"nombre": ""}, "nombre"),
    ({"presupuesto": "-1.00"}, "presupuesto"),
    ({"presupuesto": "10.001"}, "presupuesto"),  # EUR has two decimals
    ({"valor_maximo_conversion": "abc"}, "valor_maximo_conversion"),
    ({"fecha_fin": "2030-01-01T00:00:00"}, "fecha_fin"),  # no time zone: ambiguous
    ({"fecha_fin": "2020-01-01T00:00:00Z"}, "fecha_fin"),  # into the past
    ({"landing_url": None}, "landing_url"),  # its tracking links redirect there
    ({"landing_url": "https://evil.example.com/"}, "landing_url"),  # not A's domain
    ({"landing_url": "https://brand-a.com:8443/"}, "landing_url"),  # no port but the default
    ({"landing_url": "https://brand-a.com@evil.io/"}, "landing_url"),
    ({"min_segundos_click_conversion": -1}, "min_segundos_click_conversion"),
    ({"periodo_bloqueo_dias": None}, "periodo_bloqueo_dias"),
    ({"periodo_bloqueo_dias": 400}, "periodo_bloqueo_dias"),
])
def test_refused_terms_answer_422_naming_the_field_and_change_nothing(world, terms, field):
    before, row = world.outbox_count(), _row(world, world.camp_a)
    answer = _put(world, world.adv_a, world.camp_a, **terms)
    assert answer.status_code == 422 and field in _fields(answer), answer.text
    assert world.outbox_count() == before and _row(world, world.camp_a) == row


def test_an_empty_body_is_refused_with_the_terms_it_may_name(world):
    answer = _put(world, world.adv_a, world.camp_a)
    assert answer.status_code == 422 and "presupuesto" in answer.json()["detail"]


def test_the_end_stays_after_the_start(world):
    start = (NEXT_YEAR + timedelta(days=10)).isoformat()
    campana = world.create(world.adv_a, fecha_inicio=start)
    answer = _put(world, world.adv_a, campana, fecha_fin=NEXT_YEAR.isoformat())
    assert answer.status_code == 422 and _fields(answer) == {"fecha_fin"}
    assert "after fecha_inicio" in answer.text


def test_a_finished_campaign_keeps_its_terms(world):
    assert world.client.post(f"/campanas/{world.camp_a}/finalizar", headers=bearer(world.adv_a)).status_code == 200
    before = world.outbox_count()
    answer = _put(world, world.adv_a, world.camp_a, nombre="Too late")
    assert answer.status_code == 409 and _fields(answer) == {"estado"}
    assert world.outbox_count() == before and _row(world, world.camp_a)["nombre"] == "Camp"


def test_a_budget_below_what_was_spent_is_refused_with_the_amount(world):
    _book_commission(world.runtime, world.camp_a, "400.00")  # 10 %: 40.00 spent
    before = world.outbox_count()
    refused = _put(world, world.adv_a, world.camp_a, presupuesto="39.99", nombre="Renamed too")
    assert refused.status_code == 409 and _fields(refused) == {"presupuesto"} and "40.00 EUR" in refused.text
    assert world.outbox_count() == before and _row(world, world.camp_a)["nombre"] == "Camp"  # nothing half-done
    assert _put(world, world.adv_a, world.camp_a, presupuesto="40.00").json()["presupuesto"] == "40.00"
    # The budget now caps the next commission at nothing left.
    _book_commission(world.runtime, world.camp_a, "100.00")
    k = world.tables.comisiones
    with world.runtime.db.read() as session:
        assert session.scalar(select(func.sum(k.c.monto)).where(k.c.campana_id == world.camp_a)) == Decimal("40.00")


def test_a_lower_lock_period_governs_new_commissions_only(world):
    _book_commission(world.runtime, world.camp_a, "100.00")
    assert _put(world, world.adv_a, world.camp_a, periodo_bloqueo_dias=0).status_code == 200
    _book_commission(world.runtime, world.camp_a, "100.00")
    k = world.tables.comisiones
    with world.runtime.db.read() as session:
        rows = session.execute(select(k.c.calculada_en, k.c.aprobable_desde).order_by(k.c.calculada_en)).all()
    assert [(r.aprobable_desde - r.calculada_en).days for r in rows] == [30, 0]


# -- persistence on SQLite and MariaDB --------------------------------------------------------------
def test_terms_round_trip_and_a_budget_never_drops_below_what_racing_commissions_spent(db_url, registry):
    """Conversions book commissions while the advertiser lowers the budget: each change that is
    accepted is above what was spent at that moment (the campaign row is locked by both), so the
    final spend never exceeds the final budget. The same terms read back announce nothing."""
    migrate(db_url, "alpes.marketing:migrations")
    db = Database(db_url)
    try:
        with db.transaction() as session:
            campana, _ = campaigns.create_campana(session, SYSTEM_PRINCIPAL, domain.NuevaCampana(
                "Carrera", Decimal("10"), "EUR", presupuesto=Decimal("500.00")), https_only=False)
        terms = {"fecha_fin": NEXT_YEAR + timedelta(microseconds=123456), "valor_maximo_conversion": Decimal("9.99"),
                 "landing_url": "https://tienda.example.com/", "nombre": "Ñandú 🐦"}
        with db.transaction() as session:
            assert campaigns.update_campana(session, SYSTEM_PRINCIPAL, campana, terms)
        with db.transaction() as session:  # read back from this database: equal, nothing to announce
            assert campaigns.update_campana(session, SYSTEM_PRINCIPAL, campana, terms) == []

        accepted, refused = [], []

        def retrying(work):
            for _attempt in range(30):  # a deadlock is retried, as the consumer and the client would
                try:
                    with db.transaction() as session:
                        return work(session)
                except DBAPIError:
                    continue
            raise AssertionError("kept failing")

        def convert(n: int):
            payload = {"conversion_id": new_id(), "affiliate_id": f"a{n % 3}", "campaign_id": campana,
                       "conversion_value": Decimal("100.00"), "currency": "EUR", "conversion_type": "sale",
                       "timestamp": datetime.now(UTC)}
            event = IncomingEvent("conversiones.eventos", "test", new_id(), "ConversionValidated", 1, campana,
                                  payload["timestamp"], "c", "c", payload)
            retrying(lambda session: commissions.calculate_comision(session, event))

        def lower():
            for presupuesto in range(400, 0, -25):
                try:
                    retrying(lambda session: campaigns.update_campana(
                        session, SYSTEM_PRINCIPAL, campana, {"presupuesto": Decimal(presupuesto)}))
                    accepted.append(presupuesto)
                except Conflict:
                    refused.append(presupuesto)

        for n in range(10):  # 100.00 spent before the race: lowering below it is always refused
            convert(n)
        threads = [threading.Thread(target=lambda w=w: [convert(n) for n in range(10 + w, 40, 4)]) for w in range(4)]
        threads.append(threading.Thread(target=lower))
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        k, c = marketing_tables.comisiones, marketing_tables.campanas
        with db.read() as session:
            spent = session.scalar(select(func.sum(k.c.monto)).where(k.c.campana_id == campana))
            presupuesto = session.scalar(select(c.c.presupuesto).where(c.c.id == campana))
        assert accepted[0] == 400 and refused[-1] == 25  # 400 is above any spend; 25 below what was spent first
        assert presupuesto == Decimal(accepted[-1]) and spent <= presupuesto, (spent, presupuesto, accepted, refused)
    finally:
        db.dispose()


# -- the services that keep a copy of the terms ---------------------------------------------------------
def _deliver(runtime, spec_topic: str, rows: list[dict], times: int = 2) -> None:
    """Marketing's outbox rows handed to `runtime`'s consumer of `spec_topic` through its inbox, each
    `times` times (a broker redelivers), as the relay and the broker would."""
    [spec] = [s for s in runtime.consumer_specs if s.topic == spec_topic and s.subscription != "audit-consumer"]
    processor = InboxProcessor(runtime.db, runtime.inbox_table, runtime.outbox, spec.subscription, spec.handlers)
    for row in rows:
        event = IncomingEvent(row["topic"], spec.subscription, row["event_id"], row["event_type"],
                              row["schema_version"], row["partition_key"], row["payload"]["timestamp"], "c", "c",
                              REGISTRY.decode(row["event_type"], REGISTRY.encode(
                                  row["event_type"], row["payload"], row["schema_version"])[0],
                                  row["schema_version"]))
        for _ in range(times):
            assert processor.process([event]) == {row["event_id"]: None}


def test_conversiones_holds_a_conversion_above_the_lowered_maximum(world, tmp_path):
    """The advertiser lowers its campaign's maximum conversion value from 500.00 to 50.00: once
    conversiones has heard CampanaActualizada (twice: applied once), an 80.00 conversion is held for
    review (value_above_maximum) and a 40.00 one is validated."""
    settings = Settings(data_dir=tmp_path / "conversiones", broker_url="pulsar://127.0.0.1:1")
    app, runtime = import_module("alpes.conversiones.service").build(settings)
    client, operator = TestClient(app), install_key(runtime, "operator")
    campana = world.create(world.adv_a, landing_url="https://brand-a.com/")
    assert _put(world, world.adv_a, campana, valor_maximo_conversion="50.00").status_code == 200
    rows = [r for r in _outbox(world.runtime, world.tables)
            if r["event_type"] in ("AfiliadoHabilitado", "CampanaCreada", "CampanaActualizada")
            and r["partition_key"] in (campana, "X")]
    assert [r["event_type"] for r in rows] == ["CampanaCreada", "CampanaActualizada"]
    _deliver(runtime, "marketing.eventos", rows)
    with runtime.db.transaction() as session:  # the affiliate is enabled (AfiliadoHabilitado)
        import_module("alpes.conversiones.reference")._learn_estado_afiliado(session, "X", "habilitado")
    rc = import_module("alpes.conversiones.tables").ref_campanas
    with runtime.db.read() as session:
        maximo = session.scalar(select(rc.c.valor_maximo_conversion).where(rc.c.campana_id == campana))
    assert maximo == Decimal("50.00")

    def post(value: str, order: str) -> dict:
        answer = client.post("/conversiones", headers=bearer(operator), json={
            "affiliate_id": "X", "campaign_id": campana, "user_id": "c-1", "conversion_value": value,
            "conversion_type": "sale", "order_id": order})
        assert answer.status_code == 200, answer.text
        return client.get(f"/conversiones/{answer.json()['id']}", headers=bearer(operator)).json()

    held = post("80.00", "o-1")
    assert (held["status"], held["reason"]) == ("on_hold", "value_above_maximum")
    assert post("40.00", "o-2")["status"] == "validated"


def test_conversiones_moves_the_end_and_the_landing_page(world, tmp_path):
    settings = Settings(data_dir=tmp_path / "conversiones", broker_url="pulsar://127.0.0.1:1")
    _, runtime = import_module("alpes.conversiones.service").build(settings)
    campana = world.create(world.adv_a, landing_url="https://brand-a.com/old")
    assert _put(world, world.adv_a, campana, fecha_fin=NEXT_YEAR.isoformat(),
                landing_url="https://shop.brand-a.com/new", min_segundos_click_conversion=12).status_code == 200
    _deliver(runtime, "marketing.eventos", [r for r in _outbox(world.runtime, world.tables)
                                            if r["partition_key"] == campana])
    rc = import_module("alpes.conversiones.tables").ref_campanas
    with runtime.db.read() as session:
        row = session.execute(select(rc).where(rc.c.campana_id == campana)).mappings().one()
    assert (row["fecha_fin"], row["landing_url"], row["min_segundos_click_conversion"]) == (
        NEXT_YEAR, "https://shop.brand-a.com/new", 12)


def test_afiliados_catalogue_shows_the_new_name(world, tmp_path):
    settings = Settings(data_dir=tmp_path / "afiliados", broker_url="pulsar://127.0.0.1:1")
    app, runtime = import_module("alpes.afiliados.service").build(settings)
    campana = world.create(world.adv_a)
    assert _put(world, world.adv_a, campana, nombre="Rebautizada").status_code == 200
    _deliver(runtime, "marketing.eventos", [r for r in _outbox(world.runtime, world.tables)
                                            if r["partition_key"] == campana])
    operator = install_key(runtime, "operator")
    programas = TestClient(app).get("/programas", headers=bearer(operator)).json()["programas"]
    assert [p["nombre"] for p in programas if p["id"] == campana] == ["Rebautizada"]


def test_auditoria_shows_the_change_to_the_campaigns_advertiser_only(world, tmp_path):
    settings = Settings(data_dir=tmp_path / "auditoria", broker_url="pulsar://127.0.0.1:1")
    app, runtime = import_module("alpes.auditoria.service").build(settings)
    assert _put(world, world.adv_a, world.camp_a, nombre="Auditada").status_code == 200
    rows = [r for r in _outbox(world.runtime, world.tables) if r["partition_key"] == world.camp_a]
    assert [r["event_type"] for r in rows] == ["CampanaCreada", "CampanaActualizada"]
    [audit] = [s for s in runtime.consumer_specs if s.topic == "marketing.eventos"]
    processor = InboxProcessor(runtime.db, runtime.inbox_table, runtime.outbox, audit.subscription, audit.handlers)
    for row in rows:
        for _ in range(2):
            processor.process([IncomingEvent(row["topic"], audit.subscription, row["event_id"], row["event_type"],
                                             row["schema_version"], row["partition_key"],
                                             row["payload"]["timestamp"], "c", "c", row["payload"])])
    client = TestClient(app)
    a = install_key(runtime, "advertiser", anunciante_id=world.a_id)
    b = install_key(runtime, "advertiser", anunciante_id=world.b_id)

    def types(key):
        answer = client.get("/auditoria/eventos", headers=bearer(key), params={"aggregate_id": world.camp_a})
        return [e["event_type"] for e in answer.json()["eventos"]]

    assert types(a) == ["CampanaCreada", "CampanaActualizada"]  # audited once each
    assert types(b) == []
