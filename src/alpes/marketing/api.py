from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal
from typing import Annotated

from fastapi import APIRouter, FastAPI, Query, Response
from pydantic import (AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints, ValidationInfo,
                      field_validator)
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from alpes.kernel.db import where_equal
from alpes.kernel.http import Problem
from alpes.kernel.money import Amount, Currency, Percentage
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

    nombre: str = Field(min_length=1, max_length=200)
    porcentaje_comision: Percentage
    moneda: Currency = "EUR"
    fecha_inicio: AwareDatetime | None = None
    fecha_fin: AwareDatetime | None = None
    landing_url: str | None = Field(None, max_length=2000, pattern=r"^https?://[^\s/$.?#][^\s]*$")
    presupuesto: Amount | None = None
    ventana_atribucion_dias: int = Field(30, ge=1, le=365)
    periodo_bloqueo_dias: int = Field(30, ge=0, le=365)
    segmentacion: Segmentacion = Field(default_factory=Segmentacion)
    activar: bool = True

    @field_validator("fecha_fin")
    @classmethod
    def end_after_start(cls, fecha_fin: datetime | None, info: ValidationInfo) -> datetime | None:
        inicio = info.data.get("fecha_inicio")
        if fecha_fin is not None and inicio is not None and fecha_fin <= inicio:
            raise ValueError("must be after fecha_inicio")
        return fecha_fin


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


def _campana(row) -> Campana:
    return Campana(id=row["id"], nombre=row["nombre"], porcentaje_comision=row["porcentaje_comision"],
                   moneda=row["moneda"], estado=row["estado"], creada_en=row["creada_en"].isoformat(),
                   fecha_inicio=row["fecha_inicio"], fecha_fin=row["fecha_fin"], landing_url=row["landing_url"],
                   presupuesto=row["presupuesto"], ventana_atribucion_dias=row["ventana_atribucion_dias"],
                   periodo_bloqueo_dias=row["periodo_bloqueo_dias"],
                   segmentacion={k: [v for v in row[k].split(",") if v] for k in ("paises", "canales", "categorias")})


class Inscribir(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    afiliado_id: str = Field(min_length=1, max_length=36)
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

    afiliado_id: str | None = Field(None, min_length=1, max_length=36)


def _pago(row) -> dict:
    return {"id": row["id"], "afiliado_id": row["afiliado_id"], "moneda": row["moneda"], "monto": str(row["monto"]),
            "estado": row["estado"], "creado_en": row["creado_en"].isoformat(),
            "pagado_en": row["pagado_en"].isoformat() if row["pagado_en"] else None}


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
    def listar(limit: int = Query(100, ge=1, le=1000), offset: int = Query(0, ge=0)) -> dict:
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

    @router.get("/comisiones", tags=["comisiones"])
    def comisiones(afiliado_id: str | None = None, campana_id: str | None = None, conversion_id: str | None = None,
                   limit: int = Query(1000, ge=1, le=10000), offset: int = Query(0, ge=0)) -> dict:
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
    def reportes(desde: date | None = None, hasta: date | None = None, campana_id: str | None = None,
                 afiliado_id: str | None = None) -> dict:
        """Per day, campaign and affiliate: conversions (analytics-consumer) and commissions (reporting-consumer)."""
        if desde and hasta and desde > hasta:
            raise Problem(422, "desde", "desde is after hasta")
        rows: dict[tuple, dict] = {}
        with runtime.db.read() as session:
            for table, fields in ((tables.analitica_conversiones, ("detectadas", "validadas", "rechazadas", "ingresos")),
                                  (tables.reporte_comisiones, ("comisiones", "monto"))):
                query = where_equal(select(table), table, campana_id=campana_id, afiliado_id=afiliado_id)
                if desde:
                    query = query.where(table.c.dia >= desde)
                if hasta:
                    query = query.where(table.c.dia <= hasta)
                for r in session.execute(query).mappings():
                    key = (r["dia"], r["campana_id"], r["afiliado_id"])
                    line = rows.setdefault(key, {
                        "dia": r["dia"].isoformat(), "campana_id": r["campana_id"], "afiliado_id": r["afiliado_id"],
                        "detectadas": 0, "validadas": 0, "rechazadas": 0, "ingresos": Decimal("0.00"),
                        "comisiones": 0, "monto": Decimal("0.00")})
                    for f in fields:
                        line[f] += r[f]
        lines = [rows[key] for key in sorted(rows)]
        for line in lines:
            line["tasa_validacion"] = str((Decimal(line["validadas"]) / line["detectadas"]).quantize(Decimal("0.0001"))) \
                if line["detectadas"] else None
            line["ingresos"] = str(line["ingresos"])
            line["monto"] = str(line["monto"])
        return {"reportes": lines}

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
              limit: int = Query(1000, ge=1, le=10000), offset: int = Query(0, ge=0)) -> dict:
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
