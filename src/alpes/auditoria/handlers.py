"""Auditoria handlers: append to the chain, and the consumers of auditoria/sistema events."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from sqlalchemy import bindparam, exists, false, or_, select, true, update
from sqlalchemy.dialects.mysql import insert as mysql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from alpes.kernel.access import ADVERTISER, OPERATOR, Principal
from alpes.kernel.messages import IncomingEvent, OutgoingEvent, utcnow

from . import domain, tables

TOPIC = "auditoria.eventos"


def _record(row) -> domain.AuditRecord:
    return domain.AuditRecord(
        seq=row["seq"], event_id=row["event_id"], topic=row["topic"], event_type=row["event_type"],
        schema_version=row["schema_version"], aggregate_id=row["aggregate_id"], occurred_at=row["occurred_at"],
        correlation_id=row["correlation_id"], causation_id=row["causation_id"], payload_json=row["payload_json"],
        actor_id=row["actor_id"], actor_role=row["actor_role"])


# -- audit-consumer on every business topic ---------------------------------------------------
# Built once: a statement built per call costs SQLAlchemy its construction and cache key every
# time, most of an audited event's CPU (issue 11).
_HEAD_LOCKED = select(tables.audit_head.c.seq, tables.audit_head.c.hash).where(tables.audit_head.c.id == 1) \
    .with_for_update()
_MOVE_HEAD = update(tables.audit_head).where(tables.audit_head.c.id == 1).values(
    seq=bindparam("new_seq"), hash=bindparam("new_hash"))
_APPEND = tables.audit_log.insert()
_CONVERSION_LEARNT = {
    "sqlite": sqlite_insert(tables.conversiones_auditadas).on_conflict_do_nothing(),
    # A no-op update: the first campaign learnt stays (INSERT IGNORE would hide other errors too).
    "mysql": mysql_insert(tables.conversiones_auditadas).on_duplicate_key_update(
        campana_id=tables.conversiones_auditadas.c.campana_id),
}
_CONVERSION_LEARNT["mariadb"] = _CONVERSION_LEARNT["mysql"]
# session.info keys: what this transaction already read under its lock (one read per batch).
_HEAD_KEY = "auditoria.audit_head"
_COMPLIANCE_KEY = "auditoria.compliance_state"


def _read_once(session: Session, key: str, read) -> dict:
    """`read(session)`, done once per transaction: a row locked until the commit, so nobody else
    changes it meanwhile and the copy kept here stays true as long as the caller moves the copy
    with the row. Kept for the innermost transaction it was read in: a savepoint rolled back
    (or released) since then means a new read."""
    transaction = session.get_nested_transaction() or session.get_transaction()
    kept = session.info.get(key)
    if kept is None or kept[0] is not transaction:
        kept = session.info[key] = (transaction, read(session))
    return kept[1]


def _locked_head(session: Session) -> dict:
    """The chain head, locked for this transaction (read once per consumer batch); each append
    moves both the copy and the row."""
    def read(session: Session) -> dict:
        row = session.execute(_HEAD_LOCKED).one()
        return {"seq": row.seq, "hash": row.hash}
    return _read_once(session, _HEAD_KEY, read)


# One announcement carries at most this many records (a consumer's batch is 200 by default).
ANNOUNCED_PER_EVENT = 500


def announcement(records: list[dict]) -> OutgoingEvent:
    """EventosAuditados: records appended together, in seq order. Keyed by its first seq, so
    announcements spread over the topic's partitions; their checks do not depend on their order."""
    return OutgoingEvent(TOPIC, "EventosAuditados", str(records[0]["seq"]), {
        "first_seq": records[0]["seq"], "last_seq": records[-1]["seq"], "records": records,
        "timestamp": utcnow()})


def announced_records(event: IncomingEvent) -> list[dict]:
    """The records an announcement names: EventosAuditados' list, or the one a retired
    EventoAuditado (one per record) named."""
    return event.payload["records"] if event.event_type == "EventosAuditados" else [event.payload]


def audit_event(session: Session, event: IncomingEvent) -> list[OutgoingEvent]:
    """Append the event's record to the chain and announce it. Inside `audit_batch` (a consumer's
    batch) the record, the head's move, the conversion's campaign and the announcement are kept
    for the batch's end (one write, one EventosAuditados); otherwise written and announced now."""
    pending = _pending_appends(session)
    head = pending.head if pending is not None and pending.head is not None else _locked_head(session)
    record = domain.AuditRecord(
        seq=head["seq"] + 1, event_id=event.event_id, topic=event.topic, event_type=event.event_type,
        schema_version=event.schema_version, aggregate_id=event.key or "", occurred_at=event.occurred_at,
        correlation_id=event.correlation_id, causation_id=event.causation_id,
        payload_json=domain.canonical_json(event.payload), actor_id=event.actor_id, actor_role=event.actor_role)
    digest = domain.chain_hash(head["hash"], record)
    owners = domain.owners_of(event.event_type, event.payload)
    now = utcnow()
    row = {
        "seq": record.seq, "event_id": record.event_id, "topic": record.topic, "event_type": record.event_type,
        "schema_version": record.schema_version, "aggregate_id": record.aggregate_id,
        "occurred_at": record.occurred_at, "correlation_id": record.correlation_id,
        "causation_id": record.causation_id, "payload_json": record.payload_json, "prev_hash": head["hash"],
        "hash": digest, "recorded_at": now, "actor_id": record.actor_id, "actor_role": record.actor_role,
        "campana_id": owners.campana_id, "conversion_id": owners.conversion_id,
        "anunciante_id": owners.anunciante_id}
    learnt = owners.conversion_id and owners.campana_id
    announced = {"seq": record.seq, "event_id": record.event_id, "event_type": record.event_type,
                 "topic": record.topic, "aggregate_id": record.aggregate_id, "record_hash": digest}
    head["seq"], head["hash"] = record.seq, digest
    if pending is not None:
        pending.rows.append(row)
        pending.head = head
        pending.announced.append(announced)
        if learnt:
            pending.conversions.setdefault(owners.conversion_id, owners.campana_id)
        return []
    session.execute(_APPEND, row)
    session.execute(_MOVE_HEAD, {"new_seq": record.seq, "new_hash": digest})
    if learnt:
        _learn_conversions(session, {owners.conversion_id: owners.campana_id})
    return [announcement([announced])]


@dataclass
class _Appends:
    """What a consumer batch's audit_event calls left for its end (audit_batch)."""

    transaction: object
    head: dict | None = None  # the kept chain head (_locked_head), moved by each record
    rows: list[dict] = field(default_factory=list)
    conversions: dict[str, str] = field(default_factory=dict)  # conversion -> first campaign named
    announced: list[dict] = field(default_factory=list)  # EventosAuditados' records, in seq order


_APPENDS_KEY = "auditoria.pending_appends"


def _pending_appends(session: Session) -> _Appends | None:
    pending = session.info.get(_APPENDS_KEY)
    if pending is not None and (session.get_nested_transaction() is not None
                                or pending.transaction is not session.get_transaction()):
        # The kept head is ahead of its row until the batch's end: inside a savepoint it would be
        # read again from the row (a forked chain), and a savepoint rolled back could not take
        # back what is kept. Fail the batch instead: it is retried one event at a time.
        raise RuntimeError("audit_event in a savepoint of an audit batch")
    return pending


@contextmanager
def audit_batch(session: Session) -> Iterator[list[OutgoingEvent]]:
    """The audit-consumer's batch scope (kernel.inbox.Handlers): its records computed in memory,
    the chain head locked and read once, then written in one statement, the head moved once and
    the conversions' campaigns learnt in one statement, all in the batch's transaction, and the
    records announced in one EventosAuditados (per ANNOUNCED_PER_EVENT) put in the list it yields.
    On an error nothing kept is written (the transaction is rolled back, the head's copy dropped)."""
    pending = session.info[_APPENDS_KEY] = _Appends(session.get_transaction())
    at_end: list[OutgoingEvent] = []
    try:
        yield at_end
        del session.info[_APPENDS_KEY]
        if pending.rows:
            session.execute(_APPEND, pending.rows)
            session.execute(_MOVE_HEAD, {"new_seq": pending.head["seq"], "new_hash": pending.head["hash"]})
        if pending.conversions:
            _learn_conversions(session, pending.conversions)
        at_end.extend(announcement(pending.announced[i:i + ANNOUNCED_PER_EVENT])
                      for i in range(0, len(pending.announced), ANNOUNCED_PER_EVENT))
    except BaseException:
        session.info.pop(_HEAD_KEY, None)  # moved past its row: read again if ever needed
        raise
    finally:
        session.info.pop(_APPENDS_KEY, None)


def _learn_conversions(session: Session, campaigns: dict[str, str]) -> None:
    """Each conversion's campaign (conversion_id -> campana_id). The first campaign named wins; a
    later record naming the conversion changes nothing. Under the chain head's lock (audit_event):
    no other audit-consumer inserts meanwhile."""
    statement = _CONVERSION_LEARNT.get(session.get_bind().dialect.name)
    if statement is not None:
        session.execute(statement, [{"conversion_id": c, "campana_id": k} for c, k in campaigns.items()])
        return
    c = tables.conversiones_auditadas  # another database: check, then insert
    for conversion_id, campana_id in campaigns.items():
        if not session.scalar(select(exists().where(c.c.conversion_id == conversion_id))):
            session.execute(c.insert().values(conversion_id=conversion_id, campana_id=campana_id))


def learn_campaign_owner(session: Session, event: IncomingEvent) -> list[OutgoingEvent]:
    """CampanaCreada (audited too): the campaign's advertiser, for scoping the log to it. Campaigns
    created before they had an owner (before v5) are nobody's but the operator's."""
    owners = domain.owners_of(event.event_type, event.payload)
    if owners.campana_id is None:
        return []
    k = tables.campanas_auditadas
    known = session.execute(select(k).where(k.c.campana_id == owners.campana_id)).mappings().first()
    if known is None:
        session.execute(k.insert().values(campana_id=owners.campana_id, anunciante_id=owners.anunciante_id))
    elif known["anunciante_id"] is None and owners.anunciante_id is not None:
        session.execute(update(k).where(k.c.campana_id == owners.campana_id).values(anunciante_id=owners.anunciante_id))
    return []


def visible_records(principal: Principal):
    """The condition on audit_log rows the caller may read: the operator every one, an advertiser
    those naming it, one of its campaigns or a conversion of one of them (ownership learnt in any
    order: resolved now, when reading); anyone else none (affiliates read no audit record)."""
    log, k, c = tables.audit_log, tables.campanas_auditadas, tables.conversiones_auditadas
    if principal.role == OPERATOR:
        return true()
    if principal.role != ADVERTISER or not principal.anunciante_id:
        return false()
    anunciante = principal.anunciante_id
    campaigns = select(k.c.campana_id).where(k.c.anunciante_id == anunciante)
    conversions = select(c.c.conversion_id).join(k, k.c.campana_id == c.c.campana_id).where(
        k.c.anunciante_id == anunciante)
    return or_(log.c.anunciante_id == anunciante, log.c.campana_id.in_(campaigns),
               log.c.conversion_id.in_(conversions))


# -- security-consumer on auditoria.eventos ------------------------------------------------------
def flag_security_events(session: Session, event: IncomingEvent) -> list[OutgoingEvent]:
    """A finding, with its reason, for each announced record of a security-relevant type."""
    for p in announced_records(event):
        field = domain.SECURITY_RELEVANT.get(p["event_type"])
        if field is None:
            continue
        row = session.execute(select(tables.audit_log.c.payload_json).where(tables.audit_log.c.seq == p["seq"])).first()
        motivo = "unknown"
        if row is not None:
            value = json.loads(row.payload_json).get(field)
            motivo = ",".join(value) if isinstance(value, list) else str(value)
        session.execute(tables.security_findings.insert().values(
            audit_seq=p["seq"], event_type=p["event_type"], aggregate_id=p["aggregate_id"], motivo=motivo[:500],
            detected_at=utcnow()))
    return []


# -- compliance-consumer on auditoria.eventos ----------------------------------------------------
_LINK = select(tables.audit_log).where(tables.audit_log.c.seq >= bindparam("previous"),
                                       tables.audit_log.c.seq <= bindparam("seq")).order_by(tables.audit_log.c.seq)
_COMPLIANCE_LOCKED = select(tables.compliance_state).where(tables.compliance_state.c.id == 1).with_for_update()
_MOVE_COMPLIANCE = update(tables.compliance_state).where(tables.compliance_state.c.id == 1).values(
    verified=bindparam("new_verified"), highest_seq=bindparam("new_highest_seq"), broken_seq=bindparam("new_broken_seq"),
    problem=bindparam("new_problem"), updated_at=bindparam("new_updated_at"))
# A batch's records are read by runs of nearby seq numbers: one query for the usual batch (the
# announcements of consecutive records), never a scan of a long stretch between two far apart.
_RUN_GAP = 64
_PENDING_LINKS_KEY = "auditoria.pending_links"


def _locked_compliance(session: Session) -> dict:
    """The compliance state, locked for this unit of work and read once per unit (as the chain head)."""
    return _read_once(session, _COMPLIANCE_KEY,
                      lambda session: dict(session.execute(_COMPLIANCE_LOCKED).mappings().one()))


def verify_audited_links(session: Session, event: IncomingEvent) -> list[OutgoingEvent]:
    """Re-verify the link each announced record makes with its predecessor, independently of the
    writer. Inside `compliance_batch` (a consumer's batch) the checks wait for the batch's end,
    where the batch's records are read together."""
    announced = [(event.event_id, record) for record in announced_records(event)]
    pending = session.info.get(_PENDING_LINKS_KEY)
    if pending is not None and session.get_nested_transaction() is None:
        pending.extend(announced)
        return []
    # One by one (and in a savepoint, whose rollback must take its count back): checked now.
    _count_verified(session, announced, _links_of(session, announced))
    return []


@contextmanager
def compliance_batch(session: Session) -> Iterator[None]:
    """The compliance-consumer's batch scope (kernel.inbox.Handlers): the announced records and
    their predecessors read in one query per run of seq numbers, each link checked in the
    batch's order as one by one, the state moved once."""
    pending: list[tuple[str, dict]] = []
    session.info[_PENDING_LINKS_KEY] = pending
    try:
        yield
    finally:
        session.info.pop(_PENDING_LINKS_KEY, None)
    if pending:
        _count_verified(session, pending, _links_of(session, pending))


def _links_of(session: Session, announced: list[tuple[str, dict]]) -> dict:
    """The announced records and their predecessors by seq, read in one query per run of nearby
    seq numbers."""
    wanted = sorted({s for _, r in announced for s in (r["seq"] - 1, r["seq"]) if s >= 1})
    by_seq: dict = {}
    start = 0
    for i in range(1, len(wanted) + 1):
        if i == len(wanted) or wanted[i] - wanted[i - 1] > _RUN_GAP:
            for row in session.execute(_LINK, {"previous": wanted[start], "seq": wanted[i - 1]}).mappings():
                by_seq[row["seq"]] = row
            start = i
    return by_seq


def _link_problem(seq: int, announced_hash: str, by_seq: dict) -> str | None:
    current = by_seq.get(seq)
    prev_hash = domain.GENESIS if seq == 1 else (by_seq[seq - 1]["hash"] if seq - 1 in by_seq else None)
    if current is None:
        return "announced record is missing"
    if prev_hash is None:
        return "previous record is missing"
    if current["prev_hash"] != prev_hash or domain.chain_hash(prev_hash, _record(current)) != current["hash"]:
        return "hash link does not verify"
    if current["hash"] != announced_hash:
        return "record hash differs from the one announced"
    return None


def _count_verified(session: Session, announced: list[tuple[str, dict]], by_seq: dict) -> None:
    """Check each announced link ((announcement's event id, record) pairs; records by seq in
    `by_seq`) in order; count them in the state, the first break found recorded there and raised
    as an alert."""
    state = _locked_compliance(session)
    moved = dict(state)  # the kept copy moves once the row has
    for event_id, record in announced:
        seq = record["seq"]
        problem = _link_problem(seq, record["record_hash"], by_seq)
        moved["verified"] += 1
        moved["highest_seq"] = max(moved["highest_seq"], seq)
        if problem and moved["broken_seq"] is None:
            moved["broken_seq"], moved["problem"] = seq, problem
            session.execute(tables.alertas.insert().values(
                event_id=event_id, servicio="auditoria", tipo="cadena_rota",
                mensaje=f"audit record {seq}: {problem}", creada_en=utcnow()))
    moved["updated_at"] = utcnow()
    session.execute(_MOVE_COMPLIANCE, {"new_verified": moved["verified"], "new_highest_seq": moved["highest_seq"],
                                       "new_broken_seq": moved["broken_seq"], "new_problem": moved["problem"],
                                       "new_updated_at": moved["updated_at"]})
    state.update(moved)


# -- monitoring-consumer and alerting-consumer on sistema.eventos -------------------------------
_STATUS = {"ServicioIniciado": "iniciado", "ServicioDetenido": "detenido",
           "ServicioDegradado": "degradado", "ServicioRecuperado": "iniciado"}


def track_service(session: Session, event: IncomingEvent) -> list[OutgoingEvent]:
    p = event.payload
    t = tables.servicios
    estado = _STATUS[event.event_type]
    row = session.execute(select(t.c.actualizado_en).where(t.c.instancia == p["instancia"])).first()
    if row is None:
        session.execute(t.insert().values(instancia=p["instancia"], servicio=p["servicio"], estado=estado,
                                          motivo=p.get("motivo"), actualizado_en=p["timestamp"]))
    elif row.actualizado_en <= p["timestamp"]:  # an older event redelivered late does not win
        session.execute(update(t).where(t.c.instancia == p["instancia"]).values(
            estado=estado, motivo=p.get("motivo"), actualizado_en=p["timestamp"]))
    return []


def raise_alert(session: Session, event: IncomingEvent) -> list[OutgoingEvent]:
    p = event.payload
    if event.event_type == "ServicioDegradado":
        tipo, mensaje = "servicio_degradado", f"{p['instancia']}: {p['motivo']}"
    elif event.event_type == "SagaAtascada":  # a saga waiting past every timeout, still asking
        tipo = "saga_atascada"
        mensaje = f"saga {p['saga_id']} stuck at {p['paso']} after {p['intentos']} requests: {p['motivo']}"
    elif event.event_type == "WebhookDeshabilitado":  # a tenant's endpoint stopped answering
        tipo = "webhook_deshabilitado"
        owner = f"{p['propietario_rol']} {p['propietario_id']}" if p["propietario_id"] else p["propietario_rol"]
        mensaje = (f"webhook {p['webhook_id']} of {owner} disabled after {p['fallos_consecutivos']} failures: "
                   f"{p['motivo']}")
    else:
        tipo = "dead_letter"
        mensaje = f"{p['event_type']} {p['event_id']} on {p['topic']}/{p['subscription']} dead-lettered: {p['error']}"
    session.execute(tables.alertas.insert().values(event_id=event.event_id, servicio=p["servicio"], tipo=tipo,
                                                   mensaje=mensaje[:600], creada_en=utcnow()))
    return []


# -- verification of the whole chain -----------------------------------------------------------------
def walk_chain(session: Session, batch: int = 2000) -> Iterator[tuple[domain.AuditRecord, str, str]]:
    log = tables.audit_log
    last = 0
    while True:
        rows = session.execute(select(log).where(log.c.seq > last).order_by(log.c.seq).limit(batch)).mappings().all()
        if not rows:
            return
        for row in rows:
            yield _record(row), row["prev_hash"], row["hash"]
        last = rows[-1]["seq"]


def verify_audit_chain(session: Session) -> tuple[int, domain.BrokenLink | None]:
    """Walk the chain from the start; (records checked, first broken link or None)."""
    count = 0

    def counted():
        nonlocal count
        for item in walk_chain(session):
            count += 1
            yield item

    broken = domain.verify_chain(counted())
    head = session.execute(select(tables.audit_head).where(tables.audit_head.c.id == 1)).mappings().one()
    if broken is None and head["seq"] != count:
        broken = domain.BrokenLink(count + 1, f"chain head says {head['seq']} records, found {count}")
    return count, broken
