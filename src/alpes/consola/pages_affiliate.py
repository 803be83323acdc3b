"""The affiliate portal: its programs and tracking links, clicks, conversions, commissions by state,
earnings per day (chart) and payouts.

Everything is read with the affiliate's own key, so the services keep it to its own data: marketing
lists only the campaigns it is enrolled in and only its own enrollment (its link), conversiones
gives its conversions without customer data (`user_id` is null), the reports and commissions are
its own. The page shows nothing else: no customer, no other affiliate.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from .services import Services
from .web import PageError, render, services_of, session_of

DAYS = 30
MAX_DAYS = 366
SHOWN = 50
PAGE = 1000
MAX_ROWS = 20_000  # commissions read for the totals by state (20 pages); more: the totals say so
STATES = ("pendiente", "aprobada", "pagada", "revertida")


async def read_all(services: Services, service: str, path: str, field: str,
                   params: dict | None = None) -> tuple[list, bool]:
    """Every row of a paged list (oldest first), up to MAX_ROWS; (rows, complete)."""
    rows: list = []
    while len(rows) < MAX_ROWS:
        page = (await services.get(service, path, {**(params or {}), "limit": PAGE, "offset": len(rows)}))[field]
        rows.extend(page)
        if len(page) < PAGE:
            return rows, True
    return rows, False


def by_state(comisiones: list[dict]) -> list[dict]:
    """Count and amount of commissions per state and currency (Decimal sums of the decimal strings)."""
    totals: dict[tuple[str, str], list] = defaultdict(lambda: [0, Decimal("0")])
    for c in comisiones:
        entry = totals[(c["estado"], c["moneda"])]
        entry[0] += 1
        entry[1] += Decimal(c["monto"])
    order = {s: i for i, s in enumerate(STATES)}
    return [{"estado": estado, "moneda": moneda, "count": n, "monto": str(monto)}
            for (estado, moneda), (n, monto) in sorted(totals.items(),
                                                       key=lambda kv: (order.get(kv[0][0], 99), kv[0][1]))]


def daily_series(reportes: list[dict], desde: date, hasta: date) -> tuple[list[str], list[dict], list[dict]]:
    """Days of the period (every day, zeros where nothing happened) and two sets of series: activity
    (clicks, conversions validated) and earnings per currency (commission earned, decimal strings)."""
    days = [(desde + timedelta(days=i)).isoformat() for i in range((hasta - desde).days + 1)]
    clicks: dict[str, int] = defaultdict(int)
    validated: dict[str, int] = defaultdict(int)
    earned: dict[str, dict[str, Decimal]] = defaultdict(lambda: defaultdict(Decimal))
    for line in reportes:
        day = line["dia"]
        clicks[day] += line.get("clicks") or 0
        validated[day] += line.get("validadas") or 0
        earned[line.get("moneda") or "—"][day] += Decimal(line.get("comision_ganada") or "0")
    activity = [{"label": "Clicks", "data": [clicks[d] for d in days]},
                {"label": "Conversions validated", "data": [validated[d] for d in days]}]
    earnings = [{"label": f"Commission earned ({currency})", "data": [str(per_day[d]) for d in days]}
                for currency, per_day in sorted(earned.items())]
    return days, activity, earnings


def period(desde: date | None, hasta: date | None, today: date) -> tuple[date, date]:
    hasta = hasta or today
    desde = desde or hasta - timedelta(days=DAYS - 1)
    if desde > hasta:
        raise PageError(422, "Invalid input", "desde: the period starts after it ends (hasta)")
    if (hasta - desde).days + 1 > MAX_DAYS:
        raise PageError(422, "Invalid input", f"desde: a period of at most {MAX_DAYS} days")
    return desde, hasta


def tracking_base(request: Request) -> str:
    """Where visitors click: the public address of conversiones' GET /r/{code}."""
    settings = request.app.state.settings
    return (settings.consola_tracking_url or request.app.state.service_urls["conversiones"]).rstrip("/")


async def _programs(services: Services) -> list[dict]:
    """The campaigns it is enrolled in, each with its own enrollment (its tracking link)."""
    campanas = (await services.get("marketing", "/campanas", {"limit": 1000}))["campanas"]

    async def with_link(campana: dict) -> dict:
        mine = (await services.get("marketing", f"/campanas/{campana['id']}/inscripciones"))["inscripciones"]
        return {**campana, "inscripcion": mine[0] if mine else None}

    return list(await asyncio.gather(*(with_link(c) for c in campanas)))


async def _latest_conversions(services: Services) -> tuple[list[dict], int]:
    """Its newest conversions (newest first) and how many it has: the list is oldest first, so the
    count (conversiones' figures) says where its last page starts; read a little past it, as the
    figures may be a moment behind the list."""
    figures = (await services.get("conversiones", "/conversiones/cifras"))["cifras"]
    count = sum(f.get("detected") or 0 for f in figures)
    offset = max(0, count - SHOWN)
    page = (await services.get("conversiones", "/conversiones", {"limit": SHOWN + PAGE // 10, "offset": offset}))
    rows = page["conversiones"]
    return list(reversed(rows[-SHOWN:])), max(count, offset + len(rows))


def router() -> APIRouter:
    router = APIRouter()

    @router.get("/afiliado")
    async def portal(request: Request, desde: date | None = Query(None), hasta: date | None = Query(None)) -> Response:
        services = services_of(request)
        session = session_of(request)
        start, end = period(desde, hasta, datetime.now(timezone.utc).date())
        answers = await asyncio.gather(
            _programs(services),
            services.get("afiliados", "/programas"),
            services.get("afiliados", "/afiliados"),
            services.get("marketing", "/reportes", {"desde": start.isoformat(), "hasta": end.isoformat()}),
            _latest_conversions(services),
            read_all(services, "marketing", "/comisiones", "comisiones"),
            services.get("marketing", "/pagos", {"limit": 200}),
            services.get("marketing", "/pagos/saldos"))
        programs, catalogue, me, reportes, (conversiones, count), (comisiones, complete), pagos, saldos = answers
        profile = (me.get("afiliados") or [None])[0]
        if profile is not None and session.tenant_id is None:
            session.tenant_id, session.name = profile["id"], profile.get("nombre")
        enrolled = {p["id"] for p in programs}
        days, activity, earnings = daily_series(reportes["reportes"], start, end)
        return render(request, "affiliate/portal.html", {
            "profile": profile, "programs": programs, "tracking": tracking_base(request),
            "program_names": {p["id"]: p["nombre"] for p in programs},
            "catalogue": [p for p in catalogue["programas"] if p["id"] not in enrolled],
            "days": days, "activity": activity, "earnings": earnings, "desde": start, "hasta": end,
            "totals": {"clicks": sum(activity[0]["data"]), "validated": sum(activity[1]["data"])},
            "conversiones": conversiones, "conversion_count": count,
            "by_state": by_state(comisiones), "complete": complete,
            "comisiones": list(reversed(comisiones[-SHOWN:])), "comision_count": len(comisiones),
            "pagos": sorted(pagos["pagos"], key=lambda p: p["creado_en"], reverse=True),
            "saldos": saldos["saldos"]})

    return router

