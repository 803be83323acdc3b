"""An advertiser's day in the console, in a browser: it creates a campaign with a commission rule,
sets its budget and enrols an affiliate; a visitor's click on the tracking link and the shop's
postback (both over HTTP, not through the console) appear on its report chart and in its live event
stream within seconds; a conversion held for review is approved from the review queue with the
keyboard; the affiliate's payout is created and paid; the report is downloaded as CSV."""

from __future__ import annotations

import csv
import io
import re
import time
import uuid
from decimal import Decimal

import pytest
from harness import wait_until
from playwright.sync_api import expect

from .conftest import nav, screenshot, submit

pytestmark = pytest.mark.browser

FEW_SECONDS = 15_000  # ms: a click or postback reaches the report and the live stream well within this


def _chart_total(page, canvas_id: str, series: str) -> float:
    """The sum of one series of a chart as Chart.js draws it (not the page's HTML table)."""
    return page.evaluate("""([id, label]) => {
        const chart = window.Chart && window.Chart.getChart(document.getElementById(id));
        if (!chart) return -1;
        const set = chart.data.datasets.find(d => d.label === label);
        return set ? set.data.reduce((a, b) => a + (b || 0), 0) : -1;
    }""", [canvas_id, series])


def _chart_data(page, canvas_id: str) -> object:
    """What the chart draws, for a failure's message."""
    return page.evaluate("""id => {
        const chart = window.Chart && window.Chart.getChart(document.getElementById(id));
        return chart ? {labels: chart.data.labels, sets: chart.data.datasets.map(d => [d.label, d.data])} : null;
    }""", canvas_id)


def test_an_advertiser_runs_a_campaign_from_creation_to_payout(console, world, browser_errors):
    name = f"Verano {uuid.uuid4().hex[:6]}"
    page = console.sign_in(world.keys["advertiser"])
    expect(page.get_by_role("heading", level=1)).to_be_visible()
    screenshot(page, "anunciante-inicio")

    # A campaign: 10 % by default, held for review above 500.00, no lock period, active at once.
    nav(page, "Campaigns")
    page.get_by_label("Name").fill(name)
    page.get_by_label("Commission (% of the sale)").fill("10")
    page.get_by_label("Landing page URL (optional)").fill("https://shop.example.com/verano")
    page.get_by_label("Hold for review above (optional)").fill("500.00")
    page.get_by_label("Lock period before approval (days)").fill("0")
    page.get_by_label("Activate it now").check()
    assert submit(page, page.get_by_role("button", name="Create campaign")) == 200
    expect(page.get_by_role("heading", level=1)).to_contain_text(name)
    expect(page.get_by_role("heading", level=1)).to_contain_text("activa")
    campana_id = page.url.rsplit("/", 1)[1]

    # Its commission rule: CPS 12 % of every sale (version 1, in force from now).
    rule = page.get_by_role("group", name="Rule 1")
    rule.get_by_label("Kind").select_option("cps")
    rule.get_by_label("Amount or percentage").fill("12")
    rule.get_by_label("Conversion type").select_option("sale")
    assert submit(page, page.get_by_role("button", name="Save rules")) == 200
    expect(page.get_by_role("status").filter(has_text="version 1")).to_be_visible()
    reglas = world.api("advertiser", "GET", "marketing", f"/campanas/{campana_id}/reglas").json()
    assert (reglas["version"], [(r["tipo"], Decimal(r["porcentaje"])) for r in reglas["reglas"]]) == (1, [("cps", 12)])

    # Its terms edited: a budget of 1000.00.
    terms = page.locator("form[action$='/terminos']")
    terms.get_by_label("Budget (EUR, optional)").fill("1000.00")
    assert submit(page, terms.get_by_role("button", name="Save terms")) == 200
    expect(page.get_by_role("status").filter(has_text="Terms saved")).to_be_visible()
    campana = world.api("advertiser", "GET", "marketing", f"/campanas/{campana_id}").json()
    assert Decimal(campana["presupuesto"]) == Decimal("1000.00")

    # Ana enrolled: her tracking link is on the page.
    page.get_by_label("Affiliate", exact=True).select_option(world.afiliados["ana"])
    assert submit(page, page.get_by_role("button", name="Enrol")) == 200
    enrolled = page.locator("section[aria-labelledby=enrol-h] tbody tr", has_text="Ana Ruiz")
    link = enrolled.locator("td .copyable code").inner_text().strip()
    [inscripcion] = world.api("advertiser", "GET", "marketing", f"/campanas/{campana_id}/inscripciones").json()[
        "inscripciones"]
    code = inscripcion["link_code"]
    assert inscripcion["afiliado_id"] == world.afiliados["ana"]
    assert link == world.platform.url("conversiones") + f"/r/{code}"
    screenshot(page, "anunciante-campana")

    # The report (this campaign) and the live stream open in two tabs before anything happens.
    report = page.context.new_page()
    browser_errors.watch(report)
    report.goto(f"/anunciante/reportes?campana_id={campana_id}")
    wait_until(lambda: _chart_total(report, "chart-actividad", "Clicks") == 0, 10, what="the report's chart drawn")
    live = page.context.new_page()
    browser_errors.watch(live)
    live.goto("/eventos")
    expect(live.locator("#live-status")).to_contain_text("Connected")

    # A visitor follows the link; the shop posts the sale back. Neither goes through the console.
    sent = time.perf_counter()
    click_id = world.click(code)
    sale = world.postback(click_id, "80.00")
    stream = live.locator("#live-events")
    expect(stream.locator("li", has_text=f"ClicksRecorded · id {campana_id}")).to_be_visible(timeout=FEW_SECONDS)
    expect(stream.locator("li", has_text=f"ConversionDetected · id {sale['id']}")).to_be_visible(timeout=FEW_SECONDS)
    in_stream = time.perf_counter() - sent
    wait_until(lambda: _chart_total(report, "chart-actividad", "Clicks") == 1
               and _chart_total(report, "chart-actividad", "Conversions detected") == 1, FEW_SECONDS / 1000,
               what="the click and the conversion on the report's chart",
               diagnose=lambda: (_chart_data(report, "chart-actividad"),
                                 world.api("advertiser", "GET", "marketing", f"/reportes/campanas/{campana_id}").text))
    on_chart = time.perf_counter() - sent
    print(f"\nclick + postback: in the live stream after {in_stream:.1f} s, "
          f"on the report's chart after {on_chart:.1f} s")
    screenshot(live, "anunciante-eventos")
    screenshot(report, "anunciante-reportes")

    # A sale above 500.00 waits in the review queue; approved with the keyboard alone.
    big = world.postback(world.click(code), "900.00", order_id=f"grande-{uuid.uuid4().hex[:6]}")
    wait_until(lambda: world.api("advertiser", "GET", "conversiones", f"/conversiones/{big['id']}").json()["status"]
               == "on_hold", 30, what="the big sale held for review")
    nav(page, "Review queue")
    held = page.locator(f"#conv-{big['id']}")
    expect(held).to_contain_text("900.00")
    screenshot(page, "anunciante-revision")
    approve = held.get_by_role("button", name=re.compile("^Approve"))
    approve.focus()
    with page.expect_navigation():
        page.keyboard.press("Enter")
    expect(page.locator(f"#conv-{big['id']}")).to_have_count(0)

    # Ana's commissions: 12 % of 80.00 and of 900.00, approved after the (zero) lock period.
    def commissions() -> dict[str, dict]:
        found = world.api("advertiser", "GET", "marketing", "/comisiones",
                          params={"afiliado_id": world.afiliados["ana"]}).json()["comisiones"]
        return {c["conversion_id"]: c for c in found}

    mine = wait_until(lambda: (c := commissions()) and all(c.get(i, {}).get("estado") == "aprobada"
                                                            for i in (sale["id"], big["id"])) and c,
                      30, what="both commissions approved")
    assert (mine[sale["id"]]["monto"], mine[big["id"]]["monto"]) == ("9.60", "108.00")
    owed = sum(Decimal(c["monto"]) for c in mine.values() if c["estado"] == "aprobada" and not c["pago_id"])

    # The reviewed conversion's page: its events in order, the saga's steps, how its commission was computed.
    page.goto(f"/anunciante/conversiones/{big['id']}")
    expect(page.get_by_role("heading", level=1)).to_contain_text("validated")
    commission = page.locator("section[aria-labelledby=commission-h]")
    expect(commission).to_contain_text("108.00 EUR")
    expect(commission).to_contain_text("(CPS) of rules version 1")
    expect(page.locator("section[aria-labelledby=saga-h] ol.steps li").first).to_be_visible()
    events = page.locator("section[aria-labelledby=events-h] li strong").all_inner_texts()
    types = [e.split(". ", 1)[1] for e in events]
    assert types[:3] == ["ConversionDetected", "ConversionHeld", "ConversionValidated"], types
    screenshot(page, "anunciante-conversion")

    # Her payout: created and paid from the payouts page.
    nav(page, "Payouts")
    page.get_by_label("For").select_option(world.afiliados["ana"])
    assert submit(page, page.get_by_role("button", name="Create payouts")) == 200
    pay = page.get_by_role("button", name=f"Pay {owed} EUR to Ana Ruiz")
    expect(pay).to_be_visible()
    assert submit(page, pay) == 200
    [pago] = [p for p in world.api("advertiser", "GET", "marketing", "/pagos").json()["pagos"]
              if p["afiliado_id"] == world.afiliados["ana"]]
    assert (pago["estado"], Decimal(pago["monto"])) == ("pagado", owed)
    row = page.locator("tbody tr", has_text=pago["id"][:8])
    expect(row).to_contain_text("pagado")
    screenshot(page, "anunciante-pagos")
    page.goto(f"/anunciante/campanas/{campana_id}")  # what the campaign's commissions used of its budget
    expect(page.locator("dt:text-is('Budget used') + dd")).to_contain_text("117.60")
    report.reload()  # the day's figures, the page a brand manager opens first: documented
    expect(report.locator("section[aria-labelledby=totals-h] tbody")).to_contain_text("980.00")
    screenshot(report, "anunciante", documented=True)
    # The same figures as CSV, downloaded from the page: one line for Ana in this campaign today.
    with report.expect_download() as download:
        report.get_by_role("link", name="Download CSV").click()
    rows = list(csv.DictReader(io.StringIO(download.value.path().read_text(encoding="utf-8"))))
    assert [(r["campana_id"], r["afiliado_id"], r["clicks"], r["ingresos"]) for r in rows] == [
        (campana_id, world.afiliados["ana"], "2", "980.00")], rows
