"""`alpes bench`: measure this machine in one run.

Two measurements, each on scratch infrastructure so a running platform is never touched:

1. raw broker (raw_broker.py) — a scratch embedded pulsar-lite broker with one 6-partition
   topic. Avro `ConversionDetected` events are encoded and produced the way the outbox relay
   does it (key-based batching, block when the queue is full), then consumed by one Failover
   consumer with the services' receive settings, decoded with fastavro and acknowledged one by
   one, the way every service consumer does it. Produce and consume are separate phases, so
   each rate is the rate of that side alone.
2. end to end (end_to_end.py) — `alpes up` on free ports and a scratch data directory
   (alpes.platform_harness); conversion postbacks over HTTP, and the time until each one's
   `ComisionCalculada` shows up in the audit log (conversiones → broker → marketing → broker →
   auditoria).

Everything in the returned JSON is measured during the run; nothing is assumed. Progress
goes to stderr so stdout stays one JSON document.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from .end_to_end import bench_end_to_end
from .measure import machine_facts, say
from .raw_broker import bench_raw_broker


def run_bench(conversions: int, rate: int, raw_messages: int, data_dir: Path | None) -> str:
    """Run both measurements; return them as pretty-printed JSON."""
    own_dir = data_dir is None
    root = Path(tempfile.mkdtemp(prefix="alpes-bench-")) if own_dir else Path(data_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    report: dict = {"machine": machine_facts(),
                    "parameters": {"conversions": conversions, "rate": rate, "raw_messages": raw_messages,
                                   "data_dir": None if own_dir else str(root)},
                    "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    failed = False
    started = time.perf_counter()
    try:
        if raw_messages > 0:
            step = time.perf_counter()
            try:
                report["raw_broker"] = bench_raw_broker(raw_messages, root / "raw-broker")
            except Exception as error:  # report it, and still run the end-to-end part
                failed = True
                report["raw_broker"] = {"error": f"{type(error).__name__}: {error}"}
            report["raw_broker"]["wall_seconds"] = round(time.perf_counter() - step, 2)
        if conversions > 0:
            step = time.perf_counter()
            report["end_to_end"] = bench_end_to_end(conversions, rate, root / "platform")
            failed = failed or "error" in report["end_to_end"]
            report["end_to_end"]["wall_seconds"] = round(time.perf_counter() - step, 2)
    finally:
        report["total_seconds"] = round(time.perf_counter() - started, 2)
        # Other work on this machine skews every number: say how busy it was.
        report["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()] \
            if hasattr(os, "getloadavg") else None
        if own_dir and not failed:
            shutil.rmtree(root, ignore_errors=True)
        elif own_dir:
            say(f"scratch files kept for inspection: {root}")
    return json.dumps(report, indent=2)
