"""Signed HTTP requests: an advertiser proves a postback is its own without sending its key.

The sender puts `Alpes-Signature: t=<unix seconds>,v1=<hex>` on the request, where v1 is the
HMAC-SHA256 of `<t>.` followed by the raw body; the receiver recomputes it, refuses it outside a
5-minute window and refuses a signature it has seen before (the replay table). Several v1 may
be sent while a secret is being rotated. The same mechanics sign the webhooks the platform sends.

Secrets are derived, never stored or sent: every service holding the platform's master key
computes an advertiser's secret from its id and version, and the advertiser is shown it once as
`alpes_sig_<hex>`. The HMAC key is the UTF-8 of that displayed string (as with Stripe), so an
advertiser's client signs with the string it was given and needs no decoding; the `secret` that
`sign` and `verify` take is those bytes (`signing_key` gives them), not `advertiser_secret`'s.
Keys and signatures never go into a reason, a repr or a log; comparisons are constant-time.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import BigInteger, Column, MetaData, String, Table, delete, insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from .db import UtcDateTime

HEADER = "Alpes-Signature"
TOLERANCE = 300  # seconds either side of the receiver's clock
MAX_HEADER = 1000
MAX_SIGNATURES = 5
SECRET_PREFIX = "alpes_sig_"
MIN_MASTER_BYTES = 32
_TIMESTAMP = re.compile(r"0|[1-9][0-9]{0,9}")  # no sign, no leading zeros: one spelling per second
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")


class BadSignature(Exception):
    """The request's signature is missing, malformed, stale, wrong or reused (→ 401)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Verified:
    """A verified request: its timestamp and every v1 in it that matched one of the secrets."""

    timestamp: int
    signatures: tuple[str, ...] = field(repr=False)

    @property
    def signature(self) -> str:
        return self.signatures[0]


def _mac(key: bytes, timestamp: int, body: bytes) -> str:
    return hmac.new(key, f"{timestamp}.".encode("ascii") + body, hashlib.sha256).hexdigest()


def sign(secret: bytes, body: bytes, timestamp: int) -> str:
    """The `Alpes-Signature` value for `body` sent at `timestamp`; `secret`: the HMAC key (above)."""
    if not _TIMESTAMP.fullmatch(str(timestamp)):
        raise ValueError("timestamp must be non-negative unix seconds")
    return f"t={timestamp},v1={_mac(secret, timestamp, body)}"


def sign_all(secrets: Sequence[bytes], body: bytes, timestamp: int) -> str:
    """One `Alpes-Signature` with a v1 per secret (a rotation in progress: the new key first)."""
    if not secrets:
        raise ValueError("at least one secret is needed")
    if not _TIMESTAMP.fullmatch(str(timestamp)):
        raise ValueError("timestamp must be non-negative unix seconds")
    return f"t={timestamp}," + ",".join(f"v1={_mac(secret, timestamp, body)}" for secret in secrets)


def parse_header(value: str) -> tuple[int, list[str]]:
    """(timestamp, v1 signatures in lower-case hex), or BadSignature naming what is wrong."""
    if len(value) > MAX_HEADER:
        raise BadSignature(f"header longer than {MAX_HEADER} characters")
    if not value:
        raise BadSignature("empty header")
    timestamps, signatures = [], []
    for element in value.split(","):
        name, equals, item = element.partition("=")
        if not equals:
            raise BadSignature("malformed element: expected name=value")
        if name == "t":
            timestamps.append(item)
        elif name == "v1":
            if not _HEX64.fullmatch(item):
                raise BadSignature("malformed v1: expected 64 hex digits")
            signatures.append(item.lower())  # one spelling per signature: the replay table sees through case
        else:
            raise BadSignature("unknown element: only t and v1 are allowed")
    if not timestamps:
        raise BadSignature("missing timestamp")
    if len(timestamps) > 1:
        raise BadSignature("more than one timestamp")
    if not _TIMESTAMP.fullmatch(timestamps[0]):
        raise BadSignature("malformed timestamp: expected unix seconds")
    if not signatures:
        raise BadSignature("no v1 signature")
    if len(signatures) > MAX_SIGNATURES:
        raise BadSignature(f"more than {MAX_SIGNATURES} signatures")
    return int(timestamps[0]), signatures


def verify(secrets: Sequence[bytes], header: str, body: bytes, now: int, tolerance: int = TOLERANCE) -> Verified:
    """Raises BadSignature unless one of `secrets` signed exactly `body` within `tolerance` of `now`."""
    if not secrets:
        raise ValueError("at least one secret is needed")
    timestamp, given = parse_header(header)
    if abs(now - timestamp) > tolerance:
        window = "5-minute" if tolerance == TOLERANCE else f"{tolerance}-second"
        raise BadSignature(f"outside the {window} window")
    expected = [_mac(secret, timestamp, body) for secret in secrets]
    # Every pair is compared (no early exit), and every match is kept: a replay may carry any of them.
    matched = tuple(dict.fromkeys(g for g in given if sum(hmac.compare_digest(g, e) for e in expected)))
    if not matched:
        raise BadSignature("signature does not match")
    return Verified(timestamp, matched)


# -- per-advertiser secrets ---------------------------------------------------------------------
def advertiser_secret(master: bytes, anunciante_id: str, version: int) -> bytes:
    """32 bytes only holders of `master` can compute; a new version is a new, unrelated secret.
    The version, last and digits only, keeps `id|version` unambiguous whatever the id holds."""
    if len(master) < MIN_MASTER_BYTES:
        raise ValueError(f"the master key must have at least {MIN_MASTER_BYTES} bytes")
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise ValueError("version must be a non-negative integer")
    message = b"alpes-postback-v1|" + anunciante_id.encode("utf-8") + b"|" + str(version).encode("ascii")
    return hmac.new(master, message, hashlib.sha256).digest()


def format_secret(secret: bytes) -> str:
    """The form shown to the advertiser once: `alpes_sig_<64 hex>`."""
    if len(secret) != 32:
        raise ValueError("a postback secret has 32 bytes")
    return SECRET_PREFIX + secret.hex()


def parse_secret(displayed: str) -> bytes:
    """The 32 bytes behind a displayed secret (ValueError if it is not one)."""
    body = displayed.removeprefix(SECRET_PREFIX)
    if body == displayed or not re.fullmatch(r"[0-9a-f]{64}", body):
        raise ValueError("not a postback secret: expected alpes_sig_ and 64 lower-case hex digits")
    return bytes.fromhex(body)


def signing_key(master: bytes, anunciante_id: str, version: int) -> bytes:
    """The HMAC key for `sign`/`verify`: the UTF-8 of the displayed secret, as the advertiser uses it."""
    return format_secret(advertiser_secret(master, anunciante_id, version)).encode("ascii")


# -- replay protection --------------------------------------------------------------------------
def replay_table(metadata: MetaData) -> Table:
    """Signatures already accepted, kept while their request is inside the window."""
    return Table(
        "firmas_usadas", metadata,
        Column("signature", String(64), primary_key=True),
        Column("signed_at", BigInteger, nullable=False, index=True),  # the request's t (unix seconds)
        Column("seen_at", UtcDateTime(), nullable=False),
    )


def remember(session: Session, table: Table, verified: Verified, now: datetime) -> None:
    """Record every matching signature of a verified request; BadSignature if one was seen before.
    Only a savepoint is rolled back then: the caller's transaction goes on."""
    try:
        with session.begin_nested():
            session.execute(insert(table), [{"signature": s, "signed_at": verified.timestamp, "seen_at": now}
                                            for s in verified.signatures])
    except IntegrityError:
        raise BadSignature("signature already used") from None


def forget_older_than(session: Session, table: Table, cutoff: datetime) -> int:
    """Purge signatures of requests signed before `cutoff` (pass now - window at most: a replay of
    those is refused by the window). By the request's t, not when it was seen: a request dated
    in the future stays replayable until its t plus the window. Returns how many went."""
    result = session.execute(delete(table).where(table.c.signed_at < math.floor(cutoff.timestamp())))
    return result.rowcount
