"""The console (alpes/consola) in a real browser: Debian's Chromium (/usr/bin/chromium, installed by
tools/test-services.sh) driven by Playwright for Python, which never downloads a browser of its own.

One platform for all the browser tests (`alpes up` with ALPES_AUTH=required, the console included)
with a small world made over the services' HTTP APIs: an advertiser, two affiliates it registered, a
campaign with a conversion for each of them, and a key per role. Each test signs in in a fresh browser
context (its own cookies); every page opened is watched for JavaScript errors, which fail the test.

Screenshots go to test-output/screenshots (ALPES_SCREENSHOTS_DIR to change it); with
ALPES_UPDATE_SCREENSHOTS=1 the one per role documented in the README is copied into docs/screenshots."""

from __future__ import annotations

import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from harness import Platform, wait_until
from playwright.sync_api import expect

CHROMIUM = Path(os.environ.get("ALPES_CHROMIUM", "/usr/bin/chromium"))
# As root Chromium needs --no-sandbox; on a closed network nothing may phone home (no background
# networking, component updates, sync or QUIC) and no first-run dialogs.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--disable-quic", "--no-first-run"]
REPO = Path(__file__).resolve().parents[2]
SCREENSHOTS = Path(os.environ.get("ALPES_SCREENSHOTS_DIR", REPO / "test-output" / "screenshots"))
DOC_SCREENSHOTS = REPO / "docs" / "screenshots"
UPDATE_DOC_SCREENSHOTS = os.environ.get("ALPES_UPDATE_SCREENSHOTS", "") == "1"
PHONE = {"width": 390, "height": 844}
DESKTOP = {"width": 1280, "height": 900}
# Chromium reports an HTTP error answer to a document or resource as a console error; a test that
# provokes one on purpose (a wrong key, a forged token) says which status it expects.
_HTTP_ERROR = re.compile(r"Failed to load resource: the server responded with a status of (\d{3})")


def _require_chromium() -> None:
    from conftest import REQUIRE_MARIADB  # CI's "every server must be there": fail instead of skipping

    if not CHROMIUM.exists():
        message = f"Chromium not found at {CHROMIUM} (tools/test-services.sh installs Debian's package)"
        if REQUIRE_MARIADB:
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="package")  # gone once tests/browser is done, not at the end of the suite
def chromium():
    _require_chromium()
    os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        # launch() gives every run a fresh temporary profile, removed when the browser closes.
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@dataclass
class World:
    """What the browser tests find on the platform, made through its HTTP APIs."""

    platform: Platform
    console_url: str
    keys: dict[str, str]  # operator, advertiser, ana, beto
    anunciante_id: str
    afiliados: dict[str, str]  # ana, beto -> id
    campana_id: str  # "Invierno": both enrolled, one conversion each
    links: dict[str, str]  # ana, beto -> link code in Invierno
    comisiones: dict[str, dict]  # ana, beto -> their commission in Invierno (as marketing shows it)
    clientes: dict[str, str] = field(default_factory=dict)  # ana, beto -> the customer id of their sale

    def api(self, role: str, method: str, service: str, path: str, **kwargs) -> httpx.Response:
        return self.platform.http.request(method, self.platform.url(service) + path,
                                          headers={"Authorization": f"Bearer {self.keys[role]}"}, **kwargs)

    def click(self, code: str) -> str:
        """A visitor follows a tracking link (GET /r/{code}, public); the click id the landing gets."""
        answer = wait_until(lambda: (r := httpx.get(self.platform.url("conversiones") + f"/r/{code}",
                                                    follow_redirects=False, timeout=30)).status_code == 302 and r,
                            30, what=f"tracking link {code} redirects")
        [click_id] = parse_qs(urlsplit(answer.headers["location"]).query)["alpes_click_id"]
        return click_id

    def postback(self, click_id: str, value: str, order_id: str | None = None) -> dict:
        """The advertiser's server reports a sale made through `click_id` (POST /conversiones)."""
        answer = self.api("advertiser", "POST", "conversiones", "/conversiones", json={
            "click_id": click_id, "user_id": f"cliente-{uuid.uuid4().hex[:8]}", "conversion_value": value,
            "conversion_type": "sale", "order_id": order_id or f"o-{uuid.uuid4().hex[:12]}"})
        assert answer.status_code == 200, answer.text
        return answer.json()


def _created(response: httpx.Response) -> dict:
    assert response.status_code in (200, 201), f"{response.request.method} {response.request.url}: {response.text}"
    return response.json()


@pytest.fixture(scope="package")  # gone once tests/browser is done, not at the end of the suite
def world(tmp_path_factory) -> Iterator[World]:
    _require_chromium()  # no platform for nothing
    platform = Platform(tmp_path_factory.mktemp("console") / "alpes", env={
        "ALPES_AUTH": "required", "ALPES_APPROVAL_INTERVAL_SECONDS": "1", "ALPES_PAYOUT_THRESHOLD": "1.00",
        "ALPES_PAYOUT_INTERVAL_SECONDS": "86400"})
    platform.start()
    try:
        diagnose = platform.diagnostics
        operator = platform.create_key("operator", "--name", "browser tests")
        keys = {"operator": operator}
        op = {"Authorization": f"Bearer {operator}"}

        def post(service: str, path: str, body: dict, headers: dict = op) -> dict:
            return _created(platform.http.post(platform.url(service) + path, json=body, headers=headers))

        anunciante = post("marketing", "/anunciantes", {"nombre": "Tienda Alpina", "dominios": ["shop.example.com"]})
        # Keys as a deployment makes them (`alpes keys create`), each known to every service when returned.
        keys["advertiser"] = platform.create_key("advertiser", "--advertiser", anunciante["id"], "--name", "tienda")
        adv = {"Authorization": f"Bearer {keys['advertiser']}"}
        afiliados = {}
        for name, full in (("ana", "Ana Ruiz"), ("beto", "Beto Vidal")):
            afiliados[name] = post("afiliados", "/afiliados", {"user_id": name, "email": f"{name}@example.com",
                                                               "nombre": full}, adv)["id"]
        campana = post("marketing", "/campanas", {
            "nombre": "Invierno", "porcentaje_comision": "10", "periodo_bloqueo_dias": 0,
            "landing_url": "https://shop.example.com/invierno"}, adv)["id"]
        links = {}
        for name, afiliado in afiliados.items():
            wait_until(lambda a=afiliado: platform.http.get(platform.url("afiliados") + f"/afiliados/{a}",
                                                             headers=op).json()["estado"] == "validado",
                       60, what=f"{name} validated", diagnose=diagnose)
            enrol = f"{platform.url('marketing')}/campanas/{campana}/inscripciones"
            links[name] = wait_until(
                lambda a=afiliado: (r := platform.http.post(enrol, json={"afiliado_id": a}, headers=adv))
                .status_code in (200, 201) and r.json()["link_code"], 60, what=f"{name} enrolled", diagnose=diagnose)
        for name, afiliado in afiliados.items():  # marketing knows them validated: they were enrolled
            keys[name] = platform.create_key("affiliate", "--affiliate", afiliado, "--name", name)
        built = World(platform, platform.console_url, keys, anunciante["id"], afiliados, campana, links, {})
        for name, value in (("ana", "123.40"), ("beto", "77.70")):
            posted = built.postback(built.click(links[name]), value)
            conversion = posted["id"]
            built.clientes[name] = built.api("advertiser", "GET", "conversiones", f"/conversiones/{conversion}").json()[
                "user_id"]
            [comision] = wait_until(lambda c=conversion: built.api("operator", "GET", "marketing", "/comisiones",
                                                                   params={"conversion_id": c}).json()["comisiones"],
                                    60, what=f"{name}'s commission", diagnose=diagnose)
            built.comisiones[name] = comision
        assert {name: c["monto"] for name, c in built.comisiones.items()} == {"ana": "12.34", "beto": "7.77"}
        yield built
    finally:
        platform.close()


class BrowserErrors:
    """JavaScript errors (uncaught exceptions, console.error, CSP violations) of every page of a test."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.expected_statuses: set[int] = set()

    def watch(self, page) -> None:
        page.on("console", lambda message: self._console(page, message))
        page.on("pageerror", lambda error: self.errors.append(f"{page.url}: uncaught {error}"))

    def _console(self, page, message) -> None:
        if message.type != "error":
            return
        status = _HTTP_ERROR.match(message.text)
        if status and int(status.group(1)) in self.expected_statuses:
            return
        self.errors.append(f"{page.url}: console.error {message.text}")

    @contextmanager
    def expecting(self, *statuses: int):
        """Inside: an error answer with one of `statuses` is what the test asked for, not a fault."""
        before = set(self.expected_statuses)
        self.expected_statuses.update(statuses)
        try:
            yield
        finally:
            self.expected_statuses = before


@dataclass
class Console:
    """Opens signed-in pages of the console in fresh browser contexts."""

    url: str
    browser: object
    errors: BrowserErrors
    contexts: list = field(default_factory=list)

    def page(self, viewport: dict = DESKTOP):
        context = self.browser.new_context(viewport=viewport, base_url=self.url)
        context.set_default_timeout(10_000)
        # The copy buttons write to the clipboard; the tests read it back.
        context.grant_permissions(["clipboard-read", "clipboard-write"], origin=self.url)
        self.contexts.append(context)
        page = context.new_page()
        self.errors.watch(page)
        page.on("dialog", lambda dialog: dialog.accept())  # "Revoke key …?": the user says yes
        return page

    def sign_in(self, key: str, viewport: dict = DESKTOP):
        """A new context signed in with `key` through the sign-in form; the page it lands on."""
        page = self.page(viewport)
        page.goto("/entrar")
        fill_key(page, key)
        page.wait_for_url(lambda url: "/entrar" not in url)
        return page

    def close(self) -> None:
        for context in self.contexts:
            context.close()


def fill_key(page, key: str) -> None:
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Sign in").click()


@pytest.fixture
def browser_errors() -> BrowserErrors:
    return BrowserErrors()


@pytest.fixture
def console(chromium, world, browser_errors) -> Iterator[Console]:
    opened = Console(world.console_url, chromium, browser_errors)
    yield opened
    opened.close()
    explanation = ""
    if any((status := _HTTP_ERROR.search(error)) and status.group(1).startswith("5")
           for error in browser_errors.errors):
        # A service failed behind the console: what the console logged of it, and the platform's state.
        logs = world.platform.data_dir / "logs" / "consola.log"
        failures = [line for line in logs.read_text(errors="replace").splitlines() if "service failed" in line] \
            if logs.exists() else []
        explanation = "\n" + "\n".join(failures[-5:]) + "\n" + world.platform.diagnostics()
    assert browser_errors.errors == [], \
        "JavaScript errors in the browser:\n" + "\n".join(browser_errors.errors) + explanation


def screenshot(page, name: str, *, documented: bool = False) -> Path:
    """The whole page as test-output/screenshots/<name>.png; `documented` ones (one per role, listed in
    the README) are copied into docs/screenshots with ALPES_UPDATE_SCREENSHOTS=1."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    if documented and UPDATE_DOC_SCREENSHOTS:
        DOC_SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, DOC_SCREENSHOTS / path.name)
    return path


def submit(page, button) -> int:
    """Click a form's button; the HTTP status of the page the browser ends on (after any redirect)."""
    with page.expect_navigation() as navigation:
        button.click()
    return navigation.value.status


def copied(page, button) -> str:
    """Click a copy button; what it put on the clipboard."""
    stable = page.locator(f'[data-copy="{button.get_attribute("data-copy")}"]')  # its name changes
    stable.click()
    expect(stable).to_have_text("Copied")
    return page.evaluate("navigator.clipboard.readText()")


def nav(page, name: str) -> None:
    """Follow a link of the page header's main navigation."""
    with page.expect_navigation():
        page.get_by_role("navigation", name="Main").get_by_role("link", name=name, exact=True).click()
