"""CPU per item of the two hottest paths, in-process, one thread, scratch SQLite (issue 11).

    .venv/bin/python tools/profile_cpu.py postbacks [--count 2000] [--profile]
    .venv/bin/python tools/profile_cpu.py audit [--count 10000] [--profile]

`postbacks`: conversiones' `receive_postback` (the command behind POST /conversiones, no HTTP),
each a new order id of a known campaign and affiliate: ConversionDetected + ConversionValidated,
the saga's steps, the projections, the outbox. `audit`: `--count` conversiones events through
auditoria's audit-consumer (InboxProcessor, batches of 200 as a ConsumerWorker hands them), then
the EventoAuditado each produced through the compliance-consumer. Prints the thread's CPU
milliseconds per item and SQL statements per item; `--profile` adds cProfile's top functions.
The first 50 postbacks (5 batches) warm caches and are not counted. Nothing here is used by the platform.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import tempfile
import time
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from importlib import import_module
from pathlib import Path

from sqlalchemy import event as sa_event, select

WARMUP = 50
NOW = datetime(2026, 11, 28, 12, 0, tzinfo=timezone.utc)


def _statements(engine) -> list[int]:
    count = [0]

    def counted(*_args, **_kw):
        count[0] += 1
    sa_event.listen(engine, "before_cursor_execute", counted)
    return count


def _measure(label: str, count: int, run, statements: list[int], profile: bool, warmup: int = WARMUP) -> dict:
    for i in range(warmup):
        run(-1 - i)
    profiler = cProfile.Profile() if profile else None
    before_sql = statements[0]
    started, wall = time.thread_time(), time.perf_counter()
    if profiler:
        profiler.enable()
    for i in range(count):
        run(i)
    if profiler:
        profiler.disable()
    cpu, wall = time.thread_time() - started, time.perf_counter() - wall
    result = {"what": label, "items": count, "cpu_ms_per_item": round(cpu * 1000 / count, 3),
              "wall_ms_per_item": round(wall * 1000 / count, 3),
              "sql_statements_per_item": round((statements[0] - before_sql) / count, 2)}
    print(result)
    if profiler:
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(35)
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    return result


def postbacks(count: int, profile: bool) -> None:
    from alpes.conversiones import commands, records, reference
    from alpes.kernel.codec import SchemaRegistry
    from alpes.kernel.messages import IncomingEvent
    from alpes.settings import Settings

    registry = SchemaRegistry.from_directory()

    def incoming(event_type: str, payload: dict, version: int) -> IncomingEvent:
        data, _ = registry.encode(event_type, payload, version)
        return IncomingEvent("marketing.eventos", "conversiones-consumer", f"{event_type}-{version}", event_type,
                             version, payload.get("id", ""), payload["timestamp"], "c", "c",
                             registry.decode(event_type, data, version), data)

    with tempfile.TemporaryDirectory() as scratch:
        settings = Settings(data_dir=Path(scratch), broker_url="pulsar://127.0.0.1:1")
        _app, runtime = import_module("alpes.conversiones.service").build(settings)
        with runtime.db.transaction() as session:
            reference.learn_campana(session, incoming("CampanaCreada", {
                "id": "k1", "nombre": "n", "porcentaje_comision": Decimal("10"), "moneda": "EUR", "timestamp": NOW,
                "landing_url": "https://shop.example.com/v", "fecha_inicio": NOW - timedelta(days=365),
                "fecha_fin": NOW + timedelta(days=3650)}, 2))
            reference.learn_afiliado(session, incoming("AfiliadoHabilitado", {"afiliado_id": "a1", "timestamp": NOW},
                                                       2))
            reference.learn_inscripcion(session, incoming("AfiliadoInscrito", {
                "inscripcion_id": "i1", "campana_id": "k1", "afiliado_id": "a1", "link_code": "linkcodea1",
                "timestamp": NOW}, 1))
        store = records.event_store(registry)
        statements = _statements(runtime.db.engine)
        statuses: dict[str, int] = {}

        def run(i: int) -> None:
            _id, _created, status = commands.receive_postback(
                runtime, store, affiliate_id="a1", campaign_id="k1", click_id=None, user_id=f"u{i}",
                conversion_value=Decimal("80.00"), conversion_type="sale", currency="EUR", order_id=f"o{i}",
                ip=f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}", customer_email=f"c{i}@example.com",
                now=datetime.now(timezone.utc), grace=timedelta(minutes=5), max_conversions_per_ip=5,
                caller_key=f"key:{i % 7}", max_conversions_per_caller=10**9)
            statuses[status] = statuses.get(status, 0) + 1
        _measure("postback (receive_postback)", count, run, statements, profile)
        print("statuses:", statuses)
        runtime.db.dispose()


def audit(count: int, profile: bool) -> None:
    from alpes.auditoria import consumers, tables
    from alpes.kernel.codec import SchemaRegistry
    from alpes.kernel.db import Database, migrate
    from alpes.kernel.inbox import InboxProcessor
    from alpes.kernel.messages import IncomingEvent
    from alpes.kernel.outbox import Outbox

    registry = SchemaRegistry.from_directory()
    with tempfile.TemporaryDirectory() as scratch:
        url = f"sqlite:///{Path(scratch) / 'auditoria.db'}"
        migrate(url, "alpes.auditoria:migrations")
        db = Database(url)
        outbox = Outbox(tables.outbox, registry)
        specs = {(s.topic, s.subscription): s for s in consumers.consumer_specs()}
        auditor = InboxProcessor(db, tables.inbox, outbox, "audit-consumer",
                                 specs[("conversiones.eventos", "audit-consumer")].handlers)
        compliance = InboxProcessor(db, tables.inbox, outbox, "compliance-consumer",
                                    specs[("auditoria.eventos", "compliance-consumer")].handlers)
        statements = _statements(db.engine)
        batch = 200

        def conversion_events(i: int) -> list[IncomingEvent]:
            events = []
            for n in range(batch):
                k = f"{i}-{n}"
                payload = {"conversion_id": f"cv-{k}", "affiliate_id": "a1", "campaign_id": "k1",
                           "conversion_value": Decimal("80.00"), "currency": "EUR", "conversion_type": "sale",
                           "timestamp": NOW, "click_id": None, "converted_at": NOW}
                events.append(IncomingEvent("conversiones.eventos", "audit-consumer", f"e-{k}", "ConversionValidated",
                                            2, f"cv-{k}", NOW, f"c-{k}", f"c-{k}", payload))
            return events

        def audit_batch(i: int) -> None:
            verdicts = auditor.process(conversion_events(i))
            assert all(v is None for v in verdicts.values()), verdicts

        batches = max(1, count // batch)
        _measure_batches("audit-consumer (audit_event)", batches, batch, audit_batch, statements, profile)
        with db.read() as session:
            log = session.execute(select(tables.audit_log.c.seq, tables.audit_log.c.hash,
                                         tables.audit_log.c.event_id).order_by(tables.audit_log.c.seq)).all()
        notices = [IncomingEvent("auditoria.eventos", "compliance-consumer", f"n-{row.seq}", "EventoAuditado", 1,
                                 "k", NOW, "c", "c",
                                 {"seq": row.seq, "event_id": row.event_id, "record_hash": row.hash})
                   for row in log]

        def verify_batch(i: int) -> None:
            start = (i + 5) * batch if i >= 0 else (-1 - i) * batch  # 5 warm-up batches first
            verdicts = compliance.process(notices[start:start + batch])
            assert all(v is None for v in verdicts.values()), verdicts
        _measure_batches("compliance-consumer (verify_audited_link)", min(batches, len(notices) // batch - 5),
                         batch, verify_batch, statements, profile)
        with db.read() as session:
            state = session.execute(select(tables.compliance_state)).mappings().one()
        print("compliance:", dict(state))
        db.dispose()


def _measure_batches(label, batches, batch, run, statements, profile):
    result = _measure(label + f" per batch of {batch}", batches, run, statements, profile, warmup=5)
    print({"what": label, "cpu_ms_per_event": round(result["cpu_ms_per_item"] / batch, 4),
           "sql_statements_per_event": round(result["sql_statements_per_item"] / batch, 3)})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("workload", choices=["postbacks", "audit"])
    parser.add_argument("--count", type=int, default=0)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    if args.workload == "postbacks":
        postbacks(args.count or 2000, args.profile)
    else:
        audit(args.count or 10000, args.profile)


if __name__ == "__main__":
    main()
