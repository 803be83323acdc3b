"""The end-to-end measurement: postbacks over HTTP to a scratch `alpes up`, timed until each
conversion's commission is in the audit log."""

from __future__ import annotations

import json
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import httpx
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import NullPool

from ..platform_harness import Platform
from .loadgen import AUDIT_POLL_SECONDS, HTTP_WORKERS, AuditWatcher, Sent, send_postbacks
from .measure import CpuMeter, latency_summary_ms, per_second, say

AUDIT_DEADLINE_SECONDS = 600.0  # after the last postback: generous, then report what arrived
AUDIT_STALL_SECONDS = 120.0  # no new commission for this long: the pipeline is stuck, stop waiting


def _audit_times(auditoria_db_url: str) -> dict[str, tuple[float, float]]:
    """conversion_id -> (occurred_at, recorded_at) of its ComisionCalculada audit record, as
    epoch seconds, read from auditoria's database (its SQLite file, or its MariaDB database)
    after the run.

    occurred_at is when marketing calculated the commission (the event's own time);
    recorded_at is set by the audit consumer inside the transaction that appends the record,
    so it is a slightly early bound of when the record became visible. Same machine, same
    clock as the bench's send times.
    """
    url = make_url(auditoria_db_url)
    if url.get_backend_name() == "sqlite" and not Path(url.database or "").exists():
        return {}
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as connection:
            rows = connection.execute(text("SELECT payload_json, occurred_at, recorded_at FROM audit_log "
                                           "WHERE event_type = 'ComisionCalculada'")).all()
    finally:
        engine.dispose()

    def epoch(value) -> float:  # stored naive, in UTC (kernel.db.UtcDateTime)
        return datetime.fromisoformat(str(value)).replace(tzinfo=timezone.utc).timestamp()

    found = {}
    for payload_json, occurred_at, recorded_at in rows:
        conversion_id = json.loads(payload_json).get("conversion_id")
        if conversion_id:
            found[conversion_id] = (epoch(occurred_at), epoch(recorded_at))
    return found


def bench_end_to_end(platform_: Platform, setup: dict, conversions: int, rate: int) -> dict:
    """Postbacks as fast as the service answers (or paced at `rate`), each timed until its
    commission is in the audit log, on a started platform whose references `setup` made. The
    audit file's timings are added by `add_recorded_latencies` once the platform is stopped."""
    watcher: AuditWatcher | None = None
    result: dict = {
        "method": {
            "postbacks": f"POST /conversiones over HTTP on {HTTP_WORKERS} keep-alive connections (one asyncio "
                         "loop), one order_id each, with the brand's key, "
                         + (f"paced open-loop at {rate}/s" if rate > 0 else "as fast as the service answers"),
            "latency": ("end-to-end latency = moment the conversion's ComisionCalculada record was first seen by "
                        f"polling GET /auditoria/eventos every {int(AUDIT_POLL_SECONDS * 1000)} ms minus the moment "
                        "its postback was sent (an upper bound: it includes up to one poll interval plus one "
                        "request); latency_by_recorded_at uses the audit record's recorded_at column read from "
                        "auditoria's SQLite file after the run (set inside the appending transaction, so a "
                        "slightly early bound); stages_ms splits that at the commission's occurred_at "
                        "(marketing's clock, same machine)"),
            "throughput": "commissions audited / (last one seen - first postback sent)",
            "cpu": "utime+stime from /proc/<pid>/stat of each process of `alpes up`, from the first postback "
                   "to the last commission audited, per 1,000 conversions audited",
        },
    }
    sends: list[Sent] = []
    try:
        watcher = AuditWatcher(platform_.urls["auditoria"], after_seq=setup["audit_seq_before_run"],
                               headers=setup["operator_headers"])
        watcher.start()
        say(f"e2e: sending {conversions} postbacks" + (f" at {rate}/s" if rate > 0 else ""))
        meter = CpuMeter(platform_pids(platform_)).start()
        generator_cpu = time.process_time()  # this process: the sending threads and the audit watcher
        sends = send_postbacks(platform_.urls["conversiones"], setup["affiliate_id"], setup["campaign_id"],
                               conversions, rate, uuid.uuid4().hex[:8], headers=setup["brand_headers"])
        accepted = [s for s in sends if s.conversion_id]
        # A rejected conversion earns no commission; a detected (pending) one may still validate.
        wanted = {s.conversion_id for s in accepted if s.conversion_status != "rejected"}
        last_answer = max((s.answered_at for s in sends), default=time.perf_counter())

        deadline = time.perf_counter() + AUDIT_DEADLINE_SECONDS
        last_report = 0.0
        while True:
            arrived = len(wanted & watcher.first_seen.keys())
            now = time.perf_counter()
            if arrived >= len(wanted):
                break
            if now > deadline:
                result["waiting_stopped"] = f"deadline of {AUDIT_DEADLINE_SECONDS:.0f}s after the last postback"
                break
            if now - max(watcher.last_new_at, last_answer) > AUDIT_STALL_SECONDS:
                result["waiting_stopped"] = f"no new commission audited for {AUDIT_STALL_SECONDS:.0f}s"
                break
            if now - last_report > 5:
                say(f"e2e: {arrived}/{len(wanted)} commissions audited")
                last_report = now
            time.sleep(0.1)
        meter.stop()
        generator_cpu = time.process_time() - generator_cpu
        watcher.stop()
        say(f"e2e: {len(wanted & watcher.first_seen.keys())}/{len(wanted)} commissions audited")

        # Cross-check with the service that computes commissions (not needed for the numbers).
        try:
            listed = httpx.get(f"{platform_.urls['marketing']}/comisiones", headers=setup["operator_headers"],
                               params={"campana_id": setup["campaign_id"], "limit": 10000}, timeout=60).json()
            commissions_in_marketing = len([c for c in listed["comisiones"] if c["conversion_id"] in wanted])
        except (httpx.HTTPError, ValueError, KeyError):
            commissions_in_marketing = None

        first_send = min((s.send_at for s in sends), default=0.0)
        audited = [(s, watcher.first_seen[s.conversion_id]) for s in accepted if s.conversion_id in watcher.first_seen]
        last_audited = max((t for _, t in audited), default=0.0)
        statuses: dict[str, int] = {}
        for s in sends:
            key = s.conversion_status or (f"http_{s.status_code}" if s.status_code else "transport_error")
            statuses[key] = statuses.get(key, 0) + 1
        errors = [s.error for s in sends if s.error][:5]

        result["counts"] = {
            "postbacks_sent": len(sends),
            "postbacks_accepted": len(accepted),
            "distinct_conversion_ids": len(wanted),
            "postback_answers": statuses,
            "commissions_audited": len(audited),
            "commissions_in_marketing": commissions_in_marketing,
            "commissions_missing": len(wanted) - len(audited),
        }
        if errors:
            result["postback_error_samples"] = errors
        http_seconds = last_answer - first_send
        send_span = max((s.send_at for s in sends), default=0.0) - first_send
        result["http"] = {
            "target_rate_per_s": rate or None,
            # Below the target when the service cannot keep up: 32 workers all wait on answers.
            "achieved_send_rate_per_s": per_second(len(sends) - 1, send_span),
            "seconds_first_send_to_last_answer": round(http_seconds, 3),
            "accepted_per_s": per_second(len(accepted), http_seconds),
            "latency_ms": latency_summary_ms([s.answered_at - s.send_at for s in sends if s.answered_at]),
        }
        e2e_seconds = last_audited - first_send if audited else 0.0
        result["end_to_end"] = {
            "seconds_first_send_to_last_audited": round(e2e_seconds, 3),
            "audited_per_s": per_second(len(audited), e2e_seconds),
            "drain_seconds_after_last_answer": round(last_audited - last_answer, 3) if audited else None,
            "latency_ms": latency_summary_ms([seen - s.send_at for s, seen in audited]),
        }
        result["audit_polling"] = {
            "polls": watcher.polls, "errors": watcher.errors,
            "mean_poll_request_ms": round(1000 * watcher.poll_seconds / watcher.polls, 1) if watcher.polls else None,
        }
        # The load's own cost, on the same cores: the machine's share it took from the platform.
        result["generator"] = {
            "cpu_seconds": round(generator_cpu, 2),
            "cpu_share_of_one_core": round(generator_cpu / e2e_seconds, 3) if e2e_seconds else None,
            "what": f"this process from the first postback to the last commission audited: the client of {HTTP_WORKERS} "
                    "connections and the audit watcher",
        }
        result["cpu_seconds"] = meter.spent
        result["cpu_seconds_per_1000_conversions"] = meter.per_thousand(len(audited))
    except Exception as error:  # report the failure in the JSON; the caller stops the platform
        result["error"] = f"{type(error).__name__}: {error}"
        say(f"e2e: FAILED: {error}")
        sends = []
    finally:
        if watcher is not None:
            watcher.stop()
    result["_sends"] = sends  # for add_recorded_latencies, after the stop; not reported
    return result


def add_recorded_latencies(result: dict, auditoria_db_url: str) -> None:
    """After the stop: the audit database is quiet (and, on SQLite, fully checkpointed)."""
    sends = result.pop("_sends", [])
    if sends and "end_to_end" in result:
        try:
            times = _audit_times(auditoria_db_url)
            pairs = [(s.send_wall, *times[s.conversion_id]) for s in sends
                     if s.conversion_id and s.conversion_id in times]
            result["end_to_end"]["latency_by_recorded_at_ms"] = latency_summary_ms(
                [recorded - sent for sent, _, recorded in pairs])
            # Where the time goes: up to the commission (conversiones, broker, marketing), then
            # from the commission to its audit record (relay, broker, auditoria).
            result["end_to_end"]["stages_ms"] = {
                "postback_sent_to_commission_calculated": latency_summary_ms(
                    [occurred - sent for sent, occurred, _ in pairs]),
                "commission_calculated_to_audit_recorded": latency_summary_ms(
                    [recorded - occurred for _, occurred, recorded in pairs]),
            }
        except (SQLAlchemyError, ValueError) as error:
            result["end_to_end"]["latency_by_recorded_at_ms"] = {"error": str(error)}


def platform_pids(platform_: Platform) -> dict[str, int]:
    """Every process of the running `alpes up`: the supervisor, the broker, each service instance."""
    state = platform_.state()
    pids = {"supervisor": platform_.process.pid} if platform_.process is not None else {}
    if state.get("broker_pid"):
        pids["broker"] = state["broker_pid"]
    for name, instance in state["services"].items():
        pids[name] = instance["pid"]
    return pids
