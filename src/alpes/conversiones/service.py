"""Composition root of the conversiones service: nothing here runs at import time."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from alpes.composition import compose
from alpes.kernel.codec import SchemaRegistry
from alpes.kernel.messages import utcnow
from alpes.kernel.runtime import PeriodicJob, ServiceRuntime
from alpes.settings import Settings

from . import (api, commands, consumers, domain, queries, records, saga, saga_answers, signed_postbacks, tables,
               tracking)

if TYPE_CHECKING:
    from fastapi import FastAPI


def build(settings: Settings, clock: Callable[[], datetime] | None = None):
    """`clock` stamps clicks and postbacks and decides validations (tests place them in time with
    it); by default the UTC clock shifted by ALPES_CONVERSIONES_CLOCK_OFFSET_SECONDS (0)."""
    grace = timedelta(seconds=settings.reference_grace_seconds)
    if clock is None:
        offset = timedelta(seconds=settings.conversiones_clock_offset_seconds)
        clock = utcnow if not offset else lambda: utcnow() + offset
    policy = saga.SagaPolicy(timedelta(seconds=settings.saga_timeout_seconds), settings.saga_max_retries,
                             timedelta(seconds=settings.saga_max_backoff_seconds))
    # The service's one schema registry and conversion event store, handed to consumers, jobs and routes.
    registry = SchemaRegistry.from_directory()
    store = records.event_store(registry)

    # Click ids are tokens signed with keys derived from the event-signing keys (same rotation).
    click_ids = domain.ClickIds(settings.signing_keys())
    recorders: list[tracking.ClickRecorder] = []  # the runtime's, made when it exists

    def click_recorder(runtime: ServiceRuntime) -> tracking.ClickRecorder:
        if not recorders:
            dropped = runtime.metrics.counter(
                "alpes_click_rows_dropped_total", "clicks redirected whose row was dropped (the database "
                "refused clicks until too many waited); their click ids still attribute")
            recorders.append(tracking.ClickRecorder(
                runtime.db, runtime.outbox, click_ids, buffering=lambda: runtime.running,
                wake_relay=runtime.wake_relay, on_dropped=dropped.inc))
        return recorders[0]

    def configure(runtime: ServiceRuntime) -> None:
        clicks = click_recorder(runtime)
        # Every instance writes the clicks it holds; the last ones when it stops.
        runtime.jobs.append(PeriodicJob("record-clicks", tracking.CLICK_FLUSH_INTERVAL_S / 2, clicks.flush,
                                        exclusive=False, on_stop=clicks.close))
        runtime.jobs.append(PeriodicJob(
            "validate-conversions", 0.25, lambda: commands.validate_pending(
                runtime.db, store, runtime.outbox, grace, now=clock(),
                max_conversions_per_ip=settings.max_conversions_per_ip,
                max_conversions_per_caller=settings.max_conversions_per_caller)))
        # The saga's timer runs on the real clock (its deadlines are real waits, not business time).
        runtime.jobs.append(PeriodicJob(
            "saga-timeouts", min(5.0, max(0.2, policy.timeout.total_seconds() / 4)),
            lambda: saga_answers.expire_sagas(runtime.db, store, runtime.outbox, policy)))
        # The fraud signals and callers' minutes, once no velocity rule can read them (and the
        # customers' email hashes with them). Its clock, as the rules': tests place it in time.
        runtime.jobs.append(PeriodicJob("forget-unread-signals", 60.0,
                                        lambda: commands.forget_unread_signals(runtime.db, clock())))
        # Signatures of signed postbacks are remembered while a replay would be inside the window.
        runtime.jobs.append(PeriodicJob("forget-used-signatures", 60.0,
                                        lambda: signed_postbacks.forget_used(runtime.db)))
        # /health says how many sagas wait on marketing and how many are stuck.
        runtime.health_reports["sagas"] = lambda: queries.saga_health(runtime.db)
        # The same figures for Prometheus (GET /metrics), by state: running, stuck.
        runtime.metrics.gauge("alpes_sagas", "sagas waiting on marketing, by state", ["state"],
                              lambda: {(state,): n for state, n in queries.saga_health(runtime.db).items()})

    def routes(runtime: ServiceRuntime) -> Callable[[FastAPI], None]:
        return api.with_saga_routes(api.include_routes(
            runtime, store, grace, clock, settings.max_conversions_per_ip,
            # The visitor cookie's keys derive from the event-signing keys (same rotation).
            visitors=domain.VisitorCookies(settings.signing_keys()), clicks=click_recorder(runtime),
            max_conversions_per_caller=settings.max_conversions_per_caller), runtime, policy)

    return compose("conversiones", settings, outbox=tables.outbox, inbox=tables.inbox, keys=tables.claves_api,
                   consumers=consumers.consumer_specs(store), routes=routes, configure=configure,
                   registry=registry, signed_requests=lambda runtime: signed_postbacks.SignedPostbacks(
                       runtime.db, settings.postback_keys()))
