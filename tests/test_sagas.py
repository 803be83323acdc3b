"""The conversion → commission saga: persisted steps, timeouts, retries and compensation.

conversiones and marketing run in-process on their own databases; a `Pump` carries each outbox
row to every subscription of its topic through the real consumer wiring (InboxProcessor with the
services' own handler maps), the way the broker would, and can hold a service's deliveries back
(a stopped service) or lose one message (a dead-lettered one)."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from importlib import import_module

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.exc import DBAPIError

from alpes.conversiones import domain as conv_domain
from alpes.conversiones import projections as conv_projections
from alpes.conversiones import records as conv_records
from alpes.conversiones import saga
from alpes.conversiones import saga_answers as conv_saga_answers
from alpes.conversiones import tables as conv_tables
from alpes.kernel.access import SYSTEM_PRINCIPAL
from alpes.kernel.codec import SchemaRegistry
from alpes.kernel.db import Database, migrate
from alpes.kernel.inbox import InboxProcessor
from alpes.kernel.messages import IncomingEvent, TransientFailure, new_id, utcnow
from alpes.kernel.outbox import Outbox
from alpes.marketing import domain as mk_domain
from alpes.marketing import campaigns as mk_campaigns
from alpes.marketing import commissions as mk_commissions
from alpes.marketing import tables as mk_tables
from alpes.settings import Settings

REGISTRY = SchemaRegistry.from_directory()
NOW = datetime(2026, 11, 28, 12, 0, tzinfo=timezone.utc)
POLICY = saga.SagaPolicy(timedelta(seconds=120), 3)


# -- the rules, without a database ---------------------------------------------------------------------
def _validated() -> conv_domain.Conversion:
    return conv_domain.Conversion.rebuild([
        conv_domain.Detected("c1", "a1", "k1", "u", Decimal("10.00"), "sale", None, "EUR", NOW),
        conv_domain.Validated(NOW + timedelta(seconds=1))])


def test_only_a_validated_conversion_is_compensated_and_then_never_refunded():
    conversion = _validated()
    [rejected] = conv_domain.decide_compensation(conversion, "commission_not_confirmed", NOW)
    assert rejected == conv_domain.Rejected("commission_not_confirmed", NOW, compensation=True)
    conversion.apply(rejected)
    assert (conversion.status, conversion.reason) == ("rejected", "commission_not_confirmed")
    assert conv_domain.decide_compensation(conversion, "commission_not_confirmed", NOW) == []  # the same one
    with pytest.raises(conv_domain.NotRefundable):
        conv_domain.decide_refund(conversion, "reembolso", None, NOW)
    refunded = _validated()
    refunded.apply(conv_domain.Refunded("reembolso", None, NOW))
    held = conv_domain.Conversion.rebuild([_validated().detected, conv_domain.Held("too_fast", NOW)])
    for conversion in (refunded, held):
        with pytest.raises(conv_domain.NotCompensable):
            conv_domain.decide_compensation(conversion, "commission_not_confirmed", NOW)


def test_a_detection_validated_in_the_same_append_logs_what_two_appends_would(tmp_path):
    """A postback validated at once appends both events together; its saga log (written in fewer
    statements) must be the one the two appends, one after the other, leave."""
    from alpes.kernel.eventstore import StoredEvent

    logs = []
    for together in (True, False):
        url = f"sqlite:///{tmp_path / f'together-{together}.db'}"
        migrate(url, "alpes.conversiones:migrations")
        db = Database(url)
        detected = StoredEvent("c1", 1, "e1", "ConversionDetected", 2, {
            "conversion_id": "c1", "conversion_value": Decimal("10.00"), "currency": "EUR"}, NOW, "c1")
        validated = StoredEvent("c1", 2, "e2", "ConversionValidated", 2, {"conversion_id": "c1"}, NOW, "c1")
        with db.transaction() as session:
            for stored in ([detected, validated],) if together else ([detected], [validated]):
                saga.record_events(session, stored, NOW)
        with db.read() as session:
            s, p = conv_tables.sagas, conv_tables.saga_pasos
            logs.append((session.execute(select(s)).mappings().all(),
                         session.execute(select(p).order_by(p.c.id)).mappings().all()))
        db.dispose()
    assert logs[0] == logs[1]
    [row] = logs[0][0]
    assert (row["estado"], row["paso_actual"], row["intentos"]) == (saga.RUNNING, saga.COMMISSION, 1)
    assert [(r["paso"], r["estado"]) for r in logs[0][1]] == [
        (saga.DETECTION, saga.DONE), (saga.VALIDATION, saga.DONE), (saga.COMMISSION, saga.WAITING)]


def test_a_timeout_retries_until_the_last_attempt_then_is_stuck_and_backs_off():
    assert [saga.on_timeout(n, POLICY) for n in (1, 2, 3, 4, 5)] == ["retry", "retry", "retry", "stuck", "stuck"]
    assert saga.on_timeout(1, saga.SagaPolicy(timedelta(seconds=1), 0)) == "stuck"
    # The planned requests wait the timeout; stuck, each further one twice as long, up to the cap.
    assert [saga.wait_after(n, POLICY).total_seconds() for n in range(1, 9)] == \
        [120, 120, 120, 120, 240, 480, 600, 600]
    assert saga.wait_after(10**6, POLICY) == POLICY.max_backoff
    small_cap = saga.SagaPolicy(timedelta(seconds=120), 0, max_backoff=timedelta(seconds=30))
    assert saga.wait_after(5, small_cap) == timedelta(seconds=120)  # never shorter than the timeout
    assert saga.compensation_reason("afiliado_suspendido_durante_proceso") == "affiliate_suspended_during_processing"
    assert saga.compensation_reason("otra") == "commission_denied:otra"


# -- two services in-process, connected by a pump ------------------------------------------------------
class Pump:
    """Delivers outbox rows to the consumers of both services, in outbox order per source."""

    def __init__(self, **runtimes) -> None:
        self.runtimes = runtimes
        self.cursor: dict[tuple[str, str, str], int] = {}
        self.held: set[str] = set()  # services whose consumers receive nothing (stopped)
        self.lose: set[str] = set()  # event types dropped once on their way (dead-lettered)

    def inject(self, topic: str, event_type: str, key: str, payload: dict) -> None:
        event_id = new_id()
        self._deliver(topic, event_type, 1, key, event_id, event_id, event_id, payload)

    def run(self) -> int:
        """Deliver until nothing moves; returns how many messages were delivered."""
        delivered = 0
        while True:
            moved = 0
            for source, runtime in self.runtimes.items():
                t = runtime.outbox.table
                with runtime.db.read() as session:
                    rows = session.execute(select(t).order_by(t.c.id)).mappings().all()
                for row in rows:
                    moved += self._deliver_row(source, row)
            delivered += moved
            if not moved:
                return delivered

    def _deliver_row(self, source: str, row) -> int:
        moved = 0
        for name, runtime in self.runtimes.items():
            if name in self.held:
                continue
            for spec in runtime.consumer_specs:
                key = (source, name, spec.subscription + "@" + spec.topic)
                if spec.topic != row["topic"] or self.cursor.get(key, 0) >= row["id"]:
                    continue
                self.cursor[key] = row["id"]
                if row["event_type"] in self.lose:
                    continue
                payload = REGISTRY.decode(row["event_type"], row["payload"], row["schema_version"])
                self._process(runtime, spec, IncomingEvent(
                    row["topic"], spec.subscription, row["event_id"], row["event_type"], row["schema_version"],
                    row["partition_key"], row["occurred_at"], row["correlation_id"], row["causation_id"], payload))
                moved += 1
        return moved

    def _deliver(self, topic, event_type, version, key, event_id, correlation_id, causation_id, payload) -> None:
        for runtime in self.runtimes.values():
            for spec in runtime.consumer_specs:
                if spec.topic == topic:
                    self._process(runtime, spec, IncomingEvent(topic, spec.subscription, event_id, event_type, version,
                                                               key, utcnow(), correlation_id, causation_id, payload))

    @staticmethod
    def _process(runtime, spec, event: IncomingEvent) -> None:
        processor = InboxProcessor(runtime.db, runtime.inbox_table, runtime.outbox, spec.subscription, spec.handlers)
        verdict = processor.process([event])[event.event_id]
        assert verdict is None, f"{spec.subscription} failed on {event.event_type}: {verdict}"


class Flow:
    def __init__(self, tmp_path, **env) -> None:
        self.clients, self.runtimes = {}, {}
        for name in ("conversiones", "marketing"):
            settings = Settings(data_dir=tmp_path / name, broker_url="pulsar://127.0.0.1:1", **env)
            app, runtime = import_module(f"alpes.{name}.service").build(settings)
            self.clients[name], self.runtimes[name] = TestClient(app), runtime  # no lifespan: no relay, no jobs
        self.pump = Pump(**self.runtimes)
        self.conv, self.mk = self.clients["conversiones"], self.clients["marketing"]
        self.store = conv_records.event_store(REGISTRY)
        self.affiliate = self.enable_affiliate()
        self.campaign = self.create_campaign()

    def enable_affiliate(self) -> str:
        afiliado = new_id()
        self.pump.inject("afiliados.eventos", "AfiliadoValidado", afiliado, {"id": afiliado, "timestamp": NOW})
        self.pump.run()
        return afiliado

    def create_campaign(self, **terms) -> str:
        response = self.mk.post("/campanas", json={"nombre": "Programa", "porcentaje_comision": "10",
                                                   "periodo_bloqueo_dias": 0, **terms})
        assert response.status_code == 201, response.text
        self.pump.run()
        return response.json()["id"]

    def postback(self, value: str = "80.00", affiliate: str | None = None, campaign: str | None = None) -> str:
        body = self.conv.post("/conversiones", json={
            "affiliate_id": affiliate or self.affiliate, "campaign_id": campaign or self.campaign, "user_id": "cliente",
            "conversion_value": value, "conversion_type": "sale"}).json()
        assert body["status"] == "validated", body
        return body["id"]

    def saga(self, conversion_id: str) -> dict:
        response = self.conv.get(f"/sagas/{conversion_id}")
        assert response.status_code == 200, response.text
        return response.json()

    def steps(self, conversion_id: str) -> list[tuple[str, str]]:
        return [(s["paso"], s["estado"]) for s in self.saga(conversion_id)["pasos"]]

    def commissions(self, conversion_id: str) -> list[dict]:
        k = mk_tables.comisiones
        with self.runtimes["marketing"].db.read() as session:
            return [dict(r) for r in session.execute(select(k).where(k.c.conversion_id == conversion_id)).mappings()]

    def marketing_types(self, *types: str) -> list[str]:
        t = self.runtimes["marketing"].outbox.table
        with self.runtimes["marketing"].db.read() as session:
            return list(session.scalars(select(t.c.event_type).where(t.c.event_type.in_(types)).order_by(t.c.id)))

    def expire(self, after: timedelta, policy: saga.SagaPolicy = POLICY) -> int:
        runtime = self.runtimes["conversiones"]
        return conv_saga_answers.expire_sagas(runtime.db, self.store, runtime.outbox, policy, now=utcnow() + after)

    def analytics(self) -> tuple[int, int, Decimal]:
        a = mk_tables.analitica_conversiones
        with self.runtimes["marketing"].db.read() as session:
            row = session.execute(select(func.sum(a.c.validadas), func.sum(a.c.rechazadas),
                                         func.sum(a.c.ingresos))).one()
        return int(row[0]), int(row[1]), Decimal(row[2])

    def figures(self) -> tuple[int, int, Decimal]:
        f = conv_tables.conversion_figures
        with self.runtimes["conversiones"].db.read() as session:
            row = session.execute(select(func.sum(f.c.validated), func.sum(f.c.rejected),
                                         func.sum(f.c.validated_revenue))).one()
        return int(row[0]), int(row[1]), Decimal(row[2])

    def close(self) -> None:
        for runtime in self.runtimes.values():
            runtime.db.dispose()


@pytest.fixture
def flow(tmp_path):
    running = Flow(tmp_path)
    yield running
    running.close()


def test_a_commission_booked_completes_the_saga_with_each_step_shown(flow):
    conversion_id = flow.postback("80.00")
    running = flow.saga(conversion_id)
    assert (running["estado"], running["paso_actual"], running["intentos"], running["terminal"]) == \
        ("running", "commission", 1, False)
    assert running["deadline"] is not None and running["correlation_id"] == conversion_id
    flow.pump.run()
    done = flow.saga(conversion_id)
    assert (done["estado"], done["resultado"], done["terminal"], done["deadline"]) == \
        ("completed", "commission_booked", True, None)
    assert [(s["paso"], s["estado"]) for s in done["pasos"]] == [
        ("detection", "done"), ("validation", "done"), ("commission", "done")]
    [comision] = flow.commissions(conversion_id)
    assert comision["monto"] == Decimal("8.00") and comision["id"] in done["pasos"][-1]["detalle"]
    assert all(s["started_at"] and s["finished_at"] for s in done["pasos"])
    assert flow.conv.get("/sagas", params={"estado": "completed"}).json()["sagas"][0]["saga_id"] == conversion_id
    assert flow.conv.get("/sagas", params={"estado": "running"}).json()["sagas"] == []
    assert flow.conv.get("/sagas/no-such-id").status_code == 404
    assert flow.conv.get("/sagas", params={"estado": "nope"}).status_code == 422


def _answer(event_type: str, conversion_id: str, **payload) -> IncomingEvent:
    if event_type == "ComisionRegistrada":
        payload = {"comision_id": f"k-{conversion_id}", "conversion_id": conversion_id, "afiliado_id": "a",
                   "campana_id": "k", "monto": Decimal("8.00"), "moneda": "EUR", "limitado_por": None,
                   "timestamp": NOW, **payload}
    elif event_type == "ComisionDenegada":
        payload = {"conversion_id": conversion_id, "afiliado_id": "a", "campana_id": "k", "razon": "presupuesto_agotado",
                   "timestamp": NOW}
    else:
        payload = {"comision_id": f"k-{conversion_id}", "conversion_id": conversion_id, "monto": Decimal("8.00"),
                   "moneda": "EUR", "estado_anterior": "pendiente", "motivo": "compensacion", "detalle": None,
                   "ajuste_monto": None, "timestamp": NOW}
    event_id = new_id()
    return IncomingEvent("marketing.eventos", "conversiones-consumer", event_id, event_type, 1, conversion_id, NOW,
                         conversion_id, event_id, payload)


def test_a_batch_of_marketing_answers_leaves_the_saga_log_answers_one_by_one_leave(tmp_path):
    """conversiones notes a consumer batch's booked answers together at its end (answers_batch):
    every saga must end as the same answers, handled one at a time, leave it, whatever the saga's
    state (running, stuck, compensated, completed, unknown), with a second answer for one
    conversion and a denial and a reversal behind a booking in the same batch; and the usual
    answers take a fixed number of statements, not four each."""
    from sqlalchemy import event as sa_event

    logs = []
    for together in (True, False):
        flow = Flow(tmp_path / f"together-{together}")
        try:
            runtime = flow.runtimes["conversiones"]
            roles = {role: flow.postback() for role in (
                "run1", "run2", "run3", "run4", "stuck", "compensated", "done", "u1", "u2", "u3", "u4", "u5", "u6")}
            roles["unknown"] = new_id()
            with runtime.db.transaction() as session:
                saga.record_stuck(session, roles["stuck"], 4, POLICY, NOW)
            [spec] = [s for s in runtime.consumer_specs if s.subscription == "conversiones-consumer"]
            processor = InboxProcessor(runtime.db, runtime.inbox_table, runtime.outbox, spec.subscription, spec.handlers)
            for setup in (_answer("ComisionDenegada", roles["compensated"]), _answer("ComisionRegistrada", roles["done"])):
                assert processor.process([setup]) == {setup.event_id: None}
            usual = [_answer("ComisionRegistrada", roles[f"u{i}"]) for i in range(1, 7)]
            batch = [_answer("ComisionRegistrada", roles["run1"]), _answer("ComisionRegistrada", roles["stuck"]),
                     _answer("ComisionRegistrada", roles["compensated"]), _answer("ComisionRegistrada", roles["done"]),
                     _answer("ComisionRegistrada", roles["unknown"]), _answer("ComisionRegistrada", roles["run2"]),
                     _answer("ComisionRegistrada", roles["run2"], comision_id="k-again"),
                     _answer("ComisionRegistrada", roles["run3"]), _answer("ComisionDenegada", roles["run3"]),
                     _answer("ReversionComisionRegistrada", roles["run1"]), _answer("ComisionRegistrada", roles["run4"])]
            if together:
                statements = []
                listener = lambda *args: statements.append(args[2])  # noqa: E731
                sa_event.listen(runtime.db.engine, "before_cursor_execute", listener)
                try:
                    assert processor.process(usual) == {e.event_id: None for e in usual}
                finally:
                    sa_event.remove(runtime.db.engine, "before_cursor_execute", listener)
                # the inbox's read and insert, the sagas', their waiting steps', the steps' and the sagas'
                # updates (one by one: four per answer, 26 in all)
                assert len(statements) <= 8, statements
                verdicts = processor.process(batch)
            else:
                verdicts = {}
                for answer in usual + batch:
                    verdicts |= processor.process([answer])
                verdicts = {k: v for k, v in verdicts.items() if k not in {e.event_id for e in usual}}
            assert verdicts == {e.event_id: None for e in batch}
            s, p = conv_tables.sagas, conv_tables.saga_pasos
            names = {v: k for k, v in roles.items()}

            def named(text: str) -> str:
                for conversion_id, role in names.items():
                    text = text.replace(conversion_id, role)
                return text

            def plain(row) -> dict:  # roles for the ids, and whether each time is set (not when)
                return {k: named(v) if isinstance(v, str) else (v is not None)
                        if isinstance(v, datetime) or v is None else v for k, v in row.items() if k != "id"}

            with runtime.db.read() as session:
                sagas = {names[r["saga_id"]]: plain(r) for r in session.execute(select(s)).mappings()}
                steps: dict[str, list[dict]] = {}  # each saga's steps in their order
                for r in session.execute(select(p).order_by(p.c.id)).mappings():
                    steps.setdefault(names[r["saga_id"]], []).append(plain(r))
            logs.append((sagas, steps))
        finally:
            flow.close()
    assert logs[0] == logs[1]
    sagas, steps = logs[0]
    assert {role: sagas[role]["estado"] for role in ("run1", "run2", "run4", "u1", "stuck", "compensated", "done")} == {
        "run1": "completed", "run2": "completed", "run4": "completed", "u1": "completed", "stuck": "completed",
        "compensated": "compensated", "done": "completed"}
    assert sagas["run3"]["estado"] == "completed"  # booked, then denied in the same batch: the denial is late
    assert [(st["paso"], st["estado"]) for st in steps["run1"]][-2:] == [("commission", "done"),
                                                                           ("commission_reversal", "done")]


def test_a_rejected_conversion_completes_its_saga_without_asking_for_a_commission(flow):
    body = flow.conv.post("/conversiones", json={"affiliate_id": flow.affiliate, "campaign_id": flow.campaign,
                                                 "user_id": "c", "conversion_value": "5.00", "conversion_type": "sale",
                                                 "currency": "USD"}).json()
    assert body["status"] == "rejected"
    rejected = flow.saga(body["id"])
    assert (rejected["estado"], rejected["resultado"]) == ("completed", "rejected:currency_mismatch")
    assert [(s["paso"], s["estado"]) for s in rejected["pasos"]] == [("detection", "done"), ("validation", "failed")]


def test_affiliate_suspended_between_validation_and_commission_is_compensated(flow):
    """Case 1: conversiones validated while the affiliate was enabled; marketing learns of the suspension
    before the ConversionValidated: no commission, ComisionDenegada, and a compensating rejection."""
    conversion_id = flow.postback("80.00")
    flow.pump.held.add("conversiones")  # conversiones has not heard of the suspension yet
    flow.pump.inject("afiliados.eventos", "AfiliadoSuspendido", flow.affiliate,
                     {"id": flow.affiliate, "motivo": "fraude", "timestamp": NOW})
    flow.pump.held.clear()
    flow.pump.run()
    compensated = flow.saga(conversion_id)
    assert (compensated["estado"], compensated["resultado"]) == \
        ("compensated", "affiliate_suspended_during_processing")
    assert [(s["paso"], s["estado"]) for s in compensated["pasos"]] == [
        ("detection", "done"), ("validation", "done"), ("commission", "failed"), ("compensation", "done")]
    assert "afiliado_suspendido_durante_proceso" in compensated["pasos"][2]["detalle"]
    assert flow.commissions(conversion_id) == []
    conversion = flow.conv.get(f"/conversiones/{conversion_id}").json()
    assert (conversion["status"], conversion["reason"]) == ("rejected", "affiliate_suspended_during_processing")
    # An event, never a silent rollback: the stream keeps the validation and the compensating rejection.
    history = flow.conv.get(f"/conversiones/{conversion_id}/eventos").json()["eventos"]
    assert [e["event_type"] for e in history] == ["ConversionDetected", "ConversionValidated", "ConversionRejected"]
    assert history[-1]["payload"]["compensation"] is True
    assert flow.marketing_types("ComisionDenegada", "ComisionRegistrada", "ComisionCalculada") == ["ComisionDenegada"]
    # Counted once, as rejected, on both sides; a compensated conversion cannot be refunded.
    assert flow.figures() == (0, 1, Decimal("0.00"))
    assert flow.analytics() == (0, 1, Decimal("0.00"))
    assert flow.conv.post(f"/conversiones/{conversion_id}/reembolso", json={}).status_code == 409


def test_refund_before_the_commission_was_computed_books_none(flow):
    """Case 3: the ConversionValidated never reached marketing (dead-lettered); the refund did. The
    saga asks again after its timeout and marketing refuses: nothing is booked, nothing compensated."""
    flow.pump.lose.add("ConversionValidated")
    conversion_id = flow.postback("50.00")
    flow.pump.run()
    flow.pump.lose.clear()
    assert flow.conv.post(f"/conversiones/{conversion_id}/reembolso", json={"tipo": "reembolso"}).status_code == 200
    flow.pump.run()
    assert flow.saga(conversion_id)["estado"] == "running"  # still no answer to the commission request
    assert flow.expire(timedelta(seconds=121)) == 1  # CommissionRequested, attempt 2
    flow.pump.run()
    done = flow.saga(conversion_id)
    assert (done["estado"], done["resultado"], done["intentos"]) == \
        ("completed", "no_commission:reembolsada_antes_de_comision", 2)
    assert [(s["paso"], s["estado"]) for s in done["pasos"]] == [
        ("detection", "done"), ("validation", "done"), ("commission", "failed"), ("refund", "done"),
        ("commission_reversal", "done"), ("commission_retry", "done")]
    assert flow.commissions(conversion_id) == []
    # The lost ConversionValidated, replayed from the dead-letter topic later, books nothing either.
    payload = REGISTRY.decode("ConversionValidated", *_stored(flow, conversion_id, "ConversionValidated"))
    flow.pump.inject("conversiones.eventos", "ConversionValidated", conversion_id, payload)
    assert flow.commissions(conversion_id) == []
    assert flow.conv.get(f"/conversiones/{conversion_id}").json()["status"] == "refunded"


def _stored(flow: Flow, conversion_id: str, event_type: str) -> tuple[bytes, int]:
    e = conv_tables.event_store
    with flow.runtimes["conversiones"].db.read() as session:
        row = session.execute(select(e.c.payload, e.c.schema_version).where(
            e.c.stream_id == conversion_id, e.c.event_type == event_type)).one()
    return row.payload, row.schema_version


def test_refund_after_payout_shows_the_reversal_and_its_carried_adjustment(flow):
    """Case 4: paid out, then refunded: the commission is reversed with a negative adjustment for
    the next payout, and the saga logs the refund and the reversal."""
    conversion_id = flow.postback("600.00")
    flow.pump.run()
    marketing = flow.runtimes["marketing"]
    assert mk_commissions.approve_due_comisiones(marketing.db, marketing.outbox) == 1
    [pago] = flow.mk.post("/pagos", json={"afiliado_id": flow.affiliate}).json()["pagos"]
    assert flow.mk.post(f"/pagos/{pago['id']}/pagar").json()["estado"] == "pagado"
    flow.pump.run()
    assert flow.conv.post(f"/conversiones/{conversion_id}/reembolso", json={"tipo": "contracargo"}).status_code == 200
    assert flow.steps(conversion_id)[-2:] == [("refund", "done"), ("commission_reversal", "waiting")]
    flow.pump.run()
    done = flow.saga(conversion_id)
    assert done["estado"] == "completed" and done["resultado"] == "commission_booked"
    assert [(s["paso"], s["estado"]) for s in done["pasos"]][-2:] == [("refund", "done"), ("commission_reversal", "done")]
    assert "was pagada (contracargo)" in done["pasos"][-1]["detalle"]
    assert "adjustment -60.00 withheld from the next payout" in done["pasos"][-1]["detalle"]
    [comision] = flow.commissions(conversion_id)
    assert comision["estado"] == mk_domain.REVERTIDA


def test_a_timeout_retries_then_the_saga_is_stuck_alerts_and_completes_when_marketing_comes_back(flow):
    """Case 5: marketing does not answer. A 30 s silence changes nothing; each timeout asks again
    (CommissionRequested); after the last planned attempt the saga is stuck, not compensated: one
    SagaAtascada alert on sistema.eventos, counted in /health, and it keeps asking with a capped
    backoff. When marketing comes back its answer completes the saga with the commission booked."""
    flow.pump.held.add("marketing")
    conversion_id = flow.postback("80.00")
    assert flow.expire(timedelta(seconds=30)) == 0
    for attempt in (2, 3, 4):
        assert flow.expire(timedelta(seconds=121 * (attempt - 1))) == 1
        assert flow.saga(conversion_id)["intentos"] == attempt
    assert flow.saga(conversion_id)["estado"] == "running"
    assert flow.expire(timedelta(seconds=121 * 4)) == 1  # no answer to the 4th: stuck, and a 5th request
    stuck = flow.saga(conversion_id)
    assert (stuck["estado"], stuck["resultado"], stuck["terminal"], stuck["intentos"]) == ("stuck", None, False, 5)
    assert [(s["paso"], s["estado"]) for s in stuck["pasos"]] == [
        ("detection", "done"), ("validation", "done"), ("commission", "waiting"), ("commission_retry", "done"),
        ("commission_retry", "done"), ("commission_retry", "done"), ("commission_stuck", "waiting"),
        ("commission_retry", "done")]
    assert "no answer from marketing to 4 commission requests" in stuck["pasos"][-2]["detalle"]
    assert flow.conv.get(f"/conversiones/{conversion_id}").json()["status"] == "validated"  # never rejected
    assert [s["saga_id"] for s in flow.conv.get("/sagas", params={"estado": "stuck"}).json()["sagas"]] == \
        [conversion_id]
    # Visible in /health (the in-process broker is unreachable: 503, but the report is there).
    assert flow.conv.get("/health").json()["sagas"] == {"running": 0, "stuck": 1}
    # Backoff: the 5th request waits twice the timeout, the 6th four times, then the cap (600 s).
    base = 121 * 4
    assert flow.expire(timedelta(seconds=base + 239)) == 0
    assert flow.expire(timedelta(seconds=base + 241)) == 1
    assert flow.expire(timedelta(seconds=base + 241 + 479)) == 0
    assert flow.expire(timedelta(seconds=base + 241 + 481)) == 1
    later = flow.saga(conversion_id)
    assert (later["estado"], later["intentos"]) == ("stuck", 7)
    assert later["pasos"][-1]["detalle"].endswith("next in 600 s")
    t = flow.runtimes["conversiones"].outbox.table
    with flow.runtimes["conversiones"].db.read() as session:
        sent = list(session.scalars(select(t.c.event_type).where(t.c.partition_key == conversion_id).order_by(t.c.id)))
        [alert] = session.execute(select(t.c.topic, t.c.payload, t.c.schema_version)
                                  .where(t.c.event_type == "SagaAtascada")).all()
    assert sent == ["ConversionDetected", "ConversionValidated", "CommissionRequested", "CommissionRequested",
                    "CommissionRequested", "SagaAtascada", "CommissionRequested", "CommissionRequested",
                    "CommissionRequested"]
    assert alert.topic == "sistema.eventos"
    payload = REGISTRY.decode("SagaAtascada", alert.payload, alert.schema_version)
    assert (payload["saga_id"], payload["paso"], payload["intentos"], payload["servicio"]) == \
        (conversion_id, "commission", 4, "conversiones")

    flow.pump.held.clear()
    flow.pump.run()
    done = flow.saga(conversion_id)
    assert (done["estado"], done["resultado"], done["terminal"], done["deadline"]) == \
        ("completed", "commission_booked", True, None)
    steps = [(s["paso"], s["estado"]) for s in done["pasos"]]
    assert ("commission", "done") in steps and ("commission_stuck", "done") in steps
    assert not any(paso == "compensation" for paso, _ in steps)
    [comision] = flow.commissions(conversion_id)
    assert comision["estado"] == mk_domain.PENDIENTE and comision["monto"] == Decimal("8.00")
    assert flow.conv.get(f"/conversiones/{conversion_id}").json()["status"] == "validated"
    assert flow.conv.get("/health").json()["sagas"] == {"running": 0, "stuck": 0}
    # Asked seven times, booked once; every request got the same answer; nothing reversed.
    assert flow.marketing_types("ComisionCalculada", "ComisionRegistrada", "ComisionRevertida") == [
        "ComisionCalculada"] + ["ComisionRegistrada"] * 7
    assert flow.figures() == (1, 0, Decimal("80.00")) and flow.analytics() == (1, 0, Decimal("80.00"))
    assert flow.expire(timedelta(days=1)) == 0  # terminal: the timer leaves it alone


def test_a_retry_answered_in_time_completes_without_compensation(flow):
    flow.pump.held.add("marketing")
    conversion_id = flow.postback("80.00")
    assert flow.expire(timedelta(seconds=121)) == 1
    flow.pump.held.clear()
    flow.pump.run()
    done = flow.saga(conversion_id)
    assert (done["estado"], done["intentos"], done["resultado"]) == ("completed", 2, "commission_booked")
    assert len(flow.commissions(conversion_id)) == 1
    assert flow.expire(timedelta(days=1)) == 0


def test_replay_rebuilds_projections_with_compensations_and_leaves_the_saga_log(flow):
    from test_replay import _snapshot

    booked = flow.postback("80.00")
    flow.pump.run()
    compensated = flow.postback("40.00")
    # Compensated by marketing's refusal (silence no longer compensates): the affiliate was suspended
    # before marketing saw the validation.
    flow.pump.inject("afiliados.eventos", "AfiliadoSuspendido", flow.affiliate,
                     {"id": flow.affiliate, "motivo": "fraude", "timestamp": NOW})
    flow.pump.run()
    db = flow.runtimes["conversiones"].db
    live = _snapshot(db)
    assert flow.figures() == (1, 1, Decimal("80.00"))
    with db.read() as session:
        log = [dict(r) for r in session.execute(select(conv_tables.saga_pasos).order_by(conv_tables.saga_pasos.c.id))
               .mappings()]
    conv_projections.rebuild_projections(db, REGISTRY)
    assert _snapshot(db) == live
    with db.read() as session:
        assert [dict(r) for r in session.execute(select(conv_tables.saga_pasos).order_by(conv_tables.saga_pasos.c.id))
                .mappings()] == log
    assert (flow.saga(booked)["estado"], flow.saga(compensated)["estado"]) == ("completed", "compensated")


# -- case 2: the campaign budget under concurrent conversions, on SQLite and MariaDB -----------------------
def test_racing_commission_requests_spend_exactly_the_budget_and_each_gets_one_answer(db_url):
    migrate(db_url, "alpes.marketing:migrations")
    db = Database(db_url)
    outbox = Outbox(mk_tables.outbox, REGISTRY)
    try:
        with db.transaction() as session:
            campana, _ = mk_campaigns.create_campana(session, SYSTEM_PRINCIPAL, mk_domain.NuevaCampana(
                "Carrera", Decimal("10"), "EUR", presupuesto=Decimal("95.00")))
        processor = InboxProcessor(db, mk_tables.inbox, outbox, "marketing-consumer",
                                   {"ConversionValidated": mk_commissions.answer_comision_request,
                                    "CommissionRequested": mk_commissions.answer_comision_request})
        conversions = [new_id() for _ in range(40)]

        def request(conversion_id: str, event_type: str):
            payload = {"conversion_id": conversion_id, "affiliate_id": "a1", "campaign_id": campana,
                       "conversion_value": Decimal("30.00"), "currency": "EUR", "conversion_type": "sale",
                       "timestamp": utcnow(), "attempt": 2, "requested_at": utcnow()}
            event_id = new_id()
            event = IncomingEvent("conversiones.eventos", "marketing-consumer", event_id, event_type, 1,
                                  conversion_id, utcnow(), conversion_id, event_id, payload)
            for _attempt in range(30):  # a deadlock is retried, as the consumer would
                try:
                    if processor.process([event])[event_id] is None:
                        return
                except (DBAPIError, TransientFailure):
                    pass
            raise AssertionError("a request kept failing")

        # Each conversion is asked twice, by two different threads: its ConversionValidated and a
        # retry (CommissionRequested) racing it.
        tasks = [(c, "ConversionValidated") for c in conversions] + \
            [(c, "CommissionRequested") for c in reversed(conversions)]

        def run(worker: int):
            for conversion_id, event_type in tasks[worker::8]:
                request(conversion_id, event_type)

        threads = [threading.Thread(target=run, args=(w,)) for w in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(180)
        k, o = mk_tables.comisiones, mk_tables.outbox
        with db.read() as session:
            rows = session.execute(select(k.c.conversion_id, k.c.monto, k.c.limitado_por)).all()
            answers = session.execute(select(o.c.event_type, o.c.partition_key).where(
                o.c.event_type.in_(["ComisionRegistrada", "ComisionDenegada"]))).all()
        assert len(rows) == 40 and len({r.conversion_id for r in rows}) == 40  # one commission each
        assert sum(r.monto for r in rows) == Decimal("95.00")  # exactly the budget, never more
        assert sorted(r.monto for r in rows if r.limitado_por == "presupuesto")[-1] == Decimal("2.00")
        assert sum(1 for r in rows if r.limitado_por is None) == 31
        # Every request answered ComisionRegistrada (the repeat with the same commission).
        assert sorted(a.partition_key for a in answers) == sorted(conversions * 2)
        assert {a.event_type for a in answers} == {"ComisionRegistrada"}
    finally:
        db.dispose()


# -- end to end through `alpes up`: marketing frozen, the saga retries, is stuck, then completes ---------
def test_end_to_end_a_frozen_marketing_leaves_the_saga_stuck_and_alerted_until_it_thaws_and_books(tmp_path):
    import os
    import signal

    from harness import Platform, wait_until

    platform = Platform(tmp_path / "alpes", {"ALPES_SAGA_TIMEOUT_SECONDS": "3", "ALPES_SAGA_MAX_RETRIES": "1",
                                             "ALPES_SAGA_MAX_BACKOFF_SECONDS": "6"}).start()
    frozen = None
    try:
        ana = platform.post("afiliados", "/afiliados", {"user_id": "ana", "email": "ana@example.com",
                                                        "nombre": "Ana Pérez"}).json()["id"]
        campaign = platform.post("marketing", "/campanas", {"nombre": "Saga", "porcentaje_comision": "10"}).json()["id"]
        sale = {"affiliate_id": ana, "campaign_id": campaign, "user_id": "c", "conversion_value": "80.00",
                "conversion_type": "sale"}
        probe = wait_until(lambda: (r := platform.post("conversiones", "/conversiones", {**sale, "order_id": "probe"})
                                    .json())["status"] == "validated" and r["id"], what="conversiones to know both")
        # Marketing answering: the saga completes with the commission booked.
        done = wait_until(lambda: (s := platform.get("conversiones", f"/sagas/{probe}"))["terminal"] and s,
                          what="probe saga finished", diagnose=platform.diagnostics)
        assert (done["estado"], done["resultado"]) == ("completed", "commission_booked")

        frozen = platform.pid("marketing")
        os.kill(frozen, signal.SIGSTOP)  # alive but silent: its messages wait
        conversion_id = platform.post("conversiones", "/conversiones", {**sale, "order_id": "o-1"}).json()["id"]
        stuck = wait_until(lambda: (s := platform.get("conversiones", f"/sagas/{conversion_id}"))["estado"] == "stuck"
                           and s, timeout=60, what="saga stuck")
        assert not stuck["terminal"] and stuck["intentos"] >= 3
        assert [(s["paso"], s["estado"]) for s in stuck["pasos"]][:6] == [
            ("detection", "done"), ("validation", "done"), ("commission", "waiting"), ("commission_retry", "done"),
            ("commission_stuck", "waiting"), ("commission_retry", "done")]
        conversion = platform.get("conversiones", f"/conversiones/{conversion_id}")
        assert (conversion["status"], conversion["reason"]) == ("validated", None)  # waiting, not rejected
        assert platform.http.get(platform.url("conversiones") + "/health").json()["sagas"]["stuck"] == 1
        # One alert on sistema.eventos, listed by auditoria's alerting consumer.
        alerts = wait_until(lambda: [a for a in platform.get("auditoria", "/sistema/alertas")["alertas"]
                                     if a["tipo"] == "saga_atascada"], 60, what="stuck-saga alert")
        assert len(alerts) == 1 and conversion_id in alerts[0]["mensaje"] and alerts[0]["servicio"] == "conversiones"

        os.kill(frozen, signal.SIGCONT)
        frozen = None
        # Back, marketing answers; the saga completes with the commission booked, nothing compensated.
        final = wait_until(lambda: (s := platform.get("conversiones", f"/sagas/{conversion_id}"))["terminal"] and s,
                           timeout=60, what="saga completed after marketing came back", diagnose=platform.diagnostics)
        assert (final["estado"], final["resultado"]) == ("completed", "commission_booked")
        steps = [(s["paso"], s["estado"]) for s in final["pasos"]]
        assert ("commission", "done") in steps and ("commission_stuck", "done") in steps
        assert not any(paso == "compensation" for paso, _ in steps)
        [comision] = platform.get("marketing", "/comisiones", conversion_id=conversion_id)["comisiones"]
        assert comision["estado"] != "revertida" and comision["monto"] == "8.00"
        assert platform.get("conversiones", f"/conversiones/{conversion_id}")["status"] == "validated"
        assert platform.get("conversiones", "/sagas", estado="running")["sagas"] == []
        assert platform.get("conversiones", "/sagas", estado="stuck")["sagas"] == []
        assert platform.get("conversiones", "/health")["sagas"] == {"running": 0, "stuck": 0}
        assert len([a for a in platform.get("auditoria", "/sistema/alertas")["alertas"]
                    if a["tipo"] == "saga_atascada"]) == 1  # raised once, not per retry
    finally:
        if frozen is not None:
            os.kill(frozen, signal.SIGCONT)
        platform.stop()
