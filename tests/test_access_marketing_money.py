"""Tenancy of marketing's money (issue 10): commissions, reports, payouts and the payment ledger.

Two advertisers (A, B) and an operator each own a campaign; two affiliates (X, Y) earn in them.
Every read is tried as each of them, by id and by filter, as an attacker would: a tenant sees its
own rows only, another tenant's id is 404 as an unknown one, a filter naming another tenant's ids
yields nothing, and an affiliate never sees customer data. Payouts belong to an advertiser: only
it (or an operator) creates and pays them, and a refused write stores and emits nothing. The tail
of hole 1 (payout fraud): an affiliate key can never create or pay a payout, even holding every
scope and with its commissions approved.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import Decimal
from importlib import import_module

import pytest
from access_helpers import bearer, install_key
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.exc import DBAPIError

from alpes.kernel.access import ALL_SCOPES, SYSTEM_PRINCIPAL, Principal
from alpes.kernel.db import Database, migrate
from alpes.kernel.errors import NotAllowed, NotFound
from alpes.kernel.messages import IncomingEvent, OutgoingEvent, new_id
from alpes.kernel.outbox import Outbox
from alpes.marketing import advertisers, campaigns, commissions, domain, payouts, reporting
from alpes.marketing import tables as marketing_tables
from alpes.settings import Settings

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)
# What a customer left in the conversion (ConversionDetected): must never reach an affiliate.
CUSTOMER_USER_ID = "cliente-7f3a-secreto"
CUSTOMER_IP = "203.0.113.77"
CUSTOMER_FIELDS = {"user_id", "ip", "client_ip", "email", "email_sha256", "email_hash", "user_agent", "visitor_id"}


def _incoming(topic: str, event_type: str, key: str, payload: dict) -> IncomingEvent:
    event_id = new_id()
    return IncomingEvent(topic, "test", event_id, event_type, 1, key, NOW, event_id, event_id, payload)


@dataclass
class World:
    """Marketing in-process with campaigns of A, B and the operator, and commissions of X and Y in
    them (approved, reported, in the ledger); keys for every kind of caller."""

    client: TestClient
    runtime: object
    tables: object
    campanas: dict[str, str] = field(default_factory=dict)  # "A", "B", "op" -> campaign id
    anunciantes: dict[str, str] = field(default_factory=dict)  # "A", "B" -> advertiser id
    comisiones: dict[tuple[str, str], str] = field(default_factory=dict)  # (owner, affiliate) -> commission id
    keys: dict[str, dict[str, str]] = field(default_factory=dict)  # caller -> headers
    emitted: list[OutgoingEvent] = field(default_factory=list)

    def get(self, who: str, path: str, **params):
        return self.client.get(path, params=params, headers=self.keys[who])

    def post(self, who: str, path: str, body: dict | None = None):
        return self.client.post(path, json=body, headers=self.keys[who])

    def outbox_rows(self) -> int:
        with self.runtime.db.transaction() as session:
            return session.scalar(select(func.count()).select_from(self.tables.outbox))

    def stored_pagos(self) -> list[dict]:
        with self.runtime.db.transaction() as session:
            return [dict(r) for r in session.execute(select(self.tables.pagos)).mappings()]

    def outbox(self, event_type: str) -> list[dict]:
        t = self.tables.outbox
        with self.runtime.db.transaction() as session:
            rows = session.execute(select(t).where(t.c.event_type == event_type).order_by(t.c.id)).mappings().all()
        return [{**self.runtime.registry.decode(r["event_type"], r["payload"], r["schema_version"]),
                 "_actor": (r["actor_id"], r["actor_role"])} for r in rows]

    def handle(self, handler, topic: str, event_type: str, key: str, payload: dict) -> list[OutgoingEvent]:
        with self.runtime.db.transaction() as session:
            events = handler(session, _incoming(topic, event_type, key, payload))
        self.emitted += events
        return events

    def commission_of(self, owner: str) -> set[str]:
        return {cid for (o, _), cid in self.comisiones.items() if o == owner}

    def commission_ids(self, who: str, **params) -> set[str]:
        response = self.get(who, "/comisiones", **params)
        assert response.status_code == 200, response.text
        return {c["id"] for c in response.json()["comisiones"]}


# What each affiliate earns where (10% of these values): X in every campaign, Y in A's and B's.
VALUES = {("A", "X"): "600.00", ("A", "Y"): "700.00", ("B", "X"): "800.00", ("B", "Y"): "900.00",
          ("op", "X"): "1000.00"}
AFFILIATES = {"X": "afiliado-x", "Y": "afiliado-y"}


def _build(tmp_path) -> World:
    settings = Settings(data_dir=tmp_path, broker_url="pulsar://127.0.0.1:1")
    app, runtime = import_module("alpes.marketing.service").build(settings)
    world = World(TestClient(app), runtime, import_module("alpes.marketing.tables"))
    client = world.client
    # Built as the local operator (no key exists yet), through the routes and the consumers' handlers.
    for owner in ("A", "B"):
        response = client.post("/anunciantes", json={"nombre": f"Marca {owner}"})
        assert response.status_code == 201, response.text
        world.anunciantes[owner] = response.json()["id"]
    for owner in ("A", "B", "op"):
        body = {"nombre": f"Programa {owner}", "porcentaje_comision": "10", "moneda": "EUR", "periodo_bloqueo_dias": 0}
        if owner != "op":
            body["anunciante_id"] = world.anunciantes[owner]
        response = client.post("/campanas", json=body)
        assert response.status_code == 201, response.text
        world.campanas[owner] = response.json()["id"]
    for (owner, who), valor in VALUES.items():
        campana, afiliado, conversion_id = world.campanas[owner], AFFILIATES[who], new_id()
        # What the analytics-consumer counts: the detected conversion carries the customer.
        detected = {"conversion_id": conversion_id, "affiliate_id": afiliado, "campaign_id": campana,
                    "user_id": CUSTOMER_USER_ID, "ip": CUSTOMER_IP, "conversion_value": Decimal(valor),
                    "conversion_type": "sale", "timestamp": NOW}
        world.handle(reporting.count_detected, "conversiones.eventos", "ConversionDetected", conversion_id, detected)
        world.handle(reporting.count_click, "conversiones.eventos", "ClickRecorded", conversion_id, {
            "click_id": new_id(), "affiliate_id": afiliado, "campaign_id": campana, "ip": CUSTOMER_IP,
            "timestamp": NOW})
        validated = {"conversion_id": conversion_id, "affiliate_id": afiliado, "campaign_id": campana,
                     "conversion_value": Decimal(valor), "currency": "EUR", "conversion_type": "sale",
                     "timestamp": NOW}
        world.handle(reporting.count_validated, "conversiones.eventos", "ConversionValidated", conversion_id,
                     validated)
        [calculada] = world.handle(commissions.calculate_comision, "conversiones.eventos", "ConversionValidated",
                                   conversion_id, validated)
        world.comisiones[(owner, who)] = calculada.payload["id"]
        # The reporting- and payment-consumers on comisiones.eventos.
        world.handle(reporting.report_comision, "comisiones.eventos", "ComisionCalculada", calculada.key,
                     calculada.payload)
        world.handle(payouts.book_accrual, "comisiones.eventos", "ComisionCalculada", calculada.key,
                     calculada.payload)
    assert commissions.approve_due_comisiones(runtime.db, runtime.outbox) == len(VALUES)
    # From here on keys exist: anonymous callers get 401.
    world.keys = {
        "op": bearer(install_key(runtime, "operator")),
        "A": bearer(install_key(runtime, "advertiser", anunciante_id=world.anunciantes["A"])),
        "B": bearer(install_key(runtime, "advertiser", anunciante_id=world.anunciantes["B"])),
        "X": bearer(install_key(runtime, "affiliate", afiliado_id=AFFILIATES["X"])),
        "Y": bearer(install_key(runtime, "affiliate", afiliado_id=AFFILIATES["Y"])),
        # An affiliate key holding every scope, pagos:write included: the role still forbids writes.
        "X-all-scopes": bearer(install_key(runtime, "affiliate", afiliado_id=AFFILIATES["X"], scopes=ALL_SCOPES)),
    }
    return world


@pytest.fixture
def world(tmp_path) -> World:
    return _build(tmp_path)


def _keys(value) -> set[str]:
    """Every key of every object in a JSON answer."""
    if isinstance(value, dict):
        return set(value) | {k for v in value.values() for k in _keys(v)}
    if isinstance(value, list):
        return {k for v in value for k in _keys(v)}
    return set()


# -- commissions -------------------------------------------------------------------------------------
def test_each_caller_lists_only_its_own_commissions(world):
    everything = set(world.comisiones.values())
    assert world.commission_ids("op") == everything
    assert world.commission_ids("A") == world.commission_of("A")
    assert world.commission_ids("B") == world.commission_of("B")
    assert world.commission_ids("X") == {world.comisiones[k] for k in world.comisiones if k[1] == "X"}
    assert world.commission_ids("Y") == {world.comisiones[("A", "Y")], world.comisiones[("B", "Y")]}
    # Filters naming another tenant's ids yield nothing; naming one's own narrows.
    assert world.commission_ids("A", campana_id=world.campanas["B"]) == set()
    assert world.commission_ids("A", campana_id=world.campanas["op"]) == set()
    assert world.commission_ids("A", afiliado_id=AFFILIATES["X"]) == {world.comisiones[("A", "X")]}
    assert world.commission_ids("X", afiliado_id=AFFILIATES["Y"]) == set()
    assert world.commission_ids("X", campana_id=world.campanas["B"]) == {world.comisiones[("B", "X")]}
    conversion_of_y = world.get("op", f"/comisiones/{world.comisiones[('B', 'Y')]}").json()["conversion_id"]
    assert world.commission_ids("X", conversion_id=conversion_of_y) == set()
    assert world.commission_ids("A", conversion_id=conversion_of_y) == set()
    assert world.commission_ids("B", conversion_id=conversion_of_y) == {world.comisiones[("B", "Y")]}


@pytest.mark.parametrize("suffix", ["", "/explain"])
def test_another_tenants_commission_by_id_is_404_like_an_unknown_one(world, suffix):
    def status(who: str, key: tuple[str, str]) -> int:
        return world.get(who, f"/comisiones/{world.comisiones[key]}{suffix}").status_code

    for key in world.comisiones:
        assert status("op", key) == 200
        owner, affiliate = key
        for advertiser in ("A", "B"):
            assert status(advertiser, key) == (200 if owner == advertiser else 404), (advertiser, key)
        for who in ("X", "Y"):
            assert status(who, key) == (200 if affiliate == who else 404), (who, key)
    unknown = world.get("A", f"/comisiones/{new_id()}{suffix}")
    foreign = world.get("A", f"/comisiones/{world.comisiones[('B', 'X')]}{suffix}")
    assert unknown.status_code == foreign.status_code == 404 and unknown.json() == foreign.json()


def test_an_advertiser_key_without_its_advertiser_sees_nothing_not_the_operators_campaigns(world):
    """`anunciante_id = NULL` must not become `IS NULL` (the operator's campaigns and payouts)."""
    orphan = Principal("k-orphan", "advertiser", anunciante_id=None)
    stray = Principal("k-stray", "affiliate", afiliado_id=None)
    with world.runtime.db.read() as session:
        for principal in (orphan, stray):
            assert commissions.list_comisiones(session, principal, 100, 0) == []
            assert reporting.report(session, principal, None, None) == []
            assert payouts.saldos(session, principal) == []
            assert payouts.ledger_lines(session, principal, None, 100) == []


# -- customer data -----------------------------------------------------------------------------------
def test_an_affiliate_sees_no_customer_data_anywhere(world):
    pago = world.post("op", "/pagos", {"afiliado_id": AFFILIATES["X"]}).json()["pagos"][0]
    own = world.comisiones[("A", "X")]
    answers = [world.get("X", path) for path in (
        "/comisiones", f"/comisiones/{own}", f"/comisiones/{own}/explain", "/reportes",
        f"/reportes/afiliados/{AFFILIATES['X']}", "/pagos", f"/pagos/{pago['id']}", "/pagos/saldos",
        "/pagos/ledger")]
    for answer in answers:
        assert answer.status_code == 200, (answer.request.url, answer.text)
        assert CUSTOMER_USER_ID not in answer.text and CUSTOMER_IP not in answer.text, answer.request.url
        assert not _keys(answer.json()) & CUSTOMER_FIELDS, (answer.request.url, _keys(answer.json()))
    # The conversion's value is the affiliate's business: it is there.
    explained = world.get("X", f"/comisiones/{own}/explain").json()
    assert explained["inputs"]["base"] == "600.00" and explained["monto"] == "60.00"


# -- reports -----------------------------------------------------------------------------------------
def _lines(response) -> set[tuple[str, str]]:
    assert response.status_code == 200, response.text
    return {(line["campana_id"], line["afiliado_id"]) for line in response.json()["reportes"]}


def test_reports_hold_the_callers_tenant_only(world):
    k, x, y = world.campanas, AFFILIATES["X"], AFFILIATES["Y"]
    everything = {(k[o], AFFILIATES[w]) for o, w in VALUES}
    assert _lines(world.get("op", "/reportes")) == everything
    assert _lines(world.get("A", "/reportes")) == {(k["A"], x), (k["A"], y)}
    assert _lines(world.get("B", "/reportes")) == {(k["B"], x), (k["B"], y)}
    assert _lines(world.get("X", "/reportes")) == {(k["A"], x), (k["B"], x), (k["op"], x)}
    assert _lines(world.get("Y", "/reportes")) == {(k["A"], y), (k["B"], y)}
    # Filters naming another tenant: nothing.
    assert _lines(world.get("A", "/reportes", campana_id=k["B"])) == set()
    assert _lines(world.get("A", "/reportes", campana_id=k["op"])) == set()
    assert _lines(world.get("X", "/reportes", afiliado_id=y)) == set()
    assert _lines(world.get("Y", "/reportes", campana_id=k["op"])) == set()
    # Revenue and commissions summed over A's campaign only, never B's.
    [line] = world.get("A", "/reportes/campanas/" + k["A"], agrupar="total").json()["reportes"]
    assert (line["validadas"], line["ingresos"], line["monto"]) == (2, "1300.00", "130.00")


def test_a_report_about_another_tenant_is_404_and_an_affiliate_report_is_cut_to_the_advertiser(world):
    k, x, y = world.campanas, AFFILIATES["X"], AFFILIATES["Y"]
    assert world.get("A", f"/reportes/campanas/{k['B']}").status_code == 404
    assert world.get("A", f"/reportes/campanas/{k['op']}").status_code == 404
    assert world.get("A", f"/reportes/campanas/{new_id()}").status_code == 404
    assert world.get("B", f"/reportes/campanas/{k['B']}").json()["reportes"]
    assert world.get("op", f"/reportes/campanas/{k['B']}").json()["reportes"]
    assert world.get("X", f"/reportes/campanas/{k['A']}").status_code == 403  # the rule: advertisers' report
    assert world.get("X", f"/reportes/afiliados/{y}").status_code == 404
    [mine] = world.get("X", f"/reportes/afiliados/{x}", agrupar="total").json()["reportes"]
    assert mine["monto"] == "240.00"  # 60 + 80 + 100: all of X's campaigns
    # An advertiser sees an affiliate in its own campaigns only.
    [in_a] = world.get("A", f"/reportes/afiliados/{x}", agrupar="total").json()["reportes"]
    assert (in_a["campana_id"], in_a["monto"], in_a["ingresos"]) == (k["A"], "60.00", "600.00")
    [in_b] = world.get("B", f"/reportes/afiliados/{x}", agrupar="total").json()["reportes"]
    assert (in_b["campana_id"], in_b["monto"]) == (k["B"], "80.00")


# -- payouts -----------------------------------------------------------------------------------------
def _pagos(world: World, who: str, **params) -> list[dict]:
    response = world.get(who, "/pagos", **params)
    assert response.status_code == 200, response.text
    return response.json()["pagos"]


def test_a_payout_pays_one_advertisers_commissions_and_belongs_to_it(world):
    created = world.post("op", "/pagos", {})
    assert created.status_code == 200, created.text
    pagos = created.json()["pagos"]
    a, b = world.anunciantes["A"], world.anunciantes["B"]
    x, y = AFFILIATES["X"], AFFILIATES["Y"]
    assert sorted(((p["anunciante_id"] or ""), p["afiliado_id"], p["monto"]) for p in pagos) == sorted([
        (a, x, "60.00"), (a, y, "70.00"), (b, x, "80.00"), (b, y, "90.00"), ("", x, "100.00")])
    owner_of = {world.comisiones[key]: key[0] for key in world.comisiones}
    owners = {None: "op", a: "A", b: "B"}
    for pago in pagos:  # never a line of another advertiser's campaign
        assert {owner_of[line["referencia_id"]] for line in pago["lineas"]} == {owners[pago["anunciante_id"]]}
    announced = world.outbox("PagoCreado")
    assert sorted((p["anunciante_id"] or "", p["monto"]) for p in announced) == sorted(
        (p["anunciante_id"] or "", Decimal(p["monto"])) for p in pagos)
    assert {p["_actor"][1] for p in announced} == {"operator"}


def test_an_advertiser_creates_and_pays_only_its_own_payouts(world):
    a, b = world.anunciantes["A"], world.anunciantes["B"]
    # B names A: refused as if A did not exist, and nothing is stored or emitted.
    before = world.outbox_rows()
    refused = world.post("B", "/pagos", {"anunciante_id": a})
    assert refused.status_code == 404 and {e["field"] for e in refused.json()["errors"]} == {"anunciante_id"}
    assert world.outbox_rows() == before and world.stored_pagos() == []
    # B's own: only B's campaign's commissions, whatever affiliate it names.
    created = world.post("B", "/pagos", {"afiliado_id": AFFILIATES["X"]}).json()["pagos"]
    assert [(p["anunciante_id"], p["afiliado_id"], p["monto"]) for p in created] == [(b, AFFILIATES["X"], "80.00")]
    rest = world.post("B", "/pagos").json()["pagos"]
    assert [(p["anunciante_id"], p["afiliado_id"]) for p in rest] == [(b, AFFILIATES["Y"])]
    assert {p["anunciante_id"] for p in world.stored_pagos()} == {b}  # A's and the operator's still unpaid
    assert {p["_actor"][1] for p in world.outbox("PagoCreado")} == {"advertiser"}
    pago_b = created[0]["id"]

    # A cannot see, pay or tell apart B's payout from an unknown one.
    before = world.outbox_rows()
    for path in (f"/pagos/{pago_b}", f"/pagos/{pago_b}/pagar"):
        response = world.post("A", path) if path.endswith("pagar") else world.get("A", path)
        assert response.status_code == 404 and response.json() == world.get("A", f"/pagos/{new_id()}").json()
    assert world.outbox_rows() == before
    assert world.get("B", f"/pagos/{pago_b}").json()["estado"] == "pendiente"
    assert _pagos(world, "A") == [] and _pagos(world, "A", anunciante_id=b) == []
    assert world.post("A", "/pagos", {"afiliado_id": AFFILIATES["Y"]}).json()["pagos"][0]["monto"] == "70.00"

    # B pays its own.
    paid = world.post("B", f"/pagos/{pago_b}/pagar")
    assert paid.status_code == 200 and paid.json()["estado"] == "pagado"
    [realizado] = world.outbox("PagoRealizado")
    assert (realizado["anunciante_id"], realizado["monto"], realizado["_actor"][1]) == (b, Decimal("80.00"),
                                                                                        "advertiser")
    assert world.get("op", f"/comisiones/{world.comisiones[('B', 'X')]}").json()["estado"] == "pagada"


def test_payout_reads_are_scoped_by_id_and_by_filter(world):
    world.post("op", "/pagos", {})
    everything = _pagos(world, "op")
    assert len(everything) == 5
    a, b = world.anunciantes["A"], world.anunciantes["B"]
    x, y = AFFILIATES["X"], AFFILIATES["Y"]
    assert {(p["anunciante_id"], p["afiliado_id"]) for p in _pagos(world, "A")} == {(a, x), (a, y)}
    assert {(p["anunciante_id"], p["afiliado_id"]) for p in _pagos(world, "B")} == {(b, x), (b, y)}
    assert {(p["anunciante_id"], p["afiliado_id"]) for p in _pagos(world, "X")} == {(a, x), (b, x), (None, x)}
    assert {p["afiliado_id"] for p in _pagos(world, "Y")} == {y}
    assert _pagos(world, "X", afiliado_id=y) == [] and _pagos(world, "A", anunciante_id=b) == []
    assert {p["anunciante_id"] for p in _pagos(world, "op", anunciante_id=a)} == {a}
    for pago in everything:
        owner = {a: "A", b: "B"}.get(pago["anunciante_id"])
        for who in ("A", "B", "X", "Y"):
            visible = who == owner or AFFILIATES.get(who) == pago["afiliado_id"]
            assert world.get(who, f"/pagos/{pago['id']}").status_code == (200 if visible else 404), (who, pago)


def test_the_ledger_and_balances_hold_the_callers_tenant_only(world):
    def ledger(who: str, **params) -> set[str]:
        response = world.get(who, "/pagos/ledger", **params)
        assert response.status_code == 200, response.text
        return {line["comision_id"] for line in response.json()["ledger"]}

    def saldos(who: str) -> dict[str, str]:
        return {s["afiliado_id"]: s["saldo"] for s in world.get(who, "/pagos/saldos").json()["saldos"]}

    assert ledger("op") == set(world.comisiones.values())
    assert ledger("A") == world.commission_of("A") and ledger("B") == world.commission_of("B")
    assert ledger("X") == {world.comisiones[k] for k in world.comisiones if k[1] == "X"}
    assert ledger("X", afiliado_id=AFFILIATES["Y"]) == set()
    assert ledger("A", afiliado_id=AFFILIATES["X"]) == {world.comisiones[("A", "X")]}
    x, y = AFFILIATES["X"], AFFILIATES["Y"]
    assert saldos("op") == {x: "240.00", y: "160.00"}
    assert saldos("A") == {x: "60.00", y: "70.00"}  # what A's campaign owes, not B's
    assert saldos("B") == {x: "80.00", y: "90.00"}
    assert saldos("X") == {x: "240.00"} and saldos("Y") == {y: "160.00"}


def test_an_affiliate_can_never_create_or_pay_a_payout_even_with_its_commissions_approved(world):
    """Hole 1's tail: whatever it did before, the fraudster's affiliate key cannot move money."""
    x = AFFILIATES["X"]
    before, outbox = world.stored_pagos(), world.outbox_rows()
    for key in ("X", "X-all-scopes"):
        for body in (None, {}, {"afiliado_id": x}, {"anunciante_id": world.anunciantes["A"]}):
            assert world.post(key, "/pagos", body).status_code == 403
    assert world.stored_pagos() == before == [] and world.outbox_rows() == outbox
    # The operator makes X's payouts; X still cannot pay itself any of them.
    pagos = world.post("op", "/pagos", {"afiliado_id": x}).json()["pagos"]
    assert len(pagos) == 3
    outbox = world.outbox_rows()
    for pago in pagos:
        for key in ("X", "X-all-scopes", "Y"):
            assert world.post(key, f"/pagos/{pago['id']}/pagar").status_code == 403
    assert world.outbox_rows() == outbox
    assert {p["estado"] for p in world.stored_pagos()} == {"pendiente"}
    assert {world.get("op", f"/comisiones/{world.comisiones[k]}").json()["estado"]
            for k in world.comisiones if k[1] == "X"} == {"aprobada"}
    # Nor through the handlers, should a route ever let one through.
    with world.runtime.db.transaction() as session, pytest.raises(NotAllowed):
        payouts.create_pagos(session, Decimal("0.01"), Principal("k", "affiliate", afiliado_id=x))
    with world.runtime.db.read() as session:
        assert payouts.get_pago(session, pagos[0]["id"], Principal("k", "affiliate", afiliado_id=x))
    with world.runtime.db.transaction() as session, pytest.raises(NotFound):
        payouts.pay_pago(session, pagos[0]["id"], Principal("k", "affiliate", afiliado_id=x))
    assert world.outbox_rows() == outbox


def test_one_advertisers_clawback_is_never_netted_from_another_advertisers_payout(world):
    """A refund of X's commission in A's campaign after A paid it: the negative adjustment waits for
    A's next payout to X, and B's payout to X is paid in full."""
    x = AFFILIATES["X"]
    [pago_a] = world.post("A", "/pagos", {"afiliado_id": x}).json()["pagos"]
    assert world.post("A", f"/pagos/{pago_a['id']}/pagar").status_code == 200
    conversion = world.get("op", f"/comisiones/{world.comisiones[('A', 'X')]}").json()["conversion_id"]
    [revertida, _answer] = world.handle(commissions.reverse_comision, "conversiones.eventos", "ConversionRefunded",
                                        conversion, {"conversion_id": conversion, "refund_type": "reembolso",
                                                     "reason": "devuelto", "timestamp": NOW})
    assert revertida.payload["ajuste_monto"] == Decimal("-60.00")
    [pago_b] = world.post("B", "/pagos", {"afiliado_id": x}).json()["pagos"]
    assert (pago_b["monto"], [line["tipo"] for line in pago_b["lineas"]]) == ("80.00", ["comision"])
    [pago_op] = world.post("op", "/pagos", {"afiliado_id": x}).json()["pagos"]  # the operator's own campaign
    assert (pago_op["anunciante_id"], pago_op["monto"]) == (None, "100.00")
    # A's next commission to X carries A's clawback.
    conversion_id = new_id()
    world.handle(commissions.calculate_comision, "conversiones.eventos", "ConversionValidated", conversion_id, {
        "conversion_id": conversion_id, "affiliate_id": x, "campaign_id": world.campanas["A"],
        "conversion_value": Decimal("2000.00"), "currency": "EUR", "conversion_type": "sale", "timestamp": NOW})
    commissions.approve_due_comisiones(world.runtime.db, world.runtime.outbox)
    [siguiente] = world.post("A", "/pagos", {"afiliado_id": x}).json()["pagos"]
    assert (siguiente["monto"], [(line["tipo"], line["monto"]) for line in siguiente["lineas"]]) == (
        "140.00", [("comision", "200.00"), ("ajuste", "-60.00")])


def test_the_payout_scheduler_groups_per_advertiser_too(world):
    assert payouts.create_due_pagos(world.runtime.db, world.runtime.outbox, Decimal("50.00")) == 5
    stored = world.stored_pagos()
    assert sorted((p["anunciante_id"] or "", p["afiliado_id"]) for p in stored) == sorted(
        (world.anunciantes.get(o, ""), AFFILIATES[w]) for o, w in VALUES)
    assert {p["_actor"] for p in world.outbox("PagoCreado")} == {("system", "system")}


def test_an_operator_may_make_one_advertisers_payouts(world):
    a = world.anunciantes["A"]
    created = world.post("op", "/pagos", {"anunciante_id": a}).json()["pagos"]
    assert {(p["anunciante_id"], p["monto"]) for p in created} == {(a, "60.00"), (a, "70.00")}
    assert world.post("op", "/pagos", {"anunciante_id": "nadie"}).json()["pagos"] == []
    paid = world.post("op", f"/pagos/{created[0]['id']}/pagar")
    assert paid.status_code == 200 and paid.json()["estado"] == "pagado"


def test_payout_events_carry_the_advertiser_in_a_new_schema_version(world):
    registry = world.runtime.registry
    assert registry.versions("PagoCreado") == [1, 2] and registry.versions("PagoRealizado") == [1, 2]
    # A v1 event (before payouts had an advertiser) is read with anunciante_id null.
    old = {"id": "p", "afiliado_id": "a", "moneda": "EUR", "monto": Decimal("5.00"), "lineas": [], "timestamp": NOW}
    data, _ = registry.encode("PagoCreado", old, 1)
    assert registry.decode("PagoCreado", data, 1)["anunciante_id"] is None
    text = json.dumps(registry.schema("PagoRealizado", 2), default=str)
    assert "anunciante_id" in text


def test_racing_payout_runs_of_several_advertisers_put_each_commission_in_exactly_one_payout(db_url, registry):
    """The scheduler and advertisers creating their payouts at once, on SQLite and MariaDB: every
    commission lands in exactly one payout, of its own campaign's advertiser."""
    migrate(db_url, "alpes.marketing:migrations")
    tables = marketing_tables
    db, outbox = Database(db_url), Outbox(tables.outbox, registry)
    try:
        with db.transaction() as session:
            owners = {}
            for nombre in ("A", "B", None):
                anunciante = advertisers.register_anunciante(session, nombre=nombre, dominios=[],
                                                             valor_maximo_conversion=None, now=NOW)[0] \
                    if nombre else None
                campana, _ = campaigns.create_campana(session, SYSTEM_PRINCIPAL, domain.NuevaCampana(
                    f"Carrera {nombre}", Decimal("10"), "EUR", periodo_bloqueo_dias=0), anunciante_id=anunciante,
                    https_only=False)
                owners[campana] = anunciante
            for n in range(60):
                commissions.calculate_comision(session, _incoming(
                    "conversiones.eventos", "ConversionValidated", f"c{n}", {
                        "conversion_id": new_id(), "affiliate_id": f"a{n % 2}", "campaign_id": list(owners)[n % 3],
                        "conversion_value": Decimal("100.00") + n, "currency": "EUR", "conversion_type": "sale",
                        "timestamp": NOW}))
        assert commissions.approve_due_comisiones(db, outbox) == 60
        advertiser_ids = [a for a in owners.values() if a]

        def run(principal):
            for _attempt in range(10):  # a deadlock or lost race is retried, like the job loop does
                try:
                    with db.transaction() as session:
                        outbox.add(session, payouts.create_pagos(session, Decimal("50.00"), principal)[1])
                    return
                except DBAPIError:
                    continue
            raise AssertionError("a payout run kept failing")

        callers = [SYSTEM_PRINCIPAL, SYSTEM_PRINCIPAL] + [Principal(f"k{a}", "advertiser", anunciante_id=a)
                                                          for a in advertiser_ids for _ in range(2)]
        threads = [threading.Thread(target=run, args=(caller,)) for caller in callers]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        with db.transaction() as session:
            pagos = {p["id"]: p for p in session.execute(select(tables.pagos)).mappings()}
            lineas = session.execute(select(tables.pago_lineas)).mappings().all()
            comisiones = session.execute(select(tables.comisiones)).mappings().all()
        assert sorted((p["anunciante_id"] or "", p["afiliado_id"]) for p in pagos.values()) == sorted(
            (a or "", f"a{n}") for a in owners.values() for n in range(2))
        assert sorted(line["referencia_id"] for line in lineas) == sorted(c["id"] for c in comisiones)
        for c in comisiones:
            assert pagos[c["pago_id"]]["anunciante_id"] == owners[c["campana_id"]]
        for pago in pagos.values():
            assert pago["monto"] == sum(line["monto"] for line in lineas if line["pago_id"] == pago["id"])
    finally:
        db.dispose()
