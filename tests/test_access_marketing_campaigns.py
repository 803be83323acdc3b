"""Marketing's advertisers, campaigns, enrollments and rules under real keys (issue 10): each caller
kept to its tenant, another tenant's resource answered 404 with nothing stored or emitted, the
landing URL held to the owner's domains (hole 6), and the marketing half of the payout-fraud chain
(hole 1) closed. In-process (no broker): the outbox shows what would have been published."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from importlib import import_module

import pytest
from access_helpers import bearer, install_key
from fastapi.testclient import TestClient
from sqlalchemy import select
from test_http import _count, _fields

from alpes.kernel.codec import SchemaRegistry
from alpes.kernel.request_signing import advertiser_secret, format_secret
from alpes.settings import Settings

REGISTRY = SchemaRegistry.from_directory()
NOW = datetime.now(UTC)


def _build(tmp_path, **settings):
    settings = Settings(data_dir=tmp_path, broker_url="pulsar://127.0.0.1:1", **settings)
    app, runtime = import_module("alpes.marketing.service").build(settings)
    return TestClient(app), runtime, import_module("alpes.marketing.tables"), settings


def _outbox(runtime, tables, event_type: str | None = None) -> list[dict]:
    """The outbox rows (oldest first), each with its payload decoded by the schema registry."""
    with runtime.db.read() as session:
        rows = session.execute(select(tables.outbox).order_by(tables.outbox.c.id)).mappings().all()
    return [{**r, "payload": REGISTRY.decode(r["event_type"], r["payload"], r["schema_version"])}
            for r in rows if event_type is None or r["event_type"] == event_type]


def _key_id(key: str) -> str:
    return key.split("_")[2]


def _enable(runtime, tables, *afiliados: str) -> None:
    """Marketing learns these affiliates were validated (as its consumer of afiliados.eventos would)."""
    with runtime.db.transaction() as session:
        for afiliado in afiliados:
            session.execute(tables.afiliados.insert().values(afiliado_id=afiliado, estado="habilitado",
                                                             actualizado_en=NOW))


class World:
    """Advertisers A and B (each with a key), affiliates X and Y (enrolled in A's and B's campaign
    respectively) and Z (enrolled nowhere), an operator, and one campaign each for A, B and the operator."""

    def __init__(self, client, runtime, tables, settings):
        self.client, self.runtime, self.tables, self.settings = client, runtime, tables, settings
        self.op = install_key(runtime, "operator")
        self.a_id = self.register("Brand A", ["brand-a.com"], "500.00")["id"]
        self.b_id = self.register("Brand B", ["brand-b.com"], None)["id"]
        self.adv_a = install_key(runtime, "advertiser", anunciante_id=self.a_id)
        self.adv_b = install_key(runtime, "advertiser", anunciante_id=self.b_id)
        self.aff_x = install_key(runtime, "affiliate", afiliado_id="X")
        self.aff_y = install_key(runtime, "affiliate", afiliado_id="Y")
        self.aff_z = install_key(runtime, "affiliate", afiliado_id="Z")
        _enable(runtime, tables, "X", "Y", "Z")
        self.camp_a = self.create(self.adv_a, landing_url="https://shop.brand-a.com/oferta")
        self.camp_b = self.create(self.adv_b, landing_url="https://brand-b.com/")
        self.camp_op = self.create(self.op, landing_url="https://shop.example.com/op")
        self.enroll(self.adv_a, self.camp_a, "X")
        self.enroll(self.adv_b, self.camp_b, "Y")

    def register(self, nombre, dominios, maximo):
        response = self.client.post("/anunciantes", headers=bearer(self.op), json={
            "nombre": nombre, "dominios": dominios, "valor_maximo_conversion": maximo})
        assert response.status_code == 201, response.text
        return response.json()

    def create(self, key, **terms):
        response = self.client.post("/campanas", headers=bearer(key),
                                    json={"nombre": "Camp", "porcentaje_comision": "10", **terms})
        assert response.status_code == 201, response.text
        return response.json()["id"]

    def enroll(self, key, campana, afiliado):
        response = self.client.post(f"/campanas/{campana}/inscripciones", headers=bearer(key),
                                    json={"afiliado_id": afiliado})
        assert response.status_code == 201, response.text
        return response.json()

    def get(self, key, path, **params):
        return self.client.get(path, headers=bearer(key), params=params)

    def outbox_count(self) -> int:
        return _count(self.runtime, self.tables.outbox)


@pytest.fixture
def world(tmp_path):
    return World(*_build(tmp_path))


# -- advertisers --------------------------------------------------------------------------------
def test_an_operator_registers_an_advertiser_and_is_shown_its_secret_once(world):
    body = world.register("Brand C", ["shop.brand-c.com", "brand-c.com", "brand-c.com", "xn--brnd-6na.com"], "75.50")
    master = world.settings.postback_keys()[0]
    secret = format_secret(advertiser_secret(master, body["id"], 1))
    assert body["secreto_postback"] == secret and body["secreto_version"] == 1
    assert body["secreto_anterior_hasta"] is None and body["valor_maximo_conversion"] == "75.50"
    assert body["dominios"] == ["brand-c.com", "shop.brand-c.com", "xn--brnd-6na.com"]  # once each, sorted
    shown = world.get(world.op, f"/anunciantes/{body['id']}")
    assert shown.status_code == 200 and "secreto_postback" not in shown.json() and secret not in shown.text
    assert secret not in world.get(world.op, "/anunciantes").text
    with world.runtime.db.read() as session:  # derived, never stored
        row = session.execute(select(world.tables.anunciantes).where(world.tables.anunciantes.c.id == body["id"])
                              ).mappings().one()
    assert secret[len("alpes_sig_"):] not in repr(dict(row))
    [event] = [e for e in _outbox(world.runtime, world.tables, "AnuncianteRegistrado")
               if e["payload"]["id"] == body["id"]]
    assert event["topic"] == "marketing.eventos" and event["partition_key"] == body["id"]
    assert event["payload"]["dominios"] == body["dominios"] and event["payload"]["nombre"] == "Brand C"
    assert event["payload"]["valor_maximo_conversion"] == Decimal("75.50")
    assert (event["actor_id"], event["actor_role"]) == (_key_id(world.op), "operator")
    assert secret.encode() not in event["payload"].__repr__().encode()


@pytest.mark.parametrize("who", ["adv_a", "aff_x"])
def test_only_operators_register_advertisers(world, who):
    before = (world.outbox_count(), _count(world.runtime, world.tables.anunciantes))
    response = world.client.post("/anunciantes", headers=bearer(getattr(world, who)),
                                 json={"nombre": "Mine", "dominios": ["mine.com"]})
    assert response.status_code == 403
    assert (world.outbox_count(), _count(world.runtime, world.tables.anunciantes)) == before


@pytest.mark.parametrize("dominio", [
    "https://brand.com", "brand.com:443", "*.brand.com", "Brand.com", "127.0.0.1", "[::1]", "localhost",
    "intranet", "metrics.internal", "printer.local", "bránd.com", "brand.com.", " brand.com", "brand.com/path",
    "ab--cd.com", "xn--zz-.com", "brand..com", "-brand.com", "brand_x.com", "brand.123", "a" * 64 + ".com",
])
def test_advertiser_domains_are_parsed_strictly(world, dominio):
    before = world.outbox_count()
    response = world.client.post("/anunciantes", headers=bearer(world.op),
                                 json={"nombre": "Strict", "dominios": ["ok.com", dominio]})
    assert response.status_code == 422 and _fields(response) == {"dominios.1"}, response.text
    assert world.outbox_count() == before and _count(world.runtime, world.tables.anunciantes) == 2


def test_no_more_than_50_domains(world):
    response = world.client.post("/anunciantes", headers=bearer(world.op),
                                 json={"nombre": "Many", "dominios": [f"d{n}.com" for n in range(51)]})
    assert response.status_code == 422 and _fields(response) == {"dominios"}


def test_an_advertiser_sees_and_updates_itself_only(world):
    assert [a["id"] for a in world.get(world.adv_a, "/anunciantes").json()["anunciantes"]] == [world.a_id]
    assert {a["id"] for a in world.get(world.op, "/anunciantes").json()["anunciantes"]} == {world.a_id, world.b_id}
    assert world.get(world.adv_a, f"/anunciantes/{world.b_id}").status_code == 404
    assert world.get(world.adv_a, "/anunciantes/no-such-id").status_code == 404  # same answer as another's
    assert world.get(world.aff_x, "/anunciantes").status_code == 403
    before = world.outbox_count()
    taken = world.client.put(f"/anunciantes/{world.b_id}", headers=bearer(world.adv_a), json={
        "nombre": "Mine now", "dominios": ["evil.io"], "valor_maximo_conversion": None})
    assert taken.status_code == 404 and world.outbox_count() == before
    assert world.get(world.op, f"/anunciantes/{world.b_id}").json()["dominios"] == ["brand-b.com"]
    changes = {"nombre": "Brand A SAS", "dominios": ["brand-a.com", "brand-a.co"], "valor_maximo_conversion": "900"}
    updated = world.client.put(f"/anunciantes/{world.a_id}", headers=bearer(world.adv_a), json=changes)
    assert updated.status_code == 200 and updated.json()["dominios"] == ["brand-a.co", "brand-a.com"]
    assert updated.json()["valor_maximo_conversion"] == "900.00" and "secreto_postback" not in updated.json()
    [event] = _outbox(world.runtime, world.tables, "AnuncianteActualizado")
    assert event["payload"]["dominios"] == ["brand-a.co", "brand-a.com"] and event["partition_key"] == world.a_id
    assert (event["actor_id"], event["actor_role"]) == (_key_id(world.adv_a), "advertiser")
    again = world.client.put(f"/anunciantes/{world.a_id}", headers=bearer(world.adv_a), json=changes)
    assert again.status_code == 200 and len(_outbox(world.runtime, world.tables, "AnuncianteActualizado")) == 1
    # PUT replaces: leaving the maximum out is an error, not a silent removal of the fraud limit.
    missing = world.client.put(f"/anunciantes/{world.a_id}", headers=bearer(world.adv_a),
                               json={"nombre": "X", "dominios": []})
    assert missing.status_code == 422 and _fields(missing) == {"valor_maximo_conversion"}


def test_rotating_the_postback_secret_shows_the_new_one_and_keeps_the_old_for_a_day(world):
    master = world.settings.postback_keys()[0]
    before = world.outbox_count()
    stolen = world.client.post(f"/anunciantes/{world.a_id}/secreto-postback", headers=bearer(world.adv_b))
    assert stolen.status_code == 404 and world.outbox_count() == before
    assert world.client.post(f"/anunciantes/{world.a_id}/secreto-postback",
                             headers=bearer(world.aff_x)).status_code == 403
    rotated = world.client.post(f"/anunciantes/{world.a_id}/secreto-postback", headers=bearer(world.adv_a))
    assert rotated.status_code == 200, rotated.text
    body = rotated.json()
    assert body["secreto_version"] == 2
    assert body["secreto_postback"] == format_secret(advertiser_secret(master, world.a_id, 2))
    assert body["secreto_postback"] != format_secret(advertiser_secret(master, world.a_id, 1))
    until = datetime.fromisoformat(body["secreto_anterior_hasta"])
    assert timedelta(hours=23, minutes=59) < until - datetime.now(UTC) <= timedelta(hours=24)
    [event] = _outbox(world.runtime, world.tables, "SecretoPostbackRotado")
    assert event["payload"]["anunciante_id"] == world.a_id and event["payload"]["version"] == 2
    assert (event["actor_id"], event["actor_role"]) == (_key_id(world.adv_a), "advertiser")
    assert body["secreto_postback"][len("alpes_sig_"):].encode() not in event["payload"].__repr__().encode()
    by_operator = world.client.post(f"/anunciantes/{world.a_id}/secreto-postback", headers=bearer(world.op))
    assert by_operator.json()["secreto_version"] == 3
    assert world.get(world.adv_b, f"/anunciantes/{world.b_id}").json()["secreto_version"] == 1


# -- campaign owner ------------------------------------------------------------------------------
def test_an_advertisers_campaign_is_its_own_and_carries_its_maximum_in_campana_creada_v5(world):
    campana = world.get(world.adv_a, f"/campanas/{world.camp_a}").json()
    assert campana["anunciante_id"] == world.a_id and campana["valor_maximo_conversion"] == "500.00"
    [event] = [e for e in _outbox(world.runtime, world.tables, "CampanaCreada") if e["partition_key"] == world.camp_a]
    assert event["schema_version"] == 5 == REGISTRY.latest_version("CampanaCreada")
    assert event["payload"]["anunciante_id"] == world.a_id
    assert event["payload"]["valor_maximo_conversion"] == Decimal("500.00")
    assert (event["actor_id"], event["actor_role"]) == (_key_id(world.adv_a), "advertiser")
    own = world.create(world.adv_a, valor_maximo_conversion="80.00", moneda="USD")
    assert world.get(world.adv_a, f"/campanas/{own}").json()["valor_maximo_conversion"] == "80.00"
    yen = world.create(world.adv_a, moneda="JPY")  # the default, rounded down to whole yen
    assert world.get(world.adv_a, f"/campanas/{yen}").json()["valor_maximo_conversion"] == "500.00"
    none = world.get(world.adv_b, f"/campanas/{world.camp_b}").json()
    assert none["anunciante_id"] == world.b_id and none["valor_maximo_conversion"] is None


def test_an_advertiser_cannot_create_a_campaign_for_another(world):
    before = (world.outbox_count(), _count(world.runtime, world.tables.campanas))
    response = world.client.post("/campanas", headers=bearer(world.adv_a), json={
        "nombre": "For B", "porcentaje_comision": "10", "anunciante_id": world.b_id})
    assert response.status_code == 404 and _fields(response) == {"anunciante_id"}
    assert (world.outbox_count(), _count(world.runtime, world.tables.campanas)) == before
    mine = world.client.post("/campanas", headers=bearer(world.adv_a), json={
        "nombre": "Mine", "porcentaje_comision": "10", "anunciante_id": world.a_id})
    assert mine.status_code == 201 and mine.json()["anunciante_id"] == world.a_id
    assert world.client.post("/campanas", headers=bearer(world.aff_x), json={
        "nombre": "Mine", "porcentaje_comision": "100"}).status_code == 403


def test_an_operator_names_the_owner_or_keeps_the_campaign(world):
    for_b = world.create(world.op, anunciante_id=world.b_id, landing_url="https://brand-b.com/x")
    assert world.get(world.adv_b, f"/campanas/{for_b}").json()["anunciante_id"] == world.b_id
    before = world.outbox_count()
    unknown = world.client.post("/campanas", headers=bearer(world.op), json={
        "nombre": "Ghost", "porcentaje_comision": "10", "anunciante_id": "no-such-advertiser"})
    assert unknown.status_code == 404 and _fields(unknown) == {"anunciante_id"} and world.outbox_count() == before
    # For an advertiser, the landing URL is held to that advertiser's domains even when an operator creates it.
    wrong = world.client.post("/campanas", headers=bearer(world.op), json={
        "nombre": "B", "porcentaje_comision": "10", "anunciante_id": world.b_id, "landing_url": "https://brand-a.com"})
    assert wrong.status_code == 422 and _fields(wrong) == {"landing_url"}
    assert world.get(world.op, f"/campanas/{world.camp_op}").json()["anunciante_id"] is None


# -- landing URLs (hole 6) -----------------------------------------------------------------------
@pytest.mark.parametrize("url, why", [
    ("https://brand-a.com.evil.io/", "registered domains"),  # the registered name as a subdomain of another
    ("https://evil.io/brand-a.com", "registered domains"),   # ... or in the path
    ("https://brand-a.com@evil.io/", "user information"),    # userinfo: the host is evil.io
    ("https://user:pw@shop.brand-a.com/", "user information"),
    ("http://127.0.0.1:9090/metrics", "IP address"),         # loopback address and the metrics port
    ("https://127.0.0.1/", "IP address"), ("https://[::1]/", "IP address"), ("https://10.0.0.7/", "IP address"),
    ("https://2130706433/", "single-label"), ("https://0x7f.1/", "IP address"),
    ("https://localhost/", "single-label"), ("https://metrics.localhost/", "private"),
    ("https://brand-a.local/", "private"), ("https://vault.internal/", "private"),
    ("https://bránd-a.com/", "xn--"),                         # an IDN look-alike (á)
    ("https://brаnd-a.com/", "xn--"),                         # Cyrillic а
    ("https://shop.brand-a.com:8443/", "port"),               # a port other than the default
    ("https://evilbrand-a.com/", "registered domains"),       # suffix without a dot
    ("https://evil.io\\@brand-a.com/", "backslash"),          # browsers read it as a slash
    ("https://%62rand-a.com/", "percent"),                    # percent-encoded host
    ("https://brand-a.com./", "trailing dot"),
    ("javascript:alert(1)", "pattern"),
])
def test_a_landing_url_off_the_advertisers_domains_is_refused(world, url, why):
    before = (world.outbox_count(), _count(world.runtime, world.tables.campanas))
    response = world.client.post("/campanas", headers=bearer(world.adv_a), json={
        "nombre": "Trick", "porcentaje_comision": "10", "landing_url": url})
    assert response.status_code == 422 and _fields(response) == {"landing_url"}, response.text
    assert why in response.json()["errors"][0]["reason"], response.text
    assert (world.outbox_count(), _count(world.runtime, world.tables.campanas)) == before


@pytest.mark.parametrize("url", ["https://brand-a.com", "https://shop.brand-a.com/p?q=1#f", "https://A.Brand-A.com/",
                                 "https://brand-a.com:443/x",
                                 "http://brand-a.com/"])  # http: the protected local mode only
def test_a_landing_url_on_the_advertisers_domains_is_taken(world, url):
    response = world.client.post("/campanas", headers=bearer(world.adv_a), json={
        "nombre": "Fine", "porcentaje_comision": "10", "landing_url": url})
    assert response.status_code == 201 and response.json()["landing_url"] == url, response.text


def test_an_idn_is_taken_in_its_registered_xn_form_only(world):
    world.client.put(f"/anunciantes/{world.a_id}", headers=bearer(world.adv_a), json={
        "nombre": "Brand A", "dominios": ["brand-a.com", "xn--brnd-6na.com"], "valor_maximo_conversion": "500"})
    assert world.client.post("/campanas", headers=bearer(world.adv_a), json={
        "nombre": "IDN", "porcentaje_comision": "10", "landing_url": "https://xn--brnd-6na.com/"}).status_code == 201
    refused = world.client.post("/campanas", headers=bearer(world.adv_a), json={
        "nombre": "IDN", "porcentaje_comision": "10", "landing_url": "https://bránd.com/"})
    assert refused.status_code == 422 and "xn--" in refused.json()["errors"][0]["reason"]


@pytest.mark.parametrize("url, allowed", [
    ("https://any-shop.example.org/", True),  # an operator's own campaign has no domain list...
    ("https://brand-a.com@evil.io/", False),  # ... but every other refusal holds
    ("http://127.0.0.1:9090/metrics", False), ("https://localhost/", False), ("https://bránd.com/", False),
    ("https://db.internal/", False), ("https://shop.example.com:8080/", False),
])
def test_operator_campaigns_get_every_refusal_but_the_domain_list(world, url, allowed):
    response = world.client.post("/campanas", headers=bearer(world.op), json={
        "nombre": "Op", "porcentaje_comision": "10", "landing_url": url})
    assert response.status_code == (201 if allowed else 422), response.text
    if not allowed:
        assert _fields(response) == {"landing_url"}


def test_https_only_outside_the_protected_local_mode(tmp_path):
    client, runtime, tables, _settings = _build(tmp_path, auth="required")
    op = install_key(runtime, "operator")
    anunciante = client.post("/anunciantes", headers=bearer(op), json={"nombre": "A", "dominios": ["brand-a.com"]})
    adv = install_key(runtime, "advertiser", anunciante_id=anunciante.json()["id"])
    for key in (adv, op):
        plain = client.post("/campanas", headers=bearer(key), json={
            "nombre": "Plain", "porcentaje_comision": "10", "landing_url": "http://brand-a.com/"})
        assert plain.status_code == 422 and "https" in plain.json()["errors"][0]["reason"]
    assert _count(runtime, tables.campanas) == 0
    assert client.post("/campanas", headers=bearer(adv), json={
        "nombre": "Tls", "porcentaje_comision": "10", "landing_url": "https://brand-a.com/"}).status_code == 201


# -- tenant scoping of campaigns -------------------------------------------------------------------
def test_campaign_lists_are_filtered_to_the_callers_tenant(world):
    def ids(key):
        response = world.get(key, "/campanas")
        assert response.status_code == 200
        return {c["id"] for c in response.json()["campanas"]}
    assert ids(world.op) == {world.camp_a, world.camp_b, world.camp_op}
    assert ids(world.adv_a) == {world.camp_a} and ids(world.adv_b) == {world.camp_b}
    assert ids(world.aff_x) == {world.camp_a} and ids(world.aff_y) == {world.camp_b}
    assert ids(world.aff_z) == set()


@pytest.mark.parametrize("who, campana", [
    ("adv_a", "camp_b"), ("adv_b", "camp_a"), ("adv_a", "camp_op"),
    ("aff_x", "camp_b"), ("aff_x", "camp_op"), ("aff_z", "camp_a"),
])
def test_another_tenants_campaign_is_not_found(world, who, campana):
    key, campana_id = getattr(world, who), getattr(world, campana)
    for path in (f"/campanas/{campana_id}", f"/campanas/{campana_id}/inscripciones", f"/campanas/{campana_id}/reglas"):
        response, unknown = world.get(key, path), world.get(key, path.replace(campana_id, "no-such"))
        assert response.status_code == 404 and response.json() == unknown.json()  # existence is not told


@pytest.mark.parametrize("action", ["activar", "pausar", "finalizar"])
def test_lifecycle_changes_on_another_advertisers_campaign_are_not_found_and_change_nothing(world, action):
    before = world.outbox_count()
    estado = world.get(world.op, f"/campanas/{world.camp_a}").json()["estado"]
    response = world.client.post(f"/campanas/{world.camp_a}/{action}", headers=bearer(world.adv_b))
    assert response.status_code == 404
    assert world.client.post(f"/campanas/{world.camp_a}/{action}", headers=bearer(world.aff_x)).status_code == 403
    assert world.get(world.op, f"/campanas/{world.camp_a}").json()["estado"] == estado
    assert world.outbox_count() == before
    if action != "activar":  # the owner may (the campaign is active)
        assert world.client.post(f"/campanas/{world.camp_a}/{action}", headers=bearer(world.adv_a)).status_code == 200
        [event] = _outbox(world.runtime, world.tables)[before:]
        assert (event["actor_id"], event["actor_role"]) == (_key_id(world.adv_a), "advertiser")


def test_enrollments_are_the_owners_to_make_and_an_affiliate_sees_only_its_own(world):
    before = world.outbox_count()
    assert world.client.post(f"/campanas/{world.camp_a}/inscripciones", headers=bearer(world.adv_b),
                             json={"afiliado_id": "Y"}).status_code == 404
    assert world.outbox_count() == before and _count(world.runtime, world.tables.inscripciones) == 2
    world.enroll(world.op, world.camp_a, "Y")  # an operator enrolls anywhere
    [event] = _outbox(world.runtime, world.tables)[before:]
    assert event["event_type"] == "AfiliadoInscrito" and event["actor_id"] == _key_id(world.op)
    listed = world.get(world.adv_a, f"/campanas/{world.camp_a}/inscripciones").json()["inscripciones"]
    assert {i["afiliado_id"] for i in listed} == {"X", "Y"}
    own = world.get(world.aff_x, f"/campanas/{world.camp_a}/inscripciones").json()["inscripciones"]
    assert [i["afiliado_id"] for i in own] == ["X"]
    assert world.get(world.aff_x, f"/campanas/{world.camp_a}/inscripciones", estado="activa").json()[
        "inscripciones"][0]["afiliado_id"] == "X"
    assert world.get(world.aff_y, f"/campanas/{world.camp_a}/inscripciones").json()["inscripciones"][0][
        "afiliado_id"] == "Y"


def test_an_affiliate_reads_the_rules_of_its_campaigns_without_other_affiliates_deals(world):
    response = world.client.put(f"/campanas/{world.camp_a}/reglas", headers=bearer(world.adv_a), json={"reglas": [
        {"tipo": "cps", "porcentaje": "30", "afiliado_id": "Y"},
        {"tipo": "cps", "porcentaje": "15", "afiliado_id": "X"},
        {"tipo": "cps", "porcentaje": "10"}]})
    assert response.status_code == 200, response.text
    [event] = _outbox(world.runtime, world.tables, "ReglasComisionActualizadas")
    assert (event["actor_id"], event["actor_role"]) == (_key_id(world.adv_a), "advertiser")
    seen = world.get(world.aff_x, f"/campanas/{world.camp_a}/reglas")
    assert seen.status_code == 200
    assert [(r["id"], r["afiliado_id"]) for r in seen.json()["reglas"]] == [("r2", "X"), ("r3", None)]
    assert len(world.get(world.adv_a, f"/campanas/{world.camp_a}/reglas").json()["reglas"]) == 3
    assert world.get(world.aff_y, f"/campanas/{world.camp_a}/reglas").status_code == 404  # not enrolled in A's


# -- hole 1, the payout-fraud chain, at marketing -----------------------------------------------------
def test_the_payout_fraud_chain_stops_at_marketing(world):
    """An affiliate cannot enroll itself in someone else's campaign nor give itself a 100% rule,
    and another advertiser cannot rewrite a campaign's rules: nothing stored, nothing emitted."""
    before = (world.outbox_count(), _count(world.runtime, world.tables.inscripciones),
              _count(world.runtime, world.tables.reglas_comision))
    self_enroll = world.client.post(f"/campanas/{world.camp_b}/inscripciones", headers=bearer(world.aff_x),
                                    json={"afiliado_id": "X"})
    assert self_enroll.status_code == 403
    hundred = {"reglas": [{"tipo": "cps", "porcentaje": "100", "afiliado_id": "X"}]}
    for campana in (world.camp_a, world.camp_b):  # its own program included
        assert world.client.put(f"/campanas/{campana}/reglas", headers=bearer(world.aff_x),
                                json=hundred).status_code == 403
    assert world.client.put(f"/campanas/{world.camp_a}/reglas", headers=bearer(world.adv_b),
                            json=hundred).status_code == 404
    assert world.client.put("/campanas/no-such/reglas", headers=bearer(world.adv_b), json=hundred).status_code == 404
    assert world.client.post("/campanas", headers=bearer(world.aff_x),
                             json={"nombre": "Mine", "porcentaje_comision": "100"}).status_code == 403
    assert (world.outbox_count(), _count(world.runtime, world.tables.inscripciones),
            _count(world.runtime, world.tables.reglas_comision)) == before
    assert world.get(world.op, f"/campanas/{world.camp_a}/reglas").json()["version"] == 0


def test_every_keyed_change_names_its_key_as_the_actor(world):
    rows = _outbox(world.runtime, world.tables)
    by_key = {_key_id(world.op): "operator", _key_id(world.adv_a): "advertiser", _key_id(world.adv_b): "advertiser"}
    assert rows and all(by_key.get(r["actor_id"]) == r["actor_role"] for r in rows), \
        [(r["event_type"], r["actor_id"], r["actor_role"]) for r in rows]
    assert {r["actor_id"] for r in rows if r["event_type"] == "AfiliadoInscrito"} == {
        _key_id(world.adv_a), _key_id(world.adv_b)}
