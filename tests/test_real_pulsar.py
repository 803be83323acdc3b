"""The platform on a real Apache Pulsar (4.0.7 standalone, `alpes up --broker pulsar`): JWT
authentication and per-service authorization, provisioning through the admin REST API, the
services end to end, poison messages through nack + the client's DeadLetterPolicy, and the broker's
JVM killed with SIGKILL. Needs Java 17 and Maven (the first run resolves ~270 MB into ~/.m2).
`make test-pulsar`; left out of `make test`.

One platform for the module, started once (about 20 s plus Maven's first resolution). The tests
run in the order written: the first is the end-to-end flow of test_e2e.py, which counts every
audited event and so needs the platform fresh; the last kills the broker.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import httpx
import pulsar
import pytest
from harness import Platform, wait_until
from test_e2e import test_the_whole_flow_through_four_services as the_whole_flow

from alpes.contract import SERVICES, SUBSCRIPTIONS, TOPICS, broker_role, dead_letter_topic
from alpes.kernel.codec import SchemaRegistry
from alpes.kernel.pulsar_admin import PulsarAdmin, ProvisioningError, provision
from alpes.provisioning import contract_provisioning

pytestmark = pytest.mark.pulsar

START_TIMEOUT = 900  # Maven's first resolution into an empty ~/.m2, then the JVM and provisioning


@pytest.fixture(scope="module")
def platform(tmp_path_factory):
    # Closed as in production: the harness presents the operator's key from `alpes keys create`.
    running = Platform(tmp_path_factory.mktemp("pulsar") / "alpes", {"ALPES_AUTH": "required"}, broker="pulsar")
    try:
        running.start(timeout=START_TIMEOUT)
        running.authenticate(running.create_key("operator", "--name", "real pulsar"))
        yield running
    finally:
        running.close()
    # `alpes up` stopped the JVM it ran (the last one, after the kill test's restart).
    left = subprocess.run(["pgrep", "-f", f"PulsarStandaloneStarter.*{running.data_dir}"], capture_output=True)
    assert left.returncode == 1, f"a Pulsar JVM outlived `alpes up`: {left.stdout!r}"


# -- helpers ----------------------------------------------------------------------------------------
def token(platform: Platform, role: str = "admin") -> str:
    directory = Path(platform.state()["pulsar_admin_token_file"]).parent
    return (directory / f"{role}.token").read_text().strip()


def client(platform: Platform, jwt: str | None, timeout_seconds: int = 10) -> pulsar.Client:
    """A client as `jwt`'s role; it logs to a file (the refusals tested here are logged as errors)."""
    extra = {"authentication": pulsar.AuthenticationToken(jwt)} if jwt else {}
    return pulsar.Client(platform.state()["broker_url"], operation_timeout_seconds=timeout_seconds,
                         logger=pulsar.FileLogger(pulsar.LoggerLevel.Warn, str(platform.data_dir / "clients.log")),
                         **extra)


def admin(platform: Platform) -> PulsarAdmin:
    return PulsarAdmin(platform.state()["pulsar_admin_url"], token=token(platform))


def topic(name: str) -> str:
    return f"persistent://public/default/{name}"


def dead_letters(pulsar_client: pulsar.Client, name: str, event_id: str) -> list:
    """The messages of dead-letter topic `name` whose event_id property is `event_id`."""
    reader = pulsar_client.create_reader(topic(name), pulsar.MessageId.earliest)
    try:
        copies = []
        while reader.has_message_available():
            copies.append(reader.read_next(5000))
        return [m for m in copies if m.properties().get("event_id") == event_id]
    finally:
        reader.close()


def answers(platform: Platform, service: str) -> bool:
    """Its /health answers 200 (False also when nothing listens: held down)."""
    try:
        return platform.http.get(platform.url(service) + "/health").status_code == 200
    except httpx.HTTPError:
        return False


def enabled_affiliate_and_campaign(platform: Platform, email: str) -> tuple[str, str]:
    """A validated affiliate and a campaign that conversiones already knows about."""
    affiliate = platform.post("afiliados", "/afiliados", {"user_id": email, "email": email, "nombre": "Eva"})
    assert affiliate.status_code == 201, affiliate.text
    ana = affiliate.json()["id"]
    campaign = platform.post("marketing", "/campanas", {"nombre": f"C {email}", "porcentaje_comision": "10"})
    assert campaign.status_code == 201, campaign.text
    campaign_id = campaign.json()["id"]
    probe = {"affiliate_id": ana, "campaign_id": campaign_id, "user_id": "probe", "conversion_value": "10.00",
             "conversion_type": "sale", "order_id": f"probe-{ana}"}
    wait_until(lambda: platform.post("conversiones", "/conversiones", probe).json()["status"] == "validated", 90,
               what="conversiones to learn the affiliate and campaign")
    return ana, campaign_id


# -- (b) the end-to-end flow of test_e2e.py, first: it needs a fresh platform --------------------------
def test_the_whole_flow_through_four_services_on_real_pulsar(platform: Platform):
    the_whole_flow(platform)


# -- (a) the seed's integration scenarios --------------------------------------------------------------
def test_health_partitions_and_subscriptions_read_through_the_admin_api(platform: Platform):
    log = " ".join(platform.log().split())
    assert "Apache Pulsar 4.0.7 ready in" in log and "provisioned:" in log and "all verified" in log
    assert "broker (Apache Pulsar 4.0.7)" in log  # the start-up table says which broker runs
    for name in SERVICES:
        health = platform.get(name, "/health")
        assert health["status"] == "ok" and health["broker"]["ok"], (name, health)
        for consumer in health["consumers"]:
            assert consumer["connected"] and consumer["subscription_type"] == "key_shared", consumer
            assert consumer["backlog"]["source"].startswith("pulsar-admin"), consumer  # its own role reads it
            assert isinstance(consumer["backlog"]["backlog"], int), consumer
    api = admin(platform)
    try:
        partitioned = api.partitioned_topics()
        assert {t: partitioned.get(t) for t in TOPICS} == TOPICS
        for name in TOPICS:
            assert api.subscriptions(name) >= {s.name for s in SUBSCRIPTIONS if s.topic == name}
        assert {dead_letter_topic(s.topic, s.name) for s in SUBSCRIPTIONS} <= api.plain_topics()
    finally:
        api.close()


def test_a_postback_is_on_the_topic_in_the_read_model_and_audited(platform: Platform):
    ana, campaign_id = enabled_affiliate_and_campaign(platform, f"a-{uuid.uuid4().hex[:6]}@example.com")
    response = platform.post("conversiones", "/conversiones", {
        "affiliate_id": ana, "campaign_id": campaign_id, "user_id": "c1", "conversion_value": "80.00",
        "conversion_type": "sale", "order_id": f"o-{uuid.uuid4().hex[:8]}"})
    assert response.status_code == 200, response.text
    conversion_id = response.json()["id"]

    # ConversionDetected on conversiones.eventos, read with the admin role on a subscription of its own.
    registry = SchemaRegistry.from_directory()
    reader = client(platform, token(platform))
    consumer = reader.subscribe(topic("conversiones.eventos"), f"test-reader-{uuid.uuid4().hex[:8]}",
                                initial_position=pulsar.InitialPosition.Earliest)
    try:
        deadline, found = time.monotonic() + 60, None
        while found is None and time.monotonic() < deadline:
            try:
                message = consumer.receive(2000)
            except pulsar.Timeout:
                continue
            consumer.acknowledge(message)
            properties = message.properties()
            if properties.get("event_type") == "ConversionDetected" and message.partition_key() == conversion_id:
                found = registry.decode("ConversionDetected", message.data(), int(properties["schema_version"]))
        assert found is not None, "ConversionDetected not on conversiones.eventos"
        assert (found["conversion_id"], found["affiliate_id"], found["campaign_id"]) == (conversion_id, ana, campaign_id)
    finally:
        consumer.unsubscribe()
        reader.close()

    listed = platform.get("conversiones", "/conversiones")["conversiones"]
    assert [c for c in listed if c["id"] == conversion_id][0]["status"] == "validated"
    trail = wait_until(lambda: (t := platform.get("auditoria", "/auditoria/eventos", correlation_id=conversion_id)
                                ["eventos"]) and "ComisionCalculada" in {e["event_type"] for e in t} and t,
                       60, what="the commission audited")
    commission = [e for e in trail if e["event_type"] == "ComisionCalculada"][0]
    assert platform.get("marketing", "/comisiones", conversion_id=conversion_id)["comisiones"][0]["monto"] == "8.00"
    assert commission["topic"] == "comisiones.eventos"


# -- (c) access control ---------------------------------------------------------------------------------
def test_an_outsider_without_a_token_cannot_publish(platform: Platform):
    outsider = client(platform, None, timeout_seconds=3)
    try:
        started = time.monotonic()
        # The broker closes an unauthenticated connection; the client retries until the operation
        # times out (it never says AuthenticationError).
        with pytest.raises(pulsar.Timeout):
            outsider.create_producer(topic("conversiones.eventos"))
        assert time.monotonic() - started < 15
    finally:
        outsider.close()
    assert httpx.get(platform.state()["pulsar_admin_url"] + "/admin/v2/clusters").status_code == 401


def test_a_service_may_use_only_its_own_topics_and_subscriptions(platform: Platform):
    afiliados = client(platform, token(platform, broker_role("afiliados")), timeout_seconds=5)
    marketing = client(platform, token(platform, broker_role("marketing")), timeout_seconds=5)
    try:
        afiliados.create_producer(topic("afiliados.eventos")).close()  # its own topic: allowed
        afiliados.create_producer(topic(dead_letter_topic("marketing.eventos", "afiliados-consumer"))).close()
        with pytest.raises(pulsar.AuthorizationError):  # another service's topic
            afiliados.create_producer(topic("marketing.eventos"))
        with pytest.raises(pulsar.AuthorizationError):  # a topic it does not subscribe to
            afiliados.subscribe(topic("conversiones.eventos"), "afiliados-snoop")
        with pytest.raises(pulsar.AuthorizationError):  # auditoria's subscription on a topic marketing reads
            marketing.subscribe(topic("afiliados.eventos"), "audit-consumer",
                                consumer_type=pulsar.ConsumerType.KeyShared)
    finally:
        afiliados.close()
        marketing.close()
    created = httpx.put(f"{platform.state()['pulsar_admin_url']}/admin/v2/persistent/public/default/rogue",
                        headers={"Authorization": f"Bearer {token(platform, broker_role('afiliados'))}"})
    assert created.status_code in (401, 403), created.text


# -- (d) provisioning ---------------------------------------------------------------------------------------
def test_provisioning_again_changes_nothing_and_a_wrong_partition_count_is_named(platform: Platform):
    state = platform.state()
    env = {**os.environ, "ALPES_BROKER_URL": state["broker_url"], "ALPES_PULSAR_ADMIN_URL": state["pulsar_admin_url"],
           "ALPES_PULSAR_TOKEN": token(platform)}
    started = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "alpes", "provision"], env=env, capture_output=True, text=True,
                         timeout=120)
    seconds = time.monotonic() - started
    assert run.returncode == 0, run.stderr
    out = " ".join(run.stdout.split())
    assert out.startswith("already provisioned: 6 topics, 16 dead-letter topics, 16 subscriptions"), out
    assert out.endswith("unchanged"), out
    print(f"\n`alpes provision` on a provisioned namespace: {seconds:.1f}s: {out}")

    wrong = contract_provisioning(authorization=True)
    wrong.topics["comisiones.eventos"] = 3
    with pytest.raises(ProvisioningError, match="comisiones.eventos has 8 partitions"):
        provision(state["pulsar_admin_url"], wrong, token=token(platform))
    denied = subprocess.run([sys.executable, "-m", "alpes", "provision"], capture_output=True, text=True, timeout=120,
                            env={**env, "ALPES_PULSAR_TOKEN": token(platform, broker_role("marketing"))})
    assert denied.returncode == 1 and "provisioning failed" in denied.stderr


# -- nack and dead letters on Apache Pulsar --------------------------------------------------------------
def test_a_poison_message_is_nacked_into_the_dead_letter_topic_and_alerted(platform: Platform):
    before = sum(c["dead_lettered"] for c in platform.get("marketing", "/health")["consumers"])
    event_id = f"poison-{uuid.uuid4().hex[:8]}"
    producer_client = client(platform, token(platform))
    try:
        producer_client.create_producer(topic("conversiones.eventos")).send(
            b"\x00not avro", partition_key=event_id,
            properties={"event_id": event_id, "event_type": "ConversionDetected", "schema_version": "2",
                        "occurred_at": "2026-11-28T00:00:00+00:00"})
        subscriptions = {s.name for s in SUBSCRIPTIONS if s.topic == "conversiones.eventos"}
        alerts = wait_until(lambda: (a := [x for x in platform.get("auditoria", "/sistema/alertas")["alertas"]
                                            if x["tipo"] == "dead_letter" and event_id in x["mensaje"]])
                            and len(a) == len(subscriptions) and a, 60, what="dead-letter alerts")
        assert {m for a in alerts for m in subscriptions if f"/{m} dead-lettered" in a["mensaje"]} == subscriptions
        # The client's DeadLetterPolicy stores it (the nack delay after the alert, which is sent as
        # the last delivery is nacked): payload intact, where it came from in its properties.
        for name in subscriptions:
            mine = wait_until(lambda: dead_letters(producer_client, dead_letter_topic("conversiones.eventos", name),
                                                   event_id), 30, what=f"the copy in {name}'s dead-letter topic")
            assert len(mine) == 1 and mine[0].data() == b"\x00not avro", name
            assert mine[0].properties()["REAL_TOPIC"].startswith(topic("conversiones.eventos")), name
    finally:
        producer_client.close()
    after = sum(c["dead_lettered"] for c in platform.get("marketing", "/health")["consumers"])
    assert after - before == 2  # marketing-consumer and analytics-consumer


def test_a_nacked_event_comes_back_after_later_events_of_its_key(platform: Platform):
    """Why processing failures are retried inside the consumer, not nacked: on Apache Pulsar a
    nacked message is redelivered after the later messages of its key the client already holds."""
    name = f"alpes-nack-probe-{uuid.uuid4().hex[:8]}"
    api = admin(platform)
    api.call("PUT", f"{api.topic(name)}/partitions", 2)
    probe = client(platform, token(platform))
    try:
        consumer = probe.subscribe(topic(name), "probe", consumer_type=pulsar.ConsumerType.KeyShared,
                                   negative_ack_redelivery_delay_ms=300, initial_position=pulsar.InitialPosition.Earliest)
        producer = probe.create_producer(topic(name), batching_type=pulsar.BatchingType.KeyBased)
        for n in (1, 2, 3):
            producer.send(f"e{n}".encode(), partition_key="one-aggregate")
        processed, nacked = [], False
        deadline = time.monotonic() + 20
        while len(processed) < 3 and time.monotonic() < deadline:
            try:
                message = consumer.receive(500)
            except pulsar.Timeout:
                continue
            if message.data() == b"e1" and not nacked:
                consumer.negative_acknowledge(message)  # what a failed handler would do with a nack
                nacked = True
                continue
            processed.append(message.data().decode())
            consumer.acknowledge(message)
        assert processed == ["e2", "e3", "e1"]
    finally:
        probe.close()
        api.call("DELETE", f"{api.topic(name)}/partitions?force=true")
        api.close()


# -- (e) SIGKILL of the broker's JVM: back on the same data, nothing lost -----------------------------------
def test_a_killed_service_does_not_restart_the_broker_and_a_killed_broker_comes_back(platform: Platform):
    broker = platform.pid("broker")
    assert b"PulsarStandaloneStarter" in Path(f"/proc/{broker}/cmdline").read_bytes()
    old = platform.kill("marketing")
    platform.wait_restarted("marketing", old, 90)
    assert platform.pid("broker") == broker and platform.state()["broker_restarts"] == 0  # no repair needed

    ana, campaign_id = enabled_affiliate_and_campaign(platform, f"k-{uuid.uuid4().hex[:6]}@example.com")
    # auditoria down: what marketing publishes now waits in the broker, on audit-consumer's backlog.
    platform.hold("auditoria", 25)
    api = admin(platform)
    try:
        def audit_consumer() -> dict:
            return api.call("GET", f"{api.topic('marketing.eventos')}/partitioned-stats")["subscriptions"]["audit-consumer"]
        wait_until(lambda: not audit_consumer()["consumers"], 60, what="auditoria's consumers gone")
        stored = platform.post("marketing", "/campanas", {"nombre": "Stored in the broker", "porcentaje_comision": 1})
        assert stored.status_code == 201
        wait_until(lambda: audit_consumer()["msgBacklog"] >= 1, 60, what="the event in the broker")
    finally:
        api.close()

    killed_at = time.monotonic()
    os.kill(platform.pid("broker"), signal.SIGKILL)
    # Written while the broker is down: in the outboxes, published once it is back.
    during = platform.post("marketing", "/campanas", {"nombre": "During the outage", "porcentaje_comision": 1})
    assert during.status_code == 201
    postback = platform.post("conversiones", "/conversiones", {
        "affiliate_id": ana, "campaign_id": campaign_id, "user_id": "c9", "conversion_value": "50.00",
        "conversion_type": "sale", "order_id": f"outage-{uuid.uuid4().hex[:8]}"})
    assert postback.status_code == 200, postback.text
    wait_until(lambda: platform.pid("broker") != broker, 60, what="the broker's JVM started again")
    assert platform.state()["broker_restarts"] == 1
    conversion_id = postback.json()["id"]
    wait_until(lambda: platform.get("marketing", "/comisiones", conversion_id=conversion_id)["comisiones"], 180,
               what="the commission of the postback sent during the outage")
    commissioned = time.monotonic() - killed_at
    # The campaign the killed broker kept, and the one an outbox kept while the broker was down.
    for what, campaign in (("stored in the broker", stored), ("written during the outage", during)):
        wait_until(lambda: platform.get("auditoria", "/auditoria/eventos", aggregate_id=campaign.json()["id"])
                   ["eventos"], 180, what=f"the campaign {what} audited once auditoria is back")
    for name in SERVICES:
        wait_until(lambda: answers(platform, name), 60, what=f"{name} healthy")
    assert wait_until(lambda: all(platform.get(n, "/health")["outbox"]["pending"] == 0 for n in SERVICES),
                      120, what="outboxes drained")
    events = platform.get("auditoria", "/auditoria/eventos", limit=10000)["eventos"]
    assert not [i for i, n in Counter(e["event_id"] for e in events).items() if n > 1]  # each exactly once
    assert platform.get("auditoria", "/auditoria/verificacion")["ok"]
    print(f"\nbroker SIGKILLed: the postback sent during the outage commissioned {commissioned:.1f}s after the "
          f"kill; broker restarts: {platform.state()['broker_restarts']}")
