"""Composition root of the marketing service: nothing here runs at import time."""

from __future__ import annotations

from alpes.composition import compose
from alpes.kernel.money import CURRENCIES
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
        count_commissions(runtime)

    return compose("marketing", settings, outbox=tables.outbox, inbox=tables.inbox, keys=tables.claves_api,
                   consumers=consumers.consumer_specs(),
                   routes=lambda runtime: api.include_routes(
                       runtime, settings.payout_threshold, postback_master=settings.postback_keys()[0],
                       https_only=not settings.protected_local_mode),
                   configure=configure)


def count_commissions(runtime: ServiceRuntime) -> None:
    """GET /metrics: the amounts of the commissions calculated, by currency, counted when the relay
    has published their ComisionCalculada (committed for good, once), not when computed. How many:
    alpes_events_published_total{event_type="ComisionCalculada"}."""
    amounts = runtime.metrics.amounts("alpes_commission_amount", "commission amounts calculated, by currency "
                                      "(exact sums as Decimal, exposed as a float)", "moneda")

    def observe(payload: dict) -> None:
        moneda = payload["moneda"] if payload["moneda"] in CURRENCIES else "other"  # a bounded label
        amounts.add(moneda, payload["monto"])
    runtime.metrics.on_published("ComisionCalculada", observe)
