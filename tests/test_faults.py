"""Crash safety: SIGKILL service processes in the middle of a stream of conversions."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from harness import Platform, wait_until

from alpes.contract import SERVICES


def _postback(platform: Platform, body: dict, deadline: float) -> str:
    """Send until the platform answers 200; a crash mid-request is retried with the same order id."""
    with httpx.Client(timeout=10) as http:
        while time.monotonic() < deadline:
            try:
                response = http.post(platform.url("conversiones") + "/conversiones", json=body)
                if response.status_code == 200:
                    return response.json()["id"]
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
    raise AssertionError(f"postback {body['order_id']} never accepted")


def test_sigkill_mid_stream_loses_nothing_and_duplicates_nothing(tmp_path):
    crash_scenario(tmp_path, conversions=500, kills=(("conversiones", 150), ("marketing", 300), ("auditoria", 400)))


@pytest.mark.slow
def test_sigkill_every_process_during_a_longer_stream(tmp_path):
    crash_scenario(tmp_path, conversions=3000, kills=(("afiliados", 300), ("conversiones", 800), ("broker", 1300),
                                                      ("marketing", 1800), ("auditoria", 2300)))


def crash_scenario(tmp_path, conversions: int, kills: tuple[tuple[str, int], ...]) -> None:
    platform = Platform(tmp_path / "alpes").start()
    try:
        affiliates = []
        for i in range(3):
            response = platform.post("afiliados", "/afiliados",
                                     {"user_id": f"p{i}", "email": f"partner{i}@example.com", "nombre": f"Partner {i}"})
            affiliates.append(response.json()["id"])
        campaign = platform.post("marketing", "/campanas", {"nombre": "Crash", "porcentaje_comision": "7.5"}).json()["id"]
        for affiliate in affiliates:  # wait until conversiones learned every reference
            wait_until(lambda: platform.post("conversiones", "/conversiones", {
                "affiliate_id": affiliate, "campaign_id": campaign, "user_id": "probe", "conversion_value": "1.00",
                "conversion_type": "lead", "order_id": f"probe-{affiliate}"}).json()["status"] == "validated",
                timeout=60, what="references learned")

        rng = random.Random(20261128)
        bodies = []
        for n in range(conversions):
            affiliate = rng.choice(affiliates) if n % 10 else "unknown-partner"  # 1 in 10 is rejected
            bodies.append({"affiliate_id": affiliate, "campaign_id": campaign, "user_id": f"c{n}",
                           "conversion_value": f"{rng.randint(100, 99999) / 100:.2f}", "conversion_type": "sale",
                           "order_id": f"order-{n}"})
        sent = Counter()
        lock = threading.Lock()
        deadline = time.monotonic() + 240 + conversions / 10

        def send(body: dict) -> str:
            conversion_id = _postback(platform, body, deadline)
            with lock:
                sent["n"] += 1
            return conversion_id

        killed = []

        def killer() -> None:
            for target, at in kills:
                wait_until(lambda: sent["n"] >= at, 240, interval=0.01, what=f"{at} postbacks sent")
                pid = platform.kill(target)
                killed.append(target)
                platform.wait_restarted(target, pid)

        chaos = threading.Thread(target=killer)
        chaos.start()
        with ThreadPoolExecutor(8) as pool:
            ids = list(pool.map(send, bodies))
        chaos.join(120)
        assert killed == [target for target, _ in kills]
        assert len(set(ids)) == conversions  # one conversion per order id, across the crash

        # Every conversion ends validated or rejected: never stuck, never both.
        def settled():
            listed = platform.get("conversiones", "/conversiones", campaign_id=campaign, limit=10000)["conversiones"]
            mine = [c for c in listed if c["id"] in set(ids)]
            return len(mine) == conversions and all(c["status"] != "detected" for c in mine) and mine
        final = wait_until(settled, 180, interval=0.5, what="all conversions settled",
                                 diagnose=platform.diagnostics)
        status = {c["id"]: c["status"] for c in final}
        expected_rejected = {i for i, b in zip(ids, bodies) if b["affiliate_id"] == "unknown-partner"}
        assert {i for i, s in status.items() if s == "rejected"} == expected_rejected
        validated = {i for i, s in status.items() if s == "validated"}

        # Exactly one commission per validated conversion, none for rejected ones.
        def commissions_done():
            listed = platform.get("marketing", "/comisiones", campana_id=campaign, limit=10000)["comisiones"]
            ours = [c for c in listed if c["conversion_id"] in status]
            return len(ours) >= len(validated) and ours
        commissions = wait_until(commissions_done, 180, interval=0.5, what="commissions", diagnose=platform.diagnostics)
        per_conversion = Counter(c["conversion_id"] for c in commissions)
        assert set(per_conversion) == validated and set(per_conversion.values()) == {1}

        # The audit log holds each event once; the chain verifies.
        def audited():
            events = platform.get("auditoria", "/auditoria/eventos", limit=10000)["eventos"]
            types = Counter(e["event_type"] for e in events)
            total_commissions = len(platform.get("marketing", "/comisiones", limit=10000)["comisiones"])
            return types["ComisionCalculada"] == total_commissions and types["ConversionDetected"] == conversions + 3 and events
        events = wait_until(audited, 180, interval=0.5, what="audit complete",
                           diagnose=lambda: f"{Counter(e['event_type'] for e in platform.get('auditoria', '/auditoria/eventos', limit=10000)['eventos'])}\n{platform.diagnostics()}")
        assert len({e["event_id"] for e in events}) == len(events)
        assert Counter(e["event_type"] for e in events)["ConversionRejected"] == len(expected_rejected)
        assert platform.get("auditoria", "/auditoria/verificacion")["ok"]
        assert wait_until(lambda: all(platform.get(n, "/health")["outbox"]["pending"] == 0 for n in SERVICES),
                          60, what="outboxes drained")
    finally:
        platform.stop()
