"""What every service's composition root does the same way: migrate, connect, wire the runtime.

Each collaborator is built here once and handed down: the database, the schema registry (also
`runtime.registry`, for whatever else of the service encodes or decodes events), the backlog
probe, the service's tracing (kernel/tracing.py: one TracerProvider per service, exporting only
when an OTLP endpoint is configured), and, only when the broker is the embedded one, its quirks
(kernel/embedded_broker.py).
The runtime opens its broker clients when it starts; nothing connects at import time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from datetime import timedelta

from fastapi import FastAPI
from sqlalchemy import Table

from . import asyncapi
from .authorization import LIMIT_SUBJECTS, RULES
from .contract import subscriptions_of
from .kernel.access import Gate, KeyRing, RateLimited
from .kernel.backlog import BacklogProbe
from .kernel.codec import SchemaRegistry
from .kernel.db import Database, migrate, tighten_directory
from .kernel.embedded_broker import EmbeddedBrokerQuirks
from .kernel.http import create_app
from .kernel.http_access import AccessControl, SignedRequests
from .kernel.messages import utcnow
from .kernel.outbox import forget_sent
from .kernel.pulsar_admin import AdminBacklog
from .kernel.ratelimit import RateLimit, RateLimiter
from .kernel.runtime import ConsumerSpec, PeriodicJob, ServiceRuntime
from .kernel.signing import EventSigner
from .kernel.tracing import Tracing
from .settings import Settings


def compose(name: str, settings: Settings, *, outbox: Table, inbox: Table, keys: Table,
            consumers: list[ConsumerSpec], routes: Callable[[ServiceRuntime], Callable[[FastAPI], None]],
            configure: Callable[[ServiceRuntime], None] | None = None,
            registry: SchemaRegistry | None = None,
            signed_requests: Callable[[ServiceRuntime], SignedRequests] | None = None) -> tuple[FastAPI, ServiceRuntime]:
    """`registry`: the service's schema registry when its own root needs it before the runtime
    exists (for an event store its consumers use); built here otherwise. `keys`: the service's copy
    of the API keys. `signed_requests`: the verifier of advertisers' signed requests, if any route takes them."""
    declared = {(s.topic, s.name): s for s in subscriptions_of(name)}
    wired = {(c.topic, c.subscription) for c in consumers}
    if set(declared) != wired:
        raise RuntimeError(f"{name}: consumers {sorted(wired)} differ from the contract's {sorted(declared)}")
    # How long each waits to fill a batch is the contract's, declared beside the subscription.
    consumers = [replace(c, batch_wait_ms=declared[c.topic, c.subscription].batch_wait_ms) for c in consumers]
    url = settings.db_url(name)
    migrate(url, f"alpes.{name}:migrations")
    quirks = embedded_broker_quirks(settings)
    runtime = ServiceRuntime(
        name, Database(url), registry or SchemaRegistry.from_directory(), outbox, inbox, settings.resolved_broker_url(),
        tenant=settings.pulsar_tenant, namespace=settings.pulsar_namespace, consumers=consumers,
        max_redeliveries=settings.max_redeliveries, consumer_batch_size=settings.consumer_batch_size,
        subscription_type=settings.subscription_type, instance_index=settings.instance_index,
        quirks=quirks, backlog=backlog_probe(settings, sorted(wired), quirks),
        signer=EventSigner(settings.signing_keys()), broker_token=settings.pulsar_token,
        # Spans exported over OTLP when OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT is set, else only propagated.
        tracing=Tracing.from_environment(name),
    )
    tighten_directory(settings.data_dir)  # ours: SQLite files, the local signing key, logs (0700)
    keep_sent = timedelta(hours=settings.outbox_keep_sent_hours)
    runtime.jobs.append(PeriodicJob("forget-sent-events", 60.0,
                                    lambda: forget_sent(runtime.db, outbox, utcnow() - keep_sent)))
    if configure is not None:
        configure(runtime)
    access = AccessControl(
        name, RULES[name], Gate(runtime.db, KeyRing(keys), protected_local=settings.protected_local_mode),
        signed_requests=signed_requests(runtime) if signed_requests is not None else None,
        limits=rate_limits(settings, runtime), limit_subjects=LIMIT_SUBJECTS,
        limits_may_block=settings.redis_url is not None)
    runtime.health_reports["access"] = access.describe
    return create_app(f"AlpesPartner · {name}", runtime, routes(runtime),
                      max_body_bytes=settings.max_body_bytes, trusted_proxies=settings.trusted_proxies,
                      access=access, asyncapi=asyncapi.served), runtime


def rate_limits(settings: Settings, runtime: ServiceRuntime) -> Callable[[str, str], None]:
    """(bucket, subject) -> None, or RateLimited; counted in Redis when ALPES_REDIS_URL is set (all
    instances of the service share the counts), in this process otherwise or while Redis is down."""
    limiter = RateLimiter(settings.redis_url,
                          on_degraded=lambda reason: runtime.announce("ServicioDegradado", {"motivo": reason}),
                          on_recovered=lambda: runtime.announce("ServicioRecuperado", {}))
    per_minute = {"postbacks:key": settings.rate_limit_postbacks_per_key,
                  "postbacks:ip": settings.rate_limit_postbacks_per_ip,
                  "clicks:ip": settings.rate_limit_clicks_per_ip}
    runtime.health_reports["rate_limits"] = limiter.describe
    runtime.metrics.gauge("alpes_rate_limiter_degraded", "1 while rate limits are counted in-process because "
                          "Redis is unreachable", [], lambda: {(): float(limiter.describe()["degraded"])})

    def hit(bucket: str, subject: str) -> None:
        limit = per_minute[bucket]
        decision = limiter.hit(RateLimit(bucket, limit, 60), subject)
        if not decision.allowed:
            raise RateLimited(f"more than {limit} requests a minute ({bucket.replace(':', ' per ')})",
                              decision.retry_after)
    return hit


def embedded_broker_quirks(settings: Settings) -> EmbeddedBrokerQuirks | None:
    """The seam: the embedded broker's quirks when the settings name no broker URL; None on Apache Pulsar."""
    if not settings.embedded_broker:
        return None
    return EmbeddedBrokerQuirks(instance_index=settings.instance_index, metrics_url=settings.embedded_metrics_url())


def backlog_probe(settings: Settings, subscriptions: list[tuple[str, str]],
                  quirks: EmbeddedBrokerQuirks | None) -> BacklogProbe | None:
    """The admin API when one is configured, else the embedded broker's metrics; None: not known."""
    tenant, namespace = settings.pulsar_tenant, settings.pulsar_namespace
    if settings.pulsar_admin_url:
        source = AdminBacklog(settings.pulsar_admin_url, tenant=tenant, namespace=namespace,
                              token=settings.pulsar_token)  # its role may read the stats of what it consumes
    else:
        source = quirks.backlog_source(tenant, namespace) if quirks is not None else None
    return BacklogProbe(subscriptions, source) if source is not None else None
