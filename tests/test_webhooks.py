"""Signed webhooks (issue 14): who receives what, payload and signature, retries with backoff
through a real local receiver that fails in three ways, order per object, rotation, disabling after
20 consecutive failures with its alert, re-enabling, SSRF refusals. Persistence on SQLite and MariaDB.
The whole platform (HTTP routes, kill -9) is in test_webhooks_faults.py."""

from __future__ import annotations

import json
import socket
import time
from datetime import datetime, timedelta
from decimal import Decimal

import httpx
import pytest
from sqlalchemy import select
from webhook_receiver import Receiver, verify_alpes_signature

from alpes.auditoria import handlers as auditoria_handlers
from alpes.auditoria import tables as auditoria_tables
from alpes.kernel.access import ADVERTISER, AFFILIATE, OPERATOR, Principal
from alpes.kernel.db import Database, migrate
from alpes.kernel.errors import NotFound, RuleViolated
from alpes.kernel.messages import IncomingEvent, OutgoingEvent, new_id, utcnow
from alpes.kernel.outbox import Outbox
from alpes.kernel.request_signing import BadSignature, parse_header, verify
from alpes.marketing import tables, webhook_targets, webhooks
from alpes.marketing.webhook_dispatch import DispatchConfig, WebhookDispatcher, retry_delay

MASTER = b"m" * 32
A, B, X, Y = "adv-a", "adv-b", "aff-x", "aff-y"
CA, CB = "camp-a", "camp-b"
KIND_ORDER = {"commission.created": 0, "commission.approved": 1, "commission.reversed": 2}


# -- pure rules -------------------------------------------------------------------------------------------
def test_backoff_doubles_with_jitter_and_is_capped():
    low, high = (lambda: 0.0), (lambda: 1.0)
    assert [retry_delay(n, 1, 3600, low) for n in (1, 2, 3, 4)] == [0.75, 1.5, 3.0, 6.0]
    assert [retry_delay(n, 1, 3600, high) for n in (1, 2, 3)] == [1.25, 2.5, 5.0]
    assert retry_delay(13, 1, 3600, high) == 3600 and retry_delay(500, 1, 3600, low) == 3600
    # The default schedule keeps retrying for 24 h: 1 s, 2 s, 4 s ... then hourly; ~35 attempts.
    elapsed, attempts = 0.0, 0
    while elapsed < 24 * 3600:
        attempts += 1
        elapsed += retry_delay(attempts, 1, 3600, lambda: 0.5)
    assert 30 <= attempts <= 40


def public_dns(names: dict[str, list[str]]):
    def resolve(host: str, _port: int) -> list[str]:
        if host not in names:
            raise ValueError(f"host {host} does not resolve")
        return names[host]
    return resolve


@pytest.mark.parametrize("url, reason", [
    ("http://hooks.brand.example/in", "https"),
    ("https://user:pw@hooks.brand.example/in", "user information"),
    ("https://127.0.0.1/in", "private, loopback"),
    ("https://10.1.2.3/in", "private, loopback"),
    ("https://192.168.0.10/in", "private, loopback"),
    ("https://169.254.169.254/latest/meta-data", "private, loopback"),
    ("https://[::1]/in", "private, loopback"),
    ("https://[::ffff:127.0.0.1]/in", "private, loopback"),
    ("https://[fe80::1]/in", "private, loopback"),
    ("https://0.0.0.0/in", "private, loopback"),
    ("https://224.0.0.1/in", "private, loopback"),
    ("https://100.64.0.1/in", "private, loopback"),
    ("https://localhost/in", "private, loopback"),
    ("https://internal.brand.example/in", "private, loopback"),  # one of its addresses is private
    ("https://nowhere.example/in", "does not resolve"),
    ("ftp://hooks.brand.example/in", "https"),
])
def test_ssrf_refusals_outside_the_local_mode(url, reason):
    dns = public_dns({"hooks.brand.example": ["93.184.216.34"], "localhost": ["127.0.0.1"],
                      "internal.brand.example": ["93.184.216.34", "10.0.0.7"]})
    with pytest.raises(ValueError, match=reason):
        webhook_targets.resolve_target(url, private_ok=False, resolver=dns)


def test_a_public_https_url_is_pinned_to_the_address_that_was_checked():
    dns = public_dns({"hooks.brand.example": ["93.184.216.34"]})
    target = webhook_targets.resolve_target("https://hooks.brand.example:8443/in?x=1", private_ok=False, resolver=dns)
    assert target.pinned_url == "https://93.184.216.34:8443/in?x=1"
    assert (target.host, target.host_header, target.address) == ("hooks.brand.example", "hooks.brand.example:8443",
                                                                 "93.184.216.34")
    v6 = webhook_targets.resolve_target("https://hooks.brand.example/in", private_ok=False,
                                        resolver=public_dns({"hooks.brand.example": ["2606:2800:220:1::1"]}))
    assert v6.pinned_url == "https://[2606:2800:220:1::1]/in"
    # The protected local mode (and the test-only setting) let http and loopback through.
    local = webhook_targets.resolve_target("http://127.0.0.1:9999/hook", private_ok=True)
    assert local.pinned_url == "http://127.0.0.1:9999/hook"


def test_unknown_event_kinds_and_foreign_kinds_are_refused_naming_the_field(world):
    db = world["db"]
    with db.transaction() as session:
        with pytest.raises(RuleViolated) as unknown:
            webhooks.create_webhook(session, Principal("k", ADVERTISER, anunciante_id=A), url="http://127.0.0.1:1/",
                                    eventos=["conversion.created"], descripcion=None, habilitado=True, now=utcnow(),
                                    private_ok=True)
        assert unknown.value.field == "eventos" and "conversion.created" in unknown.value.reason
        with pytest.raises(RuleViolated) as foreign:
            webhooks.create_webhook(session, Principal("k", AFFILIATE, afiliado_id=X), url="http://127.0.0.1:1/",
                                    eventos=["conversion.validated"], descripcion=None, habilitado=True,
                                    now=utcnow(), private_ok=True)
        assert foreign.value.field == "eventos"
        with pytest.raises(RuleViolated) as ssrf:
            webhooks.create_webhook(session, Principal("k", ADVERTISER, anunciante_id=A), url="https://127.0.0.1/",
                                    eventos=["payout.paid"], descripcion=None, habilitado=True, now=utcnow(),
                                    private_ok=False)
        assert ssrf.value.field == "url"


# -- a small marketing world: two advertisers, two affiliates, an endpoint each, the operator's ----------
@pytest.fixture
def world(db_url, registry):
    migrate(db_url, "alpes.marketing:migrations")
    db = Database(db_url)
    outbox = Outbox(tables.outbox, registry)
    outbox.on_add.append(webhooks.queue_for_own_events)
    now = utcnow()
    with db.transaction() as session:
        for campana, anunciante in ((CA, A), (CB, B)):
            session.execute(tables.campanas.insert().values(
                id=campana, nombre=campana, porcentaje_comision=Decimal("10"), moneda="EUR", estado="activa",
                creada_en=now, anunciante_id=anunciante))
        for campana, afiliado in ((CA, X), (CB, Y)):
            session.execute(tables.inscripciones.insert().values(
                id=f"ins-{afiliado}", campana_id=campana, afiliado_id=afiliado, link_code=f"code{afiliado}",
                estado="activa", inscrita_en=now, actualizada_en=now))
    yield {"db": db, "outbox": outbox, "now": now}
    db.dispose()


def _endpoints(db, receiver: Receiver) -> dict[str, tuple[str, str]]:
    """name -> (webhook id, secret)"""
    owners = {"A": Principal("ka", ADVERTISER, anunciante_id=A), "B": Principal("kb", ADVERTISER, anunciante_id=B),
              "X": Principal("kx", AFFILIATE, afiliado_id=X), "Y": Principal("ky", AFFILIATE, afiliado_id=Y),
              "OP": Principal("ko", OPERATOR)}
    made = {}
    with db.transaction() as session:
        for name, caller in owners.items():
            kinds = webhooks.AFFILIATE_KINDS if caller.role == AFFILIATE else webhooks.EVENT_KINDS
            webhook_id = webhooks.create_webhook(session, caller, url=receiver.url(f"/{name}"), eventos=list(kinds),
                                                 descripcion=f"{name}'s", habilitado=True, now=utcnow(),
                                                 private_ok=True)
            made[name] = (webhook_id, webhooks.displayed_secret(MASTER, webhook_id, 1))
    return made


def _comision(event_type: str, comision_id: str, campana: str, afiliado: str, now: datetime) -> OutgoingEvent:
    base = {"id": comision_id, "conversion_id": f"conv-{comision_id}", "afiliado_id": afiliado, "campana_id": campana,
            "monto": Decimal("12.50"), "moneda": "EUR", "timestamp": now}
    if event_type == "ComisionCalculada":
        base.update(base=Decimal("125.00"), porcentaje=Decimal("10"), regla_id=None, version_reglas=0,
                    limitado_por=None)
    elif event_type == "ComisionAprobada":
        base.update(calculada_en=now)
    else:
        base.update(estado_anterior="aprobada", motivo="reembolso", detalle=None, ajuste_id=None, ajuste_monto=None)
    return OutgoingEvent("comisiones.eventos", event_type, comision_id, base)


def _incoming(event_type: str, payload: dict) -> IncomingEvent:
    event_id = new_id()
    return IncomingEvent(topic="x", subscription="marketing-consumer", event_id=event_id, event_type=event_type,
                         schema_version=1, key="k", occurred_at=utcnow(), correlation_id=event_id,
                         causation_id=event_id, payload=payload)


def _emit_everything(world) -> dict[str, set[str]]:
    """Every kind of event for both tenants; returns event ids by the endpoint that must get them."""
    db, outbox, now = world["db"], world["outbox"], world["now"]
    expected: dict[str, set[str]] = {n: set() for n in ("A", "B", "X", "Y", "OP")}
    consumed = webhooks.delivered_kinds({t: (lambda s, e: None) for t in webhooks.KINDS}, webhooks.KINDS)
    for tenant, campana, afiliado, adv in (("A", CA, X, "A"), ("B", CB, Y, "B")):
        aff = "X" if tenant == "A" else "Y"
        for n in range(2):
            comision_id = f"com-{tenant}-{n}"
            for event_type in ("ComisionCalculada", "ComisionAprobada", "ComisionRevertida"):
                event = _comision(event_type, comision_id, campana, afiliado, now)
                with db.transaction() as session:  # each step its own transaction, as in marketing
                    outbox.add(session, [event])
                expected[adv] |= {event.event_id}
                expected[aff] |= {event.event_id}
        for event_type, payload in (
                ("PagoCreado", {"id": f"pago-{tenant}", "anunciante_id": adv_id(adv), "afiliado_id": afiliado,
                                "moneda": "EUR", "monto": Decimal("25.00"), "lineas": [], "timestamp": now}),
                ("PagoRealizado", {"id": f"pago-{tenant}", "anunciante_id": adv_id(adv), "afiliado_id": afiliado,
                                   "moneda": "EUR", "monto": Decimal("25.00"), "comision_ids": [], "ajuste_ids": [],
                                   "timestamp": now}),
                ("AfiliadoInscrito", {"inscripcion_id": f"ins-{afiliado}", "campana_id": campana,
                                      "afiliado_id": afiliado, "link_code": f"code{afiliado}", "timestamp": now})):
            event = OutgoingEvent("comisiones.eventos", event_type, payload["id"] if "id" in payload else afiliado,
                                  payload)
            with db.transaction() as session:
                outbox.add(session, [event])
            expected[adv] |= {event.event_id}
            expected[aff] |= {event.event_id}
        # Consumed: conversions (advertiser only: customer sales), affiliate approval and suspension.
        for event_type, payload, to in (
                ("ConversionValidated", {"conversion_id": f"conv-{tenant}", "affiliate_id": afiliado,
                                         "campaign_id": campana, "conversion_value": Decimal("125.00"),
                                         "currency": "EUR", "conversion_type": "sale", "timestamp": now,
                                         "click_id": None, "converted_at": None, "user_id": "customer-7"}, (adv,)),
                ("ConversionRefunded", {"conversion_id": f"conv-{tenant}", "affiliate_id": afiliado,
                                        "campaign_id": campana, "conversion_value": Decimal("125.00"),
                                        "currency": "EUR", "refund_type": "reembolso", "reason": None,
                                        "timestamp": now}, (adv,)),
                ("AfiliadoAprobado", {"id": afiliado, "timestamp": now}, (adv, aff)),
                ("AfiliadoSuspendido", {"id": afiliado, "motivo": "fraude", "timestamp": now}, (adv, aff))):
            event = _incoming(event_type, payload)
            with db.transaction() as session:
                consumed[event_type](session, event)
            for name in to:
                expected[name] |= {event.event_id}
    expected["OP"] = set().union(*expected.values())
    return expected


def adv_id(name: str) -> str:
    return {"A": A, "B": B}[name]


def _dispatch_until_settled(dispatcher: WebhookDispatcher, db, timeout: float = 60.0) -> None:
    e = tables.webhook_entregas
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        dispatcher.run()
        with db.read() as session:
            if not session.execute(select(e.c.id).where(e.c.estado == webhooks.PENDIENTE)).first():
                return
        time.sleep(0.02)
    raise AssertionError("deliveries still pending")


def test_every_event_reaches_its_tenants_only_signed_in_order_through_500s_timeouts_and_closed_connections(world):
    receiver = Receiver(slow_seconds=0.6).start()
    try:
        endpoints = _endpoints(world["db"], receiver)
        expected = _emit_everything(world)
        dispatcher = WebhookDispatcher(world["db"], world["outbox"], MASTER, DispatchConfig(
            retry_base_seconds=0.02, retry_max_delay_seconds=0.1, timeout_seconds=0.3, private_ok=True))
        _dispatch_until_settled(dispatcher, world["db"])
        dispatcher.close()
        played = {r.answered for r in receiver.requests}
        assert played == {"500", "timeout", "close", "200"}, played
        for name, (webhook_id, secret) in endpoints.items():
            got = receiver.delivered(f"/{name}")
            ids = [r.payload["id"] for r in got]
            # Every event at least once (here exactly once: every fault was a failure the sender saw),
            # and nothing of another tenant.
            assert set(ids) == expected[name], name
            for r in receiver.requests:
                if r.path != f"/{name}":
                    continue
                assert verify_alpes_signature(secret, r.headers["Alpes-Signature"], r.body)
                assert r.headers["Alpes-Webhook-Id"] == webhook_id
                assert r.headers["Alpes-Event-Type"] == r.payload["type"]
                assert set(r.payload) == {"id", "type", "created_at", "data"}
                assert "user_id" not in r.body.decode() and "customer-7" not in r.body.decode()
            # Order per object: every attempt (failed ones too) of commission.created before any of
            # its approval, and those before its reversal.
            for comision in {r.payload["data"]["commission_id"] for r in got if r.payload["type"] in KIND_ORDER}:
                kinds = [KIND_ORDER[r.payload["type"]] for r in receiver.requests
                         if r.path == f"/{name}" and r.payload["type"] in KIND_ORDER
                         and r.payload["data"]["commission_id"] == comision]
                assert kinds == sorted(kinds) and set(kinds) == {0, 1, 2}, (name, comision, kinds)
        # Advertisers get conversions, affiliates never do.
        assert any(r.payload["type"] == "conversion.validated" for r in receiver.delivered("/A"))
        assert not any(r.payload["type"].startswith("conversion.") for r in receiver.delivered("/X"))
        # The log: the first delivery to A failed three ways, then went through.
        with world["db"].read() as session:
            log = webhooks.list_entregas(session, Principal("ka", ADVERTISER, anunciante_id=A), endpoints["A"][0],
                                         estado=None, limit=1000, offset=0)
        assert all(d["estado"] == webhooks.ENTREGADA for d in log)
        retried = [d for d in log if d["intentos"] > 1]
        assert retried and all(d["historial"][-1]["status"] == 200 for d in retried)
        errors = [a["error"] for d in retried for a in d["historial"] if a["error"]]
        assert any("HTTP 500" in e for e in errors) and any("Timeout" in e for e in errors)
        # The sender's clock is the receiver's: a replay a day later fails the verifier's window.
        stale = receiver.delivered("/A")[0]
        header = stale.headers["Alpes-Signature"].replace("t=", "t=1", 1)
        assert not verify_alpes_signature(endpoints["A"][1], header, stale.body)
    finally:
        receiver.stop()


def test_another_tenant_cannot_read_or_change_an_endpoint(world):
    receiver = Receiver(faults=()).start()
    try:
        endpoints = _endpoints(world["db"], receiver)
        intruders = [Principal("kb", ADVERTISER, anunciante_id=B), Principal("ky", AFFILIATE, afiliado_id=Y),
                     Principal("kx", AFFILIATE, afiliado_id=X)]
        with world["db"].transaction() as session:
            for caller in intruders:
                for action in (lambda c: webhooks.get_webhook(session, c, endpoints["A"][0]),
                               lambda c: webhooks.rotate_secret(session, c, endpoints["A"][0], utcnow()),
                               lambda c: webhooks.delete_webhook(session, c, endpoints["A"][0]),
                               lambda c: webhooks.list_entregas(session, c, endpoints["A"][0], estado=None, limit=5,
                                                                offset=0)):
                    with pytest.raises(NotFound):
                        action(caller)
            assert [w["id"] for w in webhooks.list_webhooks(session, intruders[0], 100, 0)] == [endpoints["B"][0]]
            assert len(webhooks.list_webhooks(session, Principal("ko", OPERATOR), 100, 0)) == 5
    finally:
        receiver.stop()


def test_rotation_sends_both_signatures_for_24_hours_then_only_the_new_one(world):
    receiver = Receiver(faults=()).start()
    clock = {"offset": timedelta(0)}
    try:
        db, caller = world["db"], Principal("ka", ADVERTISER, anunciante_id=A)
        with db.transaction() as session:
            webhook_id = webhooks.create_webhook(session, caller, url=receiver.url("/A"),
                                                 eventos=["commission.created"], descripcion=None, habilitado=True,
                                                 now=utcnow(), private_ok=True)
            webhooks.rotate_secret(session, caller, webhook_id, utcnow())
        old, new = (webhooks.displayed_secret(MASTER, webhook_id, v) for v in (1, 2))
        dispatcher = WebhookDispatcher(db, world["outbox"], MASTER, DispatchConfig(private_ok=True),
                                       clock=lambda: utcnow() + clock["offset"])

        def deliver_one() -> tuple[str, bytes]:
            with db.transaction() as session:
                world["outbox"].add(session, [_comision("ComisionCalculada", new_id(), CA, X, utcnow())])
            before = len(receiver.delivered())
            assert dispatcher.run() == 1
            request = receiver.delivered()[before]
            return request.headers["Alpes-Signature"], request.body

        header, body = deliver_one()
        assert len(parse_header(header)[1]) == 2
        assert verify_alpes_signature(old, header, body) and verify_alpes_signature(new, header, body)
        now = int(time.time())
        assert len(verify([new.encode()], header, body, now).signatures) == 1
        clock["offset"] = timedelta(hours=24, seconds=1)
        header, body = deliver_one()
        assert len(parse_header(header)[1]) == 1
        assert verify_alpes_signature(new, header, body) and not verify_alpes_signature(old, header, body)
        with pytest.raises(BadSignature):
            verify([old.encode()], header, body, now)
        dispatcher.close()
    finally:
        receiver.stop()


def test_twenty_consecutive_failures_disable_the_endpoint_with_an_alert_and_reenabling_resumes(world, db_url, tmp_path):
    receiver = Receiver(faults=(), down=True).start()
    try:
        db, outbox, caller = world["db"], world["outbox"], Principal("kx", AFFILIATE, afiliado_id=X)
        with db.transaction() as session:
            webhook_id = webhooks.create_webhook(session, caller, url=receiver.url("/X"),
                                                 eventos=["commission.created", "commission.approved"],
                                                 descripcion=None, habilitado=True, now=utcnow(), private_ok=True)
        comision = new_id()
        for event_type in ("ComisionCalculada", "ComisionAprobada"):
            with db.transaction() as session:
                outbox.add(session, [_comision(event_type, comision, CA, X, utcnow())])
        dispatcher = WebhookDispatcher(db, outbox, MASTER, DispatchConfig(
            retry_base_seconds=0.001, retry_max_delay_seconds=0.005, private_ok=True))
        for _ in range(400):
            dispatcher.run()
            with db.read() as session:
                if not webhooks.get_webhook(session, caller, webhook_id)["habilitado"]:
                    break
            time.sleep(0.005)
        with db.read() as session:
            endpoint = webhooks.get_webhook(session, caller, webhook_id)
            log = webhooks.list_entregas(session, caller, webhook_id, estado=None, limit=10, offset=0)
            alerts = session.execute(select(tables.outbox).where(
                tables.outbox.c.event_type == "WebhookDeshabilitado")).mappings().all()
        assert not endpoint["habilitado"] and endpoint["fallos_consecutivos"] == 20
        assert "20 consecutive failed attempts" in endpoint["deshabilitado_motivo"]
        # Only the commission's first event was tried: its approval waited behind it (order per object).
        assert sorted(d["intentos"] for d in log) == [0, 20]
        assert len(alerts) == 1 and alerts[0]["topic"] == "sistema.eventos"
        payload = outbox.registry.decode("WebhookDeshabilitado", alerts[0]["payload"], alerts[0]["schema_version"])
        assert (payload["webhook_id"], payload["propietario_rol"], payload["propietario_id"]) == (webhook_id,
                                                                                                   AFFILIATE, X)
        # auditoria's alerting-consumer records it as an alert.
        audit_url = f"sqlite:///{tmp_path / 'auditoria.db'}"
        migrate(audit_url, "alpes.auditoria:migrations")
        audit = Database(audit_url)
        with audit.transaction() as session:
            auditoria_handlers.raise_alert(session, IncomingEvent(
                "sistema.eventos", "alerting-consumer", alerts[0]["event_id"], "WebhookDeshabilitado", 1, webhook_id,
                utcnow(), alerts[0]["event_id"], alerts[0]["event_id"], payload))
        with audit.read() as session:
            alert = session.execute(select(auditoria_tables.alertas)).mappings().one()
        audit.dispose()
        assert alert["tipo"] == "webhook_deshabilitado" and webhook_id in alert["mensaje"]
        # Disabled: nothing is sent, however long we wait.
        sent = len(receiver.requests)
        time.sleep(0.05)
        assert dispatcher.run() == 0 and len(receiver.requests) == sent
        # The owner turns it back on once the receiver works: both deliveries go, in order.
        receiver.down = False
        with db.transaction() as session:
            webhooks.enable_webhook(session, caller, webhook_id, utcnow())
        _dispatch_until_settled(dispatcher, db)
        assert [r.payload["type"] for r in receiver.delivered("/X")] == ["commission.created", "commission.approved"]
        with db.read() as session:
            assert webhooks.get_webhook(session, caller, webhook_id)["fallos_consecutivos"] == 0
        dispatcher.close()
    finally:
        receiver.stop()


def test_a_delivery_is_failed_after_its_retry_window_and_can_be_sent_again_by_hand(world):
    receiver = Receiver(faults=(), down=True).start()
    try:
        db, outbox, caller = world["db"], world["outbox"], Principal("ka", ADVERTISER, anunciante_id=A)
        with db.transaction() as session:
            webhook_id = webhooks.create_webhook(session, caller, url=receiver.url("/A"), eventos=["payout.paid"],
                                                 descripcion=None, habilitado=True, now=utcnow(), private_ok=True)
            outbox.add(session, [OutgoingEvent("comisiones.eventos", "PagoRealizado", "p1", {
                "id": "p1", "anunciante_id": A, "afiliado_id": X, "moneda": "EUR", "monto": Decimal("9.99"),
                "comision_ids": ["c1"], "ajuste_ids": [], "timestamp": utcnow()})])
        dispatcher = WebhookDispatcher(db, outbox, MASTER, DispatchConfig(
            retry_base_seconds=0.01, retry_max_delay_seconds=0.02, retry_for_seconds=0.2, private_ok=True))
        _dispatch_until_settled(dispatcher, db)
        with db.read() as session:
            [delivery] = webhooks.list_entregas(session, caller, webhook_id, estado=None, limit=10, offset=0)
        assert delivery["estado"] == webhooks.FALLIDA and delivery["intentos"] >= 2
        receiver.down = False
        with db.transaction() as session:
            again = webhooks.resend_entrega(session, caller, webhook_id, delivery["id"], utcnow())
        assert again["estado"] == webhooks.PENDIENTE
        _dispatch_until_settled(dispatcher, db)
        [got] = receiver.delivered("/A")
        assert got.payload["data"] == {"payout_id": "p1", "advertiser_id": A, "affiliate_id": X, "amount": "9.99",
                                       "currency": "EUR", "commission_ids": ["c1"]}
        assert json.loads(delivery["cuerpo"]) == got.payload  # the same body, byte for byte
        dispatcher.close()
    finally:
        receiver.stop()


def test_the_address_checked_is_the_one_connected_to_and_a_rebinding_is_refused(world):
    receiver = Receiver(faults=()).start()
    try:
        db, outbox, caller = world["db"], world["outbox"], Principal("ka", ADVERTISER, anunciante_id=A)
        name = "hooks.brand.test"  # exists in no DNS: only the fake resolver knows it
        answers = {name: ["127.0.0.1"]}
        with db.transaction() as session:
            webhook_id = webhooks.create_webhook(session, caller, url=f"http://{name}:{receiver.port}/A",
                                                 eventos=["commission.created"], descripcion=None, habilitado=True,
                                                 now=utcnow(), private_ok=True, resolver=public_dns(answers))
        dispatcher = WebhookDispatcher(db, outbox, MASTER, DispatchConfig(private_ok=True, retry_base_seconds=60),
                                       resolver=public_dns(answers))
        with db.transaction() as session:
            outbox.add(session, [_comision("ComisionCalculada", new_id(), CA, X, utcnow())])
        assert dispatcher.run() == 1
        [got] = receiver.delivered("/A")
        assert got.headers["Host"] == f"{name}:{receiver.port}"
        # Outside the local mode the same name now answering a private address is refused at delivery.
        strict = WebhookDispatcher(db, outbox, MASTER, DispatchConfig(private_ok=False, retry_base_seconds=60),
                                   resolver=public_dns({name: ["10.0.0.8"]}))
        with db.transaction() as session:
            outbox.add(session, [_comision("ComisionCalculada", new_id(), CA, X, utcnow())])
        assert strict.run() == 1
        with db.read() as session:
            latest = webhooks.list_entregas(session, caller, webhook_id, estado=None, limit=1, offset=0)[0]
        assert latest["estado"] == webhooks.PENDIENTE and latest["ultimo_error"].startswith("refused:")
        assert len(receiver.requests) == 1
        dispatcher.close()
        strict.close()
    finally:
        receiver.stop()


def test_no_endpoint_no_delivery_and_one_delivery_per_endpoint_and_event(world):
    db, outbox = world["db"], world["outbox"]
    event = _comision("ComisionCalculada", new_id(), CA, X, utcnow())
    with db.transaction() as session:
        outbox.add(session, [event])
        assert session.execute(select(tables.webhook_entregas)).first() is None
    with db.transaction() as session:
        webhooks.create_webhook(session, Principal("ka", ADVERTISER, anunciante_id=A), url="http://127.0.0.1:9/",
                                eventos=["commission.created"], descripcion=None, habilitado=True, now=utcnow(),
                                private_ok=True)
    with db.transaction() as session:
        assert webhooks.queue_deliveries(session, event.event_id, event.event_type, event.payload,
                                         event.occurred_at) == 1
    with pytest.raises(Exception):  # noqa: B017 (the unique key, whatever the driver calls it)
        with db.transaction() as session:
            webhooks.queue_deliveries(session, event.event_id, event.event_type, event.payload, event.occurred_at)
    with db.read() as session:
        assert len(session.execute(select(tables.webhook_entregas)).all()) == 1


def test_metrics_count_deliveries_by_outcome_and_disabled_endpoints(world):
    from prometheus_client import CollectorRegistry, generate_latest

    class FakeMetrics:
        def __init__(self):
            self.registry = CollectorRegistry()

        def counter(self, name, doc, labels=()):
            from prometheus_client import Counter
            return Counter(name, doc, list(labels), registry=self.registry)

        def histogram(self, name, doc, labels=()):
            from prometheus_client import Histogram
            return Histogram(name, doc, list(labels), registry=self.registry)

    receiver = Receiver(faults=("500",)).start()
    try:
        metrics = FakeMetrics()
        db, outbox = world["db"], world["outbox"]
        with db.transaction() as session:
            webhooks.create_webhook(session, Principal("ka", ADVERTISER, anunciante_id=A), url=receiver.url("/A"),
                                    eventos=["commission.created"], descripcion=None, habilitado=True, now=utcnow(),
                                    private_ok=True)
            outbox.add(session, [_comision("ComisionCalculada", new_id(), CA, X, utcnow())])
        dispatcher = WebhookDispatcher(db, outbox, MASTER, DispatchConfig(retry_base_seconds=0.01, private_ok=True),
                                       metrics=metrics)
        _dispatch_until_settled(dispatcher, db)
        text = generate_latest(metrics.registry).decode()
        assert 'alpes_webhook_deliveries_total{event_type="commission.created",outcome="retried"} 1.0' in text
        assert 'alpes_webhook_deliveries_total{event_type="commission.created",outcome="delivered"} 1.0' in text
        assert 'alpes_webhook_delivery_duration_seconds_count{event_type="commission.created"} 2.0' in text
        assert "alpes_webhook_endpoints_disabled_total 0.0" in text
        dispatcher.close()
    finally:
        receiver.stop()


def test_timestamps_are_utc(world):
    # created_at is the event's own time, ISO 8601 with its offset.
    receiver = Receiver(faults=()).start()
    try:
        db, outbox = world["db"], world["outbox"]
        with db.transaction() as session:
            webhooks.create_webhook(session, Principal("ka", ADVERTISER, anunciante_id=A), url=receiver.url("/A"),
                                    eventos=["commission.created"], descripcion=None, habilitado=True, now=utcnow(),
                                    private_ok=True)
            event = _comision("ComisionCalculada", new_id(), CA, X, utcnow())
            outbox.add(session, [event])
        dispatcher = WebhookDispatcher(db, outbox, MASTER, DispatchConfig(private_ok=True))
        dispatcher.run()
        [got] = receiver.delivered("/A")
        assert datetime.fromisoformat(got.payload["created_at"]) == event.occurred_at
        assert datetime.fromisoformat(got.payload["created_at"]).utcoffset() == timedelta(0)
        dispatcher.close()
    finally:
        receiver.stop()


# -- the HTTP routes, outside the protected local mode (ALPES_AUTH=required, no broker needed) ---------------
def test_routes_refuse_bad_urls_and_kinds_naming_the_field_and_keep_tenants_apart(tmp_path):
    from importlib import import_module

    from access_helpers import bearer, install_key
    from fastapi.testclient import TestClient

    from alpes.settings import Settings

    settings = Settings(data_dir=tmp_path, broker_url="pulsar://127.0.0.1:1", auth="required")
    app, runtime = import_module("alpes.marketing.service").build(settings)
    client = TestClient(app)
    op = install_key(runtime, "operator")
    adv_a, adv_b = (install_key(runtime, "advertiser", anunciante_id=a) for a in (A, B))
    aff_x = install_key(runtime, "affiliate", afiliado_id=X)
    public_ip = "https://93.184.216.34/hooks"  # an address literal: no DNS needed

    def post(key, body):
        return client.post("/webhooks", headers=bearer(key), json=body)

    for url, reason in (("http://93.184.216.34/hooks", "https"), ("https://127.0.0.1/hooks", "loopback"),
                        ("https://169.254.169.254/latest", "link-local"), ("https://10.0.0.1/", "private"),
                        ("https://u:p@93.184.216.34/", "user information")):
        refused = post(adv_a, {"url": url, "eventos": ["payout.paid"]})
        assert refused.status_code == 422 and refused.json()["errors"][0]["field"] == "url", refused.text
        assert reason in refused.json()["errors"][0]["reason"], refused.text
    unknown = post(adv_a, {"url": public_ip, "eventos": ["payout.paid", "payout.lost"]})
    assert unknown.status_code == 422 and unknown.json()["errors"][0]["field"] == "eventos.1", unknown.text
    extra = post(adv_a, {"url": public_ip, "eventos": ["payout.paid"], "secreto": "mine"})
    assert extra.status_code == 422 and extra.json()["errors"][0]["field"] == "secreto", extra.text
    foreign = post(aff_x, {"url": public_ip, "eventos": ["conversion.refunded"]})
    assert foreign.status_code == 422 and foreign.json()["errors"][0]["field"] == "eventos", foreign.text
    assert client.post("/webhooks", json={"url": public_ip, "eventos": ["payout.paid"]}).status_code == 401

    made = post(adv_a, {"url": public_ip, "eventos": ["payout.paid", "commission.created"], "descripcion": "ERP"})
    assert made.status_code == 201, made.text
    hook = made.json()
    assert hook["secreto"].startswith("alpes_whsec_") and hook["propietario_id"] == A and hook["habilitado"]
    mine = post(aff_x, {"url": public_ip, "eventos": list(webhooks.AFFILIATE_KINDS)})
    assert mine.status_code == 201 and mine.json()["propietario_rol"] == "affiliate", mine.text
    path = f"/webhooks/{hook['id']}"
    # Another tenant: 404 on every route of A's endpoint, and its list does not hold it.
    for method, sub, body in (("GET", "", None), ("PUT", "", {"url": public_ip, "eventos": ["payout.paid"],
                                                               "descripcion": None, "habilitado": False}),
                              ("POST", "/secreto", None), ("POST", "/habilitar", None), ("GET", "/entregas", None),
                              ("POST", "/entregas/1/reenviar", None), ("DELETE", "", None)):
        for intruder in (adv_b, aff_x):
            answer = client.request(method, path + sub, headers=bearer(intruder), json=body)
            assert answer.status_code == 404, (method, sub, answer.text)
    assert hook["id"] not in client.get("/webhooks", headers=bearer(adv_b)).text
    assert [w["id"] for w in client.get("/webhooks", headers=bearer(op)).json()["webhooks"]] == [hook["id"],
                                                                                                 mine.json()["id"]]
    # The secret: in the answers of creation and rotation only; a rotation makes a new one.
    shown = client.get(path, headers=bearer(adv_a))
    assert shown.status_code == 200 and hook["secreto"] not in shown.text and "secreto\"" not in shown.text
    rotated = client.post(path + "/secreto", headers=bearer(adv_a)).json()
    assert rotated["secreto"] != hook["secreto"] and rotated["secreto_version"] == 2
    assert rotated["secreto_anterior_hasta"] is not None
    replaced = client.put(path, headers=bearer(adv_a), json={"url": public_ip, "eventos": ["payout.created"],
                                                             "descripcion": None, "habilitado": False})
    assert replaced.status_code == 200 and replaced.json()["eventos"] == ["payout.created"]
    assert not replaced.json()["habilitado"]
    enabled = client.post(path + "/habilitar", headers=bearer(adv_a))
    assert enabled.status_code == 200 and enabled.json()["habilitado"]
    assert client.get(path + "/entregas", headers=bearer(adv_a)).json() == {"entregas": []}
    assert client.post(path + "/entregas/1/reenviar", headers=bearer(adv_a)).status_code == 404
    assert client.delete(path, headers=bearer(op)).status_code == 204
    assert client.get(path, headers=bearer(adv_a)).status_code == 404
    runtime.db.dispose()


def test_whether_any_endpoint_exists_is_asked_again_in_each_transaction_and_after_a_creation(world):
    """Marketing asks once per transaction whether any endpoint exists at all (the common case: none,
    no delivery): an endpoint created later in the same transaction, or in the next one, gets the
    events that follow it."""
    db, outbox, now = world["db"], world["outbox"], world["now"]
    e = tables.webhook_entregas
    operator = Principal("ko", OPERATOR)

    def create(session) -> str:
        return webhooks.create_webhook(session, operator, url="https://hooks.example/in",
                                       eventos=["commission.created"], descripcion=None, habilitado=True, now=utcnow(),
                                       private_ok=True, resolver=public_dns({"hooks.example": ["93.184.216.34"]}))

    unseen, seen = _comision("ComisionCalculada", "c1", CA, X, now), _comision("ComisionCalculada", "c2", CA, X, now)
    with db.transaction() as session:
        outbox.add(session, [unseen])  # no endpoint yet: nothing owed
        webhook_id = create(session)
        outbox.add(session, [seen])
    with db.read() as session:
        assert session.execute(select(e.c.webhook_id, e.c.event_id)).all() == [(webhook_id, seen.event_id)]
    with db.transaction() as session:
        webhooks.delete_webhook(session, operator, webhook_id)
    with db.transaction() as session:
        outbox.add(session, [_comision("ComisionCalculada", "c3", CA, X, now)])  # none again
    with db.transaction() as session:  # another transaction (another instance, say)
        second = create(session)
    third = _comision("ComisionCalculada", "c4", CA, X, now)
    with db.transaction() as session:
        outbox.add(session, [third])
    with db.read() as session:
        assert session.execute(select(e.c.webhook_id, e.c.event_id)).all() == [(second, third.event_id)]


def test_the_test_receiver_keeps_a_request_cut_short_by_its_senders_death_apart():
    """A sender killed between its headers and its body (the kill -9 suite does it) leaves a short
    request: the receiver records it as truncated, plays no fault on it and counts it as no delivery."""
    receiver = Receiver().start()
    try:
        with socket.create_connection(("127.0.0.1", receiver.port)) as cut:
            cut.sendall(b"POST /A HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        b"Content-Length: 317\r\n\r\n{\"id\"")
        deadline = time.monotonic() + 5
        while not receiver.requests and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [(r.path, r.body, r.answered) for r in receiver.requests] == [("/A", b'{"id"', "truncated")]
        assert receiver.whole("/A") == [] and receiver.delivered("/A") == []
        # The path's first whole request still meets the first fault.
        assert httpx.post(receiver.url("/A"), json={"id": "1"}).status_code == 500
        assert [r.answered for r in receiver.whole("/A")] == ["500"]
    finally:
        receiver.stop()
