"""What every service's composition root does the same way: migrate, connect, wire the runtime."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import FastAPI
from sqlalchemy import Table

from .contract import subscriptions_of
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
    runtime = ServiceRuntime(
        name, Database(url), SchemaRegistry.from_directory(), outbox, inbox, settings.resolved_broker_url(),
        tenant=settings.pulsar_tenant, namespace=settings.pulsar_namespace, consumers=consumers,
        max_redeliveries=settings.max_redeliveries, consumer_batch_size=settings.consumer_batch_size,
        subscription_type=settings.subscription_type,
    )
    if configure is not None:
        configure(runtime)
    return create_app(f"AlpesPartner · {name}", runtime, routes(runtime)), runtime
