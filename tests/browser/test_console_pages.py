"""Every main page of the console, as each role opens it: it answers 200 with one h1, every form
control has a label, the first Tab stop is the skip link, no JavaScript error; a screenshot of each
goes to test-output/screenshots, and the time each took is printed (measured, not asserted)."""

from __future__ import annotations

import pytest
from playwright.sync_api import expect

from .conftest import screenshot

pytestmark = pytest.mark.browser

PAGES = {
    "operator": ["/operador", "/operador/topicos", "/operador/auditoria", "/operador/claves", "/eventos"],
    "advertiser": ["/anunciante", "/anunciante/campanas", "/anunciante/campanas/{campana}", "/anunciante/afiliados",
                   "/anunciante/conversiones", "/anunciante/revision", "/anunciante/pagos", "/anunciante/reportes",
                   "/eventos"],
    "ana": ["/afiliado"],
}

# Form controls a user fills in or picks, without a <label> or an aria-label/aria-labelledby.
_UNLABELLED = """() => [...document.querySelectorAll('input:not([type=hidden]), select, textarea')]
    .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label') && !e.getAttribute('aria-labelledby'))
    .map(e => e.outerHTML.slice(0, 120))"""
# The server's part (request sent to first byte) and the whole page (to the load event), in ms.
_TIMING = """() => { const t = performance.getEntriesByType('navigation')[0];
    return [t.responseStart - t.requestStart, t.loadEventEnd - t.startTime]; }"""


@pytest.mark.parametrize("role", list(PAGES))
def test_every_main_page_renders_accessibly_without_script_errors(console, world, role):
    page = console.sign_in(world.keys[role])
    timings = []
    for path in PAGES[role]:
        path = path.format(campana=world.campana_id)
        response = page.goto(path)
        assert response.status == 200, f"{path}: {response.status}"
        expect(page.locator("h1")).to_have_count(1)
        assert page.evaluate(_UNLABELLED) == [], f"{path}: form controls without a label"
        page.locator("body").focus()
        page.keyboard.press("Tab")
        assert page.evaluate("document.activeElement.textContent.trim()") == "Skip to content", path
        page.wait_for_load_state("load")
        server, whole = page.evaluate(_TIMING)
        timings.append(f"{path} {server:.0f}/{whole:.0f} ms")
        screenshot(page, f"{role}{path.replace('/', '-').replace(world.campana_id, 'invierno')}")
    print(f"\n{role} (server/whole page): " + ", ".join(timings))
