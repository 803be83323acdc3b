"""HTTP routes of advertisers: register (operators), read and update (operators, or the advertiser
itself), rotate the postback signing secret. The secret is in the answers of registration and
rotation only: it is derived when needed and stored nowhere."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from alpes.kernel.http import MAX_OFFSET, PlainText
from alpes.kernel.http_access import Caller
from alpes.kernel.messages import utcnow
from alpes.kernel.money import Amount
from alpes.kernel.runtime import ServiceRuntime

from .. import advertisers, landing


def _domain(value: object) -> str:
    """Checked as sent (before any whitespace stripping): ` brand.com` is not a host name."""
    if not isinstance(value, str):
        raise ValueError("must be a string")  # noqa: TRY004 (pydantic reports ValueError as a 422)
    return landing.parse_domain(value)


Domain = Annotated[str, BeforeValidator(_domain), Field(json_schema_extra={
    "description": "a lower-case host name (IDNs in their xn-- form): no scheme, port, path or wildcard; "
                   "it covers its subdomains", "examples": ["brand.com"]})]


class DatosAnunciante(BaseModel):
    """PUT replaces all three: a missing valor_maximo_conversion is an error, not a silent removal."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    nombre: PlainText = Field(min_length=1, max_length=200)
    # The hosts its campaigns' landing URLs may point to.
    dominios: list[Domain] = Field(max_length=landing.MAX_DOMAINS)
    # The default maximum conversion value of its new campaigns (null: none).
    valor_maximo_conversion: Amount | None


class NuevoAnunciante(DatosAnunciante):
    dominios: list[Domain] = Field(default_factory=list, max_length=landing.MAX_DOMAINS)
    valor_maximo_conversion: Amount | None = None


class Anunciante(BaseModel):
    id: str
    nombre: str
    dominios: list[str]
    valor_maximo_conversion: Decimal | None
    # The current version of its postback signing secret; the previous one signs until secreto_anterior_hasta.
    secreto_version: int
    secreto_anterior_hasta: datetime | None
    creado_en: datetime
    actualizado_en: datetime


class AnuncianteConSecreto(Anunciante):
    # `alpes_sig_<hex>`: the HMAC key of its Alpes-Signature headers, shown in this answer only.
    secreto_postback: str


def _anunciante(row) -> Anunciante:
    return Anunciante(id=row["id"], nombre=row["nombre"], dominios=list(advertisers.dominios_of(row)),
                      valor_maximo_conversion=row["valor_maximo_conversion"], secreto_version=row["secreto_version"],
                      secreto_anterior_hasta=row["secreto_anterior_hasta"], creado_en=row["creado_en"],
                      actualizado_en=row["actualizado_en"])


def router(runtime: ServiceRuntime, *, postback_master: bytes) -> APIRouter:
    """`postback_master`: the platform's postback master key, from which each secret is derived."""
    router = APIRouter(tags=["anunciantes"])

    def with_secret(row) -> AnuncianteConSecreto:
        secret = advertisers.displayed_secret(postback_master, row["id"], row["secreto_version"])
        return AnuncianteConSecreto(**_anunciante(row).model_dump(), secreto_postback=secret)

    @router.post("/anunciantes", status_code=201, response_model=AnuncianteConSecreto)
    def registrar(body: NuevoAnunciante, caller: Caller) -> AnuncianteConSecreto:
        """Register an advertiser (operators). `secreto_postback` (version 1) is in this answer only:
        hand it to the brand now; a rotation gives a new one."""
        with runtime.unit_of_work(caller) as (session, emit):
            anunciante_id, events = advertisers.register_anunciante(
                session, nombre=body.nombre, dominios=body.dominios,
                valor_maximo_conversion=body.valor_maximo_conversion, now=utcnow())
            emit(events)
            row = advertisers.get_anunciante(session, caller, anunciante_id)
        return with_secret(row)

    @router.get("/anunciantes")
    def listar(caller: Caller, limit: int = Query(100, ge=1, le=1000),
               offset: int = Query(0, ge=0, le=MAX_OFFSET)) -> dict:
        """Operators: every advertiser; an advertiser: itself. No secrets."""
        with runtime.db.read() as session:
            rows = advertisers.list_anunciantes(session, caller, limit, offset)
        return {"anunciantes": [_anunciante(r).model_dump(mode="json") for r in rows]}

    @router.get("/anunciantes/{anunciante_id}", response_model=Anunciante)
    def obtener(anunciante_id: str, caller: Caller) -> Anunciante:
        with runtime.db.read() as session:
            return _anunciante(advertisers.get_anunciante(session, caller, anunciante_id))

    @router.put("/anunciantes/{anunciante_id}", response_model=Anunciante)
    def actualizar(anunciante_id: str, body: DatosAnunciante, caller: Caller) -> Anunciante:
        """Replace its name, domains and default maximum conversion value (existing campaigns keep theirs)."""
        with runtime.unit_of_work(caller) as (session, emit):
            emit(advertisers.update_anunciante(session, caller, anunciante_id, nombre=body.nombre,
                                               dominios=body.dominios,
                                               valor_maximo_conversion=body.valor_maximo_conversion, now=utcnow()))
            row = advertisers.get_anunciante(session, caller, anunciante_id)
        return _anunciante(row)

    @router.post("/anunciantes/{anunciante_id}/secreto-postback", response_model=AnuncianteConSecreto)
    def rotar_secreto(anunciante_id: str, caller: Caller) -> AnuncianteConSecreto:
        """Rotate the postback signing secret: the new one is in this answer only; the previous one
        keeps signing valid postbacks for 24 hours (secreto_anterior_hasta), older ones no longer do."""
        with runtime.unit_of_work(caller) as (session, emit):
            _version, events = advertisers.rotate_secret(session, caller, anunciante_id, utcnow())
            emit(events)
            row = advertisers.get_anunciante(session, caller, anunciante_id)
        return with_secret(row)

    return router
