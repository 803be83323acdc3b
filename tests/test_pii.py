"""Personal data of affiliates (issue 10, hole 2): sealed at rest with a key of each affiliate,
never sent or audited in clear, masked in reads, and erased by shredding that key while the audit
chain still verifies."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from importlib import import_module

import pytest
from fastapi.testclient import TestClient
from harness import Platform, wait_until
from sqlalchemy import MetaData, Table, create_engine, inspect, select, text

from alpes.kernel.codec import SchemaRegistry
from alpes.kernel.messages import IncomingEvent, new_id, utcnow
from alpes.settings import Settings

REGISTRY = SchemaRegistry.from_directory()
NOW = datetime(2026, 11, 28, 12, 0, tzinfo=timezone.utc)

EMAIL = "ana.perez@example.com"
DOCUMENTO = "AB12345"
NOMBRE = "Ana Pérez"
FULL = {"user_id": "u-ana", "email": "Ana.Perez@Example.com", "nombre": NOMBRE, "tipo_documento": "CC",
        "numero_documento": "ab12345", "pais": "CO", "metodo_pago": "paypal"}


def _secrets_in(blob) -> list[str]:
    """Which of the person's data appear in clear in `blob` (text, bytes or anything JSON-able)."""
    if isinstance(blob, bytes):
        text_ = blob.decode("utf-8", "replace")
    elif isinstance(blob, str):
        text_ = blob
    else:
        text_ = json.dumps(blob, default=str, ensure_ascii=False)
    text_ = text_.lower()
    return [s for s in (EMAIL, DOCUMENTO.lower(), NOMBRE.lower(), "ana.perez") if s in text_]


def _service(name: str, tmp_path):
    settings = Settings(data_dir=tmp_path, broker_url="pulsar://127.0.0.1:1")
    app, runtime = import_module(f"alpes.{name}.service").build(settings)
    return TestClient(app), runtime, import_module(f"alpes.{name}.tables")


@pytest.fixture
def afiliados(tmp_path):
    client, runtime, tables = _service("afiliados", tmp_path)
    yield client, runtime, tables
    runtime.db.dispose()


def _job(runtime, name: str) -> int:
    """Run one of the service's periodic jobs once, as the runtime would."""
    return next(job for job in runtime.jobs if job.name == name).run()


def _raw_cells(runtime) -> list[tuple[str, str, object]]:
    """Every cell of every table of the service's database, read past the service's code."""
    engine = runtime.db.engine
    cells = []
    with engine.connect() as connection:
        for table in inspect(engine).get_table_names():
            for row in connection.execute(text(f"SELECT * FROM {table}")).mappings():
                cells += [(table, column, value) for column, value in row.items() if value is not None]
    return cells


def _leaks_at_rest(runtime) -> list[tuple[str, str, list[str]]]:
    return [(t, c, found) for t, c, v in _raw_cells(runtime)
            if (found := _secrets_in(v if isinstance(v, (bytes, str)) else str(v)))]


def _outbox(runtime, tables, event_type: str) -> list[tuple[int, dict]]:
    with runtime.db.read() as session:
        rows = session.execute(select(tables.outbox).where(tables.outbox.c.event_type == event_type)
                               .order_by(tables.outbox.c.id)).mappings().all()
    return [(r["schema_version"], REGISTRY.decode(event_type, r["payload"], r["schema_version"])) for r in rows]


# -- the sealing itself --------------------------------------------------------------------------------
def test_a_sealed_value_opens_only_with_its_key_owner_and_purpose():
    from alpes.afiliados import pii

    key, other = bytes(range(32)), bytes(32)
    token = pii.seal(key, "a1", "evento/email", EMAIL)
    assert token.startswith("pii1.") and EMAIL not in token
    assert pii.unseal(key, "a1", "evento/email", token) == EMAIL
    assert pii.seal(key, "a1", "evento/email", EMAIL) != token  # a fresh nonce each time
    for wrong in ((other, "a1", "evento/email"), (key, "a2", "evento/email"), (key, "a1", "evento/nombre")):
        with pytest.raises(pii.UnreadableSeal):
            pii.unseal(*wrong, token)
    tampered = token[:-2] + ("A" if token[-2] != "A" else "B") + token[-1]
    with pytest.raises(pii.UnreadableSeal):
        pii.unseal(key, "a1", "evento/email", tampered)


def test_master_keys_rotate_the_first_wraps_every_one_unwraps():
    from alpes.afiliados import pii

    old, new = b"o" * 32, b"n" * 32
    kek_id, wrapped = pii.MasterKeys([old]).wrap("a1", b"k" * 32)
    assert pii.MasterKeys([new, old]).unwrap("a1", kek_id, wrapped) == b"k" * 32
    assert pii.MasterKeys([new, old]).wrap("a1", b"k" * 32)[0] != kek_id
    with pytest.raises(pii.UnreadableSeal, match="not configured"):
        pii.MasterKeys([new]).unwrap("a1", kek_id, wrapped)
    with pytest.raises(pii.UnreadableSeal):
        pii.MasterKeys([old]).unwrap("a2", kek_id, wrapped)  # bound to its owner
    with pytest.raises(ValueError):
        pii.MasterKeys([b"short"])


# -- reads ---------------------------------------------------------------------------------------------
def test_the_list_masks_email_and_document_and_the_single_read_masks_the_document(afiliados):
    client, _, _ = afiliados
    created = client.post("/afiliados", json=FULL)
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["email"] == EMAIL  # the registrant gets back what it sent ...
    assert body["numero_documento"] == "****345" and body["tipo_documento"] == "CC"  # ... but never the document

    [listed] = client.get("/afiliados").json()["afiliados"]
    assert listed["id"] == body["id"]
    assert listed["email"] == "a***@e***.com" and listed["numero_documento"] == "****345"
    assert EMAIL not in json.dumps(listed) and DOCUMENTO not in json.dumps(listed)

    single = client.get(f"/afiliados/{body['id']}").json()
    assert (single["email"], single["nombre"], single["numero_documento"], single["metodo_pago"], single["pais"]) == (
        EMAIL, NOMBRE, "****345", "paypal", "CO")
    assert single["datos_personales_borrados"] is False


# -- at rest and on the wire ---------------------------------------------------------------------------
def test_personal_data_is_sealed_at_rest_outbox_included(afiliados):
    client, runtime, _ = afiliados
    assert client.post("/afiliados", json=FULL).status_code == 201
    _job(runtime, "validate-afiliados")
    assert _leaks_at_rest(runtime) == []
    # ... yet the service reads it back, and validation saw the real data (a valid email and name).
    [listed] = client.get("/afiliados").json()["afiliados"]
    assert listed["estado"] == "validado" and listed["nombre"] == NOMBRE


def test_the_registration_event_carries_only_what_others_need(afiliados):
    client, runtime, tables = afiliados
    afiliado_id = client.post("/afiliados", json=FULL).json()["id"]
    [(version, event)] = _outbox(runtime, tables, "AfiliadoRegistrado")
    assert version == 3
    assert _secrets_in(event) == []
    assert event["pais"] == "CO" and event["id"] == afiliado_id and event["user_id"] == "u-ana"
    # What marketing and conversiones compare for self-referral; never the address.
    assert event["email_sha256"] == hashlib.sha256(EMAIL.encode()).hexdigest()
    assert event["email"].startswith("pii1.") and event["nombre"].startswith("pii1.")
    # Old readers (v2) still read it; they find no document and no payment method.
    data, _ = REGISTRY.encode("AfiliadoRegistrado", event, 3)
    old = REGISTRY.decode("AfiliadoRegistrado", data, writer_version=3, reader_version=2)
    assert old["numero_documento"] is None and old["metodo_pago"] is None and old["tipo_documento"] is None


def test_an_old_event_upcast_to_v3_brings_no_document_or_payment_method():
    v2 = {"id": "a1", "user_id": "u", "email": EMAIL, "nombre": NOMBRE, "tipo_documento": "CC",
          "numero_documento": DOCUMENTO, "pais": "CO", "metodo_pago": "paypal", "timestamp": NOW}
    data, _ = REGISTRY.encode("AfiliadoRegistrado", v2, 2)
    upcast = REGISTRY.decode("AfiliadoRegistrado", data, writer_version=2)
    assert "numero_documento" not in upcast and "metodo_pago" not in upcast and upcast["email_sha256"] is None


# -- erasure ---------------------------------------------------------------------------------------------
def test_erasure_shreds_the_key_and_nothing_returns_the_data(afiliados):
    client, runtime, tables = afiliados
    afiliado_id = client.post("/afiliados", json=FULL).json()["id"]
    _job(runtime, "validate-afiliados")
    [(_, registered)] = _outbox(runtime, tables, "AfiliadoRegistrado")
    vault = client.app.state.pii_vault
    with runtime.db.read() as session:
        assert vault.open_event_field(session, afiliado_id, "email", registered["email"]) == EMAIL

    erased = client.delete(f"/afiliados/{afiliado_id}/datos-personales")
    assert erased.status_code == 200, erased.text
    body = erased.json()
    assert body["datos_personales_borrados"] is True and body["estado"] == "validado"
    assert [body[f] for f in ("email", "nombre", "numero_documento", "metodo_pago")] == [None] * 4
    assert client.get(f"/afiliados/{afiliado_id}").json() == body
    assert client.get("/afiliados").json()["afiliados"] == [body]
    assert _leaks_at_rest(runtime) == []
    with runtime.db.read() as session:
        # The key is gone: the copies sealed with it (the event, the audit log) are noise now.
        assert session.scalar(select(tables.claves.c.id).where(tables.claves.c.id == afiliado_id)) is None
        assert vault.open_event_field(session, afiliado_id, "email", registered["email"]) is None
    [(version, event)] = _outbox(runtime, tables, "DatosPersonalesBorrados")
    assert version == 1 and event["id"] == afiliado_id

    # Again: the same answer, no second event. Unknown: 404.
    assert client.delete(f"/afiliados/{afiliado_id}/datos-personales").json() == body
    assert len(_outbox(runtime, tables, "DatosPersonalesBorrados")) == 1
    assert client.delete("/afiliados/nope/datos-personales").status_code == 404

    # The person may come back: the erased registration holds the address no more.
    again = client.post("/afiliados", json={**FULL, "user_id": "u-ana-2"}).json()["id"]
    _job(runtime, "validate-afiliados")
    assert client.get(f"/afiliados/{again}").json()["estado"] == "validado"


def test_legacy_rows_and_events_are_sealed_by_the_sealing_job(afiliados):
    """Rows and outbox events written before the personal data was sealed: readable as they were,
    then sealed in place by the service's job (and the v2 event re-encoded as v3)."""
    client, runtime, tables = afiliados
    legacy_id = new_id()
    v2 = {"id": legacy_id, "user_id": "u-old", "email": EMAIL, "nombre": NOMBRE, "tipo_documento": "CC",
          "numero_documento": DOCUMENTO, "pais": "CO", "metodo_pago": "paypal", "timestamp": NOW}
    payload, _ = REGISTRY.encode("AfiliadoRegistrado", v2, 2)
    with runtime.db.transaction() as session:
        session.execute(tables.afiliados.insert().values(
            id=legacy_id, user_id="u-old", email=EMAIL, nombre=NOMBRE, estado="validado", motivos="",
            registrado_en=NOW, validado_en=NOW, comisiones=0, ganancias_pendientes=0, tipo_documento="CC",
            numero_documento=DOCUMENTO, pais="CO", metodo_pago="paypal"))
        session.execute(tables.outbox.insert().values(
            event_id=new_id(), topic="afiliados.eventos", event_type="AfiliadoRegistrado", schema_version=2,
            partition_key=legacy_id, payload=payload, occurred_at=NOW, correlation_id=legacy_id,
            causation_id=legacy_id, status="sent", attempts=1, created_at=NOW))
    before = client.get(f"/afiliados/{legacy_id}").json()
    assert (before["email"], before["nombre"], before["numero_documento"]) == (EMAIL, NOMBRE, "****345")
    assert _leaks_at_rest(runtime) != []

    assert _job(runtime, "seal-personal-data") >= 1
    assert _leaks_at_rest(runtime) == []
    assert client.get(f"/afiliados/{legacy_id}").json() == before
    [(version, event)] = _outbox(runtime, tables, "AfiliadoRegistrado")
    assert version == 3 and _secrets_in(event) == []
    assert event["email_sha256"] == hashlib.sha256(EMAIL.encode()).hexdigest()
    assert _job(runtime, "seal-personal-data") == 0  # nothing left

    # A legacy holder still counts for duplicates: the same document is taken.
    taken = client.post("/afiliados", json={**FULL, "user_id": "u-new", "email": "otra@example.com"}).json()["id"]
    _job(runtime, "validate-afiliados")
    assert client.get(f"/afiliados/{taken}").json()["motivos"] == ["documento_duplicado"]


# -- marketing keeps only the hash, and forgets it ------------------------------------------------------
def _incoming(event_type: str, payload: dict, version: int) -> IncomingEvent:
    data, _ = REGISTRY.encode(event_type, payload, version)
    event_id = new_id()
    return IncomingEvent("afiliados.eventos", "marketing-consumer", event_id, event_type, version,
                         payload["id"], NOW, event_id, event_id, REGISTRY.decode(event_type, data, version), data)


def test_marketing_keeps_only_the_email_hash_and_forgets_it_on_erasure(tmp_path):
    from alpes.marketing import campaigns

    _, runtime, tables = _service("marketing", tmp_path)
    digest = hashlib.sha256(EMAIL.encode()).hexdigest()

    def stored(afiliado_id):
        with runtime.db.read() as session:
            return session.scalar(select(tables.afiliados.c.email_sha256)
                                  .where(tables.afiliados.c.afiliado_id == afiliado_id))

    with runtime.db.transaction() as session:
        campaigns.note_registered_afiliado(session, _incoming("AfiliadoRegistrado", {
            "id": "a3", "user_id": "u", "email": "pii1.sealed-token", "nombre": "pii1.sealed-name", "pais": "CO",
            "email_sha256": digest, "timestamp": NOW}, 3))
        campaigns.note_registered_afiliado(session, _incoming("AfiliadoRegistrado", {
            "id": "a2", "user_id": "u", "email": " Ana.Perez@example.com", "nombre": NOMBRE, "pais": "CO",
            "timestamp": NOW}, 2))
    assert stored("a3") == digest  # v3: the hash it carries, never a hash of the sealed token
    assert stored("a2") == digest  # v2 (old, in clear): hashed on arrival, the address not kept

    with runtime.db.transaction() as session:
        handlers = {s.subscription: s for s in import_module("alpes.marketing.consumers").consumer_specs()
                    if s.topic == "afiliados.eventos"}["marketing-consumer"].handlers
        handlers["DatosPersonalesBorrados"](session, _incoming("DatosPersonalesBorrados",
                                                                {"id": "a3", "timestamp": NOW}, 1))
        [enabled] = [e for e in campaigns.enable_afiliado(session, _incoming(
            "AfiliadoValidado", {"id": "a3", "timestamp": NOW}, 1)) if e.event_type == "AfiliadoHabilitado"]
    assert stored("a3") is None and enabled.payload["email_sha256"] is None
    assert stored("a2") == digest
    runtime.db.dispose()


# -- the audit log -----------------------------------------------------------------------------------------
def test_the_audit_log_holds_no_personal_data_and_verifies_after_erasure(afiliados, tmp_path):
    """In-process: every afiliados event, decoded as the audit consumer decodes it, appended to the chain."""
    from alpes.auditoria import handlers as audit

    client, runtime, tables = afiliados
    audit_client, auditoria, _ = _service("auditoria", tmp_path / "auditoria")
    seen: set[str] = set()

    def audit_outbox():
        with runtime.db.read() as session:
            rows = session.execute(select(tables.outbox).order_by(tables.outbox.c.id)).mappings().all()
        with auditoria.db.transaction() as session:
            for r in rows:
                if r["event_id"] in seen:
                    continue
                seen.add(r["event_id"])
                audit.audit_event(session, IncomingEvent(
                    r["topic"], "audit-consumer", r["event_id"], r["event_type"], r["schema_version"],
                    r["partition_key"], r["occurred_at"], r["correlation_id"], r["causation_id"],
                    REGISTRY.decode(r["event_type"], r["payload"], r["schema_version"]), r["payload"]))

    afiliado_id = client.post("/afiliados", json=FULL).json()["id"]
    _job(runtime, "validate-afiliados")
    audit_outbox()
    records = audit_client.get("/auditoria/eventos").json()["eventos"]
    assert [r["event_type"] for r in records] == ["AfiliadoRegistrado", "AfiliadoValidado"]
    assert _secrets_in(records) == []

    assert client.delete(f"/afiliados/{afiliado_id}/datos-personales").status_code == 200
    audit_outbox()
    records = audit_client.get("/auditoria/eventos").json()["eventos"]
    assert [r["event_type"] for r in records][-1] == "DatosPersonalesBorrados"
    assert _secrets_in(records) == [] and _secrets_in(client.get("/afiliados").text) == []
    verification = audit_client.get("/auditoria/verificacion").json()
    assert verification["ok"] is True and verification["records"] == 3
    auditoria.db.dispose()


# -- end to end through the running platform ----------------------------------------------------------------
def test_registration_and_erasure_through_the_platform(tmp_path):
    platform = Platform(tmp_path / "alpes").start()
    try:
        registered = platform.post("afiliados", "/afiliados", {**FULL, "user_id": "pii-e2e"})
        assert registered.status_code == 201, registered.text
        afiliado_id = registered.json()["id"]
        wait_until(lambda: platform.get("afiliados", f"/afiliados/{afiliado_id}")["estado"] == "validado",
                   what="validated", diagnose=platform.diagnostics)

        def audited(*types):
            events = platform.get("auditoria", "/auditoria/eventos", aggregate_id=afiliado_id)["eventos"]
            return events if set(types) <= {e["event_type"] for e in events} else None
        events = wait_until(lambda: audited("AfiliadoRegistrado", "AfiliadoValidado", "AfiliadoHabilitado"),
                            what="registration audited", diagnose=platform.diagnostics)
        assert _secrets_in(events) == []

        erased = platform.http.delete(platform.url("afiliados") + f"/afiliados/{afiliado_id}/datos-personales")
        assert erased.status_code == 200, erased.text
        events = wait_until(lambda: audited("DatosPersonalesBorrados"), what="erasure audited",
                            diagnose=platform.diagnostics)
        assert _secrets_in(events) == []
        assert _secrets_in(platform.http.get(platform.url("afiliados") + "/afiliados").text) == []
        assert _secrets_in(platform.get("afiliados", f"/afiliados/{afiliado_id}")) == []
        verification = platform.get("auditoria", "/auditoria/verificacion")
        assert verification["ok"] is True, verification
    finally:
        platform.stop()


# -- the migration from clear columns, on SQLite and MariaDB ----------------------------------------------
def test_migration_0004_keeps_legacy_rows_and_lets_the_service_seal_them(db_url, tmp_path):
    from alpes.kernel.db import Database, migrate

    migrate(db_url, "alpes.afiliados:migrations", "0003_commission_lifecycle")
    legacy_id = new_id()
    engine = create_engine(db_url)
    old_table = Table("afiliados", MetaData(), autoload_with=engine)  # as revision 0003 left it
    with engine.begin() as connection:
        connection.execute(old_table.insert().values(
            id=legacy_id, user_id="u-old", email=EMAIL, nombre=NOMBRE, estado="validado", motivos="",
            registrado_en=utcnow().replace(tzinfo=None), comisiones=0, ganancias_pendientes=0, tipo_documento="CC",
            numero_documento=DOCUMENTO, pais="CO", metodo_pago="paypal"))
    engine.dispose()

    settings = Settings(data_dir=tmp_path, broker_url="pulsar://127.0.0.1:1", afiliados_db_url=db_url)
    app, runtime = import_module("alpes.afiliados.service").build(settings)  # migrates to head, seals
    try:
        client = TestClient(app)
        assert _leaks_at_rest(runtime) == []
        legacy = client.get(f"/afiliados/{legacy_id}").json()
        assert (legacy["email"], legacy["nombre"], legacy["numero_documento"]) == (EMAIL, NOMBRE, "****345")
        # The unique email constraint is gone: a second registration with it is stored, then rejected.
        second = client.post("/afiliados", json={**FULL, "user_id": "u-2", "numero_documento": "ZZ99999"})
        assert second.status_code == 201, second.text
        _job(runtime, "validate-afiliados")
        assert client.get(f"/afiliados/{second.json()['id']}").json()["motivos"] == ["cuenta_duplicada"]
    finally:
        runtime.db.dispose()
        Database(db_url).dispose()
