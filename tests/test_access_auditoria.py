"""The audit log and access (issue 10): the actor of every record, an advertiser's view of its own
aggregates, and the keys the audit-consumer learns on marketing.eventos.

Events are fed to the audit-consumer's handlers as test_audit_verify does, here through
consumers.consumer_specs() so the wiring (audit AND learn) is what is tested.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from importlib import import_module

import pytest
from access_helpers import bearer, install_key
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from alpes.auditoria import consumers, domain, handlers, tables
from alpes.kernel.access import Principal, generate_key
from alpes.kernel.codec import SchemaRegistry
from alpes.kernel.db import Database, migrate
from alpes.kernel.messages import IncomingEvent
from alpes.settings import Settings

REGISTRY = SchemaRegistry.from_directory()
T0 = datetime(2026, 12, 5, 12, 0, tzinfo=timezone.utc)
_seq = iter(range(1, 10_000))


def _event(topic: str, event_type: str, payload: dict, *, key: str = "", actor: tuple[str, str] = ("system", "system"),
           avro: bool = False) -> IncomingEvent:
    n = next(_seq)
    when = T0 + timedelta(seconds=n)
    version = REGISTRY.latest_version(event_type) if avro else 1
    if avro:  # through Avro as on the wire (the newest version, as consumers read it)
        payload = REGISTRY.decode(event_type, REGISTRY.encode(event_type, payload, version)[0], version)
    return IncomingEvent(topic=topic, subscription="audit-consumer", event_id=f"e-{n}", event_type=event_type,
                         schema_version=version, key=key, occurred_at=when, correlation_id=f"c-{n}",
                         causation_id=f"c-{n}", payload=payload, actor_id=actor[0], actor_role=actor[1])


def _feed(runtime, event: IncomingEvent) -> None:
    spec = next(s for s in consumers.consumer_specs() if s.topic == event.topic and s.subscription == "audit-consumer")
    with runtime.db.transaction() as session:
        spec.handlers.get(event.event_type)(session, event)


def _campaign(campana_id: str, anunciante_id: str | None, **actor) -> IncomingEvent:
    payload = {"id": campana_id, "nombre": campana_id, "porcentaje_comision": Decimal("10"), "moneda": "EUR",
               "timestamp": T0, **({"anunciante_id": anunciante_id} if anunciante_id else {})}
    return _event("marketing.eventos", "CampanaCreada", payload, key=campana_id, avro=True, **actor)


def _conversion(conversion_id: str, campana_id: str, **actor) -> IncomingEvent:
    return _event("conversiones.eventos", "ConversionDetected", {
        "conversion_id": conversion_id, "campaign_id": campana_id, "affiliate_id": "X", "user_id": "cust",
        "conversion_value": Decimal("10.00")}, key=conversion_id, **actor)


def _build(tmp_path, db_url):
    settings = Settings(data_dir=tmp_path, broker_url="pulsar://127.0.0.1:1", auditoria_db_url=db_url)
    app, runtime = import_module("alpes.auditoria.service").build(settings)
    return TestClient(app), runtime


@pytest.fixture
def auditoria(tmp_path, db_url):  # SQLite and MariaDB: the scoping is SQL, and both must agree
    client, runtime = _build(tmp_path, db_url)
    yield client, runtime
    runtime.db.dispose()


def _types(response) -> list[str]:
    assert response.status_code == 200, response.text
    return [e["event_type"] for e in response.json()["eventos"]]


def _hash_before_actors(prev_hash: str, event: IncomingEvent, seq: int) -> str:
    """The record's hash exactly as the code before actors computed it (written out, not reused)."""
    body = domain.canonical_json({
        "seq": seq, "event_id": event.event_id, "topic": event.topic, "event_type": event.event_type,
        "schema_version": event.schema_version, "aggregate_id": event.key, "occurred_at": event.occurred_at.isoformat(),
        "correlation_id": event.correlation_id, "causation_id": event.causation_id,
        "payload": json.loads(domain.canonical_json(event.payload))})
    return hashlib.sha256((prev_hash + "\n" + body).encode("utf-8")).hexdigest()


# -- the actor -----------------------------------------------------------------------------------------
def test_old_records_without_actor_and_new_ones_with_it_verify_in_one_chain(tmp_path, db_url):
    """A log written before this change (migrated from 0002, hashed without actors) gets new records
    with actors; the whole chain verifies, and the actor is under the hash."""
    migrate(db_url, "alpes.auditoria:migrations", "0002_api_keys")
    old = Database(db_url)
    prev = domain.GENESIS
    old_events = [_campaign("kA", "A"), _conversion("cA", "kA"), _event("afiliados.eventos", "AfiliadoValidado",
                                                                       {"id": "X", "timestamp": T0}, key="X")]
    with old.transaction() as session:
        for seq, event in enumerate(old_events, start=1):
            # As the code before actors wrote them: no actor anywhere, not in the hash either.
            digest = _hash_before_actors(prev, event, seq)
            session.execute(tables.audit_log.insert().values(
                seq=seq, event_id=event.event_id, topic=event.topic, event_type=event.event_type,
                schema_version=event.schema_version, aggregate_id=event.key, occurred_at=event.occurred_at,
                correlation_id=event.correlation_id, causation_id=event.causation_id,
                payload_json=domain.canonical_json(event.payload), prev_hash=prev, hash=digest, recorded_at=T0))
            prev = digest
        session.execute(update(tables.audit_head).values(seq=len(old_events), hash=prev))
    old.dispose()

    client, runtime = _build(tmp_path, db_url)  # migrates to head
    try:
        _feed(runtime, _conversion("cA2", "kA", actor=("keyA1", "advertiser")))
        _feed(runtime, _event("marketing.eventos", "CampanaPausada", {"id": "kA", "timestamp": T0}, key="kA",
                              actor=("keyOp", "operator")))
        check = client.get("/auditoria/verificacion").json()
        assert (check["records"], check["ok"]) == (5, True), check
        listed = client.get("/auditoria/eventos").json()["eventos"]
        assert [(e["actor_id"], e["actor_role"]) for e in listed] == [
            (None, None)] * 3 + [("keyA1", "advertiser"), ("keyOp", "operator")]
        # Records audited before the migration belong to their campaign too (filled in from the payload).
        key_a = install_key(runtime, "advertiser", anunciante_id="A")
        assert _types(client.get("/auditoria/eventos", headers=bearer(key_a))) == [
            "CampanaCreada", "ConversionDetected", "ConversionDetected", "CampanaPausada"]
        # Blaming someone else, or another role, breaks the chain at that record.
        op = bearer(install_key(runtime, "operator"))
        log = tables.audit_log
        for seq, change, undo in [(5, {"actor_role": "advertiser"}, {"actor_role": "operator"}),
                                  (4, {"actor_id": "keyOp"}, {"actor_id": "keyA1"}),
                                  (3, {"actor_id": "keyOp", "actor_role": "operator"}, {"actor_id": None,
                                                                                        "actor_role": None})]:
            with runtime.db.transaction() as session:
                session.execute(update(log).where(log.c.seq == seq).values(**change))
            check = client.get("/auditoria/verificacion", headers=op).json()
            assert (check["ok"], check["broken_seq"]) == (False, seq), change
            with runtime.db.transaction() as session:
                session.execute(update(log).where(log.c.seq == seq).values(**undo))
            assert client.get("/auditoria/verificacion", headers=op).json()["ok"] is True
    finally:
        runtime.db.dispose()


def test_the_log_filters_by_actor_strictly(auditoria):
    client, runtime = auditoria
    _feed(runtime, _campaign("kA", "A", actor=("keyA1", "advertiser")))
    _feed(runtime, _conversion("c1", "kA", actor=("keyA1", "advertiser")))
    _feed(runtime, _event("comisiones.eventos", "ComisionCalculada", {"id": "m1", "conversion_id": "c1",
                                                                      "campana_id": "kA", "afiliado_id": "X"},
                          key="m1"))
    _feed(runtime, _event("marketing.eventos", "CampanaPausada", {"id": "kA", "timestamp": T0}, key="kA",
                          actor=("local-operator", "operator")))
    assert _types(client.get("/auditoria/eventos", params={"actor_id": "keyA1"})) == ["CampanaCreada",
                                                                                       "ConversionDetected"]
    assert _types(client.get("/auditoria/eventos", params={"actor_role": "system"})) == ["ComisionCalculada"]
    assert _types(client.get("/auditoria/eventos", params={"actor_role": "operator",
                                                           "actor_id": "local-operator"})) == ["CampanaPausada"]
    assert _types(client.get("/auditoria/eventos", params={"actor_role": "operator", "actor_id": "keyA1"})) == []
    for bad in ({"actor_role": "root"}, {"actor_role": "operator' OR 1=1 --"}, {"actor_id": "x' OR '1'='1"},
                {"actor_id": "k" * 65}, {"actor_id": ""}, {"actor_id": "<script>"}):
        response = client.get("/auditoria/eventos", params=bad)
        assert response.status_code == 422, (bad, response.text)
        assert response.json()["errors"][0]["field"] == f"query.{next(iter(bad))}"


# -- an advertiser's view ------------------------------------------------------------------------------
@pytest.fixture
def tenants(auditoria):
    """A and B each with a campaign and a conversion; records of no campaign, of a campaign of no one,
    and A's conversion audited BEFORE A's CampanaCreada (their topics order independently)."""
    client, runtime = auditoria
    h = {"op": bearer(install_key(runtime, "operator")),
         "A": bearer(install_key(runtime, "advertiser", anunciante_id="A")),
         "B": bearer(install_key(runtime, "advertiser", anunciante_id="B")),
         "X": bearer(install_key(runtime, "affiliate", afiliado_id="X"))}
    for event in [
        _conversion("cA", "kA", actor=("keyA", "advertiser")),
        _event("comisiones.eventos", "ComisionPagada", {"id": "mA", "conversion_id": "cA", "afiliado_id": "X",
                                                        "pago_id": "p1"}, key="mA"),  # names only the conversion
        _event("afiliados.eventos", "AfiliadoRegistrado", {"id": "X", "user_id": "x", "email": "pii1.sealed"},
               key="X", actor=("keyA", "advertiser")),
        _event("marketing.eventos", "AfiliadoInscrito", {"inscripcion_id": "iA", "campana_id": "kA",
                                                         "afiliado_id": "X", "link_code": "l"}, key="X"),
        _campaign("kA", "A", actor=("keyA", "advertiser")),
        _campaign("kB", "B", actor=("keyB", "advertiser")),
        _conversion("cB", "kB", actor=("keyB", "advertiser")),
        _campaign("kOld", None),  # a campaign of before owners
        _conversion("cOld", "kOld"),
        _event("marketing.eventos", "AnuncianteRegistrado", {"id": "A", "nombre": "Marca A"}, key="A"),
        _event("marketing.eventos", "CampanaActivada", {"id": "kB", "timestamp": T0}, key="kB"),
    ]:
        _feed(runtime, event)
    return client, runtime, h


def test_an_advertiser_reads_only_the_records_of_its_aggregates(tenants):
    client, _, h = tenants
    a = client.get("/auditoria/eventos", headers=h["A"])
    assert _types(a) == ["ConversionDetected", "ComisionPagada", "AfiliadoInscrito", "CampanaCreada",
                         "AnuncianteRegistrado"]
    assert a.json()["total"] == 5  # its own count, not the platform's
    assert {e["aggregate_id"] for e in a.json()["eventos"]} == {"cA", "mA", "X", "kA", "A"}
    b = client.get("/auditoria/eventos", headers=h["B"])
    assert _types(b) == ["CampanaCreada", "ConversionDetected", "CampanaActivada"] and b.json()["total"] == 3
    assert "cA" not in b.text and "kA" not in b.text
    everything = client.get("/auditoria/eventos", headers=h["op"]).json()
    assert everything["total"] == len(everything["eventos"]) == 11


@pytest.mark.parametrize("params", [{"aggregate_id": "cB"}, {"aggregate_id": "X", "event_type": "AfiliadoRegistrado"},
                                    {"event_type": "CampanaActivada"}, {"actor_id": "keyB"},
                                    {"aggregate_id": "cOld"}, {"correlation_id": "c-1"}])
def test_a_filter_naming_another_tenants_records_finds_nothing(tenants, params):
    client, _, h = tenants
    if "correlation_id" in params:  # B's conversion's correlation, read from the operator's view
        ops = client.get("/auditoria/eventos", params={"aggregate_id": "cB"}, headers=h["op"]).json()["eventos"]
        params = {"correlation_id": ops[0]["correlation_id"]}
    assert client.get("/auditoria/eventos", params=params, headers=h["op"]).json()["eventos"] != []
    assert client.get("/auditoria/eventos", params=params, headers=h["A"]).json()["eventos"] == []


def test_affiliates_read_no_audit_record_and_only_the_operator_the_rest(tenants):
    client, _, h = tenants
    assert client.get("/auditoria/eventos", headers=h["X"]).status_code == 403
    for path in ("/auditoria/verificacion", "/auditoria/hallazgos", "/sistema/servicios", "/sistema/alertas"):
        for who in ("A", "X"):
            assert client.get(path, headers=h[who]).status_code == 403, (path, who)
        assert client.get(path, headers=h["op"]).status_code == 200
    assert client.get("/auditoria/eventos").status_code == 401


def test_no_record_for_an_affiliate_nor_for_an_advertiser_key_without_its_advertiser(tenants):
    """Behind the rule (which already refuses affiliates): the handlers' own scoping shows them nothing."""
    _, runtime, _ = tenants
    with runtime.db.read() as session:
        for principal in (Principal("k1", "affiliate", afiliado_id="X"), Principal("k2", "advertiser"),
                          Principal("k3", "system")):
            rows = session.execute(select(tables.audit_log).where(handlers.visible_records(principal))).all()
            assert rows == [], principal
        assert len(session.execute(select(tables.audit_log).where(
            handlers.visible_records(Principal("k4", "operator")))).all()) == 11


def test_a_campaigns_owner_is_its_first_creator_not_a_later_claim(tenants):
    """A second CampanaCreada for kA naming B (a replay, a bug) does not hand A's records to B."""
    client, runtime, h = tenants
    _feed(runtime, _campaign("kA", "B"))
    assert "ConversionDetected" not in _types(client.get("/auditoria/eventos", params={"aggregate_id": "cA"},
                                                         headers=h["B"]))
    assert _types(client.get("/auditoria/eventos", params={"aggregate_id": "cA"}, headers=h["A"])) == [
        "ConversionDetected"]


# -- keys learnt by the audit-consumer ---------------------------------------------------------------------
def test_the_audit_consumer_audits_and_learns_keys(auditoria):
    client, runtime = auditoria
    new = generate_key("operator")
    issued = _event("marketing.eventos", "ClaveApiEmitida", {
        "key_id": new.key_id, "digest": new.digest, "rol": "operator", "anunciante_id": None, "afiliado_id": None,
        "scopes": ["auditoria:read"], "nombre": "auditor", "expira_en": None, "timestamp": T0},
        key=new.key_id, avro=True, actor=("local-operator", "operator"))
    _feed(runtime, issued)
    assert client.get("/auditoria/eventos").status_code == 401  # a key exists: protected mode is over
    response = client.get("/auditoria/eventos", headers=bearer(new.key))
    assert response.status_code == 200, response.text
    assert _types(response) == ["ClaveApiEmitida"] and response.json()["eventos"][0]["actor_role"] == "operator"
    assert client.get("/sistema/servicios", headers=bearer(new.key)).status_code == 403  # its scopes hold

    _feed(runtime, _event("marketing.eventos", "ClaveApiRevocada", {"key_id": new.key_id, "timestamp": T0},
                          key=new.key_id, avro=True))
    client.app.state.access.gate._verified.clear()  # the 1 s cache of verified keys, not waited for here
    assert client.get("/auditoria/eventos", headers=bearer(new.key)).status_code == 401
    with runtime.db.read() as session:
        types = [r.event_type for r in session.execute(tables.audit_log.select().order_by(tables.audit_log.c.seq))]
        assert types == ["ClaveApiEmitida", "ClaveApiRevocada"]
        assert handlers.verify_audit_chain(session) == (2, None)
