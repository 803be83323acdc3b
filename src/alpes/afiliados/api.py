from __future__ import annotations

from decimal import Decimal

from fastapi import APIRouter, FastAPI, Query
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import select

from alpes.kernel.http import Problem
from alpes.kernel.runtime import ServiceRuntime

from . import domain, handlers, tables


class RegistrarAfiliado(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    user_id: str = Field(min_length=1, max_length=120)
    email: str = Field(min_length=3, max_length=254)
    nombre: str = Field(min_length=1, max_length=200)

    @field_validator("email")
    @classmethod
    def email_shape(cls, value: str) -> str:
        if not domain.EMAIL.match(value):
            raise ValueError("not a valid email address")
        return value


class Afiliado(BaseModel):
    id: str
    user_id: str
    email: str
    nombre: str
    estado: str
    motivos: list[str]
    registrado_en: str
    validado_en: str | None
    comisiones: int
    ganancias_pendientes: Decimal


def _afiliado(row) -> Afiliado:
    return Afiliado(
        id=row["id"], user_id=row["user_id"], email=row["email"], nombre=row["nombre"], estado=row["estado"],
        motivos=[m for m in row["motivos"].split(",") if m], registrado_en=row["registrado_en"].isoformat(),
        validado_en=row["validado_en"].isoformat() if row["validado_en"] else None,
        comisiones=row["comisiones"], ganancias_pendientes=row["ganancias_pendientes"])


def include_routes(runtime: ServiceRuntime):
    router = APIRouter()
    a = tables.afiliados

    @router.post("/afiliados", status_code=201, response_model=Afiliado)
    def registrar(body: RegistrarAfiliado) -> Afiliado:
        with runtime.unit_of_work() as (session, emit):
            afiliado_id, events = handlers.register_afiliado(
                session, domain.SolicitudRegistro(body.user_id, body.email, body.nombre))
            emit(events)
        return obtener(afiliado_id)

    @router.get("/afiliados")
    def listar(estado: str | None = Query(None, pattern="^(registrado|validado|rechazado)$"),
               limit: int = Query(100, ge=1, le=1000), offset: int = Query(0, ge=0)) -> dict:
        query = select(a).order_by(a.c.registrado_en, a.c.id).limit(limit).offset(offset)
        if estado:
            query = query.where(a.c.estado == estado)
        with runtime.db.read() as session:
            rows = session.execute(query).mappings().all()
        return {"afiliados": [_afiliado(r).model_dump(mode="json") for r in rows]}

    @router.get("/afiliados/{afiliado_id}", response_model=Afiliado)
    def obtener(afiliado_id: str) -> Afiliado:
        with runtime.db.read() as session:
            row = session.execute(select(a).where(a.c.id == afiliado_id)).mappings().first()
        if row is None:
            raise Problem(404, "afiliado_id", "no affiliate with this id")
        return _afiliado(row)

    @router.get("/programas")
    def programas() -> dict:
        p = tables.programas
        with runtime.db.read() as session:
            rows = session.execute(select(p).order_by(p.c.creada_en)).mappings().all()
        return {"programas": [{"id": r["id"], "nombre": r["nombre"], "porcentaje_comision": str(r["porcentaje_comision"]),
                               "moneda": r["moneda"]} for r in rows]}

    def include(app: FastAPI) -> None:
        app.include_router(router, tags=["afiliados"])

    return include
