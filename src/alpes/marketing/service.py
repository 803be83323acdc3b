"""Composition root of the marketing service: nothing here runs at import time."""

from __future__ import annotations

import hashlib
import hmac

from alpes.composition import compose
from alpes.kernel.money import CURRENCIES
from alpes.kernel.runtime import PeriodicJob, ServiceRuntime
from alpes.settings import Settings

from . import api, commissions, consumers, payouts, tables, webhooks
from .webhook_dispatch import DispatchConfig, WebhookDispatcher


def build(settings: Settings):
    webhook_master = webhook_master_key(settings)

    def configure(runtime: ServiceRuntime) -> None:
        runtime.jobs.append(PeriodicJob("approve-comisiones", settings.approval_interval_seconds,
                                        lambda: commissions.approve_due_comisiones(runtime.db, runtime.outbox)))
        runtime.jobs.append(PeriodicJob("create-pagos", settings.payout_interval_seconds,
                                        lambda: payouts.create_due_pagos(runtime.db, runtime.outbox,
                                                                         settings.payout_threshold)))
        # Deliveries are written with the events marketing writes (this hook) or consumes (consumers.py).
        runtime.outbox.on_add.append(webhooks.queue_for_own_events)
        dispatcher = WebhookDispatcher(runtime.db, runtime.outbox, webhook_master, DispatchConfig(
            retry_base_seconds=settings.webhook_retry_base_seconds,
            retry_max_delay_seconds=settings.webhook_retry_max_delay_seconds,
            retry_for_seconds=settings.webhook_retry_for_seconds, timeout_seconds=settings.webhook_timeout_seconds,
            disable_after=settings.webhook_disable_after_failures, private_ok=settings.webhook_private_targets),
            service="marketing", metrics=runtime.metrics)
        runtime.jobs.append(PeriodicJob("deliver-webhooks", settings.webhook_dispatch_interval_seconds,
                                        dispatcher.run))
        count_commissions(runtime)

    return compose("marketing", settings, outbox=tables.outbox, inbox=tables.inbox, keys=tables.claves_api,
                   consumers=consumers.consumer_specs(),
                   routes=lambda runtime: api.include_routes(
                       runtime, settings.payout_threshold, postback_master=settings.postback_keys()[0],
                       https_only=not settings.protected_local_mode, webhook_master=webhook_master,
                       webhook_private_ok=settings.webhook_private_targets),
                   configure=configure)


def webhook_master_key(settings: Settings) -> bytes:
    """The key webhook endpoints' secrets derive from: from the postback master key, under a label
    of its own, so one key file serves both and neither secret tells anything of the other."""
    return hmac.new(settings.postback_keys()[0], b"alpes webhook signing", hashlib.sha256).digest()


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
