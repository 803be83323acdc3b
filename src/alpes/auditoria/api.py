from __future__ import annotations

import json

from fastapi import APIRouter, FastAPI, Query
from sqlalchemy import func, select

from alpes.kernel.access import OPERATOR
from alpes.kernel.db import where_equal
from alpes.kernel.errors import RuleViolated
from alpes.kernel.http import MAX_SEQ, IsoDatetime
from alpes.kernel.http_access import Caller
from alpes.kernel.runtime import ServiceRuntime

from . import handlers, tables


# An actor is a key id, `system` or `local-operator`; its role one of the platform's (or `anonymous`:
# a public route's caller, such as a tracking link's visitor).
ACTOR_ID = r"^[A-Za-z0-9._:-]+$"
ACTOR_ROLE = r"^(operator|advertiser|affiliate|system|anonymous)$"


def include_routes(runtime: ServiceRuntime):
    router = APIRouter()
    log = tables.audit_log

    @router.get("/auditoria/eventos", tags=["auditoria"])
    def eventos(caller: Caller, aggregate_id: str | None = None, event_type: str | None = None,
                correlation_id: str | None = None, desde: IsoDatetime | None = None, hasta: IsoDatetime | None = None,
                actor_id: str | None = Query(None, min_length=1, max_length=64, pattern=ACTOR_ID),
                actor_role: str | None = Query(None, pattern=ACTOR_ROLE),
                after_seq: int = Query(0, ge=0, le=MAX_SEQ), limit: int = Query(1000, ge=1, le=10000)) -> dict:
        """Audit records in chain order, filtered by aggregate, type, correlation, actor and time. An
        advertiser reads only the records of its own aggregates (handlers.visible_records) and
        `total` counts those; a filter naming anything else just finds nothing."""
        if desde and hasta and desde > hasta:
            raise RuleViolated("desde", "desde is after hasta")
        visible = handlers.visible_records(caller)
        query = select(log).where(log.c.seq > after_seq, visible).order_by(log.c.seq).limit(limit)
        query = where_equal(query, log, aggregate_id=aggregate_id, event_type=event_type, correlation_id=correlation_id,
                            actor_id=actor_id, actor_role=actor_role)
        if desde:
            query = query.where(log.c.occurred_at >= desde)
        if hasta:
            query = query.where(log.c.occurred_at <= hasta)
        with runtime.db.read() as session:
            rows = session.execute(query).mappings().all()
            if caller.role == OPERATOR:  # every record: the chain's seq numbers are 1..head, no gaps
                total = session.scalar(select(tables.audit_head.c.seq).where(tables.audit_head.c.id == 1)) or 0
            else:
                total = session.scalar(select(func.count()).select_from(log).where(visible))
        return {"total": total, "eventos": [{
            "seq": r["seq"], "event_id": r["event_id"], "topic": r["topic"], "event_type": r["event_type"],
            "schema_version": r["schema_version"], "aggregate_id": r["aggregate_id"],
            "occurred_at": r["occurred_at"].isoformat(), "correlation_id": r["correlation_id"],
            "causation_id": r["causation_id"], "actor_id": r["actor_id"], "actor_role": r["actor_role"],
            "payload": json.loads(r["payload_json"]), "prev_hash": r["prev_hash"], "hash": r["hash"]} for r in rows]}

    @router.get("/auditoria/verificacion", tags=["auditoria"])
    def verificacion() -> dict:
        """Walk the whole hash chain now; report the first broken link."""
        with runtime.db.read() as session:
            count, broken = handlers.verify_audit_chain(session)
            compliance = session.execute(select(tables.compliance_state)).mappings().first()
        return {"records": count, "ok": broken is None,
                "broken_seq": broken.seq if broken else None, "problem": broken.problem if broken else None,
                "compliance_consumer": {k: compliance[k] for k in ("verified", "highest_seq", "broken_seq", "problem")}
                if compliance else None}

    @router.get("/auditoria/hallazgos", tags=["auditoria"])
    def hallazgos(limit: int = Query(1000, ge=1, le=10000)) -> dict:
        t = tables.security_findings
        with runtime.db.read() as session:
            rows = session.execute(select(t).order_by(t.c.audit_seq).limit(limit)).mappings().all()
        return {"hallazgos": [{"audit_seq": r["audit_seq"], "event_type": r["event_type"],
                               "aggregate_id": r["aggregate_id"], "motivo": r["motivo"]} for r in rows]}

    @router.get("/sistema/servicios", tags=["sistema"])
    def servicios() -> dict:
        t = tables.servicios
        with runtime.db.read() as session:
            rows = session.execute(select(t).order_by(t.c.servicio, t.c.instancia)).mappings().all()
        return {"servicios": [{"instancia": r["instancia"], "servicio": r["servicio"], "estado": r["estado"],
                               "motivo": r["motivo"], "actualizado_en": r["actualizado_en"].isoformat()} for r in rows]}

    @router.get("/sistema/alertas", tags=["sistema"])
    def alertas(limit: int = Query(200, ge=1, le=10000)) -> dict:
        t = tables.alertas
        with runtime.db.read() as session:
            rows = session.execute(select(t).order_by(t.c.creada_en.desc()).limit(limit)).mappings().all()
        return {"alertas": [{"event_id": r["event_id"], "servicio": r["servicio"], "tipo": r["tipo"],
                             "mensaje": r["mensaje"], "creada_en": r["creada_en"].isoformat()} for r in rows]}

    def include(app: FastAPI) -> None:
        app.include_router(router)

    return include
