"""Affiliates' personal data, sealed with a key of each affiliate (crypto-shredding).

What is personal here: the email, the name, the identity document number and the payment method
(today only its kind; the payout account details it will carry go in the same envelope). They are
stored in one sealed value per affiliate and never leave the service in clear: the events carry
them sealed with the same key, or not at all. Deleting the affiliate's key makes every sealed copy
noise at once — the service's rows, its outbox, the broker's retained messages, the audit log's
records, a backup — without editing any of them (the audit chain still verifies).

- Data key: 32 random bytes per affiliate, AES-256-GCM. Kept only in afiliados' `claves` table,
  wrapped (AES-256-GCM) with a master key: ALPES_PII_MASTER_KEYS (hex, comma-separated; the first
  wraps, every one unwraps, each wrapped key names its master key by id, so a master key is rotated
  like the signing keys) or, on one machine, `<data dir>/pii-master.key`. The database alone (or a
  copy of it) opens nothing.
- Sealed value: ``pii1.`` + base64url(nonce[12] | ciphertext | tag[16]). Its associated data names
  the affiliate and the purpose, so a sealed value moved onto another affiliate or field does not open.
- Blind index: HMAC-SHA256 of the normalized email / document number with a key of the service
  (random, kept wrapped in `claves` like a data key, so it survives master key rotation): duplicate
  registrations are found without storing the clear value.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import Table, delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from alpes.kernel.db import Database
from alpes.kernel.messages import utcnow

PREFIX = "pii1."
INDEX_KEY = "*indice-ciego*"  # the row of `claves` holding the blind-index key (never an affiliate id)
MIN_SECRET_BYTES = 32
_NONCE = 12


@dataclass(frozen=True)
class DatosPersonales:
    email: str
    nombre: str
    numero_documento: str | None = None
    metodo_pago: str | None = None


class UnreadableSeal(ValueError):
    """A sealed value that does not open with the key given (another key, another owner, altered)."""


def _aad(owner: str, purpose: str) -> bytes:
    return f"alpes/afiliados/{purpose}/{owner}".encode()


def seal(key: bytes, owner: str, purpose: str, plaintext: str) -> str:
    nonce = os.urandom(_NONCE)
    sealed = AESGCM(key).encrypt(nonce, plaintext.encode("utf-8"), _aad(owner, purpose))
    return PREFIX + base64.urlsafe_b64encode(nonce + sealed).decode("ascii").rstrip("=")


def unseal(key: bytes, owner: str, purpose: str, token: str) -> str:
    if not token.startswith(PREFIX):
        raise UnreadableSeal("not a sealed value")
    body = token[len(PREFIX):]
    try:
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        return AESGCM(key).decrypt(raw[:_NONCE], raw[_NONCE:], _aad(owner, purpose)).decode("utf-8")
    except (InvalidTag, ValueError) as error:
        raise UnreadableSeal(str(error) or "does not open with this key") from None


class MasterKeys:
    """The keys that wrap the data keys: the first wraps, every one unwraps (rotation)."""

    def __init__(self, secrets: Sequence[bytes]) -> None:
        if not secrets:
            raise ValueError("at least one master key is needed")
        if any(len(secret) < MIN_SECRET_BYTES for secret in secrets):
            raise ValueError(f"a master key must have at least {MIN_SECRET_BYTES} bytes")
        # The AES key is derived, so any 32+ byte secret works and its id reveals nothing of it.
        self._keys = [(hashlib.sha256(b"alpes/pii/kek-id\0" + s).hexdigest()[:16],
                       hmac.new(s, b"alpes/pii/kek/v1", hashlib.sha256).digest()) for s in secrets]

    def wrap(self, owner: str, data_key: bytes) -> tuple[str, bytes]:
        kek_id, kek = self._keys[0]
        nonce = os.urandom(_NONCE)
        return kek_id, nonce + AESGCM(kek).encrypt(nonce, data_key, _aad(owner, "clave"))

    def unwrap(self, owner: str, kek_id: str, wrapped: bytes) -> bytes:
        for known_id, kek in self._keys:
            if known_id == kek_id:
                try:
                    return AESGCM(kek).decrypt(wrapped[:_NONCE], wrapped[_NONCE:], _aad(owner, "clave"))
                except InvalidTag:
                    raise UnreadableSeal(f"the data key of {owner} does not unwrap") from None
        raise UnreadableSeal(f"the data key of {owner} was wrapped with master key {kek_id}, not configured here")


class Vault:
    """Data keys of the affiliates (in `claves`, wrapped) and the service's blind-index key."""

    def __init__(self, master: MasterKeys, claves: Table) -> None:
        self.master = master
        self.claves = claves
        self._index_key: bytes | None = None

    # -- the blind index -----------------------------------------------------------------------
    def load_index_key(self, db: Database) -> None:
        """Read the blind-index key, creating it the first time (starters racing agree on one)."""
        for _ in range(2):
            try:
                with db.transaction() as session:
                    key = self._read(session, INDEX_KEY)
                    if key is None:
                        key = os.urandom(32)
                        self._store(session, INDEX_KEY, key)
            except IntegrityError:
                continue  # another instance created it first: read theirs
            self._index_key = key
            return
        raise RuntimeError("could not read nor create the blind-index key")

    def index(self, kind: str, value: str) -> str:
        if self._index_key is None:
            raise RuntimeError("the blind-index key is not loaded (Vault.load_index_key)")
        return hmac.new(self._index_key, f"{kind}\0{value}".encode(), hashlib.sha256).hexdigest()

    # -- data keys ---------------------------------------------------------------------------------
    def create_key(self, session: Session, afiliado_id: str) -> bytes:
        key = AESGCM.generate_key(bit_length=256)
        self._store(session, afiliado_id, key)
        return key

    def key(self, session: Session, afiliado_id: str) -> bytes | None:
        return self._read(session, afiliado_id)

    def keys(self, session: Session, afiliado_ids: Iterable[str]) -> dict[str, bytes]:
        ids = list(dict.fromkeys(afiliado_ids))
        found: dict[str, bytes] = {}
        c = self.claves
        for start in range(0, len(ids), 500):
            for row in session.execute(select(c).where(c.c.id.in_(ids[start:start + 500]))).mappings():
                found[row["id"]] = self.master.unwrap(row["id"], row["kek_id"], row["clave"])
        return found

    def shred(self, session: Session, afiliado_id: str) -> None:
        """Delete the affiliate's data key: whatever was sealed with it can no longer be read."""
        session.execute(delete(self.claves).where(self.claves.c.id == afiliado_id))

    # -- sealing --------------------------------------------------------------------------------
    @staticmethod
    def seal_datos(key: bytes, afiliado_id: str, datos: DatosPersonales) -> str:
        return seal(key, afiliado_id, "datos", json.dumps(asdict(datos), ensure_ascii=False, sort_keys=True))

    @staticmethod
    def open_datos(key: bytes, afiliado_id: str, token: str) -> DatosPersonales:
        return DatosPersonales(**json.loads(unseal(key, afiliado_id, "datos", token)))

    @staticmethod
    def seal_event_field(key: bytes, afiliado_id: str, field: str, value: str) -> str:
        return seal(key, afiliado_id, f"evento/{field}", value)

    def open_event_field(self, session: Session, afiliado_id: str, field: str, token: str) -> str | None:
        """A field of an event, sealed by this service; None once the affiliate's key is shredded."""
        key = self.key(session, afiliado_id)
        return None if key is None else unseal(key, afiliado_id, f"evento/{field}", token)

    def _read(self, session: Session, owner: str) -> bytes | None:
        row = session.execute(select(self.claves).where(self.claves.c.id == owner)).mappings().first()
        return None if row is None else self.master.unwrap(owner, row["kek_id"], row["clave"])

    def _store(self, session: Session, owner: str, key: bytes) -> None:
        kek_id, wrapped = self.master.wrap(owner, key)
        session.execute(self.claves.insert().values(id=owner, kek_id=kek_id, clave=wrapped, creada_en=utcnow()))
