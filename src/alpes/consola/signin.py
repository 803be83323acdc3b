"""Signing in and out, the home page of each role, and the console's own /health.

A key names its role in its shape (`alpes_<op|adv|aff>_...`, and the shape is covered by the digest
the services check, so it cannot be edited), so the console asks marketing (which issues keys and
knows a new one first) a question that role may ask: 200 (or 403 for a key whose scopes exclude that
question) proves the key, 401 refuses it with the service's reason.
"""

from __future__ import annotations

from urllib.parse import quote

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from ..kernel.access import ADVERTISER, AFFILIATE, OPERATOR
from .services import ServiceError, Services
from .sessions import COOKIE
from .web import form_of, redirect, render, session_of, set_csrf

HOME = {OPERATOR: "/operador", ADVERTISER: "/anunciante", AFFILIATE: "/afiliado"}
_KIND = {"op": OPERATOR, "adv": ADVERTISER, "aff": AFFILIATE}
# The question each role may ask marketing, to prove a key.
_PROBE = {OPERATOR: "/claves", ADVERTISER: "/anunciantes", AFFILIATE: "/campanas"}


def safe_next(value: str | None) -> str | None:
    """Where to go after signing in: a path of this console only (never `//host` or a URL)."""
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value or len(value) > 500:
        return None
    return value


def set_session_cookie(request: Request, response: Response, session_id: str) -> None:
    response.set_cookie(COOKIE, session_id, httponly=True, samesite="strict", path="/",
                        secure=request.url.scheme == "https")


def start_session(request: Request):
    """The visitor's session, an anonymous one started for the sign-in form when there is none."""
    session = getattr(request.state, "console_session", None)
    if session is None:
        session = request.app.state.sessions.start()
        request.state.console_session = session
        request.state.new_session_id = session.id
        set_csrf(session.csrf)
    return session


async def local_operator_mode(services: Services) -> bool:
    """Protected local mode as marketing's /health says (no key exists yet: anonymous = operator)."""
    status, report = await services.health("marketing")
    return bool(report.get("access", {}).get("anonymous_is_operator")) if status else False


async def identify(services: Services, key: str) -> tuple[str, str | None, str | None]:
    """(role, tenant id, display name) of a key, or ServiceError(401) with the reason."""
    parts = key.split("_")
    role = _KIND.get(parts[1]) if len(parts) == 4 and parts[0] == "alpes" else None
    if role is None:
        raise ServiceError("consola", 401, "not an AlpesPartner API key (alpes_<op|adv|aff>_<id>_<secret>)")
    try:
        answer = await services.get("marketing", _PROBE[role])
    except ServiceError as error:
        if error.status != 403:  # 403: a valid key whose scopes exclude this question
            raise
        answer = None
    tenant_id = name = None
    if role == OPERATOR and answer:
        # Its own key's name (the list is of every key), else the key id.
        name = next((k.get("nombre") for k in answer.get("claves", []) if k.get("key_id") == parts[2]), None)
    elif role == ADVERTISER and answer and answer.get("anunciantes"):
        own = answer["anunciantes"][0]
        tenant_id, name = own.get("id"), own.get("nombre")
    elif role == AFFILIATE:
        # Afiliados learns a new key from marketing.eventos moments after it is issued; the name is
        # only for the page header, so a key it does not know yet signs in all the same.
        try:
            own = (await services.get("afiliados", "/afiliados")).get("afiliados") or []
            if own:
                tenant_id, name = own[0].get("id"), own[0].get("nombre")
        except ServiceError:
            pass
    return role, tenant_id, name or (parts[2] if role == OPERATOR else None)


def router() -> APIRouter:
    router = APIRouter()

    @router.get("/health")
    async def health() -> JSONResponse:
        """The console is up (what `alpes up` waits for); the services' health is on /operador."""
        return JSONResponse({"status": "ok", "service": "consola"})

    @router.get("/")
    async def home(request: Request) -> Response:
        return redirect(HOME[session_of(request).role])

    @router.get("/entrar")
    async def sign_in_page(request: Request, siguiente: str | None = None) -> Response:
        current = getattr(request.state, "console_session", None)
        if current is not None and current.signed_in:
            return redirect(safe_next(siguiente) or HOME[current.role])
        start_session(request)
        local = await local_operator_mode(Services(request.app.state.http, request.app.state.service_urls, None))
        return _page(request, {"local_mode": local, "siguiente": safe_next(siguiente)})

    @router.post("/entrar")
    async def sign_in(request: Request) -> Response:
        form = await form_of(request)
        after = safe_next(form.get("siguiente"))
        anonymous = Services(request.app.state.http, request.app.state.service_urls, None)
        store = request.app.state.sessions
        previous = session_of(request)
        if form.get("modo") == "local":
            if not await local_operator_mode(anonymous):
                return _page(request, {"local_mode": False, "siguiente": after,
                                       "error": "The protected local mode is over (an API key exists, or "
                                                "ALPES_AUTH=required): sign in with a key."}, status=401)
            session = store.sign_in(previous, role=OPERATOR, key=None, name="local operator", local_mode=True)
        else:
            key = form.get("clave", "")
            if not key:
                return _page(request, {"local_mode": await local_operator_mode(anonymous), "siguiente": after,
                                       "error": "clave: enter your API key."}, status=401)
            try:
                role, tenant_id, name = await identify(Services(anonymous.client, anonymous.urls, key), key)
            except ServiceError as error:
                status = 401 if error.status in (401, 403) else error.status
                reason = error.detail if error.status == 401 else f"{error.service}: {error.detail}"
                return _page(request, {"local_mode": await local_operator_mode(anonymous), "siguiente": after,
                                       "error": f"Key refused: {reason}"}, status=status)
            session = store.sign_in(previous, role=role, key=key, tenant_id=tenant_id, name=name)
        response = redirect(after or HOME[session.role])
        set_session_cookie(request, response, session.id)
        return response

    @router.post("/salir")
    async def sign_out(request: Request) -> Response:
        request.app.state.sessions.drop(session_of(request).id)
        response = redirect("/entrar")
        response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict",
                               secure=request.url.scheme == "https")
        return response

    return router


def _page(request: Request, context: dict, status: int = 200) -> Response:
    response = render(request, "entrar.html", context, status=status)
    new_id = getattr(request.state, "new_session_id", None)
    if new_id:
        set_session_cookie(request, response, new_id)
    return response


def sign_in_url(path: str) -> str:
    return f"/entrar?siguiente={quote(path, safe='/')}"

