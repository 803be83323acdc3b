"""The affiliate portal in a browser (at a phone's width): each affiliate sees its own programs,
tracking link (copied with one click), conversions and commission, and nothing of the other
affiliate's, nor any customer's data."""

from __future__ import annotations

import pytest
from playwright.sync_api import expect

from .conftest import PHONE, copied, screenshot

pytestmark = pytest.mark.browser


@pytest.mark.parametrize(("me", "other"), [("ana", "beto"), ("beto", "ana")])
def test_an_affiliate_sees_its_own_commission_and_link_and_nothing_of_the_other(console, world, me, other):
    page = console.sign_in(world.keys[me], viewport=PHONE)
    assert page.url == world.console_url + "/afiliado"
    expect(page.get_by_role("heading", level=1)).to_have_text("My programs and earnings")
    mine, theirs = world.comisiones[me], world.comisiones[other]
    row = page.locator(f'#commissions tr[data-commission="{mine["id"]}"]')
    expect(row).to_contain_text(f"{mine['monto']} EUR")
    expect(row).to_contain_text("Invierno")
    expect(page.locator(f'#commissions tr[data-commission="{theirs["id"]}"]')).to_have_count(0)
    html = page.content()
    names = {"ana": "Ana Ruiz", "beto": "Beto Vidal"}
    for secret in (theirs["id"], theirs["conversion_id"], world.afiliados[other], names[other],
                   world.links[other], world.clientes[me], world.clientes[other]):
        assert secret not in html, f"{me}'s portal shows {secret!r}"
    assert f"{theirs['monto']} EUR" not in html or theirs["monto"] == mine["monto"]

    # Its tracking link in Invierno, one click to copy.
    program = page.locator(f'#programs tr[data-campaign="{world.campana_id}"]')
    link = world.platform.url("conversiones") + f"/r/{world.links[me]}"
    expect(program.locator(".copyable code")).to_have_text(link)
    # Without horizontal scrolling at a phone's width (tables scroll inside their own box).
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    screenshot(page, "afiliado" if me == "ana" else "afiliado-beto", documented=me == "ana")
    assert copied(page, program.get_by_role("button", name="Copy link")) == link
