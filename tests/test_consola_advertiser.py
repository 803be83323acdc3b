"""The console's advertiser pages (alpes/consola/pages_advertiser.py) without a platform: the forms
turned into the services' bodies, the reports' sums and charts, the CSV, the chart macro, and every
page rendered over a fake `Services` that records what the console asked (the real services behind
them: tests/test_consola_advertiser_platform.py)."""

from __future__ import annotations

import csv
import io
import json
import re
from datetime import date
from decimal import Decimal
from html import unescape

import pytest
from fastapi.testclient import TestClient
from jinja2 import Environment, FileSystemLoader

from alpes.consola import pages_advertiser as pages
from alpes.consola.app import build
from alpes.consola.services import ServiceError
from alpes.consola.sessions import COOKIE
from alpes.consola.web import TEMPLATES_DIR, PageError
from alpes.settings import Settings


# -- forms → bodies ------------------------------------------------------------------------------
def test_the_campaign_form_becomes_the_services_body_with_empty_fields_left_to_its_defaults():
    form = {"nombre": "Invierno", "porcentaje_comision": "7.5", "moneda": "eur", "presupuesto": "",
            "landing_url": "https://shop.example.com/x", "ventana_atribucion_dias": "14", "periodo_bloqueo_dias": "",
            "fecha_inicio": "2026-12-01", "paises": "es, fr", "canales": "", "categorias": "",
            "activar": "on", "anunciante_id": "someone"}
    body = pages.campaign_body(form, operator=False)
    assert body == {"nombre": "Invierno", "porcentaje_comision": "7.5", "moneda": "EUR", "activar": True,
                    "modelo_atribucion": "ultimo_click", "landing_url": "https://shop.example.com/x",
                    "ventana_atribucion_dias": 14, "fecha_inicio": "2026-12-01T00:00:00Z",
                    "segmentacion": {"paises": ["ES", "FR"], "canales": [], "categorias": []}}
    # Only an operator names the owner; an unchecked box is a campaign left as a draft.
    assert pages.campaign_body({**form, "activar": ""}, operator=True)["anunciante_id"] == "someone"
    assert pages.campaign_body({"nombre": "x", "porcentaje_comision": "1"}, operator=False)["activar"] is False
    with pytest.raises(pages.FormProblem) as problem:
        pages.campaign_body({**form, "ventana_atribucion_dias": "two"}, operator=False)
    assert problem.value.field == "ventana_atribucion_dias"


def test_the_rules_editor_sends_one_value_per_rule_in_the_field_its_kind_needs():
    form = {"regla-0-tipo": "cpa", "regla-0-valor": "5.00", "regla-0-conversion_type": "lead",
            "regla-0-afiliado_id": "", "regla-0-min_aprobadas": "",
            "regla-1-tipo": "", "regla-1-valor": "99",  # no kind: the row is removed
            "regla-2-tipo": "cps", "regla-2-valor": "12.5", "regla-2-afiliado_id": "af-1",
            "regla-2-min_aprobadas": "10", "tope-monto": "", "tope-periodo": ""}
    assert pages.rules_body(form) == {"reglas": [
        {"tipo": "cpa", "monto": "5.00", "conversion_type": "lead"},
        {"tipo": "cps", "porcentaje": "12.5", "afiliado_id": "af-1", "min_aprobadas": 10}]}
    assert pages.rules_body({"regla-0-tipo": "", "tope-monto": "100.00", "tope-periodo": "mes"}) == {
        "reglas": [], "tope_por_afiliado": {"monto": "100.00", "periodo": "mes"}}
    # Rows come in their number order, whatever the form's order (first match wins).
    assert [r["monto"] for r in pages.rules_body({"regla-10-tipo": "cpa", "regla-10-valor": "2.00",
                                                   "regla-2-tipo": "cpa", "regla-2-valor": "1.00"})["reglas"]] == \
        ["1.00", "2.00"]


@pytest.mark.parametrize(("form", "field"), [
    ({"regla-0-tipo": "cpa", "regla-0-valor": ""}, "regla-0-valor"),
    ({"regla-3-tipo": "flat", "regla-3-valor": "1"}, "regla-3-tipo"),
    ({"regla-0-tipo": "cps", "regla-0-valor": "1", "regla-0-min_aprobadas": "x"}, "regla-0-min_aprobadas"),
    ({"tope-monto": "10.00", "tope-periodo": ""}, "tope-periodo"),
    ({"tope-monto": "", "tope-periodo": "mes"}, "tope-monto"),
])
def test_a_rules_form_the_console_can_tell_is_incomplete_names_the_field(form, field):
    with pytest.raises(pages.FormProblem) as problem:
        pages.rules_body(form)
    assert problem.value.field == field


def test_the_services_field_names_point_back_at_the_editors_inputs():
    assert pages.rule_field("reglas.1.monto") == "regla-1-valor"
    assert pages.rule_field("reglas.0.porcentaje") == "regla-0-valor"
    assert pages.rule_field("reglas.2.afiliado_id") == "regla-2-afiliado_id"
    assert pages.rule_field("tope_por_afiliado.monto") == "tope-monto"
    assert pages.rule_field("campana_id") == "campana_id"


def test_the_editor_shows_the_rules_in_force_and_blank_rows_to_add_more():
    rows = pages.rules_form_rows([{"id": "r1", "tipo": "cps", "monto": None, "porcentaje": "10.0000",
                                   "conversion_type": None, "afiliado_id": None, "min_aprobadas": 5}])
    assert rows[0] == {"tipo": "cps", "valor": "10.0000", "conversion_type": "", "afiliado_id": "",
                       "min_aprobadas": "5"}
    assert len(rows) == 1 + pages.BLANK_RULE_ROWS and all(r["tipo"] == "" for r in rows[1:])


# -- reports ---------------------------------------------------------------------------------------
TODAY = date(2026, 12, 5)


def test_the_report_period_defaults_to_the_last_30_days_and_refuses_a_bad_one_naming_the_field():
    assert pages.report_period(None, None, TODAY) == (date(2026, 11, 6), TODAY)
    assert pages.report_period("2026-12-01", "2026-12-03", TODAY) == (date(2026, 12, 1), date(2026, 12, 3))
    for desde, hasta, field in (("yesterday", None, "desde"), (None, "2026-13-01", "hasta"),
                                ("2026-12-04", "2026-12-01", "desde"), ("2024-01-01", "2026-01-01", "desde")):
        with pytest.raises(PageError) as refused:
            pages.report_period(desde, hasta, TODAY)
        assert refused.value.status == 422 and refused.value.detail.startswith(field)


def _line(dia, campana="c1", afiliado="a1", moneda="EUR", **figures):
    base = {"dia": dia, "campana_id": campana, "afiliado_id": afiliado, "moneda": moneda,
            **{f: 0 for f in pages._COUNTS}, **{f: "0.00" for f in pages._AMOUNTS}}
    return {**base, **figures}


LINES = [
    _line("2026-12-01", clicks=10, detectadas=2, validadas=2, ingresos="200.10", comision_ganada="20.01",
          monto="20.01"),
    _line("2026-12-01", afiliado="a2", clicks=5, detectadas=1, validadas=0, ingresos="0.00"),
    _line("2026-12-03", campana="c2", clicks=3, detectadas=1, validadas=1, ingresos="0.10", comision_ganada="0.20",
          monto="0.20"),
    _line("2026-12-03", campana="c3", moneda="JPY", clicks=4, detectadas=1, validadas=1, ingresos="1000",
          comision_ganada="100", monto="100"),
]


def test_the_charts_have_one_point_per_day_and_money_per_currency_never_added_across():
    charts = pages.daily_charts(LINES, date(2026, 12, 1), date(2026, 12, 3))
    assert set(charts) == {"chart-actividad", "chart-ingresos", "chart-comisiones", "chart-epc"}
    actividad = charts["chart-actividad"]
    assert actividad["labels"] == ["2026-12-01", "2026-12-02", "2026-12-03"]
    assert {s["label"]: s["data"] for s in actividad["series"]} == {
        "Clicks": [15, 0, 7], "Conversions detected": [3, 0, 2], "Conversions validated": [2, 0, 2]}
    assert {s["label"]: s["data"] for s in charts["chart-ingresos"]["series"]} == {
        "Revenue EUR": ["200.10", "0", "0.10"], "Revenue JPY": ["0", "0", "1000"]}
    assert {s["label"]: s["data"] for s in charts["chart-comisiones"]["series"]} == {
        "Commissions EUR": ["20.01", "0", "0.20"], "Commissions JPY": ["0", "0", "100"]}
    # EPC per currency: commission earned over that currency's clicks; no clicks, no EPC (None, not 0).
    assert {s["label"]: s["data"] for s in charts["chart-epc"]["series"]} == {
        "EPC EUR": ["1.3340", None, "0.0667"], "EPC JPY": [None, None, "25.0000"]}
    json.dumps(charts)  # what the page embeds and the refresh endpoint answers


def test_totals_per_affiliate_and_budget_used_are_exact_decimal_sums():
    totals = {t["moneda"]: t for t in pages.totals_by_currency(LINES)}
    assert totals["EUR"]["clicks"] == 18 and totals["EUR"]["ingresos"] == Decimal("200.20")
    assert totals["EUR"]["comision_ganada"] == Decimal("20.21") and totals["EUR"]["epc"] == "1.1228"
    assert totals["JPY"]["ingresos"] == Decimal("1000")
    by_affiliate = {(a["afiliado_id"], a["moneda"]): a for a in pages.per_affiliate(LINES)}
    assert set(by_affiliate) == {("a1", "EUR"), ("a2", "EUR"), ("a1", "JPY")}
    assert by_affiliate[("a2", "EUR")]["epc"] == "0.0000" and by_affiliate[("a1", "EUR")]["clicks"] == 13
    by_campaign = {(c["campana_id"], c["moneda"]): c for c in pages.per_campaign(LINES)}
    assert set(by_campaign) == {("c1", "EUR"), ("c2", "EUR"), ("c3", "JPY")}
    assert by_campaign[("c1", "EUR")]["clicks"] == 15 and by_campaign[("c1", "EUR")]["comision_ganada"] == \
        Decimal("20.01")
    # 0.1 + 0.2 is 0.3 here (never a float).
    assert pages.budget_used([_line("d", monto="0.10"), _line("d", monto="0.20"),
                              _line("d", campana="c2", monto="1.00")]) == {"c1": Decimal("0.30"),
                                                                           "c2": Decimal("1.00")}


def test_the_csv_has_a_header_a_row_per_line_and_no_cell_a_spreadsheet_would_run():
    text = pages.report_csv(LINES[:1] + [_line("2026-12-02", afiliado="=HYPERLINK(\"x\")", ingresos="-5.00")])
    rows = list(csv.DictReader(io.StringIO(text)))
    assert list(rows[0]) == list(pages.CSV_COLUMNS)
    assert rows[0]["clicks"] == "10" and rows[0]["ingresos"] == "200.10" and rows[0]["dia"] == "2026-12-01"
    assert rows[1]["afiliado_id"] == "'=HYPERLINK(\"x\")"
    assert rows[1]["ingresos"] == "-5.00"  # a negative amount stays a number
    assert text.endswith("\r\n")


# -- the chart macro ---------------------------------------------------------------------------------
def test_the_chart_macro_embeds_its_data_as_json_and_the_same_figures_as_a_table():
    env = Environment(loader=FileSystemLoader(str(TEMPLATES_DIR)), autoescape=True)
    env.globals["url_for"] = lambda name, path: f"/static/{path}"
    html = env.from_string('{% from "charts.html" import chart %}'
                           '{{ chart("c", ["2026-12-01", "2026-12-02"], series, "Sales <b>", "bar", "/d?x=1&y=2") }}'
                           ).render(series=[{"label": "</script><script>alert(1)</script>", "data": [1, None]},
                                            {"label": "EUR", "data": ["2.50", "0"]}])
    data = re.search(r'<script type="application/json" id="c-data">(.*?)</script>', html, re.S).group(1)
    assert json.loads(data) == {"type": "bar", "labels": ["2026-12-01", "2026-12-02"], "series": [
        {"label": "</script><script>alert(1)</script>", "data": [1, None]}, {"label": "EUR", "data": ["2.50", "0"]}]}
    assert "<script>alert" not in html  # the label cannot close the data block nor enter the table as markup
    assert 'data-refresh="/d?x=1&amp;y=2"' in html and 'data-chart="c-data"' in html
    assert 'aria-labelledby="c-title"' in html and "Sales &lt;b&gt;" in html
    cells = [unescape(c) for c in re.findall(r'<td class="num">(.*?)</td>', html)]
    assert cells == ["1", "2.50", "—", "0"]


# -- every page over a fake Services -------------------------------------------------------------------
CAMPANA = {"id": "camp-1", "nombre": "Invierno", "porcentaje_comision": "10.0000", "moneda": "EUR",
           "estado": "activa", "creada_en": "2026-12-01T10:00:00+00:00", "fecha_inicio": None, "fecha_fin": None,
           "landing_url": "https://shop.example.com/i", "presupuesto": "500.00", "ventana_atribucion_dias": 30,
           "periodo_bloqueo_dias": 0, "segmentacion": {"paises": ["ES"], "canales": [], "categorias": []},
           "min_segundos_click_conversion": None, "modelo_atribucion": "ultimo_click", "anunciante_id": "adv-1",
           "valor_maximo_conversion": "50.00"}
AFILIADO = {"id": "af-1", "user_id": "ana", "email": "a***@example.com", "nombre": "Ana Ruiz", "estado": "validado",
            "motivos": [], "registrado_en": "2026-12-01T10:00:00+00:00", "pais": "ES", "motivo_suspension": None}
CONVERSION = {"id": "conv-1", "affiliate_id": "af-1", "campaign_id": "camp-1", "user_id": "cliente-1",
              "conversion_value": "80.00", "currency": "EUR", "conversion_type": "sale", "order_id": "o-77",
              "status": "on_hold", "reason": "value_above_maximum", "timestamp": "2026-12-05T03:00:00+00:00"}
PAGO = {"id": "pago-1", "anunciante_id": "adv-1", "afiliado_id": "af-1", "moneda": "EUR", "monto": "12.34",
        "estado": "pendiente", "creado_en": "2026-12-05T03:00:00+00:00", "pagado_en": None}
REGLAS_V1 = {"campana_id": "camp-1", "version": 1, "vigente_desde": "2026-12-02T00:00:00+00:00", "versiones": [1],
             "reglas": [{"id": "r1", "tipo": "cpa", "monto": "5.00", "porcentaje": None, "conversion_type": None,
                         "afiliado_id": None, "min_aprobadas": None}], "tope_por_afiliado": None,
             "porcentaje_comision": "10.0000"}


class FakeServices:
    """Answers by (method, service, path); records every call with its params and body."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.answers: dict[tuple[str, str, str], object] = {
            ("GET", "marketing", "/campanas"): {"campanas": [CAMPANA]},
            ("GET", "marketing", "/campanas/camp-1"): CAMPANA,
            ("GET", "marketing", "/campanas/camp-1/reglas"): REGLAS_V1,
            ("GET", "marketing", "/campanas/camp-1/inscripciones"): {"inscripciones": [
                {"id": "i-1", "campana_id": "camp-1", "afiliado_id": "af-1", "link_code": "lnk123", "canal": None,
                 "categoria": None, "estado": "activa", "inscrita_en": "2026-12-01T11:00:00+00:00"}]},
            ("GET", "marketing", "/reportes"): {"reportes": [
                _line(date.today().isoformat(), campana="camp-1", afiliado="af-1", clicks=4, detectadas=1,
                      validadas=1, ingresos="80.00", comision_ganada="5.00", monto="5.00")]},
            ("GET", "marketing", "/reportes/campanas/camp-1"): {"reportes": [_line(None, monto="5.00")]},
            ("GET", "afiliados", "/afiliados"): {"afiliados": [AFILIADO, {**AFILIADO, "id": "af-2", "nombre": "Beto",
                                                                            "estado": "suspendido"}]},
            ("GET", "conversiones", "/conversiones"): {"conversiones": [CONVERSION]},
            ("GET", "marketing", "/anunciantes"): {"anunciantes": [{"id": "adv-1", "nombre": "Tienda"}]},
            ("GET", "afiliados", "/afiliados/af-1"): AFILIADO,
            ("GET", "conversiones", "/conversiones/cifras"): {"cifras": [
                {"affiliate_id": "af-1", "campaign_id": "camp-1", "currency": "EUR", "detected": 120, "validated": 100,
                 "rejected": 10, "pending": 10, "validated_revenue": "1000.00"}]},
            ("GET", "conversiones", "/conversiones/conv-1"): {**CONVERSION, "status": "validated"},
            ("GET", "conversiones", "/conversiones/conv-1/eventos"): {"eventos": [
                {"version": 1, "event_id": "e1", "event_type": "ConversionDetected", "schema_version": 2,
                 "occurred_at": "2026-12-05T03:00:00+00:00", "payload": {"conversion_value": "80.00"}}]},
            ("GET", "conversiones", "/sagas/conv-1"): {"estado": "completed", "paso_actual": "done", "intentos": 1,
                                                        "max_intentos": 5, "resultado": "ComisionCalculada",
                                                        "pasos": [{"paso": "request_commission", "estado": "done",
                                                                   "started_at": "2026-12-05T03:00:01+00:00",
                                                                   "finished_at": "2026-12-05T03:00:02+00:00",
                                                                   "detalle": None}]},
            ("GET", "marketing", "/comisiones"): {"comisiones": [
                {"id": "com-1", "conversion_id": "conv-1", "afiliado_id": "af-1", "campana_id": "camp-1",
                 "base": "80.00", "porcentaje": "0", "monto": "5.00", "moneda": "EUR", "estado": "pendiente",
                 "calculada_en": "2026-12-05T03:00:02+00:00", "pago_id": None, "motivo_reversion": None}]},
            ("GET", "marketing", "/comisiones/com-1/explain"): {
                "comision_id": "com-1", "regla_id": "r1", "tipo": "cpa", "version_reglas": 1,
                "inputs": {"base": "80.00", "monto_fijo": "5.00", "porcentaje": None}, "chequeos": ["rule r1 matched"],
                "topes": {"presupuesto": "500.00", "restante_presupuesto": "495.00"}, "monto_sin_tope": "5.00",
                "limitado_por": None, "monto": "5.00", "moneda": "EUR"},
            ("GET", "marketing", "/pagos"): {"pagos": [PAGO]},
            ("GET", "marketing", "/pagos/saldos"): {"saldos": [{"afiliado_id": "af-1", "moneda": "EUR", "lineas": 1,
                                                                "saldo": "12.34"}]},
            ("GET", "marketing", "/pagos/pago-1"): {**PAGO, "lineas": [{"linea": 1, "tipo": "comision",
                                                                        "referencia_id": "com-1", "monto": "12.34"}]},
            ("POST", "marketing", "/campanas"): {**CAMPANA, "id": "camp-2", "nombre": "Verano"},
            ("PUT", "marketing", "/campanas/camp-1/reglas"): {**REGLAS_V1, "version": 2},
            ("POST", "marketing", "/campanas/camp-1/inscripciones"): {"afiliado_id": "af-1", "link_code": "lnk9"},
            ("POST", "conversiones", "/conversiones/conv-1/aprobar"): CONVERSION,
            ("POST", "conversiones", "/conversiones/conv-1/rechazar"): CONVERSION,
            ("POST", "marketing", "/pagos"): {"pagos": [PAGO]},
            ("POST", "marketing", "/pagos/pago-1/pagar"): {**PAGO, "estado": "pagado"},
            ("POST", "afiliados", "/afiliados"): AFILIADO,
            ("POST", "afiliados", "/afiliados/af-2/reactivar"): AFILIADO,
        }

    async def _answer(self, method, service, path, params=None, json=None):
        self.calls.append((method, service, path, params, json))
        answer = self.answers.get((method, service, path))
        if isinstance(answer, ServiceError):
            raise answer
        if answer is None:
            raise ServiceError(service, 404, "Not Found", [{"field": "id", "reason": "no such thing"}])
        return answer

    async def get(self, service, path, params=None):
        return await self._answer("GET", service, path, params)

    async def post(self, service, path, json=None, params=None):
        return await self._answer("POST", service, path, params, json)

    async def put(self, service, path, json=None):
        return await self._answer("PUT", service, path, None, json)

    def sent(self, method, service, path):
        return [json for m, s, p, _params, json in self.calls if (m, s, p) == (method, service, path)]


@pytest.fixture
def fake(monkeypatch):
    services = FakeServices()
    monkeypatch.setattr(pages, "services_of", lambda request: services)
    return services


@pytest.fixture
def console():
    app = build(Settings(), urls={name: "http://127.0.0.1:9" for name in ("afiliados", "conversiones", "marketing",
                                                                          "auditoria")})
    with TestClient(app, follow_redirects=False) as client:
        yield app, client


def _signed_in(app, client, role="advertiser"):
    session = app.state.sessions.sign_in(None, role=role, key="alpes_adv_x_y", tenant_id="adv-1", name="Tienda")
    client.cookies.set(COOKIE, session.id)
    return session


PAGES = ["/anunciante", "/anunciante/campanas", "/anunciante/campanas/camp-1", "/anunciante/campanas/camp-1?version=1",
         "/anunciante/afiliados", "/anunciante/revision", "/anunciante/conversiones",
         "/anunciante/conversiones?status=validated&pagina=2",
         "/anunciante/conversiones/conv-1", "/anunciante/pagos",
         "/anunciante/pagos/pago-1", "/anunciante/reportes"]


@pytest.mark.parametrize("role", ["advertiser", "operator"])
def test_every_advertiser_page_renders_for_advertisers_and_operators(console, fake, role):
    app, client = console
    _signed_in(app, client, role)
    for path in PAGES:
        answer = client.get(path)
        assert answer.status_code == 200, (path, answer.text[:2000])
        assert answer.text.count("<h1") == 1, path
        # Every input and select has a label (hidden inputs excepted).
        for control in re.findall(r'<(?:input|select)\b[^>]*>', answer.text):
            if 'type="hidden"' in control:
                continue
            ident = re.search(r'\bid="([^"]+)"', control)
            assert ident and f'for="{ident.group(1)}"' in answer.text, (path, control)
        # Every post form carries this session's CSRF token.
        forms = re.findall(r'<form method="post".*?</form>', answer.text, re.S)
        assert all('name="csrf_token"' in f for f in forms), path


def test_an_affiliate_is_refused_the_advertiser_pages_and_a_signed_out_visitor_sent_to_sign_in(console, fake):
    app, client = console
    assert client.get("/anunciante/revision").status_code == 303
    _signed_in(app, client, "affiliate")
    assert client.get("/anunciante/revision").status_code == 403
    assert fake.calls == []


def test_only_an_operator_picks_the_advertiser_a_new_campaign_belongs_to(console, fake):
    app, client = console
    _signed_in(app, client, "operator")
    page = client.get("/anunciante/campanas").text
    assert '<option value="adv-1">Tienda (adv-1)</option>' in page
    _signed_in(app, client, "advertiser")
    assert 'name="anunciante_id"' not in client.get("/anunciante/campanas").text
    assert ("GET", "marketing", "/anunciantes", {"limit": 1000}, None) in fake.calls
    assert sum(c[:3] == ("GET", "marketing", "/anunciantes") for c in fake.calls) == 1


def test_the_pages_show_what_the_services_answered(console, fake):
    app, client = console
    _signed_in(app, client)
    review = client.get("/anunciante/revision").text
    assert "o-77" in review and "80.00 EUR" in review and "value_above_maximum" in review and "Invierno" in review
    assert 'aria-label="Approve conversion o-77"' in review
    assert fake.calls[0][3] == {"status": "on_hold", "limit": 1000}
    campaign = client.get("/anunciante/campanas/camp-1").text
    assert "version 1" in campaign and 'value="5.00"' in campaign and "/r/lnk123" in campaign
    assert "5.00 EUR" in campaign  # budget used
    conversion = client.get("/anunciante/conversiones/conv-1").text
    assert "r1 (CPA) of rules version 1" in conversion and "request_commission" in conversion
    assert "ConversionDetected" in conversion and "Invierno" in conversion and "Ana Ruiz" in conversion
    reports = client.get("/anunciante/reportes").text
    data = json.loads(unescape(re.search(r'id="chart-actividad-data">(.*?)</script>', reports, re.S).group(1)))
    assert data["series"][0]["label"] == "Clicks" and data["series"][0]["data"][-1] == 4
    assert "/static/chart.umd.min.js" in reports and "Ana Ruiz" in reports


def test_the_conversions_list_opens_on_the_newest_page_and_pages_through_the_rest(console, fake):
    app, client = console
    _signed_in(app, client)
    page = client.get("/anunciante/conversiones")
    # 120 conversions, 50 a page: the newest is page 3, from offset 100.
    assert page.status_code == 200 and "Page 3 of 3" in page.text and "o-77" in page.text
    assert fake.calls[-1][3] == {"status": None, "campaign_id": None, "limit": pages.PAGE_SIZE + 1, "offset": 100}
    assert 'href="/anunciante/conversiones?pagina=2"' in page.text  # older
    client.get("/anunciante/conversiones", params={"status": "rejected", "campana_id": "camp-1"})
    assert fake.calls[-1][3] == {"status": "rejected", "campaign_id": "camp-1", "limit": pages.PAGE_SIZE + 1,
                                 "offset": 0}
    for bad in ({"status": "lost"}, {"pagina": "0"}, {"pagina": "x"}):
        assert client.get("/anunciante/conversiones", params=bad).status_code == 422


def test_posts_send_the_services_bodies_and_redirect_back_with_a_message(console, fake):
    app, client = console
    session = _signed_in(app, client)
    token = {"csrf_token": session.csrf}
    answer = client.post("/anunciante/campanas", data={**token, "nombre": "Verano", "porcentaje_comision": "8",
                                                       "moneda": "EUR", "activar": "on"})
    assert answer.status_code == 303 and answer.headers["location"] == "/anunciante/campanas/camp-2"
    assert fake.sent("POST", "marketing", "/campanas") == [{"nombre": "Verano", "porcentaje_comision": "8",
                                                            "moneda": "EUR", "activar": True,
                                                            "modelo_atribucion": "ultimo_click"}]
    assert "Verano" in client.get("/anunciante/campanas").text  # the flash message, shown once
    answer = client.post("/anunciante/campanas/camp-1/reglas", data={**token, "regla-0-tipo": "cps",
                                                                     "regla-0-valor": "12"})
    assert answer.status_code == 303
    assert fake.sent("PUT", "marketing", "/campanas/camp-1/reglas") == [{"reglas": [{"tipo": "cps",
                                                                                     "porcentaje": "12"}]}]
    assert client.post("/anunciante/revision/conv-1/aprobar", data=token).status_code == 303
    assert client.post("/anunciante/revision/conv-1/rechazar", data={**token, "motivo": "duplicate order"}
                       ).status_code == 303
    assert fake.sent("POST", "conversiones", "/conversiones/conv-1/rechazar") == [{"motivo": "duplicate order"}]
    assert client.post("/anunciante/pagos/pago-1/pagar", data=token).status_code == 303
    assert client.post("/anunciante/afiliados/af-2/estado", data={**token, "accion": "reactivar"}).status_code == 303
    assert fake.sent("POST", "afiliados", "/afiliados/af-2/reactivar") == [None]


def test_a_refused_post_shows_the_services_reason_on_its_page_with_what_was_typed(console, fake):
    app, client = console
    session = _signed_in(app, client)
    fake.answers[("POST", "marketing", "/campanas")] = ServiceError(
        "marketing", 422, "invalid request", [{"field": "porcentaje_comision", "reason": "must be at most 100"}])
    answer = client.post("/anunciante/campanas", data={"csrf_token": session.csrf, "nombre": "Caro",
                                                       "porcentaje_comision": "150"})
    assert answer.status_code == 422
    assert "must be at most 100" in answer.text and 'value="Caro"' in answer.text
    assert re.search(r'id="f-porcentaje_comision"[^>]*aria-invalid="true"', answer.text)
    # A rules form the console can judge itself never reaches the service.
    answer = client.post("/anunciante/campanas/camp-1/reglas", data={"csrf_token": session.csrf,
                                                                     "regla-0-tipo": "cpa", "regla-0-valor": ""})
    assert answer.status_code == 422 and "regla-0-valor" in answer.text
    assert fake.sent("PUT", "marketing", "/campanas/camp-1/reglas") == []
    # The review queue: a conversion someone already decided is a 409 shown on the queue.
    fake.answers[("POST", "conversiones", "/conversiones/conv-1/aprobar")] = ServiceError(
        "conversiones", 409, "conflict", [{"field": "status", "reason": "not on hold"}])
    answer = client.post("/anunciante/revision/conv-1/aprobar", data={"csrf_token": session.csrf})
    assert answer.status_code == 409 and "not on hold" in answer.text and "<h1>Review queue</h1>" in answer.text
    # An unknown action is refused before any service is asked.
    calls = len(fake.calls)
    assert client.post("/anunciante/campanas/camp-1/estado", data={"csrf_token": session.csrf,
                                                                   "accion": "borrar"}).status_code == 422
    assert len(fake.calls) == calls


def test_a_post_without_the_sessions_token_does_nothing(console, fake):
    app, client = console
    _signed_in(app, client)
    answer = client.post("/anunciante/pagos", data={"csrf_token": "forged"})
    assert answer.status_code == 403 and fake.calls == []


def test_the_report_data_and_csv_follow_the_period_and_filters(console, fake):
    app, client = console
    _signed_in(app, client)
    answer = client.get("/anunciante/reportes/datos", params={"desde": "2026-12-01", "hasta": "2026-12-05",
                                                              "campana_id": "camp-1"})
    assert answer.status_code == 200 and answer.headers["cache-control"] == "no-store"
    assert answer.json()["charts"]["chart-actividad"]["labels"][0] == "2026-12-01"
    assert fake.calls[-1][3] == {"desde": "2026-12-01", "hasta": "2026-12-05", "campana_id": "camp-1",
                                 "afiliado_id": None}
    answer = client.get("/anunciante/reportes.csv", params={"desde": "2026-12-01", "hasta": "2026-12-05"})
    assert answer.headers["content-type"].startswith("text/csv")
    assert 'filename="alpes-report-2026-12-01-2026-12-05.csv"' in answer.headers["content-disposition"]
    assert answer.text.splitlines()[0].startswith("dia,campana_id,afiliado_id,moneda,clicks")
    assert client.get("/anunciante/reportes", params={"desde": "nope"}).status_code == 422


# -- "Edit terms" (marketing PUT /campanas/{id}) ---------------------------------------------------------
def test_the_terms_form_sends_only_what_was_changed_and_an_emptied_optional_term_as_null():
    campana = {**CAMPANA, "fecha_fin": "2027-03-01T12:30:00+00:00", "min_segundos_click_conversion": 5}
    values = pages.terms_form_values(campana)
    assert values == {"nombre": "Invierno", "presupuesto": "500.00", "fecha_fin": "2027-03-01",
                      "landing_url": "https://shop.example.com/i", "valor_maximo_conversion": "50.00",
                      "min_segundos_click_conversion": "5", "periodo_bloqueo_dias": "0"}
    assert pages.terms_body(values, campana) == {}  # untouched: the end keeps its 12:30
    changed = {**values, "nombre": "Invierno 2", "presupuesto": "", "fecha_fin": "2027-04-01",
               "valor_maximo_conversion": "40.00", "periodo_bloqueo_dias": "14"}
    assert pages.terms_body(changed, campana) == {"nombre": "Invierno 2", "presupuesto": None,
                                                  "fecha_fin": "2027-04-01T00:00:00Z",
                                                  "valor_maximo_conversion": "40.00", "periodo_bloqueo_dias": 14}
    # The landing page may be emptied here: the service refuses it with its own reason.
    assert pages.terms_body({**values, "landing_url": ""}, campana) == {"landing_url": None}
    for form, field in (({**values, "nombre": ""}, "nombre"),
                        ({**values, "periodo_bloqueo_dias": ""}, "periodo_bloqueo_dias"),
                        ({**values, "min_segundos_click_conversion": "soon"}, "min_segundos_click_conversion")):
        with pytest.raises(pages.FormProblem) as problem:
            pages.terms_body(form, campana)
        assert problem.value.field == field


def test_the_campaign_page_has_an_edit_terms_form_with_a_label_for_every_input(console, fake):
    app, client = console
    session = _signed_in(app, client)
    page = client.get("/anunciante/campanas/camp-1").text
    form = page[page.index('action="/anunciante/campanas/camp-1/terminos"'):]
    form = form[:form.index("</form>")]
    assert f'name="csrf_token" value="{session.csrf}"' in form
    inputs = re.findall(r'<input id="([^"]+)" name="([^"]+)"', form)
    assert [name for _, name in inputs] == list(pages.TERM_FIELDS)
    for input_id, _ in inputs:
        assert f'<label for="{input_id}">' in form
    assert 'value="500.00"' in form and 'value="https://shop.example.com/i"' in form
    assert "<button type=\"submit\">Save terms</button>" in form
    fake.answers[("GET", "marketing", "/campanas/camp-1")] = {**CAMPANA, "estado": "finalizada"}
    assert "/terminos" not in client.get("/anunciante/campanas/camp-1").text  # a finished campaign's terms stay


def test_saving_terms_puts_the_changed_ones_and_redirects_with_a_message(console, fake):
    app, client = console
    session = _signed_in(app, client)
    fake.answers[("PUT", "marketing", "/campanas/camp-1")] = {**CAMPANA, "presupuesto": "800.00"}
    typed = {**pages.terms_form_values(CAMPANA), "presupuesto": "800.00", "valor_maximo_conversion": ""}
    answer = client.post("/anunciante/campanas/camp-1/terminos", data={"csrf_token": session.csrf, **typed})
    assert answer.status_code == 303 and answer.headers["location"] == "/anunciante/campanas/camp-1"
    assert fake.sent("PUT", "marketing", "/campanas/camp-1") == [{"presupuesto": "800.00",
                                                                   "valor_maximo_conversion": None}]
    assert "Terms saved: budget, maximum conversion value" in client.get("/anunciante/campanas/camp-1").text
    # Nothing changed: nothing sent.
    answer = client.post("/anunciante/campanas/camp-1/terminos",
                         data={"csrf_token": session.csrf, **pages.terms_form_values(CAMPANA)})
    assert answer.status_code == 303 and len(fake.sent("PUT", "marketing", "/campanas/camp-1")) == 1
    assert "No term changed." in client.get("/anunciante/campanas/camp-1").text
    # A forged token: refused, nothing sent.
    assert client.post("/anunciante/campanas/camp-1/terminos",
                       data={"csrf_token": "forged", **typed}).status_code == 403
    assert len(fake.sent("PUT", "marketing", "/campanas/camp-1")) == 1


@pytest.mark.parametrize("status, field, reason", [
    (409, "presupuesto", "below what the campaign has already spent (40.00 EUR)"),
    (422, "landing_url", "host evil.example is not one of the advertiser's registered domains"),
])
def test_refused_terms_show_the_services_reason_and_keep_what_was_typed(console, fake, status, field, reason):
    app, client = console
    session = _signed_in(app, client)
    fake.answers[("PUT", "marketing", "/campanas/camp-1")] = ServiceError(
        "marketing", status, reason, [{"field": field, "reason": reason}])
    typed = {**pages.terms_form_values(CAMPANA), "nombre": "Otro nombre", "presupuesto": "10.00",
             "landing_url": "https://evil.example/x"}
    answer = client.post("/anunciante/campanas/camp-1/terminos", data={"csrf_token": session.csrf, **typed})
    assert answer.status_code == status
    html = unescape(answer.text)
    assert reason in html and f"Not done ({status})" in html
    assert re.search(rf'id="f-{field}"[^>]*aria-invalid="true"', answer.text)
    assert 'value="Otro nombre"' in answer.text and 'value="10.00"' in answer.text
    assert 'value="https://evil.example/x"' in answer.text
    # A form the console can judge itself never reaches the service.
    calls = len(fake.sent("PUT", "marketing", "/campanas/camp-1"))
    answer = client.post("/anunciante/campanas/camp-1/terminos",
                         data={"csrf_token": session.csrf, **{**typed, "periodo_bloqueo_dias": "a week"}})
    assert answer.status_code == 422 and "must be a whole number" in answer.text
    assert 'value="a week"' in answer.text and len(fake.sent("PUT", "marketing", "/campanas/camp-1")) == calls
