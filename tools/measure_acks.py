"""Are a subscription's acknowledgements kept? Measured per subscription type on the embedded broker.

    .venv/bin/python tools/measure_acks.py [--messages 1000] [--partitions 6] [--broker pulsar]

`--broker pulsar` measures the same on a real Apache Pulsar standalone (tools/real_pulsar.py).

One consumer receives and acknowledges every message (keys spread, producer batching by key, as
the outbox relay does), closes cleanly; a second consumer then subscribes to the same
subscription. Whatever the second one receives had been acknowledged and was delivered again.
Also counts the broker's "stale ack" warnings. Prints a table; nothing here is used by the platform.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pulsar
from rich.console import Console
from rich.table import Table

from alpes.kernel import embedded_broker

TYPES = {"Failover": pulsar.ConsumerType.Failover, "Shared": pulsar.ConsumerType.Shared,
         "Key_Shared": pulsar.ConsumerType.KeyShared}


def measure(kind: str, messages: int, partitions: int, real: bool = False) -> dict:
    data_dir = Path(tempfile.mkdtemp(prefix="alpes-acks-"))
    if real:
        from real_pulsar import ScratchPulsar

        broker = ScratchPulsar(data_dir, partitions)
        url = broker.url
    else:
        port = embedded_broker.free_port()
        broker = embedded_broker.start_broker_process(data_dir, port, default_partitions=partitions)
        url = f"pulsar://127.0.0.1:{port}"
    client = pulsar.Client(url, logger=pulsar.ConsoleLogger(pulsar.LoggerLevel.Error))
    topic = "persistent://public/default/acks"
    try:
        consumer = client.subscribe(topic, "s", consumer_type=TYPES[kind],
                                    initial_position=pulsar.InitialPosition.Earliest)
        producer = client.create_producer(topic, block_if_queue_full=True,
                                          batching_type=pulsar.BatchingType.KeyBased)
        for i in range(messages):
            producer.send_async(f"m{i}".encode(), None, partition_key=f"k{i % 50}")
        producer.flush()
        acknowledged, deadline = 0, time.monotonic() + 60
        while acknowledged < messages and time.monotonic() < deadline:
            try:
                consumer.acknowledge(consumer.receive(timeout_millis=1000))
                acknowledged += 1
            except pulsar.Timeout:
                pass
        time.sleep(1)  # let the client flush its acknowledgements
        consumer.close()
        again = set()
        consumer = client.subscribe(topic, "s", consumer_type=TYPES[kind],
                                    initial_position=pulsar.InitialPosition.Earliest)
        try:
            while True:
                message = consumer.receive(timeout_millis=3000)
                again.add(message.data())
                consumer.acknowledge(message)
        except pulsar.Timeout:
            pass
        client.close()
    finally:
        broker.stop() if real else embedded_broker.stop_process(broker)
    log = (data_dir / "broker.log").read_text(errors="replace")
    return {"type": kind, "acknowledged": acknowledged, "delivered_again": len(again),
            "stale_ack_warnings": log.count("stale ack")}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--partitions", type=int, default=6)
    parser.add_argument("--broker", choices=("embedded", "pulsar"), default="embedded")
    args = parser.parse_args()
    table = Table(title=f"{args.messages} messages, {args.partitions} partitions, acknowledged then a new consumer")
    for column in ("subscription", "acknowledged", "delivered again", "stale-ack warnings"):
        table.add_column(column)
    for kind in TYPES:
        row = measure(kind, args.messages, args.partitions, real=args.broker == "pulsar")
        print(row, flush=True)
        table.add_row(row["type"], str(row["acknowledged"]), str(row["delivered_again"]), str(row["stale_ack_warnings"]))
    Console().print(table)


if __name__ == "__main__":
    main()
