"""End to end through the running platform (`alpes up`): four processes, a real broker, real databases."""

from __future__ import annotations

from collections import Counter
from decimal import Decimal

import httpx
import pytest
from sqlalchemy import create_engine, text
from harness import Platform, wait_until

from alpes.contract import SERVICES

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


@pytest.fixture(params=["sqlite", pytest.param("mariadb", marks=pytest.mark.mariadb)])
def platform(request, tmp_path):
    """The platform on SQLite files, or on one fresh MariaDB database per service (migrated by each
    service on start, dropped at the end)."""
    running = Platform(tmp_path / "alpes", {"ALPES_AUTH": "required"}, databases=request.param)
    try:
        running.start()
        # Closed as in production: the operator's key from the command line, then real keys.
        running.authenticate(running.create_key("operator", "--name", "e2e"))
        yield running
    finally:
        running.close()


def _register(platform: Platform, email: str, nombre: str = "Ana Pérez") -> str:
    response = platform.post("afiliados", "/afiliados", {"user_id": email, "email": email, "nombre": nombre})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def test_the_whole_flow_through_four_services(platform: Platform):
    assert httpx.get(platform.url("conversiones") + "/conversiones").status_code == 401  # no key, no answer
    # A key that never arrives: the wait says what each consumer, the outboxes and the supervisor
    # were doing, since the platform is gone by the time someone reads a CI failure.
    with pytest.raises(AssertionError, match=r"(?s)afiliados to learn the key.*marketing.eventos/.*"
                                             r"broker restarts: watchdog=0 stall=0.*up.out ends"):
        platform.wait_key_known("never-issued", timeout=0.5)
    ana = _register(platform, "ana@example.com")
    tramposo = _register(platform, "bot@mailinator.com")
    brand_id = platform.post("marketing", "/anunciantes", {"nombre": "Brand"}).json()["id"]
    brand_key = platform.post("marketing", "/claves", {"rol": "advertiser", "anunciante_id": brand_id}).json()["key"]
    platform.wait_key_known(brand_key)
    brand = httpx.Client(timeout=30, headers={"Authorization": f"Bearer {brand_key}"})
    campaign = brand.post(platform.url("marketing") + "/campanas", json={"nombre": "Black Friday",
                                                                        "porcentaje_comision": "12.5"})
    assert campaign.status_code == 201, campaign.text
    campaign_id = campaign.json()["id"]
    assert campaign.json()["anunciante_id"] == brand_id

    # Automatic validation, then marketing enables the affiliate and conversiones learns it.
    assert wait_until(lambda: platform.get("afiliados", f"/afiliados/{ana}")["estado"] == "validado",
                      what="ana validated")
    rejected = wait_until(lambda: (a := platform.get("afiliados", f"/afiliados/{tramposo}"))["estado"] == "rechazado" and a,
                          what="disposable email rejected")
    assert rejected["motivos"] == ["email_desechable"]

    sale = {"affiliate_id": ana, "campaign_id": campaign_id, "user_id": "cust-1", "conversion_value": "99.99",
            "conversion_type": "sale", "order_id": "order-1"}

    # The brand posts its own conversions with its key.
    def post(body: dict, **headers: str) -> httpx.Response:
        return brand.post(platform.url("conversiones") + "/conversiones", json=body, headers=headers)

    def validated_postback():
        return post({**sale, "order_id": f"probe-{ana}"}).json()["status"] == "validated"
    wait_until(validated_postback, what="conversiones to learn the affiliate and campaign")

    first = post(sale, traceparent=f"00-{TRACE_ID}-00f067aa0ba902b7-01")  # the brand's own trace (kernel/tracing.py)
    assert first.status_code == 200
    conversion_id = first.json()["id"]
    repeat = post(sale)
    assert repeat.status_code == 200 and repeat.json()["id"] == conversion_id
    stranger = post({**sale, "affiliate_id": "nobody", "order_id": "o-2"})
    assert stranger.status_code == 200
    stranger_id = stranger.json()["id"]
    rejected_by_fraud_rules = post({**sale, "affiliate_id": tramposo, "order_id": "o-3"}).json()["id"]

    # The unknown affiliate is rejected asynchronously, with a reason, once its grace period ran out.
    conversion = wait_until(lambda: (c := platform.get("conversiones", f"/conversiones/{stranger_id}"))["status"] == "rejected" and c,
                            what="unknown affiliate rejected")
    assert conversion["reason"] == "affiliate_unknown"
    assert wait_until(lambda: platform.get("conversiones", f"/conversiones/{rejected_by_fraud_rules}")["status"] == "rejected")

    # Exact commission: 99.99 × 12.5% = 12.49875 → 12.50.
    commission = wait_until(lambda: platform.get("marketing", "/comisiones", conversion_id=conversion_id)["comisiones"],
                            what="commission")[0]
    assert (commission["monto"], commission["base"], commission["afiliado_id"]) == ("12.50", "99.99", ana)
    probe = platform.get("conversiones", "/conversiones", affiliate_id=ana, status="validated")["conversiones"]
    expected_total = sum(Decimal("12.50") for _ in probe)

    # comisiones.eventos feeds afiliados (earnings), reporting and the payment ledger.
    earnings = wait_until(lambda: (a := platform.get("afiliados", f"/afiliados/{ana}"))["comisiones"] == len(probe) and a,
                          what="affiliate earnings")
    assert Decimal(earnings["ganancias_pendientes"]) == expected_total
    saldo = wait_until(lambda: platform.get("marketing", "/pagos/saldos")["saldos"], what="ledger")
    assert [(s["afiliado_id"], Decimal(s["saldo"]), s["lineas"]) for s in saldo] == [(ana, expected_total, len(probe))]
    report = wait_until(lambda: [r for r in platform.get("marketing", "/reportes")["reportes"]
                                 if r["afiliado_id"] == ana and r["comisiones"] == len(probe)], what="report")[0]
    assert report["validadas"] == len(probe) and Decimal(report["monto"]) == expected_total

    # Ana, with her own key, sees her commission and conversions but not the customer behind them.
    ana_key = platform.post("marketing", "/claves", {"rol": "affiliate", "afiliado_id": ana}).json()["key"]
    platform.wait_key_known(ana_key)
    as_ana = {"Authorization": f"Bearer {ana_key}"}
    mine = httpx.get(platform.url("conversiones") + "/conversiones", headers=as_ana).json()["conversiones"]
    assert conversion_id in {c["id"] for c in mine} and stranger_id not in {c["id"] for c in mine}
    assert {c["user_id"] for c in mine} == {None}
    assert httpx.get(platform.url("marketing") + f"/comisiones/{commission['id']}", headers=as_ana).status_code == 200
    assert httpx.get(platform.url("auditoria") + "/auditoria/eventos", headers=as_ana).status_code == 403

    # Everything listed oldest first, as the original contract did.
    listed = platform.get("conversiones", "/conversiones")["conversiones"]
    assert [c["timestamp"] for c in listed] == sorted(c["timestamp"] for c in listed)
    assert {conversion_id, stranger_id} <= {c["id"] for c in listed}

    # Auditoria holds every business event exactly once, in an intact chain.
    def audit_complete():
        events = platform.get("auditoria", "/auditoria/eventos", limit=10000)["eventos"]
        types = Counter(e["event_type"] for e in events)
        return (types["ComisionCalculada"] == len(probe) and types["ConversionRejected"] == 2
                and types["AfiliadoRechazado"] == 1 and events)
    events = wait_until(audit_complete, what="audit log complete")
    assert len({e["event_id"] for e in events}) == len(events)
    types = Counter(e["event_type"] for e in events)
    assert types["AfiliadoRegistrado"] == 2 and types["AfiliadoValidado"] == 1 and types["CampanaCreada"] == 1
    assert types["AfiliadoHabilitado"] == 1
    assert types["ConversionDetected"] == len(listed)
    # The conversion's own events, and marketing's saga answer keyed by it (another topic: no order promised).
    trail = wait_until(lambda: (t := platform.get("auditoria", "/auditoria/eventos", aggregate_id=conversion_id)
                                ["eventos"]) and len(t) == 3 and t, what="saga answer audited")
    assert [e["event_type"] for e in trail if e["topic"] == "conversiones.eventos"] == \
        ["ConversionDetected", "ConversionValidated"]
    assert [e["event_type"] for e in trail if e["topic"] == "marketing.eventos"] == ["ComisionRegistrada"]
    assert all(e["correlation_id"] == conversion_id for e in trail)
    detected = next(e for e in trail if e["event_type"] == "ConversionDetected")
    assert (detected["actor_role"], detected["actor_id"]) == ("advertiser", brand_key.split("_")[2])
    # marketing's answer came from its consumer: the platform itself.
    assert {e["actor_id"] for e in trail if e["event_type"] == "ComisionRegistrada"} == {"system"}
    assert wait_until(lambda: platform.get("conversiones", f"/sagas/{conversion_id}")["estado"] == "completed",
                      what="saga completed")
    verification = wait_until(lambda: (v := platform.get("auditoria", "/auditoria/verificacion"))["compliance_consumer"]["verified"] == len(events) and v,
                              what="compliance consumer caught up")
    assert verification["ok"] and verification["records"] == len(events)
    findings = wait_until(lambda: platform.get("auditoria", "/auditoria/hallazgos")["hallazgos"], what="security findings")
    assert {f["motivo"] for f in findings} >= {"email_desechable", "affiliate_unknown"}

    # Every service announced itself on sistema.eventos; health is truthful.
    services = wait_until(lambda: (s := platform.get("auditoria", "/sistema/servicios")["servicios"]) and len(s) == 4 and s,
                          what="service announcements")
    assert {s["servicio"] for s in services} == set(SERVICES) and {s["estado"] for s in services} == {"iniciado"}
    for name in SERVICES:
        health = platform.get(name, "/health")
        assert health["status"] == "ok" and health["database"]["ok"] and health["broker"]["ok"]
        assert all(c["connected"] for c in health["consumers"])
    assert wait_until(lambda: all(platform.get(n, "/health")["outbox"]["pending"] == 0 for n in SERVICES),
                      what="outboxes drained")
    # The rows are where the fixture put them: the SQLite files, or each service's MariaDB database.
    assert platform.db_url("conversiones").startswith("mysql" if platform.databases == "mariadb" else "sqlite")
    engine = create_engine(platform.db_url("conversiones"))
    try:
        with engine.connect() as connection:
            stored = connection.execute(text("SELECT status FROM conversiones_view WHERE id = :id"),
                                        {"id": conversion_id}).scalar()
    finally:
        engine.dispose()
    assert stored == "validated"
    # The brand's trace went through the broker (a signed property) into what marketing emitted on
    # handling the postback's events. (Auditoria announces a batch of records in one event, which
    # continues the trace of the batch's first event, maybe another request's: tests/test_traces.py
    # shows its consumer spans in the brand's trace.)
    for name, emitted in (("conversiones", {"ConversionDetected", "ConversionValidated"}),
                          ("marketing", {"ComisionCalculada", "ComisionRegistrada"})):
        engine = create_engine(platform.db_url(name))
        try:
            with engine.connect() as connection:
                traced = connection.execute(text("SELECT event_type FROM outbox WHERE traceparent LIKE :t"),
                                            {"t": f"00-{TRACE_ID}-%"}).scalars().all()
        finally:
            engine.dispose()
        assert set(traced) == emitted, (name, traced)


def test_data_survives_a_restart(tmp_path):
    first = Platform(tmp_path / "alpes").start()
    try:
        ana = _register(first, "keep@example.com")
        wait_until(lambda: first.get("afiliados", f"/afiliados/{ana}")["estado"] == "validado")
        wait_until(lambda: first.get("auditoria", "/auditoria/eventos", aggregate_id=ana)["eventos"])
    finally:
        assert first.stop() == 0
    second = Platform(tmp_path / "alpes").start()
    try:
        assert second.get("afiliados", f"/afiliados/{ana}")["estado"] == "validado"
        campaign = second.post("marketing", "/campanas", {"nombre": "After restart", "porcentaje_comision": 5}).json()
        events = wait_until(lambda: (e := second.get("auditoria", "/auditoria/eventos")["eventos"])
                            and any(x["aggregate_id"] == campaign["id"] for x in e) and e, what="audit after restart")
        assert len({e["event_id"] for e in events}) == len(events)
        assert second.get("auditoria", "/auditoria/verificacion")["ok"]
        # The first run's instances said they stopped; the second run's that they started.
        states = wait_until(lambda: (s := second.get("auditoria", "/sistema/servicios")["servicios"])
                            and sorted(x["estado"] for x in s) == ["detenido"] * 4 + ["iniciado"] * 4 and s,
                            what="lifecycle of both runs on sistema.eventos")
        assert {x["servicio"] for x in states if x["estado"] == "detenido"} == set(SERVICES)
    finally:
        second.stop()


def test_a_poison_message_is_dead_lettered_and_alerted(tmp_path):
    """Undecodable bytes on a business topic: every subscription dead-letters them, keeps going,
    and the alerting consumer raises an alert; health shows the count."""
    import pulsar

    platform = Platform(tmp_path / "alpes").start()
    try:
        client = pulsar.Client(platform.state()["broker_url"], logger=pulsar.ConsoleLogger(pulsar.LoggerLevel.Error))
        producer = client.create_producer("persistent://public/default/conversiones.eventos", block_if_queue_full=True)
        producer.send(b"\x00not avro", properties={"event_id": "poison-1", "event_type": "ConversionDetected",
                                                  "schema_version": "2", "occurred_at": "2026-11-28T00:00:00+00:00"},
                      partition_key="poison")
        client.close()
        subscriptions = {"marketing-consumer", "analytics-consumer", "audit-consumer"}  # on conversiones.eventos
        alerts = wait_until(lambda: (a := [x for x in platform.get("auditoria", "/sistema/alertas")["alertas"]
                                            if x["tipo"] == "dead_letter" and "poison-1" in x["mensaje"]])
                            and len(a) == len(subscriptions) and a, 60, what="dead-letter alerts")
        assert {m for a in alerts for m in subscriptions if f"/{m} dead-lettered" in a["mensaje"]} == subscriptions
        consumers = platform.get("marketing", "/health")["consumers"]
        assert sum(c["dead_lettered"] for c in consumers if c["topic"] == "conversiones.eventos") == 2
        # The consumers keep going: the platform still turns a postback into an audited event.
        campaign = platform.post("marketing", "/campanas", {"nombre": "After poison", "porcentaje_comision": 1}).json()
        wait_until(lambda: platform.get("auditoria", "/auditoria/eventos", aggregate_id=campaign["id"])["eventos"],
                   what="audit after the poison message")
    finally:
        platform.stop()


def test_a_broker_that_stops_answering_is_restarted_and_nothing_is_lost(tmp_path):
    """The embedded broker alive but silent (SIGSTOP: what a starved pulsar-lite runtime looks
    like to its clients): `alpes up`'s watchdog kills and restarts it, and what was written
    meanwhile is delivered once it is back."""
    import os
    import signal

    platform = Platform(tmp_path / "alpes", {"ALPES_BROKER_WATCHDOG_SECONDS": "1"}).start()
    try:
        wedged = platform.pid("broker")
        os.kill(wedged, signal.SIGSTOP)
        # Written while the broker is silent: stored in marketing's outbox, published later.
        campaign = platform.post("marketing", "/campanas", {"nombre": "While silent", "porcentaje_comision": 1})
        assert campaign.status_code == 201
        state = wait_until(lambda: (s := platform.state())["broker_pid"] != wedged and s, 90,
                           what="the silent broker replaced")
        assert state["broker_watchdog_restarts"] == 1
        wait_until(lambda: platform.get("auditoria", "/auditoria/eventos", aggregate_id=campaign.json()["id"])["eventos"],
                   90, what="the event written while the broker was silent audited")
        assert wait_until(lambda: all(platform.get(n, "/health")["outbox"]["pending"] == 0 for n in SERVICES),
                          60, what="outboxes drained")
        assert platform.state()["broker_watchdog_restarts"] == 1  # a healthy broker is left alone
    finally:
        platform.stop()
