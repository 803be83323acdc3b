"""The protected local mode: on loopback with ALPES_AUTH=auto, anonymous callers act as the operator
until the first key exists; ALPES_AUTH=required or a non-loopback ALPES_HOST closes it."""

from __future__ import annotations

import time

import pytest
from access_helpers import bearer, install_key
from fastapi.testclient import TestClient

from alpes.afiliados.service import build
from alpes.settings import Settings


@pytest.mark.parametrize("host, auth, protected", [
    ("127.0.0.1", "auto", True), ("localhost", "auto", True), ("::1", "auto", True),
    ("127.0.0.1", "required", False), ("0.0.0.0", "auto", False), ("10.0.0.5", "auto", False),
    ("alpes.example.com", "auto", False),
])
def test_only_loopback_with_auth_auto_is_protected_local(host, auth, protected):
    assert Settings(host=host, auth=auth).protected_local_mode is protected


def test_anonymous_is_the_operator_until_the_first_key(tmp_path):
    app, runtime = build(Settings(data_dir=tmp_path, broker_url="pulsar://127.0.0.1:1"))
    client = TestClient(app)
    access = client.get("/health").json()["access"]
    assert access["mode"] == "protected-local" and access["anonymous_is_operator"] is True
    assert "alpes keys create --role operator" in access["warning"]
    assert client.get("/afiliados").status_code == 200
    key = install_key(runtime, "operator")
    time.sleep(1.1)  # each service looks for a first key at most once a second
    refused = client.get("/afiliados")
    assert refused.status_code == 401 and refused.headers["www-authenticate"] == 'Bearer realm="alpes"'
    assert client.get("/health").json()["access"]["anonymous_is_operator"] is False
    assert client.get("/afiliados", headers=bearer(key)).status_code == 200
    # A revoked or made-up key is refused whatever the mode; the reason never repeats the key.
    bad = client.get("/afiliados", headers=bearer("alpes_op_abc_def"))
    assert bad.status_code == 401 and 'error="invalid_token"' in bad.headers["www-authenticate"]
    assert "alpes_op_abc_def" not in bad.text


def test_required_mode_is_closed_from_the_start(tmp_path):
    app, _runtime = build(Settings(data_dir=tmp_path, broker_url="pulsar://127.0.0.1:1", auth="required"))
    client = TestClient(app)
    assert client.get("/afiliados").status_code == 401
    assert client.post("/afiliados", json={"user_id": "u", "email": "a@example.com", "nombre": "A"}).status_code == 401
    assert client.get("/health").json()["access"] == {"mode": "required", "anonymous_is_operator": False,
                                                      "warning": None}
    assert client.get("/openapi.json").status_code == 200 and client.get("/docs").status_code == 200
