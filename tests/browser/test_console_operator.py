"""The operator's pages in a browser: every service healthy, the topics with their partitions and
backlog, the audit chain verified, and a key created, used and revoked from the keys page."""

from __future__ import annotations

import re

import httpx
import pytest
from harness import wait_until
from playwright.sync_api import expect

from alpes.contract import SERVICES, TOPICS

from .conftest import PHONE, copied, nav, screenshot, submit

pytestmark = pytest.mark.browser


def test_the_operator_sees_every_service_healthy_and_each_topics_partitions_and_backlog(console, world):
    page = console.sign_in(world.keys["operator"])
    expect(page.get_by_role("heading", level=1)).to_have_text("Platform health")
    expect(page.locator("#health-summary")).to_contain_text(f"{len(SERVICES)} of {len(SERVICES)}")
    for service in SERVICES:
        row = page.locator(f'#instances tr[data-service="{service}"]')
        expect(row.locator("td").first).to_have_text("ok")
        expect(row.locator("td").nth(1)).to_have_text("ok")  # its database
        expect(row.locator("td").nth(2)).to_have_text("ok")  # the broker
    screenshot(page, "operador", documented=True)

    nav(page, "Topics")
    expect(page.get_by_role("heading", level=1)).to_have_text("Topics and subscriptions")
    for topic, partitions in TOPICS.items():
        expect(page.locator(f'section[data-topic="{topic}"]')).to_contain_text(f"{partitions} partitions")
    # conversiones.eventos as marketing reads it: the page shows the backlog marketing's /health counts.
    consumer = next(c for c in world.platform.get("marketing", "/health")["consumers"]
                    if (c["topic"], c["subscription"]) == ("conversiones.eventos", "marketing-consumer"))
    section = page.locator('section[data-topic="conversiones.eventos"]')
    cell = section.locator('tr[data-subscription="marketing-consumer"] .backlog')
    expect(cell).to_have_text(str(consumer["backlog"]["backlog"]))
    screenshot(page, "operador-topicos")


def test_the_operator_verifies_the_audit_chain(console, world):
    page = console.sign_in(world.keys["operator"])
    page.goto("/operador/auditoria")
    submit(page, page.get_by_role("button", name="Verify the chain now"))
    expect(page.locator("#verification")).to_contain_text("Chain intact")
    assert int(page.locator("#verification").inner_text().split(": ")[1].split()[0]) > 0
    # The log lists the world's events.
    expect(page.get_by_role("cell", name=re.compile("^AfiliadoRegistrado")).first).to_be_visible()
    screenshot(page, "operador-auditoria")


def test_the_operator_creates_a_key_shown_once_and_revokes_it(console, world):
    page = console.sign_in(world.keys["operator"], viewport=PHONE)  # and at a phone's width
    page.goto("/operador/claves")
    page.get_by_label("Role").select_option("affiliate")
    page.get_by_label("Affiliate (affiliate keys)").select_option(world.afiliados["beto"])
    page.get_by_label("Name").fill("beto phone")
    assert submit(page, page.get_by_role("button", name="Create key")) == 200
    shown = page.locator(".flash.secret")
    key = shown.locator("code").inner_text().strip()
    assert key.startswith("alpes_aff_"), key
    assert copied(page, shown.get_by_role("button", name="Copy")) == key
    key_id = key.split("_")[2]
    page.reload()  # shown once: gone from the page after it
    assert key not in page.content()

    def status() -> int:
        return httpx.get(world.platform.url("conversiones") + "/conversiones",
                         headers={"Authorization": f"Bearer {key}"}, timeout=10).status_code

    wait_until(lambda: status() == 200, 30, what="the new key accepted by conversiones")
    row = page.locator(f'#keys tr[data-key="{key_id}"]')
    expect(row).to_contain_text("beto phone")
    submit(page, row.get_by_role("button", name="Revoke"))
    expect(page.locator(f'#keys tr[data-key="{key_id}"]')).to_contain_text("revoked")
    wait_until(lambda: status() == 401, 10, what="the revoked key refused by conversiones")
    screenshot(page, "operador-claves-movil")


def test_the_live_stream_follows_only_what_its_filters_ask_for(console, world):
    page = console.sign_in(world.keys["operator"])
    page.goto("/eventos")
    page.get_by_label("Topic").select_option("conversiones.eventos")
    page.get_by_label("Event type").select_option("ConversionDetected")
    submit(page, page.get_by_role("button", name="Filter"))
    assert "event_type=ConversionDetected" in page.url and "topic=conversiones.eventos" in page.url
    expect(page.locator("#live-status")).to_contain_text("Connected")
    items = page.locator("#live-events li")
    before = items.count()
    sale = world.postback(world.click(world.links["beto"]), "20.00")
    expect(items.filter(has_text=f"ConversionDetected · id {sale['id']}")).to_have_count(1, timeout=15_000)
    # Its click, and the validation and commission that follow it, are other types: not listed.
    texts = items.all_inner_texts()
    assert len(texts) == before + 1 and all("conversiones.eventos · ConversionDetected" in t for t in texts), texts

    # By correlation id: the conversion's whole story, whatever the topic (the saga's events too).
    page.goto(f"/eventos?correlation_id={sale['id']}")
    expect(items.filter(has_text="ConversionValidated")).to_have_count(1, timeout=15_000)
    expect(items.filter(has_text="ComisionCalculada")).to_have_count(1, timeout=15_000)
    assert all(f"correlation {sale['id']}" in t for t in items.all_inner_texts())
