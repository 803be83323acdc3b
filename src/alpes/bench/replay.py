"""The replay part of `alpes bench`: N events of conversiones' event store, then `alpes replay
conversiones` on them, timed.

The events are what a real run writes: each stream is one conversion driven through the domain's
own decisions (detected; validated, rejected for a reference reason, or held; then refunds and
chargebacks, the saga's compensations, reviews that approve or refuse), turned into records by
`records.to_record` and encoded by the schema registry with the newest writer version, exactly as
`EventStore.append` stores them. Stream ids are random uuids like the service's, so the store's
primary key is filled out of order as in production. Nothing of the replay is simulated: the
bench runs the `alpes replay conversiones` command itself, in its own process, on that database.
"""

from __future__ import annotations

import os
import random
import re
import resource
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

from sqlalchemy import func, select

from ..conversiones import domain, records, tables
from ..kernel.codec import SchemaRegistry
from ..kernel.db import Database, bulk_insert, migrate
from ..kernel.messages import new_id
from .measure import say

_WRITE_BATCH = 20_000
_REPLAYED = re.compile(r"replayed (\d+) events of (\d+) streams in ([\d.]+) s")


def bench_replay(events: int, db_url: str, data_dir: Path) -> dict:
    """Write `events` events into the conversiones database at `db_url` (empty, scratch), run
    `alpes replay conversiones` on it and time it; check the rebuilt view has a row per stream."""
    registry = SchemaRegistry.from_directory()
    migrate(db_url, "alpes.conversiones:migrations")
    db = Database(db_url)
    try:
        step = time.perf_counter()
        say(f"replay: writing {events:,} events into conversiones' event store")
        written, streams = _write_events(db, registry, events)
        write_seconds = time.perf_counter() - step
        say(f"replay: {written:,} events in {streams:,} streams written in {write_seconds:.1f} s; "
            "running `alpes replay conversiones`")
    finally:
        db.dispose()
    env = dict(os.environ, ALPES_DATA_DIR=str(data_dir), ALPES_CONVERSIONES_DB_URL=db_url)
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    # The command as a user runs it; its output (the progress bar, and the summary line with the time the
    # rebuild itself took) is captured, so the bench's stdout stays one JSON document.
    done = subprocess.run([sys.executable, "-m", "alpes", "replay", "conversiones"], env=env, stdout=subprocess.PIPE,
                          text=True, check=False)
    seconds = time.perf_counter() - started
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    # Its CPU (user + system): on a busy machine the wall time also counts waiting for a core.
    cpu_seconds = (children.ru_utime - children_before.ru_utime) + (children.ru_stime - children_before.ru_stime)
    match = _REPLAYED.search(done.stdout or "")
    if done.returncode != 0 or match is None:
        return {"error": f"alpes replay exited {done.returncode}: {(done.stdout or '')[-500:]}",
                "events": written, "streams": streams}
    replayed, replayed_streams, rebuild_seconds = int(match[1]), int(match[2]), float(match[3])
    db = Database(db_url)
    try:
        with db.read() as session:
            view_rows = session.scalar(select(func.count()).select_from(tables.conversiones_view))
    finally:
        db.dispose()
    result = {"events": replayed, "streams": replayed_streams, "seconds": round(seconds, 2),
              "events_per_s": round(replayed / seconds) if seconds else None,
              "cpu_seconds": round(cpu_seconds, 2), "rebuild_seconds": round(rebuild_seconds, 2),
              "rebuild_events_per_s": round(replayed / rebuild_seconds) if rebuild_seconds else None,
              "write_seconds": round(write_seconds, 2), "view_rows": view_rows}
    if (replayed, replayed_streams, view_rows) != (written, streams, streams):
        result["error"] = f"wrote {written} events in {streams} streams; replay saw {replayed} in " \
                          f"{replayed_streams} and built {view_rows} view rows"
    return result


def _write_events(db: Database, registry: SchemaRegistry, events: int) -> tuple[int, int]:
    store_rows: list[dict] = []
    written = streams = 0
    for stream in _streams(random.Random(11), events):
        streams += 1
        for version, (event, record) in enumerate(stream, start=1):
            payload, schema_version = registry.encode(record.event_type, record.payload)
            store_rows.append({
                "stream_id": stream[0][0].conversion_id, "version": version, "event_id": new_id(),
                "stream_type": records.STREAM_TYPE, "event_type": record.event_type, "schema_version": schema_version,
                "payload": payload, "occurred_at": record.occurred_at, "recorded_at": record.occurred_at,
                "correlation_id": stream[0][0].conversion_id})
        written += len(stream)
        if len(store_rows) >= _WRITE_BATCH:
            _insert(db, store_rows)
            store_rows = []
    if store_rows:
        _insert(db, store_rows)
    return written, streams


def _insert(db: Database, rows: list[dict]) -> None:
    with db.transaction() as session:
        bulk_insert(session, tables.event_store, rows)


_REFERENCE_REJECTIONS = (domain.AFFILIATE_UNKNOWN, domain.AFFILIATE_SUSPENDED, domain.CAMPAIGN_INACTIVE,
                         domain.CURRENCY_MISMATCH, domain.OUTSIDE_ATTRIBUTION_WINDOW, domain.SELF_REFERRAL)
_HOLDS = (domain.TOO_FAST, domain.IP_VELOCITY, domain.VALUE_ABOVE_MAXIMUM)


def _streams(rng: random.Random, events: int) -> Iterator[list[tuple]]:
    """Conversion streams of (domain event, its record) until `events` events in all (the last
    stream is cut to fit). The shares follow the platform's paths: most conversions validate at
    once, some are rejected or held; validated ones are sometimes refunded or compensated."""
    affiliates = [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(300)]
    campaigns = [(str(uuid.UUID(int=rng.getrandbits(128), version=4)), "EUR" if n % 3 else "USD") for n in range(60)]
    left = events
    at = datetime(2026, 11, 27, 0, 0, tzinfo=timezone.utc)
    while left > 0:
        at += timedelta(milliseconds=rng.randint(1, 40))
        campaign, currency = rng.choice(campaigns)
        conversion = domain.Conversion()
        detected = domain.Detected(
            new_id(), rng.choice(affiliates), campaign, f"cust-{rng.randrange(10**6)}",
            Decimal(rng.randrange(100, 50_000)).scaleb(-2), rng.choice(domain.CONVERSION_TYPES),
            f"order-{rng.randrange(10**9)}" if rng.random() < 0.6 else None,
            currency, at)
        stream: list[tuple] = []

        def add(event, click_id: str | None = None) -> None:
            stream.append((event, records.to_record(conversion, event, click_id)))
            conversion.apply(event)

        add(detected)
        later = at + timedelta(milliseconds=rng.randint(1, 500))
        roll = rng.random()
        if roll < 0.72:
            add(domain.Validated(later), new_id() if rng.random() < 0.5 else None)  # click-attributed or by id
        elif roll < 0.85:
            add(domain.Rejected(rng.choice(_REFERENCE_REJECTIONS), later))
        elif roll < 0.95:
            add(domain.Held(rng.choice(_HOLDS), later))
            review = rng.random()
            if review < 0.6:
                add(domain.decide_review(conversion, True, None, later + timedelta(hours=2))[0])
            elif review < 0.9:
                add(domain.decide_review(conversion, False, "duplicate", later + timedelta(hours=2))[0])
        # else: still detected, its references not known yet
        if conversion.status == domain.VALIDATED:
            after = rng.random()
            end = later + timedelta(days=1)
            if after < 0.06:
                add(domain.decide_refund(conversion, rng.choice(domain.REFUND_TYPES), "returned", end)[0])
            elif after < 0.09:
                add(domain.decide_compensation(conversion, f"{domain.COMMISSION_DENIED}:campaign_closed", end)[0])
        stream = stream[:left]
        left -= len(stream)
        yield stream
