"""The platform's AsyncAPI 3.0 document, generated from the messaging contract (contract.py) and
the Avro schemas (schemas/<Event>.v<N>.avsc), so that it cannot drift from what runs.

Six channels (the topics, with their partition counts), every message (each version of each
event, `ConversionDetected.v2`) with its Avro payload and the message properties as headers, and
the operations: what each service sends (the newest version of each event it publishes) and what
each subscription receives (every message of its topic). `alpes asyncapi` writes it to
docs/asyncapi.json, `alpes asyncapi --check` fails when the committed file differs, and every
service serves it at GET /asyncapi.json (built on the first request).
"""

from __future__ import annotations

import difflib
import json
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

from . import contract
from .kernel.codec import raw_schemas

DOCUMENT_PATH = Path("docs/asyncapi.json")
AVRO = "application/vnd.apache.avro+json;version=1.9.0"
PULSAR_BINDING = "0.1.0"
# The defaults of settings.py (ALPES_PULSAR_TENANT, ALPES_PULSAR_NAMESPACE, ALPES_BROKER_PORT).
TENANT, NAMESPACE, BROKER = "public", "default", "127.0.0.1:6650"

# The message properties every event carries (kernel/messages.py properties_of, kernel/signing.py).
# Pulsar properties are strings.
PROPERTIES: dict[str, dict[str, Any]] = {
    "event_id": {"format": "uuid", "description": "The event's unique id; consumers drop a second delivery "
                                                  "of the same id (their inbox)."},
    "event_type": {"description": "The event's name (the Avro record's name): which schema reads the payload."},
    "schema_version": {"pattern": "^[1-9][0-9]*$",
                       "description": "The version of the schema the payload was written with (decimal text); "
                                      "the consumer resolves it into its own version."},
    "occurred_at": {"format": "date-time", "description": "When the fact happened, ISO 8601 in UTC."},
    "correlation_id": {"description": "The business flow the event belongs to: the id of the event (or "
                                      "request) that started it, kept by every event it causes."},
    "causation_id": {"description": "The id of the message that caused this event (its own id when none did)."},
    "producer": {"description": "The producer's name: `<service instance>-<role>`."},
    "actor_id": {"description": "Who caused it: the API key's principal behind the request, or `system`. "
                                "Absent on messages published before actors were recorded (read as `system`)."},
    "actor_role": {"enum": ["operator", "advertiser", "affiliate", "system"],
                   "description": "The actor's role; absent like actor_id."},
    "signature": {"pattern": "^v1=[0-9a-f]{64}$",
                  "description": "`v1=<hex HMAC-SHA256>` over the topic, the partition key, the properties "
                                 "event_id..producer (and actor_id/actor_role/traceparent when present) and the payload, "
                                 "with the platform's ALPES_EVENT_SIGNING_KEYS. Consumers dead-letter a message "
                                 "whose signature is missing or wrong (kernel/signing.py)."},
    "traceparent": {"pattern": "^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$",
                    "description": "W3C Trace Context (https://www.w3.org/TR/trace-context/): the trace the "
                                   "event belongs to and the span that emitted it: from the HTTP request that "
                                   "started it, carried through every consumer into the events it emits, whether "
                                   "or not spans are exported (kernel/tracing.py). Optional: absent on events of "
                                   "periodic jobs and lifecycle notices (their consumers continue the trace whose "
                                   "id is the correlation id) and on messages published before it existed. Signed "
                                   "when present."},
}
# The message key (Pulsar partition key) of each topic's events; order is kept per key.
KEYS = {"sistema.eventos": "the service (its lifecycle and dead-letter notices) or the saga (SagaAtascada)"}
REQUIRED = ["event_id", "event_type", "schema_version", "occurred_at", "correlation_id", "causation_id",
            "producer", "signature"]


def _message_id(event: str, version: int) -> str:
    return f"{event}.v{version}"


def _envelope() -> dict[str, Any]:
    return {"type": "object", "title": "Event properties", "required": REQUIRED,
            "description": "Pulsar message properties of every event (kernel/messages.py properties_of). "
                           "The message key is the partition key: the aggregate id (see each channel).",
            "properties": {name: {"type": "string", **spec} for name, spec in PROPERTIES.items()},
            "additionalProperties": {"type": "string"}}


def _message(event: str, version: int, schema: dict[str, Any], newest: int) -> dict[str, Any]:
    message = {
        "name": _message_id(event, version),
        "title": f"{event} v{version}",
        "summary": f"{event}, schema version {version}" + (" (the newest: what producers write)"
                                                          if version == newest else ""),
        "contentType": "avro/binary",
        "headers": {"allOf": [{"$ref": "#/components/schemas/EventProperties"},
                              {"type": "object", "properties": {"event_type": {"const": event},
                                                                "schema_version": {"const": str(version)}}}]},
        "payload": {"schemaFormat": AVRO, "schema": schema},
        "correlationId": {"$ref": "#/components/correlationIds/correlation"},
        "x-schema-file": f"src/alpes/schemas/{event}.v{version}.avsc",
    }
    if schema.get("doc"):
        message["description"] = schema["doc"]
    return message


def _events_on(topic: str) -> list[str]:
    return sorted(e for e, t in contract.EVENT_TOPICS.items() if t == topic)


def _channel(topic: str, partitions: int, schemas: dict[str, dict[int, Any]]) -> dict[str, Any]:
    publishers = sorted({s for e in _events_on(topic) for s in contract.publishers_of(e)})
    subscriptions = [f"{s.name} ({s.service})" for s in contract.SUBSCRIPTIONS if s.topic == topic]
    return {
        "address": topic,
        "title": topic,
        "description": (f"Pulsar topic `persistent://{TENANT}/{NAMESPACE}/{topic}` ({TENANT}/{NAMESPACE}: the "
                        f"defaults of ALPES_PULSAR_TENANT/ALPES_PULSAR_NAMESPACE), {partitions} partitions, "
                        f"keyed by {KEYS.get(topic, 'the aggregate id')} (order is kept per key). Published by "
                        f"{', '.join(publishers)}; subscriptions: {', '.join(subscriptions)}."),
        "messages": {_message_id(e, v): {"$ref": f"#/components/messages/{_message_id(e, v)}"}
                     for e in _events_on(topic) for v in sorted(schemas[e])},
        "bindings": {"pulsar": {"namespace": NAMESPACE, "persistence": "persistent",
                                "retention": {"time": contract.NAMESPACE_RETENTION["retentionTimeInMinutes"],
                                              "size": contract.NAMESPACE_RETENTION["retentionSizeInMB"]},
                                "bindingVersion": PULSAR_BINDING}},
        # The Pulsar channel binding has no field for partitions.
        "x-partitions": partitions,
    }


def _send(service: str, topic: str, schemas: dict[str, dict[int, Any]]) -> dict[str, Any]:
    events = [e for e in _events_on(topic) if service in contract.publishers_of(e)]
    return {
        "action": "send",
        "title": f"{service} publishes on {topic}",
        "summary": "Through the service's transactional outbox, encoded with the newest version of each event.",
        "channel": {"$ref": f"#/channels/{topic}"},
        "messages": [{"$ref": f"#/channels/{topic}/messages/{_message_id(e, max(schemas[e]))}"} for e in events],
        "tags": [{"name": service}],
        "x-service": service,
    }


def _receive(subscription: contract.Subscription, schemas: dict[str, dict[int, Any]]) -> dict[str, Any]:
    topic = subscription.topic
    return {
        "action": "receive",
        "title": f"{subscription.service}: {subscription.name} on {topic}",
        "summary": subscription.purpose,
        "description": (f"Pulsar subscription `{subscription.name}` of {subscription.service}: every message of "
                        f"the topic, any schema version (resolved into the consumer's). A message it cannot "
                        f"process goes to `{contract.dead_letter_topic(topic, subscription.name)}`."),
        "channel": {"$ref": f"#/channels/{topic}"},
        "messages": [{"$ref": f"#/channels/{topic}/messages/{_message_id(e, v)}"}
                     for e in _events_on(topic) for v in sorted(schemas[e])],
        "tags": [{"name": subscription.service}],
        "x-service": subscription.service,
        "x-subscription": subscription.name,
        "x-dead-letter-topic": contract.dead_letter_topic(topic, subscription.name),
    }


def _version() -> str:
    try:
        return metadata.version("alpespartner")
    except metadata.PackageNotFoundError:
        return "0.0.0"


def build(schema_directory: Path | None = None) -> dict[str, Any]:
    """The AsyncAPI 3.0.0 document, as a JSON-able dict."""
    schemas = raw_schemas(schema_directory)
    missing = sorted(set(schemas) ^ set(contract.EVENT_TOPICS))
    if missing:
        raise ValueError(f"events without a topic in contract.EVENT_TOPICS, or without a schema: {missing}")
    operations: dict[str, Any] = {}
    for service, topics in contract.PUBLISHES.items():
        for topic in topics:
            operations[f"{service}.send.{topic}"] = _send(service, topic, schemas)
    for s in contract.SUBSCRIPTIONS:
        operations[f"{s.service}.receive.{s.topic}.{s.name}"] = _receive(s, schemas)
    return {
        "asyncapi": "3.0.0",
        "id": "urn:alpespartner:events",
        "info": {
            "title": "AlpesPartner events",
            "version": _version(),
            "description": ("The events the four AlpesPartner services (afiliados, conversiones, marketing, "
                            "auditoria) exchange over Apache Pulsar, Avro-encoded. Generated by `alpes asyncapi` "
                            "from src/alpes/contract.py and src/alpes/schemas: do not edit by hand."),
            "license": {"name": "Apache-2.0", "url": "https://www.apache.org/licenses/LICENSE-2.0"},
            "tags": [{"name": service, "description": f"the {service} service"} for service in contract.SERVICES],
        },
        "defaultContentType": "avro/binary",
        "servers": {
            "local": {"host": BROKER, "protocol": "pulsar",
                      "description": "`alpes up`: the embedded Pulsar-protocol broker, or the cluster ALPES_BROKER_URL "
                                     "names (also a real Apache Pulsar: `alpes up --broker pulsar`).",
                      "bindings": {"pulsar": {"tenant": TENANT, "bindingVersion": PULSAR_BINDING}}},
        },
        "channels": {topic: _channel(topic, partitions, schemas) for topic, partitions in contract.TOPICS.items()},
        "operations": operations,
        "components": {
            "messages": {_message_id(e, v): _message(e, v, schema, max(versions))
                         for e, versions in schemas.items() for v, schema in versions.items()},
            "schemas": {"EventProperties": _envelope()},
            "correlationIds": {"correlation": {
                "description": "The business flow: every event a request causes carries its correlation id.",
                "location": "$message.header#/correlation_id"}},
        },
    }


def render(schema_directory: Path | None = None) -> str:
    """The document as committed: JSON with sorted keys, two-space indent, a final newline."""
    return json.dumps(build(schema_directory), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


@lru_cache(maxsize=1)
def served() -> bytes:
    """What GET /asyncapi.json answers: rendered once per process, on the first request."""
    return render().encode("utf-8")


def write(path: Path = DOCUMENT_PATH) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(), encoding="utf-8")
    return path


def check(path: Path = DOCUMENT_PATH) -> list[str]:
    """How the committed document differs from the generated one: a unified diff (at most 200
    lines), or empty when they are the same."""
    if not path.is_file():
        return [f"{path}: missing"]
    committed, generated = path.read_text(encoding="utf-8"), render()
    if committed == generated:
        return []
    diff = list(difflib.unified_diff(committed.splitlines(), generated.splitlines(), lineterm="",
                                     fromfile=f"{path} (committed)", tofile="generated (alpes asyncapi)", n=2))
    return diff[:200] + ([f"... {len(diff) - 200} more diff lines"] if len(diff) > 200 else [])
