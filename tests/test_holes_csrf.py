"""Issue 10 hole 4, CSRF: `POST …/reembolso`, `/campanas/{id}/finalizar` and `/pagos` with an empty
form-encoded body and a foreign Origin answered 200 and changed state. A state change now takes a
JSON body (or none) and no foreign Origin, on every service; nothing is stored when refused."""

from __future__ import annotations

import pytest
from test_bad_input import Service

from alpes.settings import Settings

FORM = {"content-type": "application/x-www-form-urlencoded"}
FOREIGN = {"origin": "https://evil.example"}


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    settings = Settings(data_dir=tmp_path_factory.mktemp("holes-csrf"), broker_url="pulsar://127.0.0.1:1")
    built = {name: Service(name, settings) for name in ("afiliados", "conversiones", "marketing")}
    campana = built["marketing"].client.post("/campanas", json={"nombre": "CSRF", "porcentaje_comision": "5"})
    assert campana.status_code == 201, campana.text
    built["marketing"].ids["campana_id"] = campana.json()["id"]
    yield built
    for service in built.values():
        service.runtime.db.dispose()


def _state_changes(services) -> list[tuple[Service, str, str]]:
    campana = services["marketing"].ids["campana_id"]
    return [(services["marketing"], "POST", f"/campanas/{campana}/finalizar"),
            (services["marketing"], "POST", "/pagos"),
            (services["marketing"], "POST", "/campanas"),
            (services["conversiones"], "POST", "/conversiones/c-1/reembolso"),
            (services["conversiones"], "POST", "/conversiones"),
            (services["afiliados"], "POST", "/afiliados"),
            (services["afiliados"], "DELETE", "/afiliados/a-1/datos-personales")]


@pytest.mark.parametrize("headers", [FORM, {"content-type": "text/plain"}, {"content-type": "multipart/form-data; b=x"},
                                     {**FORM, **FOREIGN}], ids=["form", "text", "multipart", "form+origin"])
def test_a_form_like_request_with_an_empty_body_changes_nothing(services, headers):
    for service, method, path in _state_changes(services):
        if method == "DELETE" and "origin" not in headers:
            continue  # a browser cannot send a cross-site DELETE without asking first
        service.refused(method, path, 415 if "content-type" in headers else 403, "content-type",
                        headers=headers, content=b"")


def test_a_foreign_origin_is_refused_even_with_json(services):
    for service, method, path in _state_changes(services):
        service.refused(method, path, 403, "origin", headers=FOREIGN, json={})


def test_the_services_own_pages_and_servers_still_change_state(services):
    marketing = services["marketing"]
    own = marketing.client.post("/campanas", json={"nombre": "Docs", "porcentaje_comision": "5"},
                                headers={"origin": "http://testserver"})
    assert own.status_code == 201, own.text  # /docs "try it out": Origin is the service itself
    server = marketing.client.post(f"/campanas/{own.json()['id']}/finalizar")  # a server: no Origin, no body
    assert server.status_code == 200, server.text
