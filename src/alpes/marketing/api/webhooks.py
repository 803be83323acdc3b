"""HTTP routes of webhook endpoints (README "Webhooks"): an advertiser's or an affiliate's own, an
operator's (platform-wide) and, for operators, everyone's. The signing secret is in the answers of
creation and rotation only: it is derived when needed and stored nowhere."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from fastapi import APIRouter, Path, Query
from pydantic import BaseModel, ConfigDict, Field

from alpes.kernel.http import MAX_OFFSET, PlainText
from alpes.kernel.http_access import Caller
from alpes.kernel.messages import utcnow
from alpes.kernel.runtime import ServiceRuntime

from .. import webhook_targets, webhooks

EventKind = Literal[webhooks.EVENT_KINDS]  # type: ignore[valid-type]
EstadoEntrega = Literal[webhooks.ESTADOS_ENTREGA]  # type: ignore[valid-type]


class DatosWebhook(BaseModel):
    """PUT replaces all four."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    # https, resolving to public addresses only (http and loopback in the protected local mode).
    url: str = Field(min_length=1, max_length=webhook_targets.MAX_URL)
    eventos: list[EventKind] = Field(min_length=1, max_length=len(webhooks.EVENT_KINDS))
    descripcion: PlainText | None = Field(max_length=500)
    habilitado: bool


class NuevoWebhook(DatosWebhook):
    descripcion: PlainText | None = Field(None, max_length=500)
    habilitado: bool = True


class Webhook(BaseModel):
    id: str
    url: str
    eventos: list[str]
    descripcion: str | None
    habilitado: bool
    # Set when the platform disabled it (consecutive failures): POST .../habilitar turns it back on.
    deshabilitado_motivo: str | None
    deshabilitado_en: datetime | None
    fallos_consecutivos: int
    propietario_rol: str
    propietario_id: str | None
    # The current version of its signing secret; the previous one also signs until secreto_anterior_hasta.
    secreto_version: int
    secreto_anterior_hasta: datetime | None
    creado_en: datetime
    actualizado_en: datetime


class WebhookConSecreto(Webhook):
    # `alpes_whsec_<hex>`: the HMAC key of its Alpes-Signature headers, shown in this answer only.
    secreto: str


class Intento(BaseModel):
    numero: int
    en: datetime
    status_code: int | None
    latencia_ms: int
    error: str | None


class Entrega(BaseModel):
    id: int
    event_id: str
    tipo: str
    objeto_id: str
    estado: str
    intentos: int
    creada_en: datetime
    # When the next attempt is due (pendiente only).
    proximo_intento_en: datetime | None
    entregada_en: datetime | None
    ultimo_status_code: int | None
    ultima_latencia_ms: int | None
    ultimo_error: str | None
    historial: list[Intento]


def _webhook(row) -> Webhook:
    return Webhook(**{name: row[name] for name in Webhook.model_fields if name != "eventos"},
                   eventos=row["eventos"].split(","))


def _entrega(row: dict) -> Entrega:
    return Entrega(
        id=row["id"], event_id=row["event_id"], tipo=row["tipo"], objeto_id=row["objeto_id"], estado=row["estado"],
        intentos=row["intentos"], creada_en=row["creada_en"],
        proximo_intento_en=row["proximo_intento_en"] if row["estado"] == webhooks.PENDIENTE else None,
        entregada_en=row["entregada_en"], ultimo_status_code=row["ultimo_status"],
        ultima_latencia_ms=row["ultima_latencia_ms"], ultimo_error=row["ultimo_error"],
        historial=[Intento(numero=a["numero"], en=a["en"], status_code=a["status"], latencia_ms=a["latencia_ms"],
                           error=a["error"]) for a in row["historial"]])


def router(runtime: ServiceRuntime, *, master: bytes, private_ok: bool) -> APIRouter:
    """`master`: the key endpoints' secrets derive from; `private_ok`: http and private addresses
    are accepted (protected local mode, or the test-only ALPES_WEBHOOK_ALLOW_PRIVATE)."""
    router = APIRouter(tags=["webhooks"])

    def with_secret(row) -> WebhookConSecreto:
        secret = webhooks.displayed_secret(master, row["id"], row["secreto_version"])
        return WebhookConSecreto(**_webhook(row).model_dump(), secreto=secret)

    @router.post("/webhooks", status_code=201, response_model=WebhookConSecreto)
    def crear(body: NuevoWebhook, caller: Caller) -> WebhookConSecreto:
        """Register an endpoint of the caller (an operator's receives every tenant's events). `secreto`
        (version 1) is in this answer only."""
        with runtime.unit_of_work(caller) as (session, _emit):
            webhook_id = webhooks.create_webhook(session, caller, url=body.url, eventos=body.eventos,
                                                 descripcion=body.descripcion, habilitado=body.habilitado,
                                                 now=utcnow(), private_ok=private_ok)
            row = webhooks.get_webhook(session, caller, webhook_id)
        return with_secret(row)

    @router.get("/webhooks")
    def listar(caller: Caller, limit: int = Query(100, ge=1, le=1000),
               offset: int = Query(0, ge=0, le=MAX_OFFSET)) -> dict:
        """Operators: every endpoint; others: their own. No secrets."""
        with runtime.db.read() as session:
            rows = webhooks.list_webhooks(session, caller, limit, offset)
        return {"webhooks": [_webhook(r).model_dump(mode="json") for r in rows]}

    @router.get("/webhooks/{webhook_id}", response_model=Webhook)
    def obtener(webhook_id: str, caller: Caller) -> Webhook:
        with runtime.db.read() as session:
            return _webhook(webhooks.get_webhook(session, caller, webhook_id))

    @router.put("/webhooks/{webhook_id}", response_model=Webhook)
    def actualizar(webhook_id: str, body: DatosWebhook, caller: Caller) -> Webhook:
        """Replace url, event kinds, description and habilitado (true also re-enables a disabled one)."""
        with runtime.unit_of_work(caller) as (session, _emit):
            webhooks.update_webhook(session, caller, webhook_id, url=body.url, eventos=body.eventos,
                                    descripcion=body.descripcion, habilitado=body.habilitado, now=utcnow(),
                                    private_ok=private_ok)
            row = webhooks.get_webhook(session, caller, webhook_id)
        return _webhook(row)

    @router.delete("/webhooks/{webhook_id}", status_code=204)
    def eliminar(webhook_id: str, caller: Caller) -> None:
        """Remove it, its pending deliveries and its log."""
        with runtime.unit_of_work(caller) as (session, _emit):
            webhooks.delete_webhook(session, caller, webhook_id)

    @router.post("/webhooks/{webhook_id}/secreto", response_model=WebhookConSecreto)
    def rotar_secreto(webhook_id: str, caller: Caller) -> WebhookConSecreto:
        """A new signing secret, in this answer only; for 24 hours deliveries carry a v1 signature
        with each (secreto_anterior_hasta), then with the new one only."""
        with runtime.unit_of_work(caller) as (session, _emit):
            webhooks.rotate_secret(session, caller, webhook_id, utcnow())
            row = webhooks.get_webhook(session, caller, webhook_id)
        return with_secret(row)

    @router.post("/webhooks/{webhook_id}/habilitar", response_model=Webhook)
    def habilitar(webhook_id: str, caller: Caller) -> Webhook:
        """On again after it was disabled: failures forgotten, pending deliveries sent in order."""
        with runtime.unit_of_work(caller) as (session, _emit):
            webhooks.enable_webhook(session, caller, webhook_id, utcnow())
            row = webhooks.get_webhook(session, caller, webhook_id)
        return _webhook(row)

    @router.get("/webhooks/{webhook_id}/entregas")
    def entregas(webhook_id: str, caller: Caller, estado: EstadoEntrega | None = None,
                 limit: int = Query(100, ge=1, le=1000), offset: int = Query(0, ge=0, le=MAX_OFFSET)) -> dict:
        """The delivery log, newest first: each delivery's state, attempts (status code, latency,
        error) and next attempt."""
        with runtime.db.read() as session:
            rows = webhooks.list_entregas(session, caller, webhook_id, estado=estado, limit=limit, offset=offset)
        return {"entregas": [_entrega(r).model_dump(mode="json") for r in rows]}

    @router.post("/webhooks/{webhook_id}/entregas/{entrega_id}/reenviar", status_code=202, response_model=Entrega)
    def reenviar(webhook_id: str, caller: Caller, entrega_id: int = Path(ge=1, le=2**63 - 1)) -> Entrega:
        """Send it again now (the same body and event id), whatever its state."""
        with runtime.unit_of_work(caller) as (session, _emit):
            row = webhooks.resend_entrega(session, caller, webhook_id, entrega_id, utcnow())
        return _entrega(row)

    return router
