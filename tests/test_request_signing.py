"""Signed requests (kernel/request_signing.py): what an advertiser's postback signature proves, and
everything that makes one worthless: a stale or future timestamp, a changed byte, another secret,
a malformed header, a second use."""

from __future__ import annotations

import hashlib
import hmac
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import MetaData, func, insert, select
from sqlalchemy.orm import Session

from alpes.kernel.db import make_engine
from alpes.kernel.request_signing import (
    BadSignature,
    Verified,
    advertiser_secret,
    forget_older_than,
    format_secret,
    parse_header,
    parse_secret,
    remember,
    replay_table,
    sign,
    signing_key,
    verify,
)

MASTER = bytes(range(32))
KEY = signing_key(MASTER, "adv-1", 1)
OTHER_KEY = signing_key(MASTER, "adv-2", 1)
BODY = b'{"campaign_id":"camp-1","order_id":"o-1","value":"250.00"}'
T = 1_796_400_000  # 2026-12-04 16:00 UTC
NOW = datetime.fromtimestamp(T, timezone.utc)
HEX = "ab" * 32


def test_a_good_signature_is_accepted_and_tells_the_timestamp_and_the_matching_signature():
    header = sign(KEY, BODY, T)
    assert header.startswith(f"t={T},v1=") and len(header) == len(f"t={T},v1=") + 64
    verified = verify([KEY], header, BODY, now=T)
    assert verified == Verified(T, (header.split("v1=")[1],))
    assert verified.signature == header.split("v1=")[1]
    assert verified.signature not in repr(verified)  # a logged result shows no signature


@given(body=st.binary(max_size=4096), t=st.integers(0, 9_999_999_999), skew=st.integers(-300, 300))
def test_any_body_round_trips_within_the_window(body, t, skew):
    assert verify([KEY], sign(KEY, body, t), body, now=t + skew).timestamp == t


@pytest.mark.parametrize("skew", [301, -301, 10_000, -T])
def test_a_signature_outside_the_5_minute_window_is_refused(skew):
    # 301 s old, 301 s in the future, far off either way: the signature is right, the time is not.
    with pytest.raises(BadSignature) as caught:
        verify([KEY], sign(KEY, BODY, T), BODY, now=T + skew)
    assert caught.value.reason == "outside the 5-minute window"


def test_the_window_is_inclusive_and_configurable():
    header = sign(KEY, BODY, T)
    assert verify([KEY], header, BODY, now=T + 300).timestamp == T
    assert verify([KEY], header, BODY, now=T - 300).timestamp == T
    with pytest.raises(BadSignature, match="outside the 60-second window"):
        verify([KEY], header, BODY, now=T + 61, tolerance=60)


@given(position=st.integers(0, len(BODY) - 1), flip=st.integers(1, 255))
def test_changing_any_one_byte_of_the_body_is_refused(position, flip):
    tampered = bytearray(BODY)
    tampered[position] ^= flip
    with pytest.raises(BadSignature) as caught:
        verify([KEY], sign(KEY, BODY, T), bytes(tampered), now=T)
    assert caught.value.reason == "signature does not match"


def test_a_changed_timestamp_an_extra_or_missing_byte_and_another_secret_are_refused():
    signature = sign(KEY, BODY, T).split(",")[1]
    cases = {
        "timestamp moved a second": (f"t={T + 1},{signature}", BODY),
        "byte appended": (f"t={T},{signature}", BODY + b" "),
        "byte removed": (f"t={T},{signature}", BODY[:-1]),
        "another body's signature": (sign(KEY, BODY + b"\n", T), BODY),
    }
    for what, (header, body) in cases.items():
        with pytest.raises(BadSignature, match="signature does not match"):
            verify([KEY], header, body, now=T)
        assert what
    with pytest.raises(BadSignature, match="signature does not match"):
        verify([KEY], sign(OTHER_KEY, BODY, T), BODY, now=T)
    with pytest.raises(BadSignature, match="signature does not match"):
        verify([KEY], f"t={T},v1={'0' * 64}", BODY, now=T)


def test_rotation_several_v1_and_several_secrets():
    old, new = signing_key(MASTER, "adv-1", 1), signing_key(MASTER, "adv-1", 2)
    by_old, by_new = (sign(k, BODY, T).split("v1=")[1] for k in (old, new))
    # The sender signs with both during rotation; a receiver knowing only the new secret accepts.
    verified = verify([new], f"t={T},v1={by_old},v1={by_new}", BODY, now=T)
    assert verified.signatures == (by_new,)
    # A receiver knowing both keeps both matches (the replay table must learn each of them).
    assert verify([new, old], f"t={T},v1={by_old},v1={by_new}", BODY, now=T).signatures == (by_old, by_new)
    assert verify([old, new], f"t={T},v1={HEX},v1={by_new}", BODY, now=T).signatures == (by_new,)
    with pytest.raises(BadSignature, match="does not match"):
        verify([signing_key(MASTER, "adv-1", 3)], f"t={T},v1={by_old},v1={by_new}", BODY, now=T)


def test_upper_case_hex_is_the_same_signature():
    header = sign(KEY, BODY, T)
    assert verify([KEY], header.upper().replace("T=", "t=").replace("V1=", "v1="), BODY, now=T).signature \
        == header.split("v1=")[1]


@pytest.mark.parametrize("header, reason", [
    ("", "empty header"),
    ("x" * 1001, "header longer than 1000 characters"),
    (f"t={T},v1={HEX}," + ",".join(["v1=" + HEX] * 14), "header longer than 1000 characters"),
    (f"v1={HEX}", "missing timestamp"),
    (f"t={T},t={T},v1={HEX}", "more than one timestamp"),
    (f"t=,v1={HEX}", "malformed timestamp"),
    (f"t=abc,v1={HEX}", "malformed timestamp"),
    (f"t=-{T},v1={HEX}", "malformed timestamp"),
    (f"t=+{T},v1={HEX}", "malformed timestamp"),
    (f"t=0{T},v1={HEX}", "malformed timestamp"),
    (f"t=0{T % 10**9},v1={HEX}", "malformed timestamp"),  # a leading zero: signed as another string
    (f"t={T}.5,v1={HEX}", "malformed timestamp"),
    (f"t=１７９６４,v1={HEX}", "malformed timestamp"),  # full-width digits: isdigit() would say yes
    (f"t={'9' * 11},v1={HEX}", "malformed timestamp"),
    (f"t={T}", "no v1 signature"),
    (f"t={T},v1={HEX[:-1]}", "malformed v1"),
    (f"t={T},v1={HEX}0", "malformed v1"),
    (f"t={T},v1={'g' * 64}", "malformed v1"),
    (f"t={T},v1=", "malformed v1"),
    (f"t={T},v1= {HEX}", "malformed v1"),
    (f"t={T},v1={HEX}," + ",".join(["v1=" + HEX] * 5), "more than 5 signatures"),
    (f"t={T},v0={HEX}", "unknown element"),
    (f"t={T}, v1={HEX}", "unknown element"),
    (f"t={T};v1={HEX}", "malformed timestamp"),
    (f"t={T},v1={HEX},", "malformed element"),
    (f"t={T} v1={HEX}", "malformed timestamp"),
    ("Alpes-Signature", "malformed element"),
])
def test_a_malformed_header_is_refused_naming_why(header, reason):
    with pytest.raises(BadSignature) as caught:
        parse_header(header)
    assert caught.value.reason.startswith(reason), caught.value.reason
    assert HEX not in caught.value.reason and HEX not in str(caught.value)
    with pytest.raises(BadSignature):  # verify parses before any window or signature check
        verify([KEY], header, BODY, now=T)


def test_parse_header_gives_the_timestamp_and_the_signatures_in_order():
    assert parse_header(f"t={T},v1={HEX},v1={'CD' * 32}") == (T, [HEX, "cd" * 32])
    assert parse_header(f"v1={HEX},t=0") == (0, [HEX])


def test_verify_needs_a_secret_and_sign_a_sane_timestamp():
    with pytest.raises(ValueError):
        verify([], sign(KEY, BODY, T), BODY, now=T)
    for bad in (-1, 10**10, True):
        with pytest.raises(ValueError):
            sign(KEY, BODY, bad)


# -- derived secrets -----------------------------------------------------------------------------
def test_derived_secrets_are_stable_and_differ_per_advertiser_version_and_master():
    first = advertiser_secret(MASTER, "adv-1", 1)
    assert len(first) == 32 and first == advertiser_secret(MASTER, "adv-1", 1)
    others = [advertiser_secret(MASTER, "adv-1", 2), advertiser_secret(MASTER, "adv-2", 1),
              advertiser_secret(MASTER, "adv-1|1", 0), advertiser_secret(bytes(range(1, 33)), "adv-1", 1),
              advertiser_secret(MASTER, "adv-11", 1), advertiser_secret(MASTER, "adv-1", 11)]
    assert len({first, *others}) == 1 + len(others)
    # Pinned: a service deriving differently would refuse every advertiser's postbacks.
    assert first == hmac.new(MASTER, b"alpes-postback-v1|adv-1|1", hashlib.sha256).digest()
    with pytest.raises(ValueError):
        advertiser_secret(b"short", "adv-1", 1)
    with pytest.raises(ValueError):
        advertiser_secret(MASTER, "adv-1", -1)


def test_the_displayed_secret_round_trips_and_is_the_hmac_key():
    raw = advertiser_secret(MASTER, "adv-1", 1)
    shown = format_secret(raw)
    assert shown == "alpes_sig_" + raw.hex() and parse_secret(shown) == raw
    assert KEY == shown.encode()  # the key is the string the advertiser was shown, not the raw bytes
    with pytest.raises(BadSignature):
        verify([raw], sign(KEY, BODY, T), BODY, now=T)
    for bad in ("", raw.hex(), "alpes_sig_" + raw.hex()[:-1], "alpes_sig_" + raw.hex().upper(),
                "whsec_" + raw.hex(), shown + "0", " " + shown):
        with pytest.raises(ValueError):
            parse_secret(bad)
    with pytest.raises(ValueError):
        format_secret(raw[:16])


def test_a_ten_line_client_written_as_the_readme_shows_is_accepted():
    import time

    def readme_client(secret: str, body: bytes) -> dict[str, str]:
        import hashlib
        import hmac
        import time

        t = str(int(time.time()))
        signature = hmac.new(secret.encode(), t.encode() + b"." + body, hashlib.sha256).hexdigest()
        return {"Content-Type": "application/json", "Alpes-Signature": f"t={t},v1={signature}"}

    shown = format_secret(advertiser_secret(MASTER, "adv-1", 1))  # what the advertiser copied
    headers = readme_client(shown, BODY)
    verified = verify([signing_key(MASTER, "adv-1", 1)], headers["Alpes-Signature"], BODY, now=int(time.time()))
    assert abs(verified.timestamp - time.time()) < 5
    with pytest.raises(BadSignature):
        verify([signing_key(MASTER, "adv-2", 1)], headers["Alpes-Signature"], BODY, now=int(time.time()))


# -- replay --------------------------------------------------------------------------------------
@pytest.fixture
def replay_db():
    metadata = MetaData()
    table = replay_table(metadata)
    engine = make_engine("sqlite://")  # in memory, one connection per thread
    metadata.create_all(engine)
    yield engine, table
    engine.dispose()


def _count(session, table) -> int:
    return session.scalar(select(func.count()).select_from(table))


def test_a_second_use_of_a_signature_is_refused_and_the_outer_transaction_survives(replay_db):
    engine, table = replay_db
    first = verify([KEY], sign(KEY, BODY, T), BODY, now=T)
    other = verify([KEY], sign(KEY, BODY, T + 1), BODY, now=T + 1)
    with Session(engine) as session, session.begin():
        remember(session, table, first, NOW)
        with pytest.raises(BadSignature) as caught:
            remember(session, table, first, NOW + timedelta(seconds=1))
        assert caught.value.reason == "signature already used"
        remember(session, table, other, NOW)  # the transaction goes on after the refusal
    with Session(engine) as session, pytest.raises(BadSignature, match="already used"), session.begin():
        remember(session, table, first, NOW + timedelta(seconds=2))  # in a later transaction too
    with Session(engine) as session:
        assert _count(session, table) == 2
        row = session.execute(select(table).where(table.c.signature == first.signature)).mappings().one()
        assert (row["signed_at"], row["seen_at"]) == (T, NOW)


def test_a_replay_cannot_slip_past_by_changing_case_reordering_or_dropping_rotation_signatures(replay_db):
    engine, table = replay_db
    old, new = signing_key(MASTER, "adv-1", 1), signing_key(MASTER, "adv-1", 2)
    by_old, by_new = (sign(k, BODY, T).split("v1=")[1] for k in (old, new))
    with Session(engine) as session, session.begin():
        remember(session, table, verify([new, old], f"t={T},v1={by_old},v1={by_new}", BODY, now=T), NOW)
    for replay in (f"t={T},v1={by_new}", f"t={T},v1={by_new},v1={by_old}", f"t={T},v1={by_old.upper()}",
                   f"t={T},v1={by_new},v1={by_new}", f"t={T},v1={HEX},v1={by_old}"):
        verified = verify([new, old], replay, BODY, now=T + 10)
        with Session(engine) as session, session.begin(), pytest.raises(BadSignature, match="already used"):
            remember(session, table, verified, NOW)
    with Session(engine) as session:
        assert _count(session, table) == 2


def test_a_refused_request_leaves_nothing_behind_and_a_repeated_v1_is_one_signature(replay_db):
    engine, table = replay_db
    old, new = signing_key(MASTER, "adv-1", 1), signing_key(MASTER, "adv-1", 2)
    by_old, by_new = (sign(k, BODY, T).split("v1=")[1] for k in (old, new))
    with Session(engine) as session, session.begin():
        remember(session, table, verify([new], f"t={T},v1={by_new},v1={by_new.upper()}", BODY, now=T), NOW)
    both = verify([old, new], f"t={T},v1={by_old},v1={by_new}", BODY, now=T)
    with Session(engine) as session, session.begin():
        with pytest.raises(BadSignature, match="already used"):
            remember(session, table, both, NOW)
    with Session(engine) as session:  # the refused request's other signature was not kept
        assert list(session.scalars(select(table.c.signature))) == [by_new]


def test_purge_forgets_requests_signed_before_the_cutoff_and_no_replay_gets_through_after(replay_db):
    engine, table = replay_db
    with Session(engine) as session, session.begin():
        for i, t in enumerate([T - 400, T - 301, T - 300, T, T + 300]):
            session.execute(insert(table).values(signature=f"{i:064x}", signed_at=t, seen_at=NOW))
    with Session(engine) as session, session.begin():
        # A cutoff between two seconds keeps the earlier second: purging rounds towards keeping.
        assert forget_older_than(session, table, NOW - timedelta(seconds=300, microseconds=500_000)) == 1
        assert forget_older_than(session, table, NOW - timedelta(seconds=300)) == 1
        assert forget_older_than(session, table, NOW - timedelta(seconds=300)) == 0
    with Session(engine) as session:
        assert sorted(session.scalars(select(table.c.signed_at))) == [T - 300, T, T + 300]
    # Every purged request is outside the window from the purge on: a replay is refused anyway.
    with pytest.raises(BadSignature, match="window"):
        verify([KEY], sign(KEY, BODY, T - 301), BODY, now=T)


def test_a_request_dated_in_the_future_stays_remembered_until_its_own_time_leaves_the_window(replay_db):
    # Seen at T, signed for T + 300: replayable until T + 600, so a purge by arrival time would be a hole.
    engine, table = replay_db
    verified = verify([KEY], sign(KEY, BODY, T + 300), BODY, now=T)
    with Session(engine) as session, session.begin():
        remember(session, table, verified, NOW)
    later = T + 400
    with Session(engine) as session, session.begin():
        forget_older_than(session, table, datetime.fromtimestamp(later - 300, timezone.utc))
    replay = verify([KEY], sign(KEY, BODY, T + 300), BODY, now=later)
    with Session(engine) as session, session.begin(), pytest.raises(BadSignature, match="already used"):
        remember(session, table, replay, datetime.fromtimestamp(later, timezone.utc))


def test_replay_table_on_every_backend(db_url):
    metadata = MetaData()
    table = replay_table(metadata)
    engine = make_engine(db_url)
    metadata.create_all(engine)
    verified = verify([KEY], sign(KEY, BODY, T), BODY, now=T)
    try:
        with Session(engine) as session, session.begin():
            remember(session, table, verified, NOW)
            with pytest.raises(BadSignature, match="already used"):
                remember(session, table, verified, NOW)
        with Session(engine) as session, session.begin():
            assert forget_older_than(session, table, NOW + timedelta(seconds=1)) == 1
    finally:
        engine.dispose()
