"""A new postback reads everything it needs in one round trip before it writes (issue 11):
`reference.postback_facts` must decide exactly as `reference.reference` reading the same things
after the postback's rows are stored (the validation job's read), on SQLite and MariaDB; its
order-key hint never hides a key `commands.order_keys` finds; a new stream's projections are the
rows event-by-event projection leaves; a fresh stream is appended without a savepoint but still
refuses a taken version; the outbox writes the bytes the event store encoded."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from alpes.conversiones import commands, domain, projections, records, reference, tables
from alpes.kernel.codec import SchemaRegistry
from alpes.kernel.db import Database, migrate
from alpes.kernel.eventstore import NewEvent
from alpes.kernel.messages import OutgoingEvent
from alpes.kernel.outbox import Outbox
from commit_groups import in_one_commit_group

REGISTRY = SchemaRegistry.from_directory()
NOW = datetime(2026, 11, 28, 12, 0, tzinfo=timezone.utc)
CLICK_IDS = domain.ClickIds([b"k" * 32])


@pytest.fixture
def db(db_url):
    migrate(db_url, "alpes.conversiones:migrations")
    database = Database(db_url)
    with database.transaction() as session:
        rc, ra, ri = tables.ref_campanas, tables.ref_afiliados, tables.ref_inscripciones
        common = {"estado": "activa", "moneda": "EUR", "updated_at": NOW, "ventana_atribucion_dias": 30,
                  "fecha_inicio": NOW - timedelta(days=10), "fecha_fin": NOW + timedelta(days=10),
                  "anunciante_id": None, "min_segundos_click_conversion": None, "valor_maximo_conversion": None}
        session.execute(rc.insert(), [
            {**common, "campana_id": "kA", "anunciante_id": "A", "min_segundos_click_conversion": 30,
             "valor_maximo_conversion": Decimal("500.00")},
            {**common, "campana_id": "kA2", "anunciante_id": "A"},
            {**common, "campana_id": "kOp", "estado": "pausada", "moneda": "USD"}])
        session.execute(ra.insert(), [
            {"afiliado_id": "a1", "estado": reference.AFILIADO_HABILITADO, "updated_at": NOW, "email_sha256": "e" * 64},
            {"afiliado_id": "a2", "estado": reference.AFILIADO_SUSPENDIDO, "updated_at": NOW, "email_sha256": None}])
        session.execute(ri.insert(), [
            {"link_code": "linka1", "inscripcion_id": "i1", "afiliado_id": "a1", "campana_id": "kA", "activa": True,
             "updated_at": NOW},
            {"link_code": "linka2", "inscripcion_id": "i2", "afiliado_id": "a2", "campana_id": "kA", "activa": False,
             "updated_at": NOW}])
        session.execute(tables.clicks.insert(), [
            {"id": "stored-click", "link_code": "linka2", "affiliate_id": "a2", "campaign_id": "kA",
             "clicked_at": NOW - timedelta(hours=2)}])
        # Earlier postbacks of the same IP and caller: two in the hour, one before it, one elsewhere,
        # stored as record_conversion stores them (the signals, and the caller's minute).
        earlier = [{"conversion_id": str(uuid.uuid4()), "campaign_id": campaign, "ip": "203.0.113.7",
                    "customer_email_sha256": None, "detected_at": NOW - ago, "caller_key": "key:k1"}
                   for campaign, ago in [("kA", timedelta(minutes=5)), ("kA", timedelta(minutes=59)),
                                         ("kA", timedelta(minutes=61)), ("kA2", timedelta(minutes=1))]]
        session.execute(tables.conversion_signals.insert(), earlier)
        for signal in earlier:
            reference.count_caller_conversion(session, signal["campaign_id"], signal["caller_key"],
                                              signal["detected_at"], signal["conversion_id"])
    yield database
    database.dispose()


SIGNED_CLICK, _ = CLICK_IDS.new("linka1", NOW - timedelta(seconds=10))

SCENARIOS = {
    "by ids, enrolled, busy IP and caller": dict(affiliate_id="a1", campaign_id="kA", ip="203.0.113.7",
                                                 caller_key="key:k1", email="Shop@Example.com"),
    "caller counted up to its limit": dict(affiliate_id="a1", campaign_id="kA", ip=None, caller_key="key:k1",
                                           max_caller=1),
    "unknown affiliate and campaign": dict(affiliate_id="nobody", campaign_id="nowhere", ip="198.51.100.1"),
    "suspended, not enrolled, no signals": dict(affiliate_id="a2", campaign_id="kA"),
    "campaign nobody enrolled in": dict(affiliate_id="a1", campaign_id="kOp", caller_key="key:other"),
    "stored click, its link inactive": dict(affiliate_id="a2", campaign_id="kA", click_id="stored-click"),
    "signed click not stored": dict(affiliate_id="a1", campaign_id="kA", click_id=SIGNED_CLICK, ip="203.0.113.7"),
    "uuid click not stored": dict(affiliate_id="a1", campaign_id="kA", click_id=str(uuid.uuid4())),
}


@pytest.mark.parametrize("name", SCENARIOS)
def test_the_facts_read_before_the_rows_decide_as_the_reference_read_after_them(db, name):
    s = SCENARIOS[name]
    email = s.get("email")
    email_sha256 = None if email is None else domain.email_sha256(email)
    ip, caller_key, max_caller = s.get("ip"), s.get("caller_key"), s.get("max_caller", 10_000)
    conversion_id = str(uuid.uuid4())
    with db.transaction() as session:
        facts = reference.postback_facts(
            session, affiliate_id=s["affiliate_id"], campaign_id=s["campaign_id"], click_id=s.get("click_id"),
            ip=ip, customer_email_sha256=email_sha256, caller_key=caller_key, now=NOW,
            max_conversions_per_ip=2, max_conversions_per_caller=max_caller)
        # What record_conversion stores, then the validation job's read of it.
        if s.get("click_id"):
            session.execute(tables.click_attributions.insert().values(conversion_id=conversion_id,
                                                                      click_id=s["click_id"]))
        if ip or email or caller_key:
            session.execute(tables.conversion_signals.insert().values(
                conversion_id=conversion_id, campaign_id=s["campaign_id"], ip=ip, customer_email_sha256=email_sha256,
                detected_at=NOW, caller_key=caller_key))
        after = reference.reference(session, s["affiliate_id"], s["campaign_id"], conversion_id, 2, max_caller)
    assert facts.reference == after
    conversion = domain.Conversion().apply(domain.Detected(conversion_id, s["affiliate_id"], s["campaign_id"], "u",
                                                           Decimal("80.00"), "sale", None, "EUR", NOW))
    assert domain.decide_validation(conversion, facts.reference, NOW, timedelta(seconds=10)) == \
        domain.decide_validation(conversion, after, NOW, timedelta(seconds=10))
    assert facts.owner == {"kA": "A"}.get(s["campaign_id"])  # kOp: operator-owned; nowhere: unknown


def test_the_velocity_counts_include_the_postback_itself(db):
    with db.transaction() as session:
        facts = reference.postback_facts(session, affiliate_id="a1", campaign_id="kA", click_id=None,
                                         ip="203.0.113.7", customer_email_sha256=None, caller_key="key:k1", now=NOW)
    # Two earlier ones in the hour for the campaign (not the one 61 minutes ago, not kA2's), and itself.
    assert (facts.reference.conversions_from_same_ip, facts.reference.conversions_from_same_caller) == (3, 3)


def test_the_order_key_hint_finds_every_key_order_keys_finds(db):
    """A key of the advertiser's other campaign, one stored per campaign before its owner was
    known, and another advertiser's key of the same order id (not this one's)."""
    with db.transaction() as session:
        session.execute(tables.order_keys.insert(), [
            {"scope": "anunciante:A", "campaign_id": "kA2", "order_id": "o-other-campaign", "conversion_id": "c1",
             "fingerprint": None},
            {"scope": "campana:kA", "campaign_id": "kA", "order_id": "o-legacy", "conversion_id": "c2",
             "fingerprint": None},
            {"scope": "anunciante:B", "campaign_id": "kB", "order_id": "o-elsewhere", "conversion_id": "c3",
             "fingerprint": None},
            {"scope": "campana:nowhere", "campaign_id": "nowhere", "order_id": "o-unknown-campaign",
             "conversion_id": "c4", "fingerprint": None}])
    cases = [("kA", "o-other-campaign", True), ("kA", "o-legacy", True), ("kA", "o-elsewhere", False),
             ("kA", "o-new", False), ("kOp", "o-other-campaign", False), ("nowhere", "o-unknown-campaign", True),
             ("nowhere", "o-legacy", False)]
    with db.transaction() as session:
        for campaign_id, order_id, taken in cases:
            facts = reference.postback_facts(session, affiliate_id="a1", campaign_id=campaign_id, click_id=None,
                                             ip=None, customer_email_sha256=None, caller_key=None, now=NOW,
                                             order_id=order_id)
            scope = commands.idempotency_scope(campaign_id, facts.owner)
            found = commands.order_keys(session, scope, campaign_id, order_id)
            assert (facts.order_key_taken, bool(found)) == (taken, taken), (campaign_id, order_id)


def test_a_new_streams_projections_are_those_of_its_events_one_by_one(db):
    store = records.event_store(REGISTRY)
    verdicts = {"validated": [domain.Validated(NOW)], "rejected": [domain.Rejected("campaign_outside_dates", NOW)],
                "held": [domain.Held("ip_velocity", NOW)], "detected": []}
    v, f = tables.conversiones_view, tables.conversion_figures
    for kind, events in verdicts.items():
        rows, figures = [], []
        for way, affiliate in (("folded", f"{kind}-folded"), ("one by one", f"{kind}-each")):
            conversion_id = str(uuid.uuid4())
            detected = domain.Detected(conversion_id, affiliate, "kA", "u", Decimal("80.00"), "sale", "o", "EUR", NOW)
            conversion = domain.Conversion()
            new = []
            for event in [detected, *events]:
                new.append(records.to_record(conversion, event))
                conversion.apply(event)
            with db.transaction() as session:
                stored = store.append(session, conversion_id, 0, new, conversion_id, fresh_stream=True)
                if way == "folded":
                    projections.project_new_stream(session, stored)
                else:
                    for item in stored:
                        projections.project(session, item)
            with db.read() as session:
                row = dict(session.execute(select(v).where(v.c.id == conversion_id)).mappings().one())
                rows.append({k: value for k, value in row.items() if k not in ("id", "affiliate_id")})
                figure = dict(session.execute(select(f).where(f.c.affiliate_id == affiliate)).mappings().one())
                figures.append({k: value for k, value in figure.items() if k != "affiliate_id"})
        assert rows[0] == rows[1], kind
        assert figures[0] == figures[1], kind


def test_a_fresh_stream_still_refuses_a_taken_version(db):
    store = records.event_store(REGISTRY)
    event = NewEvent("ConversionValidated", {
        "conversion_id": "s1", "affiliate_id": "a1", "campaign_id": "kA", "conversion_value": Decimal("1.00"),
        "currency": "EUR", "conversion_type": "sale", "timestamp": NOW, "click_id": None, "converted_at": NOW}, NOW)
    with db.transaction() as session:
        store.append(session, "s1", 0, [event], "s1", fresh_stream=True)
    with pytest.raises(IntegrityError):
        with db.transaction() as session:
            store.append(session, "s1", 0, [event], "s1", fresh_stream=True)
    with pytest.raises(ValueError):
        with db.transaction() as session:
            store.append(session, "s1", 1, [event], "s1", fresh_stream=True)
    with db.read() as session:
        assert [e.version for e in store.load(session, "s1")] == [1]


def test_the_outbox_writes_the_bytes_the_event_store_encoded(db):
    from alpes.kernel.outbox import Outbox

    store, outbox = records.event_store(REGISTRY), Outbox(tables.outbox, REGISTRY)
    conversion_id = str(uuid.uuid4())
    detected = domain.Detected(conversion_id, "a1", "kA", "u", Decimal("80.00"), "sale", "o", "EUR", NOW)
    with db.transaction() as session:
        [stored] = store.append(session, conversion_id, 0, [records.to_record(domain.Conversion(), detected)],
                                conversion_id, fresh_stream=True)
        assert stored.encoded == REGISTRY.encode(stored.event_type, stored.payload)[0]
        outbox.add(session, [OutgoingEvent(records.TOPIC, stored.event_type, conversion_id, stored.payload,
                                           encoded=(stored.encoded, stored.schema_version))])
    with db.read() as session:
        row = session.execute(select(tables.outbox.c.payload, tables.outbox.c.schema_version)).one()
        written = session.execute(select(tables.event_store.c.payload)).scalar_one()
    assert (row.payload, row.schema_version) == (written, stored.schema_version)
    assert REGISTRY.decode(stored.event_type, row.payload, row.schema_version) == stored.payload


# -- postbacks of one commit group (SQLite): their rows are written at its commit ----------------
def _postback(db, store, *, order_id: str | None, ip: str | None, value: str = "80.00", max_per_ip: int = 5,
              caller_key: str | None = None, max_per_caller: int = 10_000):
    """A postback's transaction as receive_postback runs it (writes deferred to the commit group)."""
    def unit():
        with db.transaction(defer_writes=True) as session:
            conversion_id, created, events = commands.record_conversion(
                session, store, affiliate_id="a1", campaign_id="kA", user_id="u", conversion_value=Decimal(value),
                conversion_type="sale", currency="EUR", order_id=order_id, grace=timedelta(seconds=10),
                now=NOW, ip=ip, max_conversions_per_ip=max_per_ip, scope="anunciante:A",
                caller_key=caller_key, max_conversions_per_caller=max_per_caller,
                fingerprint=domain.postback_fingerprint(
                    affiliate_id="a1", campaign_id="kA", click_id=None, user_id="u", conversion_value=Decimal(value),
                    currency="EUR", conversion_type="sale", ip=ip, customer_email=None))
        return conversion_id, created, [e.event_type for e in events]
    return unit


def _one_group(db, units):
    if db.committer is None:
        pytest.skip("commit groups are SQLite's; elsewhere each postback is a transaction of its own")
    return in_one_commit_group(db, units)


def test_postbacks_of_one_commit_group_count_each_other_for_ip_velocity(db):
    store = records.event_store(REGISTRY)
    results = _one_group(db, [_postback(db, store, order_id=f"v{i}", ip="198.51.100.9", max_per_ip=2)
                              for i in range(3)])
    verdicts = sorted(events[-1] for _, _, events in results)
    # Two validated; the third from the same IP within the hour is held, as one after the other.
    assert verdicts == ["ConversionHeld", "ConversionValidated", "ConversionValidated"]
    [held] = [conversion_id for conversion_id, _, events in results if events[-1] == "ConversionHeld"]
    with db.read() as session:
        assert session.scalar(select(tables.conversiones_view.c.status).where(
            tables.conversiones_view.c.id == held)) == domain.HELD
        steps = session.execute(select(tables.saga_pasos.c.detalle).where(
            tables.saga_pasos.c.saga_id == held)).scalars().all()
        assert any(step and step.startswith("on hold for review") for step in steps), steps
        assert session.scalar(select(func.count()).select_from(tables.conversion_signals)
                              .where(tables.conversion_signals.c.ip == "198.51.100.9")) == 3


def test_a_caller_bursting_postbacks_into_one_commit_group_still_meets_its_velocity_limit(db):
    """Different IPs, one caller, a limit of two per hour: the third of one group is not validated."""
    store = records.event_store(REGISTRY)
    results = _one_group(db, [_postback(db, store, order_id=f"burst{i}", ip=f"192.0.2.{i}", caller_key="key:burst",
                                        max_per_caller=2) for i in range(3)])
    verdicts = sorted(events[-1] for _, _, events in results)
    assert verdicts.count("ConversionValidated") == 2 and len(verdicts) == 3, verdicts
    with db.read() as session:
        reasons = session.scalars(select(tables.conversiones_view.c.reason).where(
            tables.conversiones_view.c.order_id.like("burst%"), tables.conversiones_view.c.reason.is_not(None))).all()
    assert reasons == [domain.CALLER_VELOCITY]


def test_a_repeated_order_id_in_one_commit_group_is_one_conversion_and_other_parameters_conflict(db):
    store = records.event_store(REGISTRY)
    results = _one_group(db, [_postback(db, store, order_id="twice", ip=None) for _ in range(2)]
                         + [_postback(db, store, order_id="twice", ip=None, value="81.00")])
    # Whichever comes first in the group is created; the one with its parameters repeats it, the
    # one with others conflicts (the first two share theirs, the third differs).
    [first] = [i for i, result in enumerate(results) if not isinstance(result, Exception) and result[1]]
    for i, result in enumerate(results):
        if i != first and (i < 2) == (first < 2):
            assert result == (results[first][0], False, [])
        elif i != first:
            assert isinstance(result, commands.IdempotencyConflict), result
    with db.read() as session:
        assert session.scalar(select(func.count()).select_from(tables.order_keys)
                              .where(tables.order_keys.c.order_id == "twice")) == 1
        assert session.scalar(select(func.count()).select_from(tables.conversiones_view)
                              .where(tables.conversiones_view.c.order_id == "twice")) == 1


def test_a_postback_held_at_once_logs_its_saga_step_with_its_writes_deferred(db):
    """Held at once: the saga's step is updated in the postback's transaction, which reads the saga
    it deferred (stop_deferring), on every database."""
    store = records.event_store(REGISTRY)
    conversion_id, created, events = _postback(db, store, order_id="held", ip="203.0.113.7", max_per_ip=2)()
    assert created and events[-1] == "ConversionHeld"
    with db.read() as session:
        steps = session.execute(select(tables.saga_pasos.c.detalle).where(
            tables.saga_pasos.c.saga_id == conversion_id)).scalars().all()
    assert any(step and step.startswith("on hold for review") for step in steps), steps


@pytest.mark.parametrize("forgetting", [False, True], ids=["kept", "old-ones-forgotten"])
def test_the_caller_velocity_rule_decides_as_an_exact_count_of_the_hour_would(db, forgetting):
    """A caller's postbacks at random times (bursts, pauses that roll the hour over, clocks a little
    behind the last one), each in its own transaction, with a limit of three: each is held for
    caller_velocity exactly when three or more of the caller's conversions for the campaign were
    detected in the hour up to it (the minutes' totals are a bound read first; the exact count
    decides near the limit), and the minutes' totals end equal to the signals stored. The same
    when the periodic job forgets, now and then, what no rule reads any more: every verdict is
    still that of all the conversions ever stored."""
    import random
    from collections import Counter

    store, rng, when = records.event_store(REGISTRY), random.Random(1206), random.Random(7)  # when: to forget
    cm, cs = tables.caller_minutes, tables.conversion_signals

    def minute(t: datetime) -> datetime:
        return t.replace(second=0, microsecond=0)

    at, stored, limit, held, forgotten = NOW, [], 3, 0, 0
    for n in range(150):
        step = rng.choice([timedelta(seconds=rng.uniform(0, 20)), timedelta(seconds=rng.uniform(0, 20)),
                           timedelta(minutes=rng.uniform(5, 70)), -timedelta(seconds=rng.uniform(0, 2))])
        at += step
        with db.transaction() as session:
            _id, _created, events = commands.record_conversion(
                session, store, affiliate_id="a1", campaign_id="kA", user_id="u", conversion_value=Decimal("80.00"),
                conversion_type="sale", currency="EUR", order_id=f"cv{n}", grace=timedelta(seconds=10), now=at,
                scope="anunciante:A", caller_key="key:rng", max_conversions_per_caller=limit)
        in_the_hour = sum(1 for t in stored if at - domain.IP_VELOCITY_WINDOW < t <= at)
        expected = "ConversionHeld" if in_the_hour >= limit else "ConversionValidated"
        assert events[-1].event_type == expected, (n, at, in_the_hour)
        stored.append(at)
        held += expected == "ConversionHeld"
        if forgetting and when.random() < 0.5:
            with db.transaction() as session:
                forgotten += reference.forget_unread_signals(session, at, batch=when.choice([1, 3, 1000]))
            # What a postback now would read is all there: its hour's signals, and its minutes.
            with db.read() as session:
                in_its_hour = session.scalar(select(func.count()).where(
                    cs.c.caller_key == "key:rng", cs.c.detected_at > at - domain.IP_VELOCITY_WINDOW,
                    cs.c.detected_at <= at))
                its_minutes = session.scalar(select(func.coalesce(func.sum(cm.c.conversions), 0)).where(
                    cm.c.caller_key == "key:rng", cm.c.minute >= minute(at - domain.IP_VELOCITY_WINDOW)))
            assert in_its_hour == sum(1 for t in stored if at - domain.IP_VELOCITY_WINDOW < t <= at), n
            assert its_minutes == sum(1 for t in stored if minute(t) >= minute(at - domain.IP_VELOCITY_WINDOW)), n
    assert 20 < held < 130  # both verdicts, often
    if forgetting:  # once more at the last postback's time, until nothing more goes
        with db.transaction() as session:
            while reference.forget_unread_signals(session, at, batch=50):
                pass
    with db.read() as session:
        minutes = dict(session.execute(select(cm.c.minute, func.sum(cm.c.conversions)).where(
            cm.c.caller_key == "key:rng").group_by(cm.c.minute)).all())
        signals = session.scalars(select(cs.c.detected_at).where(cs.c.caller_key == "key:rng")).all()
    kept_from = minute(at - reference.SIGNALS_KEPT_FOR) if forgetting else NOW - timedelta(days=1)
    assert {m: int(c) for m, c in minutes.items()} == Counter(minute(t) for t in stored if minute(t) >= kept_from)
    # Forgotten along the way, and in the end exactly those older than twice the window.
    assert forgotten > 0 if forgetting else forgotten == 0
    assert sorted(signals) == sorted(t for t in stored if not forgetting or t >= at - reference.SIGNALS_KEPT_FOR)


def test_the_signals_a_conversion_left_detected_will_count_are_not_forgotten(db):
    """A conversion left detected (its affiliate not known yet, a long grace) is decided later by
    the validation job from the signals of the hour before its detection: those stay however old,
    while older ones and everyone else's old ones go. Once decided, they may go too."""
    store = records.event_store(REGISTRY)
    detected_at, ip = NOW - timedelta(hours=5), "198.51.100.9"
    cs = tables.conversion_signals
    with db.transaction() as session:
        session.execute(cs.insert(), [
            {"conversion_id": str(uuid.uuid4()), "campaign_id": "kA", "ip": ip, "customer_email_sha256": None,
             "detected_at": at, "caller_key": None}
            for at in [detected_at - timedelta(minutes=m) for m in (1, 10, 20, 30, 59)]  # its hour: five
            + [NOW - timedelta(hours=10), NOW - timedelta(hours=3)]])  # read by no rule
        late, _created, events = commands.record_conversion(
            session, store, affiliate_id="late", campaign_id="kA", user_id="u", conversion_value=Decimal("80.00"),
            conversion_type="sale", currency="EUR", order_id="late-1", grace=timedelta(days=1), now=detected_at,
            ip=ip, scope="anunciante:A")
    assert [e.event_type for e in events] == ["ConversionDetected"]
    with db.transaction() as session:
        assert reference.forget_unread_signals(session, NOW) == 1  # the one ten hours old
        assert reference.forget_unread_signals(session, NOW) == 0
        session.execute(tables.ref_afiliados.insert().values(afiliado_id="late", estado=reference.AFILIADO_HABILITADO,
                                                             updated_at=NOW, email_sha256=None))
        session.execute(tables.ref_inscripciones.insert().values(
            link_code="linklate", inscripcion_id="i3", afiliado_id="late", campana_id="kA", activa=True, updated_at=NOW))
    outbox = Outbox(tables.outbox, REGISTRY)
    assert commands.validate_pending(db, store, outbox, timedelta(days=1), now=NOW) == 1
    with db.read() as session:
        assert session.scalar(select(tables.conversiones_view.c.status).where(
            tables.conversiones_view.c.id == late)) == domain.HELD  # six from its IP in its hour: over five
    with db.transaction() as session:  # decided: nothing keeps its hour any more
        assert reference.forget_unread_signals(session, NOW) == 7
        left = session.scalars(select(cs.c.detected_at)).all()
    assert all(at >= NOW - reference.SIGNALS_KEPT_FOR for at in left) and len(left) == 4  # the fixture's


def test_the_migration_counts_the_last_hours_signals_in_their_callers_minutes(db_url):
    """Signals stored before revision 0012 (its table did not exist) still count: a caller at its
    limit from them is held right after the upgrade; older ones are left out (no window reaches them)."""
    from sqlalchemy import MetaData, Table, create_engine

    from alpes.kernel.messages import utcnow

    migrate(db_url, "alpes.conversiones:migrations", "0011_outbox_traceparent")
    now = utcnow()
    engine = create_engine(db_url)
    signals = Table("conversion_signals", MetaData(), autoload_with=engine)
    with engine.begin() as connection:
        connection.execute(signals.insert(), [
            {"conversion_id": str(uuid.uuid4()), "campaign_id": "kA", "ip": None, "customer_email_sha256": None,
             "detected_at": (now - ago).replace(tzinfo=None), "caller_key": "key:before"}
            for ago in (timedelta(minutes=2), timedelta(minutes=50), timedelta(hours=3))])
    engine.dispose()
    migrate(db_url, "alpes.conversiones:migrations")
    database = Database(db_url)
    try:
        with database.transaction() as session:
            minutes = session.execute(select(tables.caller_minutes.c.minute, tables.caller_minutes.c.conversions)
                                      .order_by(tables.caller_minutes.c.minute)).all()
            facts = [reference.postback_facts(session, affiliate_id="a1", campaign_id="kA", click_id=None, ip=None,
                                              customer_email_sha256=None, caller_key="key:before", now=now,
                                              max_conversions_per_caller=limit) for limit in (2, 3)]
        assert minutes == [((now - timedelta(minutes=m)).replace(second=0, microsecond=0), 1) for m in (50, 2)]
        # Two in the hour and itself: over a limit of two, not over three.
        assert [f.reference.conversions_from_same_caller for f in facts] == [3, 3]
        detected = domain.Detected("c", "a1", "kA", "u", Decimal("80.00"), "sale", None, "EUR", now)
        verdicts = [domain.fraud_verdict(detected, f.reference) for f in facts]
        assert verdicts[0](now).reason == domain.CALLER_VELOCITY and verdicts[1] is None
    finally:
        database.dispose()
