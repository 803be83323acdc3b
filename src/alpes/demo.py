"""`alpes demo`: load a small affiliate-marketing scenario into an already running platform over HTTP.

A last-click campaign with a landing URL, no lock period and tiered rules (10 %, 20 % from an affiliate's third
approved conversion of the month), three affiliates registered and enrolled, then clicks on their tracking links,
each by a new visitor (its own `alpes_vid` cookie), and postbacks attributed through the click ids (one of them
sent twice), then a payout run. Prints where to look.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TypeVar
from urllib.parse import parse_qs, urlsplit

import httpx

from .contract import SERVICES

T = TypeVar("T")
AFFILIATES = ("ana", "beto", "caro")
DEMO_WORKERS = 8  # customers clicking and buying at the same time
REGLAS = {"reglas": [{"tipo": "cps", "porcentaje": "20", "min_aprobadas": 2}, {"tipo": "cps", "porcentaje": "10"}]}


class DemoError(RuntimeError):
    pass


@dataclass
class DemoResult:
    campana_id: str
    afiliados: dict[str, str]
    clicks: int = 0
    conversions: list[str] = field(default_factory=list)
    pagos: int = 0
    urls: dict[str, str] = field(default_factory=dict)
    # The web console's pages for each role, and how that role gets in (role -> (url, how)).
    console: dict[str, tuple[str, str]] = field(default_factory=dict)
    # Seconds from the first click until: every postback answered, every commission calculated,
    # every commission approved (the approval job runs every ALPES_APPROVAL_INTERVAL_SECONDS).
    seconds: dict[str, float] = field(default_factory=dict)


def console_urls(console: str, campana_id: str, afiliados: dict[str, str]) -> dict[str, tuple[str, str]]:
    """Where each role looks at the demo in the web console (alpes/consola) and how it signs in there.
    The demo runs as the operator (its campaign has no advertiser), so advertisers' pages show it to
    an operator; an affiliate needs its own key, which ends the protected local mode for good."""
    first = next(iter(afiliados.items()), None)
    urls = {
        "operator": (f"{console}/operador",
                     f"sign in at {console}/entrar: 'Enter as operator' (protected local mode) or an operator key"),
        "advertiser": (f"{console}/anunciante/campanas/{campana_id}",
                       "the demo campaign (operator-owned: open it as the operator); an advertiser's key "
                       "(`alpes keys create --role advertiser --advertiser <id>`) sees its own campaigns there"),
        "live events": (f"{console}/eventos", "operators and advertisers"),
    }
    if first is not None:
        name, afiliado = first
        urls["affiliate"] = (f"{console}/afiliado",
                             f"sign in with {name}'s key: `alpes keys create --role affiliate --affiliate {afiliado}`"
                             " (the first key ends the protected local mode)")
    return urls


def _wait(check: Callable[[], T], what: str, timeout: float = 60.0) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            result = check()
        except httpx.HTTPError:
            result = None
        if result:
            return result
        time.sleep(0.2)
    raise DemoError(f"timed out after {timeout:.0f}s waiting for {what}")


def _ok(response: httpx.Response, *codes: int) -> dict:
    if response.status_code not in (codes or (200,)):
        raise DemoError(f"{response.request.method} {response.request.url} -> {response.status_code}: {response.text}")
    return response.json()


def run_demo(url_base: str, ports: dict[str, int], conversions: int = 200,
             progress: Callable[[str, int, int], None] | None = None, timeout: float = 60.0,
             console_port: int | None = None) -> DemoResult:
    """Load the scenario; `progress(step, done, total)` is told how far each step got. With
    `console_port`, the result names the web console's pages for each role too."""
    url = {name: f"{url_base.rstrip('/')}:{ports[name]}" for name in SERVICES}
    tell = progress or (lambda step, done, total: None)
    run = uuid.uuid4().hex[:8]
    with httpx.Client(timeout=30) as http:
        campana = _ok(http.post(url["marketing"] + "/campanas", json={
            "nombre": f"Demo {run}", "porcentaje_comision": "5", "periodo_bloqueo_dias": 0,
            "modelo_atribucion": "ultimo_click", "landing_url": "https://shop.example.com/demo"}), 201)["id"]
        _ok(http.put(url["marketing"] + f"/campanas/{campana}/reglas", json=REGLAS))
        result = DemoResult(campana, {})
        links: dict[str, str] = {}
        for n, name in enumerate(AFFILIATES):
            afiliado = _ok(http.post(url["afiliados"] + "/afiliados", json={
                "user_id": f"{name}-{run}", "email": f"{name}-{run}@example.com", "nombre": name.title()}), 201)["id"]
            result.afiliados[name] = afiliado
            _wait(lambda a=afiliado: http.get(url["afiliados"] + f"/afiliados/{a}").json()["estado"] == "validado",
                  f"{name} validated", timeout)
            links[name] = _wait(
                lambda a=afiliado: (r := http.post(url["marketing"] + f"/campanas/{campana}/inscripciones",
                                                   json={"afiliado_id": a})).status_code in (200, 201)
                and r.json()["link_code"], f"{name} enrolled", timeout)
            tell("affiliates", n + 1, len(AFFILIATES))
        def convert(client: httpx.Client, n: int) -> str:
            name = AFFILIATES[n % len(AFFILIATES)]
            client.cookies.clear()  # a new customer: a new visitor, whose clicks compete only with its own
            redirect = _wait(lambda c=links[name]: (r := client.get(url["conversiones"] + f"/r/{c}",
                                                                    headers={"User-Agent": "alpes-demo"},
                                                                    follow_redirects=False)).status_code == 302 and r,
                             f"{name}'s tracking link", timeout)
            [click_id] = parse_qs(urlsplit(redirect.headers["location"]).query)["alpes_click_id"]
            value = Decimal(50 + (n * 37) % 400) + Decimal("0.99")
            body = {"click_id": click_id, "user_id": f"cliente-{n}", "conversion_value": str(value),
                    "conversion_type": "sale", "order_id": f"demo-{run}-{n}"}
            conversion = _ok(client.post(url["conversiones"] + "/conversiones", json=body))["id"]
            # the first postback is sent twice: same order_id, same conversion
            if n == 0 and _ok(client.post(url["conversiones"] + "/conversiones", json=body))["id"] != conversion:
                raise DemoError("a duplicate postback got a new conversion id")
            return conversion

        # Customers arrive side by side (a few at a time, as shoppers do): one client each worker,
        # so each keeps its own cookie jar and connection.
        local = threading.local()
        clients: list[httpx.Client] = []

        def convert_in_worker(n: int) -> str:
            if not hasattr(local, "client"):
                local.client = httpx.Client(timeout=30)
                clients.append(local.client)
            return convert(local.client, n)

        started = time.monotonic()
        try:
            with ThreadPoolExecutor(max_workers=DEMO_WORKERS) as pool:
                for n, conversion in enumerate(pool.map(convert_in_worker, range(conversions))):
                    result.clicks += 1
                    result.conversions.append(conversion)
                    tell("conversions", n + 1, conversions)
        finally:
            for client in clients:
                client.close()

        result.seconds["postbacks answered"] = round(time.monotonic() - started, 1)

        def commissions() -> bool:
            comisiones = http.get(url["marketing"] + "/comisiones", params={"campana_id": campana, "limit": 10000}).json()["comisiones"]
            mine = {c["conversion_id"]: c["estado"] for c in comisiones}
            if "commissions calculated" not in result.seconds and all(c in mine for c in result.conversions):
                result.seconds["commissions calculated"] = round(time.monotonic() - started, 1)
            done = sum(1 for c in result.conversions if mine.get(c) == "aprobada")
            tell("commissions", done, len(result.conversions))
            return done == len(result.conversions)
        if result.conversions:
            _wait(commissions, "the commissions to be approved", timeout)
            result.seconds["commissions approved"] = round(time.monotonic() - started, 1)
        pagos = _ok(http.post(url["marketing"] + "/pagos", json={}))["pagos"]
        result.pagos = sum(1 for p in pagos if p["afiliado_id"] in result.afiliados.values())
        tell("payouts", 1, 1)
    result.urls = {
        "campaign report": f"{url['marketing']}/reportes/campanas/{campana}?agrupar=total",
        **{f"{name}'s report": f"{url['marketing']}/reportes/afiliados/{a}?agrupar=total"
           for name, a in result.afiliados.items()},
        "commissions": f"{url['marketing']}/comisiones?campana_id={campana}",
        "payouts": f"{url['marketing']}/pagos",
        "conversions": f"{url['conversiones']}/conversiones",
        "audit log": f"{url['auditoria']}/auditoria/eventos",
        "audit chain": f"{url['auditoria']}/auditoria/verificacion",
    }
    if console_port is not None:
        result.console = console_urls(f"{url_base.rstrip('/')}:{console_port}", campana, result.afiliados)
    return result
