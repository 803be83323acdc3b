"""The end-to-end run's traffic: its references (affiliate, campaign), the postbacks, and the
audit log watched for each conversion's commission."""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import dataclass

import httpx

from ..platform_harness import Platform
from .measure import say
from .openloop import Request, run_count

HTTP_WORKERS = 32
AUDIT_POLL_SECONDS = 0.05
BENCH_LANDING_HOST = "shop.example.com"  # the bench brand's registered domain


class BenchError(RuntimeError):
    pass


def _wait_for(what: str, check, timeout: float, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class AuditWatcher:
    """Polls the audit log for ComisionCalculada records and notes when each was first seen.

    The audit API does not expose when a record was written, so arrival is observed: a
    record committed between two polls is stamped with the end of the second poll. The
    error is at most one poll interval plus one request.
    """

    def __init__(self, auditoria_url: str, after_seq: int = 0, headers: dict[str, str] | None = None) -> None:
        self.url = f"{auditoria_url}/auditoria/eventos"
        self.after_seq = after_seq
        self.first_seen: dict[str, float] = {}  # conversion_id -> perf_counter
        self.polls = 0
        self.poll_seconds = 0.0
        self.errors = 0
        self.last_new_at = time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="audit-watcher", daemon=True)
        self._client = httpx.Client(timeout=30, headers=headers)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:  # idempotent: also called from the clean-up path
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(30)
        if not self._client.is_closed:
            self._client.close()

    def poll_once(self) -> int:
        """One page; returns how many records it held."""
        started = time.perf_counter()
        response = self._client.get(self.url, params={"event_type": "ComisionCalculada",
                                                      "after_seq": self.after_seq, "limit": 10000})
        response.raise_for_status()
        records = response.json()["eventos"]
        seen_at = time.perf_counter()
        self.polls += 1
        self.poll_seconds += seen_at - started
        for record in records:
            conversion_id = record["payload"].get("conversion_id")
            if conversion_id and conversion_id not in self.first_seen:
                self.first_seen[conversion_id] = seen_at
                self.last_new_at = seen_at
            self.after_seq = max(self.after_seq, record["seq"])
        return len(records)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                full = self.poll_once() >= 10000
            except (httpx.HTTPError, ValueError, KeyError):
                self.errors += 1
                full = False
            if not full:  # a full page means more is waiting: fetch it at once
                self._stop.wait(AUDIT_POLL_SECONDS)


@dataclass
class Sent:
    order_id: str
    send_at: float = 0.0  # perf_counter when the request started
    send_wall: float = 0.0  # time.time() at the same moment, to compare with server timestamps
    answered_at: float = 0.0
    status_code: int | None = None
    conversion_id: str | None = None
    conversion_status: str | None = None
    error: str | None = None


def setup_references(platform_: Platform) -> dict:
    """On a platform with ALPES_AUTH=required: an operator key, a brand with its own key, one
    validated affiliate enrolled in one of the brand's campaigns (its tracking link redirects),
    and proof that conversiones knows them and that a commission reaches the audit log."""
    urls = platform_.urls
    facts: dict = {}
    started = time.perf_counter()
    operator = platform_.create_key("operator", "--name", "bench")
    facts["operator_key_known_after_s"] = round(time.perf_counter() - started, 2)
    operator_headers = {"Authorization": f"Bearer {operator}"}
    with httpx.Client(timeout=30, headers=operator_headers) as http:
        response = http.post(f"{urls['marketing']}/anunciantes", json={
            "nombre": "Bench Brand", "dominios": [BENCH_LANDING_HOST]})
        if response.status_code != 201:
            raise BenchError(f"POST /anunciantes answered {response.status_code}: {response.text}")
        brand_id = response.json()["id"]
        response = http.post(f"{urls['marketing']}/claves", json={
            "rol": "advertiser", "anunciante_id": brand_id, "nombre": "bench brand"})
        if response.status_code != 201:
            raise BenchError(f"POST /claves answered {response.status_code}: {response.text}")
        brand_key = response.json()["key"]
        platform_.wait_key_known(brand_key)
        brand_headers = {"Authorization": f"Bearer {brand_key}"}

        started = time.perf_counter()
        response = http.post(f"{urls['afiliados']}/afiliados", json={
            "user_id": f"bench-{uuid.uuid4().hex[:8]}", "email": f"bench-{uuid.uuid4().hex[:8]}@example.com",
            "nombre": "Bench Partner"})
        if response.status_code != 201:
            raise BenchError(f"POST /afiliados answered {response.status_code}: {response.text}")
        affiliate_id = response.json()["id"]

        def validated():
            estado = http.get(f"{urls['afiliados']}/afiliados/{affiliate_id}").json().get("estado")
            if estado == "rechazado":
                raise BenchError("the bench affiliate was rejected")
            return estado == "validado"

        _wait_for("the affiliate to be validated", validated, 60)
        facts["affiliate_validated_after_s"] = round(time.perf_counter() - started, 2)

        response = http.post(f"{urls['marketing']}/campanas", headers=brand_headers, json={
            "nombre": "Bench", "porcentaje_comision": "10", "landing_url": f"https://{BENCH_LANDING_HOST}/oferta"})
        if response.status_code != 201:
            raise BenchError(f"POST /campanas answered {response.status_code}: {response.text}")
        campaign_id = response.json()["id"]

        def enrolled():  # marketing learns the affiliate through the broker
            answer = http.post(f"{urls['marketing']}/campanas/{campaign_id}/inscripciones", headers=brand_headers,
                               json={"afiliado_id": affiliate_id})
            return answer.json()["link_code"] if answer.status_code in (200, 201) else None

        link_code = _wait_for("the affiliate's enrollment", enrolled, 60, interval=0.5)

        # conversiones learns of both through the broker; a postback validates at once only
        # when it has. Every try is a real conversion with its own order id.
        started = time.perf_counter()
        tries = [0]

        def conversion_validates():
            tries[0] += 1
            answer = http.post(f"{urls['conversiones']}/conversiones", headers=brand_headers, json={
                "affiliate_id": affiliate_id, "campaign_id": campaign_id, "user_id": "bench-warmup",
                "conversion_value": "100.00", "conversion_type": "sale", "order_id": f"warmup-{tries[0]}"})
            if answer.status_code == 403:  # conversiones has not learnt the campaign's owner yet
                return None
            if answer.status_code != 200:
                raise BenchError(f"warm-up POST /conversiones answered {answer.status_code}: {answer.text}")
            body = answer.json()
            return body["id"] if body["status"] == "validated" else None

        warmup_id = _wait_for("a warm-up conversion to validate", conversion_validates, 120, interval=0.5)
        facts["references_known_to_conversiones_after_s"] = round(time.perf_counter() - started, 2)
        facts["warmup_postbacks"] = tries[0]

        def link_redirects():
            answer = http.get(f"{urls['conversiones']}/r/{link_code}", follow_redirects=False)
            return answer.status_code == 302

        _wait_for("the tracking link to redirect", link_redirects, 60, interval=0.5)

        # And the whole chain once: its commission reaches the audit log.
        started = time.perf_counter()
        watcher = AuditWatcher(urls["auditoria"], headers=operator_headers)
        try:
            _wait_for("the warm-up commission in the audit log",
                      lambda: watcher.poll_once() >= 0 and warmup_id in watcher.first_seen, 120)
        finally:
            watcher.stop()
        facts["warmup_commission_audited_after_s"] = round(time.perf_counter() - started, 2)
        facts["audit_seq_before_run"] = watcher.after_seq
    facts.update(affiliate_id=affiliate_id, campaign_id=campaign_id, link_code=link_code,
                 operator_headers=operator_headers, brand_headers=brand_headers)
    return facts


def send_postbacks(conversiones_url: str, affiliate_id: str, campaign_id: str, count: int, rate: int,
                   run_id: str, headers: dict[str, str] | None = None) -> list[Sent]:
    """`count` postbacks over HTTP_WORKERS keep-alive connections (openloop's minimal client on
    one asyncio loop: httpx from threads cost the machine several times the CPU per request),
    each sent when a connection is free, or paced at `rate`/s when rate > 0."""
    request_headers = tuple((headers or {}).items()) + (("Content-Type", "application/json"),)

    def make(i: int) -> Request:
        return Request("POST", "/conversiones", request_headers, json.dumps({
            "affiliate_id": affiliate_id, "campaign_id": campaign_id, "user_id": f"user-{i % 997}",
            "conversion_value": f"{10 + i % 90}.{i % 100:02d}", "conversion_type": "sale",
            "order_id": f"bench-{run_id}-{i}"}).encode())

    wall_minus_perf = time.time() - time.perf_counter()
    say(f"e2e: {count} postbacks over {HTTP_WORKERS} connections")
    figures = run_count(conversiones_url, count, make, concurrency=HTTP_WORKERS, rate=rate)
    sends = []
    for i, outcome in enumerate(figures.outcomes):
        item = Sent(order_id=f"bench-{run_id}-{i}", send_at=outcome.sent_at,
                    send_wall=wall_minus_perf + outcome.sent_at, answered_at=outcome.answered_at,
                    status_code=outcome.status)
        if outcome.error is not None:
            item.error = outcome.error
        elif outcome.status == 200:
            body = json.loads(outcome.body)
            item.conversion_id, item.conversion_status = body["id"], body["status"]
        else:
            item.error = outcome.body[:200].decode("utf-8", "replace")
        sends.append(item)
    return sends
