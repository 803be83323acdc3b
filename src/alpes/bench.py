"""`alpes bench`: measure this machine, honestly, in one run.

Two measurements, each on scratch infrastructure so a running platform is never touched:

1. raw broker — a scratch embedded pulsar-lite broker with one 6-partition topic. Avro
   `ConversionDetected` events are encoded and produced the way the outbox relay does it
   (Key_Shared-friendly key-based batching, block when the queue is full), then consumed
   with a Failover consumer (the services' default), decoded with fastavro and acknowledged one by one, the way
   every service consumer does it. Produce and consume are separate phases, so each rate
   is the rate of that side alone.
2. end to end — `alpes up` on free ports and a scratch data directory; conversion
   postbacks over HTTP, and the time until each one's `ComisionCalculada` shows up in
   the audit log (conversiones → broker → marketing → broker → auditoria).

Everything in the returned JSON is measured during the run; nothing is assumed. Progress
goes to stderr so stdout stays one JSON document.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import Decimal
from importlib import metadata
from pathlib import Path

import httpx

from .contract import SERVICES

RAW_TOPIC_PARTITIONS = 6  # the partition count of conversiones.eventos in the contract
HTTP_WORKERS = 32
AUDIT_POLL_SECONDS = 0.05
AUDIT_DEADLINE_SECONDS = 600.0  # after the last postback: generous, then report what arrived
AUDIT_STALL_SECONDS = 120.0  # no new commission for this long: the pipeline is stuck, stop waiting

def _say(message: str) -> None:
    """Progress, on stderr only (stdout carries the JSON)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def percentile(sorted_values: list[float], p: float) -> float | None:
    """Nearest-rank percentile of an already sorted list (no interpolation: a real sample)."""
    if not sorted_values:
        return None
    rank = max(1, min(len(sorted_values), int(-(-p * len(sorted_values) // 100))))
    return sorted_values[rank - 1]


def latency_summary_ms(seconds: list[float]) -> dict:
    values = sorted(s * 1000.0 for s in seconds)
    if not values:
        return {"count": 0}
    return {"count": len(values), "min": round(values[0], 1), "p50": round(percentile(values, 50), 1),
            "p95": round(percentile(values, 95), 1), "p99": round(percentile(values, 99), 1),
            "max": round(values[-1], 1), "mean": round(sum(values) / len(values), 1)}


def _rate(count: int, seconds: float) -> float | None:
    return round(count / seconds, 1) if seconds > 0 else None


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def machine_facts() -> dict:
    memory_kb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_kb = int(line.split()[1])
    except OSError:
        pass
    return {
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_mb": memory_kb // 1024 if memory_kb else None,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "pulsar_client": _version("pulsar-client"),
        "pulsar_lite": _version("pulsar-lite"),
        "fastavro": _version("fastavro"),
    }


# -- 1. raw broker ------------------------------------------------------------------------------
def _conversion_payload(conversion_id: str) -> dict:
    return {"conversion_id": conversion_id, "affiliate_id": "bench-affiliate", "campaign_id": "bench-campaign",
            "user_id": "bench-user", "conversion_value": Decimal("123.45"), "conversion_type": "sale",
            "order_id": f"order-{conversion_id}", "currency": "EUR", "timestamp": datetime.now(timezone.utc)}


def bench_raw_broker(messages: int, work_dir: Path) -> dict:
    import pulsar

    from .kernel import embedded_broker
    from .kernel.codec import SchemaRegistry
    from .kernel.messages import properties_of

    registry = SchemaRegistry.from_directory()
    port = embedded_broker.free_port()
    _say(f"raw: starting a scratch broker on 127.0.0.1:{port} ({RAW_TOPIC_PARTITIONS} partitions by default)")
    process = embedded_broker.start_broker_process(work_dir, port, default_partitions=RAW_TOPIC_PARTITIONS,
                                                   log_name="bench-broker.log")
    client = None
    try:
        client = pulsar.Client(f"pulsar://127.0.0.1:{port}", operation_timeout_seconds=30,
                               logger=pulsar.ConsoleLogger(pulsar.LoggerLevel.Error))
        topic = "persistent://public/default/bench.raw"
        subscription = "bench-consumer"

        def subscribe():
            # The same consumer settings as kernel/broker.py's service consumers.
            return client.subscribe(
                topic, subscription, consumer_type=pulsar.ConsumerType.Failover,
                initial_position=pulsar.InitialPosition.Earliest, receiver_queue_size=1000,
                batch_receive_policy=pulsar.ConsumerBatchReceivePolicy(200, 4 * 1024 * 1024, 20))

        # A durable subscription first, closed again: everything produced waits for it, and
        # the consume phase below measures consuming alone, not consuming while producing.
        subscribe().close()
        partitions = len(client.get_topic_partitions(topic))

        # The same producer settings as the outbox relay (kernel/broker.py).
        producer = client.create_producer(
            topic, block_if_queue_full=True, batching_enabled=True,
            batching_type=pulsar.BatchingType.KeyBased, batching_max_publish_delay_ms=2,
            send_timeout_millis=30000, compression_type=pulsar.CompressionType.LZ4)

        acked = [0]
        failed: list[str] = []
        all_acked = threading.Event()
        lock = threading.Lock()

        def receipt(result, _message_id) -> None:
            with lock:
                if result == pulsar.Result.Ok:
                    acked[0] += 1
                else:
                    failed.append(str(result))
                if acked[0] + len(failed) == messages:
                    all_acked.set()

        ids = [str(uuid.uuid4()) for _ in range(messages)]
        payload_bytes = 0
        _say(f"raw: producing {messages} Avro ConversionDetected messages")
        produce_start = time.perf_counter()
        for conversion_id in ids:
            # Encoding is inside the timed loop: the relay pays it too (well, the writer does).
            data, version = registry.encode("ConversionDetected", _conversion_payload(conversion_id))
            payload_bytes += len(data)
            now = datetime.now(timezone.utc)
            producer.send_async(
                data, receipt,
                properties=properties_of(str(uuid.uuid4()), "ConversionDetected", version, now,
                                         conversion_id, conversion_id, "bench"),
                partition_key=conversion_id,  # one key per conversion, as the aggregate id is
                event_timestamp=int(now.timestamp() * 1000))
        producer.flush()
        if messages:
            all_acked.wait(120)
        produce_end = time.perf_counter()
        producer.close()
        produce_seconds = produce_end - produce_start
        _say(f"raw: produced {acked[0]} in {produce_seconds:.2f}s; consuming")

        consumer = subscribe()
        wanted = set(ids)
        seen: set[str] = set()
        duplicates = 0
        undecodable = 0
        by_partition: dict[str, int] = {}
        consume_start = time.perf_counter()
        last_progress = consume_start
        while len(seen) < len(wanted) and time.perf_counter() - last_progress < 30:
            batch = consumer.batch_receive()
            if not batch:
                continue
            last_progress = time.perf_counter()
            for message in batch:
                properties = message.properties()
                try:
                    record = registry.decode(properties["event_type"], message.data(),
                                             int(properties["schema_version"]))
                    conversion_id = record["conversion_id"]
                except Exception:
                    undecodable += 1
                    consumer.acknowledge(message)
                    continue
                if conversion_id in seen:
                    duplicates += 1
                else:
                    seen.add(conversion_id)
                name = message.topic_name()
                partition = name.rsplit("-partition-", 1)[1] if "-partition-" in name else name
                by_partition[partition] = by_partition.get(partition, 0) + 1
                consumer.acknowledge(message)
        consume_end = time.perf_counter()
        consumer.close()
        consume_seconds = consume_end - consume_start
        overall_seconds = consume_end - produce_start
        _say(f"raw: consumed {len(seen)} in {consume_seconds:.2f}s")
        return {
            "method": ("one scratch pulsar-lite broker; produce phase (Avro encode + send_async, key-based "
                       "batching, LZ4, block_if_queue_full, until every receipt) then consume phase (Failover "
                       "batch_receive, fastavro decode, individual acknowledge) on a subscription created "
                       "before producing"),
            "topic_partitions": partitions,
            "partitions_used": len(by_partition),
            "messages_per_partition": dict(sorted(by_partition.items(), key=lambda kv: int(kv[0])
                                                  if kv[0].isdigit() else 0)),
            "distinct_keys": len(ids),
            "avg_payload_bytes": round(payload_bytes / messages, 1) if messages else None,
            "messages_requested": messages,
            "produced_acked": acked[0],
            "produce_failures": len(failed),
            "consumed_unique": len(seen),
            "consumed_duplicates": duplicates,
            "undecodable": undecodable,
            "missing": len(wanted - seen),
            "produce_seconds": round(produce_seconds, 3),
            "produce_msg_per_s": _rate(acked[0], produce_seconds),
            "consume_seconds": round(consume_seconds, 3),
            "consume_msg_per_s": _rate(len(seen), consume_seconds),
            "overall_seconds": round(overall_seconds, 3),
            "overall_msg_per_s": _rate(len(seen), overall_seconds),
        }
    finally:
        if client is not None:
            client.close()
        embedded_broker.stop_process(process)
        _say("raw: scratch broker stopped")


# -- 2. end to end ------------------------------------------------------------------------------
class BenchError(RuntimeError):
    pass


@dataclass
class Platform:
    """`alpes up` as a child process on free ports in a scratch data directory."""

    data_dir: Path
    process: subprocess.Popen | None = None
    urls: dict[str, str] = field(default_factory=dict)
    broker_port: int = 0

    def start(self, timeout: float = 180.0) -> float:
        from .kernel.embedded_broker import listen_port

        env = dict(os.environ)
        # A scratch platform: embedded broker and SQLite files in the scratch directory, even
        # when this shell is configured for a real cluster or real databases.
        for key in [k for k in env if k.startswith("ALPES_") and (k.endswith("_DB_URL") or k in (
                "ALPES_BROKER_URL", "ALPES_PULSAR_ADMIN_URL", "ALPES_DATA_DIR", "ALPES_HOST"))]:
            env.pop(key)
        self.broker_port = listen_port()
        env["ALPES_BROKER_PORT"] = str(self.broker_port)
        for name in SERVICES:
            port = listen_port()
            env[f"ALPES_{name.upper()}_PORT"] = str(port)
            self.urls[name] = f"http://127.0.0.1:{port}"
        env["PYTHONUNBUFFERED"] = "1"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.data_dir / "bench-platform.log", "ab")
        started = time.perf_counter()
        # Its own session: a Ctrl-C on the bench reaches us, and we stop the platform ourselves.
        self.process = subprocess.Popen([sys.executable, "-m", "alpes", "up", "--data-dir", str(self.data_dir)],
                                        env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        start_new_session=True)
        log.close()
        state = self.data_dir / "state.json"
        deadline = time.monotonic() + timeout
        while not state.exists():
            if self.process.poll() is not None:
                raise BenchError(f"`alpes up` exited with {self.process.returncode}; see {self.log_path}")
            if time.monotonic() > deadline:
                raise BenchError(f"no state.json after {timeout}s; see {self.log_path}")
            time.sleep(0.2)
        waiting = set(self.urls)
        while waiting:
            for name in list(waiting):
                try:
                    if httpx.get(f"{self.urls[name]}/health", timeout=2).status_code == 200:
                        waiting.discard(name)
                except httpx.HTTPError:
                    pass
            if waiting and time.monotonic() > deadline:
                raise BenchError(f"not healthy after {timeout}s: {sorted(waiting)}")
            if waiting:
                time.sleep(0.2)
        return time.perf_counter() - started

    @property
    def log_path(self) -> Path:
        return self.data_dir / "bench-platform.log"

    def stop(self) -> dict:
        if self.process is None or self.process.poll() is not None:
            return {"returncode": None if self.process is None else self.process.returncode}
        started = time.perf_counter()
        self.process.send_signal(signal.SIGINT)  # what Ctrl-C does: the supervisor stops all
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return {"returncode": self.process.returncode, "seconds": round(time.perf_counter() - started, 2)}


def _wait_for(what: str, check, timeout: float, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class AuditWatcher:
    """Polls the audit log for ComisionCalculada records and notes when each was first seen.

    The audit API does not expose when a record was written, so arrival is observed: a
    record committed between two polls is stamped with the end of the second poll. The
    error is at most one poll interval plus one request.
    """

    def __init__(self, auditoria_url: str, after_seq: int = 0) -> None:
        self.url = f"{auditoria_url}/auditoria/eventos"
        self.after_seq = after_seq
        self.first_seen: dict[str, float] = {}  # conversion_id -> perf_counter
        self.polls = 0
        self.poll_seconds = 0.0
        self.errors = 0
        self.last_new_at = time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="audit-watcher", daemon=True)
        self._client = httpx.Client(timeout=30)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:  # idempotent: also called from the clean-up path
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(30)
        if not self._client.is_closed:
            self._client.close()

    def poll_once(self) -> int:
        """One page; returns how many records it held."""
        started = time.perf_counter()
        response = self._client.get(self.url, params={"event_type": "ComisionCalculada",
                                                      "after_seq": self.after_seq, "limit": 10000})
        response.raise_for_status()
        records = response.json()["eventos"]
        seen_at = time.perf_counter()
        self.polls += 1
        self.poll_seconds += seen_at - started
        for record in records:
            conversion_id = record["payload"].get("conversion_id")
            if conversion_id and conversion_id not in self.first_seen:
                self.first_seen[conversion_id] = seen_at
                self.last_new_at = seen_at
            self.after_seq = max(self.after_seq, record["seq"])
        return len(records)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                full = self.poll_once() >= 10000
            except (httpx.HTTPError, ValueError, KeyError):
                self.errors += 1
                full = False
            if not full:  # a full page means more is waiting: fetch it at once
                self._stop.wait(AUDIT_POLL_SECONDS)


@dataclass
class Sent:
    order_id: str
    send_at: float = 0.0  # perf_counter when the request started
    send_wall: float = 0.0  # time.time() at the same moment, to compare with server timestamps
    answered_at: float = 0.0
    status_code: int | None = None
    conversion_id: str | None = None
    conversion_status: str | None = None
    error: str | None = None


def _setup_references(platform_: Platform) -> dict:
    """One validated affiliate, one campaign, and proof that conversiones knows both."""
    urls = platform_.urls
    facts: dict = {}
    with httpx.Client(timeout=30) as http:
        started = time.perf_counter()
        response = http.post(f"{urls['afiliados']}/afiliados", json={
            "user_id": f"bench-{uuid.uuid4().hex[:8]}", "email": f"bench-{uuid.uuid4().hex[:8]}@example.com",
            "nombre": "Bench Partner"})
        if response.status_code != 201:
            raise BenchError(f"POST /afiliados answered {response.status_code}: {response.text}")
        affiliate_id = response.json()["id"]

        def validated():
            estado = http.get(f"{urls['afiliados']}/afiliados/{affiliate_id}").json().get("estado")
            if estado == "rechazado":
                raise BenchError("the bench affiliate was rejected")
            return estado == "validado"

        _wait_for("the affiliate to be validated", validated, 60)
        facts["affiliate_validated_after_s"] = round(time.perf_counter() - started, 2)

        response = http.post(f"{urls['marketing']}/campanas", json={"nombre": "Bench", "porcentaje_comision": "10"})
        if response.status_code != 201:
            raise BenchError(f"POST /campanas answered {response.status_code}: {response.text}")
        campaign_id = response.json()["id"]

        # conversiones learns of both through the broker; a postback validates at once only
        # when it has. Every try is a real conversion with its own order id.
        started = time.perf_counter()
        tries = [0]

        def conversion_validates():
            tries[0] += 1
            answer = http.post(f"{urls['conversiones']}/conversiones", json={
                "affiliate_id": affiliate_id, "campaign_id": campaign_id, "user_id": "bench-warmup",
                "conversion_value": "100.00", "conversion_type": "sale", "order_id": f"warmup-{tries[0]}"})
            if answer.status_code != 200:
                raise BenchError(f"warm-up POST /conversiones answered {answer.status_code}: {answer.text}")
            body = answer.json()
            return body["id"] if body["status"] == "validated" else None

        warmup_id = _wait_for("a warm-up conversion to validate", conversion_validates, 120, interval=0.5)
        facts["references_known_to_conversiones_after_s"] = round(time.perf_counter() - started, 2)
        facts["warmup_postbacks"] = tries[0]

        # And the whole chain once: its commission reaches the audit log.
        started = time.perf_counter()
        watcher = AuditWatcher(urls["auditoria"])
        try:
            _wait_for("the warm-up commission in the audit log",
                      lambda: watcher.poll_once() >= 0 and warmup_id in watcher.first_seen, 120)
        finally:
            watcher.stop()
        facts["warmup_commission_audited_after_s"] = round(time.perf_counter() - started, 2)
        facts["audit_seq_before_run"] = watcher.after_seq
    facts.update(affiliate_id=affiliate_id, campaign_id=campaign_id)
    return facts


def _send_postbacks(conversiones_url: str, affiliate_id: str, campaign_id: str, count: int, rate: int,
                    run_id: str) -> list[Sent]:
    """`count` postbacks from HTTP_WORKERS threads, paced at `rate`/s when rate > 0."""
    local = threading.local()
    clients: list[httpx.Client] = []
    clients_lock = threading.Lock()

    def client() -> httpx.Client:
        # One connection pool per thread: keep-alive, no contention on a shared pool.
        if not hasattr(local, "http"):
            local.http = httpx.Client(timeout=60)
            with clients_lock:
                clients.append(local.http)
        return local.http

    sends = [Sent(order_id=f"bench-{run_id}-{i}") for i in range(count)]
    start = time.perf_counter() + 0.05

    def send(i: int) -> None:
        item = sends[i]
        if rate > 0:  # open-loop pacing: request i is due at start + i/rate, late ones go at once
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        item.send_wall = time.time()
        item.send_at = time.perf_counter()
        try:
            response = client().post(f"{conversiones_url}/conversiones", json={
                "affiliate_id": affiliate_id, "campaign_id": campaign_id, "user_id": f"user-{i % 997}",
                "conversion_value": f"{10 + i % 90}.{i % 100:02d}", "conversion_type": "sale",
                "order_id": item.order_id})
            item.answered_at = time.perf_counter()
            item.status_code = response.status_code
            if response.status_code == 200:
                body = response.json()
                item.conversion_id = body["id"]
                item.conversion_status = body["status"]
            else:
                item.error = response.text[:200]
        except httpx.HTTPError as error:
            item.answered_at = time.perf_counter()
            item.error = f"{type(error).__name__}: {error}"

    with ThreadPoolExecutor(max_workers=HTTP_WORKERS, thread_name_prefix="postback") as pool:
        futures = [pool.submit(send, i) for i in range(count)]
        for done, future in enumerate(futures, 1):
            future.result()
            if done % max(1, count // 10) == 0:
                _say(f"e2e: {done}/{count} postbacks answered")
    for http in clients:
        http.close()
    return sends


def _audit_times(auditoria_db: Path) -> dict[str, tuple[float, float]]:
    """conversion_id -> (occurred_at, recorded_at) of its ComisionCalculada audit record, as
    epoch seconds, read from auditoria's SQLite file after the run.

    occurred_at is when marketing calculated the commission (the event's own time);
    recorded_at is set by the audit consumer inside the transaction that appends the record,
    so it is a slightly early bound of when the record became visible. Same machine, same
    clock as the bench's send times.
    """
    if not auditoria_db.exists():
        return {}
    connection = sqlite3.connect(str(auditoria_db), timeout=30)
    try:
        rows = connection.execute("SELECT payload_json, occurred_at, recorded_at FROM audit_log "
                                  "WHERE event_type = 'ComisionCalculada'").fetchall()
    finally:
        connection.close()

    def epoch(value) -> float:  # stored naive, in UTC (kernel.db.UtcDateTime)
        return datetime.fromisoformat(str(value)).replace(tzinfo=timezone.utc).timestamp()

    found = {}
    for payload_json, occurred_at, recorded_at in rows:
        conversion_id = json.loads(payload_json).get("conversion_id")
        if conversion_id:
            found[conversion_id] = (epoch(occurred_at), epoch(recorded_at))
    return found


def bench_end_to_end(conversions: int, rate: int, data_dir: Path) -> dict:
    platform_ = Platform(data_dir)
    watcher: AuditWatcher | None = None
    result: dict = {
        "method": {
            "postbacks": f"POST /conversiones over HTTP from {HTTP_WORKERS} threads (keep-alive), one order_id each, "
                         + (f"paced open-loop at {rate}/s" if rate > 0 else "as fast as the service answers"),
            "latency": ("end-to-end latency = moment the conversion's ComisionCalculada record was first seen by "
                        f"polling GET /auditoria/eventos every {int(AUDIT_POLL_SECONDS * 1000)} ms minus the moment "
                        "its postback was sent (an upper bound: it includes up to one poll interval plus one "
                        "request); latency_by_recorded_at uses the audit record's recorded_at column read from "
                        "auditoria's SQLite file after the run (set inside the appending transaction, so a "
                        "slightly early bound); stages_ms splits that at the commission's occurred_at "
                        "(marketing's clock, same machine)"),
            "throughput": "commissions audited / (last one seen - first postback sent)",
            "platform": "`alpes up` (embedded broker, SQLite per service) on free ports in a scratch directory",
        },
    }
    try:
        _say(f"e2e: starting the platform in {data_dir}")
        result["platform_start_seconds"] = round(platform_.start(), 2)
        _say(f"e2e: platform healthy ({platform_.urls}); creating affiliate and campaign")
        setup = _setup_references(platform_)
        result["setup"] = setup

        watcher = AuditWatcher(platform_.urls["auditoria"], after_seq=setup["audit_seq_before_run"])
        watcher.start()
        _say(f"e2e: sending {conversions} postbacks" + (f" at {rate}/s" if rate > 0 else ""))
        sends = _send_postbacks(platform_.urls["conversiones"], setup["affiliate_id"], setup["campaign_id"],
                                   conversions, rate, uuid.uuid4().hex[:8])
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
                _say(f"e2e: {arrived}/{len(wanted)} commissions audited")
                last_report = now
            time.sleep(0.1)
        watcher.stop()
        _say(f"e2e: {len(wanted & watcher.first_seen.keys())}/{len(wanted)} commissions audited")

        # Cross-check with the service that computes commissions (not needed for the numbers).
        try:
            listed = httpx.get(f"{platform_.urls['marketing']}/comisiones",
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
            "achieved_send_rate_per_s": _rate(len(sends) - 1, send_span),
            "seconds_first_send_to_last_answer": round(http_seconds, 3),
            "accepted_per_s": _rate(len(accepted), http_seconds),
            "latency_ms": latency_summary_ms([s.answered_at - s.send_at for s in sends if s.answered_at]),
        }
        e2e_seconds = last_audited - first_send if audited else 0.0
        result["end_to_end"] = {
            "seconds_first_send_to_last_audited": round(e2e_seconds, 3),
            "audited_per_s": _rate(len(audited), e2e_seconds),
            "drain_seconds_after_last_answer": round(last_audited - last_answer, 3) if audited else None,
            "latency_ms": latency_summary_ms([seen - s.send_at for s, seen in audited]),
        }
        result["audit_polling"] = {
            "polls": watcher.polls, "errors": watcher.errors,
            "mean_poll_request_ms": round(1000 * watcher.poll_seconds / watcher.polls, 1) if watcher.polls else None,
        }
    except Exception as error:  # report the failure in the JSON; the platform is stopped below
        result["error"] = f"{type(error).__name__}: {error}"
        _say(f"e2e: FAILED: {error}")
        sends = []
    finally:
        if watcher is not None:
            watcher.stop()
        _say("e2e: stopping the platform (SIGINT)")
        result["platform_stop"] = platform_.stop()
        _say(f"e2e: platform stopped: {result['platform_stop']}")

    # After the stop: the audit database is quiet and fully checkpointed.
    if sends:
        try:
            times = _audit_times(data_dir / "auditoria.db")
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
        except (sqlite3.Error, ValueError) as error:
            result["end_to_end"]["latency_by_recorded_at_ms"] = {"error": str(error)}
    return result


# -- entry point ------------------------------------------------------------------------------
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
            _say(f"scratch files kept for inspection: {root}")
    return json.dumps(report, indent=2)
