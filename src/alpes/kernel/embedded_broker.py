"""The embedded broker (PyPI `pulsar-lite`): everything the platform does only because of it.

One seam. The composition root builds `EmbeddedBrokerQuirks` when the settings name no broker
URL; `alpes up` runs `supervisor_embedded.EmbeddedBrokerSupervision` in the same case. On Apache
Pulsar neither exists and nothing in this module runs. What is here, each the answer to a quirk
listed in the README ("The embedded broker"):

- the broker process: its binary, its config file, start, stop, "does it answer a lookup";
- provisioning: it has no admin API and one global `default_partitions`, fixed per topic at first
  use, so it is started once per partition count to create the topics of that count and their
  durable subscriptions (so nothing published before a consumer first connects is lost); it then
  runs with `default_partitions = 1` (dead-letter topics);
- consumer ids: it refuses a consumer whose client-side id is already registered on the
  subscription by another connection, and every client numbers its consumers from 0, so instance
  i of a service first skips i * CONSUMER_IDS_PER_INSTANCE ids;
- backlog and stalls: its Prometheus gauges stand in for the admin API's subscription stats.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pulsar
from tenacity import retry, retry_if_exception_type, stop_after_attempt

from .ports import free_port

PROVISIONED_MARKER = "provisioned.json"
ID_SPACER_TOPIC = "alpes-consumer-id-spacer"
CONSUMER_IDS_PER_INSTANCE = 500  # a service process uses ~30 (one per partition) plus retries


# -- the broker process --------------------------------------------------------------------------
def broker_binary() -> str:
    from pulsar_lite.binary_finder import find_pulsar_lite_binary

    return str(find_pulsar_lite_binary())


def write_config(path: Path, default_partitions: int, metrics_addr: str | None = None) -> None:
    # pulsar-lite ignores unknown keys silently: only keys read from its binary. Its metrics would
    # bind 0.0.0.0:8080: off, or on the loopback address given (they carry the backlog gauges).
    metrics = f'enabled = true\naddr = "{metrics_addr}"\n' if metrics_addr else "enabled = false\n"
    path.write_text(
        f"default_partitions = {default_partitions}\n"
        "max_message_size_bytes = 5242880\n"
        f"\n[metrics]\n{metrics}",
        encoding="utf-8",
    )


def broker_command(config: Path, port: int, store: Path) -> list[str]:
    return [broker_binary(), "--config", str(config), "--addr", f"127.0.0.1:{port}", "--db-path", str(store),
            "--log-level", "warn"]


def start_broker_process(data_dir: Path, port: int, default_partitions: int = 1,
                         log_name: str = "broker.log", metrics_addr: str | None = None) -> subprocess.Popen:
    data_dir.mkdir(parents=True, exist_ok=True)
    config = data_dir / f"pulsar-lite-{default_partitions}.toml"
    write_config(config, default_partitions, metrics_addr)
    log = open(data_dir / log_name, "ab")
    process = subprocess.Popen(broker_command(config, port, data_dir / "store"),
                               stdout=log, stderr=subprocess.STDOUT, cwd=str(data_dir), start_new_session=True)
    log.close()
    wait_until_listening(port, process)
    return process


def wait_until_listening(port: int, process: subprocess.Popen | None = None, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"broker exited with code {process.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.25):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"broker did not listen on 127.0.0.1:{port} within {timeout}s")


def answers_lookups(url: str, topic: str, timeout_seconds: int = 10) -> bool:
    """True when the broker at `url` answers a partition-metadata request for `topic` within
    the timeout, through a fresh client (a wedged connection of an old one proves nothing)."""
    client = pulsar.Client(url, operation_timeout_seconds=timeout_seconds,
                           connection_timeout_ms=timeout_seconds * 1000,
                           logger=pulsar.ConsoleLogger(pulsar.LoggerLevel.Error))
    try:
        client.get_topic_partitions(topic)
        return True
    except Exception:
        return False
    finally:
        try:
            client.close()
        except Exception:
            pass


def stop_process(process: subprocess.Popen, timeout: float = 10.0) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# -- provisioning ------------------------------------------------------------------------------
def _wanted(topics: dict[str, int], subscriptions: Iterable[tuple[str, str]]) -> dict:
    return {"topics": dict(sorted(topics.items())), "subscriptions": sorted(f"{t}|{s}" for t, s in subscriptions)}


def provision_embedded(data_dir: Path, topics: dict[str, int], subscriptions: Iterable[tuple[str, str]],
                       tenant: str = "public", namespace: str = "default") -> bool:
    """Create every topic with its partition count and every durable subscription. Idempotent:
    returns False when the data directory already holds exactly this provisioning."""
    subscriptions = list(subscriptions)
    wanted = _wanted(topics, subscriptions)
    marker = data_dir / PROVISIONED_MARKER
    if marker.exists():
        done = json.loads(marker.read_text(encoding="utf-8"))
        if done == wanted:
            return False
        for topic, count in done["topics"].items():
            if topic in topics and topics[topic] != count:
                raise RuntimeError(f"topic {topic} already has {count} partitions; contract says {topics[topic]}")
    else:
        done = {"topics": {}, "subscriptions": []}
    todo = {t: n for t, n in topics.items() if t not in done["topics"]}
    new_subs = [(t, s) for t, s in subscriptions if f"{t}|{s}" not in done["subscriptions"]]
    counts = sorted(set(todo.values()) | {topics[t] for t, _ in new_subs})
    for count in counts:
        port = free_port()
        process = start_broker_process(data_dir, port, default_partitions=count, log_name="provision.log")
        try:
            client = pulsar.Client(f"pulsar://127.0.0.1:{port}", logger=pulsar.ConsoleLogger(pulsar.LoggerLevel.Error))
            try:
                for topic in [t for t, n in todo.items() if n == count]:
                    client.create_producer(f"persistent://{tenant}/{namespace}/{topic}").close()
                for topic, sub in [(t, s) for t, s in new_subs if topics[t] == count]:
                    client.subscribe(f"persistent://{tenant}/{namespace}/{topic}", sub,
                                     consumer_type=pulsar.ConsumerType.KeyShared,
                                     initial_position=pulsar.InitialPosition.Earliest).close()
                for topic in [t for t, n in topics.items() if n == count]:
                    got = len(client.get_topic_partitions(f"persistent://{tenant}/{namespace}/{topic}"))
                    if got != count:
                        raise RuntimeError(f"{topic}: broker made {got} partitions, wanted {count}")
            finally:
                client.close()
        finally:
            stop_process(process)
    marker.write_text(json.dumps(wanted, indent=2), encoding="utf-8")
    return True


def verify_partitions(service_url: str, topics: dict[str, int], tenant: str = "public",
                      namespace: str = "default") -> dict[str, int]:
    """The partition count the broker reports for each topic (provisioning is checked, not trusted)."""
    client = pulsar.Client(service_url, logger=pulsar.ConsoleLogger(pulsar.LoggerLevel.Error),
                           operation_timeout_seconds=10)
    try:
        return {t: len(client.get_topic_partitions(f"persistent://{tenant}/{namespace}/{t}")) for t in topics}
    finally:
        client.close()


# -- the service side: consumer ids and backlog ----------------------------------------------------
def reserve_consumer_ids(client: pulsar.Client, count: int, tenant: str = "public", namespace: str = "default") -> None:
    """Make `client`'s next consumer ids start `count` later, by opening and closing readers on
    ID_SPACER_TOPIC (16 at a time: about 2 s for 500 ids)."""
    if count <= 0:
        return
    topic = f"persistent://{tenant}/{namespace}/{ID_SPACER_TOPIC}"

    # A lookup the busy broker does not answer in time (it happened at a start under load) is asked
    # again: a timed-out attempt skips at most one more id, which the spacing leaves room for.
    @retry(retry=retry_if_exception_type(pulsar.Timeout), stop=stop_after_attempt(3), reraise=True)
    def open_reader(_) -> pulsar.Reader:
        return client.create_reader(topic, pulsar.MessageId.latest)

    with ThreadPoolExecutor(16) as pool:
        readers = list(pool.map(open_reader, range(count)))
    for reader in readers:
        reader.close()


@dataclass(frozen=True)
class EmbeddedBrokerQuirks:
    """What a service process does because its broker is the embedded one (see the module's
    docstring); the composition root builds one only then, and the runtime asks it at start."""

    instance_index: int = 0
    metrics_url: str | None = None  # the broker's Prometheus endpoint, when `alpes up` runs it

    def prepare_consumer_client(self, client: pulsar.Client, tenant: str, namespace: str) -> None:
        """Before the first subscribe: skip the consumer ids the other instances use."""
        reserve_consumer_ids(client, self.instance_index * CONSUMER_IDS_PER_INSTANCE, tenant, namespace)

    def backlog_source(self, tenant: str, namespace: str) -> MetricsBacklog | None:
        return MetricsBacklog(self.metrics_url, tenant=tenant, namespace=namespace) if self.metrics_url else None


_METRIC = re.compile(r'^(?P<name>pulsar_subscription_\w+)\{(?P<labels>[^}]*)\}\s+(?P<value>\S+)')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


class MetricsBacklog:
    """Backlog source for BacklogProbe: the gauge `pulsar_subscription_back_log` ("unacknowledged
    stored entries") summed over partitions. A key-based batch counts once and the gauge refreshes
    every few seconds, so it is a lagging count of entries, not of messages: 0 means drained, more
    means work waits. (The client cannot stand in: it answers OperationNotSupported to
    get_last_message_id on a partitioned topic.)"""

    description = "pulsar-lite metrics pulsar_subscription_back_log (stored entries, a batch counts once; lags a few s)"

    def __init__(self, metrics_url: str, *, tenant: str = "public", namespace: str = "default") -> None:
        self.metrics_url = metrics_url
        self.namespace = f"{tenant}/{namespace}"
        # One client for the process's life: httpx.get builds a client (and its TLS context, tens of
        # ms of CPU) per call, and the watchdog reads this every 2 s.
        self._http: httpx.Client | None = None

    def read(self, subscriptions: list[tuple[str, str]], timeout: float) -> dict[tuple[str, str], int]:
        if self._http is None:
            self._http = httpx.Client()
        response = self._http.get(self.metrics_url, timeout=timeout)
        response.raise_for_status()
        return parse_backlog_metrics(response.text, self.namespace)


def parse_subscription_metrics(text: str, namespace: str) -> dict[tuple[str, str, str], dict[str, float]]:
    """Every `pulsar_subscription_<gauge>` per (topic, subscription, partition): {gauge: value}."""
    samples: dict[tuple[str, str, str], dict[str, float]] = {}
    for line in text.splitlines():
        match = _METRIC.match(line)
        if not match:
            continue
        labels = dict(_LABEL.findall(match["labels"]))
        if labels.get("namespace", namespace) != namespace:
            continue
        key = (labels.get("topic", ""), labels.get("subscription", ""), labels.get("partition", ""))
        samples.setdefault(key, {})[match["name"].removeprefix("pulsar_subscription_")] = float(match["value"])
    return samples


def parse_backlog_metrics(text: str, namespace: str) -> dict[tuple[str, str], int]:
    """Sum pulsar_subscription_back_log over the partitions of each (topic, subscription)."""
    totals: dict[tuple[str, str], int] = {}
    for (topic, subscription, _), gauges in parse_subscription_metrics(text, namespace).items():
        if "back_log" in gauges:
            totals[(topic, subscription)] = totals.get((topic, subscription), 0) + int(gauges["back_log"])
    return totals


def stalled_partitions(text: str, namespace: str, watched: Iterable[tuple[str, str]], now: float,
                       stall_seconds: float) -> list[str]:
    """The partitions of the `watched` subscriptions that hold stored messages while none is out
    with a consumer and none was handed out for `stall_seconds` (`now`: Unix time, the broker's
    clock). A consumer busy with (or retrying) messages has some unacknowledged: not a stall."""
    watched = set(watched)
    stalled = []
    for (topic, subscription, partition), gauges in sorted(parse_subscription_metrics(text, namespace).items()):
        if (topic, subscription) not in watched:
            continue
        if (gauges.get("back_log", 0) > 0 and gauges.get("unacked_messages", 0) == 0
                and now - gauges.get("last_consumed_timestamp", 0) > stall_seconds):
            stalled.append(f"{topic}/{subscription}#{partition}: {int(gauges['back_log'])} waiting")
    return stalled
