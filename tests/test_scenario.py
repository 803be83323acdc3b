"""One end-to-end scenario through the running platform: tiered rules, tracking links, a duplicate postback,
a suspension, payouts, a refund after payout clawed back from the next payout, the report and the audit log.

Not here, because they need control of the clock: conversions held `too_fast` and conversions rejected
`outside_attribution_window` (covered in-process in tests/test_tracking.py and tests/test_fraud_rules.py).
"""

from __future__ import annotations

from collections import Counter
from decimal import ROUND_HALF_UP, Decimal
from urllib.parse import parse_qs, urlsplit

from harness import Platform, wait_until

CENT = Decimal("0.01")
# First matching rule wins: 20 % once the affiliate has 2 commissions this month in the campaign, else 10 %.
REGLAS = {"reglas": [{"tipo": "cps", "porcentaje": "20", "min_aprobadas": 2}, {"tipo": "cps", "porcentaje": "10"}]}


def _commission(value: str, calculated_before: int) -> Decimal:
    pct = Decimal(20) if calculated_before >= 2 else Decimal(10)
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

        def click(name: str) -> str:
            redirect = wait_until(
                lambda: (r := platform.http.get(platform.url("conversiones") + f"/r/{links[name]}",
                                                headers={"User-Agent": "scenario"}, follow_redirects=False))
                .status_code == 302 and r, what=f"{name}'s link redirects", diagnose=diag)
            location = urlsplit(redirect.headers["location"])
            assert (location.netloc, location.path) == ("shop.example.com", "/oferta")
            [click_id] = parse_qs(location.query)["alpes_click_id"]
            return click_id

        calculated = Counter()
        expected: dict[str, Decimal] = {}  # conversion id -> commission
        owner: dict[str, str] = {}

        def sale(name: str, order: str, value: str) -> str:
            response = platform.post("conversiones", "/conversiones", {
                "click_id": click(name), "user_id": "cliente", "conversion_value": value,
                "conversion_type": "sale", "order_id": order})
            assert response.status_code == 200, response.text
            conversion = response.json()["id"]
            # Wait for the commission before the next sale: the tier counts the commissions already calculated.
            [comision] = wait_until(lambda: platform.get("marketing", "/comisiones", conversion_id=conversion)[
                "comisiones"], what=f"commission of {order}", diagnose=diag)
            expected[conversion] = _commission(value, calculated[name])
            calculated[name] += 1
            owner[conversion] = name
            assert (comision["afiliado_id"], Decimal(comision["monto"])) == (afiliados[name], expected[conversion])
            return conversion

        a1 = sale("ana", "o-a1", "100.00")
        # A duplicate postback (same order_id) answers the same id and books no second commission.
        again = platform.post("conversiones", "/conversiones", {
            "affiliate_id": afiliados["ana"], "campaign_id": campana, "user_id": "cliente",
            "conversion_value": "100.00", "conversion_type": "sale", "order_id": "o-a1"})
        assert again.status_code == 200 and again.json()["id"] == a1, again.text
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
        a4 = sale("ana", "o-a4", "400.00")  # 3 calculated before (the reversed one still counts): 20 %
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

        # The audit log: every event once, and the hash chain verifies.
        wanted = {"AfiliadoRegistrado": 3, "CampanaCreada": 1, "AfiliadoInscrito": 3, "ClickRecorded": clicks,
                  "ConversionDetected": 8, "ConversionValidated": 7, "ConversionRejected": 1,
                  "ComisionCalculada": 7, "ComisionAprobada": 7, "PagoCreado": 3, "PagoRealizado": 3,
                  "ComisionPagada": 6, "ConversionRefunded": 1, "ComisionRevertida": 1}

        def audited():
            eventos = platform.get("auditoria", "/auditoria/eventos", limit=10000)["eventos"]
            types = Counter(e["event_type"] for e in eventos)
            return all(types[t] == n for t, n in wanted.items()) and eventos
        eventos = wait_until(audited, what="the scenario in the audit log", diagnose=diag)
        ids = [e["event_id"] for e in eventos]
        assert len(ids) == len(set(ids))
        assert platform.get("auditoria", "/auditoria/verificacion")["ok"] is True
    finally:
        platform.stop()


def test_alpes_demo_loads_a_scenario_into_a_running_platform(tmp_path):
    from typer.testing import CliRunner

    from alpes.cli import app

    platform = Platform(tmp_path / "alpes", env={"ALPES_APPROVAL_INTERVAL_SECONDS": "1"}).start()
    try:
        env = {f"ALPES_{name.upper()}_PORT": str(port) for name, port in platform.ports.items()}
        result = CliRunner().invoke(app, ["demo", "--conversions", "6", "--timeout", "60"], env=env)
        assert result.exit_code == 0, result.output
        assert "6 clicks, 6 conversions" in result.output
        [campana] = [c for c in platform.get("marketing", "/campanas")["campanas"] if c["nombre"].startswith("Demo ")]
        assert f"/reportes/campanas/{campana['id']}?agrupar=total" in result.output
        line = wait_until(lambda: (r := platform.get("marketing", f"/reportes/campanas/{campana['id']}",
                                                     agrupar="total")["reportes"]) and r[0]["validadas"] == 6 and r[0],
                          what="the demo in the campaign report", diagnose=platform.diagnostics)
        assert (line["clicks"], line["detectadas"], line["comisiones"]) == (6, 6, 6)
        assert Decimal(line["monto"]) > 0
        assert platform.get("auditoria", "/auditoria/verificacion")["ok"] is True
    finally:
        platform.stop()
