"""Signing in and out of the console in a browser, the session cookie, roles kept to their pages, and
forms whose CSRF token is forged, missing or stale refused with nothing done."""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import expect

from .conftest import fill_key, screenshot, submit

pytestmark = pytest.mark.browser

HOMES = {"operator": "/operador", "advertiser": "/anunciante", "ana": "/afiliado"}


@pytest.mark.parametrize("role", ["operator", "advertiser", "ana"])
def test_each_role_signs_in_to_its_home_with_a_session_cookie_only_and_signs_out(console, world, role):
    key = world.keys[role]
    page = console.sign_in(key)
    assert page.url == world.console_url + HOMES[role]
    expect(page.get_by_role("heading", level=1)).to_be_visible()
    # The browser holds one cookie: an opaque session id, HttpOnly, SameSite=Strict; never the key.
    [cookie] = page.context.cookies()
    assert (cookie["name"], cookie["httpOnly"], cookie["sameSite"], cookie["secure"]) == (
        "alpes_consola", True, "Strict", False)  # Secure only over https
    assert key not in cookie["value"] and len(cookie["value"]) >= 43  # 256 bits, url-safe base64
    assert key not in page.content()
    assert page.evaluate("document.cookie") == ""  # HttpOnly: out of the page scripts' reach

    status = submit(page, page.get_by_role("button", name="Sign out"))
    assert (status, page.url) == (200, world.console_url + "/entrar")
    # Signed out for good: the home page asks to sign in again, and the old session id is worth nothing.
    page.goto(HOMES[role])
    assert page.url == world.console_url + "/entrar?siguiente=" + HOMES[role]
    page.context.add_cookies([{"name": cookie["name"], "value": cookie["value"], "url": world.console_url}])
    page.goto(HOMES[role])
    assert page.url.startswith(world.console_url + "/entrar")


def test_a_wrong_key_is_refused_with_its_reason_and_no_session(console, world, browser_errors):
    page = console.page()
    page.goto("/entrar")
    with browser_errors.expecting(401):
        for key, reason in (("not-a-key", "not an AlpesPartner API key"),
                            # The right shape, an unknown key id: the services' own refusal.
                            (world.keys["advertiser"][:-4] + "AAAA", "Key refused")):
            page.get_by_label("API key").fill(key)
            status = submit(page, page.get_by_role("button", name="Sign in"))
            assert status == 401
            expect(page.get_by_role("alert")).to_contain_text(reason)
            assert page.url == world.console_url + "/entrar"
    page.goto("/anunciante")  # still signed out
    assert page.url.startswith(world.console_url + "/entrar")


def test_sign_in_returns_to_the_page_asked_for_but_never_off_the_console(console, world):
    page = console.page()
    page.goto("/eventos")
    assert page.url == world.console_url + "/entrar?siguiente=/eventos"
    fill_key(page, world.keys["advertiser"])
    page.wait_for_url(world.console_url + "/eventos")
    other = console.page()
    other.goto("/entrar?siguiente=//evil.example.com/x")
    fill_key(other, world.keys["advertiser"])
    other.wait_for_url(world.console_url + "/anunciante")


@pytest.mark.parametrize(("role", "path"), [("ana", "/operador"), ("ana", "/anunciante/campanas"),
                                            ("ana", "/eventos"), ("advertiser", "/operador/claves"),
                                            ("advertiser", "/afiliado")])
def test_a_role_is_kept_off_pages_that_are_not_for_it(console, world, browser_errors, role, path):
    page = console.sign_in(world.keys[role])
    with browser_errors.expecting(403):
        response = page.goto(path)
    assert response.status == 403
    expect(page.get_by_role("heading", level=1)).to_have_text("Not for your role")


def _sign_out_form_token(page):
    return page.locator('form[action="/salir"] input[name="csrf_token"]')


@pytest.mark.parametrize("tampering", ["forged", "missing"])
def test_a_form_with_a_forged_or_missing_csrf_token_is_refused_and_nothing_is_done(console, world, browser_errors,
                                                                                  tampering):
    page = console.sign_in(world.keys["advertiser"])
    token = _sign_out_form_token(page)
    if tampering == "forged":
        token.evaluate("input => input.value = 'x'.repeat(43)")
    else:
        token.evaluate("input => input.remove()")
    with browser_errors.expecting(403):
        status = submit(page, page.get_by_role("button", name="Sign out"))
    assert status == 403
    expect(page.get_by_role("heading", level=1)).to_have_text("Form expired or forged")
    page.goto("/anunciante")  # the sign-out was not done: the session is still signed in
    assert page.url == world.console_url + "/anunciante"


def test_a_form_from_an_earlier_session_is_refused_and_nothing_is_done(console, world, browser_errors):
    first = console.sign_in(world.keys["operator"])
    first.goto("/operador/claves")
    stale = first.context.new_page()  # the same browser: a second tab signs out and in again
    browser_errors.watch(stale)
    stale.goto("/operador")
    submit(stale, stale.get_by_role("button", name="Sign out"))
    fill_key(stale, world.keys["operator"])
    stale.wait_for_url(world.console_url + "/operador")
    # The first tab's form still carries the first session's token.
    name = "stale-form-key"
    form = first.locator('form[action="/operador/claves"]')
    form.get_by_label(re.compile("^Name", re.I)).fill(name)
    with browser_errors.expecting(403):
        status = submit(first, form.get_by_role("button"))
    assert status == 403
    expect(first.get_by_role("heading", level=1)).to_have_text("Form expired or forged")
    keys = world.api("operator", "GET", "marketing", "/claves").json()["claves"]
    assert name not in [k.get("nombre") for k in keys]
    screenshot(first, "csrf-refused")
