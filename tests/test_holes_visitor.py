"""Issue 10 hole 3, conversiones side: the visitor id set in the `alpes_vid` cookie was public in
ClickRecorded audit payloads, and replaying it as a cookie on another affiliate's link stole the
conversion (last click). Now the cookie is `<visitor id>.<HMAC>`, an unsigned or forged one is
ignored (a new visitor id is issued), and ClickRecorded (v3), then each click of ClicksRecorded,
carries only a keyed hash of the id."""

from __future__ import annotations

import re
from datetime import timedelta

from fastapi.testclient import TestClient
from sqlalchemy import select
from test_attribution import HOUR, REGISTRY, _convert, _visit, conv  # noqa: F401  (conv: the fixture)

from alpes.conversiones import domain as cdomain


def _click_events(runtime, tables) -> list[tuple[dict, int]]:
    with runtime.db.read() as session:
        rows = session.execute(select(tables.outbox.c.payload, tables.outbox.c.schema_version)
                               .where(tables.outbox.c.event_type == "ClicksRecorded")
                               .order_by(tables.outbox.c.id)).all()
    return [(click, r.schema_version) for r in rows
            for click in REGISTRY.decode("ClicksRecorded", r.payload, r.schema_version)["clicks"]]


def _published_visitor(payload: dict) -> str:
    """Whatever the audit log shows of the visitor (the id itself, before the fix; its hash after)."""
    [value] = [v for k, v in payload.items() if k.startswith("visitor") and v]
    return value


def test_replaying_a_visitor_id_from_an_audit_payload_does_not_steal_the_conversion(conv):  # noqa: F811
    app, runtime, tables, clock = conv
    shopper = TestClient(app)
    first = _visit(shopper, clock, "kla1link", timedelta(0))
    [(payload, _)] = _click_events(runtime, tables)
    seen = _published_visitor(payload)
    # The attacker (affiliate a2) reads the audit log and clicks its own link with that visitor id,
    # and with every cookie it could build from it.
    for forged in (seen, f"{seen}.{'0' * 64}", f"{seen}.{seen}"):
        attacker = TestClient(app)
        attacker.cookies.set("alpes_vid", forged, path="/r/")
        _visit(attacker, clock, "kla2link", HOUR)
    conversion = _convert(shopper, clock, first, 2 * HOUR)
    assert (conversion["affiliate_id"], conversion["status"]) == ("a1", "validated")


def test_the_cookie_is_signed_and_a_forged_one_is_replaced(conv):  # noqa: F811
    app, runtime, tables, clock = conv
    client = TestClient(app)
    client.get("/r/kla1link", follow_redirects=False)
    cookie = client.cookies["alpes_vid"]
    assert re.fullmatch(r"[0-9a-f]{32}\.[0-9a-f]{64}", cookie), cookie
    client.get("/r/kfa2link", follow_redirects=False)
    assert client.cookies["alpes_vid"] == cookie  # a signed cookie of ours is kept (and renewed)
    visitor = cookie.split(".")[0]
    for forged in (visitor, f"{visitor}.{'a' * 64}", cookie.upper(), cookie + "0", "x' OR 1=1 --"):
        other = TestClient(app)
        other.cookies.set("alpes_vid", forged, path="/r/")
        issued = other.get("/r/kla1link", follow_redirects=False).headers["set-cookie"].split(";")[0]
        assert issued.startswith("alpes_vid=") and issued != f"alpes_vid={forged}"
        assert re.fullmatch(r"[0-9a-f]{32}\.[0-9a-f]{64}", issued.split("=", 1)[1]) and visitor not in issued
    with runtime.db.read() as session:
        visitors = session.scalars(select(tables.clicks.c.visitor_id)).all()
    assert visitors.count(visitor) == 2 and len(visitors) == 7 and len(set(visitors)) == 6  # 5 new visitors


def test_click_recorded_carries_a_keyed_hash_never_the_visitor_id(conv):  # noqa: F811
    app, runtime, tables, clock = conv
    client = TestClient(app)
    client.get("/r/kla1link", follow_redirects=False)
    client.get("/r/kfa2link", follow_redirects=False)
    visitor = client.cookies["alpes_vid"].split(".")[0]
    events = _click_events(runtime, tables)
    assert {version for _, version in events} == {1} == {REGISTRY.latest_version("ClicksRecorded")}
    hashes = {payload["visitor_hash"] for payload, _ in events}
    assert len(hashes) == 1 and visitor not in hashes and all(re.fullmatch(r"[0-9a-f]{32}", h) for h in hashes)
    assert all("visitor_id" not in payload for payload, _ in events)
    with runtime.db.read() as session:
        raw = b"".join(session.scalars(select(tables.outbox.c.payload)))
    assert visitor.encode() not in raw
    # Older versions stay readable both ways: v2's visitor_id is dropped by the v3 reader.
    old = {"click_id": "k", "link_code": "l", "affiliate_id": "a", "campaign_id": "c",
           "timestamp": events[0][0]["timestamp"], "visitor_id": visitor}
    data, _ = REGISTRY.encode("ClickRecorded", old, 2)
    assert REGISTRY.decode("ClickRecorded", data, 2)["visitor_hash"] is None
    v3 = {k: v for k, v in old.items() if k != "visitor_id"} | {"visitor_hash": events[0][0]["visitor_hash"]}
    new, _ = REGISTRY.encode("ClickRecorded", v3, 3)
    assert REGISTRY.decode("ClickRecorded", new, 3, 2)["visitor_id"] is None


def test_cookies_verify_under_every_key_and_are_signed_with_the_first():
    old, new = b"o" * 32, b"n" * 32
    before = cdomain.VisitorCookies([old])
    during = cdomain.VisitorCookies([new, old])
    issued = before.cookie_for("ab" * 16)
    assert during.visitor_of(issued) == "ab" * 16  # a key being retired still verifies
    assert during.cookie_for("ab" * 16) != issued and cdomain.VisitorCookies([new]).visitor_of(issued) is None
    assert before.visitor_of(None) is None and before.visitor_of("") is None
