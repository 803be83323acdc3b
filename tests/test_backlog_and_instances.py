"""Per-subscription backlog from the broker, and what keeps instances sharing one SQLite file apart."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pulsar
from conftest import unique
from harness import Platform, wait_until
from rich.console import Console
from sqlalchemy import MetaData

from alpes.child_process import Child
from alpes.kernel import embedded_broker
from alpes.kernel.backlog import BacklogProbe
from alpes.kernel.broker import PulsarBroker
from alpes.kernel.db import Database
from alpes.kernel.embedded_broker import (
    MetricsBacklog,
    parse_backlog_metrics,
    reserve_consumer_ids,
    stalled_partitions,
)
from alpes.kernel.ports import free_port, listen_port
from alpes.kernel.pulsar_admin import AdminBacklog
from alpes.settings import Settings
from alpes.supervisor_embedded import EmbeddedBrokerSupervision


def test_embedded_broker_backlog_is_positive_while_held_and_zero_after_drain(tmp_path: Path):
    port, metrics_port = free_port(), free_port()
    process = embedded_broker.start_broker_process(tmp_path, port, default_partitions=4,
                                                   metrics_addr=f"127.0.0.1:{metrics_port}")
    url = f"pulsar://127.0.0.1:{port}"
    topic, subscription = unique("backlog"), "held-consumer"
    full = f"persistent://public/default/{topic}"
    client = pulsar.Client(url, logger=pulsar.ConsoleLogger(pulsar.LoggerLevel.Error))
    producer_side = PulsarBroker(url)
    probe = BacklogProbe([(topic, subscription), (topic, "other")],
                         MetricsBacklog(f"http://127.0.0.1:{metrics_port}/metrics"), cache_seconds=0)
    try:
        client.subscribe(full, subscription, consumer_type=pulsar.ConsumerType.KeyShared).close()  # provisioned
        producer = producer_side.producer(topic)
        for n in range(60):
            producer.send_async(b"x", None, partition_key=f"k{n % 12}")
        producer.flush()
        # Nobody consumes: the broker counts what waits (entries: a key-based batch counts once).
        held = wait_until(lambda: (probe.read()[(topic, subscription)]["backlog"] or 0) > 0 and probe.read(), 30,
                          what="a backlog above 0 while the subscription is held")
        assert held[(topic, "other")]["backlog"] is None  # never subscribed: not reported, not a made-up 0
        assert "pulsar-lite" in held[(topic, subscription)]["source"]

        consumer = client.subscribe(full, subscription, consumer_type=pulsar.ConsumerType.KeyShared)
        received = 0
        while received < 60:
            message = consumer.receive(10000)
            consumer.acknowledge(message)
            received += 1
        wait_until(lambda: probe.read()[(topic, subscription)]["backlog"] == 0, 30,
                   what="the backlog back to 0 after draining")
        consumer.close()
    finally:
        producer_side.close()
        client.close()
        embedded_broker.stop_process(process)
    # The broker gone: the backlog is unknown (None with the error), never reported as 0.
    gone = probe.read()[(topic, subscription)]
    assert gone["backlog"] is None and gone["error"]


def test_metrics_are_summed_over_partitions_per_subscription_and_namespace():
    text = textwrap.dedent("""\
        # TYPE pulsar_subscription_back_log gauge
        pulsar_subscription_back_log{cluster="c",namespace="public/default",partition="0",subscription="s",topic="t"} 3
        pulsar_subscription_back_log{cluster="c",namespace="public/default",partition="1",subscription="s",topic="t"} 4
        pulsar_subscription_back_log{cluster="c",namespace="public/default",partition="0",subscription="u",topic="t"} 1
        pulsar_subscription_back_log{cluster="c",namespace="other/ns",partition="0",subscription="s",topic="t"} 50
        pulsar_subscription_unacked_messages{cluster="c",namespace="public/default",partition="0",subscription="s",topic="t"} 9
        """)
    assert parse_backlog_metrics(text, "public/default") == {("t", "s"): 7, ("t", "u"): 1}


def _serve(body: bytes, asked: list[str] | None = None) -> HTTPServer:
    """A stand-in for the broker's HTTP side (admin API, metrics): every GET answers `body`;
    the paths asked are appended to `asked`. Stop it with `shutdown()`."""
    class Answer(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            if asked is not None:
                asked.append(self.path)
            self.send_response(200)
            self.send_header("content-type", "application/json" if body.startswith(b"{") else "text/plain")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Answer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_admin_api_backlog_is_msg_backlog_of_partitioned_stats():
    asked: list[str] = []

    server = _serve(json.dumps({"msgBacklog": 99, "subscriptions": {
        "marketing-consumer": {"msgBacklog": 12}, "analytics-consumer": {"msgBacklog": 0}}}).encode(), asked)
    try:
        probe = BacklogProbe([("conversiones.eventos", "marketing-consumer"), ("conversiones.eventos", "analytics-consumer")],
                             AdminBacklog(f"http://127.0.0.1:{server.server_port}/", tenant="acme", namespace="prod"))
        result = probe.read()
    finally:
        server.shutdown()
    assert asked == ["/admin/v2/persistent/acme/prod/conversiones.eventos/partitioned-stats"]
    assert result[("conversiones.eventos", "marketing-consumer")]["backlog"] == 12
    assert result[("conversiones.eventos", "analytics-consumer")]["backlog"] == 0
    assert "msgBacklog" in result[("conversiones.eventos", "marketing-consumer")]["source"]


def test_reserved_consumer_ids_let_a_second_client_subscribe_at_once(broker_url: str):
    """pulsar-lite refuses a consumer id already registered on the subscription by another
    connection; every client counts from 0. The second instance reserves ids first."""
    topic = f"persistent://public/default/{unique('ids')}"
    quiet = pulsar.ConsoleLogger(pulsar.LoggerLevel.Error)
    first = pulsar.Client(broker_url, logger=quiet, operation_timeout_seconds=10)
    second = pulsar.Client(broker_url, logger=quiet, operation_timeout_seconds=10)
    try:
        first.subscribe(topic, "svc", consumer_type=pulsar.ConsumerType.KeyShared)
        reserve_consumer_ids(second, 20)
        started = time.monotonic()
        second.subscribe(topic, "svc", consumer_type=pulsar.ConsumerType.KeyShared)
        assert time.monotonic() - started < 5  # without the reservation: a 10 s timeout first
    finally:
        first.close()
        second.close()


def test_exclusive_keeps_other_holders_of_the_sqlite_file_out(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'svc.db'}"
    one, two = Database(url), Database(url)
    try:
        with one.exclusive("job-approve") as mine:
            assert mine
            with two.exclusive("job-approve", blocking=False) as theirs:
                assert not theirs
            with two.exclusive("job-payout", blocking=False) as other_job:
                assert other_job
        with two.exclusive("job-approve", blocking=False) as theirs:
            assert theirs
    finally:
        one.dispose()
        two.dispose()


RELAY_PROCESS = """
import json, pathlib, sys, time
from sqlalchemy import MetaData
from alpes.kernel.db import Database
from alpes.kernel.outbox import OutboxRelay, outbox_table

url, out, name = sys.argv[1], sys.argv[2], sys.argv[3]

class SlowPublisher:
    # Takes its time, like a broker answering, so two relays would overlap on the same rows.
    def publish(self, messages):
        time.sleep(0.15)
        with open(out, "a") as f:
            for m in messages:
                f.write(json.dumps([name, m.event_id]) + "\\n")
        return {m.event_id: None for m in messages}

db = Database(url)
relay = OutboxRelay(db, outbox_table(MetaData()), SlowPublisher(), batch_size=20)
pathlib.Path(f"{out}.{name}").touch()  # both start together: their relays overlap
while not all(pathlib.Path(f"{out}.{n}").exists() for n in ("one", "two")):
    time.sleep(0.01)
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    if relay.run_once() == (0, 0):
        break
"""


def test_two_relay_processes_on_one_sqlite_file_publish_each_row_once(tmp_path: Path):
    from alpes.kernel.codec import SchemaRegistry
    from alpes.kernel.messages import OutgoingEvent
    from alpes.kernel.outbox import Outbox, outbox_table

    url = f"sqlite:///{tmp_path / 'svc.db'}"
    metadata = MetaData()
    table = outbox_table(metadata)
    db = Database(url)
    metadata.create_all(db.engine)
    outbox = Outbox(table, SchemaRegistry.from_directory())
    ids = []
    with db.transaction() as session:
        events = [OutgoingEvent("sistema.eventos", "ServicioIniciado", f"svc-{n}",
                                {"servicio": "svc", "instancia": f"i{n}", "timestamp": _now()}) for n in range(200)]
        outbox.add(session, events)
        ids = [e.event_id for e in events]
    db.dispose()
    out = tmp_path / "published.jsonl"
    script = tmp_path / "relay.py"
    script.write_text(RELAY_PROCESS)
    relays = [subprocess.Popen([sys.executable, str(script), url, str(out), name]) for name in ("one", "two")]
    for relay in relays:
        assert relay.wait(90) == 0
    published = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(event_id for _, event_id in published) == sorted(ids)  # each row once, none lost
    assert {name for name, _ in published} <= {"one", "two"}


def _now():
    from alpes.kernel.messages import utcnow

    return utcnow()


def _gauges(topic: str, subscription: str, partition: int, **values: float) -> str:
    labels = f'cluster="c",namespace="public/default",partition="{partition}",subscription="{subscription}",topic="{topic}"'
    return "".join(f"pulsar_subscription_{name}{{{labels}}} {value}\n" for name, value in values.items())


def test_a_partition_holding_messages_that_nobody_is_handed_is_stalled():
    now = 1_800_000_000.0
    text = (_gauges("t", "stuck", 0, back_log=864, unacked_messages=0, last_consumed_timestamp=now - 90)
            + _gauges("t", "stuck", 1, back_log=0, unacked_messages=0, last_consumed_timestamp=now - 90)  # drained
            + _gauges("t", "busy", 0, back_log=50, unacked_messages=12, last_consumed_timestamp=now - 90)  # retrying
            + _gauges("t", "flowing", 0, back_log=50, unacked_messages=0, last_consumed_timestamp=now - 5)
            + _gauges("t", "never", 0, back_log=3, unacked_messages=0)  # nothing handed out since the broker started
            + _gauges("t", "unwatched", 0, back_log=9, unacked_messages=0, last_consumed_timestamp=now - 90))
    watched = [("t", "stuck"), ("t", "busy"), ("t", "flowing"), ("t", "never")]
    assert stalled_partitions(text, "public/default", watched, now, 60) == [
        "t/never#0: 3 waiting", "t/stuck#0: 864 waiting"]
    assert stalled_partitions(text, "public/default", watched, now, 120) == ["t/never#0: 3 waiting"]
    assert stalled_partitions(text, "other/ns", watched, now, 60) == []


def test_alpes_up_restarts_an_embedded_broker_that_hands_nothing_out(tmp_path: Path):
    """`alpes up`'s dispatch probe of the embedded broker, on a real embedded broker and a metrics
    endpoint that shows a subscription of a running service stalled; not while that service is held."""
    now = time.time()
    metrics = _gauges("conversiones.eventos", "marketing-consumer", 0, back_log=40, unacked_messages=0,
                      last_consumed_timestamp=now - 120).encode()

    server = _serve(metrics)
    port = listen_port()
    config = tmp_path / "broker.toml"
    embedded_broker.write_config(config, 1, metrics_addr=f"127.0.0.1:{listen_port()}")
    marketing = Child("marketing", [sys.executable, "-c", "import time; time.sleep(120)"], dict(os.environ),
                      tmp_path / "marketing.log", service="marketing")
    embedded = EmbeddedBrokerSupervision(Settings(data_dir=tmp_path, broker_port=port, broker_stall_seconds=5),
                                         tmp_path, Console(file=io.StringIO()), {"marketing": marketing})
    embedded.metrics_url = f"http://127.0.0.1:{server.server_port}/metrics"
    embedded.broker = Child("broker", [embedded_broker.broker_binary(), "--config", str(config), "--addr",
                                       f"127.0.0.1:{port}", "--db-path", str(tmp_path / "store")],
                            dict(os.environ), tmp_path / "broker.log")
    try:
        embedded.broker.start()
        embedded_broker.wait_until_listening(port, embedded.broker.process)
        marketing.start()
        first = embedded.broker.process.pid

        embedded.check_dispatch()  # both just started: too early to judge
        assert not embedded.restart_flagged()

        embedded.broker.started_at -= 10
        marketing.started_at -= 10
        embedded.check_dispatch()
        assert embedded.restart_flagged()
        assert embedded.broker.process.pid != first and embedded.broker.alive()
        assert embedded.stall_restarts == 1 and embedded.broker.restarts == 1
        embedded_broker.wait_until_listening(port, embedded.broker.process)

        embedded.broker.started_at -= 9  # a second restart in a row waits twice as long
        embedded.check_dispatch()
        assert not embedded.restart_flagged()

        embedded.broker.started_at -= 30
        marketing.held_for = 30.0  # down on purpose: its messages are meant to wait
        embedded.check_dispatch()
        assert not embedded.restart_flagged()
        marketing.held_for = None
        embedded.check_dispatch()
        assert embedded.restart_flagged()
        assert embedded.stall_restarts == 2
    finally:
        server.shutdown()
        marketing.stop(timeout=5)
        embedded.broker.stop(timeout=5)


def test_on_failover_a_crash_restarts_the_embedded_broker_and_a_clean_hold_does_not(tmp_path: Path):
    """Failover keeps the consumers of a dead connection registered on pulsar-lite: `alpes up`
    restarts the embedded broker when a service crashes, not when it stops cleanly (a hold)."""
    platform = Platform(tmp_path / "up", env={"ALPES_SUBSCRIPTION_TYPE": "failover"}).start()
    try:
        broker_pid, afiliados_pid = platform.pid("broker"), platform.pid("afiliados")
        platform.hold("afiliados", 1)
        platform.wait_restarted("afiliados", afiliados_pid)
        assert platform.pid("broker") == broker_pid  # it closed its consumers: nothing to clear

        platform.wait_restarted("afiliados", platform.kill("afiliados"))
        wait_until(lambda: platform.pid("broker") != broker_pid, 30, what="the broker restarted after the crash")
        assert platform.get("afiliados", "/health")["status"] == "ok"
    finally:
        platform.stop()


def test_listen_port_never_hands_out_a_port_twice_though_nobody_listens_yet(monkeypatch, tmp_path: Path):
    """The harness picks every port of a platform before any of its processes binds one: two picks
    must differ (a service once failed to bind the port another part had been given), even where
    300 random picks would meet, and with the offsets of further instances."""
    from alpes.kernel import ports
    from alpes.platform_harness import Platform

    monkeypatch.setattr(ports, "_ephemeral_range", lambda: (11200, 60999))  # 10000-11199 below it
    picked = [ports.listen_port(also=[100]) for _ in range(300)]
    taken = [p + offset for p in picked for offset in (0, 100)]
    assert len(set(taken)) == len(taken)
    monkeypatch.undo()
    platform = Platform(tmp_path / "up", instances={"conversiones": 2})
    every = [*platform.ports.values(), platform.ports["conversiones"] + 100, platform.broker_port,
             platform.console_port, int(platform.env["ALPES_BROKER_METRICS_PORT"])]
    assert len(set(every)) == len(every) == 8
