from __future__ import annotations

from decimal import Decimal

from fastapi import APIRouter, FastAPI, Query
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import select

from alpes.kernel.errors import NotFound, RuleViolated
from alpes.kernel.http import MAX_OFFSET, PlainText
from alpes.kernel.runtime import ServiceRuntime

from . import domain, handlers, tables


class RegistrarAfiliado(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    user_id: PlainText = Field(min_length=1, max_length=120)
    email: str = Field(min_length=3, max_length=254, pattern=domain.EMAIL.pattern)
    nombre: PlainText = Field(min_length=1, max_length=200)

    # Optional so the original body {user_id, email, nombre} is still a valid registration.
    tipo_documento: str | None = None
    numero_documento: str | None = None
    pais: str | None = None
    metodo_pago: str | None = None

    @field_validator("email")
    @classmethod
    def email_shape(cls, value: str) -> str:
        if not domain.EMAIL.match(value):
            raise ValueError("not a valid email address")
        return value

    @field_validator("tipo_documento")
    @classmethod
    def known_tipo_documento(cls, value: str | None) -> str | None:
        return _one_of(value.upper(), domain.TIPOS_DOCUMENTO) if value is not None else None

    @field_validator("numero_documento")
    @classmethod
    def numero_documento_shape(cls, value: str | None) -> str | None:
        if value is not None and not domain.NUMERO_DOCUMENTO.match(value):
            raise ValueError("must be 4 to 20 letters or digits")
        return value

    @field_validator("pais")
    @classmethod
    def known_pais(cls, value: str | None) -> str | None:
        if value is not None and value.upper() not in domain.PAISES:
            raise ValueError("must be an ISO 3166-1 alpha-2 country code")
        return value.upper() if value is not None else None

    @field_validator("metodo_pago")
    @classmethod
    def known_metodo_pago(cls, value: str | None) -> str | None:
        return _one_of(value.lower(), domain.METODOS_PAGO) if value is not None else None


def _one_of(value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"must be one of {', '.join(allowed)}")
    return value


class SuspenderAfiliado(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    motivo: PlainText = Field(min_length=1, max_length=500)


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
    ganancias_aprobadas: Decimal
    ganancias_pagadas: Decimal
    ganancias_revertidas: Decimal
    tipo_documento: str | None
    numero_documento: str | None
    pais: str | None
    metodo_pago: str | None
    motivo_suspension: str | None


def _afiliado(row) -> Afiliado:
    return Afiliado(
        id=row["id"], user_id=row["user_id"], email=row["email"], nombre=row["nombre"], estado=row["estado"],
        motivos=[m for m in row["motivos"].split(",") if m], registrado_en=row["registrado_en"].isoformat(),
        validado_en=row["validado_en"].isoformat() if row["validado_en"] else None,
        comisiones=row["comisiones"], ganancias_pendientes=row["ganancias_pendientes"],
        ganancias_aprobadas=row["ganancias_aprobadas"], ganancias_pagadas=row["ganancias_pagadas"],
        ganancias_revertidas=row["ganancias_revertidas"],
        tipo_documento=row["tipo_documento"], numero_documento=row["numero_documento"], pais=row["pais"],
        metodo_pago=row["metodo_pago"], motivo_suspension=row["motivo_suspension"])


def include_routes(runtime: ServiceRuntime):
    router = APIRouter()
    a = tables.afiliados

    @router.post("/afiliados", status_code=201, response_model=Afiliado)
    def registrar(body: RegistrarAfiliado) -> Afiliado:
        # A document is its type and its number: one without the other identifies nobody.
        if (body.tipo_documento is None) != (body.numero_documento is None):
            missing = "tipo_documento" if body.tipo_documento is None else "numero_documento"
            raise RuleViolated(missing, "tipo_documento and numero_documento go together")
        with runtime.unit_of_work() as (session, emit):
            afiliado_id, events = handlers.register_afiliado(session, domain.SolicitudRegistro(
                body.user_id, body.email, body.nombre, body.tipo_documento, body.numero_documento, body.pais,
                body.metodo_pago))
            emit(events)
        return obtener(afiliado_id)

    @router.post("/afiliados/{afiliado_id}/aprobar", response_model=Afiliado)
    def aprobar(afiliado_id: str) -> Afiliado:
        """A human approves an affiliate the automatic validation rejected."""
        with runtime.unit_of_work() as (session, emit):
            emit(handlers.approve_afiliado(session, afiliado_id))
        return obtener(afiliado_id)

    @router.post("/afiliados/{afiliado_id}/suspender", response_model=Afiliado)
    def suspender(afiliado_id: str, body: SuspenderAfiliado) -> Afiliado:
        with runtime.unit_of_work() as (session, emit):
            emit(handlers.suspend_afiliado(session, afiliado_id, body.motivo))
        return obtener(afiliado_id)

    @router.post("/afiliados/{afiliado_id}/reactivar", response_model=Afiliado)
    def reactivar(afiliado_id: str) -> Afiliado:
        with runtime.unit_of_work() as (session, emit):
            emit(handlers.reactivate_afiliado(session, afiliado_id))
        return obtener(afiliado_id)

    @router.get("/afiliados")
    def listar(estado: str | None = Query(None, pattern="^(registrado|validado|rechazado|suspendido)$"),
               limit: int = Query(100, ge=1, le=1000), offset: int = Query(0, ge=0, le=MAX_OFFSET)) -> dict:
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
            raise NotFound("afiliado_id", "no affiliate with this id")
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
