"""The authorization matrix: every operation of every service's OpenAPI, tried as anonymous, the
operator, advertisers A and B and affiliates X and Y, against the data of A and X, on a running
platform with ALPES_AUTH=required and real keys.

A route added without a rule stops its service (kernel/http_access.py); one added without an
entry here fails this test (`BODIES`/`OWN_CREATES` below name what each write is sent). Then:
anonymous gets 401 everywhere but the public routes; a role the rule leaves out gets 403; B and Y
asking for A's and X's things by id get 404 (or 403), and their lists, reports and logs never hold
an id or a customer value of A's; their writes on A's things change nothing (the operator's view
and the audit log are the same before and after); affiliates never see customer data.
"""

from __future__ import annotations

import time

import httpx
from harness import Platform, wait_until
from webhook_receiver import Receiver

from alpes.contract import SERVICES

CALLERS = ("anonymous", "operator", "advertiser_a", "advertiser_b", "affiliate_x", "affiliate_y")
FOREIGN = {"advertiser_b", "affiliate_y"}  # callers with no right to A's and X's things
ROLE_OF = {"operator": "operator", "advertiser_a": "advertiser", "advertiser_b": "advertiser",
           "affiliate_x": "affiliate", "affiliate_y": "affiliate"}
CUSTOMER = "customer-of-a-7f3e"  # a customer's id in A's postbacks: only the operator and A may see it

# What each write is sent: bodies that name A's and X's things, so that B and Y reach the tenant check.
BODIES = {
    ("POST", "/afiliados"): {"user_id": "matrix-new", "email": "matrix-new@example.com", "nombre": "Matrix"},
    ("POST", "/afiliados/{afiliado_id}/aprobar"): None,
    ("POST", "/afiliados/{afiliado_id}/suspender"): {"motivo": "matrix"},
    ("POST", "/afiliados/{afiliado_id}/reactivar"): None,
    ("DELETE", "/afiliados/{afiliado_id}/datos-personales"): None,
    ("POST", "/conversiones"): lambda w: {"affiliate_id": w["X"], "campaign_id": w["CA"], "user_id": "u-matrix",
                                          "conversion_value": "10.00", "conversion_type": "sale",
                                          "order_id": "matrix-order"},
    ("POST", "/conversiones/{conversion_id}/reembolso"): {"tipo": "reembolso"},
    ("POST", "/conversiones/{conversion_id}/aprobar"): None,
    ("POST", "/conversiones/{conversion_id}/rechazar"): {"motivo": "matrix"},
    ("POST", "/anunciantes"): {"nombre": "Matrix Brand"},
    ("PUT", "/anunciantes/{anunciante_id}"): {"nombre": "Hijacked", "dominios": ["evil.example"],
                                              "valor_maximo_conversion": None},
    ("POST", "/anunciantes/{anunciante_id}/secreto-postback"): None,
    ("POST", "/claves"): lambda w: {"rol": "advertiser", "anunciante_id": w["A"]},
    ("DELETE", "/claves/{key_id}"): None,
    ("POST", "/campanas"): lambda w: {"nombre": "Matrix", "porcentaje_comision": "5", "anunciante_id": w["A"]},
    ("PUT", "/campanas/{campana_id}"): {"nombre": "Hijacked", "presupuesto": "1.00"},
    ("POST", "/campanas/{campana_id}/activar"): None,
    ("POST", "/campanas/{campana_id}/pausar"): None,
    ("POST", "/campanas/{campana_id}/finalizar"): None,
    ("POST", "/campanas/{campana_id}/inscripciones"): lambda w: {"afiliado_id": w["Y"]},
    ("PUT", "/campanas/{campana_id}/reglas"): {"reglas": [{"tipo": "cps", "porcentaje": "100"}]},
    ("POST", "/pagos"): lambda w: {"afiliado_id": w["X"]},
    ("POST", "/pagos/{pago_id}/pagar"): {},
    ("POST", "/webhooks"): lambda w: {"url": w["receiver"] + "/own", "eventos": ["payout.paid"]},
    ("PUT", "/webhooks/{webhook_id}"): {"url": "http://127.0.0.1:9/hijack", "eventos": ["payout.paid"],
                                        "descripcion": None, "habilitado": False},
    ("DELETE", "/webhooks/{webhook_id}"): None,
    ("POST", "/webhooks/{webhook_id}/secreto"): None,
    ("POST", "/webhooks/{webhook_id}/habilitar"): None,
    ("POST", "/webhooks/{webhook_id}/entregas/{entrega_id}/reenviar"): None,
}
# Writes that name nothing of another tenant: a caller whose role may call them creates its own.
OWN_CREATES = {("POST", "/afiliados"), ("POST", "/webhooks")}
# Reads an affiliate may make of other tenants' things by design: the catalogue of programs to join.
CATALOGUE = {("GET", "/programas")}


def _headers(world: dict, caller: str) -> dict[str, str]:
    key = world["keys"].get(caller)
    return {"Authorization": f"Bearer {key}"} if key else {}


def _build_world(platform: Platform, receiver: Receiver) -> dict:
    """A and B, each with a campaign, an affiliate enrolled, a validated and a held conversion, a
    commission and a payout; keys for every caller; A's webhook endpoint and its deliveries."""
    http = platform.http
    operator = platform.create_key("operator")
    platform.authenticate(operator)
    world: dict = {"keys": {"operator": operator}, "receiver": receiver.url("")}
    for tenant, affiliate in (("A", "X"), ("B", "Y")):
        brand = http.post(platform.url("marketing") + "/anunciantes",
                          json={"nombre": f"Brand {tenant}", "dominios": [f"brand-{tenant.lower()}.example"]})
        assert brand.status_code == 201, brand.text
        world[tenant] = brand.json()["id"]
        key = http.post(platform.url("marketing") + "/claves", json={"rol": "advertiser", "anunciante_id": world[tenant]})
        assert key.status_code == 201, key.text
        world["keys"][f"advertiser_{tenant.lower()}"] = key.json()["key"]
        world[f"key_{tenant}"] = key.json()["key_id"]
    for tenant in ("A", "B"):
        platform.wait_key_known(world["keys"][f"advertiser_{tenant.lower()}"])
    webhook = http.post(platform.url("marketing") + "/webhooks", headers=_headers(world, "advertiser_a"),
                        json={"url": receiver.url("/A"), "eventos": ["commission.created", "payout.created"]})
    assert webhook.status_code == 201, webhook.text
    world["WA"] = webhook.json()["id"]
    for tenant, affiliate in (("A", "X"), ("B", "Y")):
        as_brand = _headers(world, f"advertiser_{tenant.lower()}")
        registered = http.post(platform.url("afiliados") + "/afiliados", headers=as_brand, json={
            "user_id": f"partner-{affiliate}", "email": f"partner-{affiliate.lower()}@example.com",
            "nombre": f"Partner {affiliate}"})
        assert registered.status_code == 201, registered.text
        world[affiliate] = registered.json()["id"]
        campaign = http.post(platform.url("marketing") + "/campanas", headers=as_brand, json={
            "nombre": f"Campaign {tenant}", "porcentaje_comision": "10", "periodo_bloqueo_dias": 0,
            "landing_url": f"https://www.brand-{tenant.lower()}.example/landing",
            "valor_maximo_conversion": "1000.00"})
        assert campaign.status_code == 201, campaign.text
        world[f"C{tenant}"] = campaign.json()["id"]
    for tenant, affiliate in (("A", "X"), ("B", "Y")):
        wait_until(lambda: http.get(platform.url("afiliados") + f"/afiliados/{world[affiliate]}").json()["estado"]
                   == "validado", 60, what=f"{affiliate} validated")
        as_brand = _headers(world, f"advertiser_{tenant.lower()}")
        enrolled = wait_until(lambda: (r := http.post(
            platform.url("marketing") + f"/campanas/{world['C' + tenant]}/inscripciones", headers=as_brand,
            json={"afiliado_id": world[affiliate]})).status_code == 201 and r, 60, what="enrolled")
        world[f"L{tenant}"] = enrolled.json()["link_code"]
        key = http.post(platform.url("marketing") + "/claves", json={"rol": "affiliate", "afiliado_id": world[affiliate]})
        assert key.status_code == 201, key.text
        world["keys"][f"affiliate_{affiliate.lower()}"] = key.json()["key"]
        world[f"key_{affiliate}"] = key.json()["key_id"]
        platform.wait_key_known(key.json()["key"])
        sale = {"affiliate_id": world[affiliate], "campaign_id": world[f"C{tenant}"], "user_id": CUSTOMER
                if tenant == "A" else "customer-of-b", "conversion_value": "100.00", "conversion_type": "sale"}

        def validated(order: str = f"order-{tenant}") -> bool:
            answer = http.post(platform.url("conversiones") + "/conversiones", headers=as_brand,
                               json={**sale, "order_id": f"{order}-{time.monotonic_ns()}"}).json()
            world[f"V{tenant}"] = answer["id"]
            return answer["status"] == "validated"
        wait_until(validated, 60, interval=0.5, what=f"conversiones to learn campaign {tenant}")
        held = http.post(platform.url("conversiones") + "/conversiones", headers=as_brand,
                         json={**sale, "conversion_value": "5000.00", "order_id": f"big-{tenant}"})
        assert held.status_code == 200 and held.json()["status"] == "on_hold", held.text
        world[f"H{tenant}"] = held.json()["id"]
        world[f"K{tenant}"] = wait_until(lambda: http.get(platform.url("marketing") + "/comisiones", params={
            "conversion_id": world[f"V{tenant}"]}).json()["comisiones"], 60, what="commission")[0]["id"]
        wait_until(lambda: http.get(platform.url("marketing") + f"/comisiones/{world['K' + tenant]}").json()["estado"]
                   == "aprobada", 60, what="commission approved")
        pagos = http.post(platform.url("marketing") + "/pagos", headers=as_brand, json={}).json()["pagos"]
        assert len(pagos) == 1, pagos
        world[f"P{tenant}"] = pagos[0]["id"]
    assert httpx.get(platform.url("conversiones") + f"/r/{world['LA']}", follow_redirects=False).status_code == 302
    # A's webhook deliveries all made (the operator's views stay still while the matrix runs).
    log = wait_until(lambda: (e := http.get(platform.url("marketing") + f"/webhooks/{world['WA']}/entregas").json()
                              ["entregas"]) and all(d["estado"] == "entregada" for d in e) and e, 60,
                     what="A's webhooks delivered")
    world["EA"] = str(log[0]["id"])
    return world


def _path(template: str, world: dict, tenant: str = "A") -> str:
    affiliate = "X" if tenant == "A" else "Y"
    values = {"afiliado_id": world[affiliate], "campana_id": world[f"C{tenant}"], "anunciante_id": world[tenant],
              "conversion_id": world[f"H{tenant}"], "correlation_id": world[f"V{tenant}"],
              "comision_id": world[f"K{tenant}"], "pago_id": world[f"P{tenant}"], "key_id": world[f"key_{tenant}"],
              "webhook_id": world.get(f"W{tenant}", "no-webhook"), "entrega_id": world.get(f"E{tenant}", "0"),
              # The tracking link is public and records a click (a change): tried with a code nobody has.
              "link_code": "matrixnolink"}
    path = template
    for name, value in values.items():
        path = path.replace("{" + name + "}", value)
    assert "{" not in path, f"no value for a parameter of {template}: add it to _path"
    return path


def _operations(platform: Platform) -> list[tuple[str, str, str, dict]]:
    ops = []
    for service in SERVICES:
        spec = platform.http.get(platform.url(service) + "/openapi.json").json()
        for path, operations in spec["paths"].items():
            for method, operation in operations.items():
                ops.append((service, method.upper(), path, operation))
    return ops


def _a_secrets(world: dict) -> set[str]:
    """What B and Y must never read: A's and X's ids and A's customer."""
    return {world[k] for k in ("A", "X", "CA", "VA", "HA", "KA", "PA", "LA", "key_A", "key_X", "WA")} | {CUSTOMER}


def _snapshot(platform: Platform, ops) -> dict:
    """The operator's view of every list (no path parameter) and the audit log's length."""
    view = {}
    for service, method, path, _ in ops:
        if method == "GET" and "{" not in path and path not in ("/health", "/metrics", "/sistema/servicios",
                                                                   "/sistema/alertas", "/claves",
                                                                   "/auditoria/verificacion"):
            response = platform.http.get(platform.url(service) + path, params={"limit": 1000}
                                         if path in ("/conversiones", "/afiliados") else None)
            view[(service, path)] = response.text
    view["audit"] = platform.http.get(platform.url("auditoria") + "/auditoria/eventos", params={"limit": 1}).json()["total"]
    return view


def test_every_operation_as_every_caller_leaks_nothing_across_tenants(tmp_path):
    platform = Platform(tmp_path / "alpes", env={
        "ALPES_AUTH": "required", "ALPES_APPROVAL_INTERVAL_SECONDS": "1", "ALPES_PAYOUT_THRESHOLD": "1.00",
        "ALPES_PAYOUT_INTERVAL_SECONDS": "86400", "ALPES_WEBHOOK_ALLOW_PRIVATE": "1"}).start()
    receiver = Receiver(faults=()).start()
    try:
        world = _build_world(platform, receiver)
        ops = _operations(platform)
        missing = [(m, p) for _, m, p, _ in ops if m != "GET" and (m, p) not in BODIES]
        assert not missing, f"writes with no body in the matrix (add them to BODIES): {missing}"
        secrets = _a_secrets(world)
        time.sleep(2)  # the platform settles: the audit log has every event of the set-up
        wait_until(lambda: _snapshot(platform, ops) == _snapshot(platform, ops), 30, what="a quiet platform")
        before = _snapshot(platform, ops)
        outcomes: dict[tuple[str, str, str], int] = {}
        problems: list[str] = []
        bare = httpx.Client(timeout=30)  # no default key: each request carries its caller's alone
        for caller in CALLERS:
            for service, method, path, operation in ops:
                roles = set(operation.get("x-alpes-roles", []))
                public = operation.get("security") == []
                if caller in ("operator", "advertiser_a", "affiliate_x") and method != "GET":
                    continue  # their writes are what the services' own tests drive; they would change A's data
                if caller in FOREIGN and (method, path) in OWN_CREATES:
                    continue
                body = BODIES.get((method, path))
                body = body(world) if callable(body) else body
                response = bare.request(method, platform.url(service) + _path(path, world), json=body,
                                        headers=_headers(world, caller), follow_redirects=False)
                status = response.status_code
                outcomes[(caller, method, path)] = status
                where = f"{caller} {method} {path} -> {status}"
                if public:
                    if status in (401, 403):
                        problems.append(f"{where}: a public route refused")
                    continue
                if caller == "anonymous":
                    if status != 401 or "www-authenticate" not in response.headers:
                        problems.append(f"{where}: anonymous must get 401 with WWW-Authenticate")
                    continue
                if ROLE_OF[caller] not in roles:
                    if status != 403:
                        problems.append(f"{where}: role {ROLE_OF[caller]} is not in {sorted(roles)}: expected 403")
                    continue
                if status in (401, 403) and caller not in FOREIGN:
                    problems.append(f"{where}: allowed caller refused: {response.text[:200]}")
                if caller in FOREIGN:
                    if "{" in path and status < 400:
                        problems.append(f"{where}: another tenant's {path} answered {response.text[:200]}")
                    # A write naming A's things without a path id (POST /pagos {afiliado_id: X}) may answer
                    # 2xx having done nothing of A's: the snapshot below proves nothing changed.
                    if status < 300 and (method, path) not in CATALOGUE:
                        leaked = sorted(s for s in secrets if s in response.text)
                        if leaked:
                            problems.append(f"{where}: leaks {leaked}")
                if caller.startswith("affiliate") and status < 300 and CUSTOMER in response.text:
                    problems.append(f"{where}: customer data shown to an affiliate")
        time.sleep(2)
        after = _snapshot(platform, ops)
        changed = sorted(str(k) for k in before if before[k] != after[k])
        tried = len(outcomes)
        denied_cross = sum(1 for (c, m, p), s in outcomes.items() if c in FOREIGN and s in (403, 404))
        print(f"\nauthorization matrix: {len(ops)} operations, {len(CALLERS)} callers, {tried} requests (writes of "
              f"the operator, A and X are left to each service's tests); "
              f"{sum(1 for s in outcomes.values() if s == 401)} x 401, {sum(1 for s in outcomes.values() if s == 403)}"
              f" x 403, {sum(1 for s in outcomes.values() if s == 404)} x 404; {denied_cross} cross-tenant attempts "
              f"refused; problems: {len(problems)}; changed by refused writes: {changed}")
        assert not problems, "\n".join(problems)
        assert not changed, f"refused writes changed {changed}"
        # Sanity: the allowed callers see their own.
        assert world["CA"] in bare.get(platform.url("marketing") + "/campanas", headers=_headers(world, "advertiser_a")).text
        own = bare.get(platform.url("conversiones") + "/conversiones", headers=_headers(world, "affiliate_x"))
        assert world["VA"] in own.text and CUSTOMER not in own.text
    finally:
        platform.close()
        receiver.stop()
