"""Reporting: clicks, conversions, revenue, commissions by state, conversion rates and EPC per
day, campaign and affiliate (analytics-consumer and reporting-consumer read models)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest

from alpes.kernel.codec import SchemaRegistry
from alpes.kernel.messages import IncomingEvent
from alpes.marketing import reporting
from harness import Platform, wait_until
from test_http import _client, _fields
from test_tracking import POSTBACK, _click_id

REGISTRY = SchemaRegistry.from_directory()
DAY1 = datetime(2026, 11, 2, 10, 0, tzinfo=timezone.utc)
DAY2 = datetime(2026, 11, 3, 9, 0, tzinfo=timezone.utc)
DAY3 = datetime(2026, 11, 4, 8, 0, tzinfo=timezone.utc)


def _incoming(topic: str, event_type: str, payload: dict) -> IncomingEvent:
    """Through the Avro schema, as a consumer would receive it."""
    data, version = REGISTRY.encode(event_type, payload, 1)
    key = payload.get("id") or payload.get("click_id") or payload.get("conversion_id") or payload["link_code"]
    return IncomingEvent(topic, "test", f"{event_type}-{key}", event_type, version, key, payload["timestamp"], "c", "c",
                         REGISTRY.decode(event_type, data, version), data)


def _click(n: int, campana: str = "k1", afiliado: str = "a1", when: datetime = DAY1) -> IncomingEvent:
    return _incoming("conversiones.eventos", "ClickRecorded", {
        "click_id": f"click-{campana}-{afiliado}-{n}", "link_code": "linkcode01", "affiliate_id": afiliado,
        "campaign_id": campana, "timestamp": when})


def _conversion(event_type: str, conversion_id: str, when: datetime, valor: str = "0.00", **extra) -> IncomingEvent:
    payload = {"conversion_id": conversion_id, "affiliate_id": "a1", "campaign_id": "k1", "timestamp": when}
    if event_type == "ConversionDetected":
        payload.update(user_id="u", conversion_value=Decimal(valor), conversion_type="sale")
    elif event_type == "ConversionValidated":
        payload.update(conversion_value=Decimal(valor), currency="EUR", conversion_type="sale")
    elif event_type == "ConversionRejected":
        payload.update(reason="fraud")
    elif event_type == "ConversionRefunded":
        payload.update(conversion_value=Decimal(valor), currency="EUR", refund_type="reembolso")
    return _incoming("conversiones.eventos", event_type, {**payload, **extra})


def _comision(event_type: str, comision_id: str, monto: str, when: datetime) -> IncomingEvent:
    payload = {"id": comision_id, "conversion_id": f"conv-{comision_id}", "afiliado_id": "a1", "campana_id": "k1",
               "monto": Decimal(monto), "moneda": "EUR", "timestamp": when}
    if event_type == "ComisionCalculada":
        payload.update(base=Decimal("100.00"), porcentaje=Decimal("10"))
    elif event_type == "ComisionAprobada":
        payload.update(calculada_en=DAY1)
    elif event_type == "ComisionPagada":
        payload.update(pago_id="p1")
        del payload["campana_id"]
    elif event_type == "ComisionRevertida":
        payload.update(estado_anterior="pendiente", motivo="reembolso")
    return _incoming("comisiones.eventos", event_type, payload)


def _feed(runtime, *events: IncomingEvent) -> None:
    for event in events:
        handler = {
            "ClickRecorded": reporting.count_click, "ClicksRecorded": reporting.count_clicks, "ConversionDetected": reporting.count_detected,
            "ConversionValidated": reporting.count_validated, "ConversionRejected": reporting.count_rejected,
            "ConversionRefunded": reporting.count_refunded, "ComisionCalculada": reporting.report_comision,
            "ComisionAprobada": reporting.report_approved_comision, "ComisionPagada": reporting.report_paid_comision,
            "ComisionRevertida": reporting.report_reversed_comision}[event.event_type]
        with runtime.db.transaction() as session:
            assert handler(session, event) == []


@pytest.fixture
def marketing(tmp_path):
    return _client("marketing", tmp_path)


@pytest.fixture
def fed(marketing):
    """Day 1: 4 clicks, 3 conversions detected, 2 validated (100 + 50), 1 rejected; commissions
    10.00 (approved on day 2, paid on day 3), 5.00 (reversed), 2.50 (pending). Day 2: a refund of 50."""
    client, runtime, _ = marketing
    _feed(runtime, *(_click(n) for n in range(4)),
          *(_conversion("ConversionDetected", f"cv{n}", DAY1, "1.00") for n in range(3)),
          _conversion("ConversionValidated", "cv0", DAY1, "100.00"),
          _conversion("ConversionValidated", "cv1", DAY1, "50.00"),
          _conversion("ConversionRejected", "cv2", DAY1),
          _comision("ComisionCalculada", "c1", "10.00", DAY1),
          _comision("ComisionCalculada", "c2", "5.00", DAY1),
          _comision("ComisionCalculada", "c3", "2.50", DAY1),
          _comision("ComisionAprobada", "c1", "10.00", DAY2),
          _comision("ComisionPagada", "c1", "10.00", DAY3),
          _comision("ComisionRevertida", "c2", "5.00", DAY2),
          _conversion("ConversionRefunded", "cv1", DAY2, "50.00"),
          _click(0, campana="k2", afiliado="a2"))
    return client


def _without_keys(line: dict) -> dict:
    return {k: v for k, v in line.items() if k not in ("dia", "campana_id", "afiliado_id", "moneda")}


DAY1_FIGURES = {
    "clicks": 4, "detectadas": 3, "validadas": 2, "rechazadas": 1, "reembolsadas": 0,
    "ingresos": "150.00", "ingresos_reembolsados": "0.00", "comisiones": 3, "monto": "17.50",
    "monto_pendiente": "2.50", "monto_aprobado": "0.00", "monto_pagado": "10.00", "monto_revertido": "5.00",
    "comision_ganada": "12.50", "epc": "3.1250", "tasa_validacion": "0.6667", "tasa_conversion_clicks": "0.5000",
    "tasa_conversion": "0.5000", "tasa_conversion_base": "clicks"}
DAY2_FIGURES = {
    "clicks": 0, "detectadas": 0, "validadas": 0, "rechazadas": 0, "reembolsadas": 1,
    "ingresos": "0.00", "ingresos_reembolsados": "50.00", "comisiones": 0, "monto": "0.00",
    "monto_pendiente": "0.00", "monto_aprobado": "0.00", "monto_pagado": "0.00", "monto_revertido": "0.00",
    "comision_ganada": "0.00", "epc": None, "tasa_validacion": None, "tasa_conversion_clicks": None,
    "tasa_conversion": None, "tasa_conversion_base": "detectadas"}


# -- the read models, fed event by event --------------------------------------------------------
def test_each_day_shows_clicks_conversions_and_commissions_by_state_of_the_day_they_were_calculated(fed):
    lines = fed.get("/reportes", params={"campana_id": "k1"}).json()["reportes"]
    assert [(r["dia"], r["campana_id"], r["afiliado_id"]) for r in lines] == [
        ("2026-11-02", "k1", "a1"), ("2026-11-03", "k1", "a1")]
    assert _without_keys(lines[0]) == DAY1_FIGURES
    assert _without_keys(lines[1]) == DAY2_FIGURES
    # The day's split always adds up to what was calculated that day.
    split = sum(Decimal(lines[0][f]) for f in ("monto_pendiente", "monto_aprobado", "monto_pagado", "monto_revertido"))
    assert split == Decimal(lines[0]["monto"])


def test_a_batch_of_clicks_counts_each_click_on_its_own_day_beside_single_click_events(marketing):
    client, runtime, _ = marketing
    before_midnight, after_midnight = DAY2 - timedelta(hours=9, seconds=1), DAY2 - timedelta(hours=9)
    clicks = [{"click_id": f"b{n}", "timestamp": when, "user_agent": None, "referrer": None, "visitor_hash": None}
              for n, when in enumerate([before_midnight] * 3 + [after_midnight] * 2)]
    batch = _incoming("conversiones.eventos", "ClicksRecorded", {
        "link_code": "linkcode01", "affiliate_id": "a1", "campaign_id": "k1", "timestamp": before_midnight,
        "clicks": clicks})
    _feed(runtime, batch, _click(0))  # an older ClickRecorded (from a backlog) still counts too
    lines = client.get("/reportes", params={"campana_id": "k1"}).json()["reportes"]
    assert [(r["dia"], r["clicks"]) for r in lines] == [("2026-11-02", 4), ("2026-11-03", 2)]


def test_a_state_move_is_applied_once_and_only_forward(marketing):
    client, runtime, _ = marketing
    _feed(runtime, _comision("ComisionCalculada", "c1", "7.25", DAY1),
          _comision("ComisionAprobada", "c1", "7.25", DAY2),
          _comision("ComisionAprobada", "c1", "7.25", DAY2),   # again: already approved
          _comision("ComisionRevertida", "c1", "7.25", DAY3),
          _comision("ComisionPagada", "c1", "7.25", DAY3),     # a reversal is final
          _comision("ComisionAprobada", "unknown", "1.00", DAY2))  # never calculated here: nothing to move
    [line] = client.get("/reportes").json()["reportes"]
    assert (line["monto"], line["monto_pendiente"], line["monto_aprobado"], line["monto_pagado"],
            line["monto_revertido"], line["comision_ganada"]) == ("7.25", "0.00", "0.00", "0.00", "7.25", "0.00")


def test_without_clicks_the_conversion_rate_is_validated_per_detected(marketing):
    client, runtime, _ = marketing
    _feed(runtime, _conversion("ConversionDetected", "x1", DAY1, "1.00"),
          _conversion("ConversionDetected", "x2", DAY1, "1.00"),
          _conversion("ConversionValidated", "x1", DAY1, "20.00"))
    [line] = client.get("/reportes").json()["reportes"]
    assert (line["tasa_conversion"], line["tasa_conversion_base"], line["tasa_conversion_clicks"], line["epc"]) == \
        ("0.5000", "detectadas", None, None)


# -- HTTP: per campaign and per affiliate ---------------------------------------------------------
def test_campaign_report_per_day_and_in_total_with_date_filters(fed):
    by_day = fed.get("/reportes/campanas/k1").json()
    assert by_day["agrupar"] == "dia" and [r["dia"] for r in by_day["reportes"]] == ["2026-11-02", "2026-11-03"]
    assert _without_keys(by_day["reportes"][0]) == DAY1_FIGURES
    [total] = fed.get("/reportes/campanas/k1", params={"agrupar": "total"}).json()["reportes"]
    assert (total["dia"], total["campana_id"], total["afiliado_id"]) == (None, "k1", "a1")
    assert (total["clicks"], total["validadas"], total["reembolsadas"], total["ingresos_reembolsados"],
            total["comision_ganada"], total["epc"]) == (4, 2, 1, "50.00", "12.50", "3.1250")
    [day2] = fed.get("/reportes/campanas/k1", params={"desde": "2026-11-03"}).json()["reportes"]
    assert day2["dia"] == "2026-11-03"
    [day1] = fed.get("/reportes/campanas/k1", params={"hasta": "2026-11-02", "agrupar": "total"}).json()["reportes"]
    assert day1["reembolsadas"] == 0 and day1["clicks"] == 4
    assert fed.get("/reportes/campanas/nothing").json()["reportes"] == []


def test_affiliate_report_sums_its_campaigns(fed):
    [k2] = fed.get("/reportes/afiliados/a2").json()["reportes"]
    assert (k2["dia"], k2["afiliado_id"], k2["campana_id"], k2["clicks"], k2["epc"]) == \
        ("2026-11-02", "a2", "k2", 1, "0.0000")
    [total] = fed.get("/reportes/afiliados/a1", params={"agrupar": "total", "desde": "2026-11-01",
                                                       "hasta": "2026-11-30"}).json()["reportes"]
    assert (total["afiliado_id"], total["clicks"], total["monto"], total["tasa_conversion_clicks"]) == \
        ("a1", 4, "17.50", "0.5000")


def test_amounts_of_different_currencies_are_never_added_together(marketing):
    client, runtime, _ = marketing
    eur = client.post("/campanas", json={"nombre": "E", "porcentaje_comision": "10", "moneda": "EUR"}).json()["id"]
    cop = client.post("/campanas", json={"nombre": "C", "porcentaje_comision": "10", "moneda": "COP"}).json()["id"]
    for campana, valor in ((eur, "40.00"), (cop, "90000.00")):
        _feed(runtime, _click(0, campana=campana), _conversion("ConversionValidated", f"v-{campana}", DAY1, valor,
                                                               campaign_id=campana))
    lines = client.get("/reportes/afiliados/a1", params={"agrupar": "total"}).json()["reportes"]
    assert sorted((r["moneda"], r["campana_id"], r["clicks"], r["ingresos"]) for r in lines) == [
        ("COP", cop, 1, "90000.00"), ("EUR", eur, 1, "40.00")]
    [line] = client.get("/reportes", params={"campana_id": cop}).json()["reportes"]
    assert line["moneda"] == "COP"


@pytest.mark.parametrize("path", ["/reportes", "/reportes/campanas/k1", "/reportes/afiliados/a1"])
def test_desde_after_hasta_is_422_naming_desde(fed, path):
    response = fed.get(path, params={"desde": "2026-11-05", "hasta": "2026-11-01"})
    assert response.status_code == 422 and "desde" in _fields(response)


def test_agrupar_takes_dia_or_total_only(fed):
    response = fed.get("/reportes/campanas/k1", params={"agrupar": "semana"})
    assert response.status_code == 422 and _fields(response) == {"query.agrupar"}


# -- through the running platform -----------------------------------------------------------------
def test_a_click_and_its_attributed_conversion_show_in_the_report_with_epc(tmp_path):
    platform = Platform(tmp_path / "alpes").start()
    try:
        afiliado = platform.post("afiliados", "/afiliados", {"user_id": "u", "email": "r@example.com",
                                                             "nombre": "Rita"}).json()["id"]
        campana = platform.post("marketing", "/campanas", {
            "nombre": "Report", "porcentaje_comision": "10", "landing_url": "https://shop.example.com/"}).json()["id"]
        inscripcion = wait_until(
            lambda: (r := platform.post("marketing", f"/campanas/{campana}/inscripciones", {"afiliado_id": afiliado}))
            .status_code in (200, 201) and r.json(), what="marketing knows the enabled affiliate")
        redirect = wait_until(
            lambda: (r := platform.http.get(platform.url("conversiones") + f"/r/{inscripcion['link_code']}",
                                            follow_redirects=False)).status_code == 302 and r,
            what="conversiones knows the enrollment")
        platform.post("conversiones", "/conversiones", {**POSTBACK, "click_id": _click_id(redirect)})
        [line] = wait_until(
            lambda: [r for r in platform.get("marketing", f"/reportes/campanas/{campana}",
                                             agrupar="total")["reportes"]
                     if r["clicks"] == 1 and r["validadas"] == 1 and r["comisiones"] == 1],
            what="the click, the conversion and its commission reported", diagnose=platform.diagnostics)
        assert line["moneda"] == "EUR"
        assert (line["afiliado_id"], line["monto_pendiente"], line["comision_ganada"], line["epc"],
                line["tasa_conversion"]) == (afiliado, "8.00", "8.00", "8.0000", "1.0000")
        [by_affiliate] = platform.get("marketing", f"/reportes/afiliados/{afiliado}", agrupar="total")["reportes"]
        assert by_affiliate["epc"] == "8.0000"
    finally:
        platform.stop()
