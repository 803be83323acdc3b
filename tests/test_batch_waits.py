"""How long each consumer waits to fill a batch is declared in the contract beside its subscription
(contract.Subscription.batch_wait_ms): short on the chain from a postback to its audited commission,
longer for read models and re-checks (fewer, fuller batches: fewer commits below saturation). The
composition root hands it to each consumer, and the consumer to the client's batch-receive policy."""

from __future__ import annotations

import threading
from importlib import import_module

import pytest

from alpes import contract
from alpes.kernel.consumer import ConsumerWorker
from alpes.settings import Settings

# The chain a conversion goes through to an audited commission (what the bench's end-to-end
# latency measures), and what a person acting on the platform waits on: references, alerts.
CHAIN = {("conversiones.eventos", "marketing-consumer"), ("comisiones.eventos", "audit-consumer"),
         ("marketing.eventos", "conversiones-consumer"), ("afiliados.eventos", "marketing-consumer"),
         ("marketing.eventos", "afiliados-consumer"), ("sistema.eventos", "alerting-consumer"),
         ("sistema.eventos", "monitoring-consumer")}


def test_the_chain_waits_least_and_every_wait_is_bounded():
    waits = {(s.topic, s.name): s.batch_wait_ms for s in contract.SUBSCRIPTIONS}
    assert {k for k, ms in waits.items() if ms == contract.CHAIN_MS} == CHAIN
    assert {ms for k, ms in waits.items() if k not in CHAIN} == {contract.READ_MODEL_MS}
    assert contract.CHAIN_MS < contract.READ_MODEL_MS <= 250  # a read model is at most a blink behind


@pytest.mark.parametrize("service", contract.SERVICES)
def test_each_service_consumes_with_the_contracts_wait(service, tmp_path):
    settings = Settings(data_dir=tmp_path, broker_url="pulsar://127.0.0.1:1")
    _app, runtime = import_module(f"alpes.{service}.service").build(settings)
    try:
        wired = {(c.topic, c.subscription): c.batch_wait_ms for c in runtime.consumer_specs}
        assert wired == {(s.topic, s.name): s.batch_wait_ms for s in contract.subscriptions_of(service)}
    finally:
        runtime.db.dispose()


class _OneBatchBroker:
    """Records how the worker subscribes; its consumer hands out nothing and stops the worker."""

    def __init__(self) -> None:
        self.subscribed: dict = {}
        self.worker: ConsumerWorker | None = None

    def subscribe(self, topic, subscription, **options):
        self.subscribed = {"topic": topic, "subscription": subscription, **options}
        broker = self

        class Consumer:
            def batch_receive(self):
                broker.worker._stop.set()
                return []

            def is_connected(self):
                return True

            def close(self):
                pass

        return Consumer()


def test_the_worker_asks_the_client_for_its_wait():
    broker = _OneBatchBroker()
    worker = ConsumerWorker(broker, None, "comisiones.eventos", "reporting-consumer", lambda events: {},
                            consumer_name="c", batch_wait_ms=contract.READ_MODEL_MS)
    broker.worker = worker
    thread = threading.Thread(target=worker._loop)
    thread.start()
    thread.join(5)
    assert not thread.is_alive()
    assert broker.subscribed["batch_wait_ms"] == contract.READ_MODEL_MS
    assert broker.subscribed["batch_size"] == 200
