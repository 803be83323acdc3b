"""API keys (kernel/access.py): shape, hashing, verification against a service's key table."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import MetaData, select

from alpes.kernel.access import (
    ADVERTISER,
    AFFILIATE,
    OPERATOR,
    KeyRing,
    Unauthenticated,
    digest,
    generate_key,
    key_id_of,
    keys_table,
    parse_scopes,
)
from alpes.kernel.db import Database
from alpes.kernel.messages import IncomingEvent

NOW = datetime(2026, 12, 4, 12, 0, tzinfo=timezone.utc)


@pytest.fixture
def ring(tmp_path):
    metadata = MetaData()
    table = keys_table(metadata)
    db = Database(f"sqlite:///{tmp_path / 'keys.db'}")
    metadata.create_all(db.engine)
    return db, KeyRing(table)


def _issued(new, role: str, **extra) -> IncomingEvent:
    payload = {"key_id": new.key_id, "digest": new.digest, "rol": role, "scopes": ["conversiones:write"],
               "timestamp": NOW, **extra}
    return IncomingEvent("marketing.eventos", "s", f"e-{new.key_id}", "ClaveApiEmitida", 1, new.key_id, NOW,
                         "c", "c", payload)


def test_a_key_names_its_role_carries_256_random_bits_and_is_stored_only_as_its_hash():
    keys = {role: generate_key(role) for role in (OPERATOR, ADVERTISER, AFFILIATE)}
    assert [k.key.split("_")[1] for k in keys.values()] == ["op", "adv", "aff"]
    secret = keys[OPERATOR].key.split("_")[3]
    assert len(secret) == 52  # base32 of 32 bytes
    assert keys[OPERATOR].digest == digest(keys[OPERATOR].key) and keys[OPERATOR].key not in keys[OPERATOR].digest
    assert len({k.key for k in keys.values()} | {generate_key(OPERATOR).key}) == 4
    with pytest.raises(ValueError):
        generate_key("superuser")


@pytest.mark.parametrize("presented", ["", "Bearer x", "alpes_op_abc", "alpes_xx_abc_def", "sk_live_abc_def_ghi",
                                       "alpes_op_ab-c_def", "alpes_op_abc_" + "d" * 300])
def test_a_malformed_key_is_refused_before_any_lookup(presented):
    with pytest.raises(Unauthenticated, match="malformed"):
        key_id_of(presented)


def test_verification_learns_keys_and_refuses_unknown_altered_expired_and_revoked_ones(ring):
    db, keys = ring
    good, expiring, revoked, never_told = (generate_key(ADVERTISER) for _ in range(4))
    with db.transaction() as session:
        assert keys.any_key(session) is False
        keys.learn_issued(session, _issued(good, ADVERTISER, anunciante_id="adv-1"))
        keys.learn_issued(session, _issued(good, ADVERTISER, anunciante_id="adv-1"))  # redelivered: once
        keys.learn_issued(session, _issued(expiring, ADVERTISER, expira_en=NOW + timedelta(hours=1)))
        keys.learn_issued(session, _issued(revoked, ADVERTISER))
        keys.learn_revoked(session, IncomingEvent("marketing.eventos", "s", "r1", "ClaveApiRevocada", 1,
                                                  revoked.key_id, NOW, "c", "c",
                                                  {"key_id": revoked.key_id, "timestamp": NOW}))
        assert keys.any_key(session) is True
    with db.read() as session:  # a read: verification writes nothing
        principal = keys.verify(session, good.key, NOW)
        assert (principal.role, principal.anunciante_id, principal.scopes) == (
            ADVERTISER, "adv-1", frozenset({"conversiones:write"}))
        assert principal.allows("conversiones:write") and not principal.allows("pagos:write")
        assert keys.verify(session, expiring.key, NOW).id == expiring.key_id
        for key, reason in ((expiring.key, "expired"), (revoked.key, "revoked"), (never_told.key, "unknown"),
                            (good.key[:-1] + ("a" if good.key[-1] != "a" else "b"), "unknown")):
            with pytest.raises(Unauthenticated, match=reason):
                keys.verify(session, key, NOW + timedelta(hours=2))
    def used() -> datetime | None:
        return _last_used(db, keys, good.key_id)
    assert used() is None
    # The last use is written, then not again within LAST_USED_RESOLUTION.
    for at, expected in ((NOW, NOW), (NOW + timedelta(seconds=59), NOW), (NOW + timedelta(seconds=60),
                                                                           NOW + timedelta(seconds=60))):
        with db.transaction() as session:
            keys.note_used(session, good.key_id, at)
        assert used() == expected


def _last_used(db, keys, key_id: str) -> datetime | None:
    with db.read() as session:
        return session.execute(select(keys.table.c.usada_en).where(keys.table.c.key_id == key_id)).scalar_one()


def test_a_revocation_that_arrives_first_still_refuses_the_key(ring):
    db, keys = ring
    key = generate_key(AFFILIATE)
    with db.transaction() as session:
        keys.learn_revoked(session, IncomingEvent("marketing.eventos", "s", "r1", "ClaveApiRevocada", 1,
                                                  key.key_id, NOW, "c", "c", {"key_id": key.key_id, "timestamp": NOW}))
        keys.learn_issued(session, _issued(key, AFFILIATE, afiliado_id="af-1"))
    with db.transaction() as session, pytest.raises(Unauthenticated, match="revoked"):
        keys.verify(session, key.key, NOW)


def test_scopes_are_checked_against_the_known_resource_groups():
    assert parse_scopes(["pagos:read", "campanas:write"]) == frozenset({"pagos:read", "campanas:write"})
    with pytest.raises(ValueError, match="unknown scopes: pagos:delete"):
        parse_scopes(["pagos:delete"])


def test_a_key_is_remembered_without_a_lookup_only_while_its_verification_is_fresh(ring, monkeypatch):
    """What lets a request with a key verified in the last second be admitted on the event loop
    (kernel/http_access.py): the same principal authenticate gives, never a refused key's, and
    nothing once the cache time passed (a revocation still lands within it)."""
    import time

    from alpes.kernel.access import Gate

    db, keys = ring
    good, revoked = generate_key(ADVERTISER), generate_key(ADVERTISER)
    with db.transaction() as session:
        keys.learn_issued(session, _issued(good, ADVERTISER, anunciante_id="adv-1"))
        keys.learn_issued(session, _issued(revoked, ADVERTISER, anunciante_id="adv-1"))
    gate = Gate(db, keys, protected_local=False, clock=lambda: NOW)
    header = f"Bearer {good.key}"
    assert gate.remembered(header) is None  # never verified: a lookup is needed
    verified = gate.authenticate(header)
    assert gate.remembered(header) == verified and gate.remembered(f"bearer  {good.key} ") == verified
    for other in (None, "", good.key, f"Basic {good.key}", "Bearer ", f"Bearer {revoked.key}"):
        assert gate.remembered(other) is None, other
    with db.transaction() as session:
        keys.learn_revoked(session, IncomingEvent("marketing.eventos", "s", "r2", "ClaveApiRevocada", 1,
                                                  good.key_id, NOW, "c", "c", {"key_id": good.key_id, "timestamp": NOW}))
    later = time.monotonic() + gate.cache_seconds
    monkeypatch.setattr(time, "monotonic", lambda: later)
    assert gate.remembered(header) is None
    with pytest.raises(Unauthenticated, match="revoked"):
        gate.authenticate(header)


def test_a_slow_verification_is_remembered_from_when_it_ended_and_the_last_use_written_once_a_minute(ring,
                                                                                                     monkeypatch):
    """Under load a verification may wait; remembered from when it began, it would be stale on
    arrival and every request would verify again. The last use is written once a minute per key
    and process, not at each verification."""
    import time

    from alpes.kernel.access import Gate

    db, keys = ring
    good = generate_key(ADVERTISER)
    with db.transaction() as session:
        keys.learn_issued(session, _issued(good, ADVERTISER, anunciante_id="adv-1"))
    clock, wall = [1000.0], [NOW]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    gate = Gate(db, keys, protected_local=False, clock=lambda: wall[0])
    verify = keys.verify

    def slow_verify(session, key, now):
        clock[0] += 3 * gate.cache_seconds  # waited for a connection, a lock, a busy disk
        return verify(session, key, now)
    monkeypatch.setattr(keys, "verify", slow_verify)
    header = f"Bearer {good.key}"
    principal = gate.authenticate(header)
    assert gate.remembered(header) == principal

    def used() -> datetime | None:
        return _last_used(db, keys, good.key_id)
    assert used() == NOW
    # Verified again after the cache time, 30 s later: the last use is not written again.
    wall[0] = NOW + timedelta(seconds=30)
    clock[0] += gate.cache_seconds
    assert gate.remembered(header) is None and gate.authenticate(header) == principal
    assert used() == NOW
    # A minute after the last write, it is.
    wall[0], clock[0] = NOW + timedelta(seconds=61), clock[0] + 61
    gate.authenticate(header)
    assert used() == NOW + timedelta(seconds=61)
    # A last use that cannot be written refuses nobody; it is written at a later verification.
    def broken(*_args):
        raise RuntimeError("disk full")
    monkeypatch.setattr(keys, "note_used", broken)
    wall[0], clock[0] = NOW + timedelta(seconds=200), clock[0] + 200
    assert gate.authenticate(header) == principal
    monkeypatch.undo()
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    clock[0] += 2 * gate.cache_seconds
    gate.authenticate(header)
    assert used() == NOW + timedelta(seconds=200)
