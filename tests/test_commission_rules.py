"""Commission rules: ordered, first match wins, effective-dated versions per campaign, with an
affiliate cap and the campaign budget; every commission explains itself."""

from __future__ import annotations

import threading
from collections import defaultdict
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select
from sqlalchemy.exc import DBAPIError
from test_commission_lifecycle import Marketing, _fields, _incoming, _outbox

from alpes.kernel.access import SYSTEM_PRINCIPAL
from alpes.kernel.db import Database, migrate
from alpes.kernel.messages import new_id
from alpes.marketing import domain
from alpes.marketing import campaigns, commissions
from alpes.marketing import tables as marketing_tables

NOW = datetime(2026, 11, 18, 12, 0, tzinfo=timezone.utc)  # a Wednesday


def _conv(base="100.00", tipo="sale", afiliado="a1", en_el_mes=0) -> domain.ConversionACalcular:
    return domain.ConversionACalcular(Decimal(base), tipo, afiliado, en_el_mes)


def _set(*reglas, tope=None, version=1, desde=NOW) -> domain.ConjuntoReglas:
    return domain.ConjuntoReglas(version, desde, tuple(reglas), tope)


# -- domain rules ------------------------------------------------------------------------------------
def test_cpa_pays_a_flat_amount_and_cps_a_percentage_of_the_sale():
    cpa = domain.calcular(_set(domain.Regla("cpa", monto=Decimal("7.50"))), Decimal(10), _conv("999.99"), None, None)
    assert (cpa.monto, cpa.tipo, cpa.regla_id, cpa.porcentaje, cpa.limitado_por) == (
        Decimal("7.50"), "cpa", "r1", Decimal(0), None)
    cps = domain.calcular(_set(domain.Regla("cps", porcentaje=Decimal("12.5"))), Decimal(10), _conv("99.99"), None, None)
    assert (cps.monto, cps.tipo, cps.porcentaje) == (Decimal("12.50"), "cps", Decimal("12.5"))  # 12.49875 half-up


def test_no_rule_set_or_no_matching_rule_falls_back_to_the_campaign_percentage():
    flat = domain.calcular(None, Decimal(10), _conv("100.00"), None, None)
    assert (flat.monto, flat.version, flat.regla_id, flat.tipo) == (Decimal("10.00"), 0, None, "cps")
    only_leads = _set(domain.Regla("cpa", monto=Decimal("3.00"), conversion_type="lead"), version=4)
    fallback = domain.calcular(only_leads, Decimal(10), _conv("100.00"), None, None)
    assert (fallback.monto, fallback.version, fallback.regla_id) == (Decimal("10.00"), 4, None)
    assert fallback.chequeos[0] == "rule r1 skipped: conversion_type sale != lead"


def test_the_first_matching_rule_wins_in_order():
    reglas = _set(domain.Regla("cpa", monto=Decimal("20.00"), afiliado_id="vip"),
                  domain.Regla("cpa", monto=Decimal("2.00"), conversion_type="lead"),
                  domain.Regla("cps", porcentaje=Decimal("5")),
                  domain.Regla("cps", porcentaje=Decimal("50")))
    assert domain.calcular(reglas, Decimal(10), _conv(afiliado="vip", tipo="lead"), None, None).regla_id == "r1"
    lead = domain.calcular(reglas, Decimal(10), _conv(tipo="lead"), None, None)
    assert (lead.regla_id, lead.monto) == ("r2", Decimal("2.00"))
    assert lead.chequeos[0] == "rule r1 skipped: afiliado_id a1 != vip"
    sale = domain.calcular(reglas, Decimal(10), _conv(), None, None)
    assert (sale.regla_id, sale.monto) == ("r3", Decimal("5.00"))  # r4 also matches: never reached


def test_a_tier_applies_from_its_threshold_of_approved_conversions_this_month():
    reglas = _set(domain.Regla("cps", porcentaje=Decimal("15"), min_aprobadas=10), domain.Regla("cps", porcentaje=Decimal("10")))
    below = domain.calcular(reglas, Decimal(1), _conv(en_el_mes=9), None, None)
    assert (below.regla_id, below.monto) == ("r2", Decimal("10.00"))
    assert below.chequeos[0] == "rule r1 skipped: 9 approved conversions this month < min_aprobadas 10"
    assert domain.calcular(reglas, Decimal(1), _conv(en_el_mes=10), None, None).monto == Decimal("15.00")


def test_the_version_in_force_at_the_conversion_time_is_used():
    v1, v2 = _set(version=1, desde=NOW), _set(version=2, desde=NOW + timedelta(days=1))
    assert domain.version_vigente([v1, v2], NOW - timedelta(microseconds=1)) is None  # version 0
    assert domain.version_vigente([v1, v2], NOW) is v1
    assert domain.version_vigente([v2, v1], NOW + timedelta(hours=23)) is v1
    assert domain.version_vigente([v1, v2], NOW + timedelta(days=2)) is v2


def test_caps_cut_the_amount_to_partial_or_zero_with_the_reason():
    assert domain.aplicar_topes(Decimal("10.00"), Decimal("4.00"), None) == (Decimal("4.00"), "tope_afiliado")
    assert domain.aplicar_topes(Decimal("10.00"), None, Decimal("0.00")) == (Decimal("0.00"), "presupuesto")
    assert domain.aplicar_topes(Decimal("10.00"), Decimal("6.00"), Decimal("3.00")) == (Decimal("3.00"), "presupuesto")
    assert domain.aplicar_topes(Decimal("10.00"), Decimal("3.00"), Decimal("6.00")) == (Decimal("3.00"), "tope_afiliado")
    assert domain.aplicar_topes(Decimal("10.00"), Decimal("10.00"), Decimal("50")) == (Decimal("10.00"), None)
    assert domain.aplicar_topes(Decimal("10.00"), Decimal("-2.00"), None) == (Decimal("0.00"), "tope_afiliado")


def test_cap_periods_are_the_utc_day_iso_week_calendar_month_or_all_time():
    assert domain.ventana_del_periodo("dia", NOW) == (NOW.replace(hour=0), NOW.replace(hour=0) + timedelta(days=1))
    lunes = datetime(2026, 11, 16, tzinfo=timezone.utc)
    assert domain.ventana_del_periodo("semana", NOW) == (lunes, lunes + timedelta(days=7))
    assert domain.ventana_del_periodo("mes", datetime(2026, 12, 31, 23, tzinfo=timezone.utc)) == (
        datetime(2026, 12, 1, tzinfo=timezone.utc), datetime(2027, 1, 1, tzinfo=timezone.utc))
    assert domain.ventana_del_periodo("total", NOW) == (None, None)
    with pytest.raises(ValueError):
        domain.Tope(Decimal(1), "anio")
    with pytest.raises(ValueError):
        domain.Regla("cpa", porcentaje=Decimal(1))


# -- property: caps and budget are never exceeded, amounts exact to the cent --------------------------
_conversions = st.lists(st.tuples(st.sampled_from(["a1", "a2", "a3"]), st.sampled_from(["sale", "lead"]),
                                  st.decimals(min_value=0, max_value=Decimal("5000.00"), places=2),
                                  st.integers(min_value=0, max_value=60 * 24 * 40),
                                  st.booleans()), max_size=40)  # the last: refunded right after booking


@settings(max_examples=150, deadline=None)
@given(_conversions, st.sampled_from(domain.PERIODOS_TOPE), st.decimals(min_value=Decimal("0.01"),
       max_value=Decimal("300.00"), places=2), st.none() | st.decimals(min_value=0, max_value=Decimal("900.00"), places=2))
def test_booked_commissions_never_exceed_the_budget_nor_an_affiliate_cap(conversions, periodo, tope, presupuesto):
    """The same bookkeeping the handler does (sums of what was booked per period and in all, the
    tier counting the month's approved conversions not reversed), on random sequences of
    conversions in time order, some refunded: a reversal gives no cap or budget back."""
    reglas = _set(domain.Regla("cpa", monto=Decimal("9.99"), conversion_type="lead"),
                  domain.Regla("cps", porcentaje=Decimal("12.3456"), min_aprobadas=3),
                  domain.Regla("cps", porcentaje=Decimal("7.5")), tope=domain.Tope(tope, periodo), desde=NOW)
    booked: list[tuple[str, datetime, Decimal]] = []
    reversed_: set[int] = set()  # positions in `booked`
    for afiliado, tipo, base, minutos, refunded in sorted(conversions, key=lambda c: c[3]):
        momento = NOW + timedelta(minutes=minutos)
        desde, hasta = domain.ventana_del_periodo(periodo, momento)
        en_periodo = sum((m for a, t, m in booked if a == afiliado and (desde is None or desde <= t < hasta)),
                         Decimal(0))
        mes = domain.ventana_del_periodo("mes", momento)
        en_el_mes = sum(1 for n, (a, t, _) in enumerate(booked)
                        if a == afiliado and mes[0] <= t < mes[1] and n not in reversed_)
        restante = None if presupuesto is None else presupuesto - sum((m for *_, m in booked), Decimal(0))
        calculo = domain.calcular(reglas, Decimal(10), _conv(str(base), tipo, afiliado, en_el_mes), tope - en_periodo,
                                  restante)
        assert calculo.monto.as_tuple().exponent == -2 and calculo.monto >= 0
        assert calculo.monto <= calculo.monto_sin_tope
        assert (calculo.limitado_por is None) == (calculo.monto == calculo.monto_sin_tope)
        # The tier (r2) applies to a sale exactly when 3 approved, unreversed conversions precede it this month.
        assert tipo == "lead" or (calculo.regla_id == "r2") == (en_el_mes >= 3)
        if refunded:
            reversed_.add(len(booked))
        booked.append((afiliado, momento, calculo.monto))
    if presupuesto is not None:
        assert sum((m for *_, m in booked), Decimal(0)) <= presupuesto
    windows = defaultdict(Decimal)
    for afiliado, momento, monto in booked:
        windows[(afiliado, domain.ventana_del_periodo(periodo, momento))] += monto
    assert all(total <= tope for total in windows.values())


# -- in-process HTTP and the handler -------------------------------------------------------------------
@pytest.fixture
def mk(tmp_path):
    return Marketing(tmp_path)


def _validated(mk: Marketing, afiliado: str, campana: str, valor: str, tipo: str = "sale", when=None) -> dict:
    conversion_id = new_id()
    mk._handle(commissions.calculate_comision, "ConversionValidated", {
        "conversion_id": conversion_id, "affiliate_id": afiliado, "campaign_id": campana,
        "conversion_value": Decimal(valor), "currency": "EUR", "conversion_type": tipo,
        "timestamp": when or datetime.now(timezone.utc)})
    return mk.comision(conversion_id)


def _put(mk: Marketing, campana: str, reglas: list[dict], tope: dict | None = None):
    return mk.client.put(f"/campanas/{campana}/reglas", json={"reglas": reglas, "tope_por_afiliado": tope})


def test_put_creates_versions_get_shows_any_of_them_and_an_event_announces_each(mk):
    campana = mk.campana(porcentaje="10")
    empty = mk.client.get(f"/campanas/{campana}/reglas").json()
    assert (empty["version"], empty["reglas"], empty["porcentaje_comision"]) == (0, [], "10.0000")
    first = _put(mk, campana, [{"tipo": "cpa", "monto": "5", "conversion_type": "lead"}])
    assert first.status_code == 200, first.text
    assert first.json()["version"] == 1 and first.json()["reglas"][0]["monto"] == "5.00"
    second = _put(mk, campana, [{"tipo": "cps", "porcentaje": "20", "afiliado_id": "vip"}],
                  tope={"monto": "100.00", "periodo": "semana"})
    assert (second.json()["version"], second.json()["versiones"]) == (2, [1, 2])
    assert mk.client.get(f"/campanas/{campana}/reglas").json() == second.json()
    old = mk.client.get(f"/campanas/{campana}/reglas", params={"version": 1}).json()
    assert [r["id"] for r in old["reglas"]] == ["r1"] and old["reglas"][0]["conversion_type"] == "lead"
    assert mk.client.get(f"/campanas/{campana}/reglas", params={"version": 3}).status_code == 404
    events = _outbox(mk.runtime, mk.tables, "ReglasComisionActualizadas")
    assert [(p["campana_id"], p["version"]) for _, p in events] == [(campana, 1), (campana, 2)]
    assert '"afiliado_id": "vip"' in events[1][1]["reglas"]


@pytest.mark.parametrize("body, field", [
    ({"reglas": [{"tipo": "cpa", "monto": "-1.00"}]}, "reglas.0.monto"),
    ({"reglas": [{"tipo": "cps", "porcentaje": "100"}, {"tipo": "cps", "porcentaje": "100.01"}]}, "reglas.1.porcentaje"),
    ({"reglas": [{"tipo": "bonus", "monto": "1"}]}, "reglas.0.tipo"),
    ({"reglas": [{"tipo": "cpa", "monto": "1", "conversion_type": "install"}]}, "reglas.0.conversion_type"),
    ({"reglas": [], "tope_por_afiliado": {"monto": "10", "periodo": "anio"}}, "tope_por_afiliado.periodo"),
    ({"reglas": [{"tipo": "cpa", "porcentaje": "5"}]}, "reglas.0.monto"),
    ({"reglas": [{"tipo": "cps", "porcentaje": "5", "monto": "1"}]}, "reglas.0.monto"),
    ({"reglas": [{"tipo": "cps", "porcentaje": "5", "min_aprobadas": 0}]}, "reglas.0.min_aprobadas"),
])
def test_bad_rules_answer_422_naming_the_field_and_store_nothing(mk, body, field):
    campana = mk.campana()
    response = mk.client.put(f"/campanas/{campana}/reglas", json=body)
    assert response.status_code == 422 and field in _fields(response), response.text
    assert mk.client.get(f"/campanas/{campana}/reglas").json()["versiones"] == []
    assert _outbox(mk.runtime, mk.tables, "ReglasComisionActualizadas") == []


def test_unknown_campaign_is_404_and_a_finished_one_409(mk):
    response = _put(mk, "nope", [])
    assert response.status_code == 404 and _fields(response) == {"campana_id"}
    assert mk.client.get("/campanas/nope/reglas").status_code == 404
    campana = mk.campana()
    mk.client.post(f"/campanas/{campana}/finalizar")
    response = _put(mk, campana, [{"tipo": "cpa", "monto": "1"}])
    assert response.status_code == 409 and _fields(response) == {"estado"}


def test_a_conversion_uses_the_version_in_force_at_its_time_and_explains_itself(mk):
    campana = mk.campana(porcentaje="10")
    before = datetime.now(timezone.utc)
    _put(mk, campana, [{"tipo": "cpa", "monto": "20.00", "afiliado_id": "vip"},
                       {"tipo": "cpa", "monto": "3.00", "conversion_type": "lead"},
                       {"tipo": "cps", "porcentaje": "15"}])
    old = _validated(mk, "ana", campana, "100.00", when=before)  # validated before the rules: version 0
    assert (old["monto"], old["porcentaje"]) == ("10.00", "10.0000")
    sale = _validated(mk, "ana", campana, "100.00")
    lead = _validated(mk, "ana", campana, "100.00", tipo="lead")
    assert (sale["monto"], lead["monto"], lead["porcentaje"]) == ("15.00", "3.00", "0.0000")
    explain = mk.client.get(f"/comisiones/{lead['id']}/explain").json()
    assert (explain["conversion_id"], explain["click_id"], explain["campana_id"]) == (lead["conversion_id"], None, campana)
    assert (explain["version_reglas"], explain["regla_id"], explain["tipo"]) == (1, "r2", "cpa")
    assert explain["inputs"]["monto_fijo"] == "3.00" and explain["inputs"]["aprobadas_en_el_mes"] == 2
    assert explain["chequeos"][:2] == ["rule r1 skipped: afiliado_id ana != vip", "rule r2 matched (cpa)"]
    assert (explain["monto"], explain["limitado_por"]) == ("3.00", None)
    flat = mk.client.get(f"/comisiones/{old['id']}/explain").json()
    assert (flat["version_reglas"], flat["regla_id"]) == (0, None)
    assert flat["chequeos"] == ["no rule matched: campaign porcentaje_comision 10.0000",
                                "caps: affiliate remaining unlimited, budget remaining unlimited: within"]
    assert mk.client.get("/comisiones/nope/explain").status_code == 404
    calculadas = [e.payload for e in mk.emitted if e.event_type == "ComisionCalculada"]
    assert [(p["version_reglas"], p["regla_id"], p["limitado_por"]) for p in calculadas] == [
        (0, None, None), (1, "r3", None), (1, "r2", None)]


def test_caps_book_partial_then_zero_commissions_with_the_reason(mk):
    response = mk.client.post("/campanas", json={"nombre": "Tope", "porcentaje_comision": "10", "presupuesto": "25.00"})
    campana = response.json()["id"]
    _put(mk, campana, [{"tipo": "cps", "porcentaje": "10"}], tope={"monto": "15.00", "periodo": "dia"})
    montos = [(c["monto"], mk.client.get(f"/comisiones/{c['id']}/explain").json()["limitado_por"]) for c in (
        _validated(mk, "ana", campana, "100.00"), _validated(mk, "ana", campana, "100.00"),
        _validated(mk, "bea", campana, "100.00"), _validated(mk, "bea", campana, "100.00"))]
    assert montos == [("10.00", None), ("5.00", "tope_afiliado"), ("10.00", None), ("0.00", "presupuesto")]
    zero = [e.payload for e in mk.emitted if e.event_type == "ComisionCalculada"][-1]
    assert (zero["monto"], zero["limitado_por"]) == (Decimal("0.00"), "presupuesto")


def test_racing_conversions_never_exceed_the_campaign_budget(db_url, registry):
    migrate(db_url, "alpes.marketing:migrations")
    db = Database(db_url)
    try:
        with db.transaction() as session:
            campana, _ = campaigns.create_campana(session, SYSTEM_PRINCIPAL, domain.NuevaCampana(
                "Carrera", Decimal("10"), "EUR", presupuesto=Decimal("95.00")))

        def convert(n: int):
            payload = {"conversion_id": new_id(), "affiliate_id": f"a{n % 3}", "campaign_id": campana,
                       "conversion_value": Decimal("30.00"), "currency": "EUR", "conversion_type": "sale",
                       "timestamp": datetime.now(timezone.utc)}
            for _attempt in range(20):  # a deadlock is retried, as the consumer would
                try:
                    with db.transaction() as session:
                        commissions.calculate_comision(session, _incoming(
                            "conversiones.eventos", "ConversionValidated", payload["conversion_id"], payload))
                    return
                except DBAPIError:
                    continue
            raise AssertionError("a conversion kept failing")

        def run(worker: int):
            for n in range(worker, 40, 8):
                convert(n)

        threads = [threading.Thread(target=run, args=(w,)) for w in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        k = marketing_tables.comisiones
        with db.transaction() as session:
            rows = session.execute(select(k.c.monto, k.c.limitado_por)).all()
            total = session.scalar(select(func.sum(k.c.monto)))
        assert len(rows) == 40 and total == Decimal("95.00")  # 31 × 3.00 + one 2.00, then zeros
        assert sorted(r.monto for r in rows if r.limitado_por == "presupuesto")[-1] == Decimal("2.00")
        assert sum(1 for r in rows if r.limitado_por is None) == 31
    finally:
        db.dispose()


def test_conversions_handled_back_to_back_each_get_their_own_commission(db_url, registry):
    """Marketing's consumer takes a batch in one transaction, with its statements built once and the
    campaign and its rules read once per transaction: each conversion still gets the commission of
    its own campaign, rules and caps, its answer to the saga says what was stored, and a rule change
    made in the same transaction applies to the conversions after it."""
    from alpes.kernel.inbox import InboxProcessor
    from alpes.kernel.outbox import Outbox
    from alpes.marketing import commission_rules, consumers, webhooks

    migrate(db_url, "alpes.marketing:migrations")
    db = Database(db_url)
    try:
        outbox = Outbox(marketing_tables.outbox, registry)
        outbox.on_add.append(webhooks.queue_for_own_events)  # as the service does
        [spec] = [s for s in consumers.consumer_specs()
                  if (s.topic, s.subscription) == ("conversiones.eventos", "marketing-consumer")]
        consumer = InboxProcessor(db, marketing_tables.inbox, outbox, "marketing-consumer", spec.handlers)
        with db.transaction() as session:
            a, _ = campaigns.create_campana(session, SYSTEM_PRINCIPAL, domain.NuevaCampana("A", Decimal("10"), "EUR"))
            b, _ = campaigns.create_campana(session, SYSTEM_PRINCIPAL, domain.NuevaCampana(
                "B", Decimal("20"), "EUR", presupuesto=Decimal("25.00")))
            commission_rules.replace_reglas(session, a, (domain.Regla("cpa", monto=Decimal("7.50"),
                                                                      conversion_type="lead"),),
                                            None, caller=SYSTEM_PRINCIPAL)
        later = datetime.now(timezone.utc) + timedelta(minutes=1)  # after every rule version above

        def validated(campana: str, tipo: str = "sale", afiliado: str = "a1", event_type="ConversionValidated",
                      conversion_id: str | None = None):
            payload = {"conversion_id": conversion_id or new_id(), "affiliate_id": afiliado, "campaign_id": campana,
                       "conversion_value": Decimal("100.00"), "currency": "EUR", "conversion_type": tipo,
                       "timestamp": later, "click_id": None, "converted_at": later}
            return _incoming("conversiones.eventos", event_type, payload["conversion_id"], payload)

        batch = [validated(a), validated(b), validated(a, "lead", "a2"), validated(b, afiliado="a2")]
        batch.append(validated(a, event_type="CommissionRequested", conversion_id=batch[0].payload["conversion_id"]))
        assert set(consumer.process(batch).values()) == {None}
        k = marketing_tables.comisiones
        with db.read() as session:
            rows = {r.conversion_id: r for r in session.execute(select(k))}
        # A has a rule version (leads only): its sales earn the campaign percentage under version 1.
        expected = [(a, "a1", Decimal("10.00"), 1, None), (b, "a1", Decimal("20.00"), 0, None),
                    (a, "a2", Decimal("7.50"), 1, None), (b, "a2", Decimal("5.00"), 0, "presupuesto")]
        assert len(rows) == 4
        for event, (campana, afiliado, monto, version, limitado_por) in zip(batch, expected):
            row = rows[event.payload["conversion_id"]]
            assert (row.campana_id, row.afiliado_id, row.monto, row.version_reglas, row.limitado_por) == (
                campana, afiliado, monto, version, limitado_por)
        with db.read() as session:
            answers = [registry.decode(r.event_type, r.payload, r.schema_version) for r in session.execute(
                select(marketing_tables.outbox).where(marketing_tables.outbox.c.event_type == "ComisionRegistrada")
                .order_by(marketing_tables.outbox.c.id))]
        # One answer per request, the repeated request answered like the first, each as stored.
        assert [x["conversion_id"] for x in answers] == [e.payload["conversion_id"] for e in batch]
        for answer in answers:
            row = rows[answer["conversion_id"]]
            assert (answer["comision_id"], answer["campana_id"], answer["afiliado_id"], answer["monto"],
                    answer["moneda"], answer["limitado_por"]) == (
                row.id, row.campana_id, row.afiliado_id, row.monto, row.moneda, row.limitado_por)

        # A new rule version in the middle of a transaction: the conversions after it earn by it.
        before, after = validated(a, afiliado="a3"), validated(a, afiliado="a3")
        with db.transaction() as session:
            commissions.answer_comision_request(session, before)
            commission_rules.replace_reglas(session, a, (domain.Regla("cps", porcentaje=Decimal("50")),), None,
                                            caller=SYSTEM_PRINCIPAL)
            commissions.answer_comision_request(session, after)
        with db.read() as session:
            montos = dict(session.execute(select(k.c.conversion_id, k.c.monto).where(k.c.afiliado_id == "a3")).all())
        assert (montos[before.payload["conversion_id"]], montos[after.payload["conversion_id"]]) == (
            Decimal("10.00"), Decimal("50.00"))
    finally:
        db.dispose()
