"""Marketing's HTTP API: the routers of each capability, in the order their paths are matched
and published (advertisers, campaigns, commissions, reports, payouts, keys, webhooks: the routes of each capability)."""

from __future__ import annotations

from decimal import Decimal

from fastapi import FastAPI

from alpes.kernel.runtime import ServiceRuntime

from . import advertisers, campaigns, commissions, keys, payouts, reports, webhooks


def include_routes(runtime: ServiceRuntime, umbral: Decimal = Decimal("50.00"), *, postback_master: bytes,
                   https_only: bool, webhook_master: bytes, webhook_private_ok: bool = False):
    """`postback_master`: the key advertisers' postback secrets derive from; `https_only`: landing
    URLs must be https (false only in the protected local mode); `webhook_master`: the key webhook
    secrets derive from; `webhook_private_ok`: webhook URLs may be http and private (local mode, tests)."""
    routers = [advertisers.router(runtime, postback_master=postback_master),
               campaigns.router(runtime, https_only=https_only), commissions.router(runtime), reports.router(runtime),
               payouts.router(runtime, umbral), keys.router(runtime),
               webhooks.router(runtime, master=webhook_master, private_ok=webhook_private_ok)]

    def include(app: FastAPI) -> None:
        for router in routers:
            app.include_router(router)

    return include
