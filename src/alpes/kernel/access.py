"""API keys and who is calling: the mechanics every service shares.

A key is `alpes_<kind>_<key id>_<secret>`: the kind says the role at a glance (op, adv, aff), the
key id finds the key, the secret (256 random bits) proves it. Only the SHA-256 of the whole key
is kept, anywhere: with that much entropy a fast hash cannot be reversed, and a stolen table
opens nothing. Marketing issues and revokes keys; every service keeps its own copy of the key
table, learnt from `ClaveApiEmitida` / `ClaveApiRevocada` on marketing.eventos, and verifies each
request against it locally, so a revocation reaches every service through the broker within
moments and verification goes on while marketing is down.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import structlog
from sqlalchemy import Column, MetaData, String, Table, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from .db import Database, UtcDateTime
from .messages import IncomingEvent, OutgoingEvent, utcnow

log = structlog.get_logger(__name__)

OPERATOR, ADVERTISER, AFFILIATE, SYSTEM, ANONYMOUS = "operator", "advertiser", "affiliate", "system", "anonymous"
ROLES = (OPERATOR, ADVERTISER, AFFILIATE)
_KIND = {OPERATOR: "op", ADVERTISER: "adv", AFFILIATE: "aff"}
# Resource groups a key may be scoped to, each `<group>:read` or `<group>:write`.
RESOURCE_GROUPS = ("afiliados", "campanas", "conversiones", "comisiones", "pagos", "reportes", "auditoria",
                   "claves", "sistema", "webhooks")
ALL_SCOPES = tuple(f"{group}:{action}" for group in RESOURCE_GROUPS for action in ("read", "write"))
# The digest of a key whose revocation arrived before its issue (no key hashes to it).
_PLACEHOLDER = "revoked-before-issued"
# How often a key's last use is written back (a key used a thousand times a second is one write).
LAST_USED_RESOLUTION = timedelta(seconds=60)


class Unauthenticated(Exception):
    """No valid key: missing, malformed, unknown, expired or revoked (→ 401). `presented`: a
    credential was sent (and is bad), as opposed to none at all."""

    def __init__(self, reason: str, presented: bool = True) -> None:
        super().__init__(reason)
        self.reason = reason
        self.presented = presented


class Forbidden(Exception):
    """A valid key whose role or scopes do not allow the operation (→ 403)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class RateLimited(Exception):
    """Too many requests from this key or address in the current window (→ 429)."""

    def __init__(self, reason: str, retry_after: int) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


@dataclass(frozen=True)
class Rule:
    """Who may call one route (alpes/authorization.py declares one per route). No roles: public.
    `signed`: an advertiser may also authenticate with a signed request (Alpes-Signature) instead
    of a key. `limit`: the rate-limit bucket the route counts against (postbacks, clicks)."""

    roles: frozenset[str]
    scope: str | None = None
    signed: bool = False
    limit: str | None = None

    @property
    def public(self) -> bool:
        return not self.roles


def allow(*roles: str, scope: str, signed: bool = False, limit: str | None = None) -> Rule:
    if not roles or not set(roles) <= set(ROLES) or scope not in ALL_SCOPES:
        raise ValueError(f"bad rule: roles {roles}, scope {scope}")
    return Rule(frozenset(roles), scope, signed, limit)


def public(limit: str | None = None) -> Rule:
    return Rule(frozenset(), None, False, limit)


@dataclass(frozen=True)
class Principal:
    """Who is calling: the key (or `system`/`local-operator`), its role and the tenant it belongs to."""

    id: str
    role: str
    anunciante_id: str | None = None
    afiliado_id: str | None = None
    scopes: frozenset[str] = field(default_factory=lambda: frozenset(ALL_SCOPES))

    def allows(self, scope: str) -> bool:
        return scope in self.scopes

    @property
    def tenant(self) -> str | None:
        return self.anunciante_id or self.afiliado_id


# The caller of a consumer or a scheduled job: the platform itself.
SYSTEM_PRINCIPAL = Principal("system", SYSTEM)
# Protected local mode: anonymous callers on a loopback-only platform that has no key yet.
LOCAL_OPERATOR = Principal("local-operator", OPERATOR)


@dataclass(frozen=True)
class NewKey:
    key: str  # shown once, never stored
    key_id: str
    digest: str


def generate_key(role: str) -> NewKey:
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    key_id = base64.b32encode(secrets.token_bytes(10)).decode().lower().rstrip("=")
    secret = base64.b32encode(secrets.token_bytes(32)).decode().lower().rstrip("=")
    key = f"alpes_{_KIND[role]}_{key_id}_{secret}"
    return NewKey(key, key_id, digest(key))


def digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def key_id_of(key: str) -> str:
    """The key id inside a presented key, or Unauthenticated if the key is not of our shape."""
    parts = key.split("_")
    if len(parts) != 4 or parts[0] != "alpes" or parts[1] not in _KIND.values() or not parts[2].isalnum() \
            or not parts[3].isalnum() or len(key) > 200:
        raise Unauthenticated("malformed API key")
    return parts[2]


def parse_scopes(value: Iterable[str]) -> frozenset[str]:
    scopes = frozenset(value)
    unknown = sorted(scopes - set(ALL_SCOPES))
    if unknown:
        raise ValueError(f"unknown scopes: {', '.join(unknown)}")
    return scopes


def keys_table(metadata: MetaData) -> Table:
    """Each service's copy of the keys (marketing's is the one it issues from)."""
    return Table(
        "claves_api", metadata,
        Column("key_id", String(40), primary_key=True),
        Column("digest", String(64), nullable=False),
        Column("rol", String(16), nullable=False),
        Column("anunciante_id", String(36)),
        Column("afiliado_id", String(36)),
        Column("scopes", String(1000), nullable=False),
        Column("nombre", String(120)),
        Column("expira_en", UtcDateTime()),
        Column("revocada_en", UtcDateTime()),
        Column("creada_en", UtcDateTime(), nullable=False),
        Column("usada_en", UtcDateTime()),
    )


class KeyRing:
    """Verifies presented keys against a service's key table."""

    def __init__(self, table: Table) -> None:
        self.table = table

    def verify(self, session: Session, key: str, now: datetime) -> Principal:
        row = session.execute(select(self.table).where(self.table.c.key_id == key_id_of(key))).mappings().first()
        # Compare the digests in constant time; an unknown id costs the same comparison.
        expected = row["digest"] if row is not None else "0" * 64
        if not hmac.compare_digest(expected, digest(key)) or row is None:
            raise Unauthenticated("unknown API key")
        if row["revocada_en"] is not None:
            raise Unauthenticated("revoked API key")
        if row["expira_en"] is not None and row["expira_en"] <= now:
            raise Unauthenticated("expired API key")
        return Principal(row["key_id"], row["rol"], row["anunciante_id"], row["afiliado_id"],
                         frozenset(filter(None, row["scopes"].split(","))))

    def note_used(self, session: Session, key_id: str, now: datetime) -> None:
        """Write the key's last use unless it was written in the last LAST_USED_RESOLUTION."""
        t = self.table
        session.execute(update(t).where(t.c.key_id == key_id, or_(t.c.usada_en.is_(None),
                                                                   t.c.usada_en <= now - LAST_USED_RESOLUTION))
                        .values(usada_en=now))

    def any_key(self, session: Session) -> bool:
        """Protected local mode ends with the first key known to this service, revoked or not."""
        return bool(session.scalar(select(func.count()).select_from(self.table)))

    # -- learnt from marketing.eventos (every service but marketing) --------------------------
    def handlers(self) -> dict:
        """The key events' handlers, for a consumer of marketing.eventos."""
        return {"ClaveApiEmitida": self.learn_issued, "ClaveApiRevocada": self.learn_revoked}

    def learn_issued(self, session: Session, event: IncomingEvent) -> list[OutgoingEvent]:
        p = event.payload
        values = dict(digest=p["digest"], rol=p["rol"], anunciante_id=p.get("anunciante_id"),
                      afiliado_id=p.get("afiliado_id"), scopes=",".join(sorted(p["scopes"])), nombre=p.get("nombre"),
                      expira_en=p.get("expira_en"), creada_en=p["timestamp"])
        try:
            with session.begin_nested():
                session.execute(insert(self.table).values(key_id=p["key_id"], **values))
        except IntegrityError:
            # Known already: a redelivery (nothing to do), or its revocation came first (fill it in,
            # revoked it stays).
            session.execute(update(self.table).where(self.table.c.key_id == p["key_id"],
                                                     self.table.c.digest == _PLACEHOLDER).values(**values))
        return []

    def learn_revoked(self, session: Session, event: IncomingEvent) -> list[OutgoingEvent]:
        # Revocation may arrive before the issue (different keys order independently): keep a row.
        p = event.payload
        revoked = session.execute(update(self.table).where(self.table.c.key_id == p["key_id"])
                                  .values(revocada_en=p["timestamp"]))
        if revoked.rowcount == 0:
            session.execute(insert(self.table).values(
                key_id=p["key_id"], digest=_PLACEHOLDER, rol="revoked", scopes="", creada_en=p["timestamp"],
                revocada_en=p["timestamp"]))
        return []


_NOTE_EVERY_S = LAST_USED_RESOLUTION.total_seconds()


class Gate:
    """Who is calling, from the Authorization header, checked against this service's keys.

    Verified keys are remembered for `cache_seconds` (a revocation still lands within seconds:
    the bound the README promises is the broker's delivery plus this), so the hot routes do not
    read the key table on every request. In protected local mode an anonymous caller is the
    operator until this service knows of a first key."""

    def __init__(self, db: Database, keyring: KeyRing, *, protected_local: bool,
                 clock: Callable[[], datetime] = utcnow, cache_seconds: float = 1.0) -> None:
        self.db = db
        self.keyring = keyring
        self.protected_local = protected_local
        self.clock = clock
        self.cache_seconds = cache_seconds
        self._verified: dict[str, tuple[float, Principal]] = {}
        self._noted: dict[str, float] = {}  # key id: when this process last wrote its last use
        self._lock = threading.Lock()
        self._keys_exist = False
        self._keys_checked_at = 0.0

    def anonymous_is_operator(self) -> bool:
        if not self.protected_local or self._keys_exist:
            return False
        if time.monotonic() - self._keys_checked_at > self.cache_seconds:
            with self.db.read() as session:
                self._keys_exist = self.keyring.any_key(session)  # once true, true for good
            self._keys_checked_at = time.monotonic()
        return not self._keys_exist

    def authenticate(self, authorization: str | None) -> Principal:
        if authorization is None:
            if self.anonymous_is_operator():
                return LOCAL_OPERATOR
            raise Unauthenticated("an API key is required: Authorization: Bearer <key>", presented=False)
        scheme, _, key = authorization.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Unauthenticated("the Authorization header must be `Bearer <key>`")
        key = key.strip()
        fingerprint = digest(key)
        cached = self._fresh(fingerprint, time.monotonic())
        if cached is not None:
            return cached
        # A read, and remembered from when it ended: a verification that waited seconds for the
        # write turn under load was stale on arrival, so every request verified again (issue 11).
        with self.db.read() as session:
            principal = self.keyring.verify(session, key, self.clock())
        now = time.monotonic()
        with self._lock:
            if len(self._verified) > 10_000:
                self._verified.clear()
                self._noted.clear()
            self._verified[fingerprint] = (now, principal)
            due = now - self._noted.get(principal.id, -_NOTE_EVERY_S) >= _NOTE_EVERY_S
            if due:
                self._noted[principal.id] = now
        if due:  # the last use, written once a minute per key and process: the only write here
            try:
                with self.db.transaction() as session:
                    self.keyring.note_used(session, principal.id, self.clock())
            except Exception as error:  # informational: never why a verified caller is refused
                log.warning("last use of an API key not written", key_id=principal.id, error=str(error)[:200])
                with self._lock:
                    self._noted.pop(principal.id, None)  # written at its next verification
        return principal

    def remembered(self, authorization: str | None) -> Principal | None:
        """Who `authenticate` would say is calling, when it can say so without reading the key
        table (a key verified in the last `cache_seconds`); None when it would have to read or
        refuse (then call `authenticate`)."""
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            return None
        return self._fresh(digest(key.strip()), time.monotonic())

    def _fresh(self, fingerprint: str, now: float) -> Principal | None:
        """The principal of the key with this digest, verified less than `cache_seconds` before `now`."""
        with self._lock:
            cached = self._verified.get(fingerprint)
        if cached is None or now - cached[0] >= self.cache_seconds:
            return None
        return cached[1]

    def knows(self, authorization: str) -> bool:
        try:
            return self.authenticate(authorization).role != ANONYMOUS
        except Unauthenticated:
            return False

    @staticmethod
    def authorize(rule: Rule, principal: Principal) -> None:
        if principal.role not in rule.roles:
            raise Forbidden(f"the {principal.role} role may not do this (allowed: {', '.join(sorted(rule.roles))})")
        if rule.scope is not None and not principal.allows(rule.scope):
            raise Forbidden(f"the key lacks the scope {rule.scope}")
