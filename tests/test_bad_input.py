"""Bad input on every POST/PUT endpoint, on SQLite and MariaDB: oversized bodies, wrong content
types, broken or non-UTF-8 JSON, absurd money, unknown currencies, dates out of range, injected
strings. Each gets a 4xx naming the field and the reason, and nothing is stored: every table of
the service (state, outbox, event store, inbox) is the same after the request as before it."""

from __future__ import annotations

import json
from importlib import import_module

import pytest
from conftest import create_mariadb_database
from fastapi.testclient import TestClient
from sqlalchemy import inspect, select, text

from alpes.kernel.http import DEFAULT_MAX_BODY_BYTES
from alpes.settings import Settings

SERVICES = ("afiliados", "conversiones", "marketing")


class Service:
    def __init__(self, name: str, settings: Settings) -> None:
        self.name = name
        self.app, self.runtime = import_module(f"alpes.{name}.service").build(settings)
        self.client = TestClient(self.app)  # no lifespan: no broker, events stay in the outbox
        self.ids: dict[str, str] = {}

    def snapshot(self) -> dict[str, list]:
        """Every row of every table, in a stable order."""
        engine = self.runtime.db.engine
        tables = inspect(engine).get_table_names()
        with engine.connect() as connection:
            return {t: sorted(map(repr, connection.execute(select(text("*")).select_from(text(t))).all()))
                    for t in tables}

    def refused(self, method: str, path: str, status: int, field: str | None, **kwargs):
        """Send; expect `status` naming `field`, and no row changed anywhere."""
        before = self.snapshot()
        response = self.client.request(method, path, **kwargs)
        assert response.status_code == status, (path, response.status_code, response.text)
        body = response.json()
        assert isinstance(body["detail"], str) and body["errors"], body
        fields = {e["field"] for e in body["errors"]}
        assert all(e["reason"] for e in body["errors"]), body
        if field is not None:
            assert field in fields, (field, body)
        assert self.snapshot() == before, f"{method} {path} stored something"
        return body


@pytest.fixture(scope="module", params=["sqlite", pytest.param("mariadb", marks=pytest.mark.mariadb)])
def services(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp("bad-input")
    urls, drops = {}, []
    for name in SERVICES:
        if request.param == "mariadb":
            url, drop = create_mariadb_database("alpes_bad")
            urls[f"{name}_db_url"] = url
            drops.append(drop)
    settings = Settings(data_dir=directory, broker_url="pulsar://127.0.0.1:1", **urls)
    built = {name: Service(name, settings) for name in SERVICES}
    _seed(built)
    yield built
    for service in built.values():
        service.runtime.db.dispose()
    for drop in drops:
        drop()


def _seed(services: dict[str, Service]) -> None:
    """One of each thing, so path ids are real and a refusal is about the input, not a 404."""
    af = services["afiliados"].client.post("/afiliados", json={"user_id": "u1", "email": "ana@example.com",
                                                                "nombre": "Ana"})
    assert af.status_code == 201, af.text
    services["afiliados"].ids["afiliado_id"] = af.json()["id"]
    campana = services["marketing"].client.post("/campanas", json={"nombre": "BF", "porcentaje_comision": "10"})
    assert campana.status_code == 201, campana.text
    services["marketing"].ids["campana_id"] = campana.json()["id"]
    services["marketing"].ids["pago_id"] = "no-such-payout"
    anunciante = services["marketing"].client.post("/anunciantes", json={"nombre": "BF", "dominios": ["bf.example"]})
    assert anunciante.status_code == 201, anunciante.text
    services["marketing"].ids["anunciante_id"] = anunciante.json()["id"]
    webhook = services["marketing"].client.post("/webhooks", json={"url": "http://127.0.0.1:9/hook",
                                                                    "eventos": ["commission.created"]})
    assert webhook.status_code == 201, webhook.text
    services["marketing"].ids["webhook_id"] = webhook.json()["id"]
    services["marketing"].ids["entrega_id"] = "no-such-delivery"
    conversion = services["conversiones"].client.post("/conversiones", json=POSTBACK)
    assert conversion.status_code == 200, conversion.text
    services["conversiones"].ids["conversion_id"] = conversion.json()["id"]


POSTBACK = {"affiliate_id": "a1", "campaign_id": "k1", "user_id": "cust", "conversion_value": "99.99",
            "conversion_type": "sale"}


def _writes(service: Service) -> list[tuple[str, str]]:
    """Every POST/PUT route of the service, with its path ids filled in."""
    routes = []
    for path, operations in service.app.openapi()["paths"].items():
        for method in sorted(m.upper() for m in operations if m in ("post", "put")):
            for name, value in service.ids.items():
                path = path.replace("{" + name + "}", value)
            routes.append((method, path))
    return routes


@pytest.mark.parametrize("name", SERVICES)
def test_every_write_refuses_oversized_wrong_type_and_broken_bodies(services, name):
    service = services[name]
    writes = _writes(service)
    assert len(writes) >= 4, writes
    big = json.dumps({"nombre": "x" * DEFAULT_MAX_BODY_BYTES}).encode()
    for method, path in writes:
        assert "{" not in path, f"no seeded id for {path}"
        body = service.refused(method, path, 413, "body", content=big, headers={"content-type": "application/json"})
        assert str(DEFAULT_MAX_BODY_BYTES) in body["detail"]
        # Without Content-Length (chunked): counted while read, refused at the limit all the same.
        service.refused(method, path, 413, "body", content=iter([big[:40000], big[40000:]]),
                        headers={"content-type": "application/json"})
        service.refused(method, path, 415, "content-type", content=b'{"a": 1}', headers={"content-type": "text/plain"})
        service.refused(method, path, 415, "content-type", content=b"a=1",
                        headers={"content-type": "application/x-www-form-urlencoded"})
        service.refused(method, path, 415, "content-type", content=b'{"a": 1}', headers={"content-type": ""})
        service.refused(method, path, 422, "body", content=b'{"nombre": "\xff\xfe"}',
                        headers={"content-type": "application/json"})
    # Broken JSON on the writes that take a body.
    for method, path in [("POST", "/afiliados"), ("POST", "/conversiones"), ("POST", "/campanas")]:
        if path.split("/")[1] == name or (name == "marketing" and path == "/campanas"):
            body = service.refused(method, path, 422, "body", content=b'{"nombre": ',
                                   headers={"content-type": "application/json"})
            assert "invalid JSON" in body["errors"][0]["reason"]


def test_body_limit_is_a_setting(tmp_path):
    service = Service("afiliados", Settings(data_dir=tmp_path, broker_url="pulsar://127.0.0.1:1", max_body_bytes=2048))
    body = service.refused("POST", "/afiliados", 413, "body",
                           json={"user_id": "u", "email": "a@b.co", "nombre": "n" * 3000})
    assert "2048" in body["detail"]
    # Under the limit the body reaches validation, which names the field.
    service.refused("POST", "/afiliados", 422, "nombre", json={"user_id": "u", "email": "a@b.co", "nombre": "n" * 1500})
    assert service.client.post("/afiliados", json={"user_id": "u", "email": "a@b.co", "nombre": "n" * 200}).status_code == 201


# -- money, currencies, dates, strings: each field named, nothing stored -------------------------
_HUGE = "1" + "0" * 13  # 10**13: beyond the largest amount (9,999,999,999,999.99)


@pytest.mark.parametrize("change, field", [
    ({"conversion_value": "-10.00"}, "conversion_value"),
    ({"conversion_value": -0.01}, "conversion_value"),
    ({"conversion_value": "0"}, "conversion_value"),
    ({"conversion_value": _HUGE}, "conversion_value"),
    ({"conversion_value": 1e300}, "conversion_value"),
    ({"conversion_value": "1e400"}, "conversion_value"),
    ({"conversion_value": "10.001"}, "conversion_value"),
    ({"conversion_value": "NaN"}, "conversion_value"),
    ({"conversion_value": "Infinity"}, "conversion_value"),
    ({"conversion_value": "-Infinity"}, "conversion_value"),
    ({"conversion_value": "sNaN"}, "conversion_value"),
    ({"conversion_value": ""}, "conversion_value"),
    ({"conversion_value": None}, "conversion_value"),
    ({"conversion_value": True}, "conversion_value"),
    ({"conversion_value": [1]}, "conversion_value"),
    ({"conversion_value": "1500.5", "currency": "JPY"}, "conversion_value"),  # yen have no cents
    ({"conversion_value": "0.01", "currency": "CLP"}, "conversion_value"),
    ({"currency": "ZZZ"}, "currency"),
    ({"currency": "BTC"}, "currency"),
    ({"currency": "EURO"}, "currency"),
    ({"currency": ""}, "currency"),
    ({"currency": 978}, "currency"),
    ({"user_id": "<script>alert(1)</script>"}, "user_id"),
    ({"user_id": "cust\x00"}, "user_id"),
    ({"user_id": "line\nbreak"}, "user_id"),
    ({"user_id": "bell\x07"}, "user_id"),
    ({"user_id": "x\u2028y"}, "user_id"),
    ({"user_id": "u" * 121}, "user_id"),
    ({"user_id": "u" * 70_000}, "body"),  # over the body limit before anything parses it
    ({"affiliate_id": "a1' OR '1'='1"}, "affiliate_id"),
    ({"campaign_id": "k1; DROP TABLE conversiones_view;--"}, "campaign_id"),
    ({"click_id": "<img src=x onerror=alert(1)>"}, "click_id"),
    ({"order_id": "o-1\r\nX-Injected: 1"}, "order_id"),
    ({"order_id": "<b>o</b>"}, "order_id"),
    ({"customer_email": "a@b.co\x00"}, "customer_email"),
    ({"ip": "999.1.1.1"}, "ip"),
    ({"ip": "127.0.0.1; rm -rf /"}, "ip"),
])
def test_bad_postbacks(services, change, field):
    status = 413 if field == "body" else 422
    services["conversiones"].refused("POST", "/conversiones", status, field, json={**POSTBACK, **change})


def test_amounts_in_currencies_without_cents_are_whole(services):
    accepted = services["conversiones"].client.post(
        "/conversiones", json={**POSTBACK, "conversion_value": "1500", "currency": "jpy", "user_id": "yen"})
    assert accepted.status_code == 200, accepted.text
    view = services["conversiones"].client.get(f"/conversiones/{accepted.json()['id']}").json()
    assert view["currency"] == "JPY" and view["conversion_value"] in ("1500", "1500.00")


CAMPAIGN = {"nombre": "Otra", "porcentaje_comision": "5"}


@pytest.mark.parametrize("change, field", [
    ({"presupuesto": "-1"}, "presupuesto"),
    ({"presupuesto": _HUGE}, "presupuesto"),
    ({"presupuesto": "100.001"}, "presupuesto"),
    ({"presupuesto": "NaN"}, "presupuesto"),
    ({"presupuesto": "Infinity"}, "presupuesto"),
    ({"presupuesto": "100.50", "moneda": "JPY"}, "presupuesto"),
    ({"porcentaje_comision": "100.0001"}, "porcentaje_comision"),
    ({"porcentaje_comision": "-0.01"}, "porcentaje_comision"),
    ({"porcentaje_comision": "-Infinity"}, "porcentaje_comision"),
    ({"moneda": "XYZ"}, "moneda"),
    ({"moneda": "eur "}, "moneda"),
    ({"fecha_inicio": "0000-01-01T00:00:00Z"}, "fecha_inicio"),
    ({"fecha_inicio": "0001-01-01T00:00:00Z"}, "fecha_inicio"),
    ({"fecha_fin": "9999-12-31T23:59:59Z"}, "fecha_fin"),
    ({"fecha_fin": "9999-12-31T23:59:59-01:00"}, "fecha_fin"),  # past year 9999 in UTC
    ({"fecha_inicio": "1969-12-31T00:00:00Z"}, "fecha_inicio"),
    ({"fecha_inicio": 0}, "fecha_inicio"),  # a number would be a Unix timestamp: refused
    ({"fecha_inicio": 1767225600}, "fecha_inicio"),
    ({"fecha_inicio": "2026-01-01T00:00:00"}, "fecha_inicio"),  # no time zone
    ({"fecha_inicio": "2026-13-01T00:00:00Z"}, "fecha_inicio"),
    ({"fecha_inicio": "2026-06-01T00:00:00Z", "fecha_fin": "2026-05-01T00:00:00Z"}, "fecha_fin"),  # end before start
    ({"fecha_inicio": "2026-06-01T00:00:00Z", "fecha_fin": "2026-06-01T00:00:00Z"}, "fecha_fin"),
    ({"nombre": "<script>alert('x')</script>"}, "nombre"),
    ({"nombre": "Black\x00Friday"}, "nombre"),
    ({"nombre": "Black\x1bFriday"}, "nombre"),
    ({"nombre": "n" * 201}, "nombre"),
    ({"landing_url": "javascript:alert(1)"}, "landing_url"),
    ({"landing_url": "https://shop.example/\x00"}, "landing_url"),
    ({"ventana_atribucion_dias": 10**12}, "ventana_atribucion_dias"),
    ({"segmentacion": {"paises": ["CO'; DROP TABLE campanas;--"]}}, "segmentacion.paises.0"),
    ({"segmentacion": {"canales": ["<b>"]}}, "segmentacion.canales.0"),
])
def test_bad_campaigns(services, change, field):
    services["marketing"].refused("POST", "/campanas", 422, field, json={**CAMPAIGN, **change})


@pytest.mark.parametrize("body, field", [
    ({"reglas": [{"tipo": "cpa", "monto": "-5"}]}, "reglas.0.monto"),
    ({"reglas": [{"tipo": "cpa", "monto": _HUGE}]}, "reglas.0.monto"),
    ({"reglas": [{"tipo": "cpa", "monto": "NaN"}]}, "reglas.0.monto"),
    ({"reglas": [{"tipo": "cpa", "monto": "2.345"}]}, "reglas.0.monto"),
    ({"reglas": [{"tipo": "cps", "porcentaje": "Infinity"}]}, "reglas.0.porcentaje"),
    ({"reglas": [{"tipo": "cps", "porcentaje": "101"}]}, "reglas.0.porcentaje"),
    ({"reglas": [{"tipo": "cpa", "monto": "5", "afiliado_id": "a' OR 1=1 --"}]}, "reglas.0.afiliado_id"),
    ({"reglas": [], "tope_por_afiliado": {"monto": "-1", "periodo": "mes"}}, "tope_por_afiliado.monto"),
    ({"reglas": [], "tope_por_afiliado": {"monto": "10", "periodo": "siglo"}}, "tope_por_afiliado.periodo"),
    ({"reglas": [{"tipo": "cpa", "monto": "1"}] * 101}, "reglas"),
])
def test_bad_rules(services, body, field):
    marketing = services["marketing"]
    marketing.refused("PUT", f"/campanas/{marketing.ids['campana_id']}/reglas", 422, field, json=body)


def test_rule_amounts_follow_the_campaign_currency(services):
    marketing = services["marketing"]
    yen = marketing.client.post("/campanas", json={**CAMPAIGN, "moneda": "JPY", "presupuesto": "100000"})
    assert yen.status_code == 201, yen.text
    path = f"/campanas/{yen.json()['id']}/reglas"
    marketing.refused("PUT", path, 422, "reglas.1.monto",
                      json={"reglas": [{"tipo": "cpa", "monto": "500"}, {"tipo": "cpa", "monto": "10.50"}]})
    marketing.refused("PUT", path, 422, "tope_por_afiliado.monto",
                      json={"reglas": [], "tope_por_afiliado": {"monto": "0.5", "periodo": "dia"}})
    assert marketing.client.put(path, json={"reglas": [{"tipo": "cpa", "monto": "500"}]}).status_code == 200


@pytest.mark.parametrize("body, field", [
    ({"afiliado_id": "<script>"}, "afiliado_id"),
    ({"afiliado_id": "a1'; DELETE FROM inscripciones;--"}, "afiliado_id"),
    ({"afiliado_id": "x" * 37}, "afiliado_id"),
    ({"afiliado_id": "a1", "canal": "Web Site"}, "canal"),
    ({"afiliado_id": "a1", "categoria": "\x00"}, "categoria"),
])
def test_bad_enrollments(services, body, field):
    marketing = services["marketing"]
    marketing.refused("POST", f"/campanas/{marketing.ids['campana_id']}/inscripciones", 422, field, json=body)


@pytest.mark.parametrize("method, path, body, field", [
    ("POST", "/pagos", {"afiliado_id": "a1' OR '1'='1"}, "afiliado_id"),
    ("POST", "/pagos", {"afiliado_id": ""}, "afiliado_id"),
    ("POST", "/pagos", {"umbral": "0"}, "umbral"),
])
def test_bad_payout_requests(services, method, path, body, field):
    services["marketing"].refused(method, path, 422, field, json=body)


@pytest.mark.parametrize("suffix, body, field", [
    ("reembolso", {"tipo": "robo"}, "tipo"),
    ("reembolso", {"motivo": "<script>x</script>"}, "motivo"),
    ("reembolso", {"motivo": "a\x00b"}, "motivo"),
    ("reembolso", {"motivo": "m" * 501}, "motivo"),
    ("rechazar", {"motivo": "x" * 61}, "motivo"),
    ("rechazar", {"motivo": "fraude\nconfirmado"}, "motivo"),
    ("rechazar", {}, "motivo"),
])
def test_bad_conversion_reviews_and_refunds(services, suffix, body, field):
    conversiones = services["conversiones"]
    conversiones.refused("POST", f"/conversiones/{conversiones.ids['conversion_id']}/{suffix}", 422, field, json=body)


@pytest.mark.parametrize("body, field", [
    ({"user_id": "u9", "email": "a@b.co\x00", "nombre": "Ana"}, "email"),
    ({"user_id": "u9", "email": "<a@b.co>", "nombre": "Ana"}, "email"),
    ({"user_id": "u9", "email": "a@b.co", "nombre": "<img src=x onerror=alert(1)>"}, "nombre"),
    ({"user_id": "u9", "email": "a@b.co", "nombre": "Ana\x00"}, "nombre"),
    ({"user_id": "u9\t", "email": "a@b.co", "nombre": "An\u0085a"}, "nombre"),
    ({"user_id": "u\x1b[31m9", "email": "a@b.co", "nombre": "Ana"}, "user_id"),
    ({"user_id": "u9", "email": "a@b.co", "nombre": "Ana", "pais": "CO'--"}, "pais"),
    ({"user_id": "u9", "email": "a@b.co", "nombre": "Ana", "tipo_documento": "CC",
      "numero_documento": "1' OR '1'='1"}, "numero_documento"),
    ({"user_id": "u9", "email": "a@b.co", "nombre": "Ana", "metodo_pago": "bitcoin"}, "metodo_pago"),
])
def test_bad_affiliates(services, body, field):
    services["afiliados"].refused("POST", "/afiliados", 422, field, json=body)


def test_bad_suspension_reasons(services):
    afiliados = services["afiliados"]
    path = f"/afiliados/{afiliados.ids['afiliado_id']}/suspender"
    for motivo in ("<b>fraude</b>", "fraude\x00", "x" * 501, ""):
        afiliados.refused("POST", path, 422, "motivo", json={"motivo": motivo})


def test_sql_text_in_free_text_is_stored_verbatim_never_run(services):
    """Quotes and SQL words are legitimate in a name (O'Brien; "Select Shop"): stored as data,
    read back as sent, the tables intact."""
    afiliados = services["afiliados"]
    nombre = "O'Brien\"; DROP TABLE afiliados; --"
    created = afiliados.client.post("/afiliados", json={"user_id": "ob", "email": "ob@example.com", "nombre": nombre})
    assert created.status_code == 201, created.text
    assert afiliados.client.get(f"/afiliados/{created.json()['id']}").json()["nombre"] == nombre
    assert "afiliados" in afiliados.snapshot()
