"""Composition root of the marketing service: nothing here runs at import time."""

from __future__ import annotations

from alpes.composition import compose
from alpes.kernel.runtime import PeriodicJob, ServiceRuntime
from alpes.settings import Settings

from . import api, commissions, consumers, payouts, tables


def build(settings: Settings):
    def configure(runtime: ServiceRuntime) -> None:
        runtime.jobs.append(PeriodicJob("approve-comisiones", settings.approval_interval_seconds,
                                        lambda: commissions.approve_due_comisiones(runtime.db, runtime.outbox)))
        runtime.jobs.append(PeriodicJob("create-pagos", settings.payout_interval_seconds,
                                        lambda: payouts.create_due_pagos(runtime.db, runtime.outbox,
                                                                         settings.payout_threshold)))

    return compose("marketing", settings, outbox=tables.outbox, inbox=tables.inbox, keys=tables.claves_api,
                   consumers=consumers.consumer_specs(),
                   routes=lambda runtime: api.include_routes(
                       runtime, settings.payout_threshold, postback_master=settings.postback_keys()[0],
                       https_only=not settings.protected_local_mode),
                   configure=configure)
