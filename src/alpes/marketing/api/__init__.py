"""Marketing's HTTP API: the routers of each capability, in the order their paths are matched
and published (campaigns, commissions, reports, payouts: the routes of each capability)."""

from __future__ import annotations

from decimal import Decimal

from fastapi import FastAPI

from alpes.kernel.runtime import ServiceRuntime

from . import campaigns, commissions, keys, payouts, reports


def include_routes(runtime: ServiceRuntime, umbral: Decimal = Decimal("50.00")):
    routers = [campaigns.router(runtime), commissions.router(runtime), reports.router(runtime),
               payouts.router(runtime, umbral), keys.router(runtime)]

    def include(app: FastAPI) -> None:
        for router in routers:
            app.include_router(router)

    return include
