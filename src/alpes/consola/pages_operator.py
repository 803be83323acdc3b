"""Operator pages: platform health, topics and subscriptions, the audit log, API keys.

Health is read from each service instance's own /health (database, broker, outbox, consumers with
their backlog and dead letters) and from auditoria's view of sistema.eventos (/sistema/servicios,
/sistema/alertas); topics come from alpes.contract, their backlog from the consumers that own
each subscription. The console keeps none of it: every figure is read on each page view.
"""

from __future__ import annotations

import asyncio
from urllib.parse import quote
from datetime import datetime, timedelta, timezone

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from ..contract import EVENT_TOPICS, SUBSCRIPTIONS, TOPICS, dead_letter_topic
from ..kernel.access import ALL_SCOPES, ROLES
from .services import ServiceError, Services
from .web import flash, form_of, redirect, render, services_of, session_of

AUDIT_PAGE = 100


def instance_urls(request: Request) -> list[tuple[str, str, str]]:
    """(service, instance name, base URL) of every instance `alpes up` runs (instance i > 0 on the
    service's port + 100 * i, README "Scaling")."""
    settings = request.app.state.settings
    found = []
    for service, base in request.app.state.service_urls.items():
        scheme_host, _, _port = base.rpartition(":")
        for index in range(settings.instances(service)):
            name = service if index == 0 else f"{service}-{index + 1}"
            found.append((service, name, f"{scheme_host}:{settings.instance_port(service, index)}"))
    return found


async def instance_health(services: Services, request: Request) -> list[dict]:
    """Each instance's /health (status 0: unreachable)."""
    instances = instance_urls(request)

    async def one(service: str, name: str, url: str) -> dict:
        probe = Services(services.client, {service: url}, services.key)
        status, report = await probe.health(service)
        return {"service": service, "name": name, "url": url, "http_status": status, "report": report,
                "ok": status == 200 and report.get("status") == "ok"}

    return list(await asyncio.gather(*(one(*i) for i in instances)))


def subscription_rows(health: list[dict]) -> list[dict]:
    """Every subscription of the contract with what its owner's instance 0 reports of it."""
    reported = {}
    for instance in health:
        for consumer in instance["report"].get("consumers", []):
            key = (consumer["topic"], consumer["subscription"], instance["service"])
            entry = reported.setdefault(key, {"backlog": consumer.get("backlog", {}), "dead_lettered": 0,
                                              "connected": 0, "instances": 0, "last_error": None})
            entry["dead_lettered"] += consumer.get("dead_lettered", 0)
            entry["connected"] += 1 if consumer.get("connected") else 0
            entry["instances"] += 1
            entry["last_error"] = entry["last_error"] or consumer.get("last_error")
    rows = []
    for s in SUBSCRIPTIONS:
        seen = reported.get((s.topic, s.name, s.service))
        backlog = (seen or {}).get("backlog") or {}
        rows.append({"topic": s.topic, "subscription": s.name, "service": s.service, "purpose": s.purpose,
                     "backlog": backlog.get("backlog"), "backlog_source": backlog.get("source"),
                     "dead_letter_topic": dead_letter_topic(s.topic, s.name),
                     "dead_lettered": seen["dead_lettered"] if seen else None,
                     "connected": seen["connected"] if seen else 0, "instances": seen["instances"] if seen else 0,
                     "last_error": seen["last_error"] if seen else None, "reported": seen is not None})
    return rows


async def _optional(call) -> tuple[object, ServiceError | None]:
    """A panel's data, or the service's refusal to show in its place (the page still renders)."""
    try:
        return await call, None
    except ServiceError as error:
        return None, error


def router() -> APIRouter:
    router = APIRouter()

    @router.get("/operador")
    async def health_page(request: Request) -> Response:
        services = services_of(request)
        health, (servicios, servicios_error), (alertas, alertas_error) = await asyncio.gather(
            instance_health(services, request),
            _optional(services.get("auditoria", "/sistema/servicios")),
            _optional(services.get("auditoria", "/sistema/alertas", {"limit": 20})))
        return render(request, "operator/health.html", {
            "instances": health, "healthy": sum(1 for i in health if i["ok"]),
            "subscriptions": subscription_rows(health),
            "servicios": (servicios or {}).get("servicios", []), "servicios_error": servicios_error,
            "alertas": (alertas or {}).get("alertas", []), "alertas_error": alertas_error,
            "dead_letters": sum(i["report"].get("dead_letters", {}).get("total", 0) for i in health)})

    @router.get("/operador/topicos")
    async def topics_page(request: Request) -> Response:
        health = await instance_health(services_of(request), request)
        rows = subscription_rows(health)
        topics = [{"name": name, "partitions": partitions,
                   "events": sorted(e for e, t in EVENT_TOPICS.items() if t == name),
                   "subscriptions": [r for r in rows if r["topic"] == name]} for name, partitions in TOPICS.items()]
        return render(request, "operator/topics.html", {"topics": topics,
                                                        "unreachable": [i for i in health if not i["http_status"]]})

    @router.get("/operador/auditoria")
    async def audit_page(request: Request, aggregate_id: str | None = Query(None, max_length=64),
                         event_type: str | None = Query(None, max_length=64),
                         correlation_id: str | None = Query(None, max_length=64),
                         actor_id: str | None = Query(None, max_length=64),
                         after_seq: int | None = Query(None, ge=0),
                         verificar: bool = False) -> Response:
        services = services_of(request)
        filters = {"aggregate_id": aggregate_id, "event_type": event_type, "correlation_id": correlation_id,
                   "actor_id": actor_id}
        if after_seq is None:
            # The newest page: the records are numbered in chain order from 1, so the operator (who
            # sees all of them) finds the last page from the total.
            total = (await services.get("auditoria", "/auditoria/eventos", {"limit": 1}))["total"]
            after_seq = max(0, total - AUDIT_PAGE) if not any(filters.values()) else 0
        answer = await services.get("auditoria", "/auditoria/eventos",
                                    {**filters, "after_seq": after_seq, "limit": AUDIT_PAGE})
        records = answer["eventos"]
        verification = await services.get("auditoria", "/auditoria/verificacion") if verificar else None
        return render(request, "operator/audit.html", {
            "records": list(reversed(records)), "total": answer["total"], "filters": filters,
            "after_seq": after_seq, "page": AUDIT_PAGE, "type_options": [(e, e) for e in sorted(EVENT_TOPICS)],
            "filters_query": "".join(f"{k}={quote(v, safe='')}&" for k, v in filters.items() if v),
            "older": max(0, after_seq - AUDIT_PAGE) if after_seq > 0 else None,
            "newer": records[-1]["seq"] if len(records) == AUDIT_PAGE else None,
            "verification": verification})

    @router.get("/operador/claves")
    async def keys_page(request: Request) -> Response:
        return await _keys_page(request)

    @router.post("/operador/claves")
    async def create_key(request: Request) -> Response:
        form = await form_of(request)
        body: dict = {"rol": form.get("rol", "")}
        for name in ("anunciante_id", "afiliado_id", "nombre"):
            if form.get(name):
                body[name] = form[name]
        if form.get("expira_en"):
            body["expira_en"] = _end_of_day(form["expira_en"])
        scopes = (await request.form()).getlist("scopes")
        if scopes:
            body["scopes"] = scopes
        try:
            created = await services_of(request).post("marketing", "/claves", json=body)
        except ServiceError as error:
            if error.status != 422 and error.status != 409 and error.status != 404:
                raise
            return await _keys_page(request, form=form, errors=error.field_reasons() or {"": error.message()},
                                    status=error.status)
        session = session_of(request)
        if session.local_mode:
            # The first key ends the protected local mode: this session (anonymous to the services)
            # opens nothing from now on, so the key is shown here, not after a redirect it would not survive.
            request.app.state.sessions.drop(session.id)
            request.state.console_session = None
            return render(request, "operator/first_key.html", {"created": created}, status=201)
        flash(request, created["key"], "secret")
        flash(request, f"Key {created['key_id']} ({created['rol']}) created. Copy it now: it is shown only once.")
        return redirect("/operador/claves")

    @router.post("/operador/claves/{key_id}/revocar")
    async def revoke_key(request: Request, key_id: str) -> Response:
        revoked = await services_of(request).delete("marketing", f"/claves/{key_id}")
        flash(request, f"Key {revoked['key_id']} revoked: every service refuses it within seconds.")
        return redirect("/operador/claves")

    return router


def _options(rows: list[dict]) -> list[tuple[str, str]]:
    """(id, name) of advertisers or affiliates, for a select."""
    return [(row["id"], row.get("nombre") or row["id"]) for row in rows]


def _end_of_day(day: str) -> str:
    """A date from the form (YYYY-MM-DD) as the instant the key stops working; anything else is passed
    on as typed, for marketing to refuse with its reason."""
    try:
        date = datetime.strptime(day, "%Y-%m-%d").replace(tzinfo=timezone.utc)
    except ValueError:
        return day
    return (date + timedelta(days=1)).isoformat()


async def _keys_page(request: Request, form: dict | None = None, errors: dict | None = None,
                     status: int = 200) -> Response:
    services = services_of(request)
    keys, (anunciantes, _), (afiliados, _) = await asyncio.gather(
        services.get("marketing", "/claves"),
        _optional(services.get("marketing", "/anunciantes")),
        _optional(services.get("afiliados", "/afiliados")))
    return render(request, "operator/keys.html", {
        "keys": sorted(keys["claves"], key=lambda k: k["creada_en"] or "", reverse=True),
        "anunciante_options": _options((anunciantes or {}).get("anunciantes", [])),
        "afiliado_options": _options((afiliados or {}).get("afiliados", [])),
        "role_options": [(r, r) for r in ROLES], "scopes": ALL_SCOPES, "form": form or {}, "errors": errors or {}},
        status=status)

