"""Composition root of the conversiones service: nothing here runs at import time."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta

from alpes.composition import compose
from alpes.kernel.messages import utcnow
from alpes.kernel.runtime import PeriodicJob, ServiceRuntime
from alpes.settings import Settings

from . import api, consumers, handlers, tables


def build(settings: Settings, clock: Callable[[], datetime] = utcnow):
    """`clock` stamps clicks and postbacks (tests place them in time with it)."""
    grace = timedelta(seconds=settings.reference_grace_seconds)

    def configure(runtime: ServiceRuntime) -> None:
        store = handlers.event_store(runtime.registry)
        runtime.jobs.append(PeriodicJob(
            "validate-conversions", 0.25, lambda: handlers.validate_pending(
                runtime.db, store, runtime.outbox, grace, max_conversions_per_ip=settings.max_conversions_per_ip)))

    return compose("conversiones", settings, outbox=tables.outbox, inbox=tables.inbox,
                   consumers=consumers.consumer_specs(), routes=lambda runtime: api.include_routes(
                       runtime, grace, clock, settings.max_conversions_per_ip),
                   configure=configure)
