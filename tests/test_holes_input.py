"""Issue 10 holes at the HTTP edge, on every service (the shared app factory and money types):
lenient money parsing, and bodies JSON cannot hold (a 5,000-digit number, nesting 5,000 deep)
answered 400 instead of the promised 422 naming `body`. Each refusal names its field and stores
nothing (every table of the service is the same after the request)."""

from __future__ import annotations

from decimal import Decimal

import pytest
from pydantic import BaseModel, TypeAdapter, ValidationError
from test_bad_input import Service

from alpes.kernel.metrics import Metrics
from alpes.kernel.tracing import Tracing
from alpes.kernel.money import Amount, Percentage
from alpes.settings import Settings

SERVICES = ("afiliados", "conversiones", "marketing", "auditoria")
POSTBACK = {"affiliate_id": "a1", "campaign_id": "k1", "user_id": "cust", "conversion_value": "99.99",
            "conversion_type": "sale"}
CAMPAIGN = {"nombre": "Otra", "porcentaje_comision": "5"}

# Written in ways Python's Decimal() takes but the documented pattern does not.
LENIENT = ["１２３", "１２.５０", "٣", "5_000", "1_0.5", " 5 ", "5 ", "\t5", "5\n", "1E+2", "1e2", "2E-1", "+5", "5.",
           ".5", "0x10", "1,5", "1 000", "007", "5.00\u200b", "10.00000"]


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    settings = Settings(data_dir=tmp_path_factory.mktemp("holes-input"), broker_url="pulsar://127.0.0.1:1")
    built = {name: Service(name, settings) for name in SERVICES}
    campana = built["marketing"].client.post("/campanas", json=CAMPAIGN)
    assert campana.status_code == 201, campana.text
    built["marketing"].ids["campana_id"] = campana.json()["id"]
    yield built
    for service in built.values():
        service.runtime.db.dispose()


# -- strict money --------------------------------------------------------------------------------
@pytest.mark.parametrize("text", LENIENT)
def test_money_types_take_only_the_documented_ascii_pattern(text):
    for kind in (Amount, Percentage):
        with pytest.raises(ValidationError):
            TypeAdapter(kind).validate_python(text)


def test_the_documented_forms_and_json_numbers_still_parse_exactly():
    amount, percentage = TypeAdapter(Amount), TypeAdapter(Percentage)
    assert [amount.validate_python(v) for v in ("12.5", "12.50", "0.01", "9999999999999.99", "1500")] == [
        Decimal("12.50"), Decimal("12.50"), Decimal("0.01"), Decimal("9999999999999.99"), Decimal("1500.00")]
    # JSON numbers stay accepted, as the OpenAPI documents them (type number), read exactly.
    assert amount.validate_json("12.5") == Decimal("12.50") and amount.validate_json("7") == Decimal("7.00")
    assert percentage.validate_json("12.3456") == Decimal("12.3456") and percentage.validate_python("0") == 0
    assert percentage.validate_python("100.0000") == Decimal(100) and percentage.validate_python("10.000") == 10
    for text in ("10.000", "0.00", "0", "12.345"):  # more places than money has, or not more than 0
        with pytest.raises(ValidationError):
            amount.validate_python(text)
    from alpes.kernel.money import AMOUNT_PATTERN, PERCENTAGE_PATTERN  # the patterns the OpenAPI publishes

    for text in ("12.5", "0.01", "1500"):
        assert AMOUNT_PATTERN.fullmatch(text)
    assert PERCENTAGE_PATTERN.fullmatch("12.3456") and not PERCENTAGE_PATTERN.fullmatch("１２")


@pytest.mark.parametrize("text", LENIENT)
def test_every_money_input_of_every_service_refuses_lenient_text(services, text):
    services["conversiones"].refused("POST", "/conversiones", 422, "conversion_value",
                                     json={**POSTBACK, "conversion_value": text})
    marketing = services["marketing"]
    marketing.refused("POST", "/campanas", 422, "porcentaje_comision", json={**CAMPAIGN, "porcentaje_comision": text})
    marketing.refused("POST", "/campanas", 422, "presupuesto", json={**CAMPAIGN, "presupuesto": text})
    reglas = f"/campanas/{marketing.ids['campana_id']}/reglas"
    marketing.refused("PUT", reglas, 422, "reglas.0.monto", json={"reglas": [{"tipo": "cpa", "monto": text}]})
    marketing.refused("PUT", reglas, 422, "reglas.0.porcentaje", json={"reglas": [{"tipo": "cps", "porcentaje": text}]})
    marketing.refused("PUT", reglas, 422, "tope_por_afiliado.monto",
                      json={"reglas": [], "tope_por_afiliado": {"monto": text, "periodo": "mes"}})


def test_json_numbers_remain_accepted_as_documented(services):
    answer = services["conversiones"].client.post("/conversiones", json={**POSTBACK, "conversion_value": 12.5,
                                                                         "user_id": "number"})
    assert answer.status_code == 200, answer.text
    view = services["conversiones"].client.get(f"/conversiones/{answer.json()['id']}").json()
    assert view["conversion_value"] == "12.50"
    created = services["marketing"].client.post("/campanas", json={**CAMPAIGN, "porcentaje_comision": 7.5})
    assert created.status_code == 201 and created.json()["porcentaje_comision"] == "7.5000", created.text


# -- bodies JSON cannot hold: 422 naming body, on every service ----------------------------------
def _writes(service: Service) -> list[tuple[str, str]]:
    routes = []
    for path, operations in service.app.openapi()["paths"].items():
        for method in (m.upper() for m in operations if m in ("post", "put")):
            for name, value in service.ids.items():
                path = path.replace("{" + name + "}", value)
            if "{" not in path:
                routes.append((method, path))
    return routes


BODIES = {
    "a 5,000-digit number": b'{"conversion_value": ' + b"9" * 5000 + b"}",
    "a 5,000-digit negative number": b'{"nombre": -' + b"1" * 5000 + b"}",
    "nesting 5,000 deep": b'{"nombre": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    "objects nested 5,000 deep": b'{"a":' * 5000 + b"1" + b"}" * 5000,
}


@pytest.mark.parametrize("name", SERVICES)
@pytest.mark.parametrize("what", sorted(BODIES))
def test_bodies_json_cannot_hold_are_422_naming_body(services, name, what):
    service = services[name]
    writes = _writes(service)
    if name != "auditoria":
        assert writes, f"{name} has no write to try"
    for method, path in writes:
        body = service.refused(method, path, 422, "body", content=BODIES[what],
                               headers={"content-type": "application/json"})
        assert body["errors"][0]["field"] == "body" and "parsing" not in body["errors"][0]["reason"], body


class Echo(BaseModel):
    x: int = 0


def test_the_app_factory_maps_unparsable_bodies_for_any_service(tmp_path):
    """The factory itself (auditoria has no write): any JSON body route gets the same answer."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient
    from alpes.kernel.http import create_app

    class Runtime:
        def __init__(self):
            self.metrics = Metrics(self)  # the app factory times and traces every request
            self.tracing = Tracing("t")

        def start(self): pass

        def stop(self): pass

        def health(self): return {"status": "ok"}

    def include(app: FastAPI) -> None:
        @app.post("/echo")
        def echo(body: Echo) -> dict:
            return body.model_dump()

    client = TestClient(create_app("t", Runtime(), include))
    for raw in (b'{"x": ' + b"1" * 5000 + b"}", b'{"x": ' + b"[" * 5000 + b"]" * 5000 + b"}"):
        answer = client.post("/echo", content=raw, headers={"content-type": "application/json"})
        assert answer.status_code == 422, answer.text
        assert [e["field"] for e in answer.json()["errors"]] == ["body"]
    assert client.post("/echo", json={"x": 5}).json() == {"x": 5}
