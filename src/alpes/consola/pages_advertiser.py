"""The advertiser's pages: dashboard, campaigns (terms, commission rules and their versions, state,
enrolments, budget used), its affiliates, the review queue of held conversions, one conversion's
story, payouts and reports with charts and CSV.

Every figure is what the services answer to the signed-in user's key: an advertiser sees its own
tenant, an operator (who may open these pages too) sees everything. Forms post here, the page
turns them into the service's JSON body and shows the service's refusal (its status, the field and
the reason) on the same page, with what was typed kept. Money stays a decimal string or Decimal
from the service to the page; only the chart drawing in the browser turns it into a number.
"""

from __future__ import annotations

import asyncio
import csv
import io
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable
from datetime import date, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from .pages_affiliate import tracking_base
from .services import ServiceError
from .web import PageError, flash, form_of, redirect, render, services_of

REPORT_DAYS = 30          # the reports' default period: the last 30 days, today included
MAX_REPORT_DAYS = 366     # a longer period is refused (the charts draw one point per day)
BLANK_RULE_ROWS = 2       # empty rows the rules editor offers beside the current rules
PAGE_SIZE = 50            # conversions per page of the conversions list
CONVERSION_STATUSES = ("detected", "on_hold", "validated", "rejected", "refunded")
_EPC_PLACES = Decimal("0.0001")

CAMPAIGN_ACTIONS = {"activar": "activated", "pausar": "paused", "finalizar": "finished"}
AFFILIATE_ACTIONS = {"aprobar": "approved", "suspender": "suspended", "reactivar": "reactivated"}
# Common reasons offered when rejecting a held conversion (any other may be typed).
REJECT_REASONS = ("fraud suspected", "duplicate order", "order cancelled", "outside campaign terms",
                  "self-referral", "test order")

# The report's fields, as the marketing service names them (GET /reportes).
_COUNTS = ("clicks", "detectadas", "validadas", "rechazadas", "reembolsadas", "comisiones")
_AMOUNTS = ("ingresos", "ingresos_reembolsados", "monto", "monto_pendiente", "monto_aprobado", "monto_pagado",
            "monto_revertido", "comision_ganada")
CSV_COLUMNS = ("dia", "campana_id", "afiliado_id", "moneda", *_COUNTS, *_AMOUNTS, "epc", "tasa_conversion",
               "tasa_conversion_base")


class FormProblem(Exception):
    """A form field the console itself can tell is wrong before asking a service."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


# -- forms → the services' JSON bodies (pure) ----------------------------------------------------
def _optional(form: dict[str, str], *names: str) -> dict[str, str]:
    return {n: form[n] for n in names if form.get(n)}


def _whole(form: dict[str, str], name: str) -> int | None:
    text = form.get(name, "")
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise FormProblem(name, "must be a whole number") from None


def _codes(text: str) -> list[str]:
    return [part.strip() for part in text.replace(";", ",").split(",") if part.strip()]


def campaign_body(form: dict[str, str], *, operator: bool) -> dict[str, Any]:
    """POST /campanas from the create form. Amounts go as the typed decimal strings (the service
    checks them exactly); empty optional fields are left out so the service's defaults apply."""
    body: dict[str, Any] = {"nombre": form.get("nombre", ""),
                            "porcentaje_comision": form.get("porcentaje_comision", ""),
                            "moneda": (form.get("moneda") or "EUR").upper(),
                            "activar": form.get("activar") == "on",
                            "modelo_atribucion": form.get("modelo_atribucion") or "ultimo_click"}
    body.update(_optional(form, "landing_url", "presupuesto", "valor_maximo_conversion"))
    for name in ("ventana_atribucion_dias", "periodo_bloqueo_dias"):
        number = _whole(form, name)
        if number is not None:
            body[name] = number
    for name in ("fecha_inicio", "fecha_fin"):
        if form.get(name):  # <input type="date">: the day's start, UTC
            body[name] = f"{form[name]}T00:00:00Z"
    segmentacion = {k: _codes(form.get(k, "")) for k in ("paises", "canales", "categorias")}
    segmentacion["paises"] = [p.upper() for p in segmentacion["paises"]]
    if any(segmentacion.values()):
        body["segmentacion"] = segmentacion
    if operator and form.get("anunciante_id"):
        body["anunciante_id"] = form["anunciante_id"]
    return body


def rule_rows(form: dict[str, str]) -> list[int]:
    """The row numbers the rules editor posted (fields `regla-<n>-tipo`), in order."""
    rows = set()
    for name in form:
        parts = name.split("-")
        if len(parts) == 3 and parts[0] == "regla" and parts[1].isdigit():
            rows.add(int(parts[1]))
    return sorted(rows)


def rules_body(form: dict[str, str]) -> dict[str, Any]:
    """PUT /campanas/{id}/reglas from the editor: the rows whose kind is chosen, in order (first
    match wins), each with one value (a flat amount for cpa, a percentage of the sale for cps), and
    the per-affiliate cap when both its amount and period are given. A row left without a kind is
    dropped: that is how a rule is removed."""
    reglas = []
    for n in rule_rows(form):
        tipo = form.get(f"regla-{n}-tipo", "")
        if not tipo:
            continue
        if tipo not in ("cpa", "cps"):
            raise FormProblem(f"regla-{n}-tipo", "must be cpa or cps")
        valor = form.get(f"regla-{n}-valor", "")
        if not valor:
            raise FormProblem(f"regla-{n}-valor", "a cpa rule needs its amount, a cps rule its percentage")
        regla: dict[str, Any] = {"tipo": tipo, "monto" if tipo == "cpa" else "porcentaje": valor}
        regla.update({k: form[f"regla-{n}-{k}"] for k in ("conversion_type", "afiliado_id")
                      if form.get(f"regla-{n}-{k}")})
        minimo = _whole(form, f"regla-{n}-min_aprobadas")
        if minimo is not None:
            regla["min_aprobadas"] = minimo
        reglas.append(regla)
    body: dict[str, Any] = {"reglas": reglas}
    tope_monto, tope_periodo = form.get("tope-monto", ""), form.get("tope-periodo", "")
    if tope_monto or tope_periodo:
        if not (tope_monto and tope_periodo):
            raise FormProblem("tope-monto" if not tope_monto else "tope-periodo",
                              "a cap needs both its amount and its period")
        body["tope_por_afiliado"] = {"monto": tope_monto, "periodo": tope_periodo}
    return body


def rule_field(service_field: str) -> str:
    """The editor's input for a field the marketing service named (`reglas.1.monto` → `regla-1-valor`)."""
    parts = service_field.split(".")
    if len(parts) >= 3 and parts[0] == "reglas" and parts[1].isdigit():
        name = "valor" if parts[2] in ("monto", "porcentaje") else parts[2]
        return f"regla-{parts[1]}-{name}"
    if parts[0] == "tope_por_afiliado" and len(parts) >= 2:
        return f"tope-{parts[1]}"
    return service_field


def rules_form_rows(reglas: list[dict], blank: int = BLANK_RULE_ROWS) -> list[dict[str, str]]:
    """The editor's rows for the rules in force plus `blank` empty ones, as the form's values."""
    rows = [{"tipo": r["tipo"], "valor": (r["monto"] if r["tipo"] == "cpa" else r["porcentaje"]) or "",
             "conversion_type": r.get("conversion_type") or "", "afiliado_id": r.get("afiliado_id") or "",
             "min_aprobadas": str(r["min_aprobadas"]) if r.get("min_aprobadas") else ""} for r in reglas]
    return rows + [{"tipo": "", "valor": "", "conversion_type": "", "afiliado_id": "", "min_aprobadas": ""}
                   for _ in range(blank)]


def posted_rule_rows(form: dict[str, str]) -> list[dict[str, str]]:
    """What was typed into the editor, to show it again beside the service's refusal."""
    return [{k: form.get(f"regla-{n}-{k}", "") for k in ("tipo", "valor", "conversion_type", "afiliado_id",
                                                           "min_aprobadas")} for n in rule_rows(form)]


# The terms a running campaign may change (marketing PUT /campanas/{id}; marketing/domain.py says why
# the others may not), as the "Edit terms" form names its inputs: the service's own field names.
TERM_FIELDS = ("nombre", "presupuesto", "fecha_fin", "landing_url", "valor_maximo_conversion",
               "min_segundos_click_conversion", "periodo_bloqueo_dias")
TERM_NAMES = {"nombre": "name", "presupuesto": "budget", "fecha_fin": "end", "landing_url": "landing page",
              "valor_maximo_conversion": "maximum conversion value", "min_segundos_click_conversion":
              "minimum seconds from click", "periodo_bloqueo_dias": "lock period"}
_CLEARABLE_TERMS = ("presupuesto", "fecha_fin", "valor_maximo_conversion", "min_segundos_click_conversion",
                    "landing_url")  # empty: none (the service refuses to drop a landing page, with its reason)


def terms_form_values(campana: dict[str, Any]) -> dict[str, str]:
    """The "Edit terms" inputs filled with the campaign's current terms (the end as its UTC day)."""
    values = {name: "" if campana.get(name) is None else str(campana[name]) for name in TERM_FIELDS}
    values["fecha_fin"] = (campana.get("fecha_fin") or "")[:10]
    return values


def terms_body(form: dict[str, str], campana: dict[str, Any]) -> dict[str, Any]:
    """PUT /campanas/{id} from the "Edit terms" form: only the terms whose input differs from what the
    campaign has now (so an untouched end date keeps its time of day), an emptied optional term as
    null. Whole numbers are checked here; amounts, dates and URLs are judged by the service."""
    current = terms_form_values(campana)
    body: dict[str, Any] = {}
    for name in TERM_FIELDS:
        typed = form.get(name, "")
        if typed == current[name]:
            continue
        if not typed:
            if name not in _CLEARABLE_TERMS:
                raise FormProblem(name, "cannot be empty")
            body[name] = None
        elif name in ("min_segundos_click_conversion", "periodo_bloqueo_dias"):
            body[name] = _whole(form, name)
        elif name == "fecha_fin":  # <input type="date">: the campaign ends as that day starts, UTC
            body[name] = f"{typed}T00:00:00Z"
        else:
            body[name] = typed
    return body


# -- reports (pure) ------------------------------------------------------------------------------
def report_period(desde: str | None, hasta: str | None, today: date) -> tuple[date, date]:
    """The period asked for (ISO days), by default the last REPORT_DAYS days; PageError 422 naming
    the field when a day is not a date, the period is reversed or longer than MAX_REPORT_DAYS."""
    def day(name: str, text: str | None, default: date) -> date:
        if not text:
            return default
        try:
            return date.fromisoformat(text)
        except ValueError:
            raise PageError(422, "Invalid period", f"{name}: not a date (YYYY-MM-DD): {text[:20]!r}") from None

    end = day("hasta", hasta, today)
    start = day("desde", desde, end - timedelta(days=REPORT_DAYS - 1))
    if start > end:
        raise PageError(422, "Invalid period", "desde: is after hasta")
    if (end - start).days + 1 > MAX_REPORT_DAYS:
        raise PageError(422, "Invalid period", f"desde: the period is longer than {MAX_REPORT_DAYS} days")
    return start, end


def _dec(value: Any) -> Decimal:
    try:
        return Decimal(str(value)) if value not in (None, "") else Decimal(0)
    except InvalidOperation:
        return Decimal(0)


def _epc(ganada: Decimal, clicks: int) -> str | None:
    return str((ganada / clicks).quantize(_EPC_PLACES)) if clicks else None


def _days(start: date, end: date) -> list[str]:
    return [(start + timedelta(days=n)).isoformat() for n in range((end - start).days + 1)]


def daily_charts(lines: list[dict], start: date, end: date) -> dict[str, dict]:
    """The reports page's four charts, one point per day of the period (days without figures are 0):
    activity (clicks, conversions detected and validated), revenue, commissions earned and EPC, the
    money ones with one series per currency (amounts of different currencies are never added)."""
    labels = _days(start, end)
    index = {d: n for n, d in enumerate(labels)}
    counts = {k: [0] * len(labels) for k in ("clicks", "detectadas", "validadas")}
    currencies = sorted({line.get("moneda") or "" for line in lines} - {""})
    money = {m: {k: [Decimal(0)] * len(labels) for k in ("ingresos", "comision_ganada")} for m in currencies}
    clicks_by_currency = {m: [0] * len(labels) for m in currencies}
    for line in lines:
        n = index.get(line.get("dia"))
        if n is None:
            continue
        for k in counts:
            counts[k][n] += int(line.get(k) or 0)
        m = line.get("moneda")
        if m in money:
            money[m]["ingresos"][n] += _dec(line.get("ingresos"))
            money[m]["comision_ganada"][n] += _dec(line.get("comision_ganada"))
            clicks_by_currency[m][n] += int(line.get("clicks") or 0)
    return {
        "chart-actividad": {"labels": labels, "series": [
            {"label": "Clicks", "data": counts["clicks"]},
            {"label": "Conversions detected", "data": counts["detectadas"]},
            {"label": "Conversions validated", "data": counts["validadas"]}]},
        "chart-ingresos": {"labels": labels, "series": [
            {"label": f"Revenue {m}", "data": [str(v) for v in money[m]["ingresos"]]} for m in currencies]},
        "chart-comisiones": {"labels": labels, "series": [
            {"label": f"Commissions {m}", "data": [str(v) for v in money[m]["comision_ganada"]]} for m in currencies]},
        "chart-epc": {"labels": labels, "series": [
            {"label": f"EPC {m}", "data": [_epc(g, c) for g, c in zip(money[m]["comision_ganada"],
                                                                       clicks_by_currency[m], strict=True)]}
            for m in currencies]},
    }


def _summed(lines: Iterable[dict], key: Callable[[dict], tuple]) -> list[dict]:
    groups: dict[tuple, dict] = {}
    for line in lines:
        k = key(line)
        group = groups.setdefault(k, {**{f: 0 for f in _COUNTS}, **{f: Decimal(0) for f in _AMOUNTS}})
        for f in _COUNTS:
            group[f] += int(line.get(f) or 0)
        for f in _AMOUNTS:
            group[f] += _dec(line.get(f))
    out = []
    for k, group in sorted(groups.items(), key=lambda item: tuple(str(x) for x in item[0])):
        group["epc"] = _epc(group["comision_ganada"], group["clicks"])
        out.append({"key": k, **group})
    return out


def totals_by_currency(lines: list[dict]) -> list[dict]:
    """The period's totals, one line per currency."""
    return [{"moneda": t["key"][0], **t} for t in _summed(lines, lambda line: (line.get("moneda") or "",))]


def per_affiliate(lines: list[dict]) -> list[dict]:
    """The period's figures per affiliate and currency."""
    return [{"afiliado_id": t["key"][0], "moneda": t["key"][1], **t}
            for t in _summed(lines, lambda line: (line.get("afiliado_id") or "", line.get("moneda") or ""))]


def per_campaign(lines: list[dict]) -> list[dict]:
    """The period's figures per campaign (each campaign has one currency)."""
    return [{"campana_id": t["key"][0], "moneda": t["key"][1], **t}
            for t in _summed(lines, lambda line: (line.get("campana_id") or "", line.get("moneda") or ""))]


def budget_used(lines: list[dict]) -> dict[str, Decimal]:
    """Per campaign, what its commissions have taken of its budget: the sum of their amounts,
    whatever their state, exactly what marketing counts against `presupuesto`."""
    used: dict[str, Decimal] = defaultdict(Decimal)
    for line in lines:
        used[line.get("campana_id") or ""] += _dec(line.get("monto"))
    return dict(used)


def _csv_cell(value: Any) -> Any:
    """A cell a spreadsheet will not run as a formula (ids and names come from users)."""
    if value is None:
        return ""
    text = str(value)
    if text[:1] in ("=", "+", "@", "\t", "\r") or (text[:1] == "-" and not _is_number(text)):
        return "'" + text
    return text


def _is_number(text: str) -> bool:
    try:
        Decimal(text)
        return True
    except InvalidOperation:
        return False


def report_csv(lines: list[dict]) -> str:
    """The report's lines (per day, campaign and affiliate) as CSV with a header row."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(CSV_COLUMNS)
    for line in lines:
        writer.writerow([_csv_cell(line.get(c)) for c in CSV_COLUMNS])
    return out.getvalue()


# -- pages ---------------------------------------------------------------------------------------
def _seg(identifier: str) -> str:
    """An id from the page's URL as one path segment of a service's URL (never `..`, `/` or `?`)."""
    return quote(identifier, safe="") if identifier not in (".", "..") else "%2E" * len(identifier)


def _is_operator(request: Request) -> bool:
    return request.state.console_session.role == "operator"


async def _gather(*calls: Awaitable) -> list[Any]:
    return list(await asyncio.gather(*calls))


async def _nothing(value: Any) -> Any:
    return value


async def _optional_get(call: Awaitable, default: Any = None) -> Any:
    """A read the page can do without (404: not there yet, e.g. a saga still to start)."""
    try:
        return await call
    except ServiceError as error:
        if error.status == 404:
            return default
        raise


def _problem(error: ServiceError | FormProblem, field_of: Callable[[str], str] = lambda f: f) -> dict:
    """A refusal as the page shows it: the message and {input name: reason}."""
    if isinstance(error, FormProblem):
        return {"message": f"{error.field}: {error.reason}", "fields": {error.field: error.reason},
                "status": 422}
    fields = {field_of(f): r for f, r in error.field_reasons().items() if f}
    return {"message": f"{error.service}: {error.message()}", "fields": fields, "status": error.status}


def _refused_status(problem: dict) -> int:
    status = problem["status"]
    return status if 400 <= status < 600 else 502


def _names(items: list[dict], key: str = "nombre") -> dict[str, str]:
    return {item["id"]: item.get(key) or item["id"] for item in items}


async def _campaigns_page(request: Request, problem: dict | None = None, values: dict | None = None) -> HTMLResponse:
    services = services_of(request)
    operator = _is_operator(request)
    campanas, reportes, anunciantes = await _gather(
        services.get("marketing", "/campanas", {"limit": 1000}), services.get("marketing", "/reportes"),
        # An operator creates a campaign for an advertiser it picks.
        services.get("marketing", "/anunciantes", {"limit": 1000}) if operator else _nothing({"anunciantes": []}))
    used = budget_used(reportes["reportes"])
    return render(request, "advertiser/campaigns.html", {
        "campanas": campanas["campanas"], "used": used, "operator": operator,
        "advertiser_options": [("", "— none: the operator's own —")] + [
            (a["id"], f"{a['nombre']} ({a['id'][:8]})") for a in anunciantes["anunciantes"]],
        "problem": problem, "values": values or {"moneda": "EUR", "activar": "on", "ventana_atribucion_dias": "30",
                                                 "periodo_bloqueo_dias": "30"}},
        status=_refused_status(problem) if problem else 200)


async def _campaign_page(request: Request, campana_id: str, version: int | None = None,
                         problem: dict | None = None, rows: list[dict] | None = None,
                         tope: dict | None = None, terms: dict | None = None) -> HTMLResponse:
    services = services_of(request)
    campana = await services.get("marketing", f"/campanas/{_seg(campana_id)}")
    reglas, inscripciones, reporte, afiliados = await _gather(
        services.get("marketing", f"/campanas/{_seg(campana_id)}/reglas", {"version": version}),
        services.get("marketing", f"/campanas/{_seg(campana_id)}/inscripciones"),
        services.get("marketing", f"/reportes/campanas/{_seg(campana_id)}", {"agrupar": "total"}),
        services.get("afiliados", "/afiliados", {"limit": 1000}))
    vigentes = reglas  # the rules in force, which the editor starts from, whichever version is shown
    if version is not None:
        vigentes = await services.get("marketing", f"/campanas/{_seg(campana_id)}/reglas")
    names = _names(afiliados["afiliados"])
    return render(request, "advertiser/campaign.html", {
        "campana": campana, "reglas": reglas, "vigentes": vigentes,
        "rows": rows if rows is not None else rules_form_rows(vigentes["reglas"]),
        "tope": tope if tope is not None else (vigentes["tope_por_afiliado"] or {"monto": "", "periodo": ""}),
        "inscripciones": inscripciones["inscripciones"], "afiliados": afiliados["afiliados"], "names": names,
        "link_base": tracking_base(request),
        "used": sum((_dec(r.get("monto")) for r in reporte["reportes"]), Decimal(0)),
        "actions": [a for a in CAMPAIGN_ACTIONS if _allowed(campana["estado"], a)],
        "terms": terms if terms is not None else terms_form_values(campana),
        "problem": problem},
        status=_refused_status(problem) if problem else 200)


def _allowed(estado: str, accion: str) -> bool:
    """The state changes worth offering (the service decides; a stale button gets its 409)."""
    return {"activar": estado in ("borrador", "pausada"), "pausar": estado == "activa",
            "finalizar": estado in ("borrador", "activa", "pausada")}[accion]


async def _affiliates_page(request: Request, problem: dict | None = None, values: dict | None = None) -> HTMLResponse:
    services = services_of(request)
    afiliados, campanas = await _gather(services.get("afiliados", "/afiliados", {"limit": 1000}),
                                        services.get("marketing", "/campanas", {"limit": 1000}))
    return render(request, "advertiser/affiliates.html", {
        "afiliados": afiliados["afiliados"], "campanas": campanas["campanas"], "problem": problem,
        "values": values or {}}, status=_refused_status(problem) if problem else 200)


async def _review_page(request: Request, problem: dict | None = None) -> HTMLResponse:
    services = services_of(request)
    held, campanas, afiliados = await _gather(
        services.get("conversiones", "/conversiones", {"status": "on_hold", "limit": 1000}),
        services.get("marketing", "/campanas", {"limit": 1000}),
        services.get("afiliados", "/afiliados", {"limit": 1000}))
    return render(request, "advertiser/review.html", {
        "held": held["conversiones"], "campaign_names": _names(campanas["campanas"]),
        "affiliate_names": _names(afiliados["afiliados"]), "reasons": REJECT_REASONS, "problem": problem},
        status=_refused_status(problem) if problem else 200)


async def _payouts_page(request: Request, problem: dict | None = None) -> HTMLResponse:
    services = services_of(request)
    pagos, saldos, afiliados = await _gather(services.get("marketing", "/pagos", {"limit": 1000}),
                                             services.get("marketing", "/pagos/saldos"),
                                             services.get("afiliados", "/afiliados", {"limit": 1000}))
    return render(request, "advertiser/payouts.html", {
        "pagos": list(reversed(pagos["pagos"])), "saldos": saldos["saldos"],
        "names": _names(afiliados["afiliados"]), "problem": problem},
        status=_refused_status(problem) if problem else 200)


async def _report_lines(request: Request, start: date, end: date, campana_id: str | None,
                        afiliado_id: str | None) -> list[dict]:
    answer = await services_of(request).get("marketing", "/reportes", {
        "desde": start.isoformat(), "hasta": end.isoformat(), "campana_id": campana_id, "afiliado_id": afiliado_id})
    return answer["reportes"]


def _report_query(request: Request) -> tuple[date, date, str | None, str | None]:
    q = request.query_params
    start, end = report_period(q.get("desde"), q.get("hasta"), date.today())
    return start, end, q.get("campana_id") or None, q.get("afiliado_id") or None


def router() -> APIRouter:
    router = APIRouter()

    @router.get("/anunciante", response_class=HTMLResponse)
    async def dashboard(request: Request) -> HTMLResponse:
        """The advertiser's day at a glance: campaigns by state, the review queue, the last 30 days,
        what it owes its affiliates and the payouts waiting to be paid."""
        services = services_of(request)
        today = date.today()
        start = today - timedelta(days=REPORT_DAYS - 1)
        campanas, held, reportes, saldos, pendientes = await _gather(
            services.get("marketing", "/campanas", {"limit": 1000}),
            services.get("conversiones", "/conversiones", {"status": "on_hold", "limit": 1000}),
            services.get("marketing", "/reportes", {"desde": start.isoformat(), "hasta": today.isoformat()}),
            services.get("marketing", "/pagos/saldos"),
            services.get("marketing", "/pagos", {"estado": "pendiente", "limit": 1000}))
        por_estado: dict[str, int] = defaultdict(int)
        for c in campanas["campanas"]:
            por_estado[c["estado"]] += 1
        owed: dict[str, Decimal] = defaultdict(Decimal)
        for s in saldos["saldos"]:
            owed[s["moneda"]] += _dec(s["saldo"])
        return render(request, "advertiser/dashboard.html", {
            "campanas": campanas["campanas"], "por_estado": dict(sorted(por_estado.items())),
            "held": len(held["conversiones"]), "totals": totals_by_currency(reportes["reportes"]),
            "owed": dict(sorted(owed.items())), "pendientes": pendientes["pagos"], "desde": start, "hasta": today})

    # -- campaigns ---------------------------------------------------------------------------
    @router.get("/anunciante/campanas", response_class=HTMLResponse)
    async def campaigns(request: Request) -> HTMLResponse:
        return await _campaigns_page(request)

    @router.post("/anunciante/campanas", response_class=HTMLResponse)
    async def create_campaign(request: Request) -> Response:
        form = await form_of(request)
        try:
            campana = await services_of(request).post(
                "marketing", "/campanas", campaign_body(form, operator=_is_operator(request)))
        except (ServiceError, FormProblem) as error:
            if isinstance(error, ServiceError) and error.status not in (400, 404, 409, 422):
                raise
            return await _campaigns_page(request, _problem(error, lambda f: f.split(".")[-1]), form)
        flash(request, f"Campaign “{campana['nombre']}” created ({campana['estado']}). Now give it its commission "
                       f"rules and enrol affiliates.")
        return redirect(f"/anunciante/campanas/{_seg(campana['id'])}")

    @router.get("/anunciante/campanas/{campana_id}", response_class=HTMLResponse)
    async def campaign(request: Request, campana_id: str) -> HTMLResponse:
        version = request.query_params.get("version")
        if version is not None and not version.isdigit():
            raise PageError(422, "Invalid input", "version: must be a whole number")
        return await _campaign_page(request, campana_id, int(version) if version else None)

    @router.post("/anunciante/campanas/{campana_id}/estado", response_class=HTMLResponse)
    async def change_state(request: Request, campana_id: str) -> Response:
        accion = (await form_of(request)).get("accion", "")
        if accion not in CAMPAIGN_ACTIONS:
            raise PageError(422, "Invalid input", f"accion: must be one of {', '.join(CAMPAIGN_ACTIONS)}")
        try:
            await services_of(request).post("marketing", f"/campanas/{_seg(campana_id)}/{accion}")
        except ServiceError as error:
            if error.status != 409:
                raise
            return await _campaign_page(request, campana_id, problem=_problem(error))
        flash(request, f"Campaign {CAMPAIGN_ACTIONS[accion]}.")
        return redirect(f"/anunciante/campanas/{_seg(campana_id)}")

    @router.post("/anunciante/campanas/{campana_id}/terminos", response_class=HTMLResponse)
    async def edit_terms(request: Request, campana_id: str) -> Response:
        form = await form_of(request)
        services = services_of(request)
        path = f"/campanas/{_seg(campana_id)}"
        try:
            # What the campaign has now decides which terms were changed (404: not the caller's).
            body = terms_body(form, await services.get("marketing", path))
            if body:
                await services.put("marketing", path, body)
        except (ServiceError, FormProblem) as error:
            if isinstance(error, ServiceError) and error.status not in (400, 409, 422):
                raise
            return await _campaign_page(request, campana_id, problem=_problem(error),
                                        terms={name: form.get(name, "") for name in TERM_FIELDS})
        flash(request, "Terms saved: " + ", ".join(TERM_NAMES[name] for name in body) + ". They apply from now on."
              if body else "No term changed.")
        return redirect(f"/anunciante/campanas/{_seg(campana_id)}")

    @router.post("/anunciante/campanas/{campana_id}/reglas", response_class=HTMLResponse)
    async def replace_rules(request: Request, campana_id: str) -> Response:
        form = await form_of(request)
        try:
            answer = await services_of(request).put("marketing", f"/campanas/{_seg(campana_id)}/reglas",
                                                    rules_body(form))
        except (ServiceError, FormProblem) as error:
            if isinstance(error, ServiceError) and error.status not in (400, 409, 422):
                raise
            return await _campaign_page(request, campana_id, problem=_problem(error, rule_field),
                                        rows=posted_rule_rows(form) + rules_form_rows([], 1),
                                        tope={"monto": form.get("tope-monto", ""),
                                              "periodo": form.get("tope-periodo", "")})
        flash(request, f"Commission rules version {answer['version']} in force from now "
                       f"({len(answer['reglas'])} rule(s)).")
        return redirect(f"/anunciante/campanas/{_seg(campana_id)}")

    @router.post("/anunciante/campanas/{campana_id}/inscripciones", response_class=HTMLResponse)
    async def enrol(request: Request, campana_id: str) -> Response:
        form = await form_of(request)
        body = {"afiliado_id": form.get("afiliado_id", ""), **_optional(form, "canal", "categoria")}
        try:
            inscripcion = await services_of(request).post(
                "marketing", f"/campanas/{_seg(campana_id)}/inscripciones", body)
        except ServiceError as error:
            if error.status not in (400, 404, 409, 422) or error.service != "marketing":
                raise
            if error.status == 404 and not error.field_reasons().get("afiliado_id"):
                raise
            return await _campaign_page(request, campana_id, problem=_problem(error))
        flash(request, f"Affiliate {inscripcion['afiliado_id']} enrolled; its tracking link code is "
                       f"{inscripcion['link_code']}.")
        return redirect(f"/anunciante/campanas/{_seg(campana_id)}")

    # -- affiliates ----------------------------------------------------------------------------
    @router.get("/anunciante/afiliados", response_class=HTMLResponse)
    async def affiliates(request: Request) -> HTMLResponse:
        return await _affiliates_page(request)

    @router.post("/anunciante/afiliados", response_class=HTMLResponse)
    async def register_affiliate(request: Request) -> Response:
        form = await form_of(request)
        body = {"user_id": form.get("user_id", ""), "email": form.get("email", ""), "nombre": form.get("nombre", ""),
                **_optional(form, "pais")}
        try:
            afiliado = await services_of(request).post("afiliados", "/afiliados", body)
        except ServiceError as error:
            if error.status not in (400, 409, 422):
                raise
            return await _affiliates_page(request, _problem(error), form)
        flash(request, f"Affiliate “{afiliado['nombre']}” registered ({afiliado['estado']}).")
        return redirect("/anunciante/afiliados")

    @router.post("/anunciante/afiliados/{afiliado_id}/estado", response_class=HTMLResponse)
    async def change_affiliate(request: Request, afiliado_id: str) -> Response:
        form = await form_of(request)
        accion = form.get("accion", "")
        if accion not in AFFILIATE_ACTIONS:
            raise PageError(422, "Invalid input", f"accion: must be one of {', '.join(AFFILIATE_ACTIONS)}")
        body = {"motivo": form.get("motivo", "")} if accion == "suspender" else None
        try:
            await services_of(request).post("afiliados", f"/afiliados/{_seg(afiliado_id)}/{accion}", body)
        except ServiceError as error:
            if error.status not in (409, 422):
                raise
            return await _affiliates_page(request, _problem(error))
        flash(request, f"Affiliate {afiliado_id} {AFFILIATE_ACTIONS[accion]}.")
        return redirect("/anunciante/afiliados")

    # -- the review queue ----------------------------------------------------------------------
    @router.get("/anunciante/revision", response_class=HTMLResponse)
    async def review(request: Request) -> HTMLResponse:
        return await _review_page(request)

    @router.post("/anunciante/revision/{conversion_id}/aprobar", response_class=HTMLResponse)
    async def approve(request: Request, conversion_id: str) -> Response:
        try:
            await services_of(request).post("conversiones", f"/conversiones/{_seg(conversion_id)}/aprobar")
        except ServiceError as error:
            if error.status != 409:
                raise
            return await _review_page(request, _problem(error))
        flash(request, f"Conversion {conversion_id} approved: its commission is being calculated.")
        return redirect("/anunciante/revision#queue")

    @router.post("/anunciante/revision/{conversion_id}/rechazar", response_class=HTMLResponse)
    async def reject(request: Request, conversion_id: str) -> Response:
        motivo = (await form_of(request)).get("motivo", "")
        try:
            await services_of(request).post("conversiones", f"/conversiones/{_seg(conversion_id)}/rechazar",
                                            {"motivo": motivo})
        except ServiceError as error:
            if error.status not in (409, 422):
                raise
            return await _review_page(request, _problem(error))
        flash(request, f"Conversion {conversion_id} rejected: {motivo}.")
        return redirect("/anunciante/revision#queue")

    # -- conversions ---------------------------------------------------------------------------
    @router.get("/anunciante/conversiones", response_class=HTMLResponse)
    async def conversions(request: Request) -> HTMLResponse:
        """The conversions of the advertiser's campaigns, PAGE_SIZE a page, newest first. The services
        list oldest first, so page 1 holds the oldest; without a page the newest page is shown (its
        number from the conversion figures when no status filter narrows the list)."""
        q = request.query_params
        status, campana_id = q.get("status") or None, q.get("campana_id") or None
        if status is not None and status not in CONVERSION_STATUSES:
            raise PageError(422, "Invalid input", f"status: must be one of {', '.join(CONVERSION_STATUSES)}")
        pagina_text = q.get("pagina")
        if pagina_text is not None and not (pagina_text.isdigit() and int(pagina_text) >= 1):
            raise PageError(422, "Invalid input", "pagina: must be a whole number from 1")
        services = services_of(request)
        campanas, afiliados, cifras = await _gather(
            services.get("marketing", "/campanas", {"limit": 1000}),
            services.get("afiliados", "/afiliados", {"limit": 1000}),
            services.get("conversiones", "/conversiones/cifras", {"campaign_id": campana_id}))
        paginas = None
        if status is None:
            total = sum(int(c["detected"]) for c in cifras["cifras"])
            paginas = max(1, -(-total // PAGE_SIZE))
        pagina = int(pagina_text) if pagina_text else (paginas or 1)
        answer = await services.get("conversiones", "/conversiones", {
            "status": status, "campaign_id": campana_id, "limit": PAGE_SIZE + 1, "offset": (pagina - 1) * PAGE_SIZE})
        rows = answer["conversiones"]
        return render(request, "advertiser/conversions.html", {
            "conversiones": list(reversed(rows[:PAGE_SIZE])), "newer": len(rows) > PAGE_SIZE, "pagina": pagina,
            "paginas": paginas, "status": status or "", "campana_id": campana_id or "", "statuses": CONVERSION_STATUSES,
            "campanas": campanas["campanas"], "campaign_names": _names(campanas["campanas"]),
            "affiliate_names": _names(afiliados["afiliados"])})

    # -- one conversion ------------------------------------------------------------------------
    @router.get("/anunciante/conversiones/{conversion_id}", response_class=HTMLResponse)
    async def conversion(request: Request, conversion_id: str) -> HTMLResponse:
        """The conversion, its event stream, its saga's steps and how its commission was computed."""
        services = services_of(request)
        conversion = await services.get("conversiones", f"/conversiones/{_seg(conversion_id)}")
        eventos, saga, comisiones, campana, afiliado = await _gather(
            services.get("conversiones", f"/conversiones/{_seg(conversion_id)}/eventos"),
            _optional_get(services.get("conversiones", f"/sagas/{_seg(conversion_id)}")),
            services.get("marketing", "/comisiones", {"conversion_id": conversion_id}),
            _optional_get(services.get("marketing", f"/campanas/{_seg(conversion['campaign_id'])}")),
            _optional_get(services.get("afiliados", f"/afiliados/{_seg(conversion['affiliate_id'])}")))
        comision = comisiones["comisiones"][0] if comisiones["comisiones"] else None
        explicacion = None
        if comision is not None:
            explicacion = await services.get("marketing", f"/comisiones/{_seg(comision['id'])}/explain")
        return render(request, "advertiser/conversion.html", {
            "conversion": conversion, "eventos": eventos["eventos"], "saga": saga, "comision": comision,
            "campana": campana, "afiliado": afiliado,
            "explicacion": explicacion})

    # -- payouts ---------------------------------------------------------------------------------
    @router.get("/anunciante/pagos", response_class=HTMLResponse)
    async def payouts(request: Request) -> HTMLResponse:
        return await _payouts_page(request)

    @router.post("/anunciante/pagos", response_class=HTMLResponse)
    async def create_payouts(request: Request) -> Response:
        body = _optional(await form_of(request), "afiliado_id")
        try:
            answer = await services_of(request).post("marketing", "/pagos", body)
        except ServiceError as error:
            if error.status not in (409, 422):
                raise
            return await _payouts_page(request, _problem(error))
        created = answer["pagos"]
        flash(request, f"{len(created)} payout(s) created." if created else
              "No payout is due: no affiliate's approved commissions reach the payout threshold yet.",
              "ok" if created else "warn")
        return redirect("/anunciante/pagos")

    @router.get("/anunciante/pagos/{pago_id}", response_class=HTMLResponse)
    async def payout(request: Request, pago_id: str) -> HTMLResponse:
        pago = await services_of(request).get("marketing", f"/pagos/{_seg(pago_id)}")
        return render(request, "advertiser/payout.html", {"pago": pago})

    @router.post("/anunciante/pagos/{pago_id}/pagar", response_class=HTMLResponse)
    async def pay(request: Request, pago_id: str) -> Response:
        try:
            pago = await services_of(request).post("marketing", f"/pagos/{_seg(pago_id)}/pagar")
        except ServiceError as error:
            if error.status != 409:
                raise
            return await _payouts_page(request, _problem(error))
        flash(request, f"Payout {pago_id} paid: {pago['monto']} {pago['moneda']}.")
        return redirect("/anunciante/pagos")

    # -- reports -------------------------------------------------------------------------------
    @router.get("/anunciante/reportes", response_class=HTMLResponse)
    async def reports(request: Request) -> HTMLResponse:
        start, end, campana_id, afiliado_id = _report_query(request)
        services = services_of(request)
        lines, campanas, afiliados = await _gather(
            _report_lines(request, start, end, campana_id, afiliado_id),
            services.get("marketing", "/campanas", {"limit": 1000}),
            services.get("afiliados", "/afiliados", {"limit": 1000}))
        query = request.url.query
        return render(request, "advertiser/reports.html", {
            "desde": start, "hasta": end, "campana_id": campana_id or "", "afiliado_id": afiliado_id or "",
            "charts": daily_charts(lines, start, end), "totals": totals_by_currency(lines),
            "per_affiliate": per_affiliate(lines), "per_campaign": per_campaign(lines),
            "campaign_names": _names(campanas["campanas"]), "campanas": campanas["campanas"],
            "afiliados": afiliados["afiliados"], "names": _names(afiliados["afiliados"]),
            "csv_url": "/anunciante/reportes.csv" + (f"?{query}" if query else ""),
            "data_url": "/anunciante/reportes/datos" + (f"?{query}" if query else "")})

    @router.get("/anunciante/reportes/datos")
    async def report_data(request: Request) -> JSONResponse:
        """The reports page's charts as JSON, polled by consola.js so new figures appear by themselves."""
        start, end, campana_id, afiliado_id = _report_query(request)
        lines = await _report_lines(request, start, end, campana_id, afiliado_id)
        return JSONResponse({"charts": daily_charts(lines, start, end)}, headers={"cache-control": "no-store"})

    @router.get("/anunciante/reportes.csv")
    async def report_csv_download(request: Request) -> Response:
        start, end, campana_id, afiliado_id = _report_query(request)
        lines = await _report_lines(request, start, end, campana_id, afiliado_id)
        name = f"alpes-report-{start.isoformat()}-{end.isoformat()}.csv"
        return Response(report_csv(lines), media_type="text/csv; charset=utf-8",
                        headers={"content-disposition": f'attachment; filename="{name}"',
                                 "cache-control": "no-store"})

    return router
