"""`alpes audit verify` walks the hash chain and names the first broken link."""

from __future__ import annotations

from datetime import datetime, timezone
from decimal import Decimal

import pytest
from sqlalchemy import select, update
from typer.testing import CliRunner

from alpes.auditoria import handlers, tables
from alpes.cli import app
from alpes.kernel.codec import SchemaRegistry
from alpes.kernel.db import Database, migrate
from alpes.kernel.messages import IncomingEvent


def _event(n: int) -> IncomingEvent:
    when = datetime(2026, 11, 28, 12, 0, n, tzinfo=timezone.utc)
    return IncomingEvent(topic="comisiones.eventos", subscription="audit-consumer", event_id=f"e-{n}",
                         event_type="ComisionCalculada", schema_version=1, key=f"k-{n % 3}", occurred_at=when,
                         correlation_id=f"c-{n}", causation_id=f"c-{n}",
                         payload={"id": f"k-{n}", "monto": Decimal("12.50"), "timestamp": when})


@pytest.fixture
def audited(tmp_path):
    url = f"sqlite:///{tmp_path / 'auditoria.db'}"
    migrate(url, "alpes.auditoria:migrations")
    db = Database(url)
    with db.transaction() as session:
        for n in range(1, 11):
            handlers.audit_event(session, _event(n))
    yield db, tmp_path
    db.dispose()


def _verify(data_dir) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["audit", "verify", "--data-dir", str(data_dir)])
    return result.exit_code, result.output


def test_an_untouched_chain_verifies(audited):
    _, data_dir = audited
    assert _verify(data_dir) == (0, "ok: 10 records, chain intact\n")


def test_editing_a_stored_record_is_reported_at_that_record(audited):
    db, data_dir = audited
    with db.transaction() as session:
        session.execute(update(tables.audit_log).where(tables.audit_log.c.seq == 7)
                        .values(payload_json='{"id":"k-7","monto":"1250.00","timestamp":"2026-11-28T12:00:07+00:00"}'))
    code, output = _verify(data_dir)
    assert code == 1
    assert output.startswith("BROKEN at record 7: record content does not match its hash")


def test_deleting_the_last_record_is_reported(audited):
    db, data_dir = audited
    with db.transaction() as session:
        session.execute(tables.audit_log.delete().where(tables.audit_log.c.seq == 10))
    code, output = _verify(data_dir)
    assert code == 1 and "BROKEN at record 10" in output


def test_a_suspension_becomes_a_security_finding_with_its_reason(audited):
    db, _ = audited
    when = datetime(2026, 11, 28, 13, 0, tzinfo=timezone.utc)
    suspension = IncomingEvent(topic="afiliados.eventos", subscription="audit-consumer", event_id="s-1",
                               event_type="AfiliadoSuspendido", schema_version=1, key="a-1", occurred_at=when,
                               correlation_id="s-1", causation_id="s-1",
                               payload={"id": "a-1", "motivo": "fraude de clics", "timestamp": when})
    with db.transaction() as session:
        [announced] = handlers.audit_event(session, suspension)
        notice = IncomingEvent(topic="auditoria.eventos", subscription="security-consumer", event_id="n-1",
                               event_type="EventoAuditado", schema_version=1, key="a-1", occurred_at=when,
                               correlation_id="s-1", causation_id="s-1", payload=announced.payload)
        handlers.flag_security_event(session, notice)
    with db.read() as session:
        findings = session.execute(tables.security_findings.select()).mappings().all()
    assert [(f["event_type"], f["aggregate_id"], f["motivo"]) for f in findings] == [
        ("AfiliadoSuspendido", "a-1", "fraude de clics")]


# -- the consumers' batches (issue 11: one read of the chain head per batch) ----------------------
def _conversion_event(n: int, campaign: str = "k1", event_id: str | None = None) -> IncomingEvent:
    when = datetime(2026, 11, 28, 12, 0, tzinfo=timezone.utc)
    return IncomingEvent(topic="conversiones.eventos", subscription="audit-consumer", event_id=event_id or f"cv-e-{n}",
                         event_type="ConversionValidated", schema_version=2, key=f"cv-{n % 7}", occurred_at=when,
                         correlation_id=f"cv-{n % 7}", causation_id=f"cv-{n % 7}",
                         payload={"conversion_id": f"cv-{n % 7}", "affiliate_id": "a1", "campaign_id": campaign,
                                  "conversion_value": Decimal("80.00"), "currency": "EUR", "conversion_type": "sale",
                                  "timestamp": when, "click_id": None, "converted_at": when})


def _processors(db):
    from alpes.auditoria import consumers
    from alpes.kernel.inbox import InboxProcessor
    from alpes.kernel.outbox import Outbox

    outbox = Outbox(tables.outbox, SchemaRegistry.from_directory())
    specs = {(s.topic, s.subscription): s.handlers for s in consumers.consumer_specs()}
    return (InboxProcessor(db, tables.inbox, outbox, "audit-consumer", specs["conversiones.eventos", "audit-consumer"]),
            InboxProcessor(db, tables.inbox, outbox, "compliance-consumer",
                           specs["auditoria.eventos", "compliance-consumer"]))


def test_batches_chain_every_record_once_announce_each_in_order_and_verify(db_url):
    """Batches (with a redelivered event) through audit-consumer, then every EventoAuditado through
    compliance-consumer: one record per event, consecutive and intact, each conversion's first
    campaign learnt once, the announcements in the outbox in seq order, every link verified."""
    migrate(db_url, "alpes.auditoria:migrations")
    db = Database(db_url)
    audit, compliance = _processors(db)
    batches = [[_conversion_event(n) for n in range(0, 30)],
               [_conversion_event(n, campaign="other") for n in range(29, 60)],  # 29 again: a redelivery
               [_conversion_event(60)]]
    for batch in batches:
        assert set(audit.process(batch).values()) == {None}
    with db.read() as session:
        assert handlers.verify_audit_chain(session) == (61, None)
        learnt = session.execute(tables.conversiones_auditadas.select()).all()
        announced = session.execute(select(tables.outbox.c.event_id, tables.outbox.c.payload)
                                    .order_by(tables.outbox.c.id)).all()
    assert sorted(learnt) == [(f"cv-{n}", "k1") for n in range(7)]  # the first campaign named stays
    registry = SchemaRegistry.from_directory()
    notices = []
    for row in announced:
        payload = registry.decode("EventoAuditado", row.payload, 1)
        notices.append(IncomingEvent("auditoria.eventos", "compliance-consumer", row.event_id, "EventoAuditado", 1,
                                     payload["aggregate_id"], payload["timestamp"], "c", "c", payload))
    assert [n.payload["seq"] for n in notices] == list(range(1, 62))
    for start in range(0, 61, 25):
        assert set(compliance.process(notices[start:start + 25]).values()) == {None}
    with db.read() as session:
        state = session.execute(select(tables.compliance_state)).mappings().one()
    assert (state["verified"], state["highest_seq"], state["broken_seq"]) == (61, 61, None)
    db.dispose()


def test_a_record_rolled_back_with_its_savepoint_leaves_no_gap_in_the_chain(db_url):
    migrate(db_url, "alpes.auditoria:migrations")
    db = Database(db_url)
    with db.transaction() as session:
        handlers.audit_event(session, _event(1))
        try:
            with session.begin_nested():
                handlers.audit_event(session, _event(2))
                raise RuntimeError("undone")
        except RuntimeError:
            pass
        handlers.audit_event(session, _event(3))
    with db.read() as session:
        assert handlers.verify_audit_chain(session) == (2, None)
        assert session.scalars(select(tables.audit_log.c.event_id).order_by(tables.audit_log.c.seq)).all() == [
            "e-1", "e-3"]
    db.dispose()
