"""Measure how two consumer processes share one subscription on the embedded broker.

    .venv/bin/python tools/measure_subscriptions.py [--messages 3000] [--keys 100] [--broker pulsar]

`--broker pulsar` runs the same scenarios on a real Apache Pulsar standalone (tools/real_pulsar.py).

For Failover and Key_Shared (producers batch by key, as the outbox relay's do), on a 6-partition
topic: is the work shared between the two processes, does per-key order hold, and is anything
lost when one consumer leaves mid-stream by SIGTERM (it closes its consumer) or by SIGKILL (the
connection just dies), each with and without a restart of the broker right after (what
`alpes up` does when an instance of a service that runs several leaves). Each consumer appends
"name key seq" to one shared file with O_APPEND before acknowledging, so the file is the global
processing order. Prints JSON lines and a table; nothing here is used by the platform.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path

import pulsar

TYPES = {"failover": pulsar.ConsumerType.Failover, "key_shared": pulsar.ConsumerType.KeyShared}


def consume(url: str, topic: str, subscription: str, kind: str, name: str, out: str, work_ms: float) -> None:
    stop = [False]
    signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__(0, True))
    client = pulsar.Client(url, logger=pulsar.ConsoleLogger(pulsar.LoggerLevel.Error), operation_timeout_seconds=10)
    if name != "one" and os.environ.get("ALPES_MEASURE_BROKER") != "pulsar":
        # distinct consumer ids per process, as the platform does (pulsar-lite refuses equal ones)
        from alpes.kernel.embedded_broker import reserve_consumer_ids
        reserve_consumer_ids(client, 100)  # readers of a 6-partition topic here: 600 ids
    consumer = None
    while consumer is None and not stop[0]:
        try:
            consumer = client.subscribe(topic, subscription, consumer_type=TYPES[kind], consumer_name=name,
                                        initial_position=pulsar.InitialPosition.Earliest, receiver_queue_size=100)
        except Exception as error:  # pulsar-lite refuses a consumer id already in the dispatcher: retry
            print(f"{name}: subscribe failed ({error}); retrying", file=sys.stderr, flush=True)
    fd = os.open(out, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    Path(f"{out}.{name}.ready").touch()
    while not stop[0]:
        try:
            message = consumer.receive(timeout_millis=200)
        except pulsar.Timeout:
            continue
        except Exception:
            time.sleep(0.2)  # the broker restarted: the client reconnects by itself
            continue
        time.sleep(work_ms / 1000)
        os.write(fd, f"{name} {message.partition_key()} {message.properties()['seq']}\n".encode())
        try:
            consumer.acknowledge(message)
        except Exception:
            pass
    consumer.close()
    client.close()


class Broker:
    embedded = True

    def __init__(self, root: Path) -> None:
        from alpes.kernel import embedded_broker

        self.eb = embedded_broker
        self.root = root
        self.port = embedded_broker.free_port()
        self.url = f"pulsar://127.0.0.1:{self.port}"
        self.process = embedded_broker.start_broker_process(root, self.port, default_partitions=6)

    def restart(self) -> None:
        self.eb.stop_process(self.process)
        self.process = self.eb.start_broker_process(self.root, self.port, default_partitions=6)

    def stop(self) -> None:
        self.eb.stop_process(self.process)


def lines(path: Path) -> list[tuple[str, str, int]]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        name, key, seq = line.split()
        rows.append((name, key, int(seq)))
    return rows


def scenario(broker: Broker, kind: str, leave: str, messages: int, keys: int, work_ms: float, settle: float) -> dict:
    from alpes.kernel.broker import PulsarBroker

    run = uuid.uuid4().hex[:8]
    topic = f"persistent://public/default/measure-{kind}-{leave}-{run}"
    subscription = "measure-consumer"
    out = broker.root / f"{run}.log"
    script = os.path.abspath(__file__)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path),
           "ALPES_MEASURE_BROKER": "embedded" if broker.embedded else "pulsar"}

    def spawn(name: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, script, "consume", broker.url, topic, subscription, kind, name,
                                 str(out), str(work_ms)], env=env, stderr=open(f"{out}.{name}.err", "ab"),
                                start_new_session=True)

    # The topic and the subscription exist before anything is published (as provisioning does).
    setup = pulsar.Client(broker.url, logger=pulsar.ConsoleLogger(pulsar.LoggerLevel.Error))
    setup.subscribe(topic, subscription, consumer_type=TYPES[kind]).close()
    setup.close()
    def wait_ready(name: str) -> None:
        deadline = time.monotonic() + 60
        while not Path(f"{out}.{name}.ready").exists():
            if time.monotonic() > deadline or consumers[name].poll() is not None:
                raise RuntimeError(f"consumer {name} did not subscribe; see {out}.{name}.err")
            time.sleep(0.05)

    consumers = {"one": spawn("one")}
    wait_ready("one")  # "one" first: with Failover it is then the active consumer, the one that leaves
    consumers["two"] = spawn("two")
    wait_ready("two")
    time.sleep(0.5)
    producer_side = PulsarBroker(broker.url, producer_name=f"measure-{run}")  # KeyBased batching, like the relay
    producer = producer_side.producer(topic.rsplit("/", 1)[1])
    sent = Counter()
    left_at = None
    for n in range(messages):
        key = f"k{n % keys:03d}"
        producer.send_async(b"x", None, properties={"seq": str(sent[key])}, partition_key=key)
        sent[key] += 1
        if n % 100 == 99:
            producer.flush()
            time.sleep(0.02)
        if leave != "none" and left_at is None and n >= messages // 2:
            producer.flush()
            while len(lines(out)) < messages // 3:  # one third processed: the stream is under way
                time.sleep(0.01)
            left_at = len(lines(out))
            consumers["one"].send_signal(signal.SIGTERM if leave.startswith("sigterm") else signal.SIGKILL)
            consumers["one"].wait()
            if leave.endswith("+broker_restart"):
                broker.restart()
    producer.flush()
    producer_side.close()

    started = time.monotonic()
    seen = -1
    quiet_since = time.monotonic()
    while time.monotonic() - quiet_since < settle and time.monotonic() - started < 120:
        distinct = len({(k, s) for _, k, s in lines(out)})
        if distinct != seen:
            seen, quiet_since = distinct, time.monotonic()
        if distinct >= messages:
            break
        time.sleep(0.25)
    for process in consumers.values():
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in consumers.values():
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()

    rows = lines(out)
    first: dict[tuple[str, int], int] = {}
    for index, (_, key, seq) in enumerate(rows):
        first.setdefault((key, seq), index)
    by_key: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for (key, seq), index in first.items():
        by_key[key].append((index, seq))
    broken = sum(1 for pairs in by_key.values() if [s for _, s in sorted(pairs)] != sorted(s for _, s in pairs))
    per_consumer = Counter(name for name, _, _ in rows)
    return {"type": kind, "leave": leave, "sent": messages, "delivered": len(first),
            "lost": messages - len(first), "duplicates": len(rows) - len(first),
            "by_one": per_consumer["one"], "by_two": per_consumer["two"],
            "by_two_before_leave": None if left_at is None else sum(1 for n, _, _ in rows[:left_at] if n == "two"),
            "keys_out_of_order": broken}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--keys", type=int, default=100)
    parser.add_argument("--work-ms", type=float, default=1.0)
    parser.add_argument("--settle", type=float, default=15.0, help="seconds without progress before giving up")
    parser.add_argument("--types", default="failover,key_shared")
    parser.add_argument("--leave", default="none,sigterm,sigterm+broker_restart,sigkill,sigkill+broker_restart")
    parser.add_argument("--broker", choices=("embedded", "pulsar"), default="embedded")
    args = parser.parse_args()
    results = []
    for kind in args.types.split(","):
        for leave in args.leave.split(","):
            with tempfile.TemporaryDirectory(prefix="alpes-measure-") as tmp:
                if args.broker == "pulsar":
                    from real_pulsar import ScratchPulsar

                    broker = ScratchPulsar(Path(tmp), partitions=6)
                else:
                    broker = Broker(Path(tmp))  # a fresh broker each time: no ghost of an earlier run
                try:
                    result = scenario(broker, kind, leave, args.messages, args.keys, args.work_ms, args.settle)
                finally:
                    broker.stop()
            results.append(result)
            print(json.dumps(result), flush=True)
    print(f"\n{'type':<11}{'one leaves by':<24}{'delivered':>10}{'lost':>6}{'dups':>6}{'one':>7}{'two':>7}"
          f"{'two before':>11}{'keys out of order':>19}")
    for r in results:
        print(f"{r['type']:<11}{r['leave']:<24}{r['delivered']:>10}{r['lost']:>6}{r['duplicates']:>6}"
              f"{r['by_one']:>7}{r['by_two']:>7}{str(r['by_two_before_leave']):>11}{r['keys_out_of_order']:>19}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "consume":
        consume(*sys.argv[2:8], float(sys.argv[8]))
    else:
        main()
