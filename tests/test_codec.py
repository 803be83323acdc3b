"""Avro contract: every schema version of every event reads every other, both ways."""

from __future__ import annotations

import itertools
from datetime import datetime, timezone
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from alpes.contract import SUBSCRIPTIONS, TOPICS
from alpes.kernel.codec import SchemaRegistry, UnknownEvent
from alpes.kernel.messages import UndecodableMessage, decode_message, properties_of

REGISTRY = SchemaRegistry.from_directory()


def _sample(schema, seed: int = 1):
    """A payload for any of our record schemas, built from the schema itself."""
    if isinstance(schema, list):  # union: take the non-null branch
        branch = next(s for s in schema if s != "null")
        return _sample(branch, seed)
    if isinstance(schema, dict):
        logical = schema.get("logicalType")
        if logical == "decimal":
            return Decimal(seed * 1234567).scaleb(-schema["scale"])
        if logical == "timestamp-micros":
            return datetime(2026, 1, 2, 3, 4, 5, 123456, tzinfo=timezone.utc)
        if schema["type"] == "record":
            return {f["name"]: _sample(f["type"], seed) for f in schema["fields"]}
        if schema["type"] == "array":
            return [_sample(schema["items"], seed)]
        return _sample(schema["type"], seed)
    return {"string": f"v{seed}", "long": seed, "int": seed, "boolean": True, "bytes": b"x"}[schema]


def test_every_schema_round_trips_its_own_version():
    for event_type, versions in REGISTRY.schemas.items():
        for version, schema in versions.items():
            payload = _sample(schema)
            data, used = REGISTRY.encode(event_type, payload, version)
            assert used == version
            assert REGISTRY.decode(event_type, data, version, version) == payload, (event_type, version)


@pytest.mark.parametrize("event_type", sorted(REGISTRY.schemas))
def test_every_version_pair_reads_both_ways(event_type):
    versions = REGISTRY.versions(event_type)
    for writer, reader in itertools.product(versions, versions):
        payload = _sample(REGISTRY.schema(event_type, writer))
        data, _ = REGISTRY.encode(event_type, payload, writer)
        decoded = REGISTRY.decode(event_type, data, writer, reader)
        reader_fields = {f["name"]: f for f in REGISTRY.schema(event_type, reader)["fields"]}
        for name, field in reader_fields.items():
            if name in payload:
                assert decoded[name] == payload[name], (event_type, writer, reader, name)
            else:  # a field the writer did not know: the reader's default
                assert decoded[name] == field["default"], (event_type, writer, reader, name)
        assert set(decoded) == set(reader_fields)


def test_conversion_detected_has_a_real_second_version():
    assert REGISTRY.versions("ConversionDetected") == [1, 2]
    v1 = _sample(REGISTRY.schema("ConversionDetected", 1))
    data, _ = REGISTRY.encode("ConversionDetected", v1, 1)
    upcast = REGISTRY.decode("ConversionDetected", data, writer_version=1)
    assert upcast["order_id"] is None and upcast["currency"] == "EUR"
    v2 = {**v1, "order_id": "o-9", "currency": "USD"}
    data, version = REGISTRY.encode("ConversionDetected", v2)
    assert version == 2
    downcast = REGISTRY.decode("ConversionDetected", data, writer_version=2, reader_version=1)
    assert "order_id" not in downcast and downcast["conversion_value"] == v1["conversion_value"]


def test_contract_event_names_and_fields_are_kept():
    for name in ("AfiliadoRegistrado", "AfiliadoValidado", "ConversionDetected", "ConversionValidated",
                 "CampanaCreada", "ComisionCalculada"):
        assert name in REGISTRY.schemas
    fields = lambda e: {f["name"] for f in REGISTRY.schema(e, REGISTRY.latest_version(e))["fields"]}
    assert {"id", "user_id", "email", "nombre", "timestamp"} <= fields("AfiliadoRegistrado")
    assert {"conversion_id", "affiliate_id", "campaign_id", "conversion_value", "timestamp"} <= fields("ConversionDetected")


def test_money_is_exact_decimal_never_float():
    payload = _sample(REGISTRY.schema("ComisionCalculada", 1))
    payload["monto"] = Decimal("0.10") + Decimal("0.20")
    data, version = REGISTRY.encode("ComisionCalculada", payload)
    assert REGISTRY.decode("ComisionCalculada", data, version)["monto"] == Decimal("0.30")
    payload["monto"] = Decimal("1.005")  # more places than the schema's scale: refused, not rounded
    with pytest.raises(Exception):
        REGISTRY.encode("ComisionCalculada", payload)


def test_unknown_event_type_or_version_is_refused():
    with pytest.raises(UnknownEvent):
        REGISTRY.encode("NoSuchEvent", {})
    with pytest.raises(UnknownEvent):
        REGISTRY.decode("ConversionDetected", b"", writer_version=99)


def test_subscriptions_name_only_contract_topics():
    assert set(TOPICS) == {"afiliados.eventos", "conversiones.eventos", "marketing.eventos", "comisiones.eventos",
                           "auditoria.eventos", "sistema.eventos"}
    assert [TOPICS[t] for t in sorted(TOPICS)] == [4, 4, 8, 6, 4, 2]
    for sub in SUBSCRIPTIONS:
        assert sub.topic in TOPICS


_text = st.text(max_size=40)
_money = st.decimals(min_value=0, max_value=Decimal("9999999999999.99"), places=2, allow_nan=False)
_when = st.datetimes(min_value=datetime(1970, 1, 2), max_value=datetime(2200, 1, 1),
                     timezones=st.just(timezone.utc)).map(lambda d: d.replace(microsecond=d.microsecond))


@settings(max_examples=150, deadline=None)
@given(conversion_id=_text, affiliate_id=_text, campaign_id=_text, user_id=_text, value=_money,
       conversion_type=_text, when=_when, order_id=st.none() | _text, currency=_text)
def test_random_conversion_payloads_round_trip(conversion_id, affiliate_id, campaign_id, user_id, value,
                                               conversion_type, when, order_id, currency):
    payload = {"conversion_id": conversion_id, "affiliate_id": affiliate_id, "campaign_id": campaign_id,
               "user_id": user_id, "conversion_value": value, "conversion_type": conversion_type, "timestamp": when,
               "order_id": order_id, "currency": currency}
    data, version = REGISTRY.encode("ConversionDetected", payload)
    assert REGISTRY.decode("ConversionDetected", data, version) == payload


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=200), event_type=st.sampled_from(sorted(REGISTRY.schemas) + ["Nope"]),
       version=st.sampled_from(["1", "2", "x", ""]))
def test_random_bytes_never_crash_decoding(data, event_type, version):
    properties = {"event_id": "e", "event_type": event_type, "schema_version": version,
                  "occurred_at": "2026-01-01T00:00:00+00:00"}
    try:
        event = decode_message(REGISTRY, "t", "s", properties, "k", data)
    except UndecodableMessage:
        return
    assert event.event_type == event_type  # whatever decodes is a well-formed event


def test_properties_carry_the_envelope():
    when = datetime(2026, 5, 6, 7, 8, 9, tzinfo=timezone.utc)
    props = properties_of("e1", "AfiliadoValidado", 1, when, "c1", "k1", "afiliados-1")
    data, _ = REGISTRY.encode("AfiliadoValidado", {"id": "a1", "timestamp": when})
    event = decode_message(REGISTRY, "afiliados.eventos", "sub", props, "a1", data)
    assert (event.event_id, event.event_type, event.schema_version, event.correlation_id, event.causation_id,
            event.key, event.occurred_at) == ("e1", "AfiliadoValidado", 1, "c1", "k1", "a1", when)
    assert event.payload == {"id": "a1", "timestamp": when}
