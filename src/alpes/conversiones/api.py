"""The conversiones HTTP API: each route parses its input, calls a command or a query with its caller
(`caller: Caller`: role and scope are checked before it runs; the tenant below), and shapes the
answer. Domain errors raised below become statuses in kernel.http."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Annotated, Literal

from fastapi import APIRouter, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import RedirectResponse, Response
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field, IPvAnyAddress, ValidationInfo, field_validator

from alpes.kernel.access import LOCAL_OPERATOR, Principal
from alpes.kernel.eventstore import EventStore
from alpes.kernel.http import MAX_OFFSET, Identifier, PlainText, client_address
from alpes.kernel.http_access import Caller
from alpes.kernel.lean_route import LeanRoute
from alpes.kernel.messages import utcnow
from alpes.kernel.money import Amount, Currency, check_places
from alpes.kernel.runtime import ServiceRuntime

from . import commands, domain, queries, saga, tracking
from .tenancy import Tenant, tenant_of


class Postback(BaseModel):
    """A server-to-server conversion postback (the original contract, plus order id and currency)."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    # Either click_id (attribution through the tracking link's click) or both ids.
    affiliate_id: Identifier | None = None
    campaign_id: Identifier | None = None
    click_id: Identifier | None = None
    user_id: PlainText = Field(min_length=1, max_length=120)
    currency: Currency = "EUR"  # before conversion_value, which is checked against its minor units
    conversion_value: Amount
    conversion_type: Literal["sale", "purchase", "lead"]
    order_id: PlainText | None = Field(None, min_length=1, max_length=120)
    # Fraud signals, both optional: the customer's address (velocity per IP) and email (self-referral).
    ip: IPvAnyAddress | None = None
    customer_email: PlainText | None = Field(None, min_length=3, max_length=254, pattern=r"^[^@\s]+@[^@\s]+\.[^@\s]+$")

    @field_validator("conversion_value")
    @classmethod
    def value_fits_currency(cls, value: Decimal, info: ValidationInfo) -> Decimal:
        return check_places(value, info.data.get("currency"))


class Rechazo(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    # Short: it travels as `rejected_in_review:<motivo>` in the reason (80 characters in the view).
    motivo: PlainText = Field(min_length=1, max_length=60)


class Reembolso(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    # The conversion refunded, as in the path: a signed refund must name it (the signature covers
    # the body, not the path); when given it must be the path's.
    conversion_id: Identifier | None = None
    tipo: Literal["reembolso", "contracargo"] = "reembolso"
    motivo: PlainText | None = Field(None, min_length=1, max_length=500)


class Conversion(BaseModel):
    id: str
    affiliate_id: str
    campaign_id: str
    user_id: str | None  # the customer: null for affiliates, who never see customer data
    conversion_value: Decimal
    currency: str
    conversion_type: str
    order_id: str | None
    status: str
    reason: str | None
    timestamp: datetime


def _conversion(row, tenant: Tenant) -> dict:
    answer = {k: row[k] for k in Conversion.model_fields}
    if not tenant.sees_customers:
        answer["user_id"] = None
    return Conversion(**answer).model_dump(mode="json")


def _api_key_id(caller: Principal) -> str | None:
    """The key (or signed advertiser) velocity counts against; None: an anonymous local caller."""
    return None if caller.id == LOCAL_OPERATOR.id else caller.id


class Figures(BaseModel):
    affiliate_id: str
    campaign_id: str
    currency: str
    detected: int
    validated: int
    rejected: int
    pending: int
    validated_revenue: Decimal  # a decimal string in JSON


def _figures(row) -> dict:
    stored = {k: row[k] for k in Figures.model_fields if k != "pending"}
    pending = row["detected"] - row["validated"] - row["rejected"]
    return Figures(**stored, pending=pending).model_dump(mode="json")


_VISITOR_COOKIE_ATTRIBUTES = f"HttpOnly; Max-Age={domain.VISITOR_COOKIE_MAX_AGE}; Path=/r/; SameSite=lax"


def include_routes(runtime: ServiceRuntime, store: EventStore, grace: timedelta,
                   clock: Callable[[], datetime] = utcnow, max_conversions_per_ip: int = 5, *,
                   visitors: domain.VisitorCookies, clicks: tracking.ClickRecorder,
                   max_conversions_per_caller: int = 10_000):
    """`clock` stamps clicks and conversions; tests inject one to place them in time. `visitors`
    signs and reads the visitor cookie (keys derived from the event-signing keys); `clicks` records
    the tracking links' clicks and verifies their ids."""
    # LeanRoute: POST /conversiones (postbacks) and GET /r/{code} (clicks) are the hottest routes.
    router = APIRouter(tags=["conversiones"], route_class=LeanRoute)

    @router.get("/r/{link_code}", tags=["clicks"], status_code=302, response_class=RedirectResponse)
    async def redirect(link_code: str, request: Request, caller: Caller) -> Response:
        """A tracking link: record the click, redirect to the campaign's landing URL with `alpes_click_id`,
        and set (or renew) the visitor's `alpes_vid` cookie, which ties its clicks together for attribution.
        The cookie is signed (an unsigned or forged one is ignored: a new visitor), HttpOnly,
        SameSite=Lax, and Secure when the click came over https (directly, or as a trusted proxy says).
        The click id is a signed token naming the link and the time, so the conversion is attributed
        even when the click's row (written within 50 ms, after the answer) was lost to a crash."""
        visitor_id = visitors.visitor_id_or_new(request.cookies.get(domain.VISITOR_COOKIE))
        visit = {"ip": client_address(request), "user_agent": request.headers.get("user-agent"),
                 "referrer": request.headers.get("referer"), "now": clock(), "visitor_id": visitor_id,
                 "visitor_hash": visitors.visitor_hash(visitor_id), "actor": caller}
        # A link read in the last second and a click kept in memory: nothing blocks, so no hop to
        # the thread pool; otherwise (a read, or a write when the service is not running) there.
        location = clicks.follow_in_memory(link_code, **visit)
        if location is None:
            location = await run_in_threadpool(clicks.follow, link_code, **visit)
        # The Location is already quoted (domain.landing_template) and the cookie's value is hex and a
        # dot: both headers are written as they go out, without Starlette's per-response quoting and
        # cookie objects (a tenth of the redirect's CPU, issue 11).
        cookie = f"{domain.VISITOR_COOKIE}={visitors.cookie_for(visitor_id)}; {_VISITOR_COOKIE_ATTRIBUTES}"
        if request.scope.get("scheme") == "https":
            cookie += "; Secure"
        return Response(status_code=302, headers={"location": location, "set-cookie": cookie})

    @router.post("/conversiones", responses={
        409: {"description": "the order id (or Idempotency-Key) was already used for one of the advertiser's "
                             "campaigns with other parameters"},
        403: {"description": "the campaign is not one of the caller's"}})
    def postback(body: Postback, request: Request, caller: Caller,
                 idempotency_key: Annotated[PlainText | None, Header(
                     min_length=1, max_length=120, description="the order id when the body has none: the same "
                     "rules as `order_id`")] = None) -> dict:
        """Record a conversion, for a campaign of the caller's (an advertiser's key, or its signature in
        `Alpes-Signature`). 200 with its id; the same order id (or Idempotency-Key) with the same
        parameters gives the same id, with other parameters a 409 naming the key (keys are scoped per
        advertiser). Besides its optional `ip`, each postback counts against its caller's key for velocity."""
        if body.click_id is None and (body.affiliate_id is None or body.campaign_id is None):
            raise RequestValidationError([
                {"loc": ("body", name), "msg": "required unless click_id is given", "type": "missing"}
                for name, value in (("affiliate_id", body.affiliate_id), ("campaign_id", body.campaign_id))
                if value is None])
        conversion_id, created, status = commands.receive_postback(
            runtime, store, affiliate_id=body.affiliate_id, campaign_id=body.campaign_id, click_id=body.click_id,
            user_id=body.user_id, conversion_value=body.conversion_value, conversion_type=body.conversion_type,
            currency=body.currency, order_id=body.order_id or idempotency_key,
            key_field="order_id" if body.order_id is not None else "idempotency-key",
            ip=None if body.ip is None else str(body.ip), customer_email=body.customer_email, now=clock(),
            grace=grace, max_conversions_per_ip=max_conversions_per_ip,
            caller_key=domain.caller_key(client_address(request), _api_key_id(caller)),
            max_conversions_per_caller=max_conversions_per_caller, caller=caller, clicks=clicks)
        return {"id": conversion_id, "status": status, "duplicate": not created}

    @router.get("/conversiones")
    def listar(caller: Caller,
               status: Literal["detected", "on_hold", "validated", "rejected", "refunded"] | None = None,
               affiliate_id: str | None = None, campaign_id: str | None = None,
               limit: int = Query(1000, ge=1, le=10000), offset: int = Query(0, ge=0, le=MAX_OFFSET)) -> dict:
        """The caller's conversions (an advertiser's campaigns', an affiliate's own), oldest first."""
        tenant = tenant_of(caller)
        rows = queries.conversions(runtime.db, tenant=tenant, status=status, affiliate_id=affiliate_id,
                                   campaign_id=campaign_id, limit=limit, offset=offset)
        return {"conversiones": [_conversion(r, tenant) for r in rows]}

    # Declared before /conversiones/{conversion_id}, which would otherwise take "cifras" for an id.
    @router.get("/conversiones/cifras")
    def cifras(caller: Caller, affiliate_id: str | None = None, campaign_id: str | None = None) -> dict:
        """Counts and validated revenue per affiliate, campaign and currency, of the caller's conversions."""
        rows = queries.figures(runtime.db, tenant=tenant_of(caller), affiliate_id=affiliate_id,
                               campaign_id=campaign_id)
        return {"cifras": [_figures(r) for r in rows]}

    @router.get("/conversiones/{conversion_id}")
    def obtener(conversion_id: str, caller: Caller) -> dict:
        """404 when unknown or not the caller's."""
        tenant = tenant_of(caller)
        return _conversion(queries.conversion(runtime.db, conversion_id, tenant=tenant), tenant)

    @router.post("/conversiones/{conversion_id}/reembolso")
    def reembolso(conversion_id: str, caller: Caller, body: Reembolso | None = None) -> dict:
        """Refund (or charge back) a validated conversion of the caller's campaigns: ConversionRefunded,
        and marketing reverses its commission. 409 on `status` unless validated; a repeated refund
        answers the same state; 404 unknown or not the caller's. Signed (Alpes-Signature), the body
        names the conversion: `conversion_id`."""
        body = body or Reembolso()
        if body.conversion_id is not None and body.conversion_id != conversion_id:
            raise RequestValidationError([{"loc": ("body", "conversion_id"), "type": "value_error",
                                           "msg": "differs from the conversion id in the path"}])
        commands.refund(runtime, store, conversion_id, body.tipo, body.motivo, caller)
        return obtener(conversion_id, caller)

    @router.post("/conversiones/{conversion_id}/aprobar")
    def aprobar(conversion_id: str, caller: Caller) -> dict:
        """Approve a conversion on hold: ConversionValidated, and marketing computes its commission.
        409 on `status` unless on hold; 404 unknown or not the caller's."""
        commands.review(runtime, store, conversion_id, True, None, clock, caller)
        return obtener(conversion_id, caller)

    @router.post("/conversiones/{conversion_id}/rechazar")
    def rechazar(conversion_id: str, body: Rechazo, caller: Caller) -> dict:
        """Reject a conversion on hold: ConversionRejected `rejected_in_review:<motivo>`.
        409 on `status` unless on hold; 404 unknown or not the caller's."""
        commands.review(runtime, store, conversion_id, False, body.motivo, clock, caller)
        return obtener(conversion_id, caller)

    @router.get("/conversiones/{conversion_id}/eventos")
    def historia(conversion_id: str, caller: Caller) -> dict:
        """The conversion's event stream, as stored (upcast to the newest schema of each event); 404
        unknown or not the caller's."""
        events = queries.history(runtime.db, store, conversion_id, tenant=tenant_of(caller))
        return {"eventos": [{"version": e.version, "event_id": e.event_id, "event_type": e.event_type,
                             "schema_version": e.schema_version, "occurred_at": e.occurred_at.isoformat(),
                             "payload": {k: (str(x) if isinstance(x, (Decimal, datetime)) else x)
                                         for k, x in e.payload.items()}} for e in events]}

    def include(app: FastAPI) -> None:
        app.include_router(router)

    return include


# -- the conversion → commission saga ----------------------------------------------------------
def with_saga_routes(include: Callable[[FastAPI], None], runtime: ServiceRuntime,
                     policy: saga.SagaPolicy) -> Callable[[FastAPI], None]:
    """`include` plus GET /sagas and GET /sagas/{correlation_id}."""
    router = APIRouter(tags=["sagas"], route_class=LeanRoute)

    @router.get("/sagas")
    def sagas(caller: Caller, estado: Literal["running", "stuck", "completed", "compensated"] | None = None,
              limit: int = Query(100, ge=1, le=1000), offset: int = Query(0, ge=0, le=MAX_OFFSET)) -> dict:
        """The sagas of the caller's conversions, oldest first, without their steps; `estado` filters
        (terminal: completed, compensated; stuck: no answer from marketing after every retry, still asking)."""
        return {"sagas": queries.sagas(runtime.db, policy, tenant=tenant_of(caller), estado=estado, limit=limit,
                                       offset=offset),
                "terminal_states": list(saga.TERMINAL_STATES)}

    @router.get("/sagas/{correlation_id}")
    def una(correlation_id: str, caller: Caller) -> dict:
        """One conversion's saga (its id is the conversion id, the flow's correlation id): its state and
        each step with its status and timestamps. 404 when there is none or it is not the caller's."""
        return queries.one_saga(runtime.db, policy, correlation_id, tenant=tenant_of(caller))

    def include_all(app: FastAPI) -> None:
        include(app)
        app.include_router(router)

    return include_all
