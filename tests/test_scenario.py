"""One end-to-end scenario through the running platform: tiered rules, tracking links, a duplicate postback,
a suspension, payouts, a refund after payout clawed back from the next payout, a first-click campaign whose
too-fast conversion is held and approved in review, a conversion outside the attribution window (the
platform restarted "two days later" with ALPES_CONVERSIONES_CLOCK_OFFSET_SECONDS), the report and the audit log.
"""

from __future__ import annotations

import re
from collections import Counter
from decimal import ROUND_HALF_UP, Decimal
from urllib.parse import parse_qs, urlsplit

import httpx
from harness import Platform, wait_until

CENT = Decimal("0.01")
# First matching rule wins: 20 % once the affiliate has 2 approved (not reversed) conversions this month in the
# campaign, else 10 %.
REGLAS = {"reglas": [{"tipo": "cps", "porcentaje": "20", "min_aprobadas": 2}, {"tipo": "cps", "porcentaje": "10"}]}


def _commission(value: str, approved_before: int) -> Decimal:
    pct = Decimal(20) if approved_before >= 2 else Decimal(10)
    return (Decimal(value) * pct / 100).quantize(CENT, rounding=ROUND_HALF_UP)


def test_tiered_campaign_with_tracking_suspension_payouts_and_a_refund_after_payout(tmp_path):
    platform = Platform(tmp_path / "alpes", env={
        "ALPES_APPROVAL_INTERVAL_SECONDS": "1", "ALPES_PAYOUT_THRESHOLD": "10.00",
        "ALPES_PAYOUT_INTERVAL_SECONDS": "3600"}).start()
    diag = platform.diagnostics
    try:
        campaign = platform.post("marketing", "/campanas", {
            "nombre": "Escalonada", "porcentaje_comision": "5", "periodo_bloqueo_dias": 0,
            "landing_url": "https://shop.example.com/oferta"})
        assert campaign.status_code == 201, campaign.text
        campana = campaign.json()["id"]
        reglas = platform.http.put(platform.url("marketing") + f"/campanas/{campana}/reglas", json=REGLAS)
        assert reglas.status_code == 200, reglas.text

        afiliados: dict[str, str] = {}
        for name in ("ana", "beto", "caro"):
            registered = platform.post("afiliados", "/afiliados", {"user_id": name, "email": f"{name}@example.com",
                                                                   "nombre": name.title()})
            assert registered.status_code == 201, registered.text
            afiliados[name] = registered.json()["id"]
        links: dict[str, str] = {}
        for name, afiliado in afiliados.items():
            wait_until(lambda a=afiliado: platform.get("afiliados", f"/afiliados/{a}")["estado"] == "validado",
                       what=f"{name} validated", diagnose=diag)
            inscripcion = wait_until(
                lambda a=afiliado: (r := platform.post("marketing", f"/campanas/{campana}/inscripciones",
                                                       {"afiliado_id": a})).status_code in (200, 201) and r.json(),
                what=f"{name} enrolled", diagnose=diag)
            links[name] = inscripcion["link_code"]

        def click(name: str, browser: httpx.Client = platform.http, code: str | None = None) -> str:
            """A visit with `browser` (its cookie jar is the visitor: the same one throughout by default)."""
            redirect = wait_until(
                lambda: (r := browser.get(platform.url("conversiones") + f"/r/{code or links[name]}",
                                          headers={"User-Agent": "scenario"}, follow_redirects=False))
                .status_code == 302 and r, what=f"{name}'s link redirects", diagnose=diag)
            location = urlsplit(redirect.headers["location"])
            assert (location.netloc, location.path) == ("shop.example.com", "/oferta")
            [click_id] = parse_qs(location.query)["alpes_click_id"]
            return click_id

        approved_before = Counter()  # per affiliate: approved conversions not reversed (the tier count)
        expected: dict[str, Decimal] = {}  # conversion id -> commission
        owner: dict[str, str] = {}
        postbacks: dict[str, dict] = {}

        def sale(name: str, order: str, value: str) -> str:
            click_id = click(name)  # the visitor's latest click: last click (the default) attributes through it
            postbacks[order] = {"click_id": click_id, "user_id": "cliente", "conversion_value": value,
                                "conversion_type": "sale", "order_id": order}
            response = platform.post("conversiones", "/conversiones", postbacks[order])
            assert response.status_code == 200, response.text
            conversion = response.json()["id"]
            # Wait for the commission before the next sale: the tier counts the approved conversions before it.
            [comision] = wait_until(lambda: platform.get("marketing", "/comisiones", conversion_id=conversion)[
                "comisiones"], what=f"commission of {order}", diagnose=diag)
            expected[conversion] = _commission(value, approved_before[name])
            approved_before[name] += 1
            owner[conversion] = name
            assert (comision["afiliado_id"], Decimal(comision["monto"])) == (afiliados[name], expected[conversion])
            explain = platform.get("marketing", f"/comisiones/{comision['id']}/explain")
            assert (explain["click_id"], explain["conversion_id"]) == (click_id, conversion)
            return conversion

        a1 = sale("ana", "o-a1", "100.00")
        # A duplicate postback (same order_id, same parameters) answers the same id and books no second
        # commission; the same order_id with other parameters is a conflict (409), not a duplicate.
        again = platform.post("conversiones", "/conversiones", postbacks["o-a1"])
        assert again.status_code == 200 and again.json()["id"] == a1, again.text
        other = platform.post("conversiones", "/conversiones", {**postbacks["o-a1"], "conversion_value": "1.00"})
        assert other.status_code == 409 and other.json()["errors"][0]["field"] == "order_id", other.text
        a2 = sale("ana", "o-a2", "200.00")
        a3 = sale("ana", "o-a3", "300.00")
        b1 = sale("beto", "o-b1", "155.55")
        b2 = sale("beto", "o-b2", "50.00")
        c1 = sale("caro", "o-c1", "80.00")
        assert [expected[c] for c in (a1, a2, a3, b1, b2, c1)] == [
            Decimal("10.00"), Decimal("20.00"), Decimal("60.00"), Decimal("15.56"), Decimal("5.00"), Decimal("8.00")]
        assert len(platform.get("marketing", "/comisiones", conversion_id=a1)["comisiones"]) == 1

        # Caro is suspended: her link answers 404 and a new conversion of hers is rejected affiliate_suspended.
        suspended = platform.post("afiliados", f"/afiliados/{afiliados['caro']}/suspender", {"motivo": "fraude"})
        assert suspended.status_code == 200, suspended.text
        redirects_before_suspension = []  # until the suspension reaches conversiones the link still counts clicks

        def link_suspended() -> bool:
            status = platform.http.get(platform.url("conversiones") + f"/r/{links['caro']}",
                                       follow_redirects=False).status_code
            if status == 302:
                redirects_before_suspension.append(status)
            return status == 404
        wait_until(link_suspended, what="caro's link suspended", diagnose=diag)
        late = platform.post("conversiones", "/conversiones", {
            "affiliate_id": afiliados["caro"], "campaign_id": campana, "user_id": "cliente",
            "conversion_value": "90.00", "conversion_type": "sale", "order_id": "o-c2"})
        assert late.status_code == 200, late.text
        rejected = wait_until(lambda: (c := platform.get("conversiones", f"/conversiones/{late.json()['id']}"))[
            "status"] == "rejected" and c, what="caro's conversion rejected", diagnose=diag)
        assert rejected["reason"] == "affiliate_suspended"

        def approved(conversions) -> bool:
            states = {c["conversion_id"]: c["estado"] for c in platform.get("marketing", "/comisiones")["comisiones"]}
            return all(states.get(c) == "aprobada" for c in conversions)
        wait_until(lambda: approved([a1, a2, a3, b1, b2, c1]), what="commissions approved", diagnose=diag)

        # First payout run: ana 90.00 and beto 20.56; caro's 8.00 is under the 10.00 threshold.
        created = platform.post("marketing", "/pagos", {})
        assert created.status_code == 200, created.text
        pagos = {p["afiliado_id"]: p for p in created.json()["pagos"]}
        assert {k: Decimal(p["monto"]) for k, p in pagos.items()} == {
            afiliados["ana"]: expected[a1] + expected[a2] + expected[a3],  # 90.00
            afiliados["beto"]: expected[b1] + expected[b2]}  # 20.56
        assert Decimal(pagos[afiliados["ana"]]["monto"]) == Decimal("90.00")
        assert Decimal(pagos[afiliados["beto"]]["monto"]) == Decimal("20.56")
        for pago in pagos.values():
            paid = platform.post("marketing", f"/pagos/{pago['id']}/pagar", {})
            assert paid.status_code == 200 and paid.json()["estado"] == "pagado", paid.text

        # A refund after payout reverses the commission and is clawed back from ana's next payout.
        refund = platform.post("conversiones", f"/conversiones/{a2}/reembolso", {"tipo": "reembolso", "motivo": "devuelto"})
        assert refund.status_code == 200 and refund.json()["status"] == "refunded", refund.text
        wait_until(lambda: platform.get("marketing", "/comisiones", conversion_id=a2)["comisiones"][0]["estado"]
                   == "revertida", what="commission reversed", diagnose=diag)
        approved_before["ana"] -= 1  # a2 refunded: no longer an approved conversion
        a4 = sale("ana", "o-a4", "400.00")  # a1 and a3 approved before it (a2 reversed): still 20 %
        assert expected[a4] == Decimal("80.00")
        wait_until(lambda: approved([a4]), what="the new commission approved", diagnose=diag)
        [siguiente] = platform.post("marketing", "/pagos", {}).json()["pagos"]
        assert siguiente["afiliado_id"] == afiliados["ana"]
        assert Decimal(siguiente["monto"]) == expected[a4] - expected[a2] == Decimal("60.00")
        assert sorted((x["tipo"], Decimal(x["monto"])) for x in siguiente["lineas"]) == [
            ("ajuste", -expected[a2]), ("comision", expected[a4])]
        assert platform.post("marketing", f"/pagos/{siguiente['id']}/pagar", {}).json()["estado"] == "pagado"

        # The campaign report: 7 clicks (ana 4, beto 2, caro 1; a 404 records none) plus those caro's link took
        # before its suspension arrived, 8 detected, 7 validated.
        clicks = 7 + len(redirects_before_suspension)
        total = sum(expected.values(), Decimal(0))  # 198.56
        revertido = expected[a2]
        pagado = total - revertido - expected[c1]
        ingresos = sum((Decimal(v) for v in ("100", "200", "300", "400", "155.55", "50", "80")), Decimal(0))

        def report():
            [line] = platform.get("marketing", f"/reportes/campanas/{campana}", agrupar="total")["reportes"]
            return line if Decimal(line["monto_pagado"]) == pagado and line["reembolsadas"] == 1 else None
        line = wait_until(report, what="the campaign report", diagnose=diag)
        assert (line["clicks"], line["detectadas"], line["validadas"], line["rechazadas"], line["reembolsadas"],
                line["comisiones"]) == (clicks, 8, 7, 1, 1, 7)
        assert Decimal(line["ingresos"]) == ingresos == Decimal("1285.55")
        assert Decimal(line["ingresos_reembolsados"]) == Decimal("200.00")
        assert (Decimal(line["monto"]), Decimal(line["monto_pendiente"]), Decimal(line["monto_aprobado"]),
                Decimal(line["monto_pagado"]), Decimal(line["monto_revertido"])) == (
            total, Decimal(0), expected[c1], pagado, revertido)
        assert (total, pagado) == (Decimal("198.56"), Decimal("170.56"))
        assert Decimal(line["comision_ganada"]) == total - revertido == Decimal("178.56")

        # A first-click campaign with a 1-day window that holds conversions sooner than 2 minutes after their click.
        rapida = platform.post("marketing", "/campanas", {
            "nombre": "Rapida", "porcentaje_comision": "10", "periodo_bloqueo_dias": 0, "ventana_atribucion_dias": 1,
            "min_segundos_click_conversion": 120, "modelo_atribucion": "primer_click",
            "landing_url": "https://shop.example.com/oferta"})
        assert rapida.status_code == 201 and rapida.json()["modelo_atribucion"] == "primer_click", rapida.text
        rapida = rapida.json()["id"]
        rapida_links = {name: platform.post("marketing", f"/campanas/{rapida}/inscripciones",
                                            {"afiliado_id": afiliados[name]}).json()["link_code"]
                        for name in ("ana", "beto")}
        # A new visitor (its own cookie jar) comes through beto's link, then ana's; the shop reports the sale
        # at once with ana's click id. First click credits beto, and a second after beto's click is too fast.
        with httpx.Client(timeout=30) as visitor:
            first_click = click("beto", visitor, rapida_links["beto"])
            ana_click = click("ana", visitor, rapida_links["ana"])
        fast = platform.post("conversiones", "/conversiones", {
            "click_id": ana_click, "user_id": "visitante", "conversion_value": "50.00", "conversion_type": "sale",
            "order_id": "r-1"})
        assert fast.status_code == 200, fast.text
        fast = fast.json()["id"]
        held = wait_until(lambda: (c := platform.get("conversiones", f"/conversiones/{fast}"))["status"] != "detected"
                          and c, what="the fast conversion decided", diagnose=diag)
        assert (held["status"], held["reason"], held["affiliate_id"]) == ("on_hold", "too_fast", afiliados["beto"])
        assert platform.get("marketing", "/comisiones", conversion_id=fast)["comisiones"] == []  # no commission held
        # A reviewer approves it: the commission goes to beto, through his click, 10 % of 50.00.
        assert platform.post("conversiones", f"/conversiones/{fast}/aprobar", {}).json()["status"] == "validated"
        [rapida_comision] = wait_until(lambda: platform.get("marketing", "/comisiones", conversion_id=fast)[
            "comisiones"], what="the reviewed conversion's commission", diagnose=diag)
        assert (rapida_comision["afiliado_id"], rapida_comision["monto"]) == (afiliados["beto"], "5.00")
        assert platform.get("marketing", f"/comisiones/{rapida_comision['id']}/explain")["click_id"] == first_click

        # Outside the window: a click now, the postback "two days later" (the 1-day window has closed). The
        # platform is stopped and started again on the same data with conversiones' clock two days ahead.
        with httpx.Client(timeout=30) as visitor:
            stale_click = click("ana", visitor, rapida_links["ana"])
        platform.stop()
        platform.env["ALPES_CONVERSIONES_CLOCK_OFFSET_SECONDS"] = str(2 * 24 * 3600)
        platform.start()
        late = platform.post("conversiones", "/conversiones", {
            "click_id": stale_click, "user_id": "visitante", "conversion_value": "70.00", "conversion_type": "sale",
            "order_id": "r-2"})
        assert late.status_code == 200, late.text
        outside = wait_until(lambda: (c := platform.get("conversiones", f"/conversiones/{late.json()['id']}"))[
            "status"] != "detected" and c, what="the late conversion decided", diagnose=diag)
        assert (outside["status"], outside["reason"], outside["affiliate_id"]) == (
            "rejected", "outside_attribution_window", afiliados["ana"])

        # The audit log: every event once, and the hash chain verifies.
        wanted = {"AfiliadoRegistrado": 3, "CampanaCreada": 2, "AfiliadoInscrito": 5,
                  "ConversionDetected": 10, "ConversionValidated": 8, "ConversionRejected": 2, "ConversionHeld": 1,
                  "ComisionCalculada": 8, "ComisionAprobada": 8, "PagoCreado": 3, "PagoRealizado": 3,
                  "ComisionPagada": 6, "ConversionRefunded": 1, "ComisionRevertida": 1}

        def audited():
            eventos = platform.get("auditoria", "/auditoria/eventos", limit=10000)["eventos"]
            types = Counter(e["event_type"] for e in eventos)
            # Clicks are audited in batches of one link's clicks (ClicksRecorded): every click once.
            clicked = Counter(c["click_id"] for e in eventos if e["event_type"] == "ClicksRecorded"
                              for c in e["payload"]["clicks"])
            return all(types[t] == n for t, n in wanted.items()) and len(clicked) == clicks + 3 \
                and set(clicked.values()) == {1} and eventos
        eventos = wait_until(audited, what="the scenario in the audit log", diagnose=diag)
        ids = [e["event_id"] for e in eventos]
        assert len(ids) == len(set(ids))
        assert platform.get("auditoria", "/auditoria/verificacion")["ok"] is True
        # No commission for the conversion outside the window; beto's reviewed one is the only one in Rapida.
        assert [c["id"] for c in platform.get("marketing", "/comisiones", campana_id=rapida)["comisiones"]] == [
            rapida_comision["id"]]
    finally:
        platform.stop()


def test_alpes_demo_loads_a_scenario_into_a_running_platform(tmp_path):
    from typer.testing import CliRunner

    from alpes.cli import app

    platform = Platform(tmp_path / "alpes", env={"ALPES_APPROVAL_INTERVAL_SECONDS": "1"}).start()
    try:
        # A fresh `alpes up` on loopback says loudly that anonymous callers are the operator.
        wait_until(lambda: "PROTECTED LOCAL MODE" in platform.log(), 30, what="the start-up table")
        env = {f"ALPES_{name.upper()}_PORT": str(port) for name, port in platform.ports.items()}
        result = CliRunner().invoke(app, ["demo", "--conversions", "6", "--timeout", "60"], env=env)
        assert result.exit_code == 0, result.output
        assert "6 clicks, 6 conversions" in result.output
        # It says how long each stage took, from the first click to the last commission approved.
        timings = re.search(r"seconds from the first click: postbacks answered ([\d.]+), commissions calculated "
                            r"([\d.]+), commissions approved ([\d.]+)", result.output)
        assert timings is not None, result.output
        answered, calculated, approved = map(float, timings.groups())
        assert answered <= calculated <= approved
        [campana] = [c for c in platform.get("marketing", "/campanas")["campanas"] if c["nombre"].startswith("Demo ")]
        assert f"/reportes/campanas/{campana['id']}?agrupar=total" in result.output
        # Validations and commissions reach the report through different consumers: wait for both.
        line = wait_until(lambda: (r := platform.get("marketing", f"/reportes/campanas/{campana['id']}",
                                                     agrupar="total")["reportes"])
                          and r[0]["validadas"] == 6 and r[0]["comisiones"] == 6 and r[0],
                          what="the demo's validations and commissions in the campaign report",
                          diagnose=platform.diagnostics)
        assert (line["clicks"], line["detectadas"], line["comisiones"]) == (6, 6, 6)
        assert Decimal(line["monto"]) > 0
        assert platform.get("auditoria", "/auditoria/verificacion")["ok"] is True
    finally:
        platform.stop()
