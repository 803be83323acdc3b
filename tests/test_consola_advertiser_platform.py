"""The advertiser's console pages against a whole platform (`alpes up` with ALPES_AUTH=required, the
console process included), driven over HTTP as a browser without JavaScript would: sign in with a
key, post the pages' forms with their CSRF token, follow the redirects. What the pages did is then
checked on the services' own APIs, and what the services hold on the pages.

One platform for the module: an operator key, advertiser "Tienda" with its key (the user of the
pages) and a second advertiser "Otra" (tenancy). Page render times are measured and printed."""

from __future__ import annotations

import json
import re
import time
import uuid
from html import unescape
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from harness import Platform, wait_until

_TOKEN = re.compile(r'name="csrf_token" value="([^"]+)"')


class Browser:
    """A cookie jar and the CSRF token of the last page: what a browser without JavaScript has."""

    def __init__(self, console_url: str) -> None:
        self.http = httpx.Client(base_url=console_url, follow_redirects=False, timeout=30)
        self.token = ""
        self.timings: dict[str, float] = {}

    def get(self, path: str, **params) -> httpx.Response:
        started = time.perf_counter()
        answer = self.http.get(path, params=params or None)
        self.timings[path.split("?")[0]] = max(self.timings.get(path.split("?")[0], 0.0),
                                               time.perf_counter() - started)
        found = _TOKEN.search(answer.text)
        if found:
            self.token = unescape(found.group(1))
        return answer

    def post(self, path: str, **fields: str) -> httpx.Response:
        return self.http.post(path, data={"csrf_token": self.token, **fields})

    def sign_in(self, key: str) -> httpx.Response:
        self.get("/entrar")
        answer = self.post("/entrar", clave=key)
        assert answer.status_code == 303, answer.text
        return answer


@pytest.fixture(scope="module")
def platform(tmp_path_factory):
    platform = Platform(tmp_path_factory.mktemp("consola-adv") / "alpes", env={
        "ALPES_AUTH": "required", "ALPES_APPROVAL_INTERVAL_SECONDS": "1", "ALPES_PAYOUT_THRESHOLD": "1.00",
        "ALPES_PAYOUT_INTERVAL_SECONDS": "86400"})
    platform.start()
    try:
        operator = platform.create_key("operator", "--name", "console tests")
        platform.authenticate(operator)
        platform.keys = {"operator": operator}
        for name, domain in (("tienda", "shop.example.com"), ("otra", "otra.example.com")):
            answer = platform.post("marketing", "/anunciantes", {"nombre": name.capitalize(), "dominios": [domain]})
            assert answer.status_code == 201, answer.text
            anunciante = answer.json()["id"]
            key = platform.http.post(platform.url("marketing") + "/claves", json={
                "rol": "advertiser", "anunciante_id": anunciante, "nombre": name}).json()["key"]
            platform.wait_key_known(key)
            platform.keys[name] = key
        yield platform
    finally:
        platform.close()


def api(platform, key: str, method: str, service: str, path: str, **kwargs) -> httpx.Response:
    return platform.http.request(method, platform.url(service) + path, headers={"Authorization": f"Bearer {key}"},
                                 **kwargs)


def test_an_advertiser_runs_a_campaign_from_the_console(platform):
    """Create a campaign with a rule, register and enrol an affiliate, review a held conversion, pay the
    payout and see it all in the reports: each step through the pages, checked on the services."""
    tienda = platform.keys["tienda"]
    browser = Browser(platform.console_url)
    assert browser.sign_in(tienda).headers["location"] == "/anunciante"
    assert browser.get("/anunciante").status_code == 200

    # A refused campaign: the service's reason on the page, what was typed kept, nothing created.
    browser.get("/anunciante/campanas")
    refused = browser.post("/anunciante/campanas", nombre="Invierno", porcentaje_comision="150", moneda="EUR")
    assert refused.status_code == 422 and "porcentaje_comision" in refused.text and 'value="Invierno"' in refused.text
    assert api(platform, tienda, "GET", "marketing", "/campanas").json()["campanas"] == []

    created = browser.post("/anunciante/campanas", nombre="Invierno", porcentaje_comision="10", moneda="EUR",
                           landing_url="https://shop.example.com/invierno", valor_maximo_conversion="50.00",
                           periodo_bloqueo_dias="0", ventana_atribucion_dias="30", activar="on")
    assert created.status_code == 303, created.text
    campana_id = created.headers["location"].rsplit("/", 1)[1]
    campana = api(platform, tienda, "GET", "marketing", f"/campanas/{campana_id}").json()
    assert (campana["nombre"], campana["estado"], campana["valor_maximo_conversion"]) == ("Invierno", "activa", "50.00")
    page = browser.get(f"/anunciante/campanas/{campana_id}")
    assert page.status_code == 200 and "Campaign “Invierno” created" in page.text

    # The rules editor: a CPA rule of 5.00 becomes version 1; a CPA rule without its amount is refused.
    assert browser.post(f"/anunciante/campanas/{campana_id}/reglas", **{
        "regla-0-tipo": "cpa", "regla-0-valor": ""}).status_code == 422
    assert browser.post(f"/anunciante/campanas/{campana_id}/reglas", **{
        "regla-0-tipo": "cpa", "regla-0-valor": "5.00", "regla-1-tipo": ""}).status_code == 303
    reglas = api(platform, tienda, "GET", "marketing", f"/campanas/{campana_id}/reglas").json()
    assert reglas["version"] == 1 and [(r["tipo"], r["monto"]) for r in reglas["reglas"]] == [("cpa", "5.00")]
    assert "version 1" in browser.get(f"/anunciante/campanas/{campana_id}").text
    assert "0 (flat percentage)" in browser.get(f"/anunciante/campanas/{campana_id}", version="0").text

    # Register an affiliate, then enrol it once the platform has validated it.
    browser.get("/anunciante/afiliados")
    assert browser.post("/anunciante/afiliados", nombre="Ana Ruiz", email="ana@example.com",
                        user_id="ana").status_code == 303
    [afiliado] = api(platform, tienda, "GET", "afiliados", "/afiliados").json()["afiliados"]
    wait_until(lambda: api(platform, tienda, "GET", "afiliados", f"/afiliados/{afiliado['id']}").json()["estado"]
               == "validado", 60, what="affiliate validated", diagnose=platform.diagnostics)
    browser.get(f"/anunciante/campanas/{campana_id}")
    wait_until(lambda: browser.post(f"/anunciante/campanas/{campana_id}/inscripciones",
                                    afiliado_id=afiliado["id"]).status_code == 303, 60,
               what="enrolled through the console", diagnose=platform.diagnostics)
    [inscripcion] = api(platform, tienda, "GET", "marketing", f"/campanas/{campana_id}/inscripciones").json()[
        "inscripciones"]
    assert inscripcion["link_code"] in browser.get(f"/anunciante/campanas/{campana_id}").text

    # A visitor clicks, the shop reports two sales above the campaign's maximum: both held for review.
    held = []
    for order in ("o-approve", "o-reject"):
        click = wait_until(lambda: (r := httpx.get(platform.url("conversiones") + f"/r/{inscripcion['link_code']}",
                                                   follow_redirects=False)).status_code == 302 and r, 30,
                           what="the tracking link redirects")
        [click_id] = parse_qs(urlsplit(click.headers["location"]).query)["alpes_click_id"]
        answer = api(platform, tienda, "POST", "conversiones", "/conversiones", json={
            "click_id": click_id, "user_id": f"c-{uuid.uuid4().hex[:6]}", "conversion_value": "80.00",
            "conversion_type": "sale", "order_id": order})
        assert answer.status_code == 200 and answer.json()["status"] == "on_hold", answer.text
        held.append(answer.json()["id"])
    queue = browser.get("/anunciante/revision")
    assert queue.status_code == 200 and all(f"/anunciante/conversiones/{c}" in queue.text for c in held)
    assert 'aria-label="Approve conversion o-approve"' in queue.text

    assert browser.post(f"/anunciante/revision/{held[0]}/aprobar").status_code == 303
    assert browser.post(f"/anunciante/revision/{held[1]}/rechazar", motivo="").status_code == 422  # no reason
    assert browser.post(f"/anunciante/revision/{held[1]}/rechazar", motivo="duplicate order").status_code == 303
    statuses = {c: api(platform, tienda, "GET", "conversiones", f"/conversiones/{c}").json() for c in held}
    assert statuses[held[0]]["status"] == "validated"
    assert statuses[held[1]]["status"] == "rejected" and "duplicate order" in statuses[held[1]]["reason"]
    again = browser.post(f"/anunciante/revision/{held[0]}/aprobar")  # decided already: 409 on the queue
    assert again.status_code == 409 and "Review queue" in again.text

    listed = browser.get("/anunciante/conversiones").text
    assert "o-approve" in listed and "o-reject" in listed and "duplicate order" in listed
    assert "o-reject" not in browser.get("/anunciante/conversiones", status="validated").text

    # The approved conversion's page: its events, its saga and its commission (rule r1 of version 1).
    wait_until(lambda: "r1 (CPA) of rules version 1" in browser.get(f"/anunciante/conversiones/{held[0]}").text, 60,
               what="the commission explained on the conversion's page", diagnose=platform.diagnostics)
    story = browser.get(f"/anunciante/conversiones/{held[0]}").text
    assert "ConversionDetected" in story and "ConversionValidated" in story and "5.00 EUR" in story

    # The payout: created once the commission is approved (lock period 0), then paid.
    def payout_created() -> list:
        browser.get("/anunciante/pagos")
        browser.post("/anunciante/pagos")
        return api(platform, tienda, "GET", "marketing", "/pagos").json()["pagos"]
    [pago] = wait_until(payout_created, 60, what="a payout", diagnose=platform.diagnostics)
    assert (pago["monto"], pago["estado"]) == ("5.00", "pendiente")
    assert browser.post(f"/anunciante/pagos/{pago['id']}/pagar").status_code == 303
    assert api(platform, tienda, "GET", "marketing", f"/pagos/{pago['id']}").json()["estado"] == "pagado"
    detail = browser.get(f"/anunciante/pagos/{pago['id']}").text
    assert "pagado" in detail and "comision" in detail

    # Reports: the two clicks and two conversions on the chart data, the commission in the CSV.
    def charted() -> dict:
        charts = browser.get("/anunciante/reportes/datos").json()["charts"]
        series = {s["label"]: sum(s["data"]) for s in charts["chart-actividad"]["series"]}
        return series if series["Clicks"] == 2 and series["Conversions detected"] == 2 else {}
    assert wait_until(charted, 60, what="the clicks charted")["Conversions validated"] == 1
    page = browser.get("/anunciante/reportes").text
    embedded = json.loads(unescape(re.search(r'id="chart-comisiones-data">(.*?)</script>', page, re.S).group(1)))
    assert embedded["series"][0]["label"] == "Commissions EUR" and "5.00" in embedded["series"][0]["data"]
    rows = browser.get("/anunciante/reportes.csv").text.splitlines()
    assert rows[0].startswith("dia,campana_id,afiliado_id,moneda,clicks") and any(afiliado["id"] in r for r in rows[1:])

    # The campaign's budget used and its state changes.
    assert browser.post(f"/anunciante/campanas/{campana_id}/estado", accion="pausar").status_code == 303
    assert api(platform, tienda, "GET", "marketing", f"/campanas/{campana_id}").json()["estado"] == "pausada"
    assert browser.post(f"/anunciante/campanas/{campana_id}/estado", accion="pausar").status_code == 409

    # Another advertiser sees none of it: its pages are empty and the campaign's page is 404.
    otra = Browser(platform.console_url)
    otra.sign_in(platform.keys["otra"])
    assert otra.get(f"/anunciante/campanas/{campana_id}").status_code == 404
    assert otra.get(f"/anunciante/conversiones/{held[0]}").status_code == 404
    assert "Invierno" not in otra.get("/anunciante/campanas").text
    assert held[1] not in otra.get("/anunciante/revision").text
    assert otra.get("/anunciante/reportes/datos").json()["charts"]["chart-actividad"]["series"][0]["data"].count(0) \
        == 30

    # Render times with this data, measured (the console's budget is 300 ms a page).
    for path in ("/anunciante", "/anunciante/campanas", f"/anunciante/campanas/{campana_id}", "/anunciante/afiliados",
                 "/anunciante/revision", f"/anunciante/conversiones/{held[0]}", "/anunciante/pagos",
                 "/anunciante/reportes"):
        browser.get(path)
    print("\nconsole page render times (slowest of each path, ms):")
    for path, seconds in sorted(browser.timings.items()):
        print(f"  {path:60s} {seconds * 1000:7.1f}")


def test_a_forged_form_does_nothing_and_a_signed_out_visitor_is_sent_to_sign_in(platform):
    tienda = platform.keys["tienda"]
    browser = Browser(platform.console_url)
    browser.sign_in(tienda)
    browser.get("/anunciante/campanas")
    browser.token = "forged"
    answer = browser.post("/anunciante/campanas", nombre="Forjada", porcentaje_comision="10")
    assert answer.status_code == 403
    assert "Forjada" not in json.dumps(api(platform, tienda, "GET", "marketing", "/campanas").json())
    signed_out = Browser(platform.console_url)
    assert signed_out.get("/anunciante/pagos").status_code == 303


def test_an_advertiser_edits_a_running_campaigns_terms_and_the_platform_applies_them(platform):
    """"Edit terms" on the campaign's page: a refused landing page shows marketing's reason with what
    was typed kept and changes nothing; then a lowered maximum conversion value and a new name are
    saved, and through the broker conversiones holds an 80.00 sale it validated before
    (value_above_maximum), afiliados' catalogue shows the new name and auditoria the change."""
    tienda = platform.keys["tienda"]
    campana = api(platform, tienda, "POST", "marketing", "/campanas", json={
        "nombre": "Primavera", "porcentaje_comision": "10", "landing_url": "https://shop.example.com/primavera",
        "valor_maximo_conversion": "500.00", "presupuesto": "100.00"}).json()
    afiliado = api(platform, tienda, "POST", "afiliados", "/afiliados", json={
        "nombre": "Bea", "email": f"bea-{uuid.uuid4().hex[:6]}@example.com", "user_id": f"bea-{uuid.uuid4().hex[:6]}"}
    ).json()

    def postback(value: str, *, campaign_known: bool = True) -> dict:
        answer = api(platform, tienda, "POST", "conversiones", "/conversiones", json={
            "affiliate_id": afiliado["id"], "campaign_id": campana["id"], "user_id": "c-terms",
            "conversion_value": value, "conversion_type": "sale", "order_id": f"o-{uuid.uuid4().hex[:8]}"})
        if not campaign_known and answer.status_code == 403:  # conversiones has not learnt the campaign's owner yet
            return {"status": None}
        assert answer.status_code == 200, answer.text
        return api(platform, tienda, "GET", "conversiones", f"/conversiones/{answer.json()['id']}").json()

    wait_until(lambda: postback("80.00", campaign_known=False)["status"] == "validated", 60, what="80.00 validated under a 500.00 maximum",
               diagnose=platform.diagnostics)

    browser = Browser(platform.console_url)
    browser.sign_in(tienda)
    page = browser.get(f"/anunciante/campanas/{campana['id']}")
    assert page.status_code == 200 and f'action="/anunciante/campanas/{campana["id"]}/terminos"' in page.text
    terms = {"nombre": "Primavera", "presupuesto": "100.00", "fecha_fin": "", "landing_url":
             "https://shop.example.com/primavera", "valor_maximo_conversion": "500.00",
             "min_segundos_click_conversion": "", "periodo_bloqueo_dias": "30"}
    refused = browser.post(f"/anunciante/campanas/{campana['id']}/terminos", **{
        **terms, "nombre": "Rebajas", "landing_url": "https://evil.example.com/"})
    assert refused.status_code == 422 and "registered domains" in unescape(refused.text)
    assert 'value="Rebajas"' in refused.text and 'value="https://evil.example.com/"' in refused.text
    assert api(platform, tienda, "GET", "marketing", f"/campanas/{campana['id']}").json()["nombre"] == "Primavera"

    # Another advertiser posting the form for this campaign: 404, nothing changed.
    otra = Browser(platform.console_url)
    otra.sign_in(platform.keys["otra"])
    otra.get("/anunciante/campanas")
    assert otra.post(f"/anunciante/campanas/{campana['id']}/terminos", **{**terms, "nombre": "Hijacked"}
                     ).status_code == 404

    saved = browser.post(f"/anunciante/campanas/{campana['id']}/terminos", **{
        **terms, "nombre": "Rebajas", "valor_maximo_conversion": "50.00"})
    assert saved.status_code == 303, saved.text
    after = api(platform, tienda, "GET", "marketing", f"/campanas/{campana['id']}").json()
    assert (after["nombre"], after["valor_maximo_conversion"], after["presupuesto"]) == ("Rebajas", "50.00", "100.00")
    shown = browser.get(f"/anunciante/campanas/{campana['id']}").text
    assert "Terms saved: name, maximum conversion value" in shown and "<h1>Rebajas" in shown

    started = time.perf_counter()
    held = wait_until(lambda: (c := postback("80.00"))["status"] == "on_hold" and c, 60,
                      what="conversiones applies the lowered maximum", diagnose=platform.diagnostics)
    print(f"\nlowered maximum applied by conversiones within {time.perf_counter() - started:.2f} s of the save")
    assert held["reason"] == "value_above_maximum"
    assert postback("40.00")["status"] == "validated"
    wait_until(lambda: [p["nombre"] for p in api(platform, tienda, "GET", "afiliados", "/programas").json()["programas"]
                        if p["id"] == campana["id"]] == ["Rebajas"], 30, what="afiliados' catalogue renamed")
    wait_until(lambda: "CampanaActualizada" in [e["event_type"] for e in api(
        platform, tienda, "GET", "auditoria", "/auditoria/eventos", params={"aggregate_id": campana["id"]}
    ).json()["eventos"]], 30, what="the change audited, shown to its advertiser")
