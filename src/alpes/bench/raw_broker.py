"""The raw broker measurement: produce, then consume, Avro events on a scratch embedded broker."""

from __future__ import annotations

import threading
import time
import uuid
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path

from .measure import per_second, say

RAW_TOPIC_PARTITIONS = 6  # the partition count of conversiones.eventos in the contract


def _conversion_payload(conversion_id: str) -> dict:
    return {"conversion_id": conversion_id, "affiliate_id": "bench-affiliate", "campaign_id": "bench-campaign",
            "user_id": "bench-user", "conversion_value": Decimal("123.45"), "conversion_type": "sale",
            "order_id": f"order-{conversion_id}", "currency": "EUR", "timestamp": datetime.now(timezone.utc)}


def bench_raw_broker(messages: int, work_dir: Path) -> dict:
    import pulsar

    from ..kernel import embedded_broker
    from ..kernel.codec import SchemaRegistry
    from ..kernel.messages import properties_of
    from ..kernel.ports import free_port

    registry = SchemaRegistry.from_directory()
    port = free_port()
    say(f"raw: starting a scratch broker on 127.0.0.1:{port} ({RAW_TOPIC_PARTITIONS} partitions by default)")
    process = embedded_broker.start_broker_process(work_dir, port, default_partitions=RAW_TOPIC_PARTITIONS,
                                                   log_name="bench-broker.log")
    client = None
    try:
        client = pulsar.Client(f"pulsar://127.0.0.1:{port}", operation_timeout_seconds=30,
                               logger=pulsar.ConsoleLogger(pulsar.LoggerLevel.Error))
        topic = "persistent://public/default/bench.raw"
        subscription = "bench-consumer"

        def subscribe():
            # The service consumers' receive settings (kernel/broker.py), on one Failover consumer.
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
        say(f"raw: producing {messages} Avro ConversionDetected messages")
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
        say(f"raw: produced {acked[0]} in {produce_seconds:.2f}s; consuming")

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
        say(f"raw: consumed {len(seen)} in {consume_seconds:.2f}s")
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
            "produce_msg_per_s": per_second(acked[0], produce_seconds),
            "consume_seconds": round(consume_seconds, 3),
            "consume_msg_per_s": per_second(len(seen), consume_seconds),
            "overall_seconds": round(overall_seconds, 3),
            "overall_msg_per_s": per_second(len(seen), overall_seconds),
        }
    finally:
        if client is not None:
            client.close()
        embedded_broker.stop_process(process)
        say("raw: scratch broker stopped")
