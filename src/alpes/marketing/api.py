from __future__ import annotations

import json
from datetime import date, datetime
from decimal import ROUND_HALF_UP, Decimal
from typing import Annotated, Literal

from fastapi import APIRouter, FastAPI, Query, Response
from pydantic import (BaseModel, ConfigDict, Field, StringConstraints, ValidationInfo,
                      field_validator)
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from alpes.kernel.db import where_equal
from alpes.kernel.http import MAX_OFFSET, BoundedDatetime, Identifier, IsoDate, PlainText, Problem
from alpes.kernel.money import Amount, Currency, Percentage, check_places
from alpes.kernel.runtime import ServiceRuntime

from . import domain, handlers, tables


Code = Annotated[str, StringConstraints(pattern=r"^[a-z0-9_-]{1,40}$")]
Country = Annotated[str, StringConstraints(pattern=r"^[A-Z]{2}$")]


class Segmentacion(BaseModel):
    model_config = ConfigDict(extra="forbid")

    paises: list[Country] = Field(default_factory=list, max_length=250)
    canales: list[Code] = Field(default_factory=list, max_length=50)
    categorias: list[Code] = Field(default_factory=list, max_length=50)


class CrearCampana(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    nombre: PlainText = Field(min_length=1, max_length=200)
    porcentaje_comision: Percentage
    moneda: Currency = "EUR"
    fecha_inicio: BoundedDatetime | None = None
    fecha_fin: BoundedDatetime | None = None
    landing_url: PlainText | None = Field(None, max_length=2000, pattern=r"^https?://[^\s/$.?#][^\s]*$")
    presupuesto: Amount | None = None
    ventana_atribucion_dias: int = Field(30, ge=1, le=365)
    periodo_bloqueo_dias: int = Field(30, ge=0, le=365)
    segmentacion: Segmentacion = Field(default_factory=Segmentacion)
    activar: bool = True
    min_segundos_click_conversion: int | None = Field(None, ge=0, le=86400)
    # Which of a visitor's clicks within the window earns a conversion: the latest or the earliest.
    modelo_atribucion: Literal["ultimo_click", "primer_click"] = "ultimo_click"

    @field_validator("fecha_fin")
    @classmethod
    def end_after_start(cls, fecha_fin: datetime | None, info: ValidationInfo) -> datetime | None:
        inicio = info.data.get("fecha_inicio")
        if fecha_fin is not None and inicio is not None and fecha_fin <= inicio:
            raise ValueError("must be after fecha_inicio")
        return fecha_fin

    @field_validator("presupuesto")
    @classmethod
    def budget_fits_currency(cls, presupuesto: Decimal | None, info: ValidationInfo) -> Decimal | None:
        return presupuesto if presupuesto is None else check_places(presupuesto, info.data.get("moneda"))


class Campana(BaseModel):
    id: str
    nombre: str
    porcentaje_comision: Decimal
    moneda: str
    estado: str
    creada_en: str
    fecha_inicio: datetime | None
    fecha_fin: datetime | None
    landing_url: str | None
    presupuesto: Decimal | None
    ventana_atribucion_dias: int
    periodo_bloqueo_dias: int
    segmentacion: dict[str, list[str]]
    min_segundos_click_conversion: int | None
    modelo_atribucion: str


def _campana(row) -> Campana:
    return Campana(id=row["id"], nombre=row["nombre"], porcentaje_comision=row["porcentaje_comision"],
                   moneda=row["moneda"], estado=row["estado"], creada_en=row["creada_en"].isoformat(),
                   fecha_inicio=row["fecha_inicio"], fecha_fin=row["fecha_fin"], landing_url=row["landing_url"],
                   presupuesto=row["presupuesto"], ventana_atribucion_dias=row["ventana_atribucion_dias"],
                   periodo_bloqueo_dias=row["periodo_bloqueo_dias"],
                   segmentacion={k: [v for v in row[k].split(",") if v] for k in ("paises", "canales", "categorias")},
                   min_segundos_click_conversion=row["min_segundos_click_conversion"],
                   modelo_atribucion=row["modelo_atribucion"])


class Inscribir(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    afiliado_id: Identifier
    canal: Code | None = None
    categoria: Code | None = None


def _inscripcion(row) -> dict:
    return {"id": row["id"], "campana_id": row["campana_id"], "afiliado_id": row["afiliado_id"],
            "link_code": row["link_code"], "canal": row["canal"], "categoria": row["categoria"],
            "estado": row["estado"], "inscrita_en": row["inscrita_en"].isoformat()}


def _comision(row) -> dict:
    return {"id": row["id"], "conversion_id": row["conversion_id"], "afiliado_id": row["afiliado_id"],
            "campana_id": row["campana_id"], "base": str(row["base"]), "porcentaje": str(row["porcentaje"]),
            "monto": str(row["monto"]), "moneda": row["moneda"], "estado": row["estado"],
            "calculada_en": row["calculada_en"].isoformat(), "pago_id": row["pago_id"],
            "motivo_reversion": row["motivo_reversion"]}


class CrearPagos(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    afiliado_id: Identifier | None = None


def _pago(row) -> dict:
    return {"id": row["id"], "afiliado_id": row["afiliado_id"], "moneda": row["moneda"], "monto": str(row["monto"]),
            "estado": row["estado"], "creado_en": row["creado_en"].isoformat(),
            "pagado_en": row["pagado_en"].isoformat() if row["pagado_en"] else None}


# -- reports -------------------------------------------------------------------------------------
_CONTADORES = ("clicks", "detectadas", "validadas", "rechazadas", "reembolsadas", "comisiones")
_IMPORTES = ("ingresos", "ingresos_reembolsados", "monto", "monto_pendiente", "monto_aprobado", "monto_pagado",
             "monto_revertido")
_RATE = Decimal("0.0001")


def _report_lines(session, desde: date | None, hasta: date | None, **filters) -> list[dict]:
    """The stored figures per day, campaign and affiliate, both read models merged."""
    if desde and hasta and desde > hasta:
        raise Problem(422, "desde", "desde is after hasta")
    lines: dict[tuple, dict] = {}
    for table, fields in ((tables.analitica_conversiones, ("clicks", "detectadas", "validadas", "rechazadas",
                                                           "reembolsadas", "ingresos", "ingresos_reembolsados")),
                          (tables.reporte_comisiones, ("comisiones", "monto", "monto_pendiente", "monto_aprobado",
                                                       "monto_pagado", "monto_revertido"))):
        query = where_equal(select(table), table, **filters)
        if desde:
            query = query.where(table.c.dia >= desde)
        if hasta:
            query = query.where(table.c.dia <= hasta)
        for r in session.execute(query).mappings():
            line = lines.setdefault((r["dia"], r["campana_id"], r["afiliado_id"]), {
                "dia": r["dia"].isoformat(), "campana_id": r["campana_id"], "afiliado_id": r["afiliado_id"],
                **{f: 0 for f in _CONTADORES}, **{f: Decimal("0.00") for f in _IMPORTES}})
            for f in fields:
                line[f] += r[f]
    # Money is summed per currency only: each line carries its campaign's currency.
    c = tables.campanas
    campana_ids = {key[1] for key in lines}
    monedas = dict(session.execute(select(c.c.id, c.c.moneda).where(c.c.id.in_(sorted(campana_ids)))).all()) \
        if campana_ids else {}
    for (_, campana_id, _), line in lines.items():
        line["moneda"] = monedas.get(campana_id)
    return [lines[key] for key in sorted(lines)]


def _por(agrupar: str):
    """Per day or for the whole period (None), and per currency: amounts of different
    currencies are never added together."""
    if agrupar == "dia":
        return lambda line: (line["dia"], line["moneda"] or "")
    return lambda line: (None, line["moneda"] or "")


def _summed(lines: list[dict], key, **fixed) -> list[dict]:
    """Sum the lines sharing a key (its first element: a day, or None for the whole period), then
    add the derived figures. A campaign or affiliate that differs within a group (e.g. the
    campaigns of a per-day affiliate report) becomes None, unless given in `fixed`."""
    groups: dict = {}
    for line in lines:
        k = key(line)
        group = groups.get(k)
        if group is None:
            group = groups[k] = {**line, **fixed}
            if k[0] is None:
                group["dia"] = None
            continue
        for f in _CONTADORES + _IMPORTES:
            group[f] += line[f]
        for f in ("campana_id", "afiliado_id"):
            if f not in fixed and group[f] != line[f]:
                group[f] = None
    return [_with_rates(groups[k]) for k in groups]


def _ratio(numerator, denominator) -> str | None:
    return str((Decimal(numerator) / denominator).quantize(_RATE, rounding=ROUND_HALF_UP)) if denominator else None


def _with_rates(line: dict) -> dict:
    """Conversion rates and EPC. tasa_conversion is validated per click when there were clicks,
    else validated per detected conversion (postbacks without tracked clicks); tasa_conversion_base
    says which. EPC: commission earned (pending + approved + paid, not reversed) per click."""
    ganada = line["monto_pendiente"] + line["monto_aprobado"] + line["monto_pagado"]
    line["tasa_validacion"] = _ratio(line["validadas"], line["detectadas"])
    line["tasa_conversion_clicks"] = _ratio(line["validadas"], line["clicks"])
    base = "clicks" if line["clicks"] else "detectadas"
    line["tasa_conversion"] = line["tasa_conversion_clicks"] if line["clicks"] else line["tasa_validacion"]
    line["tasa_conversion_base"] = base
    line["comision_ganada"] = ganada
    line["epc"] = _ratio(ganada, line["clicks"])
    for f in _IMPORTES + ("comision_ganada",):
        line[f] = str(line[f])
    return line


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
            raise Problem(422, f"reglas.{n}.{needed}", f"a {regla.tipo} rule needs {needed}")
        if getattr(regla, extra) is not None:
            raise Problem(422, f"reglas.{n}.{extra}", f"a {regla.tipo} rule takes no {extra}")
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
            raise Problem(422, field, str(error)) from None


def _explicacion(row) -> dict:
    lineage = json.loads(row["explicacion"]) if row["explicacion"] else {
        "inputs": {"base": str(row["base"]), "porcentaje": str(row["porcentaje"])}, "chequeos": [], "topes": None,
        "monto_sin_tope": None}  # booked before commission rules: base × the campaign percentage
    return {"comision_id": row["id"], "conversion_id": row["conversion_id"],
            "click_id": row["click_id"],  # from ConversionValidated v2; null: attributed by ids, or older
            "campana_id": row["campana_id"], "afiliado_id": row["afiliado_id"],
            "version_reglas": row["version_reglas"], "regla_id": row["regla_id"], "tipo": row["tipo_regla"],
            **lineage, "limitado_por": row["limitado_por"], "monto": str(row["monto"]), "moneda": row["moneda"]}


def include_routes(runtime: ServiceRuntime, umbral: Decimal = Decimal("50.00")):
    router = APIRouter()
    c = tables.campanas
    k = tables.comisiones

    @router.post("/campanas", status_code=201, response_model=Campana, tags=["campanas"])
    def crear(body: CrearCampana) -> Campana:
        with runtime.unit_of_work() as (session, emit):
            campana_id, events = handlers.create_campana(session, domain.NuevaCampana(
                nombre=body.nombre, porcentaje_comision=body.porcentaje_comision, moneda=body.moneda,
                vigencia=domain.Vigencia(body.fecha_inicio, body.fecha_fin), landing_url=body.landing_url,
                presupuesto=body.presupuesto, ventana_atribucion_dias=body.ventana_atribucion_dias,
                periodo_bloqueo_dias=body.periodo_bloqueo_dias, activa=body.activar,
                min_segundos_click_conversion=body.min_segundos_click_conversion,
                modelo_atribucion=body.modelo_atribucion,
                segmentacion=domain.Segmentacion(frozenset(body.segmentacion.paises),
                                                 frozenset(body.segmentacion.canales),
                                                 frozenset(body.segmentacion.categorias))))
            emit(events)
        return obtener(campana_id)

    def _action(accion: str):
        def change(campana_id: str) -> Campana:
            with runtime.unit_of_work() as (session, emit):
                emit(handlers.change_campana_estado(session, campana_id, accion))
            return obtener(campana_id)
        change.__name__ = f"{accion}_campana"
        return change

    for accion in ("activar", "pausar", "finalizar"):
        router.add_api_route(f"/campanas/{{campana_id}}/{accion}", _action(accion), methods=["POST"],
                             response_model=Campana, tags=["campanas"],
                             summary=f"{accion.capitalize()} a campaign (409 if its state does not allow it)")

    @router.get("/campanas", tags=["campanas"])
    def listar(limit: int = Query(100, ge=1, le=1000), offset: int = Query(0, ge=0, le=MAX_OFFSET)) -> dict:
        with runtime.db.read() as session:
            rows = session.execute(select(c).order_by(c.c.creada_en, c.c.id).limit(limit).offset(offset)).mappings().all()
        return {"campanas": [_campana(r).model_dump(mode="json") for r in rows]}

    @router.get("/campanas/{campana_id}", response_model=Campana, tags=["campanas"])
    def obtener(campana_id: str) -> Campana:
        with runtime.db.read() as session:
            row = session.execute(select(c).where(c.c.id == campana_id)).mappings().first()
        if row is None:
            raise Problem(404, "campana_id", "no campaign with this id")
        return _campana(row)

    @router.post("/campanas/{campana_id}/inscripciones", status_code=201, tags=["inscripciones"])
    def inscribir(campana_id: str, body: Inscribir, response: Response) -> dict:
        """Enroll an enabled affiliate the campaign's segmentation admits; 200 with the same
        enrollment when it already was enrolled."""
        i = tables.inscripciones
        try:
            with runtime.unit_of_work() as (session, emit):
                inscripcion_id, created, events = handlers.enroll_afiliado(
                    session, campana_id, body.afiliado_id, body.canal, body.categoria)
                emit(events)
        except IntegrityError:
            created = False  # a concurrent twin enrolled the pair first: answer with its enrollment
            with runtime.db.read() as session:
                inscripcion_id = session.scalar(select(i.c.id).where(
                    i.c.campana_id == campana_id, i.c.afiliado_id == body.afiliado_id))
            if inscripcion_id is None:
                raise
        if not created:
            response.status_code = 200
        with runtime.db.read() as session:
            row = session.execute(select(i).where(i.c.id == inscripcion_id)).mappings().one()
        return _inscripcion(row)

    @router.get("/campanas/{campana_id}/inscripciones", tags=["inscripciones"])
    def inscripciones(campana_id: str, estado: str | None = None) -> dict:
        i = tables.inscripciones
        obtener(campana_id)  # 404 for an unknown campaign
        query = where_equal(select(i).order_by(i.c.inscrita_en, i.c.id).where(i.c.campana_id == campana_id),
                            i, estado=estado)
        with runtime.db.read() as session:
            rows = session.execute(query).mappings().all()
        return {"inscripciones": [_inscripcion(r) for r in rows]}

    @router.put("/campanas/{campana_id}/reglas", tags=["reglas"])
    def reemplazar_reglas(campana_id: str, body: ReemplazarReglas) -> dict:
        """Replace the campaign's commission rules (ordered, first match wins) with a new version
        in force from now; no rule matching a conversion leaves it at porcentaje_comision."""
        reglas, tope = _reglas_del_cuerpo(body)
        _amounts_fit_currency(body, obtener(campana_id).moneda)
        with runtime.unit_of_work() as (session, emit):
            version, events = handlers.replace_reglas(session, campana_id, reglas, tope)
            emit(events)
        return ver_reglas(campana_id, version)

    @router.get("/campanas/{campana_id}/reglas", tags=["reglas"])
    def ver_reglas(campana_id: str, version: int | None = Query(None, ge=0)) -> dict:
        """A version of the rules (default: the newest). Version 0 is the campaign's flat percentage."""
        campana = obtener(campana_id)
        with runtime.db.read() as session:
            versiones = {v.version: v for v in handlers.load_versiones(session, campana_id)}
        version = max(versiones, default=0) if version is None else version
        if version == 0:
            return {"campana_id": campana_id, "version": 0, "vigente_desde": campana.creada_en,
                    "versiones": sorted(versiones), "reglas": [], "tope_por_afiliado": None,
                    "porcentaje_comision": str(campana.porcentaje_comision)}
        if version not in versiones:
            raise Problem(404, "version", "no rule set with this version")
        conjunto = versiones[version]
        tope = conjunto.tope_por_afiliado
        return {"campana_id": campana_id, "version": version, "vigente_desde": conjunto.vigente_desde.isoformat(),
                "versiones": sorted(versiones), "reglas": handlers.reglas_json(conjunto.reglas),
                "tope_por_afiliado": {"monto": str(tope.monto), "periodo": tope.periodo} if tope else None,
                "porcentaje_comision": str(campana.porcentaje_comision)}

    @router.get("/comisiones/{comision_id}/explain", tags=["comisiones"])
    def explicar(comision_id: str) -> dict:
        """How the commission was computed: rule and version, inputs, checks, caps, amount."""
        with runtime.db.read() as session:
            row = session.execute(select(k).where(k.c.id == comision_id)).mappings().first()
        if row is None:
            raise Problem(404, "comision_id", "no commission with this id")
        return _explicacion(row)

    @router.get("/comisiones", tags=["comisiones"])
    def comisiones(afiliado_id: str | None = None, campana_id: str | None = None, conversion_id: str | None = None,
                   limit: int = Query(1000, ge=1, le=10000), offset: int = Query(0, ge=0, le=MAX_OFFSET)) -> dict:
        query = select(k).order_by(k.c.calculada_en, k.c.id).limit(limit).offset(offset)
        query = where_equal(query, k, afiliado_id=afiliado_id, campana_id=campana_id, conversion_id=conversion_id)
        with runtime.db.read() as session:
            rows = session.execute(query).mappings().all()
        return {"comisiones": [_comision(r) for r in rows]}

    @router.get("/comisiones/{comision_id}", tags=["comisiones"])
    def comision(comision_id: str) -> dict:
        with runtime.db.read() as session:
            row = session.execute(select(k).where(k.c.id == comision_id)).mappings().first()
        if row is None:
            raise Problem(404, "comision_id", "no commission with this id")
        return _comision(row)

    @router.get("/reportes", tags=["reportes"])
    def reportes(desde: IsoDate | None = None, hasta: IsoDate | None = None, campana_id: str | None = None,
                 afiliado_id: str | None = None) -> dict:
        """Per day, campaign and affiliate: clicks and conversions (analytics-consumer) and
        commissions by state (reporting-consumer), with conversion rates and EPC."""
        with runtime.db.read() as session:
            lines = _report_lines(session, desde, hasta, campana_id=campana_id, afiliado_id=afiliado_id)
        return {"reportes": _summed(lines, lambda line: (line["dia"], line["campana_id"], line["afiliado_id"]))}

    @router.get("/reportes/campanas/{campana_id}", tags=["reportes"])
    def reporte_campana(campana_id: str, desde: IsoDate | None = None, hasta: IsoDate | None = None,
                        agrupar: str = Query("dia", pattern="^(dia|total)$")) -> dict:
        """One campaign, all its affiliates: per day (`agrupar=dia`) or one line for the period."""
        with runtime.db.read() as session:
            lines = _report_lines(session, desde, hasta, campana_id=campana_id)
        return {"campana_id": campana_id, "desde": desde, "hasta": hasta, "agrupar": agrupar,
                "reportes": _summed(lines, _por(agrupar), campana_id=campana_id)}

    @router.get("/reportes/afiliados/{afiliado_id}", tags=["reportes"])
    def reporte_afiliado(afiliado_id: str, desde: IsoDate | None = None, hasta: IsoDate | None = None,
                         agrupar: str = Query("dia", pattern="^(dia|total)$")) -> dict:
        """One affiliate, all its campaigns: per day (`agrupar=dia`) or one line for the period."""
        with runtime.db.read() as session:
            lines = _report_lines(session, desde, hasta, afiliado_id=afiliado_id)
        return {"afiliado_id": afiliado_id, "desde": desde, "hasta": hasta, "agrupar": agrupar,
                "reportes": _summed(lines, _por(agrupar), afiliado_id=afiliado_id)}

    @router.get("/pagos/saldos", tags=["pagos"])
    def saldos() -> dict:
        """payment-consumer's ledger, summed per affiliate and currency."""
        l = tables.ledger_pagos
        with runtime.db.read() as session:
            rows = session.execute(select(l.c.afiliado_id, l.c.moneda, func.count(), func.sum(l.c.monto))
                                   .group_by(l.c.afiliado_id, l.c.moneda).order_by(l.c.afiliado_id)).all()
        return {"saldos": [{"afiliado_id": a, "moneda": m, "lineas": n, "saldo": str(s)} for a, m, n, s in rows]}

    @router.get("/pagos/ledger", tags=["pagos"])
    def ledger(afiliado_id: str | None = None, limit: int = Query(1000, ge=1, le=10000)) -> dict:
        l = tables.ledger_pagos
        query = select(l).order_by(l.c.id).limit(limit)
        if afiliado_id:
            query = query.where(l.c.afiliado_id == afiliado_id)
        with runtime.db.read() as session:
            rows = session.execute(query).mappings().all()
        return {"ledger": [{"id": r["id"], "afiliado_id": r["afiliado_id"], "comision_id": r["comision_id"],
                            "tipo": r["tipo"], "monto": str(r["monto"]), "moneda": r["moneda"],
                            "registrado_en": r["registrado_en"].isoformat()} for r in rows]}

    @router.post("/pagos", tags=["pagos"])
    def crear_pagos(body: CrearPagos | None = None) -> dict:
        """Create the payouts due now: per affiliate and currency, every approved unpaid commission
        plus outstanding negative adjustments, when they reach the threshold. Lists those created."""
        afiliado_id = body.afiliado_id if body else None
        with runtime.unit_of_work() as (session, emit):
            ids, events = handlers.create_pagos(session, umbral, afiliado_id)
            emit(events)
        return {"pagos": [pago(pago_id) for pago_id in ids]}

    @router.get("/pagos", tags=["pagos"])
    def pagos(afiliado_id: str | None = None, estado: str | None = Query(None, pattern="^(pendiente|pagado)$"),
              limit: int = Query(1000, ge=1, le=10000), offset: int = Query(0, ge=0, le=MAX_OFFSET)) -> dict:
        t = tables.pagos
        query = where_equal(select(t).order_by(t.c.creado_en, t.c.id).limit(limit).offset(offset), t,
                            afiliado_id=afiliado_id, estado=estado)
        with runtime.db.read() as session:
            rows = session.execute(query).mappings().all()
        return {"pagos": [_pago(r) for r in rows]}

    @router.get("/pagos/{pago_id}", tags=["pagos"])
    def pago(pago_id: str) -> dict:
        """A payout with its lines (commissions and negative adjustments)."""
        t, lineas = tables.pagos, tables.pago_lineas
        with runtime.db.read() as session:
            row = session.execute(select(t).where(t.c.id == pago_id)).mappings().first()
            lines = session.execute(select(lineas).where(lineas.c.pago_id == pago_id)
                                    .order_by(lineas.c.linea)).mappings().all()
        if row is None:
            raise Problem(404, "pago_id", "no payout with this id")
        return {**_pago(row), "lineas": [{"linea": r["linea"], "tipo": r["tipo"], "referencia_id": r["referencia_id"],
                                          "monto": str(r["monto"])} for r in lines]}

    @router.post("/pagos/{pago_id}/pagar", tags=["pagos"])
    def pagar(pago_id: str) -> dict:
        """Mark the payout paid (its commissions become paid); paying it again changes nothing."""
        with runtime.unit_of_work() as (session, emit):
            emit(handlers.pay_pago(session, pago_id))
        return pago(pago_id)

    def include(app: FastAPI) -> None:
        app.include_router(router)

    return include
