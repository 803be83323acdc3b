"""Signed postbacks through conversiones' HTTP edge (conversiones/signed_postbacks.py): an
advertiser signs `t.body` with its postback secret (`Alpes-Signature: t=<unix>,v1=<hex>`) instead
of sending its key. Accepted: a good signature within 5 minutes, once, by the secret of the
advertiser owning the campaign the body names (current version, or the previous one for 24 h
after a rotation), under any of the platform's master keys. Refused with 401, storing nothing:
stale, future, replayed, tampered body or timestamp, another advertiser's secret, a campaign of
another advertiser or of the operator, an unknown campaign, a body that names none."""

from __future__ import annotations

import itertools
import json
import time
from datetime import datetime, timedelta, timezone

import pytest
from access_helpers import bearer
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from test_access_conversiones import REGISTRY, Platform, build
from test_campaign_lifecycle import _incoming

from alpes.conversiones import reference, signed_postbacks
from alpes.kernel.request_signing import sign, signing_key

MASTERS = ["11" * 32, "22" * 32]  # ALPES_POSTBACK_SIGNING_KEYS: the first signs secrets shown, all verify
MASTER = bytes.fromhex(MASTERS[0])
_ORDERS = itertools.count()


@pytest.fixture
def platform(tmp_path):
    p = Platform(tmp_path, postback_signing_keys=",".join(MASTERS))
    yield p
    p.runtime.db.dispose()


def _body(**fields) -> bytes:
    """A postback, each a different one (two alike, signed the same second, would be one signature)."""
    postback = {"affiliate_id": "a1", "campaign_id": "kA1", "user_id": f"customer-{next(_ORDERS)}",
                "conversion_value": "80.00", "conversion_type": "sale", **fields}
    return json.dumps(postback).encode()


def _secret(anunciante_id: str = "A", version: int = 1, master: bytes = MASTER) -> bytes:
    return signing_key(master, anunciante_id, version)


def _send(platform: Platform, body: bytes, header: str, path: str = "/conversiones"):
    return platform.client.post(path, content=body, headers={"Content-Type": "application/json",
                                                             "Alpes-Signature": header})


def _signed(platform: Platform, body: bytes, secret: bytes | None = None, skew: int = 0, path: str = "/conversiones"):
    return _send(platform, body, sign(secret or _secret(), body, int(time.time()) + skew), path)


def _state(platform: Platform) -> tuple:
    """Everything a request could leave behind: events, outbox, order keys, signals, used signatures."""
    return (*platform.stored(), platform.count(platform.tables.firmas_usadas))


def _refused(platform: Platform, response, before, statuses=(401,)) -> str:
    """A 401 with a challenge (or another refusal in `statuses`) that stored and emitted nothing."""
    assert response.status_code in statuses, response.text
    if response.status_code == 401:
        assert "WWW-Authenticate" in response.headers
    assert _state(platform) == before
    return response.json()["errors"][0]["reason"]


def _rotate(platform: Platform, anunciante_id: str, version: int, at: datetime) -> None:
    with platform.runtime.db.transaction() as session:
        reference.learn_secreto_rotado(session, _incoming(REGISTRY, "SecretoPostbackRotado", {
            "anunciante_id": anunciante_id, "version": version, "timestamp": at}, 1))


def test_a_good_signature_posts_as_the_advertiser_once(platform):
    body = _body(order_id="o-1")
    header = sign(_secret(), body, int(time.time()))
    accepted = _send(platform, body, header)
    assert accepted.status_code == 200 and accepted.json()["status"] == "validated", accepted.text
    o = platform.tables.outbox
    with platform.runtime.db.read() as session:
        actors = set(session.execute(select(o.c.actor_id, o.c.actor_role)).all())
    assert actors == {("firma:A", "advertiser")}
    # Replayed as is: refused, nothing more stored (not even the duplicate answer).
    before = _state(platform)
    replay = _send(platform, body, header)
    assert "already used" in _refused(platform, replay, before)
    assert header.split("v1=")[1] not in replay.text


def test_every_master_key_verifies_and_the_second_signs_too(platform):
    assert _signed(platform, _body(), _secret(master=bytes.fromhex(MASTERS[1]))).status_code == 200


@pytest.mark.parametrize("skew", [-301, 301, -10_000])
def test_a_signature_outside_the_5_minute_window_is_refused(platform, skew):
    before = _state(platform)
    assert "window" in _refused(platform, _signed(platform, _body(), skew=skew), before)


@pytest.mark.parametrize("skew", [-290, 290])
def test_a_signature_inside_the_window_is_accepted(platform, skew):
    assert _signed(platform, _body(), skew=skew).status_code == 200


def test_a_tampered_body_or_timestamp_is_refused(platform):
    before = _state(platform)
    body = _body()
    t = int(time.time())
    header = sign(_secret(), body, t)
    for tampered in (_body(conversion_value="8000.00"), body + b" ", body.replace(b"a1", b"a2"),
                     _body(campaign_id="kA2")):
        _refused(platform, _send(platform, tampered, header), before)
    signature = header.split("v1=")[1]
    for header in (f"t={t + 1},v1={signature}", f"t={t - 1},v1={signature}", f"t={t}", f"v1={signature}",
                   f"t={t},v1={'0' * 64}", "garbage", ""):
        _refused(platform, _send(platform, body, header), before)


def test_another_advertisers_secret_or_an_unrelated_one_is_refused(platform):
    before = _state(platform)
    for secret in (_secret("B"), _secret("A", 2), _secret("A", master=b"\x33" * 32), b"alpes_sig_" + b"0" * 64):
        _refused(platform, _signed(platform, _body(), secret), before)


def test_a_signature_for_a_campaign_of_another_advertiser_is_refused(platform):
    """B signs, with its own good secret, postbacks for A's campaign (by id and through A's click)."""
    click = platform.client.get("/r/linka1", follow_redirects=False)
    click_id = click.headers["location"].split("alpes_click_id=")[1]
    before = _state(platform)
    for body in (_body(), _body(campaign_id=None, affiliate_id=None, click_id=click_id),
                 _body(campaign_id="kA1", click_id=click_id)):
        _refused(platform, _signed(platform, body, _secret("B")), before)
    # B's own key cannot do it either (403: a postback for a campaign not its own).
    response = platform.client.post("/conversiones", content=_body(), headers={
        **bearer(platform.keys["B"]), "Content-Type": "application/json"})
    assert response.status_code == 403 and _state(platform) == before
    # Its own campaign, through its own click: fine.
    click_b = platform.client.get("/r/linkb1", follow_redirects=False).headers["location"].split("alpes_click_id=")[1]
    assert _signed(platform, _body(campaign_id=None, affiliate_id=None, click_id=click_b), _secret("B")) \
        .status_code == 200


def test_a_body_naming_no_known_advertisers_campaign_is_refused(platform):
    before = _state(platform)
    for body in (_body(campaign_id="kOp"), _body(campaign_id="k-unknown"), _body(campaign_id=None),
                 _body(campaign_id=None, click_id="no-such-click"), b"[1, 2]", b"{}", _body(campaign_id=7)):
        for secret in (_secret("A"), _secret("B")):
            _refused(platform, _signed(platform, body, secret), before)
    # Not JSON at all: the edge may refuse the body itself first (422); either way, nothing is kept.
    for body in (b"not json", b"[" * 5000 + b"]" * 5000):
        _refused(platform, _signed(platform, body), before, statuses=(401, 422))


def test_after_a_rotation_the_previous_secret_stays_valid_for_24_hours_then_not(platform):
    now = datetime.now(timezone.utc)
    _rotate(platform, "A", 2, now - timedelta(hours=23))
    assert _signed(platform, _body(), _secret("A", 2)).status_code == 200
    assert _signed(platform, _body(), _secret("A", 1)).status_code == 200  # 23 h after: still valid
    assert _signed(platform, _body(), _secret("A", 3)).status_code == 401
    # A redelivered (or older) rotation changes nothing.
    _rotate(platform, "A", 2, now)
    assert _signed(platform, _body(), _secret("A", 1)).status_code == 200
    # The next rotation, 25 h ago: version 2 was valid until an hour ago, version 1 long since.
    _rotate(platform, "A", 3, now - timedelta(hours=25))
    before = _state(platform)
    for version in (1, 2):
        _refused(platform, _signed(platform, _body(), _secret("A", version)), before)
    assert _signed(platform, _body(), _secret("A", 3)).status_code == 200


def test_a_rotation_heard_before_the_registration_is_kept(platform):
    _rotate(platform, "C", 2, datetime.now(timezone.utc) - timedelta(days=2))
    with platform.runtime.db.transaction() as session:
        reference.learn_anunciante(session, _incoming(REGISTRY, "AnuncianteRegistrado", {
            "id": "C", "nombre": "C", "timestamp": datetime.now(timezone.utc)}, 1))
        assert reference.secret_versions(session, "C", datetime.now(timezone.utc)) == [2]
        assert reference.secret_versions(session, "never-heard-of", datetime.now(timezone.utc)) == [1]


def test_a_signed_refund_names_its_conversion_and_only_the_owner_can_sign_it(platform):
    posted = _signed(platform, _body()).json()
    path = f"/conversiones/{posted['id']}/reembolso"
    before = _state(platform)
    refund = json.dumps({"conversion_id": posted["id"], "motivo": "devuelto"}).encode()
    _refused(platform, _signed(platform, refund, _secret("B"), path=path), before)
    _refused(platform, _signed(platform, b"{}", path=path), before)  # names nothing: whose would it be?
    # A's signature over another conversion's id does not refund this one.
    other = _signed(platform, _body()).json()
    before = _state(platform)
    moved = _signed(platform, json.dumps({"conversion_id": other["id"]}).encode(), path=path)
    assert moved.status_code == 422 and [e["field"] for e in moved.json()["errors"]] == ["conversion_id"]
    assert platform.stored() == before[:-1]  # (its signature is spent: it was good)
    done = _signed(platform, refund, path=path)
    assert done.status_code == 200 and done.json()["status"] == "refunded"


def test_a_signed_request_is_a_postback_only(platform):
    """The signature authenticates postbacks and refunds; every other route wants a key."""
    posted = _signed(platform, _body()).json()
    body = json.dumps({"conversion_id": posted["id"]}).encode()
    for method, path in (("GET", "/conversiones"), ("GET", f"/conversiones/{posted['id']}"),
                         ("POST", f"/conversiones/{posted['id']}/aprobar")):
        response = platform.client.request(method, path, content=body, headers={
            "Content-Type": "application/json", "Alpes-Signature": sign(_secret(), body, int(time.time()))})
        assert response.status_code == 401, (path, response.text)


def test_signed_postbacks_count_per_advertiser_for_velocity_and_rate_limits(tmp_path):
    platform = Platform(tmp_path, postback_signing_keys=MASTERS[0], max_conversions_per_caller=2,
                        rate_limit_postbacks_per_key=3)
    statuses = [_signed(platform, _body()).json()["status"] for _ in range(3)]
    assert statuses == ["validated", "validated", "on_hold"]
    with platform.runtime.db.read() as session:
        assert set(session.scalars(select(platform.tables.conversion_signals.c.caller_key))) == {"key:firma:A"}
    if 60 - time.time() % 60 > 2:  # still in the same minute's window
        assert _signed(platform, _body()).status_code == 429


def test_used_signatures_are_forgotten_once_the_window_refuses_them_anyway(platform):
    for _ in range(3):
        assert _signed(platform, _body()).status_code == 200
    assert signed_postbacks.forget_used(platform.runtime.db, clock=time.time) == 0
    assert signed_postbacks.forget_used(platform.runtime.db, clock=lambda: time.time() + 301) == 3
    with platform.runtime.db.read() as session:
        assert session.scalar(select(func.count()).select_from(platform.tables.firmas_usadas)) == 0


def test_protected_local_mode_still_verifies_signatures(tmp_path):
    """Before any key exists an anonymous caller is the local operator, but a bad signature is
    still refused (it is a claim to be an advertiser, checked as such)."""
    app, runtime, _ = build(tmp_path, postback_signing_keys=MASTERS[0])
    client = TestClient(app)
    body = _body()
    bad = client.post("/conversiones", content=body, headers={
        "Content-Type": "application/json", "Alpes-Signature": sign(_secret("B"), body, int(time.time()))})
    assert bad.status_code == 401
    assert client.post("/conversiones", content=body, headers={"Content-Type": "application/json"}).status_code == 200
    runtime.db.dispose()


def test_the_consumer_learns_advertisers_and_rotations_from_marketing():
    from alpes.conversiones import consumers, records

    [spec] = consumers.consumer_specs(records.event_store(REGISTRY))
    assert spec.handlers["AnuncianteRegistrado"] is reference.learn_anunciante
    assert spec.handlers["SecretoPostbackRotado"] is reference.learn_secreto_rotado
