"""Composition root of the afiliados service: nothing here runs at import time."""

from __future__ import annotations

from alpes.composition import compose
from alpes.kernel.runtime import PeriodicJob, ServiceRuntime
from alpes.settings import Settings

from . import api, consumers, handlers, tables


def build(settings: Settings):
    def configure(runtime: ServiceRuntime) -> None:
        runtime.jobs.append(PeriodicJob(
            "validate-afiliados", 0.2, lambda: handlers.validate_registered_afiliados(runtime.db, runtime.outbox)))

    return compose("afiliados", settings, outbox=tables.outbox, inbox=tables.inbox,
                   consumers=consumers.consumer_specs(), routes=api.include_routes, configure=configure)
