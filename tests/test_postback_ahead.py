"""A postback validated at once is built before its write turn (commands._validated_ahead, issue 11)
and taken in the turn only when the facts read there decide that verdict for a new order id. Every
postback must leave exactly the rows, events and answers it left when everything was built in the
turn: validated, held, rejected, left detected, repeated, conflicting, through a click, and the
postbacks of one commit group counting each other."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from decimal import Decimal
from importlib import import_module

import pytest
from sqlalchemy import select

from alpes.conversiones import commands, domain, records, reference, tables
from alpes.kernel.codec import SchemaRegistry
from alpes.settings import Settings
from commit_groups import in_one_commit_group

REGISTRY = SchemaRegistry.from_directory()
NOW = datetime(2026, 12, 6, 12, 0, tzinfo=timezone.utc)
GRACE = timedelta(seconds=30)


def _runtime(path):
    _app, runtime = import_module("alpes.conversiones.service").build(
        Settings(data_dir=path, broker_url="pulsar://127.0.0.1:1"))
    with runtime.db.transaction() as session:
        common = {"estado": "activa", "moneda": "EUR", "updated_at": NOW, "ventana_atribucion_dias": 30,
                  "fecha_inicio": NOW - timedelta(days=10), "fecha_fin": NOW + timedelta(days=10),
                  "anunciante_id": "A", "min_segundos_click_conversion": None, "valor_maximo_conversion": Decimal("500")}
        session.execute(tables.ref_campanas.insert(), [{**common, "campana_id": "kA"}])
        session.execute(tables.ref_afiliados.insert(), [
            {"afiliado_id": "a1", "estado": reference.AFILIADO_HABILITADO, "updated_at": NOW, "email_sha256": None}])
        session.execute(tables.ref_inscripciones.insert(), [
            {"link_code": "linka1", "inscripcion_id": "i1", "afiliado_id": "a1", "campana_id": "kA", "activa": True,
             "updated_at": NOW}])
        session.execute(tables.clicks.insert(), [
            {"id": "click-1", "link_code": "linka1", "affiliate_id": "a1", "campaign_id": "kA",
             "clicked_at": NOW - timedelta(minutes=3)}])
    return runtime


def _postback(runtime, *, order_id, value="80.00", currency="EUR", campaign="kA", ip="198.51.100.1",
              caller_key="key:k1", email=None, click_id=None, max_per_ip=5):
    def unit():
        try:
            return commands.receive_postback(
                runtime, records.event_store(REGISTRY), affiliate_id=None if click_id else "a1",
                campaign_id=None if click_id else campaign, click_id=click_id, user_id="u",
                conversion_value=Decimal(value), conversion_type="sale", currency=currency, order_id=order_id, ip=ip,
                customer_email=email, now=NOW, grace=GRACE, max_conversions_per_ip=max_per_ip, caller_key=caller_key)
        except Exception as error:  # noqa: BLE001 - compared as the answer
            return type(error).__name__
    return unit


# One after the other, then a commit group of three from one IP (limit two: one is held).
SEQUENCE = [
    dict(order_id="o1", email="Shop@Example.com"),
    dict(order_id="o2", ip="203.0.113.9", caller_key=None),
    dict(order_id=None, ip=None, caller_key=None),
    dict(order_id="o3", click_id="click-1"),
    dict(order_id="o4", value="900.00"),              # above the campaign's maximum: held
    dict(order_id="o5", currency="USD"),              # rejected
    dict(order_id="o6", campaign="kUnknown"),         # left detected for the grace
    dict(order_id="o1", email="Shop@Example.com"),    # a repeat: the same conversion
    dict(order_id="o1", value="81.00"),               # the key with other parameters: refused
]
GROUP = [dict(order_id=f"g{i}", ip="192.0.2.50", max_per_ip=2) for i in range(3)]
GROUP_ORDERS = {postback["order_id"] for postback in GROUP}

_TABLES = ("order_keys", "click_attributions", "conversion_signals", "caller_minutes", "conversiones_view",
           "conversion_figures", "sagas", "saga_pasos", "event_store", "outbox")


def _everything(runtime, answers) -> dict:
    """Every row the postbacks left, with their conversion ids as the postback's number and every
    time as whether it is set, the payloads decoded: what must not depend on how they were built."""
    ids = {}
    for i, answer in enumerate(answers):
        if isinstance(answer, tuple):  # the group's in no set order: which of them is held may differ
            ids.setdefault(answer[0], f"postback-{i}" if i < len(SEQUENCE) else "group")

    def plain(value):
        if isinstance(value, str) and value in GROUP_ORDERS:
            return "g"
        if isinstance(value, str):
            for conversion_id, name in ids.items():
                value = value.replace(conversion_id, name)
            return value
        if isinstance(value, datetime):
            return "time"
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items() if k not in ("id", "event_id", "created_at")}
        return value

    found = {}
    with runtime.db.read() as session:
        for name in _TABLES:
            table = getattr(tables, name)
            rows = []
            for row in session.execute(select(table)).mappings():
                row = dict(row)
                if "payload" in row:
                    row["payload"] = REGISTRY.decode(row["event_type"], row["payload"], row["schema_version"])
                rows.append(plain(row))
            found[name] = sorted(rows, key=repr)
    return found


@pytest.mark.parametrize("ahead", [True, False], ids=["built-ahead", "built-in-the-turn"])
def test_postbacks_built_ahead_leave_what_postbacks_built_in_the_turn_leave(tmp_path, monkeypatch, ahead):
    results = {}
    for built_ahead in (True, False):
        runtime = _runtime(tmp_path / f"ahead-{built_ahead}")
        recorded = []
        real_record = commands.record_conversion
        monkeypatch.setattr(commands, "record_conversion",
                            lambda *a, **k: recorded.append(k["order_id"]) or real_record(*a, **k))
        if not built_ahead:
            monkeypatch.setattr(commands, "_validated_ahead", lambda *a, **k: None)
        try:
            answers = [_postback(runtime, **postback)() for postback in SEQUENCE]
            answers += in_one_commit_group(runtime.db, [_postback(runtime, **postback) for postback in GROUP])
            results[built_ahead] = ([a if not isinstance(a, tuple) else (a[1], a[2]) for a in answers],
                                    _everything(runtime, answers), recorded)
        finally:
            monkeypatch.undo()
            runtime.db.dispose()
    answers, rows, recorded = results[ahead]
    assert answers[:9] == [(True, "validated")] * 4 + [(True, "on_hold"), (True, "rejected"), (True, "detected"),
                                                        (False, "validated"), "IdempotencyConflict"]
    assert sorted(answers[9:]) == [(True, "on_hold"), (True, "validated"), (True, "validated")]
    assert (answers, rows) == results[not ahead][:2]
    assert rows["event_store"] and rows["outbox"] and rows["conversion_signals"] and rows["click_attributions"]
    if ahead:
        # Only the postbacks not validated at once (and the repeats, whose keys are read) were built in the turn.
        assert recorded[:5] == ["o4", "o5", "o6", "o1", "o1"] and len(recorded) == 6
        assert recorded[5] in GROUP_ORDERS  # the one its group holds
    else:
        assert len(recorded) == len(SEQUENCE) + len(GROUP)
