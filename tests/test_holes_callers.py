"""Issue 10 holes about who is calling (all found anonymous on loopback):

- X-Forwarded-For was believed from anyone (a SQL-like string was stored as the click's IP), and
  uvicorn itself believes it from 127.0.0.1, i.e. every local caller;
- the `alpes_vid` cookie lacked `Secure` behind TLS;
- SQLite files were created 0644;
- omitting `ip` in a postback skipped the velocity rule.
"""

from __future__ import annotations

import os
import stat
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from importlib import import_module

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from test_campaign_lifecycle import _incoming

from alpes.conversiones import reference as creference
from alpes.kernel.codec import SchemaRegistry
from alpes.kernel.proxies import forwarded_client, parse_networks, resolve
from alpes.settings import Settings

REGISTRY = SchemaRegistry.from_directory()
NOW = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)
POSTBACK = {"affiliate_id": "a1", "campaign_id": "k1", "user_id": "cust", "conversion_value": "10.00",
            "conversion_type": "sale"}


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> datetime:
        return self.now


def _conversiones(tmp_path, **settings):
    """conversiones knowing campaign k1 (landing URL) and affiliate a1 enrolled with `linkcodea1`."""
    clock = Clock()
    built = Settings(data_dir=tmp_path, broker_url="pulsar://127.0.0.1:1", **settings)
    app, runtime = import_module("alpes.conversiones.service").build(built, clock=clock)
    with runtime.db.transaction() as session:
        creference.learn_campana(session, _incoming(REGISTRY, "CampanaCreada", {
            "id": "k1", "nombre": "n", "porcentaje_comision": Decimal("10"), "moneda": "EUR", "timestamp": NOW,
            "landing_url": "https://shop.example.com/v", "ventana_atribucion_dias": 7}, 2))
        creference.learn_afiliado(session, _incoming(REGISTRY, "AfiliadoHabilitado",
                                                     {"afiliado_id": "a1", "timestamp": NOW}, 1))
        creference.learn_inscripcion(session, _incoming(REGISTRY, "AfiliadoInscrito", {
            "inscripcion_id": "i1", "campana_id": "k1", "afiliado_id": "a1", "link_code": "linkcodea1",
            "timestamp": NOW}, 1))
    return app, runtime, import_module("alpes.conversiones.tables"), clock


def _click_ips(runtime, tables) -> list:
    with runtime.db.read() as session:
        return list(session.scalars(select(tables.clicks.c.ip).order_by(tables.clicks.c.clicked_at,
                                                                        tables.clicks.c.id)))


# -- forwarding headers: only from trusted proxies ---------------------------------------------------
def test_the_right_most_untrusted_hop_is_the_client():
    trusted = parse_networks("10.0.0.0/8, 192.0.2.1")
    assert forwarded_client("198.51.100.1, 203.0.113.9, 10.0.0.1", trusted).exploded == "203.0.113.9"
    assert str(forwarded_client("203.0.113.9, 192.0.2.1", trusted)) == "203.0.113.9"
    # What the client wrote itself (left of the first untrusted hop) never counts, whatever it says.
    assert str(forwarded_client("' OR 1=1 --, 203.0.113.9", trusted)) == "203.0.113.9"
    assert forwarded_client("' OR 1=1 --", trusted) is None
    assert str(forwarded_client("[2001:db8::1]:4711, 10.1.2.3:80", trusted)) == "2001:db8::1"
    # From a peer that is not a trusted proxy the headers say nothing.
    assert resolve("198.51.100.7", "203.0.113.9", "https", trusted) == (parse_networks("198.51.100.7")[0][0], None)
    client, scheme = resolve("10.0.0.2", "203.0.113.9", "https", trusted)
    assert (str(client), scheme) == ("203.0.113.9", "https")
    with pytest.raises(ValueError):
        parse_networks("10.0.0.0/33")
    with pytest.raises(ValueError):
        Settings(trusted_proxies="localhost")


def test_forwarded_for_from_an_untrusted_peer_is_ignored_and_never_stored(tmp_path):
    app, runtime, tables, _ = _conversiones(tmp_path)
    client = TestClient(app, client=("198.51.100.7", 40000))
    for forwarded in ("' OR '1'='1", "203.0.113.9", "1' UNION SELECT password FROM users --, 10.0.0.1"):
        assert client.get("/r/linkcodea1", headers={"X-Forwarded-For": forwarded},
                          follow_redirects=False).status_code == 302
    assert _click_ips(runtime, tables) == ["198.51.100.7"] * 3


def test_forwarded_for_from_a_trusted_proxy_names_the_client_and_only_parsed_addresses_are_stored(tmp_path):
    app, runtime, tables, clock = _conversiones(tmp_path, trusted_proxies="10.0.0.0/8")
    proxy = TestClient(app, client=("10.0.0.2", 40000))
    for n, forwarded in enumerate(("198.51.100.1, 203.0.113.9, 10.0.0.1", "' OR 1=1 --", "::ffff:203.0.113.10")):
        clock.now = NOW + timedelta(seconds=n)
        assert proxy.get("/r/linkcodea1", headers={"X-Forwarded-For": forwarded},
                         follow_redirects=False).status_code == 302
    assert _click_ips(runtime, tables) == ["203.0.113.9", "10.0.0.2", "203.0.113.10"]
    # The test client's peer ("testclient") is no address: nothing, rather than the raw text.
    clock.now = NOW + timedelta(seconds=5)
    TestClient(app).get("/r/linkcodea1", headers={"X-Forwarded-For": "203.0.113.1"}, follow_redirects=False)
    assert _click_ips(runtime, tables)[-1] is None


def test_the_services_run_uvicorn_without_its_own_proxy_headers(monkeypatch, tmp_path):
    """uvicorn's default believes X-Forwarded-For from 127.0.0.1 before the app sees the request."""
    import uvicorn

    from alpes import cli, logs

    seen = {}
    monkeypatch.setattr(logs, "configure_logging", lambda: None)  # no global logging set-up in the test process
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: seen.update(kwargs))
    monkeypatch.setattr(cli, "import_module", lambda name: type("M", (), {"build": staticmethod(
        lambda settings: (object(), None))}))
    cli.service("conversiones", data_dir=tmp_path)
    assert seen["proxy_headers"] is False


# -- the visitor cookie ------------------------------------------------------------------------------
def _cookie(response) -> str:
    [cookie] = [v for k, v in response.headers.multi_items() if k == "set-cookie" and v.startswith("alpes_vid=")]
    return cookie


def test_the_visitor_cookie_is_secure_when_the_click_came_over_https(tmp_path):
    app, _, _, _ = _conversiones(tmp_path, trusted_proxies="10.0.0.1")
    for client, headers, secure in (
        (TestClient(app, base_url="https://testserver"), {}, True),
        (TestClient(app), {}, False),
        (TestClient(app, client=("198.51.100.7", 1)), {"X-Forwarded-Proto": "https"}, False),  # anyone can say it
        (TestClient(app, client=("10.0.0.1", 1)), {"X-Forwarded-Proto": "https"}, True),  # our TLS proxy says it
        (TestClient(app, client=("10.0.0.1", 1)), {"X-Forwarded-Proto": "http"}, False),
    ):
        cookie = _cookie(client.get("/r/linkcodea1", headers=headers, follow_redirects=False))
        attributes = {a.strip().split("=")[0].lower() for a in cookie.split(";")[1:]}
        assert ("secure" in attributes) is secure, (headers, cookie)
        assert "httponly" in attributes and "samesite=lax" in cookie.lower() and "Path=/r/" in cookie


# -- SQLite files private to the service's user -----------------------------------------------------
def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_sqlite_files_and_their_folder_are_created_private(tmp_path):
    data_dir = tmp_path / "fresh" / "data"
    old = os.umask(0o022)
    try:
        app, runtime, _, _ = _conversiones(data_dir)
        TestClient(app).post("/conversiones", json=POSTBACK)
    finally:
        os.umask(old)
    database = data_dir / "conversiones.db"
    files = [p for p in data_dir.iterdir() if p.name.startswith("conversiones.db")]
    assert {p.name for p in files} >= {"conversiones.db", "conversiones.db-wal", "conversiones.db-shm"}
    assert {p.name: _mode(p) for p in files} == {p.name: 0o600 for p in files}
    assert _mode(data_dir) == 0o700 and _mode(database) == 0o600
    runtime.db.dispose()


def test_an_existing_world_readable_sqlite_file_is_made_private(tmp_path):
    database = tmp_path / "conversiones.db"
    database.touch(mode=0o644)
    os.chmod(database, 0o644)
    _, runtime, _, _ = _conversiones(tmp_path)
    assert _mode(database) == 0o600
    runtime.db.dispose()


# -- velocity: omitting `ip` no longer skips it -------------------------------------------------------
def test_postbacks_without_ip_still_count_per_caller(tmp_path):
    app, runtime, tables, clock = _conversiones(tmp_path, max_conversions_per_caller=3, max_conversions_per_ip=2)
    caller = TestClient(app, client=("198.51.100.7", 40000))
    statuses = []
    for n in range(4):
        clock.now = NOW + timedelta(minutes=n)
        statuses.append(caller.post("/conversiones", json=POSTBACK).json()["status"])
    assert statuses == ["validated", "validated", "validated", "on_hold"]
    held = caller.get("/conversiones", params={"status": "on_hold"}).json()["conversiones"]
    assert [c["reason"] for c in held] == ["caller_velocity"]
    # Another caller has its own count; sending an `ip` does not escape the caller's count either.
    other = TestClient(app, client=("198.51.100.8", 40000))
    assert other.post("/conversiones", json=POSTBACK).json()["status"] == "validated"
    assert caller.post("/conversiones", json={**POSTBACK, "ip": "203.0.113.50"}).json()["status"] == "on_hold"
    # Forwarding headers from an untrusted caller do not make it another caller.
    assert caller.post("/conversiones", json=POSTBACK,
                       headers={"X-Forwarded-For": "203.0.113.77"}).json()["status"] == "on_hold"
    clock.now = NOW + timedelta(minutes=64)  # the earlier ones have left the hour
    assert caller.post("/conversiones", json=POSTBACK).json()["status"] == "validated"
    with runtime.db.read() as session:
        keys = set(session.scalars(select(tables.conversion_signals.c.caller_key)))
    assert keys == {"ip:198.51.100.7", "ip:198.51.100.8"}
