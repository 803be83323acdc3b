"""HTTP routes of the reports: parse the period and filters, call `reporting`, shape the answer.
Every report holds the caller's tenant only (reporting keeps it so)."""

from __future__ import annotations

from fastapi import APIRouter, Query

from alpes.kernel.http import IsoDate
from alpes.kernel.http_access import Caller
from alpes.kernel.runtime import ServiceRuntime

from .. import reporting


def router(runtime: ServiceRuntime) -> APIRouter:
    router = APIRouter()

    @router.get("/reportes", tags=["reportes"])
    def reportes(caller: Caller, desde: IsoDate | None = None, hasta: IsoDate | None = None,
                 campana_id: str | None = None, afiliado_id: str | None = None) -> dict:
        """Per day, campaign and affiliate: clicks and conversions (analytics-consumer) and
        commissions by state (reporting-consumer), with conversion rates and EPC. An advertiser
        sees its campaigns, an affiliate itself."""
        with runtime.db.read() as session:
            return {"reportes": reporting.report(session, caller, desde, hasta, campana_id, afiliado_id)}

    @router.get("/reportes/campanas/{campana_id}", tags=["reportes"])
    def reporte_campana(campana_id: str, caller: Caller, desde: IsoDate | None = None, hasta: IsoDate | None = None,
                        agrupar: str = Query("dia", pattern="^(dia|total)$")) -> dict:
        """One campaign, all its affiliates: per day (`agrupar=dia`) or one line for the period."""
        with runtime.db.read() as session:
            lines = reporting.grouped_report(session, caller, desde, hasta, agrupar, campana_id=campana_id)
        return {"campana_id": campana_id, "desde": desde, "hasta": hasta, "agrupar": agrupar, "reportes": lines}

    @router.get("/reportes/afiliados/{afiliado_id}", tags=["reportes"])
    def reporte_afiliado(afiliado_id: str, caller: Caller, desde: IsoDate | None = None, hasta: IsoDate | None = None,
                         agrupar: str = Query("dia", pattern="^(dia|total)$")) -> dict:
        """One affiliate, all its campaigns (an advertiser's: its own): per day (`agrupar=dia`) or
        one line for the period."""
        with runtime.db.read() as session:
            lines = reporting.grouped_report(session, caller, desde, hasta, agrupar, afiliado_id=afiliado_id)
        return {"afiliado_id": afiliado_id, "desde": desde, "hasta": hasta, "agrupar": agrupar, "reportes": lines}

    return router
