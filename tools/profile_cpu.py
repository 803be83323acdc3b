"""CPU per item of the hottest paths, in-process, one thread, scratch SQLite (issue 11).

    .venv/bin/python tools/profile_cpu.py postbacks [--count 2000] [--profile]
    .venv/bin/python tools/profile_cpu.py saga-answers [--count 5000] [--profile]
    .venv/bin/python tools/profile_cpu.py audit [--count 10000] [--batch 200] [--profile]
    .venv/bin/python tools/profile_cpu.py commissions [--count 5000] [--caps] [--profile]
    .venv/bin/python tools/profile_cpu.py postbacks-http [--count 2000] [--inline] [--profile [--profile-out F]]
    .venv/bin/python tools/profile_cpu.py clicks [--count 20000] [--inline] [--profile [--profile-out F]]
    .venv/bin/python tools/profile_cpu.py postbacks-threads [--count 3000] [--threads 32] [--busy 1] [--switch-interval S]

`postbacks-threads`: the same postbacks from `--threads` threads at once (as the thread pool
runs them; they share the group-commit turn), beside `--busy` threads that only run Python (as
the event loop, the relay and the consumers do between their waits); prints postbacks per
second, process CPU per postback, units per commit and the latency percentiles. Each SQL
statement lets the GIL go, and the turn's holder then waits for it behind the busy threads.
`--switch-interval`: the interpreter's (sys.setswitchinterval; 0.005 by default).
`postbacks`: conversiones' `receive_postback` (the command behind POST /conversiones, no HTTP),
each a new order id of a known campaign and affiliate: ConversionDetected + ConversionValidated,
the saga's steps, the projections, the outbox. `saga-answers`: marketing's ComisionRegistrada for
each of `--count` such conversions through conversiones' conversiones-consumer (InboxProcessor,
batches of 100 as a ConsumerWorker hands them): each saga completes. `audit`: `--count`
conversiones events through auditoria's audit-consumer (InboxProcessor, batches of 200 as a
ConsumerWorker hands them under a backlog; `--batch`: another size, such as the few events a batch
holds when the consumers keep up), then the EventosAuditados each batch produced (naming its
records) through the compliance-consumer. Prints the thread's CPU milliseconds per item and SQL statements per item;
`--profile` adds cProfile's top functions, timed in thread CPU time as the figures are (waits for
fsync or locks do not show).
`commissions`: marketing's consumers (the service as built, with its webhook hooks), fed what the
platform hands them for each conversion, in batches of 100 conversions (200 messages, as a
ConsumerWorker hands them): ConversionDetected + ConversionValidated to the marketing-consumer
(the saga's answer, the commission, webhooks) and the analytics-consumer, then the
ComisionCalculada each wrote to its outbox to the reporting- and payment-consumers. Per consumer
and in all: CPU milliseconds and SQL statements per conversion. `--caps`: the campaign has a budget
and a rule version with a monthly per-affiliate cap (more reads per commission; the bench's has neither).
All its conversions are one affiliate's in one campaign: each commission counts that affiliate's
commissions of the month, so the figures grow somewhat with `--count`; compare runs of one count.
`postbacks-http` and `clicks` drive the app as served, as ASGI without a socket (_asgi_caller),
and count the process's CPU (the event loop's thread, the thread pool's, the caller's). Their
`--profile` profiles the event loop's thread with what the app hands to the thread pool run
inline there, so one profile holds the whole request (middleware, routing, access, validation,
route, command, answer); `--inline` measures that way without the profiler: the difference with a
plain run is the hop to the thread pool. `--profile-out F` also writes the profile for pstats.
The first 50 postbacks, and the first 5 batches of the other workloads, warm caches and are not
counted. Nothing here is used by the platform.
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

from sqlalchemy import event as sa_event, func, select

WARMUP = 50
PROFILE_OUT: str | None = None  # --profile-out
NOW = datetime(2026, 11, 28, 12, 0, tzinfo=timezone.utc)


def _statements(engine) -> list[int]:
    count = [0]

    def counted(*_args, **_kw):
        count[0] += 1
    sa_event.listen(engine, "before_cursor_execute", counted)
    return count


def _measure(label: str, count: int, run, statements: list[int], profile: bool, warmup: int = WARMUP,
             cpu_clock=time.thread_time, profiling=None) -> dict:
    """`cpu_clock`: this thread's CPU by default; time.process_time when the work runs in other
    threads too (a sync route runs in the thread pool). `profiling`: (enable, disable) of the
    profiler in the thread that does the work (the ASGI modes': _asgi_caller), instead of this one."""
    for i in range(warmup):
        run(-1 - i)
    profiler = cProfile.Profile(time.thread_time) if profile else None  # CPU, not fsync waits
    enable, disable = profiling or (cProfile.Profile.enable, cProfile.Profile.disable)
    before_sql = statements[0]
    started, wall = cpu_clock(), time.perf_counter()
    if profiler:
        enable(profiler)
    for i in range(count):
        run(i)
    if profiler:
        disable(profiler)
    cpu, wall = cpu_clock() - started, time.perf_counter() - wall
    result = {"what": label, "items": count, "cpu_ms_per_item": round(cpu * 1000 / count, 3),
              "wall_ms_per_item": round(wall * 1000 / count, 3),
              "sql_statements_per_item": round((statements[0] - before_sql) / count, 2)}
    print(result)
    if profiler:
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(35)
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
        if PROFILE_OUT:
            profiler.dump_stats(PROFILE_OUT)  # for pstats or snakeviz: callers, callees
    return result


def _conversiones_knowing_a_link(scratch: str, **settings):
    """The conversiones service (app, runtime, registry) on a scratch SQLite, knowing campaign k1
    (active, a landing URL), affiliate a1 and its enrolment with link `linkcodea1`."""
    from alpes.conversiones import reference
    from alpes.kernel.codec import SchemaRegistry
    from alpes.kernel.messages import IncomingEvent
    from alpes.settings import Settings

    registry = SchemaRegistry.from_directory()

    def incoming(event_type: str, payload: dict, version: int) -> IncomingEvent:
        data, _ = registry.encode(event_type, payload, version)
        return IncomingEvent("marketing.eventos", "conversiones-consumer", f"{event_type}-{version}", event_type,
                             version, payload.get("id", ""), payload["timestamp"], "c", "c",
                             registry.decode(event_type, data, version), data)

    app, runtime = import_module("alpes.conversiones.service").build(
        Settings(data_dir=Path(scratch), broker_url="pulsar://127.0.0.1:1", **settings))
    with runtime.db.transaction() as session:
        reference.learn_campana(session, incoming("CampanaCreada", {
            "id": "k1", "nombre": "n", "porcentaje_comision": Decimal("10"), "moneda": "EUR", "timestamp": NOW,
            "landing_url": "https://shop.example.com/v?utm_source=alpes", "fecha_inicio": NOW - timedelta(days=365),
            "fecha_fin": NOW + timedelta(days=3650)}, 2))
        reference.learn_afiliado(session, incoming("AfiliadoHabilitado", {"afiliado_id": "a1", "timestamp": NOW}, 2))
        reference.learn_inscripcion(session, incoming("AfiliadoInscrito", {
            "inscripcion_id": "i1", "campana_id": "k1", "afiliado_id": "a1", "link_code": "linkcodea1",
            "timestamp": NOW}, 1))
    return app, runtime, registry


def _new_postback(runtime, store, i: int) -> str:
    """`receive_postback` of a new order id `o<i>` for campaign k1 and affiliate a1, with an IP, an
    email and a caller key (velocity never trips); returns the conversion's status."""
    from alpes.conversiones import commands

    _id, _created, status = commands.receive_postback(
        runtime, store, affiliate_id="a1", campaign_id="k1", click_id=None, user_id=f"u{i}",
        conversion_value=Decimal("80.00"), conversion_type="sale", currency="EUR", order_id=f"o{i}",
        ip=f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}", customer_email=f"c{i}@example.com",
        now=datetime.now(timezone.utc), grace=timedelta(minutes=5), max_conversions_per_ip=5,
        caller_key=f"key:{i % 7}", max_conversions_per_caller=10**9)
    return status


def postbacks(count: int, profile: bool) -> None:
    from alpes.conversiones import commands, records

    with tempfile.TemporaryDirectory() as scratch:
        _app, runtime, registry = _conversiones_knowing_a_link(scratch)
        store = records.event_store(registry)
        statements = _statements(runtime.db.engine)
        statuses: dict[str, int] = {}

        def run(i: int) -> None:
            status = _new_postback(runtime, store, i)
            statuses[status] = statuses.get(status, 0) + 1
        _measure("postback (receive_postback)", count, run, statements, profile)
        print("statuses:", statuses)
        runtime.db.dispose()


def postbacks_threads(count: int, threads: int, busy: int, switch_interval: float | None) -> None:
    import sys
    import threading

    from alpes.bench.measure import latency_summary_ms
    from alpes.conversiones import records

    if switch_interval is not None:
        sys.setswitchinterval(switch_interval)
    with tempfile.TemporaryDirectory() as scratch:
        _app, runtime, registry = _conversiones_knowing_a_link(scratch)
        store = records.event_store(registry)

        for i in range(WARMUP):
            _new_postback(runtime, store, -1 - i)
        committer = runtime.db.committer
        batches, units = committer.batches, committer.units
        latencies: list[float] = []
        stop = threading.Event()

        def spin() -> None:
            while not stop.is_set():
                sum(range(1000))

        def post(first: int) -> None:
            for i in range(first, count, threads):
                started = time.perf_counter()
                _new_postback(runtime, store, i)
                latencies.append(time.perf_counter() - started)
        spinners = [threading.Thread(target=spin, daemon=True) for _ in range(busy)]
        workers = [threading.Thread(target=post, args=(k,)) for k in range(threads)]
        for thread in spinners:
            thread.start()
        cpu, wall = time.process_time(), time.perf_counter()
        for thread in workers:
            thread.start()
        for thread in workers:
            thread.join()
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        stop.set()
        print({"what": "postbacks (receive_postback) from threads", "threads": threads, "busy_threads": busy,
               "switch_interval_s": round(sys.getswitchinterval(), 6), "items": count,
               "postbacks_per_s": round(count / wall, 1),
               # The busy threads' CPU is in it: compare runs with the same --busy.
               "process_cpu_ms_per_item": round(cpu * 1000 / count, 3),
               "units_per_commit": round((committer.units - units) / max(1, committer.batches - batches), 2),
               "latency_ms": latency_summary_ms(latencies)})
        runtime.db.dispose()


def saga_answers(count: int, profile: bool) -> None:
    """Marketing's answer to each conversion (ComisionRegistrada) through conversiones'
    conversiones-consumer, in batches of 100 as a ConsumerWorker hands them: the saga completes."""
    from alpes.conversiones import commands, records, tables
    from alpes.kernel.inbox import InboxProcessor
    from alpes.kernel.messages import IncomingEvent

    batch = 100
    batches = max(1, count // batch)
    with tempfile.TemporaryDirectory() as scratch:
        _app, runtime, registry = _conversiones_knowing_a_link(scratch)
        store = records.event_store(registry)
        conversions = []
        for i in range((batches + 5) * batch):  # each detected and validated: its saga waits on marketing
            conversion_id, _created, status = commands.receive_postback(
                runtime, store, affiliate_id="a1", campaign_id="k1", click_id=None, user_id=f"u{i}",
                conversion_value=Decimal("80.00"), conversion_type="sale", currency="EUR", order_id=f"o{i}", ip=None,
                customer_email=None, now=datetime.now(timezone.utc), grace=timedelta(minutes=5),
                max_conversions_per_ip=5)
            conversions.append(conversion_id)
        specs = {(s.topic, s.subscription): s for s in runtime.consumer_specs}
        consumer = InboxProcessor(runtime.db, runtime.inbox_table, runtime.outbox, "conversiones-consumer",
                                  specs[("marketing.eventos", "conversiones-consumer")].handlers)
        statements = _statements(runtime.db.engine)

        def answers(i: int) -> list[IncomingEvent]:
            start = (i + 5) * batch if i >= 0 else (-1 - i) * batch  # 5 warm-up batches first
            events = []
            for conversion_id in conversions[start:start + batch]:
                payload = {"comision_id": f"k-{conversion_id}", "conversion_id": conversion_id, "afiliado_id": "a1",
                           "campana_id": "k1", "monto": Decimal("8.00"), "moneda": "EUR", "limitado_por": None,
                           "timestamp": NOW}
                events.append(IncomingEvent("marketing.eventos", "conversiones-consumer", f"r-{conversion_id}",
                                            "ComisionRegistrada", 1, conversion_id, NOW, conversion_id, conversion_id,
                                            payload))
            return events

        def answer_batch(i: int) -> None:
            verdicts = consumer.process(answers(i))
            assert all(v is None for v in verdicts.values()), verdicts
        _measure_batches("conversiones-consumer (note_commission_booked)", batches, batch, answer_batch, statements,
                         profile)
        with runtime.db.read() as session:
            states = dict(session.execute(select(tables.sagas.c.estado, func.count())
                                          .group_by(tables.sagas.c.estado)).all())
        print("sagas:", states)
        runtime.db.dispose()


def audit(count: int, profile: bool, batch: int = 200) -> None:
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
        with db.read() as session:  # one EventosAuditados per audit batch, naming its records
            announced = session.execute(select(tables.outbox.c.event_id, tables.outbox.c.payload)
                                        .order_by(tables.outbox.c.id)).all()
        notices = [IncomingEvent("auditoria.eventos", "compliance-consumer", row.event_id, "EventosAuditados", 1,
                                 "k", NOW, "c", "c", registry.decode("EventosAuditados", row.payload, 1))
                   for row in announced]

        def verify_batch(i: int) -> None:  # a consumer batch: one announcement of `batch` records
            index = i + 5 if i >= 0 else -1 - i  # 5 warm-up batches first
            verdicts = compliance.process(notices[index:index + 1])
            assert all(v is None for v in verdicts.values()), verdicts
        _measure_batches("compliance-consumer (verify_audited_links)", min(batches, len(notices) - 5),
                         batch, verify_batch, statements, profile)
        with db.read() as session:
            state = session.execute(select(tables.compliance_state)).mappings().one()
        print("compliance:", dict(state))
        db.dispose()


def commissions(count: int, profile: bool, caps: bool) -> None:
    from alpes.kernel.codec import SchemaRegistry
    from alpes.kernel.inbox import InboxProcessor
    from alpes.kernel.messages import IncomingEvent
    from alpes.marketing import domain, tables
    from alpes.settings import Settings

    batch = 100  # conversions: 200 conversiones.eventos messages, a ConsumerWorker's batch
    with tempfile.TemporaryDirectory() as scratch:
        settings = Settings(data_dir=Path(scratch), broker_url="pulsar://127.0.0.1:1")
        _app, runtime = import_module("alpes.marketing.service").build(settings)
        registry: SchemaRegistry = runtime.registry
        with runtime.db.transaction() as session:
            session.execute(tables.campanas.insert().values(
                id="k1", nombre="n", porcentaje_comision=Decimal("10"), moneda="EUR", estado=domain.ACTIVA,
                creada_en=NOW - timedelta(days=365), fecha_inicio=NOW - timedelta(days=365),
                fecha_fin=NOW + timedelta(days=3650), landing_url="https://shop.example.com/v",
                presupuesto=Decimal("100000000.00") if caps else None))
            session.execute(tables.afiliados.insert().values(afiliado_id="a1", estado=domain.HABILITADO,
                                                             actualizado_en=NOW))
            if caps:
                session.execute(tables.reglas_comision.insert().values(
                    campana_id="k1", version=1, vigente_desde=NOW - timedelta(days=30), tope_monto=Decimal("1000000"),
                    tope_periodo="mes", reglas='[{"tipo": "cps", "monto": null, "porcentaje": "12", '
                                               '"conversion_type": null, "afiliado_id": null, "min_aprobadas": null}]'))
        specs = {(s.topic, s.subscription): s for s in runtime.consumer_specs}
        consumers = {name: InboxProcessor(runtime.db, runtime.inbox_table, runtime.outbox, name,
                                          specs[(topic, name)].handlers)
                     for topic, name in (("conversiones.eventos", "marketing-consumer"),
                                         ("conversiones.eventos", "analytics-consumer"),
                                         ("comisiones.eventos", "reporting-consumer"),
                                         ("comisiones.eventos", "payment-consumer"))}
        statements = _statements(runtime.db.engine)
        spent = {name: [0.0, 0] for name in consumers}
        outbox_seen = [0]

        def conversion_events(i: int) -> list[IncomingEvent]:
            events = []
            for n in range(batch):
                k = f"cv-{i}-{n}"
                at = datetime.now(timezone.utc)
                detected = {"conversion_id": k, "affiliate_id": "a1", "campaign_id": "k1", "user_id": f"u{k}",
                            "conversion_value": Decimal("80.00"), "conversion_type": "sale", "timestamp": at,
                            "order_id": f"o{k}", "currency": "EUR"}
                validated = {"conversion_id": k, "affiliate_id": "a1", "campaign_id": "k1",
                             "conversion_value": Decimal("80.00"), "currency": "EUR", "conversion_type": "sale",
                             "timestamp": at, "click_id": None, "converted_at": at}
                for event_type, payload in (("ConversionDetected", detected), ("ConversionValidated", validated)):
                    events.append(IncomingEvent("conversiones.eventos", "", f"{event_type}-{k}", event_type, 2, k,
                                                at, k, k, payload))
            return events

        def emitted_commissions() -> list[IncomingEvent]:
            """What the relay would publish on comisiones.eventos since the last call, decoded."""
            o = tables.outbox
            with runtime.db.read() as session:
                rows = session.execute(select(o).where(o.c.id > outbox_seen[0], o.c.topic == "comisiones.eventos")
                                       .order_by(o.c.id)).mappings().all()
                outbox_seen[0] = session.scalar(select(func.max(o.c.id))) or 0
            return [IncomingEvent(r["topic"], "", r["event_id"], r["event_type"], r["schema_version"],
                                  r["partition_key"], r["occurred_at"], r["correlation_id"], r["causation_id"],
                                  registry.decode(r["event_type"], r["payload"], r["schema_version"]), r["payload"])
                    for r in rows]

        def feed(name: str, events: list[IncomingEvent], counted: bool) -> None:
            before_cpu, before_sql = time.thread_time(), statements[0]
            verdicts = consumers[name].process(events)
            if counted:
                spent[name][0] += time.thread_time() - before_cpu
                spent[name][1] += statements[0] - before_sql
            assert all(v is None for v in verdicts.values()), verdicts

        def run(i: int) -> None:
            counted = i >= 0
            events = conversion_events(i)
            feed("marketing-consumer", events, counted)
            feed("analytics-consumer", events, counted)
            commissions = emitted_commissions()
            assert len(commissions) == batch, len(commissions)
            feed("reporting-consumer", commissions, counted)
            feed("payment-consumer", commissions, counted)

        batches = max(1, count // batch)
        for i in range(5):  # warm-up batches, not counted
            run(-1 - i)
        profiler = cProfile.Profile(time.thread_time) if profile else None  # CPU, not fsync waits
        if profiler:
            profiler.enable()
        for i in range(batches):
            run(i)
        if profiler:
            profiler.disable()
        conversions = batches * batch
        for name, (cpu, sql) in spent.items():
            print({"what": name, "cpu_ms_per_conversion": round(cpu * 1000 / conversions, 4),
                   "sql_statements_per_conversion": round(sql / conversions, 3)})
        print({"what": "all four consumers", "conversions": conversions, "caps": caps,
               "cpu_ms_per_conversion": round(sum(c for c, _ in spent.values()) * 1000 / conversions, 4),
               "sql_statements_per_conversion": round(sum(s for _, s in spent.values()) / conversions, 3)})
        if profiler:
            pstats.Stats(profiler).sort_stats("cumulative").print_stats(40)
            pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
        k = tables.comisiones
        with runtime.db.read() as session:
            booked = session.execute(select(func.count(), func.sum(k.c.monto))).one()
            ledger = session.scalar(select(func.count()).select_from(tables.ledger_pagos))
        print({"commissions": booked[0], "amount": str(booked[1]), "ledger_rows": ledger})
        runtime.db.dispose()


def clicks(count: int, profile: bool, inline: bool = False) -> None:
    """GET /r/{code} through the conversiones app as served (every middleware, the access rules,
    the route), called as ASGI without a socket (_asgi_caller), as new visitors; the service as when
    running, so clicks wait in memory, and their batches (75 clicks, the ~75 ms of waiting at
    1,000/s) are written too. The process's CPU per click."""
    with tempfile.TemporaryDirectory() as scratch:
        app, runtime, _registry = _conversiones_knowing_a_link(scratch, auth="required",
                                                               rate_limit_clicks_per_ip=10**9)
        runtime.started_at = time.time()  # running (clicks wait in memory), without broker or jobs
        [job] = [j for j in runtime.jobs if j.name == "record-clicks"]
        recorder = job.run.__self__
        statements = _statements(runtime.db.engine)
        call = _asgi_caller(app, inline)
        headers = [(b"user-agent", b"Mozilla/5.0 (bench)"), (b"referer", b"https://blog.example.org/post")]
        statuses: dict[int, int] = {}

        def run(i: int) -> None:
            status = call("GET", "/r/linkcodea1", headers)
            statuses[status] = statuses.get(status, 0) + 1
            if i % 75 == 74:
                recorder.flush(force=True)
        _measure("click (GET /r/{code}, ASGI in-process, batches written)", count, run, statements, profile,
                 cpu_clock=time.process_time, profiling=call.profiling)
        recorder.flush(force=True)
        print("statuses:", statuses)
        runtime.db.dispose()


def _asgi_caller(app, inline: bool = False):
    """Call `app` as ASGI without a socket: (method, path, headers, body) -> status. Its event loop
    runs in a thread of its own under one long-lived task, as under uvicorn (anyio keeps its
    thread-pool workers while that root task lives; one run_until_complete per request would start
    a new worker thread for every request). Measure with time.process_time.

    `call.profiling` is the (enable, disable) pair _measure takes: the profiler runs in the loop's
    thread, and while it does, what the app would hand to the thread pool runs inline on the loop
    (anyio.to_thread.run_sync replaced), so one profile holds the whole request: the server side
    as served, the route, the command. The hop itself is then missing from the profile: `inline`
    runs so without profiling, to measure it by difference."""
    import asyncio
    import threading

    import anyio.to_thread

    loop = asyncio.new_event_loop()
    started = threading.Event()

    async def forever() -> None:
        started.set()
        await asyncio.Event().wait()
    threading.Thread(target=loop.run_until_complete, args=(forever(),), daemon=True).start()
    started.wait()

    def call(method: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes = b"") -> int:
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
                 "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
                 "server": ("127.0.0.1", 8002), "client": ("203.0.113.9", 40000),
                 "headers": [(b"host", b"127.0.0.1:8002"), *headers]}
        status = []

        async def receive() -> dict:
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
        asyncio.run_coroutine_threadsafe(app(scope, receive, send), loop).result()
        return status[0]

    pooled = anyio.to_thread.run_sync

    async def on_loop(func, *args, **_options):
        return func(*args)

    def in_loop(action) -> None:
        async def act() -> None:
            action()
        asyncio.run_coroutine_threadsafe(act(), loop).result()

    def enable(profiler: cProfile.Profile) -> None:
        anyio.to_thread.run_sync = on_loop
        in_loop(profiler.enable)

    def disable(profiler: cProfile.Profile) -> None:
        in_loop(profiler.disable)
        anyio.to_thread.run_sync = on_loop if inline else pooled
    if inline:  # --inline: the whole run without the thread pool
        anyio.to_thread.run_sync = on_loop
    call.profiling = (enable, disable)
    return call


def postbacks_http(count: int, profile: bool, inline: bool = False) -> None:
    """POST /conversiones through the conversiones app as served (every middleware, an operator's
    API key, the body's strict model, the route, the command), as ASGI without a socket
    (_asgi_caller): what the `postbacks` mode measures plus the HTTP layer. The process's CPU."""
    import json

    from alpes.kernel.access import ALL_SCOPES, KeyRing, generate_key
    from alpes.kernel.messages import IncomingEvent

    with tempfile.TemporaryDirectory() as scratch:
        app, runtime, _registry = _conversiones_knowing_a_link(scratch, auth="required",
                                                               rate_limit_postbacks_per_key=10**9,
                                                               rate_limit_postbacks_per_ip=10**9,
                                                               max_conversions_per_caller=10**9)
        key, now = generate_key("operator"), datetime.now(timezone.utc)
        tables = import_module("alpes.conversiones.tables")
        with runtime.db.transaction() as session:
            KeyRing(tables.claves_api).learn_issued(session, IncomingEvent(
                "marketing.eventos", "profile", key.key_id, "ClaveApiEmitida", 1, key.key_id, now, key.key_id,
                key.key_id, {"key_id": key.key_id, "digest": key.digest, "rol": "operator", "anunciante_id": None,
                             "afiliado_id": None, "scopes": sorted(ALL_SCOPES),
                             "nombre": None, "expira_en": None, "timestamp": now}))
        call = _asgi_caller(app, inline)
        headers = [(b"authorization", f"Bearer {key.key}".encode()), (b"content-type", b"application/json")]
        statements = _statements(runtime.db.engine)
        statuses: dict[int, int] = {}

        def run(i: int) -> None:
            body = json.dumps({"affiliate_id": "a1", "campaign_id": "k1", "user_id": f"u{i}",
                               "conversion_value": "80.00", "conversion_type": "sale", "currency": "EUR",
                               "order_id": f"o{i}", "ip": f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}",
                               "customer_email": f"c{i}@example.com"}).encode()
            status = call("POST", "/conversiones", headers + [(b"content-length", str(len(body)).encode())], body)
            statuses[status] = statuses.get(status, 0) + 1
        _measure("postback (POST /conversiones, ASGI in-process)", count, run, statements, profile,
                 cpu_clock=time.process_time, profiling=call.profiling)
        print("statuses:", statuses)
        runtime.db.dispose()


def _measure_batches(label, batches, batch, run, statements, profile):
    result = _measure(label + f" per batch of {batch}", batches, run, statements, profile, warmup=5)
    print({"what": label, "cpu_ms_per_event": round(result["cpu_ms_per_item"] / batch, 4),
           "sql_statements_per_event": round(result["sql_statements_per_item"] / batch, 3)})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("workload", choices=["postbacks", "postbacks-threads", "postbacks-http", "saga-answers", "audit", "commissions",
                                             "clicks"])
    parser.add_argument("--count", type=int, default=0)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--inline", action="store_true",
                        help="postbacks-http, clicks: what the app hands to the thread pool runs on the loop")
    parser.add_argument("--profile-out", help="with --profile: also write the profile (pstats format) to this file")
    parser.add_argument("--caps", action="store_true", help="commissions: a campaign budget and a capped rule set")
    parser.add_argument("--batch", type=int, default=200, help="audit: events per consumer batch")
    parser.add_argument("--threads", type=int, default=32, help="postbacks-threads: threads posting at once")
    parser.add_argument("--busy", type=int, default=0, help="postbacks-threads: threads that only run Python")
    parser.add_argument("--switch-interval", type=float, default=None,
                        help="postbacks-threads: sys.setswitchinterval, in seconds")
    args = parser.parse_args()
    global PROFILE_OUT
    PROFILE_OUT = args.profile_out
    if args.workload == "postbacks":
        postbacks(args.count or 2000, args.profile)
    elif args.workload == "postbacks-threads":
        postbacks_threads(args.count or 3000, args.threads, args.busy, args.switch_interval)
    elif args.workload == "postbacks-http":
        postbacks_http(args.count or 2000, args.profile, args.inline)
    elif args.workload == "clicks":
        clicks(args.count or 20000, args.profile, args.inline)
    elif args.workload == "saga-answers":
        saga_answers(args.count or 5000, args.profile)
    elif args.workload == "commissions":
        commissions(args.count or 5000, args.profile, args.caps)
    else:
        audit(args.count or 10000, args.profile, args.batch)


if __name__ == "__main__":
    main()
