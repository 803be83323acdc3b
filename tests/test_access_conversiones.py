"""Access in conversiones (issue 10), tried as an attacker would: advertisers A and B, affiliates
a1 (in A's campaign) and a2 (in B's), an operator, each with a real key.

- Tenant scoping: lists, figures, streams and sagas filtered to the caller's campaigns (advertiser)
  or conversions (affiliate); another tenant's by id → 404; postbacks for another advertiser's
  campaign → 403, refunds and reviews of its conversions → 404; nothing stored or emitted then.
- Affiliates never see customer data (user_id null).
- Hole 1: a conversion worth more than the campaign's maximum is held (value_above_maximum).
- Hole 5: idempotency keys scoped per advertiser; hole 7: velocity counted per key.
- Rate limits: 429 with Retry-After on tracking links and postbacks, in Redis (shared by two
  instances) and in-process, and a dead Redis degrades to in-process, never to 5xx.
- The caller is the actor of the events it causes.
"""

from __future__ import annotations

import threading
import time
from datetime import datetime, timezone
from decimal import Decimal
from importlib import import_module

import pytest
import redis
from access_helpers import bearer, install_key
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from test_campaign_lifecycle import _incoming

from alpes.conversiones import reference
from alpes.kernel.codec import SchemaRegistry
from alpes.settings import Settings

REGISTRY = SchemaRegistry.from_directory()
NOW = datetime.now(timezone.utc)
CLIENT = ("203.0.113.5", 40000)  # a routable address: counted per IP (TestClient's default is not one)


def _campana(campana_id: str, anunciante_id: str | None, maximo: str | None = None) -> dict:
    return {"id": campana_id, "nombre": campana_id, "porcentaje_comision": Decimal("10"), "moneda": "EUR",
            "timestamp": NOW, "landing_url": f"https://shop.example.com/{campana_id}", "anunciante_id": anunciante_id,
            "valor_maximo_conversion": None if maximo is None else Decimal(maximo)}


def learn_platform(runtime) -> None:
    """What conversiones hears from marketing: advertisers A and B; campaigns kA1 (A, maximum
    1000.00), kA2 (A), kB1 (B) and kOp (operator-owned, announced before advertisers: v4);
    affiliates a1 (link `linka1`, in kA1) and a2 (link `linkb1`, in kB1)."""
    with runtime.db.transaction() as session:
        for anunciante in ("A", "B"):
            reference.learn_anunciante(session, _incoming(REGISTRY, "AnuncianteRegistrado", {
                "id": anunciante, "nombre": anunciante, "timestamp": NOW}, 1))
        for campana in (_campana("kA1", "A", "1000.00"), _campana("kA2", "A"), _campana("kB1", "B")):
            reference.learn_campana(session, _incoming(REGISTRY, "CampanaCreada", campana, 5))
        old = {k: v for k, v in _campana("kOp", None).items() if k not in ("anunciante_id", "valor_maximo_conversion")}
        reference.learn_campana(session, _incoming(REGISTRY, "CampanaCreada", old, 4))
        for afiliado, campana, link in (("a1", "kA1", "linka1"), ("a2", "kB1", "linkb1")):
            reference.learn_afiliado(session, _incoming(REGISTRY, "AfiliadoHabilitado",
                                                        {"afiliado_id": afiliado, "timestamp": NOW}, 1))
            reference.learn_inscripcion(session, _incoming(REGISTRY, "AfiliadoInscrito", {
                "inscripcion_id": f"i-{afiliado}", "campana_id": campana, "afiliado_id": afiliado, "link_code": link,
                "timestamp": NOW}, 1))


def build(tmp_path, **settings):
    """conversiones knowing the platform above; its app, runtime and tables."""
    built = Settings(data_dir=tmp_path, broker_url="pulsar://127.0.0.1:1", **settings)
    app, runtime = import_module("alpes.conversiones.service").build(built)
    learn_platform(runtime)
    return app, runtime, import_module("alpes.conversiones.tables")


class Platform:
    def __init__(self, tmp_path, **settings) -> None:
        self.app, self.runtime, self.tables = build(tmp_path, **settings)
        self.client = TestClient(self.app, client=CLIENT)
        self.keys = {"op": install_key(self.runtime, "operator"),
                     "A": install_key(self.runtime, "advertiser", anunciante_id="A"),
                     "B": install_key(self.runtime, "advertiser", anunciante_id="B"),
                     "a1": install_key(self.runtime, "affiliate", afiliado_id="a1"),
                     "a2": install_key(self.runtime, "affiliate", afiliado_id="a2")}

    def as_(self, who: str) -> dict:
        return bearer(self.keys[who])

    def post(self, who: str, **body):
        payload = {"user_id": "customer-42", "conversion_value": "80.00", "conversion_type": "sale", **body}
        return self.client.post("/conversiones", json=payload, headers=self.as_(who))

    def count(self, table) -> int:
        with self.runtime.db.read() as session:
            return session.scalar(select(func.count()).select_from(table))

    def stored(self) -> tuple[int, int, int, int, int]:
        t = self.tables
        return (self.count(t.event_store), self.count(t.outbox), self.count(t.order_keys),
                self.count(t.conversion_signals), self.count(t.caller_minutes))


@pytest.fixture
def platform(tmp_path):
    p = Platform(tmp_path, max_conversions_per_caller=3)
    yield p
    p.runtime.db.dispose()


def _ids(response) -> set[str]:
    assert response.status_code == 200, response.text
    return {c["id"] for c in response.json()["conversiones"]}


def _fields(response) -> list:
    return [e["field"] for e in response.json()["errors"]]


@pytest.fixture
def data(platform):
    """A conversion of A's campaign (by a1) and one of B's (by a2), posted by the operator."""
    a = platform.post("op", affiliate_id="a1", campaign_id="kA1", order_id="oa").json()
    b = platform.post("op", affiliate_id="a2", campaign_id="kB1", order_id="ob").json()
    assert a["status"] == b["status"] == "validated"
    return a["id"], b["id"]


# -- reads ---------------------------------------------------------------------------------------
def test_an_advertiser_reads_only_its_own_campaigns_conversions_by_list_filter_and_id(platform, data):
    mine, theirs = data
    get = platform.client.get
    assert _ids(get("/conversiones", headers=platform.as_("A"))) == {mine}
    assert _ids(get("/conversiones", headers=platform.as_("B"))) == {theirs}
    assert _ids(get("/conversiones", headers=platform.as_("op"))) == {mine, theirs}
    # Naming another tenant's campaign or affiliate in a filter yields nothing, never their rows.
    for params in ({"campaign_id": "kB1"}, {"affiliate_id": "a2"}, {"status": "validated", "campaign_id": "kB1"}):
        assert _ids(get("/conversiones", params=params, headers=platform.as_("A"))) == set()
    for path in (f"/conversiones/{theirs}", f"/conversiones/{theirs}/eventos", f"/sagas/{theirs}"):
        response = get(path, headers=platform.as_("A"))
        assert response.status_code == 404, (path, response.text)
        assert "kB1" not in response.text and "customer" not in response.text
    assert get(f"/conversiones/{mine}", headers=platform.as_("A")).json()["user_id"] == "customer-42"
    assert get(f"/conversiones/{mine}/eventos", headers=platform.as_("A")).status_code == 200
    assert get(f"/sagas/{mine}", headers=platform.as_("A")).status_code == 200
    assert [s["saga_id"] for s in get("/sagas", headers=platform.as_("A")).json()["sagas"]] == [mine]
    assert {(f["campaign_id"], f["affiliate_id"]) for f in
            get("/conversiones/cifras", headers=platform.as_("A")).json()["cifras"]} == {("kA1", "a1")}
    assert get("/conversiones/cifras", params={"campaign_id": "kB1"}, headers=platform.as_("A")).json()["cifras"] == []


def test_an_affiliate_reads_only_its_own_conversions_and_never_the_customer(platform, data):
    mine, theirs = data
    get = platform.client.get
    listed = get("/conversiones", headers=platform.as_("a1")).json()["conversiones"]
    assert [c["id"] for c in listed] == [mine] and listed[0]["user_id"] is None
    one = get(f"/conversiones/{mine}", headers=platform.as_("a1"))
    assert one.status_code == 200 and one.json()["user_id"] is None and "customer-42" not in one.text
    assert get(f"/conversiones/{theirs}", headers=platform.as_("a1")).status_code == 404
    assert _ids(get("/conversiones", params={"affiliate_id": "a2"}, headers=platform.as_("a1"))) == set()
    assert _ids(get("/conversiones", params={"campaign_id": "kB1"}, headers=platform.as_("a1"))) == set()
    assert {f["affiliate_id"] for f in get("/conversiones/cifras", headers=platform.as_("a1")).json()["cifras"]} \
        == {"a1"}
    # The stream and the sagas carry customer data and steps: not for affiliates at all.
    for path in (f"/conversiones/{mine}/eventos", "/sagas", f"/sagas/{mine}"):
        assert get(path, headers=platform.as_("a1")).status_code == 403, path


def test_a_key_of_a_tenant_role_without_its_tenant_sees_nothing(platform, data):
    orphan = install_key(platform.runtime, "advertiser")  # no anunciante_id: must not mean "everything"
    assert _ids(platform.client.get("/conversiones", headers=bearer(orphan))) == set()
    assert platform.client.get(f"/conversiones/{data[0]}", headers=bearer(orphan)).status_code == 404


def test_anonymous_callers_get_401_once_keys_exist(platform, data):
    for path in ("/conversiones", f"/conversiones/{data[0]}", "/sagas"):
        response = platform.client.get(path)
        assert response.status_code == 401 and "WWW-Authenticate" in response.headers


# -- writes --------------------------------------------------------------------------------------
def test_a_postback_for_another_advertisers_campaign_is_403_and_stores_nothing(platform):
    click = platform.client.get("/r/linkb1", follow_redirects=False)  # a click on B's link
    click_id = click.headers["location"].split("alpes_click_id=")[1]
    before = platform.stored()
    for body in ({"affiliate_id": "a2", "campaign_id": "kB1"}, {"affiliate_id": "a1", "campaign_id": "kOp"},
                 {"affiliate_id": "a1", "campaign_id": "k-unknown"}, {"click_id": click_id},
                 {"affiliate_id": "a2", "campaign_id": "kB1", "order_id": "ob"}):
        response = platform.post("A", **body)
        assert response.status_code == 403, (body, response.text)
    assert platform.stored() == before
    # Affiliates post nothing at all.
    assert platform.post("a1", affiliate_id="a1", campaign_id="kA1").status_code == 403
    assert platform.stored() == before
    assert platform.post("A", affiliate_id="a1", campaign_id="kA1").status_code == 200


def test_refunds_and_reviews_of_another_advertisers_conversions_are_404_and_change_nothing(platform, data):
    mine, theirs = data
    held = platform.post("op", affiliate_id="a2", campaign_id="kB1", conversion_value="5000.00").json()
    before = platform.stored()
    attempts = [(f"/conversiones/{theirs}/reembolso", None), (f"/conversiones/{held['id']}/aprobar", None),
                (f"/conversiones/{held['id']}/rechazar", {"motivo": "x"})]
    for path, body in attempts:
        response = platform.client.post(path, json=body, headers=platform.as_("A"))
        assert response.status_code == 404, (path, response.text)
    assert platform.stored() == before
    assert platform.client.get(f"/conversiones/{theirs}", headers=platform.as_("B")).json()["status"] == "validated"
    for who in ("a1", "a2"):  # affiliates neither refund nor review, not even their own
        assert platform.client.post(f"/conversiones/{mine}/reembolso", headers=platform.as_(who)).status_code == 403
    refunded = platform.client.post(f"/conversiones/{mine}/reembolso", headers=platform.as_("A"))
    assert refunded.status_code == 200 and refunded.json()["status"] == "refunded"


def test_the_caller_is_the_actor_of_the_events_it_causes(platform):
    platform.post("A", affiliate_id="a1", campaign_id="kA1")
    platform.client.get("/r/linka1", follow_redirects=False)
    o = platform.tables.outbox
    with platform.runtime.db.read() as session:
        actors = session.execute(select(o.c.event_type, o.c.actor_id, o.c.actor_role).order_by(o.c.id)).all()
    key_id = platform.keys["A"].split("_")[2]
    assert [tuple(a) for a in actors] == [("ConversionDetected", key_id, "advertiser"),
                                          ("ConversionValidated", key_id, "advertiser"),
                                          ("ClicksRecorded", "anonymous", "anonymous")]


# -- hole 1: a conversion above the campaign's maximum is held -----------------------------------
def test_a_conversion_above_the_campaigns_maximum_is_held_and_earns_no_commission(platform):
    huge = platform.post("A", affiliate_id="a1", campaign_id="kA1", conversion_value="9999999999999.99").json()
    assert huge["status"] == "on_hold"
    shown = platform.client.get(f"/conversiones/{huge['id']}", headers=platform.as_("A")).json()
    assert (shown["reason"], shown["conversion_value"]) == ("value_above_maximum", "9999999999999.99")
    with platform.runtime.db.read() as session:
        types = list(session.scalars(select(platform.tables.outbox.c.event_type)))
    assert types == ["ConversionDetected", "ConversionHeld"]  # no ConversionValidated: marketing books nothing
    # The maximum itself is fine; a campaign without a maximum holds nothing for its value.
    assert platform.post("A", affiliate_id="a1", campaign_id="kA1", conversion_value="1000.00").json()["status"] \
        == "validated"
    assert platform.post("A", affiliate_id="a1", campaign_id="kA2", conversion_value="9999999999999.99").json()[
        "status"] == "validated"


# -- hole 5: idempotency keys per advertiser -----------------------------------------------------
def test_an_idempotency_key_is_scoped_per_advertiser_across_its_campaigns(platform):
    first = platform.post("A", affiliate_id="a1", campaign_id="kA1", order_id="order-7")
    assert first.status_code == 200
    again = platform.post("A", affiliate_id="a1", campaign_id="kA1", order_id="order-7")
    assert again.json() == {**first.json(), "duplicate": True}
    # The same key on another campaign of the same advertiser, other parameters: 409 naming the key.
    conflict = platform.post("A", affiliate_id="a1", campaign_id="kA2", order_id="order-7")
    assert conflict.status_code == 409 and _fields(conflict) == ["order_id"] and "order-7" in conflict.text
    header = platform.client.post("/conversiones", headers={**platform.as_("A"), "Idempotency-Key": "order-7"},
                                  json={"affiliate_id": "a1", "campaign_id": "kA2", "user_id": "u",
                                        "conversion_value": "1.00", "conversion_type": "sale"})
    assert header.status_code == 409 and _fields(header) == ["idempotency-key"]
    # Another advertiser's key space is its own.
    assert platform.post("B", affiliate_id="a2", campaign_id="kB1", order_id="order-7").status_code == 200
    # Operator-owned campaigns keep per-campaign keys.
    assert platform.post("op", affiliate_id="a1", campaign_id="kOp", order_id="order-7").status_code == 200
    with platform.runtime.db.read() as session:
        scopes = sorted(session.scalars(select(platform.tables.order_keys.c.scope)))
    assert scopes == ["anunciante:A", "anunciante:B", "campana:kOp"]


def test_racing_postbacks_with_one_key_across_an_advertisers_campaigns_keep_one(db_url, tmp_path):
    """On SQLite and MariaDB: the unique (scope, order id) decides between campaigns, not a read."""
    platform = Platform(tmp_path, conversiones_db_url=db_url)
    barrier = threading.Barrier(10)
    answers: list = [None] * 10

    def send(i: int) -> None:
        client = TestClient(platform.app, client=CLIENT)
        barrier.wait()
        answers[i] = client.post("/conversiones", headers={**platform.as_("A"), "Idempotency-Key": "race-A"}, json={
            "affiliate_id": "a1", "campaign_id": ("kA1", "kA2")[i % 2], "user_id": "u",
            "conversion_value": f"{10 + i}.00", "conversion_type": "sale"})

    threads = [threading.Thread(target=send, args=(i,)) for i in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(a.status_code for a in answers) == [200] + [409] * 9, [a.text for a in answers]
    assert platform.count(platform.tables.conversiones_view) == platform.count(platform.tables.order_keys) == 1
    platform.runtime.db.dispose()


# -- hole 7: velocity per key ----------------------------------------------------------------------
def test_velocity_counts_per_key_whatever_the_address(platform):
    statuses = [platform.post("A", affiliate_id="a1", campaign_id="kA1").json()["status"] for _ in range(4)]
    assert statuses == ["validated", "validated", "validated", "on_hold"]  # 3 per caller and campaign an hour
    moved = TestClient(platform.app, client=("198.51.100.99", 1))  # another address: still the same key
    assert moved.post("/conversiones", headers=platform.as_("A"), json={
        "affiliate_id": "a1", "campaign_id": "kA1", "user_id": "u", "conversion_value": "1.00",
        "conversion_type": "sale"}).json()["status"] == "on_hold"
    other_key = install_key(platform.runtime, "advertiser", anunciante_id="A")
    assert platform.client.post("/conversiones", headers=bearer(other_key), json={
        "affiliate_id": "a1", "campaign_id": "kA1", "user_id": "u", "conversion_value": "1.00",
        "conversion_type": "sale"}).json()["status"] == "validated"
    with platform.runtime.db.read() as session:
        keys = set(session.scalars(select(platform.tables.conversion_signals.c.caller_key)))
    assert keys == {f"key:{platform.keys['A'].split('_')[2]}", f"key:{other_key.split('_')[2]}"}


# -- rate limits -----------------------------------------------------------------------------------
def _fresh_window() -> None:
    """The limits count per minute (fixed windows): start a test well inside one."""
    left = 60 - time.time() % 60
    if left < 15:
        time.sleep(left + 0.2)


LIMITS = {"rate_limit_clicks_per_ip": 3, "rate_limit_postbacks_per_key": 2, "rate_limit_postbacks_per_ip": 3}


def _click(client) -> int:
    return client.get("/r/linka1", follow_redirects=False).status_code


def _postback(client, key: str) -> int:
    return client.post("/conversiones", headers=bearer(key), json={
        "affiliate_id": "a1", "campaign_id": "kA1", "user_id": "u", "conversion_value": "1.00",
        "conversion_type": "sale"}).status_code


def _limits_apply(platform: Platform) -> None:
    """Clicks: 3 per IP. Postbacks: 2 per key, 3 per IP. Past them: 429 with Retry-After, nothing stored."""
    client = platform.client
    assert [_click(client) for _ in range(3)] == [302] * 3
    refused = client.get("/r/linka1", follow_redirects=False)
    assert refused.status_code == 429 and 1 <= int(refused.headers["Retry-After"]) <= 60
    assert _click(TestClient(platform.app, client=("203.0.113.6", 1))) == 302  # another address has its own
    other_key = install_key(platform.runtime, "advertiser", anunciante_id="A")
    assert [_postback(client, platform.keys["A"]) for _ in range(2)] == [200, 200]
    before = platform.stored()
    refused = client.post("/conversiones", headers=platform.as_("A"), json={
        "affiliate_id": "a1", "campaign_id": "kA1", "user_id": "u", "conversion_value": "1.00",
        "conversion_type": "sale"})
    assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1  # per key
    assert _postback(client, other_key) == 200  # another key, the same address: its third postback
    assert _postback(client, install_key(platform.runtime, "advertiser", anunciante_id="A")) == 429  # per IP
    assert platform.stored()[0] == before[0] + 2  # only the accepted postback's two events


def test_rate_limits_in_process_without_redis(tmp_path):
    _fresh_window()
    platform = Platform(tmp_path, **LIMITS)
    _limits_apply(platform)
    # Without Redis, another instance counts apart.
    second = Platform(tmp_path / "second", **LIMITS)
    assert _click(second.client) == 302


def test_rate_limits_in_redis_are_shared_by_two_instances(tmp_path, redis_url):
    _fresh_window()
    platform = Platform(tmp_path, redis_url=redis_url, **LIMITS)
    _limits_apply(platform)
    second = Platform(tmp_path / "second", redis_url=redis_url, **LIMITS)
    assert _click(second.client) == 429  # the first instance used the address's clicks up
    fresh = TestClient(second.app, client=("203.0.113.77", 1))
    assert [_click(fresh) for _ in range(2)] == [302, 302]
    assert _click(TestClient(platform.app, client=("203.0.113.77", 1))) == 302  # the third, on the other instance
    assert _click(fresh) == 429
    assert redis.Redis.from_url(redis_url).keys("alpes:rl:*")


def test_a_dead_redis_degrades_to_in_process_limits_never_to_5xx(tmp_path):
    _fresh_window()
    platform = Platform(tmp_path, redis_url="redis://127.0.0.1:1/0", **LIMITS)
    _limits_apply(platform)
    with platform.runtime.db.read() as session:
        o = platform.tables.outbox
        degraded = session.scalar(select(func.count()).select_from(o).where(o.c.event_type == "ServicioDegradado"))
    assert degraded == 1
    assert platform.client.get("/health").json()["rate_limits"]
