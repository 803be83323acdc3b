"""What every service's composition root does the same way: migrate, connect, wire the runtime."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import FastAPI
from sqlalchemy import Table

from .contract import subscriptions_of
from .kernel.backlog import BacklogProbe
from .kernel.broker import CONSUMER_IDS_PER_INSTANCE
from .kernel.codec import SchemaRegistry
from .kernel.db import Database, migrate
from .kernel.http import create_app
from .kernel.runtime import ConsumerSpec, ServiceRuntime
from .settings import Settings


def compose(name: str, settings: Settings, *, outbox: Table, inbox: Table, consumers: list[ConsumerSpec],
            routes: Callable[[ServiceRuntime], Callable[[FastAPI], None]],
            configure: Callable[[ServiceRuntime], None] | None = None) -> tuple[FastAPI, ServiceRuntime]:
    declared = {(s.topic, s.name) for s in subscriptions_of(name)}
    wired = {(c.topic, c.subscription) for c in consumers}
    if declared != wired:
        raise RuntimeError(f"{name}: consumers {sorted(wired)} differ from the contract's {sorted(declared)}")
    url = settings.db_url(name)
    migrate(url, f"alpes.{name}:migrations")
    backlog = None
    # `alpes up` hands its services the broker's URL, so "embedded" is told by it, not inferred.
    embedded = settings.embedded_broker or settings.broker_embedded
    if settings.pulsar_admin_url or (embedded and settings.pulsar_metrics_url):
        backlog = BacklogProbe(sorted(wired), admin_url=settings.pulsar_admin_url,
                               metrics_url=None if settings.pulsar_admin_url else settings.pulsar_metrics_url,
                               tenant=settings.pulsar_tenant, namespace=settings.pulsar_namespace)
    runtime = ServiceRuntime(
        name, Database(url), SchemaRegistry.from_directory(), outbox, inbox, settings.resolved_broker_url(),
        tenant=settings.pulsar_tenant, namespace=settings.pulsar_namespace, consumers=consumers,
        max_redeliveries=settings.max_redeliveries, consumer_batch_size=settings.consumer_batch_size,
        subscription_type=settings.subscription_type, instance_index=settings.instance_index,
        reserve_ids=settings.instance_index * CONSUMER_IDS_PER_INSTANCE if embedded else 0,
        backlog=backlog,
    )
    if configure is not None:
        configure(runtime)
    return create_app(f"AlpesPartner · {name}", runtime, routes(runtime),
                      max_body_bytes=settings.max_body_bytes), runtime
