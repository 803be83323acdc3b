"""`alpes audit verify` walks the hash chain and names the first broken link."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest
from sqlalchemy import func, select, update
from typer.testing import CliRunner

from alpes.auditoria import handlers, tables
from alpes.cli import app
from alpes.kernel.codec import SchemaRegistry
from alpes.kernel.db import Database, migrate
from alpes.kernel.messages import IncomingEvent


def _event(n: int) -> IncomingEvent:
    when = datetime(2026, 11, 28, 12, 0, tzinfo=timezone.utc) + timedelta(seconds=n)
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
        assert announced.event_type == "EventosAuditados" and len(announced.payload["records"]) == 1
        notice = IncomingEvent(topic="auditoria.eventos", subscription="security-consumer", event_id="n-1",
                               event_type="EventosAuditados", schema_version=1, key="a-1", occurred_at=when,
                               correlation_id="s-1", causation_id="s-1", payload=announced.payload)
        handlers.flag_security_events(session, notice)
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
    """Batches (with a redelivered event) through audit-consumer, then every EventosAuditados through
    compliance-consumer: one record per event, consecutive and intact, each conversion's first
    campaign learnt once, one announcement per batch naming its records in seq order, every link
    verified."""
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
        announced = session.execute(select(tables.outbox.c.event_id, tables.outbox.c.payload,
                                           tables.outbox.c.correlation_id, tables.outbox.c.causation_id)
                                    .order_by(tables.outbox.c.id)).all()
    assert sorted(learnt) == [(f"cv-{n}", "k1") for n in range(7)]  # the first campaign named stays
    # Each announcement continues its batch's first event (29 was a redelivery: 30 came first).
    assert [(r.correlation_id, r.causation_id) for r in announced] == [
        ("cv-0", "cv-e-0"), ("cv-2", "cv-e-30"), ("cv-4", "cv-e-60")]
    registry = SchemaRegistry.from_directory()
    notices = []
    for row in announced:
        payload = registry.decode("EventosAuditados", row.payload, 1)
        notices.append(IncomingEvent("auditoria.eventos", "compliance-consumer", row.event_id, "EventosAuditados", 1,
                                     str(payload["first_seq"]), payload["timestamp"], "c", "c", payload))
    assert [(n.payload["first_seq"], n.payload["last_seq"]) for n in notices] == [(1, 30), (31, 60), (61, 61)]
    assert [r["seq"] for n in notices for r in n.payload["records"]] == list(range(1, 62))
    assert set(compliance.process(notices[:2]).values()) == {None}
    assert set(compliance.process(notices[2:]).values()) == {None}
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
    _assert_chain_of_first_and_third(db)


def _assert_chain_of_first_and_third(db) -> None:
    """Events 1 and 3 audited, in a chain that verifies (2 was undone or refused); closes `db`."""
    with db.read() as session:
        assert handlers.verify_audit_chain(session) == (2, None)
        assert session.scalars(select(tables.audit_log.c.event_id).order_by(tables.audit_log.c.seq)).all() == [
            "e-1", "e-3"]
    db.dispose()


# -- a consumer batch written at its end (issue 11: one insert, one head move, one learn per batch) ---
_KEY_ISSUED = {"key_id": "k-9", "digest": "d" * 64, "rol": "advertiser", "anunciante_id": "an-1", "afiliado_id": None,
               "scopes": ["conversiones:write"], "nombre": "ci", "expira_en": None}


def _mixed_events() -> list[IncomingEvent]:
    """What the audit-consumer sees on marketing.eventos and conversiones.eventos: a campaign (its
    owner learnt), an API key (learnt inside a savepoint), conversions naming campaigns (the first
    campaign of each conversion learnt), each with its own key so no failure blocks another."""
    when = datetime(2026, 11, 28, 12, 0, tzinfo=timezone.utc)

    def marketing(n: int, event_type: str, payload: dict) -> IncomingEvent:
        return IncomingEvent("marketing.eventos", "audit-consumer", f"m-{n}", event_type, 1, f"mk-{n}", when,
                             f"c-{n}", f"c-{n}", {**payload, "timestamp": when}, actor_id="k-1", actor_role="operator")
    return [marketing(1, "CampanaCreada", {"id": "k1", "anunciante_id": "an-1", "nombre": "uno"}),
            marketing(2, "ClaveApiEmitida", _KEY_ISSUED),
            *[_conversion_event(n, campaign="k1" if n < 9 else "k2") for n in range(14)]]


def _audit_in(db, events: list[IncomingEvent], *, one_by_one: bool) -> dict[str, str | None]:
    from alpes.auditoria import consumers
    from alpes.kernel.inbox import InboxProcessor
    from alpes.kernel.outbox import Outbox

    outbox = Outbox(tables.outbox, SchemaRegistry.from_directory())
    specs = {(s.topic, s.subscription): s.handlers for s in consumers.consumer_specs()}
    verdicts: dict[str, str | None] = {}
    for topic in dict.fromkeys(e.topic for e in events):
        processor = InboxProcessor(db, tables.inbox, outbox, "audit-consumer", specs[topic, "audit-consumer"])
        mine = [e for e in events if e.topic == topic]
        for batch in ([[e] for e in mine] if one_by_one else [mine]):
            verdicts.update(processor.process(batch))
    return verdicts


def _stored(db) -> dict:
    """The chain, its head, what was learnt and announced (the clocks' columns left out)."""
    log = tables.audit_log
    with db.read() as session:
        records = [{k: v for k, v in row.items() if k != "recorded_at"}
                   for row in session.execute(select(log).order_by(log.c.seq)).mappings()]
        registry = SchemaRegistry.from_directory()
        announcements = [registry.decode(r.event_type, r.payload, r.schema_version)
                         for r in session.execute(select(tables.outbox).order_by(tables.outbox.c.id))]
        return {"records": records, "announced": [r for a in announcements for r in a["records"]],
                "head": tuple(session.execute(select(tables.audit_head.c.seq, tables.audit_head.c.hash)).one()),
                "conversions": sorted(session.execute(select(tables.conversiones_auditadas)).all()),
                "campaigns": sorted(session.execute(select(tables.campanas_auditadas)).all()),
                "keys": session.scalars(select(tables.claves_api.c.key_id)).all(),
                "verified": handlers.verify_audit_chain(session)}


def test_a_batch_chains_exactly_as_one_event_at_a_time(db_url, tmp_path):
    """The same events through the audit-consumer as batches (here on SQLite or MariaDB) and one
    at a time (SQLite): the same records, hashes, owners, head, learnt campaigns and keys, and the
    same records announced in the same order (one EventosAuditados per batch, or per event)."""
    migrate(db_url, "alpes.auditoria:migrations")
    batched = Database(db_url)
    single_url = f"sqlite:///{tmp_path / 'one-by-one.db'}"
    migrate(single_url, "alpes.auditoria:migrations")
    single = Database(single_url)
    events = _mixed_events()
    assert set(_audit_in(batched, events, one_by_one=False).values()) == {None}
    assert set(_audit_in(single, events, one_by_one=True).values()) == {None}
    got, expected = _stored(batched), _stored(single)
    assert got == expected
    assert (_announcements(batched), _announcements(single)) == (2, 16)  # a batch per topic; one per event
    assert got["verified"] == (16, None) and got["head"][0] == 16
    assert [r["seq"] for r in got["records"]] == [a["seq"] for a in got["announced"]] == list(range(1, 17))
    assert got["conversions"] == [(f"cv-{n}", "k1") for n in range(7)]  # the first campaign named
    assert got["campaigns"] == [("k1", "an-1")] and got["keys"] == ["k-9"]
    batched.dispose()
    single.dispose()


def test_a_handler_failing_in_a_batch_retries_it_one_by_one_with_no_gap(db_url):
    migrate(db_url, "alpes.auditoria:migrations")
    db = Database(db_url)
    events = [_conversion_event(n, event_id=f"ok-{n}") for n in range(6)]
    unauditable = _event(99)
    unauditable.payload["tags"] = {"a", "b"}  # a set: no canonical JSON for it
    events.insert(3, unauditable)
    verdicts = _audit_in(db, events, one_by_one=False)
    assert verdicts.pop("e-99").startswith("TypeError: cannot audit a set")
    assert set(verdicts.values()) == {None}
    stored = _stored(db)
    assert stored["verified"] == (6, None) and stored["head"][0] == 6
    assert [r["event_id"] for r in stored["records"]] == [f"ok-{n}" for n in range(6)]
    assert [a["seq"] for a in stored["announced"]] == list(range(1, 7))
    db.dispose()


def test_a_batch_whose_write_fails_at_its_end_retries_one_by_one_with_no_gap(db_url):
    """The records are inserted at the batch's end: one refused there (its event id audited
    already, without the consumer's inbox row) fails the batch, which is retried one by one:
    the others are chained after it, nothing is skipped or written twice."""
    migrate(db_url, "alpes.auditoria:migrations")
    db = Database(db_url)
    with db.transaction() as session:
        handlers.audit_event(session, _conversion_event(1, event_id="known"))
    events = [_conversion_event(n, event_id=f"ok-{n}") for n in range(4)]
    events.insert(2, _conversion_event(5, event_id="known"))
    verdicts = _audit_in(db, events, one_by_one=False)
    assert "IntegrityError" in verdicts.pop("known")
    assert set(verdicts.values()) == {None}
    stored = _stored(db)
    assert stored["verified"] == (5, None) and stored["head"][0] == 5
    assert [r["event_id"] for r in stored["records"]] == ["known", "ok-0", "ok-1", "ok-2", "ok-3"]
    assert [a["seq"] for a in stored["announced"]] == [2, 3, 4, 5]
    db.dispose()


def test_a_duplicate_within_a_batch_is_audited_once(db_url):
    migrate(db_url, "alpes.auditoria:migrations")
    db = Database(db_url)
    a, b, c, d = (_conversion_event(n) for n in range(4))
    assert set(_audit_in(db, [a, b, a, c, b], one_by_one=False).values()) == {None}
    assert set(_audit_in(db, [c, d], one_by_one=False).values()) == {None}
    stored = _stored(db)
    assert [r["event_id"] for r in stored["records"]] == ["cv-e-0", "cv-e-1", "cv-e-2", "cv-e-3"]
    assert stored["verified"] == (4, None) and len(stored["announced"]) == 4
    db.dispose()


def test_an_audit_in_a_savepoint_of_a_batch_is_refused_so_the_chain_cannot_fork(db_url):
    """Within a batch the kept head is ahead of its row: appending inside a savepoint would read
    the row again. It fails instead (and the consumer retries the batch one event at a time)."""
    migrate(db_url, "alpes.auditoria:migrations")
    db = Database(db_url)
    with db.transaction() as session, handlers.audit_batch(session):
        handlers.audit_event(session, _event(1))
        with pytest.raises(RuntimeError, match="savepoint"):
            with session.begin_nested():
                handlers.audit_event(session, _event(2))
        handlers.audit_event(session, _event(3))
    _assert_chain_of_first_and_third(db)


def _announcements(db) -> int:
    with db.read() as session:
        return session.scalar(select(func.count()).select_from(tables.outbox))


def _notices(db, event_type: str = "EventosAuditados") -> list[IncomingEvent]:
    """An announcement per record stored (here each in its own notice, to be reordered): as
    EventosAuditados naming one record, or as the retired EventoAuditado a backlog may still hold."""
    registry = SchemaRegistry.from_directory()
    when = datetime(2026, 11, 28, tzinfo=timezone.utc)
    with db.read() as session:
        rows = session.execute(select(tables.outbox.c.payload).order_by(tables.outbox.c.id)).all()
    records = [r for row in rows for r in registry.decode("EventosAuditados", row.payload, 1)["records"]]
    return [IncomingEvent("auditoria.eventos", "compliance-consumer", f"n-{r['seq']}", event_type, 1, "k", when, "c", "c",
                          {"first_seq": r["seq"], "last_seq": r["seq"], "records": [r], "timestamp": when}
                          if event_type == "EventosAuditados" else {**r, "timestamp": when})
            for r in records]


def _record_of(notice: IncomingEvent) -> dict:
    return handlers.announced_records(notice)[0]


def _compliance_state(db) -> tuple:
    with db.read() as session:
        state = session.execute(select(tables.compliance_state)).mappings().one()
        alerts = session.execute(select(tables.alertas.c.event_id, tables.alertas.c.mensaje)).all()
    return state["verified"], state["highest_seq"], state["broken_seq"], state["problem"], alerts


@pytest.mark.parametrize("one_by_one", [False, True])
@pytest.mark.parametrize("event_type", ["EventosAuditados", "EventoAuditado"])
def test_compliance_finds_the_first_broken_link_in_a_batch_as_one_by_one(db_url, one_by_one, event_type):
    """150 records; record 7 edited and the announcement of 120 altered. The announcements of
    seq 150 down to 110, then 1-10 come in one batch (two runs of records read), then the rest:
    the first break met (120) is the one recorded, with one alert, and every link is counted.
    Also with the retired EventoAuditado (one record each), as a backlog may still hold it."""
    migrate(db_url, "alpes.auditoria:migrations")
    db = Database(db_url)
    assert set(_audit_in(db, [_event(n) for n in range(1, 151)], one_by_one=False).values()) == {None}
    assert _announcements(db) == 1  # one batch: one EventosAuditados naming its 150 records
    with db.transaction() as session:
        session.execute(update(tables.audit_log).where(tables.audit_log.c.seq == 7).values(payload_json='{"id":"x"}'))
    notices = _notices(db, event_type)
    _record_of(notices[119])["record_hash"] = "f" * 64
    first = notices[109:150][::-1] + notices[0:10]
    rest = notices[10:109]
    _, compliance = _processors(db)
    for batch in ([[n] for n in first + rest] if one_by_one else [first, rest]):
        assert set(compliance.process(batch).values()) == {None}
    problem = "record hash differs from the one announced"
    assert _compliance_state(db) == (150, 150, 120, problem, [(notices[119].event_id, f"audit record 120: {problem}")])
    db.dispose()


def test_compliance_counts_a_batch_once_its_links_verify(db_url):
    migrate(db_url, "alpes.auditoria:migrations")
    db = Database(db_url)
    assert set(_audit_in(db, [_event(n) for n in range(1, 41)], one_by_one=False).values()) == {None}
    notices = _notices(db)
    _, compliance = _processors(db)
    assert set(compliance.process(notices[:25]).values()) == {None}
    assert _compliance_state(db) == (25, 25, None, None, [])
    assert set(compliance.process(notices[20:]).values()) == {None}  # 20-24 again: redeliveries
    assert _compliance_state(db) == (40, 40, None, None, [])
    db.dispose()


def test_two_instances_appending_batches_at_once_never_fork_the_chain(db_url):
    """Two auditoria instances (own engines, own group commit on SQLite) append batches at the
    same time: the head row's lock (FOR UPDATE on MariaDB, the write lock on SQLite) makes each
    batch start from the other's last record, so the chain stays one, without gaps."""
    import threading

    migrate(db_url, "alpes.auditoria:migrations")
    instances = [Database(db_url), Database(db_url)]
    failures: list = []

    def run(i: int, db) -> None:
        try:
            for b in range(8):
                batch = [_conversion_event(n, event_id=f"i{i}-{b}-{n}") for n in range(25)]
                verdicts = _audit_in(db, batch, one_by_one=False)
                assert set(verdicts.values()) == {None}, verdicts
        except BaseException as error:  # reported by the main thread
            failures.append(error)

    threads = [threading.Thread(target=run, args=(i, db)) for i, db in enumerate(instances)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not failures
    stored = _stored(instances[0])
    assert stored["verified"] == (400, None) and stored["head"][0] == 400
    assert len({r["event_id"] for r in stored["records"]}) == 400
    assert sorted(a["seq"] for a in stored["announced"]) == list(range(1, 401))
    for db in instances:
        db.dispose()


def test_a_batch_larger_than_an_announcement_holds_is_announced_in_parts(db_url):
    migrate(db_url, "alpes.auditoria:migrations")
    db = Database(db_url)
    count = handlers.ANNOUNCED_PER_EVENT + 1
    assert set(_audit_in(db, [_event(n) for n in range(1, count + 1)], one_by_one=False).values()) == {None}
    registry = SchemaRegistry.from_directory()
    with db.read() as session:
        parts = [registry.decode("EventosAuditados", p, 1) for p in
                 session.scalars(select(tables.outbox.c.payload).order_by(tables.outbox.c.id))]
    assert [(p["first_seq"], p["last_seq"], len(p["records"])) for p in parts] == [
        (1, count - 1, count - 1), (count, count, 1)]
    _, compliance = _processors(db)
    notices = _notices(db)  # each record in its own notice
    assert set(compliance.process(notices).values()) == {None}
    assert _compliance_state(db) == (count, count, None, None, [])
    db.dispose()
