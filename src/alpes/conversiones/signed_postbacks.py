"""Signed postbacks: an advertiser proves a postback (or a refund) is its own with
`Alpes-Signature: t=<unix>,v1=<hex>` over the raw body instead of sending its key
(kernel/request_signing.py has the mechanics).

The body names what it is about, and so whose secret must have signed it: a postback its
`campaign_id` (or its `click_id`, whose click names the campaign), a refund its `conversion_id`.
The campaign's advertiser (CampanaCreada v5) gives the secrets: derived from every platform
master key (ALPES_POSTBACK_SIGNING_KEYS: all verify, so they can be rotated too), for the
advertiser's current secret version and, for 24 hours after a rotation, the one before. A verified
signature is remembered (firmas_usadas) so it cannot be replayed; the job `forget_used` drops
those the 5-minute window refuses anyway. What the signature proves is the advertiser; which
campaigns it may post for, the routes decide (tenancy.py) like for a key.

Refusals are 401 (`Unauthenticated`) and store nothing: a malformed, stale, wrong, tampered or
reused signature; a body that names no campaign known here; an operator-owned campaign (no
advertiser signs for it). Signatures and secrets never go into a reason or a log.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta, timezone

from sqlalchemy import select
from sqlalchemy.orm import Session

from alpes.kernel import request_signing
from alpes.kernel.access import ADVERTISER, Principal, Unauthenticated
from alpes.kernel.db import Database

from . import reference, tables, tracking

SCOPES = frozenset({"conversiones:write"})
PRINCIPAL_PREFIX = "firma:"


def principal_for(anunciante_id: str) -> Principal:
    """Who a signed request is: the advertiser itself, allowed to write conversions only."""
    return Principal(f"{PRINCIPAL_PREFIX}{anunciante_id}", ADVERTISER, anunciante_id=anunciante_id, scopes=SCOPES)


class SignedPostbacks:
    """The verifier the HTTP edge calls for a signed request: (raw body, header) -> Principal."""

    def __init__(self, db: Database, masters: Sequence[bytes], clock: Callable[[], float] = time.time) -> None:
        if not masters:
            raise ValueError("at least one postback master key is needed")
        self.db = db
        self.masters = list(masters)
        self.clock = clock

    def __call__(self, body: bytes, header: str) -> Principal:
        try:
            request_signing.parse_header(header)  # a malformed header costs no database read
        except request_signing.BadSignature as refusal:
            raise Unauthenticated(f"Alpes-Signature refused: {refusal.reason}") from None
        named = _what_it_names(body)
        now = self.clock()
        seen_at = datetime.fromtimestamp(now, timezone.utc)
        with self.db.transaction() as session:
            anunciante_id = _advertiser_of(session, named)
            versions = reference.secret_versions(session, anunciante_id, seen_at)
            secrets = [request_signing.signing_key(master, anunciante_id, version)
                       for master in self.masters for version in versions]
            try:
                verified = request_signing.verify(secrets, header, body, int(now))
                request_signing.remember(session, tables.firmas_usadas, verified, seen_at)
            except request_signing.BadSignature as refusal:
                raise Unauthenticated(f"Alpes-Signature refused: {refusal.reason}") from None
        return principal_for(anunciante_id)


def _what_it_names(body: bytes) -> dict[str, str]:
    """The ids a signed body names (campaign_id, click_id, conversion_id), as the routes will read
    them (strings, stripped); Unauthenticated when it is not a JSON object naming any."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        document = None
    if not isinstance(document, dict):
        raise Unauthenticated("a signed request's body must be a JSON object naming its campaign_id, "
                              "click_id or conversion_id")
    named = {name: value.strip() for name in ("campaign_id", "click_id", "conversion_id")
             if isinstance(value := document.get(name), str) and value.strip()}
    if not named:
        raise Unauthenticated("a signed request must name its campaign_id, click_id or conversion_id")
    return named


def _advertiser_of(session: Session, named: dict[str, str]) -> str:
    """The advertiser owning the campaign the body names (campaign_id first, else through the click
    or the conversion)."""
    campaign_id = named.get("campaign_id")
    if campaign_id is None and "click_id" in named:
        campaign_id = tracking.campaign_of_click(session, named["click_id"])
    if campaign_id is None and "conversion_id" in named:
        v = tables.conversiones_view
        campaign_id = session.scalar(select(v.c.campaign_id).where(v.c.id == named["conversion_id"]))
    known, anunciante_id = (False, None) if campaign_id is None else reference.campaign_owner(session, campaign_id)
    if not known:
        raise Unauthenticated("a signed request must be for a known campaign")
    if anunciante_id is None:
        raise Unauthenticated("the campaign has no advertiser to sign for it: use an API key")
    return anunciante_id


def forget_used(db: Database, clock: Callable[[], float] = time.time) -> int:
    """Drop the remembered signatures of requests signed before the window (a replay of those is
    refused by the window itself). Returns how many went."""
    cutoff = datetime.fromtimestamp(clock(), timezone.utc) - timedelta(seconds=request_signing.TOLERANCE)
    with db.transaction() as session:
        return request_signing.forget_older_than(session, tables.firmas_usadas, cutoff)
