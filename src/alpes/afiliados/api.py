from __future__ import annotations

from decimal import Decimal

from fastapi import APIRouter, FastAPI, Query
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import select

from alpes.kernel.access import AFFILIATE, Principal
from alpes.kernel.errors import NotFound, RuleViolated
from alpes.kernel.http import MAX_OFFSET, PlainText
from alpes.kernel.http_access import Caller
from alpes.kernel.runtime import ServiceRuntime

from . import domain, handlers, pii, tables, tenancy


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
    """An affiliate as reads show it. Personal data: the email whole only on the single read (masked
    in lists), the document number always masked, all of it null once erased
    (`datos_personales_borrados`). The operator and the affiliate itself see all of this; an
    advertiser sees the partner, not the person's papers nor its business with other advertisers:
    email masked, no document, no payment method, no earnings (they sum every advertiser's
    programs), the suspension reason only of an affiliate it registered."""
    id: str
    user_id: str
    email: str | None
    nombre: str | None
    estado: str
    motivos: list[str]
    registrado_en: str
    validado_en: str | None
    comisiones: int | None
    ganancias_pendientes: Decimal | None
    ganancias_aprobadas: Decimal | None
    ganancias_pagadas: Decimal | None
    ganancias_revertidas: Decimal | None
    tipo_documento: str | None
    numero_documento: str | None
    pais: str | None
    metodo_pago: str | None
    motivo_suspension: str | None
    datos_personales_borrados: bool
    registrado_por_anunciante: str | None = None


_GANANCIAS = ("comisiones", "ganancias_pendientes", "ganancias_aprobadas", "ganancias_pagadas", "ganancias_revertidas")


def _afiliado(row, datos: pii.DatosPersonales | None, caller: Principal, *, en_lista: bool = False) -> Afiliado:
    """`datos`: the affiliate's personal data, None once erased; `en_lista`: the email masked too;
    `caller` decides the view (tenancy.vista)."""
    anunciante = tenancy.vista(caller) == tenancy.ANUNCIANTE
    email = nombre = documento = metodo_pago = None
    if datos is not None:
        email = domain.enmascarar_email(datos.email) if en_lista or anunciante else datos.email
        nombre = datos.nombre
        if not anunciante:
            metodo_pago = datos.metodo_pago
            documento = domain.enmascarar_documento(datos.numero_documento) if datos.numero_documento else None
    propio = not anunciante or row["registrado_por_anunciante"] == caller.anunciante_id
    return Afiliado(
        id=row["id"], user_id=row["user_id"], email=email, nombre=nombre, estado=row["estado"],
        motivos=[m for m in row["motivos"].split(",") if m], registrado_en=row["registrado_en"].isoformat(),
        validado_en=row["validado_en"].isoformat() if row["validado_en"] else None,
        **{k: None if anunciante else row[k] for k in _GANANCIAS},
        tipo_documento=None if anunciante else row["tipo_documento"], numero_documento=documento, pais=row["pais"],
        metodo_pago=metodo_pago, motivo_suspension=row["motivo_suspension"] if propio else None,
        datos_personales_borrados=row["datos_borrados_en"] is not None,
        registrado_por_anunciante=row["registrado_por_anunciante"])


def include_routes(runtime: ServiceRuntime, vault: pii.Vault):
    router = APIRouter()
    a = tables.afiliados

    @router.post("/afiliados", status_code=201, response_model=Afiliado)
    def registrar(body: RegistrarAfiliado, caller: Caller) -> Afiliado:
        """201 with the new affiliate, `registrado`, whatever the email: an address already registered
        is not refused here (that would tell anyone whether it is registered) but rejected by the
        validation that follows (`cuenta_duplicada`). An advertiser's registration is recorded as
        its own (`registrado_por_anunciante`)."""
        # A document is its type and its number: one without the other identifies nobody.
        if (body.tipo_documento is None) != (body.numero_documento is None):
            missing = "tipo_documento" if body.tipo_documento is None else "numero_documento"
            raise RuleViolated(missing, "tipo_documento and numero_documento go together")
        registrado_por = tenancy.registrante(caller)
        with runtime.unit_of_work(caller) as (session, emit):
            afiliado_id, events = handlers.register_afiliado(session, domain.SolicitudRegistro(
                body.user_id, body.email, body.nombre, body.tipo_documento, body.numero_documento, body.pais,
                body.metodo_pago), vault, registrado_por_anunciante=registrado_por)
            emit(events)
        return obtener(afiliado_id, caller)

    @router.post("/afiliados/{afiliado_id}/aprobar", response_model=Afiliado)
    def aprobar(afiliado_id: str, caller: Caller) -> Afiliado:
        """A human approves an affiliate the automatic validation rejected: an operator any, an
        advertiser one it registered (not a duplicate: domain.may_override_rejection)."""
        with runtime.unit_of_work(caller) as (session, emit):
            emit(handlers.approve_afiliado(session, afiliado_id, caller))
        return obtener(afiliado_id, caller)

    @router.post("/afiliados/{afiliado_id}/suspender", response_model=Afiliado)
    def suspender(afiliado_id: str, body: SuspenderAfiliado, caller: Caller) -> Afiliado:
        with runtime.unit_of_work(caller) as (session, emit):
            emit(handlers.suspend_afiliado(session, afiliado_id, body.motivo, caller))
        return obtener(afiliado_id, caller)

    @router.post("/afiliados/{afiliado_id}/reactivar", response_model=Afiliado)
    def reactivar(afiliado_id: str, caller: Caller) -> Afiliado:
        with runtime.unit_of_work(caller) as (session, emit):
            emit(handlers.reactivate_afiliado(session, afiliado_id, caller))
        return obtener(afiliado_id, caller)

    @router.get("/afiliados")
    def listar(caller: Caller,
               estado: str | None = Query(None, pattern="^(registrado|validado|rechazado|suspendido)$"),
               limit: int = Query(100, ge=1, le=1000), offset: int = Query(0, ge=0, le=MAX_OFFSET)) -> dict:
        """The affiliates the caller may see (tenancy.py), filtered, never refused."""
        query = select(a).where(tenancy.visibles(caller)).order_by(a.c.registrado_en, a.c.id).limit(limit).offset(offset)
        if estado:
            query = query.where(a.c.estado == estado)
        with runtime.db.read() as session:
            rows = session.execute(query).mappings().all()
            datos = handlers.personal_data(session, vault, rows)
        return {"afiliados": [_afiliado(r, datos[r["id"]], caller, en_lista=True).model_dump(mode="json")
                              for r in rows]}

    @router.get("/afiliados/{afiliado_id}", response_model=Afiliado)
    def obtener(afiliado_id: str, caller: Caller) -> Afiliado:
        """404 for an affiliate the caller may not see, exactly as for one that does not exist."""
        with runtime.db.read() as session:
            row = session.execute(select(a).where(a.c.id == afiliado_id, tenancy.visibles(caller))).mappings().first()
            if row is None:
                raise NotFound("afiliado_id", "no affiliate with this id")
            return _afiliado(row, handlers.personal_data(session, vault, [row])[row["id"]], caller)

    @router.delete("/afiliados/{afiliado_id}/datos-personales", response_model=Afiliado)
    def borrar_datos_personales(afiliado_id: str, caller: Caller) -> Afiliado:
        """Erasure (an operator's action: alpes/authorization.py): the affiliate's data key is shredded,
        so its personal data is unreadable everywhere a sealed copy went (events, audit log, backups);
        `DatosPersonalesBorrados` is announced. State and earnings stay. Again: the same answer."""
        with runtime.unit_of_work(caller) as (session, emit):
            emit(handlers.erase_personal_data(session, afiliado_id, vault))
        return obtener(afiliado_id, caller)

    @router.get("/programas")
    def programas(caller: Caller) -> dict:
        """Operator: every program; advertiser: its own; affiliate: the catalogue of active programs,
        without who runs them or how (name, commission, currency)."""
        p = tables.programas
        with runtime.db.read() as session:
            rows = session.execute(select(p).where(tenancy.programas_visibles(caller))
                                   .order_by(p.c.creada_en, p.c.id)).mappings().all()
        catalogo = caller.role == AFFILIATE
        return {"programas": [{"id": r["id"], "nombre": r["nombre"], "porcentaje_comision": str(r["porcentaje_comision"]),
                               "moneda": r["moneda"],
                               **({} if catalogo else {"anunciante_id": r["anunciante_id"], "estado": r["estado"]})}
                              for r in rows]}

    def include(app: FastAPI) -> None:
        app.include_router(router, tags=["afiliados"])

    return include
