"""The commission lifecycle: pending → approved (after the lock period) → paid in a payout, or
reversed when its conversion is refunded, with a negative adjustment carried into the next payout
when the money had already gone out. Refunds in conversiones; earnings by state in afiliados."""

from __future__ import annotations

import threading
import warnings
from collections import Counter
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from importlib import import_module

import pytest
from fastapi.testclient import TestClient
from harness import Platform, wait_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select
from sqlalchemy.exc import DBAPIError, IntegrityError

from alpes.afiliados import handlers as afiliados_handlers
from alpes.conversiones import domain as conversiones
from alpes.kernel.access import SYSTEM_PRINCIPAL
from alpes.kernel.db import Database, migrate
from alpes.kernel.messages import IncomingEvent, OutgoingEvent, new_id
from alpes.kernel.outbox import Outbox
from alpes.marketing import domain as marketing
from alpes.marketing import campaigns, commissions, payouts
from alpes.marketing import tables as marketing_tables
from alpes.settings import Settings

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=timezone.utc)


# -- domain rules ------------------------------------------------------------------------------------
def test_a_commission_is_approvable_once_its_lock_period_has_passed():
    assert marketing.aprobable_desde(NOW, 0) == NOW
    assert marketing.aprobable_desde(NOW, 30) == NOW + timedelta(days=30)
    with pytest.raises(ValueError):
        marketing.aprobable_desde(NOW, -1)


def test_reversal_before_a_payout_needs_no_adjustment_after_it_a_negative_one():
    assert marketing.revertir(marketing.PENDIENTE, Decimal("5.00"), en_un_pago=False) == \
        marketing.Reversion(marketing.PENDIENTE, None)
    assert marketing.revertir(marketing.APROBADA, Decimal("5.00"), en_un_pago=False).ajuste is None
    assert marketing.revertir(marketing.PAGADA, Decimal("5.00"), en_un_pago=True) == \
        marketing.Reversion(marketing.PAGADA, Decimal("-5.00"))
    # Approved and already in a payout that was not paid yet: the payout is not edited either.
    assert marketing.revertir(marketing.APROBADA, Decimal("5.00"), en_un_pago=True).ajuste == Decimal("-5.00")
    with pytest.raises(marketing.ReversionInvalida):
        marketing.revertir(marketing.REVERTIDA, Decimal("5.00"), en_un_pago=False)


def _lineas(tipo: str, montos: list[str]) -> list[marketing.LineaPago]:
    return [marketing.LineaPago(tipo, new_id(), Decimal(m)) for m in montos]


def test_a_payout_waits_for_the_threshold_and_carries_the_adjustments():
    umbral = Decimal("50.00")
    assert marketing.proponer_pago("a", "EUR", _lineas("comision", ["49.99"]), [], umbral) is None
    propuesta = marketing.proponer_pago("a", "EUR", _lineas("comision", ["30.00", "20.00"]), [], umbral)
    assert propuesta is not None and propuesta.monto == Decimal("50.00")
    # A negative adjustment is netted: 60 - 15 = 45 < 50 waits; 80 - 15 = 65 is paid.
    assert marketing.proponer_pago("a", "EUR", _lineas("comision", ["60.00"]), _lineas("ajuste", ["-15.00"]),
                                   umbral) is None
    netted = marketing.proponer_pago("a", "EUR", _lineas("comision", ["80.00"]), _lineas("ajuste", ["-15.00"]), umbral)
    assert netted is not None and netted.monto == Decimal("65.00") and [x.tipo for x in netted.lineas] == [
        "comision", "ajuste"]
    # Adjustments alone never make a payout, nor does a sum that is not positive (threshold 0).
    assert marketing.proponer_pago("a", "EUR", [], _lineas("ajuste", ["-1.00"]), Decimal(0)) is None
    assert marketing.proponer_pago("a", "EUR", _lineas("comision", ["1.00"]), _lineas("ajuste", ["-1.00"]),
                                   Decimal(0)) is None


money = st.decimals(min_value=Decimal("-999.99"), max_value=Decimal("9999.99"), places=2,
                    allow_nan=False, allow_infinity=False)


@given(st.lists(money.filter(lambda m: m > 0), min_size=1, max_size=20), st.lists(money.filter(lambda m: m < 0),
                                                                                   max_size=5))
def test_a_payout_amount_is_the_sum_of_its_lines(comisiones, ajustes):
    propuesta = marketing.proponer_pago("a", "EUR", [marketing.LineaPago("comision", new_id(), m) for m in comisiones],
                                        [marketing.LineaPago("ajuste", new_id(), m) for m in ajustes], Decimal(0))
    total = sum(comisiones) + sum(ajustes)
    if total > 0:
        assert propuesta is not None and propuesta.monto == total
        assert propuesta.monto == sum(line.monto for line in propuesta.lineas)
    else:
        assert propuesta is None


def _validated(at=NOW) -> conversiones.Conversion:
    detected = conversiones.Detected("c1", "a1", "k1", "u1", Decimal("10.00"), "sale", None, "EUR", at)
    return conversiones.Conversion.rebuild([detected, conversiones.Validated(at)])


def test_only_a_validated_conversion_is_refunded_and_only_once():
    conversion = _validated()
    events = conversiones.decide_refund(conversion, "reembolso", "devuelto", NOW)
    assert events == [conversiones.Refunded("reembolso", "devuelto", NOW)]
    conversion.apply(events[0])
    assert conversion.status == conversiones.REFUNDED
    assert conversiones.decide_refund(conversion, "contracargo", None, NOW) == []  # the same refund
    detected = conversiones.Conversion.rebuild([_validated().detected])
    with pytest.raises(conversiones.NotRefundable):
        conversiones.decide_refund(detected, "reembolso", None, NOW)
    with pytest.raises(ValueError):
        conversiones.decide_refund(_validated(), "regalo", None, NOW)


# -- in-process services -----------------------------------------------------------------------------
def _client(name: str, tmp_path, **env):
    settings = Settings(data_dir=tmp_path, broker_url="pulsar://127.0.0.1:1", **env)
    app, runtime = import_module(f"alpes.{name}.service").build(settings)
    tables = import_module(f"alpes.{name}.tables")
    # No `with`: the lifespan (relay, consumers, schedulers) does not start; requests still commit.
    return TestClient(app), runtime, tables


def _incoming(topic: str, event_type: str, key: str, payload: dict) -> IncomingEvent:
    event_id = new_id()
    return IncomingEvent(topic, "test", event_id, event_type, 1, key, NOW, event_id, event_id, payload)


def _outbox(runtime, tables, *event_types: str) -> list[tuple[str, dict]]:
    query = select(tables.outbox).order_by(tables.outbox.c.id)
    if event_types:
        query = query.where(tables.outbox.c.event_type.in_(event_types))
    with runtime.db.transaction() as session:
        rows = session.execute(query).mappings().all()
    return [(r["event_type"], runtime.registry.decode(r["event_type"], r["payload"], r["schema_version"]))
            for r in rows]


def _fields(response) -> set[str]:
    return {e["field"] for e in response.json()["errors"]}


class Marketing:
    """The marketing service in-process, driven the way its consumers and schedulers would."""

    def __init__(self, tmp_path, umbral="50.00"):
        self.client, self.runtime, self.tables = _client("marketing", tmp_path / "marketing", payout_threshold=umbral)
        self.emitted: list[OutgoingEvent] = []

    def campana(self, bloqueo: int = 0, moneda: str = "EUR", porcentaje: str = "10") -> str:
        response = self.client.post("/campanas", json={"nombre": "Programa", "porcentaje_comision": porcentaje,
                                                       "moneda": moneda, "periodo_bloqueo_dias": bloqueo})
        assert response.status_code == 201, response.text
        return response.json()["id"]

    def _handle(self, handler, event_type: str, payload: dict) -> list[OutgoingEvent]:
        with self.runtime.db.transaction() as session:
            events = handler(session, _incoming("conversiones.eventos", event_type, payload["conversion_id"], payload))
        self.emitted += events
        return events

    def validated(self, afiliado: str, campana: str, valor: str, moneda: str = "EUR",
                  conversion_id: str | None = None) -> str:
        conversion_id = conversion_id or new_id()
        self._handle(commissions.calculate_comision, "ConversionValidated", {
            "conversion_id": conversion_id, "affiliate_id": afiliado, "campaign_id": campana,
            "conversion_value": Decimal(valor), "currency": moneda, "conversion_type": "sale", "timestamp": NOW})
        return conversion_id

    def refunded(self, conversion_id: str, tipo: str = "reembolso") -> list[OutgoingEvent]:
        return self._handle(commissions.reverse_comision, "ConversionRefunded", {
            "conversion_id": conversion_id, "affiliate_id": "-", "campaign_id": "-",
            "conversion_value": Decimal("1.00"), "currency": "EUR", "refund_type": tipo, "reason": "cliente devolvió",
            "timestamp": NOW})

    def approve(self, now: datetime | None = None) -> int:
        return commissions.approve_due_comisiones(self.runtime.db, self.runtime.outbox, now=now)

    def comision(self, conversion_id: str) -> dict:
        return self.client.get("/comisiones", params={"conversion_id": conversion_id}).json()["comisiones"][0]


@pytest.fixture
def mk(tmp_path):
    return Marketing(tmp_path)


def test_pending_commissions_are_approved_when_their_lock_period_has_passed(mk):
    held, immediate = mk.campana(bloqueo=30), mk.campana(bloqueo=0)
    waiting = mk.validated("a1", held, "100.00")
    due = mk.validated("a1", immediate, "100.00")
    assert mk.approve(now=datetime.now(timezone.utc)) == 1
    assert (mk.comision(waiting)["estado"], mk.comision(due)["estado"]) == ("pendiente", "aprobada")
    assert mk.approve(now=datetime.now(timezone.utc)) == 0  # nothing approved twice
    assert mk.approve(now=datetime.now(timezone.utc) + timedelta(days=30, seconds=1)) == 1
    assert mk.comision(waiting)["estado"] == "aprobada"
    approvals = _outbox(mk.runtime, mk.tables, "ComisionAprobada")
    assert [p["conversion_id"] for _, p in approvals] == [due, waiting]
    assert all(p["monto"] == Decimal("10.00") for _, p in approvals)


def test_payouts_group_approved_commissions_per_affiliate_and_currency_above_the_threshold(mk):
    eur, usd = mk.campana(), mk.campana(moneda="USD")
    for afiliado, campana, valor in (("ana", eur, "300.00"), ("ana", eur, "250.00"), ("ana", usd, "600.00"),
                                     ("bea", eur, "100.00")):  # bea: 10.00, below the threshold
        mk.validated(afiliado, campana, valor)
    pendiente = mk.validated("ana", mk.campana(bloqueo=30), "900.00")  # still in its lock period
    mk.approve()
    response = mk.client.post("/pagos", json={})
    assert response.status_code == 200, response.text
    pagos = response.json()["pagos"]
    assert sorted((p["afiliado_id"], p["moneda"], p["monto"], p["estado"]) for p in pagos) == [
        ("ana", "EUR", "55.00", "pendiente"), ("ana", "USD", "60.00", "pendiente")]
    eur_pago = next(p for p in pagos if p["moneda"] == "EUR")
    assert [(x["linea"], x["tipo"], x["monto"]) for x in eur_pago["lineas"]] == [(1, "comision", "30.00"),
                                                                                 (2, "comision", "25.00")]
    assert mk.comision(pendiente)["pago_id"] is None
    assert mk.client.post("/pagos", json={}).json()["pagos"] == []  # nothing is paid twice
    assert [p["id"] for p in mk.client.get("/pagos", params={"afiliado_id": "ana"}).json()["pagos"]] == [
        p["id"] for p in sorted(pagos, key=lambda p: (p["creado_en"], p["id"]))]
    created = _outbox(mk.runtime, mk.tables, "PagoCreado")
    assert sorted(p["monto"] for _, p in created) == [Decimal("55.00"), Decimal("60.00")]
    assert all(p["monto"] == sum(x["monto"] for x in p["lineas"]) for _, p in created)


def test_paying_a_payout_pays_its_commissions_once(mk):
    campana = mk.campana()
    conversion_ids = [mk.validated("ana", campana, "400.00") for _ in range(2)]
    mk.approve()
    pago = mk.client.post("/pagos", json={"afiliado_id": "ana"}).json()["pagos"][0]
    paid = mk.client.post(f"/pagos/{pago['id']}/pagar")
    assert paid.status_code == 200 and paid.json()["estado"] == "pagado" and paid.json()["pagado_en"]
    assert {mk.comision(c)["estado"] for c in conversion_ids} == {"pagada"}
    again = mk.client.post(f"/pagos/{pago['id']}/pagar")
    assert again.status_code == 200 and again.json() == paid.json()
    events = [t for t, _ in _outbox(mk.runtime, mk.tables, "ComisionPagada", "PagoRealizado")]
    assert events == ["ComisionPagada", "ComisionPagada", "PagoRealizado"]
    realizado = _outbox(mk.runtime, mk.tables, "PagoRealizado")[0][1]
    assert realizado["monto"] == Decimal("80.00") and len(realizado["comision_ids"]) == 2


def test_payout_http_errors(mk):
    assert mk.client.get("/pagos/nope").status_code == 404
    response = mk.client.post("/pagos/nope/pagar")
    assert response.status_code == 404 and _fields(response) == {"pago_id"}
    assert _fields(mk.client.post("/pagos", json={"afiliado_id": ""})) == {"afiliado_id"}
    assert mk.client.post("/pagos", json={"afiliado_id": "x", "monto": "1"}).status_code == 422
    assert mk.client.get("/pagos", params={"estado": "raro"}).status_code == 422
    assert mk.client.post("/pagos").json() == {"pagos": []}  # no body: every affiliate


def test_a_refund_reverses_the_commission_in_any_state_and_a_paid_one_is_clawed_back(mk):
    campana = mk.campana()
    pendiente = mk.validated("ana", mk.campana(bloqueo=30), "100.00")
    aprobada, pagada = mk.validated("ana", campana, "200.00"), mk.validated("ana", campana, "800.00")
    mk.approve()
    [pago] = mk.client.post("/pagos", json={}).json()["pagos"]
    assert pago["monto"] == "100.00"
    mk.client.post(f"/pagos/{pago['id']}/pagar")
    aprobada_tarde = mk.validated("ana", campana, "300.00")
    mk.approve()

    for conversion_id in (pendiente, aprobada_tarde, pagada):
        # The reversal, and the saga's answer to conversiones on marketing.eventos.
        event, answer = mk.refunded(conversion_id)
        assert event.event_type == "ComisionRevertida" and event.payload["motivo"] == "reembolso"
        assert (answer.event_type, answer.topic, answer.key) == \
            ("ReversionComisionRegistrada", "marketing.eventos", conversion_id)
    assert mk.refunded(pagada) == []  # the same refund again: nothing more
    revertidas = {e.payload["conversion_id"]: e.payload for e in mk.emitted if e.event_type == "ComisionRevertida"}
    assert (revertidas[pendiente]["estado_anterior"], revertidas[pendiente]["ajuste_id"]) == ("pendiente", None)
    assert revertidas[aprobada_tarde]["estado_anterior"] == "aprobada"
    assert revertidas[pagada]["estado_anterior"] == "pagada"
    assert revertidas[pagada]["ajuste_monto"] == Decimal("-80.00") and revertidas[pagada]["ajuste_id"]
    assert {mk.comision(c)["estado"] for c in (pendiente, aprobada_tarde, pagada)} == {"revertida"}
    assert mk.comision(pagada)["motivo_reversion"] == "reembolso"
    # History is kept: the paid payout still lists the reversed commission, with its amount.
    assert mk.client.get(f"/pagos/{pago['id']}").json()["monto"] == "100.00"

    # The clawback is carried into the next payout: 90.00 of new commissions - 80.00 < 50 waits...
    mk.validated("ana", campana, "900.00")
    mk.approve()
    assert mk.client.post("/pagos", json={}).json()["pagos"] == []
    mk.validated("ana", campana, "500.00")
    mk.approve()
    [siguiente] = mk.client.post("/pagos", json={}).json()["pagos"]
    assert siguiente["monto"] == "60.00"  # 90 + 50 - 80
    assert [(x["tipo"], x["monto"]) for x in siguiente["lineas"]] == [
        ("comision", "90.00"), ("comision", "50.00"), ("ajuste", "-80.00")]


def test_the_payment_ledger_records_accruals_reversals_payouts_and_withheld_adjustments(mk):
    campana = mk.campana()
    pagada = mk.validated("ana", campana, "800.00")
    mk.approve()
    [pago] = mk.client.post("/pagos", json={}).json()["pagos"]
    mk.client.post(f"/pagos/{pago['id']}/pagar")
    mk.refunded(pagada)
    mk.validated("ana", campana, "1500.00")
    mk.approve()
    [siguiente] = mk.client.post("/pagos", json={}).json()["pagos"]
    mk.client.post(f"/pagos/{siguiente['id']}/pagar")
    realizados = [OutgoingEvent("comisiones.eventos", t, p["id"], p)
                  for t, p in _outbox(mk.runtime, mk.tables, "PagoRealizado")]
    _feed_ledger(mk, mk.emitted + realizados)
    ledger = [(line["tipo"], line["monto"]) for line in mk.client.get("/pagos/ledger").json()["ledger"]]
    assert sorted(ledger) == sorted([("devengo", "80.00"), ("devengo", "150.00"), ("reversion", "-80.00"),
                                     ("pago", "-80.00"), ("pago", "-150.00"), ("compensacion", "80.00")])
    assert _saldo(mk, "ana") == Decimal("0.00")  # 80 paid, 80 clawed back, 150 paid less 80 withheld
    # Behind the inbox, the unique key refuses to book a payout twice.
    with pytest.raises(IntegrityError):
        _feed_ledger(mk, realizados[:1])


def test_a_refund_that_overtakes_its_commission_or_has_none_is_remembered(mk):
    campana = mk.campana()
    early = new_id()
    assert mk.refunded(early) == []  # no commission yet: recorded, nothing to reverse, no crash
    mk.validated("ana", campana, "100.00", conversion_id=early)
    assert mk.client.get("/comisiones", params={"conversion_id": early}).json()["comisiones"] == []
    assert [t for t, _ in _outbox(mk.runtime, mk.tables, "ComisionCalculada")] == []


def test_a_reversal_while_its_payout_waits_keeps_the_payout_and_adds_an_adjustment(mk):
    campana = mk.campana()
    conversion = mk.validated("ana", campana, "600.00")
    mk.approve()
    [pago] = mk.client.post("/pagos", json={}).json()["pagos"]
    event, _answer = mk.refunded(conversion, tipo="contracargo")
    assert event.payload["ajuste_monto"] == Decimal("-60.00") and event.payload["motivo"] == "contracargo"
    paid = mk.client.post(f"/pagos/{pago['id']}/pagar").json()
    assert paid["monto"] == "60.00" and mk.comision(conversion)["estado"] == "revertida"
    assert [t for t, _ in _outbox(mk.runtime, mk.tables, "ComisionPagada")] == []  # it stays reversed


# -- conversiones: the refund resource ------------------------------------------------------------------
@pytest.fixture
def conv(tmp_path):
    client, runtime, tables = _client("conversiones", tmp_path / "conversiones")
    from alpes.conversiones import reference
    with runtime.db.transaction() as session:  # what conversiones learned on marketing.eventos
        reference.learn_afiliado(session, _incoming("marketing.eventos", "AfiliadoHabilitado", "a1",
                                                    {"afiliado_id": "a1", "timestamp": NOW}))
        session.execute(tables.ref_campanas.insert().values(
            campana_id="k1", estado="activa", moneda="EUR", updated_at=NOW))
    return client, runtime, tables


def _postback(client, **change) -> dict:
    response = client.post("/conversiones", json={
        "affiliate_id": "a1", "campaign_id": "k1", "user_id": "u1", "conversion_value": "120.00",
        "conversion_type": "sale", **change})
    assert response.status_code == 200, response.text
    return response.json()


def test_refunding_a_validated_conversion_appends_and_emits_conversion_refunded(conv):
    client, runtime, tables = conv
    posted = _postback(client)
    assert posted["status"] == "validated"
    response = client.post(f"/conversiones/{posted['id']}/reembolso", json={"motivo": "devuelto", "tipo": "contracargo"})
    assert response.status_code == 200, response.text
    assert (response.json()["status"], response.json()["reason"]) == ("refunded", "contracargo")
    [(_, refunded)] = _outbox(runtime, tables, "ConversionRefunded")
    assert (refunded["conversion_id"], refunded["refund_type"], refunded["reason"], refunded["conversion_value"]) == (
        posted["id"], "contracargo", "devuelto", Decimal("120.00"))
    history = client.get(f"/conversiones/{posted['id']}/eventos").json()["eventos"]
    assert [e["event_type"] for e in history] == ["ConversionDetected", "ConversionValidated", "ConversionRefunded"]
    # Again: the same state, no new event.
    again = client.post(f"/conversiones/{posted['id']}/reembolso", json={})
    assert again.status_code == 200 and again.json() == response.json()
    assert len(_outbox(runtime, tables, "ConversionRefunded")) == 1
    assert [c["id"] for c in client.get("/conversiones", params={"status": "refunded"}).json()["conversiones"]] == [
        posted["id"]]


def test_refund_errors_name_the_field_and_change_nothing(conv):
    client, runtime, tables = conv
    assert _fields(client.post("/conversiones/nope/reembolso", json={})) == {"conversion_id"}
    assert client.post("/conversiones/nope/reembolso", json={}).status_code == 404
    rejected = _postback(client, affiliate_id="stranger")  # unknown: detected, waiting for its grace period
    response = client.post(f"/conversiones/{rejected['id']}/reembolso", json={})
    assert response.status_code == 409 and _fields(response) == {"status"}
    validated = _postback(client)
    for body in ({"tipo": "regalo"}, {"motivo": ""}, {"motivo": "x" * 501}, {"extra": 1}):
        assert client.post(f"/conversiones/{validated['id']}/reembolso", json=body).status_code == 422
    assert _outbox(runtime, tables, "ConversionRefunded") == []
    assert client.get(f"/conversiones/{validated['id']}").json()["status"] == "validated"


# -- afiliados: earnings by state -------------------------------------------------------------------------
def _earnings(runtime, tables, afiliado_id: str) -> dict:
    with runtime.db.transaction() as session:
        row = session.execute(select(tables.afiliados).where(tables.afiliados.c.id == afiliado_id)).mappings().one()
    return {k: row[k] for k in ("ganancias_pendientes", "ganancias_aprobadas", "ganancias_pagadas",
                                "ganancias_revertidas")}


AFILIADOS_HANDLERS = {"ComisionCalculada": afiliados_handlers.record_comision,
                      "ComisionAprobada": afiliados_handlers.record_aprobacion,
                      "ComisionPagada": afiliados_handlers.record_pago,
                      "ComisionRevertida": afiliados_handlers.record_reversion}


def _feed_afiliados(runtime, events: list[OutgoingEvent]) -> None:
    """What the afiliados-consumer does with comisiones.eventos (through Avro, as on the wire)."""
    for event in events:
        handler = AFILIADOS_HANDLERS.get(event.event_type)
        if handler is None:
            continue
        data, version = runtime.registry.encode(event.event_type, event.payload)
        payload = runtime.registry.decode(event.event_type, data, version)
        with runtime.db.transaction() as session:
            handler(session, _incoming("comisiones.eventos", event.event_type, event.key, payload))


LEDGER_HANDLERS = {"ComisionCalculada": payouts.book_accrual,
                   "ComisionRevertida": payouts.book_reversal,
                   "PagoRealizado": payouts.book_payout}


def _feed_ledger(mk: "Marketing", events: list[OutgoingEvent]) -> None:
    """What marketing's payment-consumer does with comisiones.eventos."""
    for event in events:
        handler = LEDGER_HANDLERS.get(event.event_type)
        if handler is not None:
            with mk.runtime.db.transaction() as session:
                handler(session, _incoming("comisiones.eventos", event.event_type, event.key, event.payload))


def _saldo(mk: "Marketing", afiliado_id: str) -> Decimal:
    return sum((Decimal(s["saldo"]) for s in mk.client.get("/pagos/saldos").json()["saldos"]
                if s["afiliado_id"] == afiliado_id), Decimal(0))


def _register(client) -> str:
    response = client.post("/afiliados", json={"user_id": new_id(), "email": f"{new_id()}@example.com",
                                               "nombre": "Ana"})
    assert response.status_code == 201
    return response.json()["id"]


def test_afiliados_earnings_follow_every_lifecycle_step(tmp_path):
    client, runtime, tables = _client("afiliados", tmp_path / "afiliados")
    ana = _register(client)
    mk = Marketing(tmp_path)
    campana = mk.campana()
    a = mk.validated(ana, campana, "300.00")
    mk.validated(ana, campana, "400.00")
    mk.approve()
    [pago] = mk.client.post("/pagos", json={}).json()["pagos"]
    mk.client.post(f"/pagos/{pago['id']}/pagar")
    mk.validated(ana, mk.campana(bloqueo=30), "100.00")  # stays pending
    mk.refunded(a)
    events = mk.emitted + [OutgoingEvent("comisiones.eventos", t, p["id"], p)
                           for t, p in _outbox(mk.runtime, mk.tables, "ComisionAprobada", "ComisionPagada")]
    # Per commission the order holds on the wire (one key); across commissions it does not matter.
    order = {"ComisionCalculada": 0, "ComisionAprobada": 1, "ComisionPagada": 2, "ComisionRevertida": 3}
    _feed_afiliados(runtime, sorted(events, key=lambda e: order.get(e.event_type, 9)))
    body = client.get(f"/afiliados/{ana}").json()
    assert (body["ganancias_pendientes"], body["ganancias_aprobadas"], body["ganancias_pagadas"],
            body["ganancias_revertidas"], body["comisiones"]) == ("10.00", "0.00", "40.00", "30.00", 3)


# -- the ledger balances, whatever happens in whatever order ----------------------------------------------
action = st.one_of(st.tuples(st.just("convert"), st.sampled_from(["ana", "bea"]), st.integers(1, 90000)),
                   st.tuples(st.just("approve")), st.tuples(st.just("payout")), st.tuples(st.just("pay")),
                   st.tuples(st.just("refund"), st.integers(0, 30)))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(actions=st.lists(action, min_size=1, max_size=25))
def test_the_books_balance_after_any_sequence_of_events(tmp_path_factory, actions):
    tmp_path = tmp_path_factory.mktemp("books")
    client, runtime, tables = _client("afiliados", tmp_path / "afiliados")
    mk = Marketing(tmp_path, umbral="20.00")
    campana = mk.campana()
    afiliados = {"ana": _register(client), "bea": _register(client)}
    conversions: list[str] = []
    for step in actions:
        before, handled = len(_outbox(mk.runtime, mk.tables)), len(mk.emitted)
        if step[0] == "convert":
            conversions.append(mk.validated(afiliados[step[1]], campana, str(Decimal(step[2]).scaleb(-2))))
        elif step[0] == "approve":
            mk.approve()
        elif step[0] == "payout":
            mk.client.post("/pagos", json={})
        elif step[0] == "pay":
            for pago in mk.client.get("/pagos", params={"estado": "pendiente"}).json()["pagos"]:
                mk.client.post(f"/pagos/{pago['id']}/pagar")
        elif conversions:
            mk.refunded(conversions[step[1] % len(conversions)])
        # What the consumers emitted (calculations, reversals) and what the outbox got (the rest).
        published = mk.emitted[handled:] + [OutgoingEvent("comisiones.eventos", t, "", p)
                                            for t, p in _outbox(mk.runtime, mk.tables)[before:]]
        _feed_afiliados(runtime, published)
        _feed_ledger(mk, published)
    # Settle what is still waiting, so that every payout created was paid.
    for pago in mk.client.get("/pagos", params={"estado": "pendiente"}).json()["pagos"]:
        before = len(_outbox(mk.runtime, mk.tables))
        mk.client.post(f"/pagos/{pago['id']}/pagar")
        published = [OutgoingEvent("comisiones.eventos", t, "", p) for t, p in _outbox(mk.runtime, mk.tables)[before:]]
        _feed_afiliados(runtime, published)
        _feed_ledger(mk, published)

    comisiones = mk.client.get("/comisiones").json()["comisiones"]
    pagos = [mk.client.get(f"/pagos/{p['id']}").json() for p in mk.client.get("/pagos").json()["pagos"]]
    with mk.runtime.db.transaction() as session:
        ajustes = session.execute(select(mk.tables.ajustes)).mappings().all()
    for nombre, afiliado_id in afiliados.items():
        mine = [c for c in comisiones if c["afiliado_id"] == afiliado_id]
        accrued = sum((Decimal(c["monto"]) for c in mine), Decimal(0))
        by_state = Counter()
        for c in mine:
            by_state[c["estado"]] += Decimal(c["monto"])
        earnings = _earnings(runtime, tables, afiliado_id)
        # afiliados' view agrees with marketing's books, state by state ...
        assert earnings == {"ganancias_pendientes": by_state["pendiente"], "ganancias_aprobadas": by_state["aprobada"],
                            "ganancias_pagadas": by_state["pagada"], "ganancias_revertidas": by_state["revertida"]}
        # ... every calculated amount is in exactly one state ...
        assert accrued == sum(earnings.values(), Decimal(0))
        # ... every payout is the sum of its lines ...
        mine_paid = [p for p in pagos if p["afiliado_id"] == afiliado_id]
        for p in mine_paid:
            assert Decimal(p["monto"]) == sum((Decimal(x["monto"]) for x in p["lineas"]), Decimal(0))
            assert Decimal(p["monto"]) >= Decimal("20.00") and p["estado"] == "pagado"
        # ... and the cash that went out, less the clawbacks still owed, is exactly what was earned.
        cash = sum((Decimal(p["monto"]) for p in mine_paid), Decimal(0))
        owed_back = sum((a["monto"] for a in ajustes if a["afiliado_id"] == afiliado_id and a["pago_id"] is None),
                        Decimal(0))
        assert cash + owed_back == by_state["pagada"], nombre
        # The payment ledger says what is still owed: unpaid commissions less the clawbacks.
        assert _saldo(mk, afiliado_id) == by_state["pendiente"] + by_state["aprobada"] + owed_back, nombre


# -- end to end through the running platform -----------------------------------------------------------------
def test_commission_lifecycle_end_to_end(tmp_path):
    platform = Platform(tmp_path / "alpes", env={
        "ALPES_APPROVAL_INTERVAL_SECONDS": "0.3", "ALPES_PAYOUT_INTERVAL_SECONDS": "3600",
        "ALPES_PAYOUT_THRESHOLD": "50.00"}).start()
    try:
        registered = platform.post("afiliados", "/afiliados", {"user_id": "lc", "email": "lc@example.com",
                                                               "nombre": "Lucía"})
        assert registered.status_code == 201, registered.text
        ana = registered.json()["id"]
        campaign = platform.post("marketing", "/campanas", {"nombre": "Sin bloqueo", "porcentaje_comision": "10",
                                                            "periodo_bloqueo_dias": 0})
        assert campaign.status_code == 201, campaign.text
        campaign_id = campaign.json()["id"]
        wait_until(lambda: platform.get("afiliados", f"/afiliados/{ana}")["estado"] == "validado", what="validated")

        def sale(order: str, value: str) -> str:
            def validated():
                response = platform.post("conversiones", "/conversiones", {
                    "affiliate_id": ana, "campaign_id": campaign_id, "user_id": "cust", "conversion_value": value,
                    "conversion_type": "sale", "order_id": order})
                assert response.status_code == 200, response.text
                body = response.json()
                return body["id"] if platform.get("conversiones", f"/conversiones/{body['id']}")["status"] == \
                    "validated" else None
            return wait_until(validated, what=f"conversion {order} validated", diagnose=platform.diagnostics)

        first = [sale("o-1", "400.00"), sale("o-2", "300.00")]

        def approved(conversion_ids):
            comisiones = platform.get("marketing", "/comisiones", afiliado_id=ana)["comisiones"]
            states = {c["conversion_id"]: c["estado"] for c in comisiones}
            return all(states.get(c) == "aprobada" for c in conversion_ids)
        wait_until(lambda: approved(first), what="commissions approved by the scheduler", diagnose=platform.diagnostics)

        created = platform.post("marketing", "/pagos", {"afiliado_id": ana})
        assert created.status_code == 200, created.text
        [pago] = created.json()["pagos"]
        assert pago["monto"] == "70.00" and len(pago["lineas"]) == 2
        paid = platform.post("marketing", f"/pagos/{pago['id']}/pagar", {})
        assert paid.status_code == 200 and paid.json()["estado"] == "pagado"

        refund = platform.post("conversiones", f"/conversiones/{first[0]}/reembolso",
                               {"tipo": "reembolso", "motivo": "producto devuelto"})
        assert refund.status_code == 200 and refund.json()["status"] == "refunded", refund.text
        reversed_ = wait_until(lambda: (c := platform.get("marketing", "/comisiones", conversion_id=first[0])[
            "comisiones"][0])["estado"] == "revertida" and c, what="commission reversed", diagnose=platform.diagnostics)
        assert reversed_["motivo_reversion"] == "reembolso"

        second = [sale("o-3", "600.00"), sale("o-4", "500.00")]
        wait_until(lambda: approved(second), what="new commissions approved", diagnose=platform.diagnostics)
        [siguiente] = platform.post("marketing", "/pagos", {"afiliado_id": ana}).json()["pagos"]
        assert siguiente["monto"] == "70.00"  # 60 + 50 - 40 clawed back
        assert sorted((x["tipo"], x["monto"]) for x in siguiente["lineas"]) == [
            ("ajuste", "-40.00"), ("comision", "50.00"), ("comision", "60.00")]
        platform.post("marketing", f"/pagos/{siguiente['id']}/pagar", {})

        earnings = wait_until(lambda: (a := platform.get("afiliados", f"/afiliados/{ana}"))["ganancias_pagadas"] ==
                              "140.00" and a, what="earnings by state", diagnose=platform.diagnostics)
        assert (earnings["ganancias_pendientes"], earnings["ganancias_aprobadas"], earnings["ganancias_revertidas"],
                earnings["comisiones"]) == ("0.00", "0.00", "40.00", 4)

        # The payment ledger: 4 accruals, 1 reversal, 4 commissions paid, 1 clawback withheld; nothing owed.
        saldo = wait_until(lambda: [s for s in platform.get("marketing", "/pagos/saldos")["saldos"]
                                    if s["afiliado_id"] == ana and s["lineas"] == 10],
                           what="the payment ledger", diagnose=platform.diagnostics)
        assert saldo[0]["saldo"] == "0.00"

        def audited():
            types = Counter(e["event_type"] for e in platform.get("auditoria", "/auditoria/eventos",
                                                                  limit=10000)["eventos"])
            wanted = {"ComisionCalculada": 4, "ComisionAprobada": 4, "PagoCreado": 2, "PagoRealizado": 2,
                      "ComisionPagada": 4, "ConversionRefunded": 1, "ComisionRevertida": 1}
            return all(types[t] == n for t, n in wanted.items()) and types
        wait_until(audited, what="the lifecycle in the audit log", diagnose=platform.diagnostics)
        trail = [e["event_type"] for e in platform.get("auditoria", "/auditoria/eventos",
                                                       correlation_id=first[0])["eventos"]]
        assert {"ComisionCalculada", "ComisionAprobada", "ComisionPagada", "ConversionRefunded",
                "ComisionRevertida"} <= set(trail)
        assert platform.get("auditoria", "/auditoria/verificacion")["ok"] is True
    finally:
        platform.stop()


# -- racing payout schedulers on SQLite and MariaDB --------------------------------------------------------
def test_racing_payout_runs_put_each_commission_in_exactly_one_payout(db_url, registry):
    migrate(db_url, "alpes.marketing:migrations")
    tables = marketing_tables
    db, outbox = Database(db_url), Outbox(tables.outbox, registry)
    try:
        with db.transaction() as session:
            campana, _ = campaigns.create_campana(session, SYSTEM_PRINCIPAL, marketing.NuevaCampana(
                "Carrera", Decimal("10"), "EUR", periodo_bloqueo_dias=0))
            for n in range(60):
                commissions.calculate_comision(session, _incoming("conversiones.eventos", "ConversionValidated",
                                                                  f"c{n}", {
                    "conversion_id": new_id(), "affiliate_id": f"a{n % 3}", "campaign_id": campana,
                    "conversion_value": Decimal("100.00") + n, "currency": "EUR", "conversion_type": "sale",
                    "timestamp": NOW}))
        assert commissions.approve_due_comisiones(db, outbox) == 60

        def run():
            for _attempt in range(10):  # a deadlock or lost race is retried, like the job loop does
                try:
                    payouts.create_due_pagos(db, outbox, Decimal("50.00"))
                    return
                except DBAPIError:
                    continue
            raise AssertionError("a payout run kept failing")

        threads = [threading.Thread(target=run) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        with db.transaction() as session:
            pagos = session.execute(select(tables.pagos)).mappings().all()
            lineas = session.execute(select(tables.pago_lineas)).mappings().all()
            comisiones = session.execute(select(tables.comisiones)).mappings().all()
        assert sorted(p["afiliado_id"] for p in pagos) == ["a0", "a1", "a2"]
        assert sorted(line["referencia_id"] for line in lineas) == sorted(c["id"] for c in comisiones)
        for pago in pagos:
            assert pago["monto"] == sum(line["monto"] for line in lineas if line["pago_id"] == pago["id"])
        assert {c["pago_id"] for c in comisiones} == {p["id"] for p in pagos}
    finally:
        db.dispose()


def test_a_payout_this_service_has_no_lines_of_books_nothing_in_the_ledger(tmp_path):
    """PagoRealizado naming a payout with no lines here (a fuzzed or foreign one): no ledger line,
    not even one of defaults, and no empty executemany (SQLAlchemy deprecates it)."""
    url = f"sqlite:///{tmp_path / 'marketing.db'}"
    migrate(url, "alpes.marketing:migrations")
    db = Database(url)
    paid = _incoming("comisiones.eventos", "PagoRealizado", "p-1", {
        "id": "p-1", "afiliado_id": "a-1", "monto": Decimal("0.00"), "moneda": "EUR", "timestamp": NOW})
    with warnings.catch_warnings(), db.transaction() as session:
        warnings.simplefilter("error")  # an empty executemany warns (and will raise)
        assert payouts.book_payout(session, paid) == []
    with db.read() as session:
        assert session.execute(select(marketing_tables.ledger_pagos)).all() == []
    db.dispose()
