"""Avro contract: every schema version of every event reads every other, both ways."""

from __future__ import annotations

import itertools
from datetime import datetime, timezone
from decimal import Decimal

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from alpes.contract import SUBSCRIPTIONS, TOPICS
from alpes.kernel.codec import SchemaRegistry, UnknownEvent
from alpes.kernel.inbox import InboxProcessor
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


# -- properties over every schema --------------------------------------------------------------
def _strategy(schema, named: dict):
    """A Hypothesis strategy of payloads valid for any Avro (sub)schema of ours, edge values included."""
    if isinstance(schema, list):  # union
        return st.one_of([_strategy(branch, named) for branch in schema])
    if isinstance(schema, str):
        if schema in named:
            return named[schema]
        return {
            "null": st.none(), "boolean": st.booleans(),
            "int": st.integers(-2**31, 2**31 - 1), "long": st.integers(-2**63, 2**63 - 1),
            # Any text Avro can carry (UTF-8: no lone surrogates), control characters and all.
            "string": st.text(st.characters(exclude_categories=("Cs",)), max_size=30),
            "bytes": st.binary(max_size=30),
        }[schema]
    logical = schema.get("logicalType")
    if logical == "decimal":
        scale, precision = schema["scale"], schema["precision"]
        bound = Decimal(10) ** (precision - scale) - Decimal(1).scaleb(-scale)
        return st.decimals(min_value=-bound, max_value=bound, places=scale, allow_nan=False, allow_infinity=False)
    if logical == "timestamp-micros":
        return st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=st.just(timezone.utc))
    kind = schema["type"]
    if kind == "record":
        strategy = st.fixed_dictionaries({f["name"]: _strategy(f["type"], named) for f in schema["fields"]})
        named[schema["name"]] = strategy
        return strategy
    if kind == "array":
        return st.lists(_strategy(schema["items"], named), max_size=4)
    return _strategy(kind, named)


_EVERY_SCHEMA = [(event_type, version) for event_type in sorted(REGISTRY.schemas)
                 for version in REGISTRY.versions(event_type)]


def _payloads(event_type: str, version: int):
    return _strategy(REGISTRY.schema(event_type, version), {})


@pytest.mark.parametrize("event_type, version", _EVERY_SCHEMA)
@settings(max_examples=20, deadline=None)
@given(data=st.data())
def test_random_payloads_of_every_schema_round_trip(event_type, version, data):
    payload = data.draw(_payloads(event_type, version))
    encoded, used = REGISTRY.encode(event_type, payload, version)
    assert used == version
    assert REGISTRY.decode(event_type, encoded, version, version) == payload
    # Read by every other version: shared fields equal, the rest the reader's defaults.
    for reader in REGISTRY.versions(event_type):
        decoded = REGISTRY.decode(event_type, encoded, version, reader)
        for field in REGISTRY.schema(event_type, reader)["fields"]:
            expected = payload[field["name"]] if field["name"] in payload else field["default"]
            assert decoded[field["name"]] == expected, (event_type, version, reader, field["name"])


@pytest.mark.parametrize("event_type, version", _EVERY_SCHEMA)
@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_padded_payloads_are_refused_not_misread(event_type, version, data):
    encoded, _ = REGISTRY.encode(event_type, data.draw(_payloads(event_type, version)), version)
    extra = data.draw(st.binary(min_size=1, max_size=8))
    with pytest.raises(Exception):  # noqa: B017 - fastavro raises many types; the consumer maps all of them
        REGISTRY.decode(event_type, encoded + extra, version)


# -- random bytes never crash a consumer ---------------------------------------------------------
class _Message:
    def __init__(self, n: int, properties: dict, key: str, data: bytes) -> None:
        self.n, self._properties, self._key, self._data = n, properties, key, data

    def properties(self):
        return dict(self._properties)

    def partition_key(self):
        return self._key

    def data(self):
        return self._data

    def message_id(self):
        return f"m{self.n}"


class _Consumer:
    def __init__(self) -> None:
        self.acked: list[int] = []

    def acknowledge(self, message) -> None:
        self.acked.append(message.n)


class _Broker:
    """Stands in for the dead-letter topic: keeps what the worker parks there."""

    def __init__(self) -> None:
        self.dead: list[tuple[int, str]] = []

    def dead_letter(self, topic, subscription, message, error) -> None:
        self.dead.append((message.n, error))


@pytest.fixture(scope="module")
def consuming_services(tmp_path_factory):
    """Every service's runtime on its own SQLite database, with its real consumers' handlers."""
    from importlib import import_module

    from alpes.settings import Settings

    settings_ = Settings(data_dir=tmp_path_factory.mktemp("consumers"), broker_url="pulsar://127.0.0.1:1")
    runtimes = [import_module(f"alpes.{name}.service").build(settings_)[1]
                for name in ("afiliados", "conversiones", "marketing", "auditoria")]
    yield [(runtime, spec) for runtime in runtimes for spec in runtime.consumer_specs]
    for runtime in runtimes:
        runtime.db.dispose()


def _message_strategy(handled: list[str]):
    """Messages as a broker could hand them over: envelope and payload each valid, broken or missing."""
    known = [(name, str(v)) for name in handled if name in REGISTRY.schemas for v in REGISTRY.versions(name)]
    well_formed = st.sampled_from(known).flatmap(lambda pair: st.fixed_dictionaries({
        "event_type": st.just(pair[0]), "schema_version": st.just(pair[1]), "event_id": st.uuids().map(str),
        "occurred_at": st.just("2026-01-01T00:00:00+00:00")}))
    broken = st.fixed_dictionaries(
        {"event_type": st.sampled_from(handled + ["Nope", ""]),
         "schema_version": st.sampled_from(["1", "2", "3", "0", "x", "", "99999999999999999999"])},
        optional={"event_id": st.uuids().map(str) | st.text(max_size=40),
                  "occurred_at": st.just("2026-01-01T00:00:00+00:00") | st.text(max_size=30),
                  "correlation_id": st.text(max_size=10)})
    envelope = (well_formed | broken) if known else broken

    def payload_for(properties):
        name, raw_version = properties["event_type"], properties["schema_version"]
        schema_valid = st.nothing()
        if name in REGISTRY.schemas and raw_version.isdigit() and int(raw_version) in REGISTRY.versions(name):
            # Well-formed Avro of the right schema, with random (even absurd) field values.
            schema_valid = _payloads(name, int(raw_version)).map(
                lambda p: REGISTRY.encode(name, p, int(raw_version))[0])
        return st.tuples(st.just(properties), st.binary(max_size=120) | schema_valid, st.text(max_size=12))

    return envelope.flatmap(payload_for)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_random_messages_never_crash_a_consumer(consuming_services, data):
    """Whatever arrives, every consumer of every service ends each message exactly once: handled and
    acknowledged, or parked in the dead-letter topic with a MensajeEnviadoADeadLetter notice. An
    undecodable one is parked at once. Nothing raises out of the worker."""
    import threading

    from sqlalchemy import func, select

    from alpes.kernel.consumer import ConsumerWorker

    runtime, spec = data.draw(st.sampled_from(consuming_services))
    handled = sorted(spec.handlers)
    drawn = data.draw(st.lists(_message_strategy(handled), min_size=1, max_size=8))
    messages = [_Message(n, props, key, payload) for n, (props, payload, key) in enumerate(drawn)]
    broker, consumer = _Broker(), _Consumer()
    processor = InboxProcessor(runtime.db, runtime.inbox_table, runtime.outbox, spec.subscription, spec.handlers)
    worker = ConsumerWorker(broker, REGISTRY, spec.topic, spec.subscription, processor.process,
                            consumer_name="property", max_redeliveries=1, retry_delay_seconds=0,
                            max_retry_delay_seconds=0, on_dead_letter=runtime._dead_letter_notice(spec))
    worker._consumer = consumer
    watchdog = threading.Timer(30, worker._stop.set)  # a hang fails the test below instead of blocking CI
    watchdog.start()
    outbox = runtime.outbox.table
    notices = select(func.count()).select_from(outbox).where(outbox.c.event_type == "MensajeEnviadoADeadLetter")
    with runtime.db.read() as session:
        notices_before = session.scalar(notices)
    try:
        worker._handle(messages)
        for _ in range(10):
            if not worker._held:
                break
            worker._retry_due()
    finally:
        watchdog.cancel()
    assert not worker._stop.is_set(), "the worker hung"
    assert not worker._held, "messages left waiting after their retries"
    dead = [n for n, _ in broker.dead]
    assert sorted(consumer.acked) == list(range(len(messages))), "each message acknowledged exactly once"
    assert not set(dead) - set(consumer.acked)
    assert len(dead) == len(set(dead)) == worker.state.dead_lettered
    for message in messages:
        try:
            decode_message(REGISTRY, spec.topic, spec.subscription, message.properties(), message.partition_key(),
                           message.data())
        except UndecodableMessage:
            assert message.n in dead, "an undecodable message must go to the dead-letter topic"
    with runtime.db.read() as session:
        assert session.scalar(notices) - notices_before == len(dead)
    event(f"handled {processor.totals.processed}, dead-lettered {len(dead)} of {len(messages)}")
