"""The tracking redirect answers before its click's row is written (issue 11): rows wait in memory
and are written in batches with one ClicksRecorded per link, and the click id is a signed token
from which a postback is attributed when the row is missing (not yet written, or lost to a crash)."""

from __future__ import annotations

import time
from datetime import timedelta
from decimal import Decimal
from importlib import import_module

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import delete, select
from test_attribution import HOUR, _convert, _validated_events, _visit, conv  # noqa: F401  (conv: the fixture)
from test_campaign_lifecycle import _incoming
from test_tracking import NOW, POSTBACK, REGISTRY, Clock, _click, _click_id, tracking  # noqa: F401  (the fixture)

from alpes.conversiones import domain, tracking as ctracking
from alpes.conversiones import reference as conversiones_reference
from alpes.kernel.errors import NotFound
from alpes.settings import Settings


def _recorder(runtime) -> ctracking.ClickRecorder:
    [job] = [j for j in runtime.jobs if j.name == "record-clicks"]
    assert job.exclusive is False and job.on_stop is not None  # every instance flushes what it holds
    return job.run.__self__


def _running(runtime) -> None:
    """The service as when started (its jobs would run), without a broker: the test flushes by hand."""
    runtime.started_at = time.time()


def _stored(runtime, tables) -> list[dict]:
    with runtime.db.read() as session:
        return [dict(r) for r in session.execute(select(tables.clicks).order_by(tables.clicks.c.clicked_at))
                .mappings()]


def _batches(runtime, tables) -> list[tuple[str, dict]]:
    with runtime.db.read() as session:
        rows = session.execute(select(tables.outbox).where(tables.outbox.c.event_type == "ClicksRecorded")
                               .order_by(tables.outbox.c.id)).mappings().all()
    return [(r["partition_key"], REGISTRY.decode("ClicksRecorded", r["payload"], r["schema_version"])) for r in rows]


# -- click ids ------------------------------------------------------------------------------------
def test_a_click_id_is_a_signed_token_naming_the_link_and_the_time():
    ids = domain.ClickIds([b"k" * 32])
    click_id, clicked_at = ids.new("abcdefghij", NOW + timedelta(microseconds=123_456))
    assert len(click_id) == 35 and click_id.startswith("abcdefghij.")
    assert clicked_at == NOW + timedelta(milliseconds=123)  # what the id keeps, the row keeps
    assert ids.verified(click_id) == domain.SignedClick("abcdefghij", clicked_at)
    assert ids.new("abcdefghij", NOW)[0] != ids.new("abcdefghij", NOW)[0]  # random part: unique ids
    # Rotation: an id signed with a key being retired still verifies; another key's does not.
    assert domain.ClickIds([b"n" * 32, b"k" * 32]).verified(click_id) is not None
    assert domain.ClickIds([b"n" * 32]).verified(click_id) is None
    # Anything changed is refused: the link, the time, the signature; and what is not a token at all.
    body = click_id.split(".")[1]
    for forged in ("abcdefghik." + body, click_id[:-1] + ("A" if click_id[-1] != "A" else "B"),
                   click_id[:12] + ("A" if click_id[12] != "A" else "B") + click_id[13:],
                   "3f2b6c1e-8f0a-4c1e-9a57-8d2f6f1a0b7c", "", "abcdefghij." + "A" * 23, "x" * 12 + "." + body):
        assert ids.verified(forged) is None, forged
    # The marketing rule makes 10-character codes: the id fits the 36 characters click ids have.
    from alpes.marketing.domain import LINK_CODE_LENGTH
    assert LINK_CODE_LENGTH <= domain.ClickIds.MAX_LINK_CODE
    with pytest.raises(ValueError):
        ids.new("a" * (domain.ClickIds.MAX_LINK_CODE + 1), NOW)


# -- the redirect while the service runs: rows in batches ------------------------------------------
def test_clicks_wait_in_memory_then_go_in_one_transaction_with_one_event_per_link(tracking, monkeypatch):  # noqa: F811
    client, runtime, tables, clock = tracking
    _running(runtime)
    recorder = _recorder(runtime)
    ids = []
    for n in range(5):
        clock.now = NOW + timedelta(seconds=n)
        response = _click(client, **{"User-Agent": f"ua{n}"})
        assert response.status_code == 302
        ids.append(_click_id(response))
    assert _stored(runtime, tables) == [] and recorder.pending() == 5  # answered before any write
    monkeypatch.setattr(ctracking, "CLICK_FLUSH_INTERVAL_S", 60.0)
    assert recorder.flush() == 0 and recorder.pending() == 5  # younger than the interval: they wait
    monkeypatch.setattr(ctracking, "CLICK_FLUSH_INTERVAL_S", 0.0)
    monkeypatch.setattr(ctracking, "CLICKS_PER_EVENT", 2)
    assert recorder.flush() == 0 and recorder.pending() == 0
    rows = _stored(runtime, tables)
    assert [r["id"] for r in rows] == ids and [r["user_agent"] for r in rows] == [f"ua{n}" for n in range(5)]
    assert len({r["visitor_id"] for r in rows}) == 1  # one visitor: the client keeps its cookie
    batches = _batches(runtime, tables)
    assert [key for key, _ in batches] == ["k1"] * 3  # at most CLICKS_PER_EVENT clicks per event, keyed by campaign
    assert [c["click_id"] for _, e in batches for c in e["clicks"]] == ids
    assert {(e["link_code"], e["affiliate_id"], e["campaign_id"]) for _, e in batches} == {("linkcodea1", "a1", "k1")}
    assert [e["timestamp"] for _, e in batches] == [NOW, NOW + timedelta(seconds=2), NOW + timedelta(seconds=4)]
    # A postback for a click written in a batch is attributed through its row, as before.
    clock.now = NOW + timedelta(hours=1)
    body = client.post("/conversiones", json={**POSTBACK, "click_id": ids[0]}).json()
    assert (body["status"], client.get(f"/conversiones/{body['id']}").json()["affiliate_id"]) == ("validated", "a1")


def _three_due_clicks(tracking, monkeypatch) -> tuple[ctracking.ClickRecorder, list[str]]:  # noqa: F811
    """Three clicks waiting in the running service's recorder, due to be written."""
    client, runtime, _, _ = tracking
    _running(runtime)
    ids = [_click_id(_click(client)) for _ in range(3)]
    monkeypatch.setattr(ctracking, "CLICK_FLUSH_INTERVAL_S", 0.0)
    return _recorder(runtime), ids


def test_a_failed_flush_keeps_its_clicks_in_order_for_the_next(tracking, monkeypatch):  # noqa: F811
    client, runtime, tables, _ = tracking
    recorder, first = _three_due_clicks(tracking, monkeypatch)
    real = ctracking.store_clicks

    def refused(session, clicks, **_):
        raise RuntimeError("database unavailable")
    monkeypatch.setattr(ctracking, "store_clicks", refused)
    with pytest.raises(RuntimeError):
        recorder.flush()
    later = [_click_id(_click(client)) for _ in range(2)]
    assert recorder.pending() == 5 and _stored(runtime, tables) == []
    monkeypatch.setattr(ctracking, "store_clicks", real)
    recorder.flush()
    assert [r["id"] for r in _stored(runtime, tables)] == first + later
    assert [c["click_id"] for _, e in _batches(runtime, tables) for c in e["clicks"]] == first + later


def test_a_batch_written_again_after_an_unknown_outcome_adds_nothing(tracking):  # noqa: F811
    _, runtime, tables, _ = tracking
    ids = domain.ClickIds([b"k" * 32])
    with runtime.db.read() as session:
        link = ctracking.link_to_follow(session, "linkcodea1")
    clicks = [ctracking.new_click(ids, "linkcodea1", link, ip=None, user_agent=None, referrer=None, now=NOW)[0]
              for _ in range(3)]
    with runtime.db.transaction() as session:
        assert len(ctracking.store_clicks(session, clicks[:2])) == 1
    with runtime.db.transaction() as session:  # the commit had happened: only the third is new
        [(_, event)] = ctracking.store_clicks(session, clicks)
    assert [c["click_id"] for c in event.payload["clicks"]] == [clicks[2].row["id"]]
    with runtime.db.transaction() as session:
        assert ctracking.store_clicks(session, clicks) == []
    assert len(_stored(runtime, tables)) == 3


def test_stopping_writes_the_waiting_clicks_and_then_writes_each_click_at_once(tracking):  # noqa: F811
    client, runtime, tables, _ = tracking
    _running(runtime)
    recorder = _recorder(runtime)
    waiting = [_click_id(_click(client)) for _ in range(4)]
    recorder.close()  # what ServiceRuntime.stop runs once its jobs' loops ended
    assert [r["id"] for r in _stored(runtime, tables)] == waiting and recorder.pending() == 0
    after = _click_id(_click(client))
    assert after in {r["id"] for r in _stored(runtime, tables)} and recorder.pending() == 0


def test_when_too_many_clicks_wait_the_visitor_is_still_redirected_and_the_drop_counted(tracking, monkeypatch):  # noqa: F811
    client, runtime, tables, clock = tracking
    _running(runtime)
    recorder = _recorder(runtime)
    monkeypatch.setattr(ctracking, "MAX_PENDING_CLICKS", 2)
    responses = [_click(client) for _ in range(3)]
    assert [r.status_code for r in responses] == [302] * 3
    assert recorder.pending() == 2 and recorder.dropped == 1
    assert "alpes_click_rows_dropped_total 1.0" in client.get("/metrics").text
    # The dropped click's row is gone for reporting, but its id still attributes the sale.
    clock.now = NOW + timedelta(hours=1)
    body = client.post("/conversiones", json={**POSTBACK, "click_id": _click_id(responses[2])}).json()
    assert (body["status"], client.get(f"/conversiones/{body['id']}").json()["affiliate_id"]) == ("validated", "a1")


# -- attribution without the row ------------------------------------------------------------------
def test_a_click_whose_row_was_lost_still_attributes_and_keeps_its_time_for_the_rules(tracking):  # noqa: F811
    client, runtime, tables, clock = tracking
    click_id = _click_id(_click(client))
    with runtime.db.transaction() as session:  # as if a kill -9 took the row before it was written
        session.execute(delete(tables.clicks))
    clock.now = NOW + timedelta(days=7)  # the last moment of the 7-day window, counted from the id's time
    inside = client.post("/conversiones", json={**POSTBACK, "click_id": click_id, "order_id": "in"}).json()
    shown = client.get(f"/conversiones/{inside['id']}").json()
    assert (inside["status"], shown["affiliate_id"], shown["campaign_id"]) == ("validated", "a1", "k1")
    clock.now = NOW + timedelta(days=7, seconds=1)
    late = client.post("/conversiones", json={**POSTBACK, "click_id": click_id, "order_id": "late"}).json()
    assert (late["status"], client.get(f"/conversiones/{late['id']}").json()["reason"]) == (
        "rejected", "outside_attribution_window")
    # Ids given beside it are checked against what the token names.
    wrong = client.post("/conversiones", json={**POSTBACK, "click_id": click_id, "affiliate_id": "a2",
                                               "order_id": "wrong"})
    assert wrong.status_code == 422 and {e["field"] for e in wrong.json()["errors"]} == {"affiliate_id"}


def test_a_forged_or_foreign_click_id_attributes_nothing(tracking):  # noqa: F811
    client, runtime, tables, clock = tracking
    genuine = _click_id(_click(client))
    with runtime.db.transaction() as session:
        session.execute(delete(tables.clicks))
    other_platform = domain.ClickIds([b"another platform's key" * 2]).new("linkcodea1", NOW)[0]
    tampered = genuine[:-2] + ("AA" if genuine[-2:] != "AA" else "BB")
    clock.now = NOW + timedelta(hours=1)
    for n, forged in enumerate((other_platform, tampered, "linkcodea1." + "A" * 24)):
        answer = client.post("/conversiones", json={**POSTBACK, "click_id": forged, "order_id": f"f{n}"})
        assert answer.status_code == 422, (forged, answer.text)
        assert {e["field"] for e in answer.json()["errors"]} == {"click_id"}
    with runtime.db.read() as session:
        assert session.execute(select(tables.click_attributions)).all() == []


def test_a_token_for_a_link_conversiones_does_not_know_attributes_nothing(tmp_path):
    clock = Clock()
    settings = Settings(data_dir=tmp_path, broker_url="pulsar://127.0.0.1:1")
    app, runtime = import_module("alpes.conversiones.service").build(settings, clock=clock)
    client = TestClient(app)
    signed_here = domain.ClickIds(settings.signing_keys()).new("neverissued", NOW)[0]
    answer = client.post("/conversiones", json={**POSTBACK, "click_id": signed_here})
    assert answer.status_code == 422 and {e["field"] for e in answer.json()["errors"]} == {"click_id"}


# -- the link the redirect follows ----------------------------------------------------------------
def test_a_suspended_link_stops_redirecting_once_its_copy_is_older_than_a_second(tracking):  # noqa: F811
    _, runtime, _, _ = tracking
    now = [0.0]
    reads = []

    def read(code):
        reads.append(code)
        with runtime.db.read() as session:
            return ctracking.link_to_follow(session, code)
    links = ctracking.Links(read, clock=lambda: now[0])
    assert links.get("linkcodea1").campana_id == "k1" and links.get("linkcodea1") and reads == ["linkcodea1"]
    with runtime.db.transaction() as session:
        conversiones_reference.learn_inscripcion_estado(session, _incoming(REGISTRY, "InscripcionSuspendida", {
            "inscripcion_id": "i1", "campana_id": "k1", "afiliado_id": "a1", "link_code": "linkcodea1",
            "motivo": "fraude", "timestamp": NOW}, 1))
    now[0] = ctracking.LINK_TTL_S - 0.001
    assert links.get("linkcodea1").afiliado_id == "a1"  # its copy is still fresh
    now[0] = ctracking.LINK_TTL_S
    with pytest.raises(NotFound):
        links.get("linkcodea1")
    with pytest.raises(NotFound):  # a link not to follow is read again each time, never kept
        links.get("linkcodea1")
    assert reads == ["linkcodea1"] * 3 and links.cached("linkcodea1") is None


def test_a_signed_postback_names_a_click_whose_row_is_not_written_yet(tracking):  # noqa: F811
    client, runtime, tables, _ = tracking
    t = ctracking
    click_id = _click_id(_click(client))
    with runtime.db.transaction() as session:
        session.execute(delete(tables.clicks))
    with runtime.db.read() as session:
        assert t.campaign_of_click(session, click_id) == "k1"
        assert t.campaign_of_click(session, "linkcodezz." + click_id.split(".")[1]) is None
        assert t.campaign_of_click(session, "3f2b6c1e-8f0a-4c1e-9a57-8d2f6f1a0b7c") is None


def test_a_postback_right_after_the_clicks_sees_the_visitors_waiting_clicks_compete(conv):  # noqa: F811
    """The shop posts within the flush interval: the clicks this process holds are written first,
    so the first-click campaign still credits the affiliate who brought the visitor first."""
    app, runtime, tables, clock = conv
    _running(runtime)
    client = TestClient(app)
    first = _visit(client, clock, "kfa1link", timedelta(0))
    presented = _visit(client, clock, "kfa2link", timedelta(seconds=30))
    assert _recorder(runtime).pending() == 2 and _stored(runtime, tables) == []
    conversion = _convert(client, clock, presented, HOUR)
    assert (conversion["affiliate_id"], conversion["status"]) == ("a1", "validated")
    assert _validated_events(runtime, tables)[conversion["id"]]["click_id"] == first
    assert _recorder(runtime).pending() == 0


def test_a_flush_whose_commit_happened_but_reported_a_failure_is_not_written_twice(tracking, monkeypatch):  # noqa: F811
    _, runtime, tables, _ = tracking
    recorder, ids = _three_due_clicks(tracking, monkeypatch)
    calls = []

    def lost_answer() -> None:  # runs after the commit: as if the database's answer was lost
        calls.append(1)
        if len(calls) == 1:
            raise ConnectionError("answer lost")
    recorder.wake_relay = lost_answer
    with pytest.raises(ConnectionError):
        recorder.flush()
    assert recorder.pending() == 3 and [r["id"] for r in _stored(runtime, tables)] == ids
    recorder.flush()  # looks its clicks up: all stored, nothing written or announced again
    assert recorder.pending() == 0 and len(_stored(runtime, tables)) == 3
    assert [c["click_id"] for _, e in _batches(runtime, tables) for c in e["clicks"]] == ids


def test_batches_and_attribution_without_the_row_on_both_databases(db_url, tmp_path, monkeypatch):
    clock = Clock()
    settings = Settings(data_dir=tmp_path, broker_url="pulsar://127.0.0.1:1", conversiones_db_url=db_url)
    app, runtime = import_module("alpes.conversiones.service").build(settings, clock=clock)
    tables = import_module("alpes.conversiones.tables")
    with runtime.db.transaction() as session:
        for event_type, payload, version in (
            ("CampanaCreada", {"id": "k1", "nombre": "n", "porcentaje_comision": Decimal("10"), "moneda": "EUR",
                               "timestamp": NOW, "landing_url": "https://shop.example.com/v",
                               "ventana_atribucion_dias": 7}, 2),
            ("AfiliadoHabilitado", {"afiliado_id": "a1", "timestamp": NOW}, 1),
            ("AfiliadoInscrito", {"inscripcion_id": "i1", "campana_id": "k1", "afiliado_id": "a1",
                                  "link_code": "linkcodea1", "timestamp": NOW}, 1)):
            handler = {"CampanaCreada": conversiones_reference.learn_campana,
                       "AfiliadoHabilitado": conversiones_reference.learn_afiliado,
                       "AfiliadoInscrito": conversiones_reference.learn_inscripcion}[event_type]
            handler(session, _incoming(REGISTRY, event_type, payload, version))
    client = TestClient(app)
    _running(runtime)
    recorder = _recorder(runtime)
    try:
        ids = []
        for n in range(4):
            clock.now = NOW + timedelta(seconds=n)
            ids.append(_click_id(_click(client)))
        monkeypatch.setattr(ctracking, "CLICK_FLUSH_INTERVAL_S", 0.0)
        recorder.flush()
        assert [r["id"] for r in _stored(runtime, tables)] == ids
        # A batch repeated after an unknown outcome adds nothing (the lookup of stored ids).
        with runtime.db.read() as session:
            link = ctracking.link_to_follow(session, "linkcodea1")
        again = [ctracking.Click({**r, "id": i}, None, None) for r, i in zip(_stored(runtime, tables), ids)]
        with runtime.db.transaction() as session:
            assert ctracking.store_clicks(session, again) == []
        lost = _click_id(_click(client))  # waits in memory; the "crash" drops it
        recorder._pending.clear()
        clock.now = NOW + timedelta(hours=1)
        body = client.post("/conversiones", json={**POSTBACK, "click_id": lost}).json()
        shown = client.get(f"/conversiones/{body['id']}").json()
        assert (body["status"], shown["affiliate_id"], shown["campaign_id"]) == ("validated", "a1", "k1")
        assert link.campana_id == "k1" and len(_stored(runtime, tables)) == 4
    finally:
        runtime.db.dispose()
