"""HTTP routes of campaigns and their enrollments: parse, call `campaigns`, shape the answer.

Every route hands the caller to `campaigns`, which keeps it to its tenant (404 for another's)."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Response
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationInfo,
    field_validator,
)
from sqlalchemy.exc import IntegrityError

from alpes.kernel.errors import RuleViolated
from alpes.kernel.http import MAX_OFFSET, BoundedDatetime, Identifier, PlainText
from alpes.kernel.http_access import Caller
from alpes.kernel.money import Amount, Currency, Percentage, check_places
from alpes.kernel.runtime import ServiceRuntime

from .. import campaigns, domain

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
    # The owner: an advertiser's key always creates for its own advertiser; an operator may name
    # one (null: the operator's own campaign).
    anunciante_id: Identifier | None = None
    # A conversion worth more than this (in `moneda`) is held for review; null: the advertiser's default.
    valor_maximo_conversion: Amount | None = None

    @field_validator("fecha_fin")
    @classmethod
    def end_after_start(cls, fecha_fin: datetime | None, info: ValidationInfo) -> datetime | None:
        inicio = info.data.get("fecha_inicio")
        if fecha_fin is not None and inicio is not None and fecha_fin <= inicio:
            raise ValueError("must be after fecha_inicio")
        return fecha_fin

    @field_validator("presupuesto", "valor_maximo_conversion")
    @classmethod
    def amount_fits_currency(cls, presupuesto: Decimal | None, info: ValidationInfo) -> Decimal | None:
        return presupuesto if presupuesto is None else check_places(presupuesto, info.data.get("moneda"))


class ActualizarCampana(BaseModel):
    """The terms that may change while a campaign runs (marketing/domain.py TERMINOS_EDITABLES says
    why moneda, anunciante_id, the rate, the start, the window and the segmentation are not among
    them: any other field is refused, 422 naming it). A term left out stays as it is; null clears
    an optional one (no budget, no end, no maximum, no click minimum)."""
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    nombre: PlainText = Field(None, min_length=1, max_length=200)
    presupuesto: Amount | None = None
    fecha_fin: BoundedDatetime | None = None
    landing_url: PlainText | None = Field(None, max_length=2000, pattern=r"^https?://[^\s/$.?#][^\s]*$")
    valor_maximo_conversion: Amount | None = None
    min_segundos_click_conversion: int | None = Field(None, ge=0, le=86400)
    periodo_bloqueo_dias: int = Field(None, ge=0, le=365)

    def terminos(self) -> dict:
        """The terms the body names (null included), as the domain takes them."""
        if not self.model_fields_set:
            raise RuleViolated(None, "name at least one term to change: " + ", ".join(type(self).model_fields))
        return {name: getattr(self, name) for name in self.model_fields_set}


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
    anunciante_id: str | None
    valor_maximo_conversion: Decimal | None


def _campana(row) -> Campana:
    return Campana(id=row["id"], nombre=row["nombre"], porcentaje_comision=row["porcentaje_comision"],
                   moneda=row["moneda"], estado=row["estado"], creada_en=row["creada_en"].isoformat(),
                   fecha_inicio=row["fecha_inicio"], fecha_fin=row["fecha_fin"], landing_url=row["landing_url"],
                   presupuesto=row["presupuesto"], ventana_atribucion_dias=row["ventana_atribucion_dias"],
                   periodo_bloqueo_dias=row["periodo_bloqueo_dias"],
                   segmentacion={k: [v for v in row[k].split(",") if v] for k in ("paises", "canales", "categorias")},
                   min_segundos_click_conversion=row["min_segundos_click_conversion"],
                   modelo_atribucion=row["modelo_atribucion"], anunciante_id=row["anunciante_id"],
                   valor_maximo_conversion=row["valor_maximo_conversion"])


class Inscribir(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    afiliado_id: Identifier
    canal: Code | None = None
    categoria: Code | None = None


def _inscripcion(row) -> dict:
    return {"id": row["id"], "campana_id": row["campana_id"], "afiliado_id": row["afiliado_id"],
            "link_code": row["link_code"], "canal": row["canal"], "categoria": row["categoria"],
            "estado": row["estado"], "inscrita_en": row["inscrita_en"].isoformat()}


def router(runtime: ServiceRuntime, *, https_only: bool) -> APIRouter:
    """`https_only`: landing URLs must be https (false only in the protected local mode)."""
    router = APIRouter()

    @router.post("/campanas", status_code=201, response_model=Campana, tags=["campanas"])
    def crear(body: CrearCampana, caller: Caller) -> Campana:
        """A campaign owned by the calling advertiser (or by the advertiser an operator names). Its
        landing_url must be on the owner's registered domains: 422 naming landing_url otherwise."""
        with runtime.unit_of_work(caller) as (session, emit):
            campana_id, events = campaigns.create_campana(session, caller, domain.NuevaCampana(
                nombre=body.nombre, porcentaje_comision=body.porcentaje_comision, moneda=body.moneda,
                vigencia=domain.Vigencia(body.fecha_inicio, body.fecha_fin), landing_url=body.landing_url,
                presupuesto=body.presupuesto, ventana_atribucion_dias=body.ventana_atribucion_dias,
                periodo_bloqueo_dias=body.periodo_bloqueo_dias, activa=body.activar,
                min_segundos_click_conversion=body.min_segundos_click_conversion,
                modelo_atribucion=body.modelo_atribucion, valor_maximo_conversion=body.valor_maximo_conversion,
                segmentacion=domain.Segmentacion(frozenset(body.segmentacion.paises),
                                                 frozenset(body.segmentacion.canales),
                                                 frozenset(body.segmentacion.categorias))),
                anunciante_id=body.anunciante_id, https_only=https_only)
            emit(events)
        return obtener(campana_id, caller)

    @router.put("/campanas/{campana_id}", response_model=Campana, tags=["campanas"])
    def actualizar(campana_id: str, body: ActualizarCampana, caller: Caller) -> Campana:
        """Change the terms that may change while the campaign runs (the campaign's advertiser or an
        operator; anyone else: 404). 409 for a finished campaign or a budget below what it has
        already spent; 422 naming the field for a refused term. CampanaActualizada carries the
        terms to conversiones and afiliados; the same terms again change and announce nothing."""
        terminos = body.terminos()
        with runtime.unit_of_work(caller) as (session, emit):
            emit(campaigns.update_campana(session, caller, campana_id, terminos, https_only=https_only))
        return obtener(campana_id, caller)

    def _action(accion: str):
        def change(campana_id: str, caller: Caller) -> Campana:
            with runtime.unit_of_work(caller) as (session, emit):
                emit(campaigns.change_campana_estado(session, caller, campana_id, accion))
            return obtener(campana_id, caller)
        change.__name__ = f"{accion}_campana"
        return change

    for accion in ("activar", "pausar", "finalizar"):
        router.add_api_route(f"/campanas/{{campana_id}}/{accion}", _action(accion), methods=["POST"],
                             response_model=Campana, tags=["campanas"],
                             summary=f"{accion.capitalize()} a campaign (409 if its state does not allow it)")

    @router.get("/campanas", tags=["campanas"])
    def listar(caller: Caller, limit: int = Query(100, ge=1, le=1000),
               offset: int = Query(0, ge=0, le=MAX_OFFSET)) -> dict:
        """Operators: every campaign; an advertiser: its own; an affiliate: those it is enrolled in."""
        with runtime.db.read() as session:
            rows = campaigns.list_campanas(session, caller, limit, offset)
        return {"campanas": [_campana(r).model_dump(mode="json") for r in rows]}

    @router.get("/campanas/{campana_id}", response_model=Campana, tags=["campanas"])
    def obtener(campana_id: str, caller: Caller) -> Campana:
        with runtime.db.read() as session:
            row = campaigns.visible_campana(session, caller, campana_id)
        return _campana(row)

    @router.post("/campanas/{campana_id}/inscripciones", status_code=201, tags=["inscripciones"])
    def inscribir(campana_id: str, body: Inscribir, response: Response, caller: Caller) -> dict:
        """Enroll an enabled affiliate the campaign's segmentation admits (the campaign's advertiser
        or an operator); 200 with the same enrollment when it already was enrolled."""
        try:
            with runtime.unit_of_work(caller) as (session, emit):
                inscripcion_id, created, events = campaigns.enroll_afiliado(
                    session, caller, campana_id, body.afiliado_id, body.canal, body.categoria)
                emit(events)
        except IntegrityError:
            created = False  # a concurrent twin enrolled the pair first: answer with its enrollment
            with runtime.db.read() as session:
                inscripcion_id = campaigns.inscripcion_id_de(session, campana_id, body.afiliado_id)
            if inscripcion_id is None:
                raise
        if not created:
            response.status_code = 200
        with runtime.db.read() as session:
            row = campaigns.get_inscripcion(session, inscripcion_id)
        return _inscripcion(row)

    @router.get("/campanas/{campana_id}/inscripciones", tags=["inscripciones"])
    def inscripciones(campana_id: str, caller: Caller, estado: str | None = None) -> dict:
        """The campaign's enrollments (an affiliate: its own enrollment only)."""
        with runtime.db.read() as session:
            rows = campaigns.list_inscripciones(session, caller, campana_id, estado)
        return {"inscripciones": [_inscripcion(r) for r in rows]}

    return router
