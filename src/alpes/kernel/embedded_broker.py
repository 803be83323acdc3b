"""The embedded Pulsar-protocol broker (PyPI `pulsar-lite`) and topic provisioning.

pulsar-lite has no admin API: a topic's partition count is fixed at first use from the one
global `default_partitions` setting. So provisioning starts the broker once per distinct
partition count, creates each topic of that count (and its durable subscriptions, so nothing
published before a consumer first connects is lost), stops it, and records what it made.
The broker then runs with `default_partitions = 1` (dead-letter topics). A real Pulsar
cluster is provisioned through its admin REST API instead (see `provision_pulsar_admin`).
"""

from __future__ import annotations

import json
import random
import socket
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

import pulsar

PROVISIONED_MARKER = "provisioned.json"


def broker_binary() -> str:
    from pulsar_lite.binary_finder import find_pulsar_lite_binary

    return str(find_pulsar_lite_binary())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def listen_port(also: Iterable[int] = ()) -> int:
    """A free port for a process that is killed and started again on the same port (a service,
    the broker). Outside the kernel's ephemeral range: in that range, any outgoing connection
    made while the process is down may take its port, and the restarted process cannot bind.
    `also` are offsets that must be free too (further instances at port + 100 * i)."""
    offsets = (0, *also)
    low, high = _ephemeral_range()
    ranges = [(first, last - max(offsets)) for first, last in ((10000, low - 1), (high + 1, 65535))
              if last - max(offsets) - first > 1000]
    for _ in range(200):
        port = random.randint(*random.choice(ranges))
        if all(_bindable(port + offset) for offset in offsets):
            return port
    return free_port()


def write_config(path: Path, default_partitions: int, metrics_addr: str | None = None) -> None:
    # Unknown keys are ignored silently by pulsar-lite: only keys read from its binary.
    # Metrics would bind 0.0.0.0:8080: off, or on the loopback address given (`addr`, found in
    # its binary and checked by a test: they carry each subscription's backlog).
    metrics = f'enabled = true\naddr = "{metrics_addr}"\n' if metrics_addr else "enabled = false\n"
    path.write_text(
        f"default_partitions = {default_partitions}\n"
        "max_message_size_bytes = 5242880\n"
        f"\n[metrics]\n{metrics}",
        encoding="utf-8",
    )


def start_broker_process(data_dir: Path, port: int, default_partitions: int = 1,
                         log_name: str = "broker.log", metrics_addr: str | None = None) -> subprocess.Popen:
    data_dir.mkdir(parents=True, exist_ok=True)
    config = data_dir / f"pulsar-lite-{default_partitions}.toml"
    write_config(config, default_partitions, metrics_addr)
    log = open(data_dir / log_name, "ab")
    process = subprocess.Popen(
        [broker_binary(), "--config", str(config), "--addr", f"127.0.0.1:{port}",
         "--db-path", str(data_dir / "store"), "--log-level", "warn"],
        stdout=log, stderr=subprocess.STDOUT, cwd=str(data_dir), start_new_session=True,
    )
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


def provision_pulsar_admin(admin_url: str, topics: dict[str, int], subscriptions: Iterable[tuple[str, str]],
                           tenant: str = "public", namespace: str = "default", token: str | None = None) -> None:
    """Provision a real Apache Pulsar cluster through its admin REST API (v2)."""
    import httpx

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    base = f"{admin_url.rstrip('/')}/admin/v2/persistent/{tenant}/{namespace}"
    with httpx.Client(headers=headers, timeout=30) as http:
        for topic, count in topics.items():
            response = http.put(f"{base}/{topic}/partitions", json=count)
            if response.status_code == 409:  # exists: check the count instead of trusting it
                got = http.get(f"{base}/{topic}/partitions").json().get("partitions")
                if got != count:
                    raise RuntimeError(f"{topic} has {got} partitions on the cluster; contract says {count}")
            elif response.status_code >= 300:
                raise RuntimeError(f"creating {topic}: {response.status_code} {response.text}")
        for topic, sub in subscriptions:
            response = http.put(f"{base}/{topic}/subscription/{sub}", json={"entryId": -1, "ledgerId": -1})
            if response.status_code not in (200, 204, 409):
                raise RuntimeError(f"creating subscription {sub} on {topic}: {response.status_code} {response.text}")


