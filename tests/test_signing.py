"""Message signatures: a well-formed event the platform did not publish is refused everywhere."""

from __future__ import annotations

import multiprocessing
import os
import stat
import uuid
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path

import pytest
from harness import Platform, wait_until

from alpes.kernel.codec import SchemaRegistry
from alpes.kernel.messages import decode_message, properties_of
from alpes.kernel.signing import SIGNATURE_PROPERTY, EventSigner, ForgedMessage, local_key, parse_keys

REGISTRY = SchemaRegistry.from_directory()
KEY_A, KEY_B = bytes(range(32)), bytes(range(1, 33))
NOW = datetime(2026, 12, 4, 12, 0, tzinfo=timezone.utc)


def _validated_payload(conversion_id: str, affiliate: str, campaign: str, value: str = "250.00") -> dict:
    return {"conversion_id": conversion_id, "affiliate_id": affiliate, "campaign_id": campaign,
            "conversion_value": Decimal(value), "currency": "EUR", "conversion_type": "sale",
            "timestamp": datetime.now(timezone.utc), "click_id": None, "converted_at": datetime.now(timezone.utc)}


def _message(signer: EventSigner | None, topic: str = "conversiones.eventos", key: str = "conv-1"):
    data, version = REGISTRY.encode("ConversionValidated", _validated_payload(key, "af-1", "camp-1"))
    properties = properties_of(str(uuid.uuid4()), "ConversionValidated", version, NOW, "c", "c", "conversiones-1")
    if signer is not None:
        properties[SIGNATURE_PROPERTY] = signer.sign(topic, key, properties, data)
    return topic, key, properties, data


def test_a_signed_message_decodes_and_every_alteration_is_refused():
    signer = EventSigner([KEY_A])
    topic, key, properties, data = _message(signer)
    event = decode_message(REGISTRY, topic, "marketing-consumer", properties, key, data, signer)
    assert event.payload["conversion_id"] == "conv-1"

    altered = {
        "payload": (topic, key, properties, data[:-1] + bytes([data[-1] ^ 1])),
        "event type": (topic, key, {**properties, "event_type": "ConversionDetected"}, data),
        "correlation": (topic, key, {**properties, "correlation_id": "other"}, data),
        "topic": ("afiliados.eventos", key, properties, data),
        "partition key": (topic, "conv-2", properties, data),
        "unsigned": (topic, key, {k: v for k, v in properties.items() if k != SIGNATURE_PROPERTY}, data),
        "garbage signature": (topic, key, {**properties, SIGNATURE_PROPERTY: "v1=" + "0" * 64}, data),
    }
    for what, (t, k, p, d) in altered.items():
        with pytest.raises(ForgedMessage):
            decode_message(REGISTRY, t, "marketing-consumer", p, k, d, signer)
        assert what


def test_a_message_signed_with_another_key_is_refused_and_rotation_keeps_old_ones_readable():
    topic, key, properties, data = _message(EventSigner([KEY_B]))
    with pytest.raises(ForgedMessage):
        EventSigner([KEY_A]).verify(topic, key, properties, data)
    EventSigner([KEY_A, KEY_B]).verify(topic, key, properties, data)  # B listed second: still verifies
    # The first key is the one that signs.
    rotated = _message(EventSigner([KEY_A, KEY_B]))
    EventSigner([KEY_A]).verify(*rotated)
    with pytest.raises(ForgedMessage):
        EventSigner([KEY_B]).verify(*rotated)


def test_keys_are_long_hex_secrets():
    with pytest.raises(ValueError, match="at least 32 bytes"):
        EventSigner([b"short"])
    with pytest.raises(ValueError, match="hex"):
        parse_keys("not-hex-at-all")
    assert parse_keys(f"{KEY_A.hex()}, {KEY_B.hex()}") == [KEY_A, KEY_B]


def _read_local_key(path: str, queue) -> None:
    queue.put(local_key(Path(path)).hex())


def test_concurrent_starters_agree_on_one_private_local_key(tmp_path: Path):
    path = tmp_path / "keys" / "event-signing.key"
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    workers = [context.Process(target=_read_local_key, args=(str(path), queue)) for _ in range(6)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    keys = {queue.get(timeout=5) for _ in workers}
    assert len(keys) == 1 and len(bytes.fromhex(keys.pop())) == 32
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["event-signing.key"]  # no drafts left


def test_a_forged_conversion_validated_books_no_commission(tmp_path: Path):
    """An outsider on the broker publishes a well-formed ConversionValidated for a conversion that
    never existed, for a real campaign and affiliate: unsigned, and signed with a key of its own.
    Marketing books nothing and dead-letters both; the same message signed with the platform's
    key (the control) is booked, so the refusal is the signature's doing."""
    import pulsar

    platform = Platform(tmp_path / "alpes").start()
    try:
        affiliate = platform.post("afiliados", "/afiliados", {"user_id": "u-1", "email": "ana@example.com",
                                                              "nombre": "Ana"}).json()["id"]
        campaign = platform.post("marketing", "/campanas", {"nombre": "Forgery", "porcentaje_comision": "10"}).json()["id"]
        # A real postback validated and booked: marketing knows this affiliate and campaign.
        real = {"affiliate_id": affiliate, "campaign_id": campaign, "user_id": "cust-1", "conversion_value": "10.00",
                "conversion_type": "sale"}

        def booked_postback():
            answer = platform.post("conversiones", "/conversiones", {**real, "order_id": f"o-{uuid.uuid4().hex[:8]}"})
            conversion_id = answer.json()["id"]
            status = wait_until(lambda: (s := platform.get("conversiones", f"/conversiones/{conversion_id}")["status"])
                                != "detected" and s, 10)
            return status == "validated"
        wait_until(booked_postback, 90, interval=1, what="a real postback validated")

        platform_key = local_key(platform.data_dir / "event-signing.key")
        signers = {"unsigned": None, "own key": EventSigner([os.urandom(32)]),
                   "platform key": EventSigner([platform_key])}
        forged = {name: str(uuid.uuid4()) for name in signers}
        client = pulsar.Client(f"pulsar://127.0.0.1:{platform.broker_port}", operation_timeout_seconds=30,
                               logger=pulsar.ConsoleLogger(pulsar.LoggerLevel.Error))
        try:
            producer = client.create_producer("persistent://public/default/conversiones.eventos")
            event_ids = {}
            for name, signer in signers.items():
                conversion_id = forged[name]
                data, version = REGISTRY.encode("ConversionValidated",
                                                _validated_payload(conversion_id, affiliate, campaign))
                event_ids[name] = event_id = str(uuid.uuid4())
                properties = properties_of(event_id, "ConversionValidated", version, datetime.now(timezone.utc),
                                           event_id, event_id, "outsider")
                if signer is not None:
                    properties[SIGNATURE_PROPERTY] = signer.sign("conversiones.eventos", conversion_id, properties, data)
                producer.send(data, properties=properties, partition_key=conversion_id)
            producer.close()
        finally:
            client.close()

        # The control is booked: the message itself would have paid.
        control = wait_until(lambda: platform.get("marketing", "/comisiones",
                                                  conversion_id=forged["platform key"])["comisiones"],
                             what="the platform-signed control booked", diagnose=platform.diagnostics)
        assert Decimal(control[0]["monto"]) == Decimal("25.00")

        def dead_lettered() -> bool:
            health = platform.get("marketing", "/health")
            return sum(c["dead_lettered"] for c in health["consumers"]
                       if c["topic"] == "conversiones.eventos" and c["subscription"] == "marketing-consumer") >= 2
        wait_until(dead_lettered, what="marketing dead-letters the two forgeries", diagnose=platform.diagnostics)
        for name in ("unsigned", "own key"):
            assert platform.get("marketing", "/comisiones", conversion_id=forged[name])["comisiones"] == [], name
        # Each refusal is an alert on sistema.eventos (every subscriber of the topic raises one).
        def alerted(name: str) -> bool:
            return any(event_ids[name] in a["mensaje"] and "marketing-consumer" in a["mensaje"]
                       and "signature" in a["mensaje"] or event_ids[name] in a["mensaje"] and "unsigned" in a["mensaje"]
                       for a in platform.get("auditoria", "/sistema/alertas", limit=1000)["alertas"])
        for name in ("unsigned", "own key"):
            wait_until(lambda: alerted(name), what=f"the {name} forgery alerted")
    finally:
        platform.stop()
