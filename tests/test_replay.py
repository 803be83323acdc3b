"""Conversiones projections rebuilt from the event store: the replay gives back exactly what the
live path built, upcasts old event versions, and runs from the `alpes replay` command."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from importlib import import_module

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update
from typer.testing import CliRunner

from alpes.cli import app as cli_app
from alpes.conversiones import commands, projections, records, saga_answers, tables
from alpes.conversiones.stream import load_conversion
from alpes.kernel.db import Database, migrate
from alpes.kernel.eventstore import NewEvent
from alpes.kernel.messages import new_id, utcnow
from alpes.settings import Settings

GRACE = timedelta(seconds=10)  # the default ALPES_REFERENCE_GRACE_SECONDS


def _service(db_url: str | None, data_dir):
    """The conversiones service in-process, without its broker-side lifespan (as in test_http)."""
    settings = Settings(data_dir=data_dir, broker_url="pulsar://127.0.0.1:1", conversiones_db_url=db_url,
                        reference_grace_seconds=GRACE.total_seconds())
    fastapi_app, runtime = import_module("alpes.conversiones.service").build(settings)
    return TestClient(fastapi_app), runtime


def _post(client, affiliate_id, campaign_id, value, currency="EUR", order_id=None) -> str:
    body = {"affiliate_id": affiliate_id, "campaign_id": campaign_id, "user_id": "cust", "conversion_value": value,
            "conversion_type": "sale", "currency": currency}
    if order_id:
        body["order_id"] = order_id
    response = client.post("/conversiones", json=body)
    assert response.status_code == 200, response.text
    return response.json()["id"]


def _learn(runtime, afiliados: dict[str, str], campanas: dict[str, tuple[str, str]]) -> None:
    """Reference data as the marketing.eventos consumer would have stored it."""
    with runtime.db.transaction() as session:
        for afiliado_id, estado in afiliados.items():
            session.execute(tables.ref_afiliados.insert().values(afiliado_id=afiliado_id, estado=estado,
                                                                 updated_at=utcnow()))
        for campana_id, (estado, moneda) in campanas.items():
            session.execute(tables.ref_campanas.insert().values(campana_id=campana_id, estado=estado, moneda=moneda,
                                                                updated_at=utcnow()))


def _record_mix(client, runtime) -> None:
    """Validated, rejected (for each reason, at once and after the grace period) and pending
    conversions over several affiliates, campaigns and currencies."""
    _learn(runtime, {"a1": "habilitado", "a2": "habilitado", "a3": "suspendido"},
           {"k1": ("activa", "EUR"), "k2": ("activa", "USD"), "k3": ("pausada", "EUR")})
    store = records.event_store(runtime.registry)
    # Unknown references: rejected once the grace period has run out.
    _post(client, "gone", "k1", "5.00")
    _post(client, "a1", "k-gone", "6.00")
    assert commands.validate_pending(runtime.db, store, runtime.outbox, GRACE, now=utcnow() + 2 * GRACE) == 2
    for n, value in enumerate(["99.99", "0.01", "1234567.89"]):
        _post(client, "a1", "k1", value, order_id=f"o-{n}")          # validated
    _post(client, "a1", "k1", "99.99", order_id="o-0")                # a repeated postback: no new conversion
    _post(client, "a1", "k2", "10.05", currency="USD")               # validated, in USD
    _post(client, "a1", "k2", "10.05")                               # rejected: currency mismatch
    _post(client, "a1", "k1", "20.00", currency="USD")               # rejected: currency mismatch, in USD
    _post(client, "a2", "k1", "0.10")                                # validated
    _post(client, "a2", "k3", "3.00")                                # rejected: campaign inactive
    _post(client, "a3", "k1", "4.00")                                # rejected: affiliate not enabled
    _post(client, "a4", "k1", "7.77")                                # pending: a4 not known yet
    _post(client, "a4", "k1", "8.88")
    _post(client, "a5", "k5", "2.50", currency="GBP")                # pending, then validated below
    _learn(runtime, {"a5": "habilitado"}, {"k5": ("activa", "GBP")})
    assert commands.validate_pending(runtime.db, store, runtime.outbox, GRACE) == 1


EXPECTED_FIGURES = {
    # (affiliate, campaign, currency): (detected, validated, rejected, validated revenue)
    ("a1", "k-gone", "EUR"): (1, 0, 1, Decimal("0.00")),
    ("a1", "k1", "EUR"): (3, 3, 0, Decimal("1234667.89")),
    ("a1", "k1", "USD"): (1, 0, 1, Decimal("0.00")),
    ("a1", "k2", "EUR"): (1, 0, 1, Decimal("0.00")),
    ("a1", "k2", "USD"): (1, 1, 0, Decimal("10.05")),
    ("a2", "k1", "EUR"): (1, 1, 0, Decimal("0.10")),
    ("a2", "k3", "EUR"): (1, 0, 1, Decimal("0.00")),
    ("a3", "k1", "EUR"): (1, 0, 1, Decimal("0.00")),
    ("a4", "k1", "EUR"): (2, 0, 0, Decimal("0.00")),
    ("a5", "k5", "GBP"): (1, 1, 0, Decimal("2.50")),
    ("gone", "k1", "EUR"): (1, 0, 1, Decimal("0.00")),
}


def _snapshot(db: Database) -> dict[str, list[dict]]:
    """Every row of every projection, in primary-key order."""
    with db.read() as session:
        return {t.name: [dict(r) for r in session.execute(select(t).order_by(*t.primary_key.columns)).mappings()]
                for t in tables.projection_tables}


def _figures(db: Database) -> dict:
    f = tables.conversion_figures
    with db.read() as session:
        return {(r.affiliate_id, r.campaign_id, r.currency): (r.detected, r.validated, r.rejected, r.validated_revenue)
                for r in session.execute(select(f))}


def _damage_projections(db: Database) -> None:
    """Make the projections wrong, so only a real rebuild can make them right again."""
    v, f = tables.conversiones_view, tables.conversion_figures
    with db.transaction() as session:
        first = session.scalar(select(v.c.id).order_by(v.c.id).limit(1))
        session.execute(v.delete().where(v.c.id == first))
        session.execute(update(v).values(status="rejected", reason="tampered"))
        session.execute(update(f).values(detected=f.c.detected + 5, validated_revenue=Decimal("0.00")))
        session.execute(f.insert().values(affiliate_id="ghost", campaign_id="k1", currency="EUR", detected=1,
                                          validated=0, rejected=0, validated_revenue=Decimal("0.00")))


@pytest.fixture
def filled(db_url, tmp_path):
    client, runtime = _service(db_url, tmp_path)
    _record_mix(client, runtime)
    yield client, runtime
    runtime.db.dispose()


def test_live_figures_count_each_outcome_per_affiliate_campaign_and_currency(filled):
    client, runtime = filled
    assert _figures(runtime.db) == EXPECTED_FIGURES
    # The figures agree with the conversion list they summarise.
    listed = client.get("/conversiones").json()["conversiones"]
    assert sum(c["status"] == "detected" for c in listed) == 2
    assert sum(c["status"] == "validated" for c in listed) == 6
    assert sum(c["status"] == "rejected" for c in listed) == 6


def test_figures_endpoint_filters_and_gives_money_as_strings(filled):
    client, _ = filled
    everything = client.get("/conversiones/cifras")
    assert everything.status_code == 200
    rows = everything.json()["cifras"]
    assert [(r["affiliate_id"], r["campaign_id"], r["currency"]) for r in rows] == sorted(EXPECTED_FIGURES)
    assert client.get("/conversiones/cifras", params={"affiliate_id": "a1", "campaign_id": "k1"}).json() == {
        "cifras": [{"affiliate_id": "a1", "campaign_id": "k1", "currency": "EUR", "detected": 3, "validated": 3,
                    "rejected": 0, "pending": 0, "validated_revenue": "1234667.89"},
                   {"affiliate_id": "a1", "campaign_id": "k1", "currency": "USD", "detected": 1, "validated": 0,
                    "rejected": 1, "pending": 0, "validated_revenue": "0.00"}]}
    by_campaign = client.get("/conversiones/cifras", params={"campaign_id": "k2"}).json()["cifras"]
    assert [(r["currency"], r["validated_revenue"], r["rejected"]) for r in by_campaign] == [
        ("EUR", "0.00", 1), ("USD", "10.05", 0)]
    [a4] = client.get("/conversiones/cifras", params={"affiliate_id": "a4"}).json()["cifras"]
    assert (a4["detected"], a4["pending"], a4["validated_revenue"]) == (2, 2, "0.00")
    assert client.get("/conversiones/cifras", params={"affiliate_id": "nobody"}).json() == {"cifras": []}


def test_rebuild_gives_back_identical_projections(filled):
    _, runtime = filled
    before = _snapshot(runtime.db)
    assert len(before["conversiones_view"]) == 14 and len(before["conversion_figures"]) == len(EXPECTED_FIGURES)
    _damage_projections(runtime.db)
    assert _snapshot(runtime.db) != before
    seen = []
    summary = projections.rebuild_projections(runtime.db, runtime.registry, progress=lambda done, total: seen.append(
        (done, total)), batch=4)
    assert _snapshot(runtime.db) == before
    # 14 detections, 12 decisions (2 still pending): 26 events in 14 streams.
    assert (summary.events, summary.streams) == (26, 14) and summary.seconds >= 0
    assert seen[0] == (0, 26) and seen[-1] == (26, 26)
    assert [done for done, _ in seen] == sorted(done for done, _ in seen)
    # Replaying again changes nothing: the rebuild starts from empty projections every time.
    projections.rebuild_projections(runtime.db, runtime.registry)
    assert _snapshot(runtime.db) == before


def _record_later_steps(client, runtime) -> dict[str, str]:
    """Every other way a stream goes on, through the service's own commands: refunds and
    chargebacks, the saga's compensation, holds and both review outcomes."""
    with runtime.db.transaction() as session:
        session.execute(tables.ref_campanas.insert().values(campana_id="k9", estado="activa", moneda="EUR",
                                                            valor_maximo_conversion=Decimal("100.00"),
                                                            updated_at=utcnow()))
    store = records.event_store(runtime.registry)
    ids = {name: _post(client, "a1", "k9", value) for name, value in [
        ("refunded", "40.00"), ("charged_back", "41.00"), ("compensated", "42.00"), ("held", "500.00"),
        ("approved", "501.00"), ("refused", "502.00"), ("approved_refunded", "503.00")]}
    with runtime.db.transaction() as session:
        commands.refund_conversion(session, store, ids["refunded"], "reembolso", "returned")
        commands.refund_conversion(session, store, ids["charged_back"], "contracargo", None)
        saga_answers.compensate(session, store, load_conversion(session, store, ids["compensated"]),
                                "commission_denied:campaign_closed", utcnow())
        commands.review_conversion(session, store, ids["approved"], True)
        commands.review_conversion(session, store, ids["refused"], False, "duplicate")
        commands.review_conversion(session, store, ids["approved_refunded"], True)
        commands.refund_conversion(session, store, ids["approved_refunded"], "reembolso", None)
    return ids


@pytest.mark.parametrize("batch", [1, 3, 20_000])
def test_rebuild_equals_the_live_projections_of_every_kind_of_stream(filled, batch):
    """Held, reviewed, refunded and compensated streams too, whatever the chunk size (a stream
    cut across chunks, every event its own chunk, everything in one)."""
    client, runtime = filled
    ids = _record_later_steps(client, runtime)
    live = _snapshot(runtime.db)
    statuses = {row["id"]: (row["status"], row["reason"]) for row in live["conversiones_view"]}
    assert statuses[ids["refunded"]] == ("refunded", "reembolso")
    assert statuses[ids["charged_back"]] == ("refunded", "contracargo")
    assert statuses[ids["compensated"]] == ("rejected", "commission_denied:campaign_closed")
    assert statuses[ids["held"]] == ("on_hold", "value_above_maximum")
    assert statuses[ids["approved"]] == ("validated", "value_above_maximum")
    assert statuses[ids["refused"]] == ("rejected", "rejected_in_review:duplicate")
    # Compensated: counted rejected, its validation taken back; refunds leave the figures alone.
    assert _figures(runtime.db)[("a1", "k9", "EUR")] == (7, 4, 2, Decimal("1085.00"))  # 40 + 41 + 501 + 503
    _damage_projections(runtime.db)
    summary = projections.rebuild_projections(runtime.db, runtime.registry, batch=batch)
    assert _snapshot(runtime.db) == live
    assert (summary.events, summary.streams) == (26 + 7 + 7 + 7, 14 + 7)  # detected, decided at once, later steps


def test_live_path_keeps_working_after_a_rebuild(filled):
    client, runtime = filled
    projections.rebuild_projections(runtime.db, runtime.registry)
    _post(client, "a1", "k1", "0.90")
    assert _figures(runtime.db)[("a1", "k1", "EUR")] == (4, 4, 0, Decimal("1234668.79"))
    before = _snapshot(runtime.db)
    projections.rebuild_projections(runtime.db, runtime.registry)
    assert _snapshot(runtime.db) == before


def test_replay_upcasts_conversion_detected_v1(db_url, registry):
    migrate(db_url, "alpes.conversiones:migrations")
    db = Database(db_url)
    store = records.event_store(registry)
    stream, at = new_id(), utcnow()
    v1 = {"conversion_id": stream, "affiliate_id": "old-a", "campaign_id": "old-k", "user_id": "u",
          "conversion_value": Decimal("42.50"), "conversion_type": "sale", "timestamp": at}
    data, version = registry.encode("ConversionDetected", v1, version=1)
    assert version == 1 and registry.latest_version("ConversionDetected") == 2
    try:
        with db.transaction() as session:
            # Written before order_id and currency existed (schema v1), never projected.
            session.execute(tables.event_store.insert().values(
                stream_id=stream, version=1, event_id=new_id(), stream_type=records.STREAM_TYPE,
                event_type="ConversionDetected", schema_version=1, payload=data, occurred_at=at, recorded_at=at,
                correlation_id=stream))
            store.append(session, stream, 1, [NewEvent("ConversionValidated", {
                "conversion_id": stream, "affiliate_id": "old-a", "campaign_id": "old-k",
                "conversion_value": Decimal("42.50"), "currency": "EUR", "conversion_type": "sale",
                "timestamp": at}, at)], stream)
        summary = projections.rebuild_projections(db, registry)
        assert (summary.events, summary.streams) == (2, 1)
        [row] = _snapshot(db)["conversiones_view"]
        assert (row["id"], row["currency"], row["order_id"], row["conversion_value"], row["status"]) == (
            stream, "EUR", None, Decimal("42.50"), "validated")
        assert row["timestamp"] == at and row["updated_at"] == at
        assert _figures(db) == {("old-a", "old-k", "EUR"): (1, 1, 0, Decimal("42.50"))}
    finally:
        db.dispose()


def test_migration_backfills_figures_from_the_view(filled, db_url):
    from alembic import command
    from alembic.config import Config

    _, runtime = filled
    before = _snapshot(runtime.db)
    config = Config()
    config.set_main_option("script_location", "alpes.conversiones:migrations")
    config.set_main_option("sqlalchemy.url", db_url.replace("%", "%%"))
    runtime.db.dispose()
    command.downgrade(config, "0001")  # a database from before the figures projection
    command.upgrade(config, "head")
    assert _snapshot(runtime.db) == before


def test_cli_replay_rebuilds_the_service_database(db_url, tmp_path):
    data_dir = tmp_path / "data"
    # On SQLite, the service's own file in the data dir; on MariaDB, the URL from the environment.
    service_url = None if db_url.startswith("sqlite") else db_url
    client, runtime = _service(service_url, data_dir)
    _record_mix(client, runtime)
    before = _snapshot(runtime.db)
    _damage_projections(runtime.db)
    runtime.db.dispose()  # the service is stopped

    result = CliRunner().invoke(cli_app, ["replay", "conversiones", "--data-dir", str(data_dir)],
                                env={"ALPES_CONVERSIONES_DB_URL": service_url})
    assert result.exit_code == 0, result.output
    assert "replayed 26 events of 14 streams in" in result.output
    db = Database(service_url or f"sqlite:///{data_dir / 'conversiones.db'}")
    try:
        assert _snapshot(db) == before
    finally:
        db.dispose()


def test_cli_replay_refuses_a_data_dir_without_a_database(tmp_path):
    result = CliRunner().invoke(cli_app, ["replay", "conversiones", "--data-dir", str(tmp_path / "typo")],
                                env={"ALPES_CONVERSIONES_DB_URL": None})
    assert result.exit_code == 1
    assert "no conversiones database" in result.output
    assert not (tmp_path / "typo").exists()
