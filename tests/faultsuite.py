"""Fault-injection suite: a mixed load of conversions through HTTP while processes are killed,
one service is held down, and poison messages are published on every topic; then every
invariant is checked and printed as a table (expected, observed, ok).

One code path for every size, database and broker: `run_fault_suite(data_dir, conversions=...,
seed=..., databases="sqlite"|"mariadb", broker="embedded"|"pulsar")` (pulsar: a real Apache Pulsar
standalone, `alpes up --broker pulsar`; the suite's own client then uses the admin token). The
chaos plan (what happens, to whom, at which point of the load) comes from a seeded RNG and is
printed, so a run is reproduced with the same `ALPES_FAULT_SEED`.
What the suite records beside the platform's answers (5xx answers, fault windows, refund retries)
and how it reads databases and dead-letter topics is in fault_observations.py; the rows about
them in fault_checks.py.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path

import httpx
from fault_checks import Row, fault_windows, refund_retry_row, saga_rows, server_error_rows, valid_rejected_row
from fault_observations import (Databases, Observer, answers, broker_client, dead_letter_ids, on_real_pulsar, paged,
                                reads, retry)
from harness import Platform, wait_until
from rich.console import Console
from rich.table import Table

from alpes.contract import BUSINESS_TOPICS, SERVICES, SUBSCRIPTIONS, TOPICS
from alpes.kernel.codec import SchemaRegistry

TERMINAL = {"validated", "rejected", "refunded", "compensated"}
HOLDABLE = ("afiliados", "marketing", "auditoria")  # conversiones takes the load: holding it stops the test
# A type each topic really carries: the undecodable poison claims it, so only the bytes are wrong.
TOPIC_TYPE = {"afiliados.eventos": "AfiliadoRegistrado", "conversiones.eventos": "ConversionDetected",
              "marketing.eventos": "CampanaCreada", "comisiones.eventos": "ComisionCalculada",
              "auditoria.eventos": "EventosAuditados", "sistema.eventos": "ServicioIniciado"}
VELOCITY_LIMIT = 5  # ALPES_MAX_CONVERSIONS_PER_IP for this run
BURST = 8  # postbacks from one IP in a velocity burst: the last BURST - VELOCITY_LIMIT are held
# `alpes up --broker pulsar`'s first run resolves Apache Pulsar's jars with Maven (README).
START_TIMEOUT = {"embedded": 120.0, "pulsar": 900.0}


@dataclass
class Conversion:
    """One conversion the load means to create (duplicates resend it)."""

    key: str  # order id, or the Idempotency-Key when there is no order id
    kind: str  # valid, unknown_affiliate, unknown_campaign, self_referral, velocity, probe
    body: dict
    headers: dict = field(default_factory=dict)
    campaign: str = ""
    refund: str | None = None  # "now" (right after acceptance) or "late" (near the end of the load)
    held: bool = False  # expected on hold (the 6th+ postback of a velocity burst)
    ids: list[str] = field(default_factory=list)  # every id the platform answered for this key
    refunded: bool = False
    accepted: threading.Event = field(default_factory=threading.Event)


@dataclass
class Task:
    kind: str  # send, duplicate, burst, refund
    conversions: list[Conversion]


@dataclass
class ChaosEvent:
    at: int  # task index: tasks from here on wait until this event has started
    action: str  # kill, hold, poison, payout
    target: str = ""
    started: threading.Event = field(default_factory=threading.Event)
    started_at: float = 0.0
    done_at: float = 0.0
    note: str = ""


class Stats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: Counter = Counter()
        self.accepted_at: list[float] = []

    def add(self, name: str, n: int = 1) -> None:
        with self.lock:
            self.counts[name] += n


def run_fault_suite(data_dir: Path, *, conversions: int, seed: int, hold_seconds: float = 30.0,
                    hold_service: str | None = None, threads: int = 12, databases: str = "sqlite",
                    broker: str = "embedded", out: Callable[[object], None] = print) -> list[Row]:
    """Run the whole suite; returns the rows (the caller asserts them). `out` prints. `databases`:
    SQLite files, or one fresh MariaDB database per service (dropped at the end). `broker`: the
    embedded pulsar-lite, or "pulsar", a real Apache Pulsar standalone (`alpes up --broker pulsar`),
    whose JVM is the "broker" the chaos plan kills (the supervisor starts it again on the same data)."""
    rng = random.Random(seed)
    hold_service = hold_service or rng.choice(HOLDABLE)
    out(f"fault suite: seed={seed} conversions={conversions} hold={hold_service} for {hold_seconds:g}s "
        f"databases={databases}" + (" broker=Apache Pulsar (alpes up --broker pulsar)" if broker == "pulsar" else "")
        + f" (reproduce: ALPES_FAULT_SEED={seed} ALPES_FAULT_CONVERSIONS={conversions} "
        f"ALPES_FAULT_DATABASES={databases})")
    started = time.monotonic()
    platform = Platform(data_dir, env={
        "ALPES_APPROVAL_INTERVAL_SECONDS": "1", "ALPES_PAYOUT_INTERVAL_SECONDS": "86400",
        "ALPES_PAYOUT_THRESHOLD": "1.00", "ALPES_MAX_CONVERSIONS_PER_IP": str(VELOCITY_LIMIT),
        "ALPES_REFERENCE_GRACE_SECONDS": "2",
        # Closed as in production: every request carries a real key (the operator's for set-up and
        # checks, the brand's for its campaigns, postbacks and refunds). The suite's load is no abuse.
        "ALPES_AUTH": "required", "ALPES_RATE_LIMIT_POSTBACKS_PER_KEY": "100000000",
        "ALPES_RATE_LIMIT_POSTBACKS_PER_IP": "100000000"}, databases=databases, broker=broker)
    observer = Observer(platform)
    observer.attach(platform.http)  # every request the suite makes counts, reads and probes too
    suite = None
    try:
        platform.start(timeout=START_TIMEOUT[broker])
        platform.authenticate(platform.create_key("operator", "--name", "fault suite"))
        observer.watch()
        suite = _Suite(platform, rng, conversions, hold_service, hold_seconds, threads, out, observer)
        suite.seed = seed
        suite.databases = databases
        suite.setup()
        suite.plan()
        suite.load()
        suite.settle()
        try:
            rows = suite.check()
        except Exception:
            _print(out, suite, suite.rows)  # what the drain showed, before the error
            raise
        suite.figures["total_s"] = round(time.monotonic() - started, 1)
        _print(out, suite, rows)
        return rows
    finally:
        observer.stop()
        if suite is not None:
            suite.dbs.dispose()
        platform.close()


class _Suite:
    def __init__(self, platform: Platform, rng: random.Random, n: int, hold_service: str, hold_seconds: float,
                 threads: int, out: Callable[[object], None], observer: Observer) -> None:
        self.p = platform
        self.observer = observer
        self.dbs = Databases(platform, list(SERVICES))  # outboxes read through SQLAlchemy, any backend
        self.rng = rng
        self.n = n
        self.hold_service = hold_service
        self.hold_seconds = hold_seconds
        self.threads = threads
        self.out = out
        self.stats = Stats()
        self.conversions: list[Conversion] = []
        self.tasks: list[Task] = []
        self.chaos: list[ChaosEvent] = []
        self.affiliates: dict[str, str] = {}  # id -> email
        self.campaigns: dict[str, Decimal | None] = {}  # id -> budget
        self.small_campaign = ""
        self.poison: dict[str, list[str]] = {}  # topic -> poison event ids
        self.health_dead_letters: dict[str, tuple[int, str | None]] = {}  # sub@topic -> seen on /health
        self.hold_probe = Counter()
        self.hold_downtime = 0.0
        self.figures: dict[str, object] = {}
        self.registry = SchemaRegistry.from_directory()
        self.broker = platform.broker

    # -- set-up ----------------------------------------------------------------------------------------
    def setup(self) -> None:
        p = self.p
        brand = p.post("marketing", "/anunciantes", {"nombre": "Fault Suite Brand"})
        assert brand.status_code == 201, brand.text
        key = p.post("marketing", "/claves", {"rol": "advertiser", "anunciante_id": brand.json()["id"],
                                               "nombre": "fault suite brand"})
        assert key.status_code == 201, key.text
        p.wait_key_known(key.json()["key"])
        self.brand = {"Authorization": f"Bearer {key.json()['key']}"}
        for i in range(6):
            email = f"partner{i}@example.com"
            response = p.post("afiliados", "/afiliados", {"user_id": f"partner-{i}", "email": email,
                                                         "nombre": f"Partner {i}"})
            assert response.status_code == 201, response.text
            self.affiliates[response.json()["id"]] = email
        for nombre, pct, budget in (("Grande", "10", None), ("Mediana", "7.5", None), ("Pequena", "10", "small")):
            body = {"nombre": nombre, "porcentaje_comision": pct, "periodo_bloqueo_dias": 0}
            if budget:
                # Valid load on this campaign asks ~3x its budget: the budget must end exactly spent.
                share = self.n * 0.78 * 0.25
                body["presupuesto"] = str(max(Decimal("20.00"), Decimal(int(share * 10.5 / 3))).quantize(Decimal("0.01")))
            response = p.http.post(p.url("marketing") + "/campanas", json=body, headers=self.brand)
            assert response.status_code == 201, response.text
            campaign_id = response.json()["id"]
            self.campaigns[campaign_id] = Decimal(body["presupuesto"]) if budget else None
            if budget:
                self.small_campaign = campaign_id
        for affiliate in self.affiliates:
            wait_until(lambda: p.get("afiliados", f"/afiliados/{affiliate}")["estado"] == "validado", 60,
                       what="affiliate validated")
        # Conversiones learns affiliates and campaigns from marketing.eventos: probe each pair with a
        # fresh order id until one validates (an early probe may be rejected as unknown; it still counts).
        for affiliate in self.affiliates:
            for campaign in self.campaigns:
                attempt = [0]

                def probe() -> bool:
                    attempt[0] += 1
                    conversion = Conversion(f"probe-{affiliate[:8]}-{campaign[:8]}-{attempt[0]}", "probe", {
                        "affiliate_id": affiliate, "campaign_id": campaign, "user_id": "probe",
                        "conversion_value": "1.00", "conversion_type": "lead"}, campaign=campaign)
                    conversion.body["order_id"] = conversion.key
                    answer = p.post("conversiones", "/conversiones", conversion.body).json()
                    conversion.ids.append(answer["id"])
                    conversion.accepted.set()
                    self.conversions.append(conversion)
                    return answer["status"] == "validated"
                wait_until(probe, 60, interval=0.5, what="references learned by conversiones")

    # -- the load and the chaos plan ---------------------------------------------------------------------
    def plan(self) -> None:
        rng = self.rng
        affiliates = list(self.affiliates)
        big = [c for c in self.campaigns if c != self.small_campaign]
        fresh: list[Task] = []
        late_refunds: list[Task] = []
        made = 0
        while made < self.n:
            roll = rng.random()
            if roll < 0.012 and self.n - made >= BURST:  # a velocity burst from one IP, sent in order
                ip = f"10.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}"
                campaign, affiliate = rng.choice(big), rng.choice(affiliates)
                burst = [self._conversion("velocity", affiliate, campaign, ip=ip) for _ in range(BURST)]
                for j, conversion in enumerate(burst):
                    conversion.held = j >= VELOCITY_LIMIT
                fresh.append(Task("burst", burst))
                made += BURST
                continue
            if roll < 0.09:
                conversion = self._conversion("unknown_affiliate", f"ghost-{made}", rng.choice(big))
            elif roll < 0.11:
                conversion = self._conversion("unknown_campaign", rng.choice(affiliates), f"ghost-campaign-{made}")
            elif roll < 0.14:
                affiliate = rng.choice(affiliates)
                conversion = self._conversion("self_referral", affiliate, rng.choice(big),
                                              customer_email=self.affiliates[affiliate])
            else:
                campaign = self.small_campaign if rng.random() < 0.25 else rng.choice(big)
                conversion = self._conversion("valid", rng.choice(affiliates), campaign,
                                              customer_email=f"customer{made}@example.org")
                if campaign != self.small_campaign and rng.random() < 0.10:
                    conversion.refund = "now" if rng.random() < 0.5 else "late"
            fresh.append(Task("send", [conversion]))
            made += 1
        # Duplicates: resend ~6% (same order id, or same Idempotency-Key), anywhere after the original
        # (soon after: often while the original is still in flight).
        placed = [(float(i), task) for i, task in enumerate(fresh)]
        for i, task in enumerate(fresh):
            if task.kind == "send" and task.conversions[0].kind == "valid" and rng.random() < 0.06:
                placed.append((rng.uniform(i + 0.01, min(len(fresh), i + rng.choice([2, 50, len(fresh)]))),
                               Task("duplicate", task.conversions)))
        tasks = [task for _, task in sorted(placed, key=lambda x: x[0])]
        late = [c for t in fresh for c in t.conversions if c.refund == "late"]
        late_refunds = [Task("refund", [c]) for c in late]
        self.tasks = tasks + late_refunds
        total = len(self.tasks)
        # Chaos: each service and the broker killed once, one service held, poison, two payout runs,
        # each at a random point of the first 85% of the load.
        actions = [("kill", name) for name in SERVICES] + [("kill", "broker"), ("hold", self.hold_service),
                                                           ("poison", "all topics"), ("payout", "1"), ("payout", "2")]
        points = sorted(rng.sample(range(max(1, total // 20), max(len(actions) + 2, int(total * 0.85))), len(actions)))
        rng.shuffle(actions)
        self.chaos = [ChaosEvent(at, action, target) for at, (action, target) in zip(points, actions)]
        # The load waits at the next chaos point until it starts; leave room after the hold, so that
        # postbacks keep coming while the held service is down.
        gap = max(30, total // 20)
        for before, after in zip(self.chaos, self.chaos[1:]):
            after.at = min(total - 1, max(after.at, before.at + (gap if before.action == "hold" else 1)))
        kinds = Counter(c.kind for c in self.conversions)
        self.out(f"load: {total} tasks, {made} conversions "
                 f"({dict(Counter(c.kind for t in fresh for c in t.conversions))}), "
                 f"{sum(t.kind == 'duplicate' for t in tasks)} duplicates, {len(late)} late refunds, "
                 f"{sum(c.refund == 'now' for t in fresh for c in t.conversions)} immediate refunds; "
                 f"{kinds['probe']} probe conversions before")
        self.out("chaos plan: " + ", ".join(f"{e.action} {e.target} @task {e.at}" for e in self.chaos))

    def _conversion(self, kind: str, affiliate: str, campaign: str, *, ip: str | None = None,
                    customer_email: str | None = None) -> Conversion:
        key = f"ord-{uuid.uuid4().hex[:20]}"
        body = {"affiliate_id": affiliate, "campaign_id": campaign, "user_id": f"cust-{self.rng.randint(1, 10**6)}",
                "conversion_value": f"{self.rng.randint(1000, 20000) / 100:.2f}",
                "conversion_type": self.rng.choice(["sale", "purchase"])}
        conversion = Conversion(key, kind, body, campaign=campaign)
        if self.rng.random() < 0.3:  # the key travels as the Idempotency-Key header instead of order_id
            conversion.headers = {"Idempotency-Key": key}
        else:
            body["order_id"] = key
        if kind == "unknown_campaign":
            # A brand may post only for its own campaigns (403 otherwise); the operator may post for
            # one nobody has heard of, and conversiones rejects it once the grace period is over.
            conversion.headers["Authorization"] = self.p.http.headers["Authorization"]
        if ip:
            body["ip"] = ip
        if customer_email:
            body["customer_email"] = customer_email
        self.conversions.append(conversion)
        return conversion

    def load(self) -> None:
        chaos = threading.Thread(target=self._chaos, name="chaos", daemon=True)
        self.max_started = -1
        self.chaos_error: BaseException | None = None
        self.deadline = time.monotonic() + 900 + self.n / 5
        started = time.monotonic()
        chaos.start()
        local = threading.local()

        def run(index: int) -> None:
            with self.stats.lock:
                self.max_started = max(self.max_started, index)
            for event in self.chaos:  # tasks past a chaos point wait until it has started
                if event.at <= index:
                    while not event.started.wait(0.5):
                        assert time.monotonic() < self.deadline, "chaos never started"
                        if self.chaos_error:
                            return
            if self.chaos_error:  # a fault step failed: the run is over, stop loading
                return
            if not hasattr(local, "http"):
                local.http = self.observer.attach(httpx.Client(timeout=15, headers=self.brand))
            task = self.tasks[index]
            if task.kind == "refund":
                conversion = task.conversions[0]
                while not conversion.accepted.wait(0.5):
                    if self.chaos_error or time.monotonic() > self.deadline:
                        return
                self._refund(local.http, conversion)
                return
            for conversion in task.conversions:
                self._send(local.http, conversion, duplicate=task.kind == "duplicate")
                if task.kind == "send" and conversion.refund == "now":
                    self._refund(local.http, conversion)

        with ThreadPoolExecutor(self.threads) as pool:
            list(pool.map(run, range(len(self.tasks))))
        self.figures["load_s"] = round(time.monotonic() - started, 1)
        chaos.join(600)
        if self.chaos_error:
            raise self.chaos_error
        assert not chaos.is_alive(), "the chaos thread did not finish"
        self.figures["postbacks_per_s"] = round(self.stats.counts["postbacks_ok"] / self.figures["load_s"], 1)

    def _send(self, http: httpx.Client, conversion: Conversion, duplicate: bool) -> None:
        while True:
            assert time.monotonic() < self.deadline, f"postback {conversion.key} never accepted"
            sent_at = time.monotonic()
            try:
                response = http.post(self.p.url("conversiones") + "/conversiones", json=conversion.body,
                                     headers=conversion.headers)
                if response.status_code == 200:
                    answer = response.json()
                    with self.stats.lock:
                        conversion.ids.append(answer["id"])
                        self.stats.counts["postbacks_ok"] += 1
                        self.stats.counts["duplicate_answers" if duplicate else "first_answers"] += 1
                        self.stats.accepted_at.append(time.monotonic())
                    conversion.accepted.set()
                    return
                assert response.status_code >= 500, f"postback refused: {response.status_code} {response.text}"
            except httpx.HTTPError:  # a 5xx is recorded by the observer's hook; this is no answer at all
                self.observer.no_answer("POST", self.p.url("conversiones") + "/conversiones", sent_at)
            self.stats.add("postback_retries")
            time.sleep(0.2)

    def _refund(self, http: httpx.Client, conversion: Conversion) -> None:
        url = self.p.url("conversiones") + f"/conversiones/{conversion.ids[0]}"
        while time.monotonic() < self.deadline:
            sent_at = time.monotonic()
            try:
                response = http.post(url + "/reembolso", json={"tipo": "reembolso", "motivo": "fault suite"})
                if response.status_code == 200 and response.json()["status"] == "refunded":
                    conversion.refunded = True
                    self.stats.add("refunds")
                    return
                cause = str(response.status_code)
                if response.status_code == 409:
                    current = http.get(url)
                    now_status = current.json()["status"] if current.status_code == 200 else current.status_code
                    if now_status == "rejected":
                        self.stats.add("refund_of_rejected_skipped")  # compensated meanwhile: nothing to refund
                        return
                    cause = f"409 while {now_status}"
                elif response.status_code == 200:
                    cause = f"200 but {response.json()['status']}"
            except httpx.HTTPError:
                self.observer.no_answer("POST", url + "/reembolso", sent_at)
                cause = "no answer"
            self.observer.refund_retry(cause, sent_at)  # fault_checks.refund_retry_row judges each
            self.stats.add("refund_retries")
            time.sleep(0.3)
        raise AssertionError(f"refund of {conversion.ids[0]} never accepted")

    # -- chaos ------------------------------------------------------------------------------------------
    def _chaos(self) -> None:
        try:
            for event in self.chaos:
                while self.max_started < event.at:
                    time.sleep(0.05)
                    assert time.monotonic() < self.deadline, "load stalled before a chaos point"
                event.started_at = time.monotonic()
                if event.action != "hold":  # a hold releases the load once the service is down
                    event.started.set()  # the load goes on while the fault happens
                getattr(self, f"_do_{event.action}")(event)
                event.done_at = time.monotonic()
                self.out(f"  chaos: {event.action} {event.target} at task {event.at}: {event.note} "
                         f"({event.done_at - event.started_at:.1f}s)")
        except BaseException as error:
            self.chaos_error = error
            for event in self.chaos:
                event.started.set()

    def _do_kill(self, event: ChaosEvent) -> None:
        pid = self.p.kill(event.target)
        self.p.wait_restarted(event.target, pid, timeout=120)
        event.note = f"SIGKILL pid {pid}, restarted as {self.p.pid(event.target)}"

    def _do_hold(self, event: ChaosEvent) -> None:
        name, p = event.target, self.p
        p.hold(name, self.hold_seconds)
        down_from = wait_until(lambda: not answers(p, name) and time.monotonic(), 60, interval=0.1,
                               what=f"{name} stopped")
        accepted_before = self.stats.counts["postbacks_ok"]
        # The tasks after the hold point start now, so postbacks arrive while the service is down
        # (released earlier, they could all finish before it stops).
        event.started.set()
        others = [s for s in SERVICES if s != name]
        while answers(p, name) is False and time.monotonic() - down_from < self.hold_seconds + 120:
            for other in others:  # the others keep answering, reads and writes
                self.hold_probe["probes"] += 1
                # 10 s: on a loaded machine a read may be slow; what counts is that it answers.
                self.hold_probe["ok"] += reads(p, other)
            self.hold_probe["write_probes"] += 1
            self.hold_probe["writes_ok"] += self._write_probe(name)
            time.sleep(0.5)
        self.hold_downtime = time.monotonic() - down_from
        wait_until(lambda: answers(p, name), 120, what=f"{name} back after its hold")
        self.hold_probe["accepted_during_hold"] = self.stats.counts["postbacks_ok"] - accepted_before
        event.note = (f"down {self.hold_downtime:.1f}s; others answered {self.hold_probe['ok']}/"
                      f"{self.hold_probe['probes']} probes, {self.hold_probe['accepted_during_hold']} postbacks "
                      f"accepted meanwhile")

    def _write_probe(self, held: str) -> bool:
        """A write on a service that does not depend on the held one being up."""
        try:
            if held != "marketing":
                response = self.p.http.post(self.p.url("marketing") + "/pagos", json={"afiliado_id": "nobody"})
            else:
                response = self.p.http.post(self.p.url("afiliados") + "/afiliados", json={
                    "user_id": f"probe-{uuid.uuid4().hex[:8]}", "email": f"{uuid.uuid4().hex[:8]}@example.net",
                    "nombre": "Probe"})
            return response.status_code in (200, 201)
        except httpx.HTTPError:
            return False

    def _do_poison(self, event: ChaosEvent) -> None:
        # On real Apache Pulsar as the admin role, which may produce on every topic; unsigned, so the
        # services refuse it all the same (there they nack it and the client's DeadLetterPolicy stores it).
        client = broker_client(self.p)
        try:
            for topic in TOPICS:
                undecodable = b"\xff" * 12  # a varint that never ends: no Avro reader accepts it
                kinds = ((TOPIC_TYPE[topic], undecodable), ("EventoQueNadieConoce", b"\x02\x00"))
                # A loaded broker may time out a producer's creation: try again, as the relay does.
                producer = retry(lambda: client.create_producer(f"persistent://public/default/{topic}"))
                for event_type, data in kinds:
                    try:  # the premise: our own codec refuses it
                        self.registry.decode(event_type, data, 1)
                        raise AssertionError(f"poison for {topic} decodes")
                    except AssertionError:
                        raise
                    except Exception:
                        pass
                    event_id = str(uuid.uuid4())
                    now = datetime.now(timezone.utc).isoformat()
                    properties = {"event_id": event_id, "event_type": event_type, "schema_version": "1",
                                  "occurred_at": now, "correlation_id": event_id, "causation_id": event_id,
                                  "producer": "fault-suite"}
                    retry(lambda: producer.send(data, properties=properties, partition_key=event_id))
                    self.poison.setdefault(topic, []).append(event_id)
                try:
                    producer.close()
                except Exception:  # stored already; a slow close changes nothing
                    pass
        finally:
            client.close()

        def seen_on_health() -> bool:
            for s in SUBSCRIPTIONS:
                consumer = next(c for c in self.p.get(s.service, "/health")["consumers"]
                                if c["topic"] == s.topic and c["subscription"] == s.name)
                last = (consumer.get("last_dead_letter") or {}).get("event_id")
                self.health_dead_letters[f"{s.name}@{s.topic}"] = (consumer["dead_lettered"], last)
            return all(n >= 2 and last in self.poison[key.split("@")[1]]
                       for key, (n, last) in self.health_dead_letters.items())
        # A poison message waits behind its topic's backlog (large after a hold): allow for catching up.
        wait_until(seen_on_health, 300 + self.n / 10, interval=1.0,
                   what="every subscription's /health shows its dead letters",
                   diagnose=lambda: self.health_dead_letters)
        event.note = f"{sum(len(v) for v in self.poison.values())} poison messages, all on /health"

    def _do_payout(self, event: ChaosEvent) -> None:
        created = self._until_ok(lambda: self.p.post("marketing", "/pagos", {}), "payout run")["pagos"]
        for pago in created:
            self._until_ok(lambda: self.p.post("marketing", f"/pagos/{pago['id']}/pagar", {}), "pay")
        event.note = f"{len(created)} payouts created and paid"
        self.stats.add("payouts", len(created))

    def _until_ok(self, call: Callable[[], httpx.Response], what: str) -> dict:
        def attempt():
            response = call()
            return response.status_code == 200 and response.json()
        return wait_until(attempt, 120, interval=0.5, what=what)

    # -- after the load ---------------------------------------------------------------------------------
    def settle(self) -> None:
        """Review the held conversions (fraud: rejected), pay payouts left unpaid, then wait for the drain."""
        started = time.monotonic()
        p = self.p

        def reviewed() -> bool:
            held = p.get("conversiones", "/conversiones", status="on_hold", limit=10000)["conversiones"]
            for c in held:
                p.post("conversiones", f"/conversiones/{c['id']}/rechazar", {"motivo": "ip_velocity"})
            return not held and not p.get("conversiones", "/conversiones", status="detected", limit=1)["conversiones"]
        wait_until(reviewed, 300, interval=1.0, what="no conversion detected or on hold", diagnose=p.diagnostics)
        for pago in p.get("marketing", "/pagos", estado="pendiente", limit=10000)["pagos"]:
            self._until_ok(lambda: p.post("marketing", f"/pagos/{pago['id']}/pagar", {}), "pay")
        self.rows: list[Row] = []

        def drained() -> bool:
            if self.rows and not self._caught_up():
                return False  # cheap first: the full snapshot reads every audit record
            self.rows = self._evaluate(self._snapshot())
            return all(r.ok for r in self.rows if not r.settled)
        try:
            wait_until(drained, 300 + self.n / 10, interval=3.0, what="every invariant")
        except AssertionError as error:
            self.out(f"[not every invariant held: {str(error).splitlines()[0]}]")
        self.figures["drain_s"] = round(time.monotonic() - started, 1)

    def _caught_up(self) -> bool:
        """No outbox row pending and as many audit records as business events published."""
        outboxes = [self.dbs.outbox_rows(name) for name in SERVICES]
        if any(status == "pending" for rows in outboxes for *_, status in rows):
            return False
        published = sum(topic in BUSINESS_TOPICS for rows in outboxes for _, topic, _, _ in rows)
        return self.p.get("auditoria", "/auditoria/eventos", limit=1)["total"] >= published

    def check(self) -> list[Row]:
        """The drained state's rows, then the dead-letter topics (read once: each read takes a while)."""
        rows = self.rows + self._dead_letters()
        # What the suite's own retries absorbed, judged over the whole run (the drain's reads included).
        windows = fault_windows(self.chaos, self.observer)
        self.figures["fault_windows"] = [f"{w.what} {self.observer.rel(w.start)}-{self.observer.rel(w.end)}s"
                                         for w in windows]
        return rows + server_error_rows(self.observer, windows) + [refund_retry_row(self.observer, windows)]

    def _dead_letters(self) -> list[Row]:
        """The dead-letter topics' rows, from one read of every DLQ topic. On real Apache Pulsar the
        client's DeadLetterPolicy stores an undecodable message one nack delay after its last
        delivery, on its own; when its consumer was SIGKILLed in between, the successor stores it
        after its redeliveries. So there a read that does not match yet is read again, for 60 s at
        most: the same rows, the same expectations, waiting only for a copy still on its way."""
        pairs = [(s.topic, s.name) for s in SUBSCRIPTIONS]
        rows = self._dead_letter_rows(dead_letter_ids(self.p, pairs))
        if on_real_pulsar(self.p):
            deadline = time.monotonic() + 60
            while not all(r.ok for r in rows) and time.monotonic() < deadline:
                time.sleep(3)
                rows = self._dead_letter_rows(dead_letter_ids(self.p, pairs))
        return rows

    def _dead_letter_rows(self, dead: dict[tuple[str, str], list[str]]) -> list[Row]:
        rows = []
        for topic in TOPICS:
            subs = [s.name for s in SUBSCRIPTIONS if s.topic == topic]
            poison = set(self.poison.get(topic, []))
            copies = [dead[(topic, s)] for s in subs]
            found = [set(v) for v in copies]
            # A copy stored twice (at-least-once: its consumer killed between storing it and
            # acknowledging it) is shown, beside the ids that are judged.
            rows.append(Row(f"DLQ {topic}: the 2 poison messages in each subscription's DLQ, nothing else",
                            " ".join(["2"] * len(subs)),
                            " ".join(f"{len(v & poison)}" + (f"+{len(v - poison)} other" if v - poison else "")
                                     + (f" ({len(c)} copies)" if len(c) != len(v) else "")
                                     for v, c in zip(found, copies)),
                            len(poison) == 2 and all(v == poison for v in found)))
        return rows

    def _snapshot(self) -> dict:
        p = self.p
        snap: dict = {}
        snap["conversiones"] = paged(lambda offset: p.get("conversiones", "/conversiones", limit=10000,
                                                           offset=offset)["conversiones"])
        snap["comisiones"] = paged(lambda offset: p.get("marketing", "/comisiones", limit=10000,
                                                         offset=offset)["comisiones"])
        events, after = [], 0
        while True:
            page = p.get("auditoria", "/auditoria/eventos", after_seq=after, limit=10000)["eventos"]
            events += page
            if len(page) < 10000:
                break
            after = page[-1]["seq"]
        snap["audit"] = events
        snap["verification"] = p.get("auditoria", "/auditoria/verificacion")
        snap["health"] = {name: p.get(name, "/health") for name in SERVICES}
        snap["afiliados"] = {a: p.get("afiliados", f"/afiliados/{a}") for a in self.affiliates}
        snap["pagos"] = [p.get("marketing", f"/pagos/{x['id']}")
                         for x in p.get("marketing", "/pagos", limit=10000)["pagos"]]
        snap["saldos"] = p.get("marketing", "/pagos/saldos")["saldos"]
        snap["alertas"] = p.get("auditoria", "/sistema/alertas", limit=10000)["alertas"]
        outboxes = {name: self.dbs.outbox_rows(name) for name in SERVICES}
        snap["outbox"] = {name: [(e, t, st) for e, t, _, st in rows_] for name, rows_ in outboxes.items()}
        snap["outbox_types"] = {e: et for rows_ in outboxes.values() for e, _, et, _ in rows_}
        snap["state"] = p.state()
        # The conversion → commission saga log (GET /sagas): waiting ones, or why the read failed.
        snap["sagas"] = {}
        for estado in ("running", "stuck"):
            try:
                answer = p.http.get(p.url("conversiones") + "/sagas", params={"estado": estado, "limit": 1000})
                snap["sagas"][estado] = answer.json()["sagas"] if answer.status_code == 200 else \
                    f"answered {answer.status_code}"
            except (httpx.HTTPError, ValueError, KeyError) as error:
                snap["sagas"][estado] = f"failed: {type(error).__name__}"
        return snap

    def _evaluate(self, snap: dict) -> list[Row]:
        rows: list[Row] = []

        def row(check: str, expected, observed, ok: bool | None = None, settled: bool = False) -> None:
            rows.append(Row(check, expected, observed, expected == observed if ok is None else ok, settled))

        # -- conversions: accepted once, each in exactly one terminal state -------------------------
        ids_by_key = {c.key: set(c.ids) for c in self.conversions}
        row("postback keys answered with one id (duplicates and retries included)", len(ids_by_key),
            sum(len(v) == 1 for v in ids_by_key.values()))
        duplicates = [c for t in self.tasks if t.kind == "duplicate" for c in t.conversions]
        row("duplicate postbacks answered with the original id", len(duplicates),
            self.stats.counts["duplicate_answers"], ok=self.stats.counts["duplicate_answers"] == len(duplicates)
            and all(len(ids_by_key[c.key]) == 1 for c in duplicates))
        mine = {c.ids[0]: c for c in self.conversions if c.ids}
        listed = Counter(c["id"] for c in snap["conversiones"])
        view = {c["id"]: c for c in snap["conversiones"]}
        row("conversions accepted (distinct ids)", len(self.conversions), len(mine))
        row("accepted conversions listed exactly once", len(mine), sum(listed[i] == 1 for i in mine))
        status = {i: view[i]["status"] if i in view else "missing" for i in mine}
        row("accepted conversions in a terminal state", len(mine), sum(s in TERMINAL for s in status.values()))
        by_event = defaultdict(Counter)
        for e in snap["audit"]:
            if e["event_type"] in ("ConversionDetected", "ConversionValidated", "ConversionRejected",
                                   "ConversionRefunded", "ConversionHeld"):
                by_event[e["aggregate_id"]][e["event_type"]] += 1
        consistent = 0
        for i, s in status.items():
            ev = by_event[i]
            once = all(v == 1 for v in ev.values())
            if s == "validated":
                consistent += once and ev["ConversionValidated"] == 1 and not ev["ConversionRejected"] \
                    and not ev["ConversionRefunded"]
            elif s == "rejected":
                consistent += once and ev["ConversionRejected"] == 1 and not ev["ConversionRefunded"]
            elif s == "refunded":
                consistent += once and ev["ConversionValidated"] == 1 and ev["ConversionRefunded"] == 1 \
                    and not ev["ConversionRejected"]
        row("terminal state agrees with its audited events (each once)", len(mine), consistent)

        compensated = Counter()  # rejected after being validated: by a saga's compensation
        outcome = Counter()
        for i, c in mine.items():
            s, reason = status[i], (view.get(i) or {}).get("reason") or ""
            if s == "rejected" and by_event[i]["ConversionValidated"]:
                compensated[reason.split(":")[0]] += 1
            if c.kind == "probe":
                good = s in ("validated", "rejected")
            elif c.kind == "valid":
                good = s == ("refunded" if c.refunded else "validated")
            elif c.kind == "velocity":
                good = (s == "rejected" and reason == "rejected_in_review:ip_velocity") if c.held else \
                    s == "validated"
            else:
                good = s == "rejected" and reason == {"unknown_affiliate": "affiliate_unknown",
                                                      "unknown_campaign": "campaign_unknown",
                                                      "self_referral": "self_referral"}[c.kind]
            outcome[(c.kind, good)] += 1
        for kind in ("valid", "unknown_affiliate", "unknown_campaign", "self_referral", "velocity", "probe"):
            total = outcome[(kind, True)] + outcome[(kind, False)]
            if total:
                row(f"  {kind} conversions with the expected outcome", total, outcome[(kind, True)])
        rows.append(valid_rejected_row(mine, status, view))
        refunds_wanted = sum(1 for c in mine.values() if c.refund)
        rows.extend(saga_rows(snap, status))
        row("refunds accepted (the rest were compensated first)", refunds_wanted,
            sum(c.refunded for c in mine.values()) + self.stats.counts["refund_of_rejected_skipped"])

        # -- commissions --------------------------------------------------------------------------------
        per_conversion = defaultdict(list)
        for k in snap["comisiones"]:
            per_conversion[k["conversion_id"]].append(k)
        row("commissions duplicated (two for one conversion)", 0, sum(len(v) > 1 for v in per_conversion.values()))
        validated = [i for i, s in status.items() if s == "validated"]
        live = sum(len(per_conversion[i]) == 1 and per_conversion[i][0]["estado"] != "revertida" for i in validated)
        row("commissions booked = validated conversions", len(validated), live)
        undone = [i for i, s in status.items() if s in ("refunded", "rejected", "compensated")]
        row("refunded/rejected conversions: commission reversed or never booked", len(undone),
            sum(all(k["estado"] == "revertida" for k in per_conversion[i]) for i in undone))
        never_validated = [i for i in mine if not by_event[i]["ConversionValidated"]]
        row("commissions of never-validated conversions", 0, sum(bool(per_conversion[i]) for i in never_validated))
        row("commissions of conversions nobody sent", 0, len(set(per_conversion) - set(mine)))

        # -- budgets ---------------------------------------------------------------------------------------
        spent = defaultdict(Decimal)
        for k in snap["comisiones"]:
            spent[k["campana_id"]] += Decimal(k["monto"])
        for campaign, budget in self.campaigns.items():
            if budget is not None:
                row("small-budget campaign: spent (never above, and demand was ~3x)", f"{budget}",
                    f"{spent[campaign]}", ok=spent[campaign] == budget)
        row("campaign budgets never exceeded", len(self.campaigns),
            sum(b is None or spent[c] <= b for c, b in self.campaigns.items()))

        # -- each affiliate's books ----------------------------------------------------------------------
        in_payout = {line["referencia_id"] for pago in snap["pagos"] for line in pago["lineas"] if line["tipo"] == "ajuste"}
        ajustes = defaultdict(Decimal)
        for e in snap["audit"]:
            if e["event_type"] == "ComisionRevertida" and e["payload"].get("ajuste_id") \
                    and e["payload"]["ajuste_id"] not in in_payout:
                ajustes[e["payload"]["afiliado_id"]] += Decimal(str(e["payload"]["ajuste_monto"]))
        saldos = {s["afiliado_id"]: Decimal(s["saldo"]) for s in snap["saldos"]}
        balanced, problems = 0, []
        for affiliate, earnings in snap["afiliados"].items():
            by_state = defaultdict(Decimal)
            for k in snap["comisiones"]:
                if k["afiliado_id"] == affiliate:
                    by_state[k["estado"]] += Decimal(k["monto"])
            views_agree = {s: Decimal(earnings[f"ganancias_{g}"]) for s, g in (
                ("pendiente", "pendientes"), ("aprobada", "aprobadas"), ("pagada", "pagadas"),
                ("revertida", "revertidas"))} == {s: by_state[s] for s in ("pendiente", "aprobada", "pagada", "revertida")}
            pagos = [x for x in snap["pagos"] if x["afiliado_id"] == affiliate]
            lines_sum = all(Decimal(x["monto"]) == sum((Decimal(li["monto"]) for li in x["lineas"]), Decimal(0))
                            for x in pagos)
            cash = sum((Decimal(x["monto"]) for x in pagos if x["estado"] == "pagado"), Decimal(0))
            cash_ok = all(x["estado"] == "pagado" for x in pagos) and cash + ajustes[affiliate] == by_state["pagada"]
            owed = saldos.get(affiliate, Decimal(0)) == by_state["pendiente"] + by_state["aprobada"] + ajustes[affiliate]
            if views_agree and lines_sum and cash_ok and owed:
                balanced += 1
            else:
                problems.append(f"{affiliate[:8]}: views={views_agree} lines={lines_sum} cash={cash_ok} owed={owed}")
        row("affiliate ledgers balance (earnings = commissions by state; payouts = lines; "
            "paid = cash + carried clawbacks; owed = pending + approved + clawbacks)", len(self.affiliates), balanced)
        self.figures["ledger_problems"] = problems or None
        self.figures["payouts"] = len(snap["pagos"])
        self.figures["clawbacks_carried"] = str(sum(ajustes.values(), Decimal(0)))

        # -- the audit log -----------------------------------------------------------------------------------
        published = {event_id for rows_ in snap["outbox"].values() for event_id, topic, _ in rows_
                     if topic in BUSINESS_TOPICS}
        audited = Counter(e["event_id"] for e in snap["audit"])
        row("business events in outboxes", "-", len(published), ok=bool(published))
        row("business events audited exactly once", len(published), sum(audited[i] == 1 for i in published))
        types = {event_id: (service, topic, event_type) for service, rows_ in snap["outbox"].items()
                 for event_id, topic, _ in rows_ for event_type in [snap["outbox_types"][event_id]]}
        self.figures["not_audited"] = Counter(types[i] for i in published if audited[i] != 1) or None
        row("audit records of no published event", 0, len(set(audited) - published))
        row("audit hash chain verifies", f"ok, {len(snap['audit'])} records",
            f"{'ok' if snap['verification']['ok'] else 'BROKEN'}, {snap['verification']['records']} records")
        row("outbox rows still pending (4 services)", 0,
            sum(status_ == "pending" for rows_ in snap["outbox"].values() for *_, status_ in rows_))

        # -- dead letters: alerts and /health (the topics themselves are read once, by check()) --------------
        alerts = [a for a in snap["alertas"] if a["tipo"] == "dead_letter"]
        for topic in TOPICS:
            subs = [s for s in SUBSCRIPTIONS if s.topic == topic]
            poison = self.poison.get(topic, [])
            flagged = sum(any(p in a["mensaje"] and f"{topic}/{s.name}" in a["mensaje"] for a in alerts)
                          for s in subs for p in poison)
            row(f"alerts on sistema.eventos for the dead letters of {topic}", 2 * len(subs), flagged)
        seen = self.health_dead_letters
        row("/health showed each subscription's dead letters", len(SUBSCRIPTIONS),
            sum(n >= 2 and last is not None for n, last in seen.values()), settled=True)

        # -- the faults themselves ------------------------------------------------------------------------------
        state = snap["state"]
        killed = [e.target for e in self.chaos if e.action == "kill" and e.done_at]
        row("processes SIGKILLed and restarted", "4 services + broker",
            f"{len(killed)}: {', '.join(sorted(killed))}", ok=sorted(killed) == sorted([*SERVICES, "broker"]), settled=True)
        restarts = {n: s["restarts"] for n, s in state["services"].items()}
        self.figures["restarts"] = restarts
        if self.broker == "pulsar":
            # `alpes up --broker pulsar` has no watchdog and no stall probe (README "Real Apache
            # Pulsar": nothing but a JVM that exited is ever restarted); what it did is the next row.
            self.figures["broker_restarts_by_watchdog"] = "n/a on real Pulsar (no watchdog, no stall probe)"
            row("  Pulsar JVM started again by `alpes up` on the same data: only after the chaos kill", 1,
                state.get("broker_restarts"), settled=True)
        else:
            # The supervisor's own restarts of the embedded broker: it stopped answering lookups, or
            # held messages it handed to nobody (README "the embedded broker").
            self.figures["broker_restarts_by_watchdog"] = {k: state.get(f"broker_{k}_restarts")
                                                           for k in ("watchdog", "stall")}
        row(f"{self.hold_service} held down (not restarted) at least", f"{self.hold_seconds:g}s",
            f"{self.hold_downtime:.1f}s", ok=self.hold_downtime >= self.hold_seconds, settled=True)
        row("  the other services answered reads during the hold", self.hold_probe["probes"], self.hold_probe["ok"],
            ok=self.hold_probe["probes"] > 0 and self.hold_probe["ok"] == self.hold_probe["probes"], settled=True)
        row("  writes accepted by a running service during the hold", self.hold_probe["write_probes"],
            self.hold_probe["writes_ok"], ok=self.hold_probe["write_probes"] > 0
            and self.hold_probe["writes_ok"] == self.hold_probe["write_probes"], settled=True)
        row("  postbacks accepted during the hold", "> 0", self.hold_probe["accepted_during_hold"],
            ok=self.hold_probe["accepted_during_hold"] > 0, settled=True)
        self.figures["compensated"] = dict(compensated)
        self.figures.update({k: v for k, v in self.stats.counts.items()})
        return rows


def _print(out: Callable[[object], None], suite: _Suite, rows: list[Row]) -> None:
    broker = ", real Apache Pulsar" if suite.broker == "pulsar" else ""
    table = Table(title=f"fault suite: {suite.n} conversions, seed {suite.seed}, {suite.databases} databases{broker}")
    for column in ("check", "expected", "observed", "ok"):
        table.add_column(column)
    for r in rows:
        table.add_row(r.check, str(r.expected), str(r.observed), "[green]ok[/]" if r.ok else "[red]FAIL[/]")
    out(table)
    out("figures: " + ", ".join(f"{k}={v}" for k, v in suite.figures.items()))


def console_printer() -> Callable[[object], None]:
    console = Console(width=160, force_terminal=False, soft_wrap=True)
    return console.print
