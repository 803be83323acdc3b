"""The protected local mode in the console: on a fresh local platform (no key yet, loopback only)
the sign-in page says so and lets whoever is at the machine in as the operator, without a key."""

from __future__ import annotations

import pytest
from harness import Platform
from playwright.sync_api import expect

from .conftest import Console, screenshot, submit

pytestmark = pytest.mark.browser


def test_a_fresh_local_platform_signs_in_as_operator_without_a_key_and_says_so(chromium, browser_errors,
                                                                               tmp_path_factory):
    # The defaults (whatever the shell says): loopback, ALPES_AUTH=auto, no key: the protected local mode.
    with Platform(tmp_path_factory.mktemp("local") / "alpes", env={"ALPES_AUTH": "auto", "ALPES_HOST": "127.0.0.1"}) \
            as platform:
        console = Console(platform.console_url, chromium, browser_errors)
        try:
            page = console.page()
            page.goto("/entrar")
            notice = page.locator("section", has=page.get_by_role("heading", name="Protected local mode"))
            expect(notice).to_contain_text("acts as the operator")
            screenshot(page, "entrar-modo-local")
            assert submit(page, page.get_by_role("button", name="Enter as operator")) == 200
            assert page.url == platform.console_url + "/operador"
            expect(page.locator("header")).to_contain_text("protected local mode")
            expect(page.locator("#health-summary")).to_contain_text("4 of 4")
        finally:
            console.close()
    assert browser_errors.errors == [], "JavaScript errors in the browser:\n" + "\n".join(browser_errors.errors)
