"""`alpes audit verify` walks the hash chain and names the first broken link."""

from __future__ import annotations

from datetime import datetime, timezone
from decimal import Decimal

import pytest
from sqlalchemy import update
from typer.testing import CliRunner

from alpes.auditoria import handlers, tables
from alpes.cli import app
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
