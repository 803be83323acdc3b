"""Marketing's HTTP API: the routers of each capability, in the order their paths are matched
and published (api_campaigns, api_commissions, api_reports, api_payouts)."""

from __future__ import annotations

from decimal import Decimal

from fastapi import FastAPI

from alpes.kernel.runtime import ServiceRuntime

from . import api_campaigns, api_commissions, api_payouts, api_reports


def include_routes(runtime: ServiceRuntime, umbral: Decimal = Decimal("50.00")):
    routers = [api_campaigns.router(runtime), api_commissions.router(runtime), api_reports.router(runtime),
               api_payouts.router(runtime, umbral)]

    def include(app: FastAPI) -> None:
        for router in routers:
            app.include_router(router)

    return include
