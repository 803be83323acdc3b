"""The replay part of `alpes bench`: the events it writes are conversion streams the domain could
have produced, and the replay it times rebuilds one view row per stream (SQLite and MariaDB)."""

from __future__ import annotations

import random
from collections import Counter

from alpes.bench.replay import _streams, bench_replay
from alpes.conversiones import domain


def test_generated_streams_are_the_domains_own_and_fill_the_count_exactly():
    streams = list(_streams(random.Random(3), 5_001))
    assert sum(len(s) for s in streams) == 5_001
    kinds = Counter(record.event_type for stream in streams for _, record in stream)
    assert set(kinds) == {"ConversionDetected", "ConversionValidated", "ConversionRejected", "ConversionHeld",
                          "ConversionRefunded"}
    compensations = 0
    for stream in streams:
        assert stream[0][1].event_type == "ConversionDetected"
        conversion_id = stream[0][0].conversion_id
        # The records are what the service stores: rebuilt from them, the aggregate is consistent.
        assert {record.payload["conversion_id"] for _, record in stream} == {conversion_id}
        domain.Conversion.rebuild([event for event, _ in stream])
        compensations += any(record.payload.get("compensation") for _, record in stream)
    assert compensations > 0


def test_bench_replay_rebuilds_a_view_row_per_stream(db_url, tmp_path):
    result = bench_replay(3_000, db_url, tmp_path)
    assert "error" not in result, result
    assert result["events"] == 3_000 and result["view_rows"] == result["streams"] > 1_000
    assert result["events_per_s"] > 0 and result["seconds"] >= result["rebuild_seconds"] > 0
