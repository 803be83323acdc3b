"""`alpes bench`: measure this machine in one run.

Its measurements run on scratch infrastructure so a running platform is never touched:

1. raw broker (raw_broker.py) — a scratch embedded pulsar-lite broker with one 6-partition
   topic. Avro `ConversionDetected` events are encoded and produced the way the outbox relay
   does it (key-based batching, block when the queue is full), then consumed by one Failover
   consumer with the services' receive settings, decoded with fastavro and acknowledged one by
   one, the way every service consumer does it. Produce and consume are separate phases, so
   each rate is the rate of that side alone.
2. end to end (end_to_end.py) — `alpes up` on free ports and a scratch data directory
   (alpes.platform_harness); conversion postbacks over HTTP, and the time until each one's
   `ComisionCalculada` shows up in the audit log (conversiones → broker → marketing → broker →
   auditoria), with the CPU each process of the platform spent per 1,000 conversions.
3. postbacks and clicks at a constant rate (at_rate.py, openloop.py) — on the same platform,
   an open-loop generator offers POST /conversiones and GET /r/{code} at a fixed rate and
   measures each request's latency from its intended send time; it measures its own CPU and
   says when it could not keep its schedule (`generator.saturated`).
4. replay (replay.py) — N realistic events of conversiones' event store written into a scratch
   database, then `alpes replay conversiones` (its own process) timed on them.

With `database="both"` (or "mariadb") the platform's measurements and the replay run once per
database, on SQLite files and on one scratch MariaDB database per service (created on the server
at `mariadb_url`, dropped afterwards); their figures go under the keys `sqlite` and `mariadb`
beside the shared `raw_broker` (the broker does not use the databases). With `database="sqlite"`
(the default) they stay at the top level, as before.

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

from ..platform_harness import Platform, create_mariadb_database
from .at_rate import bench_clicks_at_rate, bench_postbacks_at_rate
from .end_to_end import add_recorded_latencies, bench_end_to_end
from .loadgen import setup_references
from .measure import machine_facts, say
from .raw_broker import bench_raw_broker
from .replay import bench_replay


# The platform the bench measures: keys required (as in production), and the per-minute rate
# limits and the per-caller velocity rule set above what the bench offers, so they do not cap it
# (they are a policy for real callers, not part of the hot path's cost: the counters still run).
BENCH_PLATFORM_ENV = {
    "ALPES_AUTH": "required",
    "ALPES_RATE_LIMIT_POSTBACKS_PER_KEY": "100000000",
    "ALPES_RATE_LIMIT_POSTBACKS_PER_IP": "100000000",
    "ALPES_RATE_LIMIT_CLICKS_PER_IP": "100000000",
    "ALPES_MAX_CONVERSIONS_PER_CALLER": "100000000",
}


DATABASES = ("sqlite", "mariadb", "both")
DEFAULT_MARIADB_URL = "mysql+pymysql://alpes:alpes@127.0.0.1:3306"


def run_bench(conversions: int, rate: int, raw_messages: int, data_dir: Path | None, *,
              postback_rate: float = 500, postback_seconds: float = 30,
              click_rate: float = 1000, click_seconds: float = 30, replay_events: int = 1_000_000,
              database: str = "sqlite", mariadb_url: str | None = None) -> str:
    """Run every measurement; return them as pretty-printed JSON."""
    if database not in DATABASES:
        raise ValueError(f"database must be one of {', '.join(DATABASES)}, not {database!r}")
    mariadb_url = mariadb_url or os.environ.get("ALPES_TEST_MARIADB_URL") or DEFAULT_MARIADB_URL
    own_dir = data_dir is None
    root = Path(tempfile.mkdtemp(prefix="alpes-bench-")) if own_dir else Path(data_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    backends = ["sqlite", "mariadb"] if database == "both" else [database]
    report: dict = {"machine": machine_facts(),
                    "parameters": {"conversions": conversions, "rate": rate, "raw_messages": raw_messages,
                                   "postback_rate_per_s": postback_rate, "postback_seconds": postback_seconds,
                                   "click_rate_per_s": click_rate, "click_seconds": click_seconds,
                                   "replay_events": replay_events, "database": database,
                                   "mariadb_url": _without_password(mariadb_url) if "mariadb" in backends else None,
                                   "platform_env": BENCH_PLATFORM_ENV,
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
        for backend in backends:
            # One database: its figures at the top level (as before); both: under its name.
            section = report if database == "sqlite" else report.setdefault(backend, {})
            server = mariadb_url if backend == "mariadb" else None
            wants_platform = conversions > 0 or (postback_rate > 0 and postback_seconds > 0) \
                or (click_rate > 0 and click_seconds > 0)
            if wants_platform:
                failed = _bench_platform(section, report.get("raw_broker", {}), root / f"platform-{backend}",
                                         conversions, rate, postback_rate, postback_seconds, click_rate,
                                         click_seconds, server) or failed
            if replay_events > 0:
                failed = _bench_replay(section, root / f"replay-{backend}", replay_events, server) or failed
    finally:
        report["total_seconds"] = round(time.perf_counter() - started, 2)
        for section in (report, report.get("sqlite"), report.get("mariadb")):
            if isinstance(section, dict) and isinstance(section.get("end_to_end"), dict):
                section["end_to_end"].pop("_sends", None)  # interrupted before the audit log was read
        # Other work on this machine skews every number: say how busy it was.
        report["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()] \
            if hasattr(os, "getloadavg") else None
        if own_dir and not failed:
            shutil.rmtree(root, ignore_errors=True)
        elif own_dir:
            say(f"scratch files kept for inspection: {root}")
    return json.dumps(report, indent=2)


def _without_password(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def _bench_replay(section: dict, data_dir: Path, events: int, mariadb_server: str | None) -> bool:
    """The replay part on a scratch conversiones database: a file in `data_dir`, or a fresh
    database on `mariadb_server` (dropped afterwards). Returns whether it failed."""
    data_dir.mkdir(parents=True, exist_ok=True)
    drop = None
    try:
        if mariadb_server:
            url, drop = create_mariadb_database(mariadb_server, "alpes_bench_replay")
        else:
            url = f"sqlite:///{data_dir / 'conversiones.db'}"
        section["replay"] = bench_replay(events, url, data_dir)
    except Exception as error:  # report it; the other parts still count
        section["replay"] = {"error": f"{type(error).__name__}: {error}"}
        say(f"replay: FAILED: {error}")
    finally:
        if drop is not None:
            drop()
    if "error" not in section["replay"]:
        r = section["replay"]
        say(f"replay: {r['events']:,} events in {r['seconds']} s ({r['events_per_s']:,} events/s)")
    return "error" in section["replay"]


def _bench_platform(report: dict, raw_broker: dict, data_dir: Path, conversions: int, rate: int,
                    postback_rate: float, postback_seconds: float, click_rate: float, click_seconds: float,
                    mariadb_server: str | None = None) -> bool:
    """One scratch `alpes up` for the platform's measurements: the end-to-end run first (on
    quiet queues), then clicks, then postbacks at their rates. `mariadb_server`: one scratch
    database per service on it instead of SQLite files. Returns whether anything failed."""
    # Its own session, so a Ctrl-C on the bench reaches the bench, which stops the platform itself.
    databases = "mariadb" if mariadb_server else "sqlite"
    platform_ = Platform(data_dir, env=BENCH_PLATFORM_ENV, scratch=True, own_session=True, databases=databases,
                         mariadb_server=mariadb_server)
    failed = False
    e2e: dict | None = None
    try:
        try:
            step = time.perf_counter()
            say(f"platform: starting it in {data_dir} ({databases})")
            report["platform"] = {"start_seconds": round(platform_.start(timeout=180).start_seconds, 2),
                                  "databases": databases, "broker": "embedded"}
            say(f"platform: healthy ({platform_.urls}); creating a brand, its key, an affiliate, a campaign, a link")
            setup = setup_references(platform_)
            report["platform"]["setup"] = {k: v for k, v in setup.items() if not k.endswith("_headers")}
            report["platform"]["setup_seconds"] = round(time.perf_counter() - step, 2)
            if conversions > 0:
                step = time.perf_counter()
                e2e = report["end_to_end"] = bench_end_to_end(platform_, setup, conversions, rate)
                failed = failed or "error" in e2e
                audited_per_s = e2e.get("end_to_end", {}).get("audited_per_s")
                raw = raw_broker.get("overall_msg_per_s")
                e2e["audited_per_s"] = audited_per_s
                # The yardstick: conversions audited per second over raw broker messages per second
                # in the same run (~10% is the ceiling: a conversion costs ~3 produced, ~10 delivered messages).
                e2e["e2e_over_raw"] = round(audited_per_s / raw, 4) if audited_per_s and raw else None
                e2e["wall_seconds"] = round(time.perf_counter() - step, 2)
            if click_rate > 0 and click_seconds > 0:
                report["clicks_at_rate"] = bench_clicks_at_rate(platform_, setup, click_rate, click_seconds)
            if postback_rate > 0 and postback_seconds > 0:
                report["postbacks_at_rate"] = bench_postbacks_at_rate(platform_, setup, postback_rate, postback_seconds)
        except Exception as error:  # report the failure in the JSON; the platform is stopped below
            failed = True
            report.setdefault("platform", {})["error"] = f"{type(error).__name__}: {error}"
            say(f"platform: FAILED: {error}")
        finally:
            say("platform: stopping it (SIGINT)")
            code = platform_.stop()
            report.setdefault("platform", {})["stop"] = {"returncode": code} if platform_.stop_seconds is None else {
                "returncode": code, "seconds": round(platform_.stop_seconds, 2)}
            say(f"platform: stopped: {report['platform']['stop']}")
        if e2e is not None:
            add_recorded_latencies(e2e, platform_.db_url("auditoria"))
    finally:
        platform_.close()  # drops its MariaDB databases (after the audit log was read); stopped already
    return failed
