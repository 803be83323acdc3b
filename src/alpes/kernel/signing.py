"""Message signatures: only the platform's own services can put an event on its topics.

Whoever reaches the broker could otherwise publish a well-formed `ConversionValidated` for a
conversion that never existed, and marketing would book, audit and pay its commission. Every
message the platform publishes carries an HMAC-SHA256 over its topic, partition key, envelope
properties and payload, with a secret only the services hold; a consumer refuses a message
whose signature is missing or wrong as it refuses one it cannot decode (dead letter and an
alert), before any handler sees it. On Apache Pulsar, broker authorization (a role per service)
keeps outsiders off the topics too; the signature holds on any broker, the embedded one included.

Rotation: the first key signs, every key verifies, so a new key is rolled out by listing it
second everywhere, then first, then dropping the old one.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections.abc import Mapping, Sequence
from pathlib import Path

from .messages import UndecodableMessage

SIGNATURE_PROPERTY = "signature"
# The envelope properties a signature covers; anything else a broker adds is not ours to trust.
SIGNED_PROPERTIES = ("event_id", "event_type", "schema_version", "occurred_at", "correlation_id",
                     "causation_id", "producer")
# Signed when present (messages published before actors existed have none; events emitted outside
# any request or consumer span have no traceparent): none can be added, removed or changed without
# breaking the signature.
OPTIONAL_SIGNED_PROPERTIES = ("actor_id", "actor_role", "traceparent")
MIN_KEY_BYTES = 32


class ForgedMessage(UndecodableMessage):
    """The message's signature is missing or does not match: not published by the platform."""


class EventSigner:
    def __init__(self, keys: Sequence[bytes]) -> None:
        if not keys:
            raise ValueError("at least one signing key is needed")
        for key in keys:
            if len(key) < MIN_KEY_BYTES:
                raise ValueError(f"a signing key must have at least {MIN_KEY_BYTES} bytes")
        self._keys = tuple(keys)

    def sign(self, topic: str, key: str, properties: Mapping[str, str], payload: bytes) -> str:
        return "v1=" + self._mac(self._keys[0], topic, key, properties, payload)

    def verify(self, topic: str, key: str, properties: Mapping[str, str], payload: bytes) -> None:
        """Raises ForgedMessage unless one of the keys signed exactly this message."""
        signature = properties.get(SIGNATURE_PROPERTY, "")
        if not signature.startswith("v1="):
            raise ForgedMessage("unsigned message: no v1 signature property")
        given = signature[3:]
        if not any(hmac.compare_digest(given, self._mac(k, topic, key, properties, payload)) for k in self._keys):
            raise ForgedMessage("bad signature: the message was not published by this platform, or was altered")

    @staticmethod
    def _mac(secret: bytes, topic: str, key: str, properties: Mapping[str, str], payload: bytes) -> str:
        mac = hmac.new(secret, digestmod=hashlib.sha256)
        # Length-prefixed fields: no two different messages share one byte string.
        for part in (topic, key, *(properties.get(name, "") for name in SIGNED_PROPERTIES)):
            encoded = part.encode("utf-8")
            mac.update(len(encoded).to_bytes(4, "big") + encoded)
        for name in OPTIONAL_SIGNED_PROPERTIES:
            if name in properties:
                encoded = f"{name}={properties[name]}".encode("utf-8")
                mac.update(len(encoded).to_bytes(4, "big") + encoded)
        mac.update(len(payload).to_bytes(8, "big") + payload)
        return mac.hexdigest()


def parse_keys(value: str) -> list[bytes]:
    """ALPES_EVENT_SIGNING_KEYS: comma-separated secrets (hex, at least 64 digits); the first signs."""
    keys = []
    for item in (part.strip() for part in value.split(",")):
        if not item:
            continue
        try:
            keys.append(bytes.fromhex(item))
        except ValueError:
            raise ValueError("each signing key must be hex (e.g. `openssl rand -hex 32`)") from None
    return keys


def local_key(path: Path) -> bytes:
    """The key of one local platform (`alpes up`), created at first use; concurrent starters of
    the services agree on one key (the file appears whole or not at all, and only once)."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        draft = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_hex(32))
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(draft, path)  # fails if another process got there first: its key wins
        except FileExistsError:
            pass
        finally:
            draft.unlink()
    return bytes.fromhex(path.read_text().strip())
