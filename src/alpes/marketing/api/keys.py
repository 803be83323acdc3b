"""HTTP routes of API keys: issue (the key is in this one answer only), list, revoke."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from alpes.kernel.access import ALL_SCOPES
from alpes.kernel.http import BoundedDatetime, Identifier, PlainText
from alpes.kernel.http_access import Caller
from alpes.kernel.messages import utcnow
from alpes.kernel.runtime import ServiceRuntime

from .. import keys

Scope = Literal[ALL_SCOPES]  # type: ignore[valid-type]


class CrearClave(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    rol: Literal["operator", "advertiser", "affiliate"]
    anunciante_id: Identifier | None = None
    afiliado_id: Identifier | None = None
    # None: every scope the role may have.
    scopes: list[Scope] | None = Field(None, min_length=1, max_length=len(ALL_SCOPES))
    nombre: PlainText | None = Field(None, min_length=1, max_length=120)
    expira_en: BoundedDatetime | None = None


def _clave(row: dict) -> dict:
    return {"key_id": row["key_id"], "rol": row["rol"], "anunciante_id": row["anunciante_id"],
            "afiliado_id": row["afiliado_id"], "scopes": sorted(filter(None, row["scopes"].split(","))),
            "nombre": row["nombre"],
            **{k: row[k].isoformat() if row[k] else None for k in ("expira_en", "revocada_en", "creada_en", "usada_en")}}


def router(runtime: ServiceRuntime) -> APIRouter:
    router = APIRouter(tags=["claves"])

    @router.post("/claves", status_code=201)
    def crear(body: CrearClave, caller: Caller) -> dict:
        """A new API key. `key` is in this answer and nowhere else (only its SHA-256 is kept): store it
        now. Every service accepts it as soon as it has learnt it from marketing.eventos (moments)."""
        with runtime.unit_of_work(caller) as (session, emit):
            new, events = keys.issue_key(session, caller, rol=body.rol, anunciante_id=body.anunciante_id,
                                         afiliado_id=body.afiliado_id, scopes=body.scopes, nombre=body.nombre,
                                         expira_en=body.expira_en, now=utcnow())
            emit(events)
            row = next(r for r in keys.list_keys(session, caller) if r["key_id"] == new.key_id)
        return {"key": new.key, **_clave(row)}

    @router.get("/claves")
    def listar(caller: Caller) -> dict:
        """Keys the caller manages (operators: all; advertisers: their advertiser's), without secrets."""
        with runtime.db.read() as session:
            return {"claves": [_clave(r) for r in keys.list_keys(session, caller)]}

    @router.delete("/claves/{key_id}")
    def revocar(key_id: Identifier, caller: Caller) -> dict:
        """Revoke: every service refuses the key once it learns of it (within seconds)."""
        with runtime.unit_of_work(caller) as (session, emit):
            emit(keys.revoke_key(session, caller, key_id, utcnow()))
            row = next(r for r in keys.list_keys(session, caller) if r["key_id"] == key_id)
        return _clave(row)

    return router
