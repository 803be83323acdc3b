"""The AsyncAPI document (alpes/asyncapi.py, docs/asyncapi.json, GET /asyncapi.json): built from
the contract and the Avro schemas, deterministic, in step with the committed file, and served by
every service without being built at import time. (The official parser validates it in
`make asyncapi-check`.)"""

from __future__ import annotations

import json
import subprocess
import sys
from importlib import import_module
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from alpes import asyncapi, contract
from alpes.cli import app
from alpes.kernel.codec import raw_schemas
from alpes.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "docs" / "asyncapi.json"
DOC = asyncapi.build()


def _resolve(ref: str) -> dict:
    node = DOC
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    return node


def test_six_channels_with_their_partitions():
    assert DOC["asyncapi"] == "3.0.0"
    assert {topic: channel["x-partitions"] for topic, channel in DOC["channels"].items()} == contract.TOPICS
    for topic, channel in DOC["channels"].items():
        assert channel["address"] == topic
        assert channel["bindings"]["pulsar"]["persistence"] == "persistent"


def test_every_version_of_every_event_is_a_message_with_its_avro_schema():
    schemas = raw_schemas()
    messages = DOC["components"]["messages"]
    assert set(messages) == {f"{e}.v{v}" for e, versions in schemas.items() for v in versions}
    for event, versions in schemas.items():
        channel = DOC["channels"][contract.EVENT_TOPICS[event]]
        for version, schema in versions.items():
            message = messages[f"{event}.v{version}"]
            assert message["payload"] == {"schemaFormat": "application/vnd.apache.avro+json;version=1.9.0",
                                          "schema": schema}
            assert channel["messages"][f"{event}.v{version}"] == {"$ref": f"#/components/messages/{event}.v{version}"}
            fixed = message["headers"]["allOf"][1]["properties"]
            assert fixed == {"event_type": {"const": event}, "schema_version": {"const": str(version)}}


def test_headers_are_the_message_properties():
    envelope = DOC["components"]["schemas"]["EventProperties"]
    assert set(envelope["properties"]) == {"event_id", "event_type", "schema_version", "occurred_at", "correlation_id",
                                           "causation_id", "producer", "actor_id", "actor_role", "signature",
                                           "traceparent"}
    # What kernel/messages.py and kernel/signing.py always set is required; actors and the trace are not.
    from alpes.kernel.signing import SIGNATURE_PROPERTY, SIGNED_PROPERTIES
    assert set(envelope["required"]) == {*SIGNED_PROPERTIES, SIGNATURE_PROPERTY}
    assert "W3C" in envelope["properties"]["traceparent"]["description"]


def test_operations_are_who_sends_and_who_receives_what():
    operations = DOC["operations"]
    sends = {(op["x-service"], op["channel"]["$ref"].split("/")[-1]) for op in operations.values()
             if op["action"] == "send"}
    assert sends == {(s, t) for s, topics in contract.PUBLISHES.items() for t in topics}
    receives = {(op["x-service"], op["channel"]["$ref"].split("/")[-1], op["x-subscription"])
                for op in operations.values() if op["action"] == "receive"}
    assert receives == {(s.service, s.topic, s.name) for s in contract.SUBSCRIPTIONS}
    for op in operations.values():
        channel = op["channel"]["$ref"]
        for ref in op["messages"]:
            assert ref["$ref"].startswith(channel + "/messages/")
            _resolve(ref["$ref"])
    # conversiones sends SagaAtascada on sistema.eventos, afiliados does not; each sends the newest version.
    conversiones = [m["$ref"].split("/")[-1] for m in operations["conversiones.send.sistema.eventos"]["messages"]]
    afiliados = [m["$ref"].split("/")[-1] for m in operations["afiliados.send.sistema.eventos"]["messages"]]
    assert "SagaAtascada.v1" in conversiones and "SagaAtascada.v1" not in afiliados
    marketing = [m["$ref"].split("/")[-1] for m in operations["marketing.send.marketing.eventos"]["messages"]]
    assert "CampanaCreada.v5" in marketing and "CampanaCreada.v4" not in marketing


def test_rendering_is_deterministic_and_the_committed_file_is_in_step():
    text = asyncapi.render()
    assert text == asyncapi.render() and text.endswith("}\n")
    assert list(json.loads(text)) == sorted(json.loads(text))
    assert COMMITTED.read_text(encoding="utf-8") == text, "run `alpes asyncapi` and commit docs/asyncapi.json"


def test_cli_check_fails_and_shows_what_differs(tmp_path):
    stale = tmp_path / "asyncapi.json"
    result = CliRunner().invoke(app, ["asyncapi", "--check", "--output", str(stale)])
    assert result.exit_code == 1 and "missing" in result.output
    assert CliRunner().invoke(app, ["asyncapi", "--output", str(stale)]).exit_code == 0
    assert CliRunner().invoke(app, ["asyncapi", "--check", "--output", str(stale)]).exit_code == 0
    document = json.loads(stale.read_text())
    document["channels"]["afiliados.eventos"]["x-partitions"] = 5
    stale.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
    result = CliRunner().invoke(app, ["asyncapi", "--check", "--output", str(stale)])
    assert result.exit_code == 1
    assert '-      "x-partitions": 5' in result.output and '+      "x-partitions": 4' in result.output
    assert "run `alpes asyncapi`" in result.output


def test_not_built_at_import_time():
    code = "import alpes.auditoria.service, alpes.asyncapi as a; print(a.served.cache_info().currsize)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "0"


@pytest.mark.parametrize("service", sorted(contract.SERVICES))
def test_each_service_serves_it_beside_openapi(service, tmp_path):
    asyncapi.served.cache_clear()
    settings = Settings(data_dir=tmp_path, broker_url="pulsar://127.0.0.1:1")
    fastapi_app, _runtime = import_module(f"alpes.{service}.service").build(settings)
    assert asyncapi.served.cache_info().currsize == 0  # nothing built until someone asks
    client = TestClient(fastapi_app)  # no `with`: no lifespan, no broker
    response = client.get("/asyncapi.json")  # anonymous: public, like /openapi.json
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    assert response.content == COMMITTED.read_bytes()
    operation = client.get("/openapi.json").json()["paths"]["/asyncapi.json"]["get"]
    assert operation["security"] == []
