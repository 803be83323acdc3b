"""Sends the webhook deliveries marketing/webhooks.py wrote: a marketing PeriodicJob.

Each run claims due deliveries in a short transaction (FOR UPDATE SKIP LOCKED on MariaDB, so
instances share the work; on SQLite the job loop's file lock lets one instance run at a time) and
leases them by moving their due time past the longest a send can take; it POSTs them (in parallel,
each with a short timeout) with no transaction open, then records every attempt in a second one. A
process killed between the two leaves its claimed deliveries pending: when the lease ends they are
sent again (at least once; receivers deduplicate by the payload's `id`, the event id).

A delivery is due only when no earlier delivery of the same object (conversion, commission,
payout, affiliate, enrollment) to the same endpoint is still pending, so per endpoint the events of
one object arrive in order. A failed attempt is retried after base × 2^(n-1) seconds (±25 %
jitter, at most max_delay) until retry_for has passed since its first attempt; then it is marked
failed. An endpoint whose attempts fail `disable_after` times in a row is disabled and
WebhookDeshabilitado is published on sistema.eventos, in the transaction that records the attempt.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta

import httpx
import structlog
from sqlalchemy import and_, exists, select, update
from sqlalchemy.orm import Session, aliased

from alpes.kernel.db import Database
from alpes.kernel.messages import OutgoingEvent, utcnow
from alpes.kernel.metrics import Metrics
from alpes.kernel.outbox import Outbox
from alpes.kernel.request_signing import sign_all

from . import tables, webhook_targets
from .webhooks import ENTREGADA, FALLIDA, PENDIENTE, signing_keys
from .webhook_targets import Resolver, system_resolver

log = structlog.get_logger(__name__)

SYSTEM_TOPIC = "sistema.eventos"
USER_AGENT = "AlpesPartner-Webhooks/1"


@dataclass(frozen=True)
class DispatchConfig:
    retry_base_seconds: float = 1.0
    retry_max_delay_seconds: float = 3600.0
    retry_for_seconds: float = 24 * 3600.0
    timeout_seconds: float = 5.0
    disable_after: int = 20
    private_ok: bool = False
    batch_size: int = 50
    concurrency: int = 8

    @property
    def lease(self) -> timedelta:
        # Longer than any send of a batch can take (each connect/read/write bounded by the timeout).
        return timedelta(seconds=4 * self.timeout_seconds + 30)


def retry_delay(attempts: int, base: float, max_delay: float, rand: Callable[[], float] = random.random) -> float:
    """Seconds before the next attempt after `attempts` failed ones: base × 2^(attempts-1), ±25 %
    jitter (so endpoints that failed together do not all retry together), never above max_delay."""
    exponential = base * 2 ** min(attempts - 1, 60)
    return min(max_delay, exponential * (0.75 + 0.5 * rand()))


@dataclass(frozen=True)
class Attempt:
    status: int | None
    latency_ms: int
    error: str | None

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


class WebhookDispatcher:
    def __init__(self, db: Database, outbox: Outbox, master: bytes, config: DispatchConfig, *,
                 service: str = "marketing", metrics: Metrics | None = None, resolver: Resolver = system_resolver,
                 client: httpx.Client | None = None, clock: Callable[[], datetime] = utcnow) -> None:
        self.db = db
        self.outbox = outbox
        self.master = master
        self.config = config
        self.service = service
        self.resolver = resolver
        self.clock = clock
        # No redirects (a 3xx is a failure, never a hop to an unchecked host), no proxies from the
        # environment (they would connect instead of the checked address).
        self.client = client or httpx.Client(timeout=config.timeout_seconds, follow_redirects=False, trust_env=False)
        self._pool = ThreadPoolExecutor(max_workers=config.concurrency, thread_name_prefix="webhook")
        if metrics is not None:
            self._deliveries = metrics.counter("alpes_webhook_deliveries", "webhook delivery attempts by event kind "
                                               "and outcome (delivered, retried, failed)", ["event_type", "outcome"])
            self._latency = metrics.histogram("alpes_webhook_delivery_duration_seconds",
                                              "time of one webhook delivery attempt", ["event_type"])
            self._disabled = metrics.counter("alpes_webhook_endpoints_disabled",
                                             "webhook endpoints disabled after consecutive failures")
        else:
            self._deliveries = self._latency = self._disabled = None

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        self.client.close()

    # -- one run: claim, send, record -------------------------------------------------------------
    def run(self) -> int:
        """Send the due deliveries of one batch; returns how many were attempted."""
        claimed = self._claim()
        if not claimed:
            return 0
        attempts = list(self._pool.map(self._send, claimed))
        self._record(claimed, attempts)
        return len(claimed)

    def _claim(self) -> list[dict]:
        e, w = tables.webhook_entregas, tables.webhooks
        earlier = aliased(e)
        now = self.clock()
        blocked = exists().where(and_(earlier.c.webhook_id == e.c.webhook_id, earlier.c.objeto_id == e.c.objeto_id,
                                      earlier.c.estado == PENDIENTE, earlier.c.id < e.c.id))
        query = (select(e.c.id, e.c.webhook_id, e.c.tipo, e.c.cuerpo, e.c.intentos, e.c.primer_intento_en,
                        w.c.url, w.c.secreto_version, w.c.secreto_anterior_hasta)
                 .join(w, w.c.id == e.c.webhook_id)
                 .where(e.c.estado == PENDIENTE, e.c.proximo_intento_en <= now, w.c.habilitado.is_(True), ~blocked)
                 .order_by(e.c.id).limit(self.config.batch_size))
        with self.db.transaction() as session:
            if not self.db.is_sqlite:
                query = query.with_for_update(skip_locked=True, of=e)
            rows = [dict(r) for r in session.execute(query).mappings()]
            if rows:
                session.execute(update(e).where(e.c.id.in_([r["id"] for r in rows])).values(
                    proximo_intento_en=now + self.config.lease))
        return rows

    def _send(self, row: dict) -> Attempt:
        started = time.perf_counter()
        try:
            # Checked again at each delivery, and the checked address is the one connected to.
            target = webhook_targets.resolve_target(row["url"], private_ok=self.config.private_ok,
                                                    resolver=self.resolver)
        except ValueError as error:
            return Attempt(None, 0, f"refused: {error}"[:500])
        body = row["cuerpo"].encode("utf-8")
        endpoint = {"id": row["webhook_id"], "secreto_version": row["secreto_version"],
                    "secreto_anterior_hasta": row["secreto_anterior_hasta"]}
        headers = {
            "Host": target.host_header, "Content-Type": "application/json", "User-Agent": USER_AGENT,
            "Alpes-Signature": sign_all(signing_keys(self.master, endpoint, self.clock()), body, int(time.time())),
            "Alpes-Webhook-Id": row["webhook_id"], "Alpes-Event-Type": row["tipo"],
            "Alpes-Delivery-Id": str(row["id"]),
        }
        extensions = {"sni_hostname": target.host} if target.pinned_url.startswith("https:") else {}
        try:
            response = self.client.post(target.pinned_url, content=body, headers=headers, extensions=extensions)
            status, error = response.status_code, None
            if not 200 <= status < 300:
                error = f"HTTP {status}: {response.text[:200]}"
        except httpx.HTTPError as failure:
            status, error = None, f"{type(failure).__name__}: {failure}"[:500]
        latency = time.perf_counter() - started
        if self._latency is not None:
            self._latency.labels(row["tipo"]).observe(latency)
        return Attempt(status, round(latency * 1000), error)

    def _record(self, claimed: list[dict], attempts: list[Attempt]) -> None:
        e, i = tables.webhook_entregas, tables.webhook_intentos
        now = self.clock()
        outcomes = []
        with self.db.transaction() as session:
            for row, attempt in zip(claimed, attempts):
                number = row["intentos"] + 1
                first = row["primer_intento_en"] or now
                # The endpoint's row before the delivery's, the order enabling an endpoint locks them
                # in (webhooks.enable_webhook): the two cannot deadlock on MariaDB.
                self._count_failure(session, row["webhook_id"], attempt, now)
                session.execute(i.insert().values(entrega_id=row["id"], numero=number, en=now, status=attempt.status,
                                                  latencia_ms=attempt.latency_ms, error=attempt.error))
                values = {"intentos": number, "primer_intento_en": first, "ultimo_status": attempt.status,
                          "ultima_latencia_ms": attempt.latency_ms, "ultimo_error": attempt.error}
                if attempt.ok:
                    values.update(estado=ENTREGADA, entregada_en=now)
                    outcome = "delivered"
                elif (now - first).total_seconds() >= self.config.retry_for_seconds:
                    values.update(estado=FALLIDA)
                    outcome = "failed"
                else:
                    delay = retry_delay(number, self.config.retry_base_seconds, self.config.retry_max_delay_seconds)
                    values.update(proximo_intento_en=now + timedelta(seconds=delay))
                    outcome = "retried"
                session.execute(update(e).where(e.c.id == row["id"]).values(**values))
                outcomes.append((row["tipo"], outcome))
        if self._deliveries is not None:
            for kind, outcome in outcomes:
                self._deliveries.labels(kind, outcome).inc()

    def _count_failure(self, session: Session, webhook_id: str, attempt: Attempt, now: datetime) -> None:
        w = tables.webhooks
        if attempt.ok:
            session.execute(update(w).where(w.c.id == webhook_id).values(fallos_consecutivos=0))
            return
        session.execute(update(w).where(w.c.id == webhook_id).values(fallos_consecutivos=w.c.fallos_consecutivos + 1))
        endpoint = session.execute(select(w).where(w.c.id == webhook_id)).mappings().first()
        if endpoint is None or not endpoint["habilitado"] or \
                endpoint["fallos_consecutivos"] < self.config.disable_after:
            return
        motivo = f"{endpoint['fallos_consecutivos']} consecutive failed attempts; last: {attempt.error or 'no answer'}"
        session.execute(update(w).where(w.c.id == webhook_id).values(
            habilitado=False, deshabilitado_motivo=motivo[:300], deshabilitado_en=now, actualizado_en=now))
        self.outbox.add(session, [OutgoingEvent(SYSTEM_TOPIC, "WebhookDeshabilitado", webhook_id, {
            "servicio": self.service, "webhook_id": webhook_id, "propietario_rol": endpoint["propietario_rol"],
            "propietario_id": endpoint["propietario_id"], "fallos_consecutivos": endpoint["fallos_consecutivos"],
            "motivo": motivo[:500], "timestamp": now})])
        if self._disabled is not None:
            self._disabled.inc()
        log.warning("webhook endpoint disabled", webhook_id=webhook_id, failures=endpoint["fallos_consecutivos"])
