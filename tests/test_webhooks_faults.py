"""Webhooks on a whole platform (ALPES_AUTH=required, real keys, the embedded broker): two
advertisers and two affiliates register endpoints through the API on one real local receiver that
answers each endpoint's first requests with a 500, a timeout and a closed connection; marketing is
killed with SIGKILL while conversions flow and deliveries are pending; after its restart every fact
(conversion, commission, enrollment, suspension) has reached every endpoint entitled to it, none
reached another tenant, every signature verifies with the README's verifier, and per endpoint the
events of one commission arrived in order."""

from __future__ import annotations

import time

import pytest
from harness import Platform, wait_until
from sqlalchemy import create_engine, text
from webhook_receiver import Receiver, verify_alpes_signature

from alpes.marketing.webhooks import AFFILIATE_KINDS, EVENT_KINDS

KIND_ORDER = {"commission.created": 0, "commission.approved": 1, "commission.reversed": 2}
CONVERSIONS_PER_TENANT = 8


def _pending_deliveries(platform: Platform) -> int:
    engine = create_engine(platform.db_url("marketing"))
    try:
        with engine.connect() as connection:
            return connection.execute(text("SELECT count(*) FROM webhook_entregas WHERE estado = 'pendiente'")).scalar()
    finally:
        engine.dispose()


# About a minute per database: in `make test-slow` (CI runs it), not in the default run.
@pytest.mark.slow
@pytest.mark.parametrize("databases", ["sqlite", pytest.param("mariadb", marks=pytest.mark.mariadb)])
def test_kill_9_of_marketing_mid_delivery_loses_no_webhook_and_leaks_none(tmp_path, databases):
    receiver = Receiver(slow_seconds=1.5).start()
    platform = Platform(tmp_path / "alpes", databases=databases, env={
        "ALPES_AUTH": "required", "ALPES_WEBHOOK_ALLOW_PRIVATE": "1", "ALPES_WEBHOOK_RETRY_BASE_SECONDS": "0.3",
        "ALPES_WEBHOOK_RETRY_MAX_DELAY_SECONDS": "1", "ALPES_WEBHOOK_TIMEOUT_SECONDS": "1",
        "ALPES_WEBHOOK_DISPATCH_INTERVAL_SECONDS": "0.2", "ALPES_APPROVAL_INTERVAL_SECONDS": "1",
        "ALPES_PAYOUT_INTERVAL_SECONDS": "86400"}).start()
    try:
        http, mk = platform.http, platform.url("marketing")
        operator = platform.create_key("operator")
        platform.authenticate(operator)
        w: dict = {"keys": {}}

        def as_(who: str) -> dict:
            return {"Authorization": f"Bearer {w['keys'][who]}"}

        for brand in ("A", "B"):
            made = http.post(mk + "/anunciantes", json={"nombre": f"Brand {brand}",
                                                        "dominios": [f"brand-{brand.lower()}.example"]})
            assert made.status_code == 201, made.text
            w[brand] = made.json()["id"]
            key = http.post(mk + "/claves", json={"rol": "advertiser", "anunciante_id": w[brand]}).json()["key"]
            w["keys"][brand] = key
            platform.wait_key_known(key)
        # The API refuses an unknown kind naming the field, and an affiliate's conversion subscription.
        refused = http.post(mk + "/webhooks", headers=as_("A"), json={"url": receiver.url("/A"),
                                                                      "eventos": ["conversion.created"]})
        assert refused.status_code == 422 and refused.json()["errors"][0]["field"].startswith("eventos"), refused.text
        endpoints = {}
        for brand in ("A", "B"):
            made = http.post(mk + "/webhooks", headers=as_(brand), json={
                "url": receiver.url(f"/{brand}"), "eventos": list(EVENT_KINDS), "descripcion": f"brand {brand}"})
            assert made.status_code == 201, made.text
            endpoints[brand] = (made.json()["id"], made.json()["secreto"])
        assert http.get(mk + f"/webhooks/{endpoints['A'][0]}", headers=as_("B")).status_code == 404
        for brand, partner in (("A", "X"), ("B", "Y")):
            registered = http.post(platform.url("afiliados") + "/afiliados", headers=as_(brand), json={
                "user_id": f"partner-{partner}", "email": f"partner-{partner.lower()}@example.com",
                "nombre": f"Partner {partner}"})
            assert registered.status_code == 201, registered.text
            w[partner] = registered.json()["id"]
            campaign = http.post(mk + "/campanas", headers=as_(brand), json={
                "nombre": f"Campaign {brand}", "porcentaje_comision": "10", "periodo_bloqueo_dias": 0,
                "landing_url": f"https://www.brand-{brand.lower()}.example/landing"})
            assert campaign.status_code == 201, campaign.text
            w[f"C{brand}"] = campaign.json()["id"]
        for brand, partner in (("A", "X"), ("B", "Y")):
            wait_until(lambda: http.get(platform.url("afiliados") + f"/afiliados/{w[partner]}").json()["estado"]
                       == "validado", 60, what=f"{partner} validated")
            key = http.post(mk + "/claves", json={"rol": "affiliate", "afiliado_id": w[partner]}).json()["key"]
            w["keys"][partner] = key
            platform.wait_key_known(key)
            foreign = http.post(mk + "/webhooks", headers=as_(partner), json={
                "url": receiver.url(f"/{partner}"), "eventos": ["conversion.validated"]})
            assert foreign.status_code == 422 and foreign.json()["errors"][0]["field"] == "eventos", foreign.text
            made = http.post(mk + "/webhooks", headers=as_(partner), json={
                "url": receiver.url(f"/{partner}"), "eventos": list(AFFILIATE_KINDS)})
            assert made.status_code == 201, made.text
            endpoints[partner] = (made.json()["id"], made.json()["secreto"])
            wait_until(lambda: http.post(mk + f"/campanas/{w['C' + brand]}/inscripciones", headers=as_(brand),
                                         json={"afiliado_id": w[partner]}).status_code == 201, 60, what="enrolled")

        def postback(brand: str, partner: str, n: int) -> str:
            answer = http.post(platform.url("conversiones") + "/conversiones", headers=as_(brand), json={
                "affiliate_id": w[partner], "campaign_id": w[f"C{brand}"], "user_id": f"customer-{brand}-{n}",
                "conversion_value": "100.00", "conversion_type": "sale", "order_id": f"order-{brand}-{n}"})
            assert answer.status_code == 200, answer.text
            return answer.json()["id"]

        conversions = {"A": [], "B": []}
        # conversiones learns the campaigns from marketing.eventos: the first postback may come too early.
        for brand, partner in (("A", "X"), ("B", "Y")):
            wait_until(lambda: http.get(platform.url("conversiones") + f"/conversiones/{postback(brand, partner, 0)}")
                       .json()["status"] == "validated", 60, interval=0.5, what=f"campaign {brand} known")
        for n in range(1, CONVERSIONS_PER_TENANT // 2):
            conversions["A"].append(postback("A", "X", n))
            conversions["B"].append(postback("B", "Y", n))
        wait_until(lambda: _pending_deliveries(platform) > 0, 30, interval=0.05, what="deliveries pending")
        pending_at_kill = _pending_deliveries(platform)
        old = platform.kill("marketing")
        # Facts keep coming while marketing is down: they wait in the broker.
        for n in range(CONVERSIONS_PER_TENANT // 2, CONVERSIONS_PER_TENANT):
            conversions["A"].append(postback("A", "X", n))
            conversions["B"].append(postback("B", "Y", n))
        platform.wait_restarted("marketing", old)
        for brand in ("A", "B"):
            refund = http.post(platform.url("conversiones") + f"/conversiones/{conversions[brand][0]}/reembolso",
                               headers=as_(brand), json={"tipo": "reembolso"})
            assert refund.status_code == 200, refund.text
        # Every commission booked, approved (lock period 0) or reversed, before suspending the partners.
        wait_until(lambda: (rows := http.get(mk + "/comisiones", params={"limit": 1000}).json()["comisiones"])
                   and len(rows) >= 2 * CONVERSIONS_PER_TENANT and all(r["estado"] != "pendiente" for r in rows),
                   90, what="commissions settled")
        for brand, partner in (("A", "X"), ("B", "Y")):
            assert http.post(platform.url("afiliados") + f"/afiliados/{w[partner]}/suspender", headers=as_(brand),
                             json={"motivo": "webhook test"}).status_code == 200

        # What each endpoint is owed, from the operator's view of the facts.
        comisiones = http.get(mk + "/comisiones", params={"limit": 1000}).json()["comisiones"]
        owed: dict[str, set[tuple[str, str]]] = {name: set() for name in endpoints}
        tenant_of = {w["CA"]: ("A", "X"), w["CB"]: ("B", "Y")}
        for c in comisiones:
            brand, partner = tenant_of[c["campana_id"]]
            # A reversed commission may have been approved first or not: its approval is not required.
            kinds = ["commission.created"] + (["commission.reversed"] if c["estado"] == "revertida"
                                              else ["commission.approved"])
            for kind in kinds:
                owed[brand].add((kind, c["id"]))
                owed[partner].add((kind, c["id"]))
        for brand, partner in (("A", "X"), ("B", "Y")):
            owed[brand] |= {("conversion.validated", cid) for cid in conversions[brand]}
            owed[brand] |= {("conversion.refunded", conversions[brand][0])}
            owed[brand] |= {("affiliate.suspended", w[partner])}
            owed[partner] |= {("affiliate.suspended", w[partner])}
            owed[brand] |= {("enrollment.created", "*")}
            owed[partner] |= {("enrollment.created", "*")}

        def received(name: str) -> set[tuple[str, str]]:
            got = set()
            for r in receiver.delivered(f"/{name}"):
                data = r.payload["data"]
                if r.payload["type"].startswith("commission."):
                    got.add((r.payload["type"], data["commission_id"]))
                elif r.payload["type"].startswith("conversion."):
                    got.add((r.payload["type"], data["conversion_id"]))
                elif r.payload["type"].startswith("affiliate."):
                    got.add((r.payload["type"], data["affiliate_id"]))
                elif r.payload["type"] == "enrollment.created":
                    got.add(("enrollment.created", "*"))
            return got

        try:
            wait_until(lambda: all(owed[name] <= received(name) for name in endpoints), 120, interval=0.5,
                       what="every owed webhook delivered")
        except Exception:
            missing = {name: sorted(owed[name] - received(name))[:5] for name in endpoints}
            raise AssertionError(f"missing deliveries: {missing}\n{platform.diagnostics()}") from None
        time.sleep(1)  # anything else in flight arrives too, to be checked below
        duplicates = 0
        for name, (webhook_id, secret) in endpoints.items():
            brand, partner = ("A", "X") if name in ("A", "X") else ("B", "Y")
            mine = receiver.whole(f"/{name}")
            for r in mine:
                assert verify_alpes_signature(secret, r.headers["Alpes-Signature"], r.body), name
                assert r.headers["Alpes-Webhook-Id"] == webhook_id
                data = r.payload["data"]
                # Never another tenant's: its campaign, its partner, no customer data.
                assert data.get("campaign_id", w[f"C{brand}"]) == w[f"C{brand}"], (name, r.payload)
                assert data.get("affiliate_id", w[partner]) == w[partner], (name, r.payload)
                assert "customer-" not in r.body.decode()
                if name in ("X", "Y"):
                    assert not r.payload["type"].startswith("conversion.")
            ids = [r.payload["id"] for r in mine if r.answered == "200"]
            duplicates += len(ids) - len(set(ids))
            for comision in {k[1] for k in owed[name] if k[0].startswith("commission.")}:
                kinds = [KIND_ORDER[r.payload["type"]] for r in mine if r.payload["type"] in KIND_ORDER
                         and r.payload["data"]["commission_id"] == comision]
                assert kinds == sorted(kinds), (name, comision, kinds)
        # The owner reads its delivery log; the metrics count the deliveries.
        log = http.get(mk + f"/webhooks/{endpoints['A'][0]}/entregas", headers=as_("A"), params={"limit": 1000})
        assert log.status_code == 200 and any(len(e["historial"]) > 1 for e in log.json()["entregas"])
        assert http.get(mk + f"/webhooks/{endpoints['A'][0]}/entregas", headers=as_("B")).status_code == 404
        metrics = http.get(mk + "/metrics").text
        assert 'alpes_webhook_deliveries_total{event_type="commission.created",outcome="delivered"}' in metrics
        faults = sum(1 for r in receiver.requests if r.answered not in ("200", "truncated"))
        truncated = sum(1 for r in receiver.requests if r.answered == "truncated")
        print(f"\nwebhooks under kill -9 ({databases}): {len(receiver.requests)} requests ({faults} met a fault, "
              f"{truncated} cut short by the kill), "
              f"{pending_at_kill} deliveries pending when marketing was killed, "
              f"{sum(len(v) for v in owed.values())} owed deliveries all received, {duplicates} duplicates")
    finally:
        platform.close()
        receiver.stop()
