"""HTTP routes of commission rules and commissions: parse, call `commission_rules` or
`commissions`, shape the answer."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field

from alpes.kernel.errors import RuleViolated
from alpes.kernel.http import MAX_OFFSET, Identifier
from alpes.kernel.http_access import Caller
from alpes.kernel.money import Amount, Percentage, check_places
from alpes.kernel.runtime import ServiceRuntime

from .. import campaigns, commission_rules, commissions, domain


class ReglaComision(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    tipo: Literal["cpa", "cps"]
    monto: Amount | None = None  # cpa: the flat amount per conversion
    porcentaje: Percentage | None = None  # cps: of the sale value
    conversion_type: Literal["sale", "purchase", "lead"] | None = None
    afiliado_id: Identifier | None = None
    min_aprobadas: int | None = Field(None, ge=1, le=1_000_000)


class TopeAfiliado(BaseModel):
    model_config = ConfigDict(extra="forbid")

    monto: Amount
    periodo: Literal["dia", "semana", "mes", "total"]


class ReemplazarReglas(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reglas: list[ReglaComision] = Field(max_length=100)
    tope_por_afiliado: TopeAfiliado | None = None


def _reglas_del_cuerpo(body: ReemplazarReglas) -> tuple[tuple[domain.Regla, ...], domain.Tope | None]:
    """The kind decides which amount a rule needs: name the missing or extra one."""
    reglas = []
    for n, regla in enumerate(body.reglas):
        needed, extra = ("monto", "porcentaje") if regla.tipo == domain.CPA else ("porcentaje", "monto")
        if getattr(regla, needed) is None:
            raise RuleViolated(f"reglas.{n}.{needed}", f"a {regla.tipo} rule needs {needed}")
        if getattr(regla, extra) is not None:
            raise RuleViolated(f"reglas.{n}.{extra}", f"a {regla.tipo} rule takes no {extra}")
        reglas.append(domain.Regla(regla.tipo, regla.monto, regla.porcentaje, regla.conversion_type,
                                   regla.afiliado_id, regla.min_aprobadas))
    tope = body.tope_por_afiliado
    return tuple(reglas), domain.Tope(tope.monto, tope.periodo) if tope else None


def _amounts_fit_currency(body: ReemplazarReglas, moneda: str) -> None:
    """Flat amounts and the cap are in the campaign's currency: no more decimals than it has."""
    amounts = [(f"reglas.{n}.monto", r.monto) for n, r in enumerate(body.reglas) if r.monto is not None]
    if body.tope_por_afiliado is not None:
        amounts.append(("tope_por_afiliado.monto", body.tope_por_afiliado.monto))
    for field, amount in amounts:
        try:
            check_places(amount, moneda)
        except ValueError as error:
            raise RuleViolated(field, str(error)) from None


def _comision(row) -> dict:
    return {"id": row["id"], "conversion_id": row["conversion_id"], "afiliado_id": row["afiliado_id"],
            "campana_id": row["campana_id"], "base": str(row["base"]), "porcentaje": str(row["porcentaje"]),
            "monto": str(row["monto"]), "moneda": row["moneda"], "estado": row["estado"],
            "calculada_en": row["calculada_en"].isoformat(), "pago_id": row["pago_id"],
            "motivo_reversion": row["motivo_reversion"]}


def router(runtime: ServiceRuntime) -> APIRouter:
    router = APIRouter()

    @router.put("/campanas/{campana_id}/reglas", tags=["reglas"])
    def reemplazar_reglas(campana_id: str, body: ReemplazarReglas, caller: Caller) -> dict:
        """Replace the campaign's commission rules (ordered, first match wins) with a new version
        in force from now; no rule matching a conversion leaves it at porcentaje_comision. Only
        the campaign's advertiser or an operator (anyone else: 404, before the body is judged)."""
        reglas, tope = _reglas_del_cuerpo(body)
        with runtime.db.read() as session:
            moneda = campaigns.owned_campana(session, caller, campana_id)["moneda"]
        _amounts_fit_currency(body, moneda)
        with runtime.unit_of_work(caller) as (session, emit):
            version, events = commission_rules.replace_reglas(session, campana_id, reglas, tope, caller=caller)
            emit(events)
        return ver_reglas(campana_id, caller, version)

    @router.get("/campanas/{campana_id}/reglas", tags=["reglas"])
    def ver_reglas(campana_id: str, caller: Caller, version: int | None = Query(None, ge=0)) -> dict:
        """A version of the rules (default: the newest). Version 0 is the campaign's flat percentage."""
        with runtime.db.read() as session:
            return commission_rules.show_reglas(session, campana_id, version, caller=caller)

    @router.get("/comisiones/{comision_id}/explain", tags=["comisiones"])
    def explicar(comision_id: str, caller: Caller) -> dict:
        """How the commission was computed: rule and version, inputs, checks, caps, amount."""
        with runtime.db.read() as session:
            return commissions.explain_comision(session, comision_id, caller)

    @router.get("/comisiones", tags=["comisiones"])
    def comisiones(caller: Caller, afiliado_id: str | None = None, campana_id: str | None = None,
                   conversion_id: str | None = None, limit: int = Query(1000, ge=1, le=10000),
                   offset: int = Query(0, ge=0, le=MAX_OFFSET)) -> dict:
        """The caller's commissions (an advertiser: of its campaigns; an affiliate: its own), oldest first."""
        with runtime.db.read() as session:
            rows = commissions.list_comisiones(session, caller, limit, offset, afiliado_id=afiliado_id,
                                               campana_id=campana_id, conversion_id=conversion_id)
        return {"comisiones": [_comision(r) for r in rows]}

    @router.get("/comisiones/{comision_id}", tags=["comisiones"])
    def comision(comision_id: str, caller: Caller) -> dict:
        with runtime.db.read() as session:
            row = commissions.get_comision(session, comision_id, caller)
        return _comision(row)

    return router
