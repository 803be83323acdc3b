"""What the fault suite records while it runs, beside what the platform answers: every 5xx answer
and every request left without an answer, per service and time; the fault windows (each kill or
hold of the chaos plan, and each broker restart `alpes up` makes on its own); why each refund was
retried. And how it reads the platform from outside: each service's outbox through SQLAlchemy
(SQLite file or MariaDB database alike), the dead-letter topics through a consumer of its own (on
a real Apache Pulsar, `alpes up --broker pulsar`, through a reader with the admin token).

Nothing here judges: fault_checks.py turns these records into rows."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlparse

import httpx
from harness import Platform
from sqlalchemy import column, create_engine, select, table
from sqlalchemy.engine import Engine

T = TypeVar("T")
# After a fault ends (the killed process healthy again, the held one back), its effects may last a
# little longer: consumers reconnect, the broker the supervisor restarted after the exit comes back.
GRACE_SECONDS = 10.0


@dataclass(frozen=True)
class Incident:
    """A 5xx answer (`status`), or a request that got none (`status` 0: refused, reset, timed out)."""

    at: float  # time.monotonic() when it was sent (a request left unanswered) or answered (a 5xx)
    service: str  # the instance that answered (or did not): conversiones, marketing-2, ...
    method: str
    path: str
    status: int
    until: float | None = None  # when it was given up (unanswered); None: at once

    @property
    def span(self) -> tuple[float, float]:
        return self.at, self.at if self.until is None else self.until


@dataclass(frozen=True)
class Window:
    """A span in which dependencies are down on purpose (or restarted by the supervisor)."""

    start: float
    end: float
    what: str

    def holds(self, at: float, until: float | None = None) -> bool:
        """Whether the moment `at` (or the span from `at` to `until`) meets the window."""
        return self.start <= (at if until is None else until) and at <= self.end + GRACE_SECONDS


@dataclass
class RefundRetry:
    at: float  # time.monotonic() when the attempt was sent
    cause: str  # "no answer", "503", "500", "409 while detected", ...
    until: float | None = None  # when its answer (or its failure) came

    @property
    def span(self) -> tuple[float, float]:
        return self.at, self.at if self.until is None else self.until


@dataclass
class Observer:
    """Attach to every HTTP client the suite uses (`attach`); `watch` follows the broker's pid."""

    platform: Platform
    started: float = field(default_factory=time.monotonic)
    incidents: list[Incident] = field(default_factory=list)
    refund_retries: list[RefundRetry] = field(default_factory=list)
    supervisor_windows: list[Window] = field(default_factory=list)  # broker restarts by `alpes up`
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        p = self.platform
        # Instance i of a service listens on its port + 100 * i (state.json names it <service>-<i+1>).
        self.by_port = {p.ports[s] + 100 * i: (s if i == 0 else f"{s}-{i + 1}")
                        for s, n in p.instances.items() for i in range(n)}
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None

    # -- HTTP -----------------------------------------------------------------------------------
    def attach(self, client: httpx.Client) -> httpx.Client:
        client.event_hooks["response"] = [*client.event_hooks["response"], self._on_response]
        return client

    def _on_response(self, response: httpx.Response) -> None:
        if response.status_code >= 500:
            self._record(response.request.method, response.request.url, response.status_code)

    def no_answer(self, method: str, url: str | httpx.URL, sent_at: float) -> None:
        """A request that raised instead of answering (connection refused or reset, timeout): it
        spans from when it was sent until now, so one in flight when a process was killed, or a
        timeout that started inside a fault window, meets that window."""
        self._record(method, url, 0, sent_at, time.monotonic())

    def _record(self, method: str, url, status: int, at: float | None = None, until: float | None = None) -> None:
        parsed = urlparse(str(url))
        incident = Incident(time.monotonic() if at is None else at,
                            self.by_port.get(parsed.port or 0, f"port {parsed.port}"), method, parsed.path, status,
                            until)
        with self.lock:
            self.incidents.append(incident)

    def refund_retry(self, cause: str, sent_at: float) -> None:
        """A refund attempt that did not take, and why; from when it was sent until now."""
        with self.lock:
            self.refund_retries.append(RefundRetry(sent_at, cause, time.monotonic()))

    def rel(self, at: float) -> float:
        """Seconds since the suite started: how times are shown."""
        return round(at - self.started, 1)

    # -- the broker's own restarts ------------------------------------------------------------------
    def watch(self) -> None:
        """Follow state.json's broker pid every half second until `stop()`: each change is a window
        from the last sighting of the old pid to the first of the new one (the chaos plan's broker
        kill shows up here too; overlapping windows are harmless)."""
        def run() -> None:
            last_pid, last_seen = None, time.monotonic()
            while not self._stop.wait(0.5):
                try:
                    pid = self.platform.state()["broker_pid"]
                except (OSError, ValueError, KeyError):  # state.json being rewritten
                    continue
                now = time.monotonic()
                if last_pid is not None and pid != last_pid:
                    with self.lock:
                        self.supervisor_windows.append(Window(last_seen, now, f"broker {last_pid} -> {pid}"))
                last_pid, last_seen = pid, now
        self._watcher = threading.Thread(target=run, name="broker-watch", daemon=True)
        self._watcher.start()

    def stop(self) -> None:
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(5)


# -- reading the platform from outside -------------------------------------------------------------
_OUTBOX = table("outbox", column("event_id"), column("topic"), column("event_type"), column("status"))


class Databases:
    """One engine per service on its own database (SQLite read-only, or its MariaDB database)."""

    def __init__(self, platform: Platform, services: list[str]) -> None:
        self.engines: dict[str, Engine] = {}
        for name in services:
            url = platform.db_url(name)
            if url.startswith("sqlite:///"):  # read-only next to the running service, 30 s for its lock
                url = f"sqlite:///file:{url.removeprefix('sqlite:///')}?mode=ro&uri=true"
                self.engines[name] = create_engine(url, connect_args={"timeout": 30})
            else:
                self.engines[name] = create_engine(url, pool_pre_ping=True)

    def outbox_rows(self, service: str) -> list[tuple[str, str, str, str]]:
        """(event_id, topic, event_type, status) of every outbox row of `service`."""
        with self.engines[service].connect() as connection:
            return [tuple(r) for r in connection.execute(select(_OUTBOX.c.event_id, _OUTBOX.c.topic,
                                                                _OUTBOX.c.event_type, _OUTBOX.c.status))]

    def dispose(self) -> None:
        for engine in self.engines.values():
            engine.dispose()


def answers(platform: Platform, service: str, timeout: float = 3) -> bool:
    try:
        return platform.http.get(platform.url(service) + "/health", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


# A read on each service's own database: what a user of a running service gets while another is
# down. (/health says 503 for the second or two the embedded broker restarts after the held
# service left, while reads and writes go on.)
READ_PROBES = {"afiliados": "/afiliados?limit=1", "conversiones": "/conversiones?limit=1",
               "marketing": "/campanas?limit=1", "auditoria": "/auditoria/eventos?limit=1"}


def reads(platform: Platform, service: str, timeout: float = 10) -> bool:
    try:
        return platform.http.get(platform.url(service) + READ_PROBES[service], timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def retry(call: Callable[[], T], attempts: int = 10) -> T:
    for attempt in range(attempts):
        try:
            return call()
        except Exception:  # the pulsar client's Timeout and friends
            if attempt == attempts - 1:
                raise
            time.sleep(2)
    raise AssertionError("unreachable")


def paged(fetch: Callable[[int], list]) -> list:
    items: list = []
    while True:
        page = fetch(len(items))
        items += page
        if len(page) < 10000:
            return items


def on_real_pulsar(platform: Platform) -> bool:
    """Whether the platform runs a real Apache Pulsar standalone (`alpes up --broker pulsar`)."""
    return getattr(platform, "broker", "embedded") == "pulsar"


def broker_client(platform: Platform, operation_timeout_seconds: int = 30):
    """A pulsar.Client on the platform's broker for the suite itself (poison, dead-letter reads).
    On real Apache Pulsar, where authentication and authorization are on, it authenticates as the
    admin role (`<data>/pulsar/auth/admin.token`, named by state.json): the super-user, the one
    role that may produce on every topic and read every dead-letter topic. The services still
    refuse what it publishes there: it carries no platform signature (kernel/signing.py)."""
    import pulsar

    extra = {}
    if on_real_pulsar(platform):
        token = Path(platform.state()["pulsar_admin_token_file"]).read_text(encoding="utf-8").strip()
        extra["authentication"] = pulsar.AuthenticationToken(token)
    return pulsar.Client(f"pulsar://127.0.0.1:{platform.broker_port}",
                         operation_timeout_seconds=operation_timeout_seconds,
                         logger=pulsar.ConsoleLogger(pulsar.LoggerLevel.Error), **extra)


def dead_letter_ids(platform: Platform, pairs: list[tuple[str, str]]) -> dict[tuple[str, str], list[str]]:
    """The event id of every message stored in each (topic, subscription)'s dead-letter topic, one
    entry per copy. Embedded broker: read from the start with a subscription of our own. Real
    Apache Pulsar: with a reader from the earliest message up to the topic's end as it is now
    (`has_message_available`), so what is there is read, all of it."""
    if on_real_pulsar(platform):
        return _dead_letter_ids_by_reader(platform, pairs)
    import pulsar

    client = broker_client(platform)
    found: dict[tuple[str, str], list[str]] = {}
    try:
        for topic, subscription in pairs:
            ids = found[(topic, subscription)] = []
            try:
                consumer = client.subscribe(f"persistent://public/default/{topic}-{subscription}-DLQ",
                                            f"fault-suite-{uuid.uuid4().hex[:8]}",
                                            consumer_type=pulsar.ConsumerType.Exclusive,
                                            initial_position=pulsar.InitialPosition.Earliest)
            except Exception as error:  # a busy broker: the row fails and says why
                ids.append(f"(not read: {error})")
                continue
            while True:
                try:  # the first wait covers connecting; then a short one says the topic is read
                    message = consumer.receive(timeout_millis=300 if ids else 3000)
                except Exception:  # timeout: read to its end
                    break
                ids.append(message.properties().get("event_id", "?"))
                consumer.acknowledge(message)
            try:
                consumer.close()
            except Exception:  # measured: a loaded broker may time out the close; what was read stands
                pass
    finally:
        client.close()
    return found


def _dead_letter_ids_by_reader(platform: Platform, pairs: list[tuple[str, str]]) -> dict[tuple[str, str], list[str]]:
    import pulsar

    client = broker_client(platform)
    found: dict[tuple[str, str], list[str]] = {}
    try:
        for topic, subscription in pairs:
            ids = found[(topic, subscription)] = []
            try:
                # A topic the restarted JVM cannot load yet times the reader out: try again, as the
                # poison's producer does (README "Real Apache Pulsar": the bookie-lock flap).
                reader = retry(lambda: client.create_reader(
                    f"persistent://public/default/{topic}-{subscription}-DLQ", pulsar.MessageId.earliest))
                try:
                    while reader.has_message_available():
                        ids.append(reader.read_next(10000).properties().get("event_id", "?"))
                finally:
                    try:
                        reader.close()
                    except Exception:  # what was read stands
                        pass
            except Exception as error:  # the row fails and says why
                ids.append(f"(not read: {error})")
    finally:
        client.close()
    return found
