"""What every page function uses: the user's session, the services as that user, rendering, flash
messages and error pages. (The composition root, app.py, puts these on each request.)"""

from __future__ import annotations

from contextvars import ContextVar
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.templating import Jinja2Templates
from markupsafe import Markup, escape

from .services import ServiceError, Services
from .sessions import ConsoleSession

PACKAGE_DIR = Path(__file__).resolve().parent
TEMPLATES_DIR = PACKAGE_DIR / "templates"
STATIC_DIR = PACKAGE_DIR / "static"
CSRF_FIELD = "csrf_token"

# The CSRF token of the session being served, for the template globals csrf_token() / csrf_field()
# (set by the guard before the page runs; a context variable, so concurrent requests never mix).
_current_csrf: ContextVar[str] = ContextVar("consola_csrf", default="")


class PageError(Exception):
    """A page refused: shown as the error page with this status (401, 403, 404, ...)."""

    def __init__(self, status: int, title: str, detail: str = "") -> None:
        super().__init__(f"{status} {title}")
        self.status = status
        self.title = title
        self.detail = detail


def csrf_token() -> str:
    return _current_csrf.get()


def csrf_field() -> Markup:
    return Markup(f'<input type="hidden" name="{CSRF_FIELD}" value="{escape(_current_csrf.get())}">')


def set_csrf(token: str) -> None:
    _current_csrf.set(token)


def make_templates() -> Jinja2Templates:
    templates = Jinja2Templates(directory=str(TEMPLATES_DIR))
    env = templates.env
    env.globals.update(csrf_token=csrf_token, csrf_field=csrf_field)
    env.filters["money"] = money
    env.filters["when"] = when
    return templates


def money(value: Any, currency: str | None = None) -> str:
    """An amount as the services send it (a decimal string) with its currency; never via float."""
    if value is None or value == "":
        return "—"
    text = str(value)
    return f"{text} {currency}" if currency else text


def when(value: Any) -> str:
    """An ISO timestamp as `2026-12-05 03:52:01 UTC` (seconds, no microseconds)."""
    if not value:
        return "—"
    text = str(value).replace("T", " ")
    text = text.split(".")[0].split("+")[0].removesuffix("Z")
    return f"{text} UTC"


def session_of(request: Request) -> ConsoleSession:
    return request.state.console_session


def services_of(request: Request) -> Services:
    """The services as the signed-in user sees them (their key)."""
    session = session_of(request)
    return Services(request.app.state.http, request.app.state.service_urls, session.key)


def flash(request: Request, message: str, kind: str = "ok") -> None:
    """A message shown once on the next page this session renders (after a redirect)."""
    session_of(request).flashes.append((kind, message))


def render(request: Request, template: str, context: dict | None = None, status: int = 200) -> HTMLResponse:
    session: ConsoleSession | None = getattr(request.state, "console_session", None)
    flashes: list[tuple[str, str]] = []
    if session is not None:
        flashes, session.flashes = session.flashes, []
    return request.app.state.templates.TemplateResponse(
        request, template, {"session": session, "flashes": flashes, **(context or {})}, status_code=status)


def redirect(url: str) -> RedirectResponse:
    """After a successful post: back to a page with GET (303), so a reload does not post again."""
    return RedirectResponse(url, status_code=303)


async def form_of(request: Request) -> dict[str, str]:
    """The posted form's text fields, stripped (the CSRF token left out)."""
    form = await request.form()
    return {k: v.strip() for k, v in form.items() if isinstance(v, str) and k != CSRF_FIELD}


def error_page(request: Request, status: int, title: str, detail: str = "",
               errors: list[dict] | None = None) -> HTMLResponse:
    return render(request, "error.html", {"status": status, "title": title, "detail": detail,
                                          "errors": errors or []}, status=status)


def service_error_page(request: Request, error: ServiceError) -> HTMLResponse:
    titles = {401: "Your key was refused", 403: "Not allowed", 404: "Not found", 409: "Conflict",
              422: "Invalid input", 429: "Too many requests", 503: "A service is unavailable",
              504: "A service did not answer"}
    status = error.status if 400 <= error.status < 600 else 502
    return error_page(request, status, titles.get(status, f"{error.service} refused"),
                      f"{error.service}: {error.detail}", error.errors)
