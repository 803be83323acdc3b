"""HTTP mechanics shared by the services: app factory with lifespan, /health, error shape, the
one middleware layer in front of every app (`Edge`: proxy headers, a server span per request,
the latency metric, request limits) and the validators of text and dates from outside."""

from __future__ import annotations

import gc
import json
import re
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import asynccontextmanager
from datetime import date, datetime
from typing import Annotated

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from opentelemetry.trace import SpanKind, Status, StatusCode
from prometheus_client import CONTENT_TYPE_LATEST, Histogram, generate_latest
from pydantic import AfterValidator, AwareDatetime, BeforeValidator, StringConstraints
from sqlalchemy.exc import OperationalError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from .access import Forbidden, RateLimited, Unauthenticated
from .errors import Conflict, DomainError, NotAllowed, NotFound, RuleViolated
from .http_access import AccessControl, current_principal
from .lean_route import PARSED_BODY
from .metrics import METHODS
from .proxies import IPAddress, IPNetwork, client_ip, parse_networks, resolve
from .runtime import ServiceRuntime
from .tracing import UNTRACED_PATHS, Tracing, request_parent

DEFAULT_MAX_BODY_BYTES = 64 * 1024

# The one error shape of every 4xx, as published in each service's OpenAPI.
ERROR_SCHEMA = {
    "type": "object", "title": "Error", "required": ["detail", "errors"],
    "properties": {
        "detail": {"type": "string"},
        "errors": {"type": "array", "items": {
            "type": "object", "required": ["field", "reason"],
            "properties": {"field": {"anyOf": [{"type": "string"}, {"type": "null"}]}, "reason": {"type": "string"}}}},
    },
}
_ERROR_REF = {"$ref": "#/components/schemas/Error"}



# Traces and metrics are ours (Edge: spans from the service's own TracerProvider, latency for
# Prometheus): FastAPI's built-in OpenTelemetry stays off, instead of checking the global
# providers on every request (~3 % of a postback's CPU, issue 11).
NO_NATIVE_TELEMETRY = {"tracing": False, "metrics": False, "logs": False, "operation_spans": False}

def create_app(title: str, runtime: ServiceRuntime, include: Callable[[FastAPI], None], *,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, trusted_proxies: str | Sequence[str] = "",
               access: AccessControl | None = None, asyncapi: Callable[[], bytes] | None = None) -> FastAPI:
    """`trusted_proxies` (ALPES_TRUSTED_PROXIES): the only peers whose X-Forwarded-For/-Proto are believed.
    `access`: the service's rules and gate (kernel/http_access.py); every route then runs behind them.
    `asyncapi`: the events' AsyncAPI document (built on first call), served at /asyncapi.json."""
    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        runtime.start()
        # What start-up built lives as long as the service: kept out of the cyclic collector's
        # passes, so a full collection under load walks only what requests made since (on
        # conversiones such a pass stalled every request behind it for tens of ms, issue 11).
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            gc.unfreeze()  # collectable again (tests start many services in one process)
            runtime.stop()

    app = FastAPI(title=title, lifespan=lifespan, telemetry=NO_NATIVE_TELEMETRY,
                  dependencies=[Depends(current_principal)] if access is not None else [])
    app.state.access = access

    @app.exception_handler(Unauthenticated)
    async def unauthenticated(_request: Request, error: Unauthenticated) -> JSONResponse:
        # RFC 6750: the scheme to use, and `invalid_token` when the one presented is bad. The
        # reason names the problem, never the key.
        challenge = 'Bearer realm="alpes"' + (', error="invalid_token"' if error.presented else "")
        return error_response(401, "authorization", error.reason, headers={"WWW-Authenticate": challenge})

    @app.exception_handler(Forbidden)
    async def forbidden(_request: Request, error: Forbidden) -> JSONResponse:
        return error_response(403, "authorization", error.reason)

    @app.exception_handler(RateLimited)
    async def rate_limited(_request: Request, error: RateLimited) -> JSONResponse:
        return error_response(429, None, error.reason, headers={"Retry-After": str(error.retry_after)})

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, error: RequestValidationError) -> JSONResponse:
        # One line per bad field: which field and why, nothing stored.
        return JSONResponse(status_code=422, content={"detail": "invalid request",
                                                      "errors": [_field_error(e) for e in error.errors()]})

    @app.exception_handler(DomainError)
    async def domain_error(_request: Request, error: DomainError) -> JSONResponse:
        return error_response(status_of(error), error.field, error.reason)

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, error: HTTPException) -> JSONResponse:
        # Starlette's own refusals (unknown path, wrong method) in the same shape. A body FastAPI
        # could not parse (its 400 "There was an error parsing the body", raised from the parser's
        # error) is bad input like broken JSON: 422 naming `body`, as documented.
        if error.status_code == 400 and error.__cause__ is not None:
            return error_response(422, "body", _unparsable(error.__cause__) or "the body could not be parsed as JSON")
        return error_response(error.status_code, "body" if error.status_code == 400 else None, str(error.detail),
                              headers=error.headers)

    @app.exception_handler(OperationalError)
    async def database_unavailable(_request: Request, _error: OperationalError) -> JSONResponse:
        # A deadlock or lock timeout (MariaDB under concurrent writers) or a lost connection: the
        # unit of work was rolled back. Retryable, so 503 with Retry-After rather than a bare 500;
        # the driver's message (SQL, parameters) stays in the log, not in the answer.
        return error_response(503, None, "deadlock, lock timeout or lost connection: the change was rolled back",
                              detail="the database did not complete the request; retry", headers={"Retry-After": "1"})

    @app.get("/health", tags=["ops"], responses={503: {"description": "the database or the broker is unreachable "
                                                                      "(same body, status degraded)"}})
    def health(request: Request) -> JSONResponse:
        report = runtime.health()
        authorization = request.headers.get("authorization")
        if access is not None and authorization is not None:
            # Whether this service accepts the key presented (has learnt it, not revoked): how a
            # deployment script waits for a new key to reach every service.
            report["access"]["caller_known"] = access.gate.knows(authorization)
        return JSONResponse(status_code=200 if report["status"] == "ok" else 503, content=report)

    if asyncapi is not None:
        @app.get("/asyncapi.json", tags=["ops"], response_class=JSONResponse,
                 responses={200: {"description": "the AsyncAPI 3.0 document of the platform's events: topics, "
                                                 "Avro messages, who sends and who receives what",
                                  "content": {"application/json": {"schema": {"type": "object"}}}}})
        def asyncapi_document() -> Response:
            return Response(asyncapi(), media_type="application/json")

    @app.get("/metrics", tags=["ops"], response_class=Response,
             responses={200: {"description": "Prometheus text format (kernel/metrics.py)",
                              "content": {"text/plain": {"schema": {"type": "string"}}}}})
    def metrics() -> Response:
        return Response(generate_latest(runtime.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    include(app)
    if access is not None:
        access.check_coverage(app)
    app.openapi = lambda: _openapi(app)
    # Proxy headers, the server span, the latency metric and the request limits: one layer.
    app.add_middleware(Edge, trusted=parse_networks(trusted_proxies), tracing=runtime.tracing,
                       histogram=runtime.metrics.http_seconds, max_body_bytes=max_body_bytes)
    return app


def _field_error(error: dict) -> dict:
    if error.get("type") == "json_invalid":  # the body is not JSON at all: no field to name but the body
        return {"field": "body", "reason": f"invalid JSON: {error.get('ctx', {}).get('error', error['msg'])}"}
    loc = tuple(error["loc"])
    if len(loc) == 2 and loc[0] == "header":  # a header is named as sent (lower case), e.g. idempotency-key
        return {"field": str(loc[1]).lower().replace("_", "-"), "reason": error["msg"]}
    return {"field": ".".join(str(p) for p in loc if p != "body"), "reason": error["msg"]}


def _unparsable(error: BaseException) -> str | None:
    """Why a body that is valid UTF-8 JSON text still cannot be read, or None when it can (or
    when it is merely broken JSON, which FastAPI reports with the position)."""
    if isinstance(error, RecursionError):
        return "JSON nested too deeply"
    if isinstance(error, ValueError) and not isinstance(error, json.JSONDecodeError):
        # Python refuses integers of more than sys.get_int_max_str_digits() digits (DoS guard).
        return f"a JSON number with more than {sys.get_int_max_str_digits()} digits"
    return None


def _openapi(app: FastAPI) -> dict:
    """FastAPI's OpenAPI with our error shape: every operation documents its 4xx answers as
    {"detail", "errors": [{"field", "reason"}]} (422 included), never FastAPI's default."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
    access: AccessControl | None = app.state.access
    if access is not None:
        _declare_security(schema, access)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components.pop("ValidationError", None)
    components.pop("HTTPValidationError", None)
    components["Error"] = ERROR_SCHEMA
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            for status in [s for s in responses if s.startswith("4")]:
                responses[status] = {"description": responses[status].get("description", "refused"),
                                     "content": {"application/json": {"schema": _ERROR_REF}}}
            responses.setdefault("4XX", {"description": "refused: each bad field and why",
                                         "content": {"application/json": {"schema": _ERROR_REF}}})
            responses.setdefault("503", {"description": "the database did not complete it (deadlock, lock "
                                                        "timeout, lost connection); retry after Retry-After",
                                         "content": {"application/json": {"schema": _ERROR_REF}}})
    app.openapi_schema = schema
    return schema


_SECURITY_SCHEMES = {
    "apiKey": {"type": "http", "scheme": "bearer",
               "description": "an API key, `alpes_<op|adv|aff>_<id>_<secret>` (README \"Access\")"},
    "postbackSignature": {"type": "apiKey", "in": "header", "name": "Alpes-Signature",
                          "description": "t=<unix seconds>,v1=<hex HMAC-SHA256 of `<t>.<raw body>` with the "
                                         "advertiser's postback secret>"},
}


def _declare_security(schema: dict, access: AccessControl) -> None:
    """Each operation says how to authenticate and which roles may call it."""
    schema.setdefault("components", {})["securitySchemes"] = _SECURITY_SCHEMES
    for path, operations in schema.get("paths", {}).items():
        for method, operation in operations.items():
            rule = access.rule_for(method.upper(), path)
            if rule.public:
                operation["security"] = []
                continue
            operation["security"] = [{"apiKey": []}] + ([{"postbackSignature": []}] if rule.signed else [])
            operation["x-alpes-roles"] = sorted(rule.roles)
            operation["x-alpes-scope"] = rule.scope
            responses = operation.setdefault("responses", {})
            responses.setdefault("401", {"description": "no valid API key (missing, malformed, unknown, expired or revoked)"})
            responses.setdefault("403", {"description": f"allowed to {', '.join(sorted(rule.roles))} with {rule.scope}"})
            if rule.limit:
                responses.setdefault("429", {"description": "rate limited: retry after Retry-After seconds"})


async def read_body_within(receive, declared_length: str, limit: int) -> bytes | None:
    """The request body, read whole when it holds at most `limit` bytes; None when it holds more,
    as its Content-Length declares or as read (never more than one chunk past the limit is held,
    whatever Content-Length claims). ClientDisconnect when the client leaves first."""
    if declared_length.isdigit() and int(declared_length) > limit:
        return None
    body, more = bytearray(), True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        body += message.get("body", b"")
        more = message.get("more_body", False)
        if len(body) > limit:
            return None
    return bytes(body)


def replaying(body: bytes, receive):
    """A `receive` that hands the app the body already read, then waits on the real one (for the
    disconnect, as an app expects)."""
    replayed = False

    async def replay():
        nonlocal replayed
        if replayed:
            return await receive()
        replayed = True
        return {"type": "http.request", "body": body, "more_body": False}
    return replay


class Edge:
    """ASGI middleware, the one layer in front of every service's app. In this order, for each
    HTTP request (they were four nested layers, each wrapping `send` or decoding the headers
    again: a sixth of the HTTP edge's CPU on a postback, issue 11):

    1. proxy headers: `scope["client"]` and `scope["scheme"]` from X-Forwarded-For/-Proto only when
       the TCP peer is a trusted proxy (`forwarded`, as ProxyHeaders; a websocket too);
    2. a server span (kernel/tracing.py's Tracing), the child of the request's `traceparent`, named
       `<method> <route template>` once the router matched one (never a raw path); none for
       UNTRACED_PATHS (probes and scrapes); status 500 when the app raised before answering;
    3. the latency histogram by route template (scope["route"], set by the router; "unmatched" when
       none matched or the request was refused below), method ("other" when unknown) and status;
    4. request limits: a state change a browser could have been tricked into (cross-site, CSRF) is
       refused; a body larger than `max_body_bytes` gets 413 and one that is not JSON 415, both
       before the app reads a byte of it (read whole only up to the limit, whatever Content-Length
       claims); one not UTF-8, or JSON nested too deep or with a number too long to read, 422 naming
       `body`. The JSON parsed for that check is handed on (lean_route.PARSED_BODY), not parsed again.

    Refusals of 4. are traced and counted like any answer."""

    def __init__(self, app, *, trusted: tuple[IPNetwork, ...], tracing: Tracing, histogram: Histogram,
                 max_body_bytes: int) -> None:
        self.app = app
        self.trusted = trusted
        self.tracing = tracing
        self.histogram = histogram
        self.max_body_bytes = max_body_bytes
        # (route, method, status) -> the histogram child's observe: prometheus_client's labels()
        # takes a lock and checks its labels on every call. Bounded as the labels are.
        self._observers: dict[tuple[str, str, int], Callable[[float], None]] = {}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "websocket" and self.trusted:
                scope = forwarded(scope, self.trusted)
            await self.app(scope, receive, send)
            return
        if self.trusted:
            scope = forwarded(scope, self.trusted)
        method = scope["method"]
        status = 500

        async def sending(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        started = time.perf_counter()
        try:
            if scope["path"] in UNTRACED_PATHS:
                await self._limited(scope, receive, sending)
                return
            with self.tracing.span(method, request_parent(scope["headers"]), SpanKind.SERVER,
                                   {"http.request.method": method}) as span:
                try:
                    await self._limited(scope, receive, sending)
                finally:
                    route = getattr(scope.get("route"), "path", None)
                    if route is not None:
                        span.update_name(f"{method} {route}")
                        span.set_attribute("http.route", route)
                    span.set_attribute("http.response.status_code", status)
                    if status >= 500:
                        span.set_status(Status(StatusCode.ERROR))
        finally:
            self._observe(scope, method, status, time.perf_counter() - started)

    def _observe(self, scope, method: str, status: int, seconds: float) -> None:
        route = getattr(scope.get("route"), "path", None) or "unmatched"
        key = (route, method if method in METHODS else "other", status)  # never a caller's made-up method
        observe = self._observers.get(key)
        if observe is None:
            observe = self._observers[key] = self.histogram.labels(key[0], key[1], str(status)).observe
        observe(seconds)

    async def _limited(self, scope, receive, send) -> None:
        if scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        refusal = _cross_site(scope, headers)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        if scope["method"] == "DELETE":
            await self.app(scope, receive, send)
            return
        try:
            body = await read_body_within(receive, headers.get("content-length", ""), self.max_body_bytes)
        except ClientDisconnect:
            return
        if body is None:
            await error_response(413, "body", f"request body larger than {self.max_body_bytes} bytes "
                                              "(ALPES_MAX_BODY_BYTES)")(scope, receive, send)
            return
        media_type = headers.get("content-type", "").split(";")[0].strip().lower()
        if body and not (media_type == "application/json" or media_type.endswith("+json")):
            await error_response(415, "content-type", f"must be application/json, not {media_type or 'missing'}")(
                scope, receive, send)
            return
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as error:
            await error_response(422, "body", f"not valid UTF-8 (byte {error.start})")(scope, receive, send)
            return
        if body:
            # JSON that is well formed but cannot be held (nested thousands deep, a number of
            # thousands of digits): 422 naming the body, before any route parses it. Broken JSON
            # goes on to the route, which names the position.
            try:
                scope[PARSED_BODY] = json.loads(body)
            except (RecursionError, ValueError) as error:
                problem = _unparsable(error)
                if problem is not None:
                    await error_response(422, "body", problem)(scope, receive, send)
                    return
        await self.app(scope, replaying(body, receive), send)


def forwarded(scope, trusted: tuple[IPNetwork, ...]):
    """`scope` with the client's address and scheme as forwarded by a trusted proxy (a copy), or
    itself when the peer is not one of `trusted` or sent no forwarding headers (kernel/proxies.py)."""
    peer = scope.get("client")
    headers = [(k, v) for k, v in scope["headers"] if k in (b"x-forwarded-for", b"x-forwarded-proto")]
    if peer and headers:
        forwarded_for = ", ".join(v.decode("latin-1") for k, v in headers if k == b"x-forwarded-for")
        proto = next((v.decode("latin-1") for k, v in headers if k == b"x-forwarded-proto"), None)
        client, scheme = resolve(peer[0], forwarded_for or None, proto, trusted)
        scope = dict(scope)
        if client is not None and forwarded_for:
            scope["client"] = (str(client), 0)
        if scheme is not None and scope["type"] == "http":
            scope["scheme"] = scheme
    return scope


class ProxyHeaders:
    """ASGI middleware: `scope["client"]` and `scope["scheme"]` say who called and over what, from
    X-Forwarded-For/-Proto only when the TCP peer is a trusted proxy (kernel/proxies.py); from
    anyone else the headers are ignored. The client's host is always a parsed address (or the
    socket's own peer, untouched). Run uvicorn with proxy_headers=False: its own middleware trusts
    127.0.0.1, i.e. every local caller."""

    def __init__(self, app, trusted: tuple[IPNetwork, ...]) -> None:
        self.app = app
        self.trusted = trusted

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] in ("http", "websocket") and self.trusted:
            scope = forwarded(scope, self.trusted)
        await self.app(scope, receive, send)


def client_address(request: Request) -> IPAddress | None:
    """The caller's address as ProxyHeaders resolved it, parsed (None when the socket has none,
    e.g. a unix socket or the test client)."""
    client = request.scope.get("client")
    return client_ip(client[0]) if client else None


# The content types a browser sends cross-site without asking first (no CORS preflight): an HTML
# form or a "simple" fetch. No route here takes them, so they are refused even with no body.
_SIMPLE_CONTENT_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data", "text/plain")


def _cross_site(scope, headers: dict[str, str]) -> JSONResponse | None:
    """A state change a browser could have been tricked into sending (CSRF): a form-like content
    type, or an Origin other than the service's own (its /docs page). Servers and the console send
    no Origin; every state change takes a JSON body or none."""
    media_type = headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type in _SIMPLE_CONTENT_TYPES:
        return error_response(415, "content-type", f"must be application/json, not {media_type}")
    origin = headers.get("origin")
    if origin is not None:
        own = f"{scope.get('scheme', 'http')}://{headers.get('host', '')}"
        if origin.rstrip("/").lower() != own.lower():
            return error_response(403, "origin", f"cross-site request from {origin[:100]} refused: state changes "
                                                 "come from servers (no Origin) or this service's own pages")
    return None


def error_response(status: int, field: str | None, reason: str, *, detail: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """The error shape (ERROR_SCHEMA) with one error: the field (None: the request as a whole) and why."""
    return JSONResponse(status_code=status, headers=headers,
                        content={"detail": detail or reason, "errors": [{"field": field, "reason": reason}]})


# The one place where a domain refusal becomes an HTTP status.
_STATUS = {NotFound: 404, NotAllowed: 403, Conflict: 409, RuleViolated: 422}


def status_of(error: DomainError) -> int:
    return next((status for kind, status in _STATUS.items() if isinstance(error, kind)), 422)


# -- validators of what arrives from outside ---------------------------------------------------
# Control characters (C0, DEL, C1) and the Unicode line/paragraph separators: never part of a
# name, a reason or an id, and a way to forge log lines or break CSV exports.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_MARKUP = re.compile(r"[<>]")
# Dates a business fact can carry: before 2000 or from 2100 on is a typo or a probe, and beyond
# year 9999 (or before 1) the databases and the UTC conversion would fail.
EARLIEST = date(2000, 1, 1)
LATEST = date(2099, 12, 31)


def _plain_text(value: str) -> str:
    if _CONTROL.search(value):
        raise ValueError("must not contain control characters")
    if _MARKUP.search(value):
        raise ValueError("must not contain < or > (markup)")
    return value


def _in_range(value: date) -> date:
    day = value.date() if isinstance(value, datetime) else value
    if not EARLIEST <= day <= LATEST:
        raise ValueError(f"must be between {EARLIEST.isoformat()} and {LATEST.isoformat()}")
    return value


_ISO_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}")


def _iso_text(value):
    # Numbers (in JSON or a query string) would be read as Unix timestamps: dates are ISO 8601 text.
    if isinstance(value, date):
        return value
    if not isinstance(value, str) or not _ISO_DATE.match(value):
        raise ValueError("must be an ISO 8601 date (YYYY-MM-DD...)")
    return value


PlainText = Annotated[str, AfterValidator(_plain_text)]
# An id of ours or of a caller's system: letters, digits and . _ : - only (no quotes, spaces, markup).
Identifier = Annotated[str, StringConstraints(min_length=1, max_length=36, pattern=r"^[A-Za-z0-9._:-]+$")]
BoundedDate = Annotated[date, BeforeValidator(_iso_text), AfterValidator(_in_range)]
BoundedDatetime = Annotated[AwareDatetime, BeforeValidator(_iso_text), AfterValidator(_in_range)]
# Filters in query strings: any ISO 8601 date or date-time (a time zone is optional there).
IsoDate = Annotated[date, BeforeValidator(_iso_text)]
IsoDatetime = Annotated[datetime, BeforeValidator(_iso_text)]
# Paging beyond this is a probe, and past 2**63 the databases cannot even bind the number.
MAX_OFFSET = 10**9
MAX_SEQ = 2**62
