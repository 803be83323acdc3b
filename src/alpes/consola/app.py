"""The console's composition root: `build(settings)` makes its FastAPI app.

The console is a backend-for-frontend, not a bounded context: it holds sessions and nothing else,
and reads and writes only through the four services' HTTP APIs with the signed-in user's key.
Every request passes one guard before its page runs: the session from the cookie, the page's rule
(alpes/authorization.py CONSOLE_PAGES: the roles that may open it; a route without a rule stops the
console at start-up) and, for every post, the session's CSRF token.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

import httpx
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ..authorization import CONSOLE_PAGES
from ..kernel.http import NO_NATIVE_TELEMETRY, ProxyHeaders, read_body_within, replaying
from ..kernel.proxies import parse_networks
from ..settings import Settings
from . import live, pages_advertiser, pages_affiliate, pages_operator, signin
from .services import ServiceError, service_urls
from .sessions import COOKIE, SessionStore
from .web import CSRF_FIELD, STATIC_DIR, PageError, error_page, make_templates, redirect, service_error_page, set_csrf

log = logging.getLogger("alpes.consola")

# The page modules, each with `router() -> APIRouter`.
PAGE_MODULES = (signin, pages_operator, live, pages_advertiser, pages_affiliate)
_UNSAFE = ("POST", "PUT", "PATCH", "DELETE")
# The browser may load scripts, styles, images and fonts from this console only, and no page may be
# framed (clickjacking a one-click approve). Inline styles are allowed (chart sizes), inline scripts not.
SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
                                 b"img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; "
                                 b"form-action 'self'; base-uri 'none'"),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
]


# The largest form the console reads (its biggest, the rules editor, is a few kilobytes).
MAX_FORM_BYTES = 64 * 1024


class SignInNeeded(Exception):
    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.path = path


class SecurityHeaders:
    """ASGI middleware: the headers above on every answer (pages, errors, static files, the stream)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message) -> None:
            if message["type"] == "http.response.start":
                headers = [h for h in message.get("headers", []) if h[0] not in dict(SECURITY_HEADERS)]
                message = {**message, "headers": headers + SECURITY_HEADERS}
            await send(message)

        await self.app(scope, receive, with_headers)


class FormLimit:
    """ASGI middleware: a request body larger than MAX_FORM_BYTES gets a 413 before any page reads it
    (read whole only up to the limit, whatever Content-Length claims)."""

    def __init__(self, app, max_bytes: int = MAX_FORM_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"").decode("latin-1")
        try:
            body = await read_body_within(receive, declared, self.max_bytes)
        except ClientDisconnect:
            return
        if body is None:
            page = b"<!doctype html><title>413 Form too large</title><h1>Form too large</h1>"
            await send({"type": "http.response.start", "status": 413,
                        "headers": [(b"content-type", b"text/html; charset=utf-8"),
                                    (b"content-length", str(len(page)).encode())]})
            await send({"type": "http.response.body", "body": page})
            return
        await self.app(scope, replaying(body, receive), send)


async def guard(request: Request) -> None:
    """Before every page: who is signed in, whether the page is for their role, and the CSRF token
    of every post (missing, stale or forged: 403 and nothing done)."""
    method = "GET" if request.method == "HEAD" else request.method
    route = request.scope.get("route")
    roles = CONSOLE_PAGES.get((method, route.path)) if route is not None else None
    if roles is None:  # cannot happen past check_pages; fail closed all the same
        raise PageError(403, "Not allowed", f"no rule for {method} {request.url.path}")
    session = request.app.state.sessions.get(request.cookies.get(COOKIE))
    request.state.console_session = session
    if session is not None:
        set_csrf(session.csrf)
    if roles:
        if session is None or not session.signed_in:
            if method == "GET":
                raise SignInNeeded(request.url.path + (f"?{request.url.query}" if request.url.query else ""))
            raise PageError(401, "Signed out", "Your session has ended (signed out, idle too long or the console "
                                               "restarted). Sign in again; nothing was done.")
        if session.role not in roles:
            raise PageError(403, "Not for your role",
                            f"This page is for the {' or '.join(roles)} role; you are signed in as {session.role}.")
    if method in _UNSAFE:
        origin = request.headers.get("origin")
        own = f"{request.url.scheme}://{request.headers.get('host', '')}"
        if origin is not None and origin.rstrip("/").lower() != own.lower():
            raise PageError(403, "Cross-site request refused", f"A form of {origin[:100]} may not post here.")
        form = await request.form()
        token = form.get(CSRF_FIELD)
        if session is None or not isinstance(token, str) or not session.csrf_matches(token):
            raise PageError(403, "Form expired or forged",
                            "The form's security token (csrf_token) is missing, stale or not this session's: "
                            "nothing was done. Reload the page and try again.")


def _api_routes(routes) -> list[APIRoute]:
    """The page routes, through included routers (no prefixes: paths are as served)."""
    found: list[APIRoute] = []
    for route in routes:
        if isinstance(route, APIRoute):
            found.append(route)
        elif hasattr(route, "original_router"):  # FastAPI >= 0.16x keeps included routers whole
            found.extend(_api_routes(route.original_router.routes))
    return found


def check_pages(app: FastAPI) -> None:
    """Every console route has a rule in CONSOLE_PAGES: a new page cannot ship unguarded."""
    routes = {("GET" if m == "HEAD" else m, r.path) for r in _api_routes(app.routes) for m in r.methods}
    missing = sorted(routes - set(CONSOLE_PAGES))
    if missing:
        raise RuntimeError(f"consola: pages without a rule in alpes/authorization.py CONSOLE_PAGES: {missing}")


def build(settings: Settings, *, urls: dict[str, str] | None = None, idle_seconds: float | None = None) -> FastAPI:
    """The console's app. `urls`: the services' base URLs (default: settings' host and ports)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # One pooled client for every user (their key goes per request); made here, in the server's loop.
        async with httpx.AsyncClient(timeout=httpx.Timeout(10.0, connect=3.0),
                                     # Idle connections dropped before the services' uvicorn closes
                                     # them (5 s), so none is reused as it closes.
                                     limits=httpx.Limits(max_connections=100, max_keepalive_connections=20,
                                                         keepalive_expiry=2.0)) as client:
            app.state.http = client
            yield

    app = FastAPI(title="AlpesPartner console", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan, dependencies=[Depends(guard)], telemetry=NO_NATIVE_TELEMETRY)
    app.state.settings = settings
    app.state.service_urls = urls or service_urls(settings)
    app.state.sessions = SessionStore(idle_seconds if idle_seconds is not None else settings.consola_idle_minutes * 60)
    app.state.templates = make_templates()
    app.mount("/static", StaticFiles(directory=str(STATIC_DIR)), name="static")
    for module in PAGE_MODULES:
        app.include_router(module.router())
    _error_pages(app)
    check_pages(app)
    app.add_middleware(FormLimit)
    app.add_middleware(SecurityHeaders)
    # The client's scheme (Secure cookies behind a TLS proxy) from forwarding headers of our proxies only.
    app.add_middleware(ProxyHeaders, trusted=parse_networks(settings.trusted_proxies))
    return app


def _error_pages(app: FastAPI) -> None:
    @app.exception_handler(SignInNeeded)
    async def sign_in_needed(_request: Request, error: SignInNeeded) -> Response:
        return redirect(signin.sign_in_url(error.path))

    @app.exception_handler(PageError)
    async def page_error(request: Request, error: PageError) -> Response:
        return error_page(request, error.status, error.title, error.detail)

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, error: ServiceError) -> Response:
        session = getattr(request.state, "console_session", None)
        if error.status == 401 and session is not None and session.signed_in:
            # The key was revoked or expired since signing in (or the local mode ended): sign out.
            request.app.state.sessions.drop(session.id)
            request.state.console_session = None
            return error_page(request, 401, "Signed out: your key was refused",
                              f"{error.service}: {error.detail}. Sign in again.")
        if error.status >= 500:  # the page says which service; the log keeps it for whoever runs the console
            log.warning("service failed for %s %s: %s %s: %s", request.method, request.url.path, error.service,
                        error.status, error.detail)
        return service_error_page(request, error)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, error: RequestValidationError) -> Response:
        errors = [{"field": ".".join(str(p) for p in e["loc"][1:]) or str(e["loc"][0]), "reason": e["msg"]}
                  for e in error.errors()]
        return error_page(request, 422, "Invalid input", "", errors)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> Response:
        titles = {404: "Page not found", 405: "Not allowed here"}
        return error_page(request, error.status_code, titles.get(error.status_code, "Refused"), str(error.detail))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> Response:
        log.exception("console page failed: %s %s", request.method, request.url.path)
        return error_page(request, 500, "Something went wrong", "The error is in the console's log.")
