"""The messaging contract, in one visible place.

Topics with their partition counts, and every subscription with the service that owns it.
Nothing here connects to anything; it is data read by the broker adapter, the
provisioning step and each service's composition root.
"""

from __future__ import annotations

from dataclasses import dataclass

SERVICES: dict[str, int] = {
    "afiliados": 8001,
    "conversiones": 8002,
    "marketing": 8003,
    "auditoria": 8004,
}
# The web console (alpes/consola): a fifth process, a backend-for-frontend over the services' HTTP APIs.
CONSOLE_PORT = 8000

TOPICS: dict[str, int] = {
    "afiliados.eventos": 4,
    "conversiones.eventos": 6,
    "marketing.eventos": 4,
    "comisiones.eventos": 8,
    "auditoria.eventos": 4,
    "sistema.eventos": 2,
}

BUSINESS_TOPICS = ("afiliados.eventos", "conversiones.eventos", "marketing.eventos", "comisiones.eventos")


# How long a subscription's consumer waits to fill a batch (Subscription.batch_wait_ms).
CHAIN_MS = 20
READ_MODEL_MS = 100


@dataclass(frozen=True)
class Subscription:
    topic: str
    name: str
    service: str
    purpose: str
    # How long its consumer waits to fill a batch (the client's batch-receive timeout) when fewer
    # than a batch's worth of messages wait. Each batch is a transaction and a commit, so below
    # saturation a longer wait costs fewer of them; under a backlog batches are full either way.
    # CHAIN_MS on the chain from a postback to its audited commission (and for references, alerts,
    # affiliates' status), READ_MODEL_MS for read models, re-checks and the audit of other events.
    batch_wait_ms: int = CHAIN_MS


SUBSCRIPTIONS: tuple[Subscription, ...] = (
    # The table of the architecture contract.
    Subscription("afiliados.eventos", "audit-consumer", "auditoria", "append to the hash-chained audit log",
                 READ_MODEL_MS),
    Subscription("afiliados.eventos", "marketing-consumer", "marketing", "enable/disable affiliates for programs"),
    Subscription("conversiones.eventos", "analytics-consumer", "marketing", "conversion analytics per campaign/affiliate/day",
                 READ_MODEL_MS),
    Subscription("conversiones.eventos", "marketing-consumer", "marketing", "compute the commission of validated conversions"),
    Subscription("marketing.eventos", "afiliados-consumer", "afiliados", "catalogue of programs affiliates may join"),
    Subscription("marketing.eventos", "conversiones-consumer", "conversiones", "affiliate/campaign state used to validate conversions"),
    Subscription("comisiones.eventos", "reporting-consumer", "marketing", "commission reporting per campaign/affiliate/day",
                 READ_MODEL_MS),
    Subscription("comisiones.eventos", "afiliados-consumer", "afiliados", "affiliate earnings",
                 READ_MODEL_MS),
    Subscription("comisiones.eventos", "payment-consumer", "marketing", "payment ledger entries",
                 READ_MODEL_MS),
    Subscription("auditoria.eventos", "security-consumer", "auditoria", "security findings from audited events",
                 READ_MODEL_MS),
    Subscription("auditoria.eventos", "compliance-consumer", "auditoria", "incremental verification of the hash chain",
                 READ_MODEL_MS),
    Subscription("sistema.eventos", "monitoring-consumer", "auditoria", "status of every service instance"),
    Subscription("sistema.eventos", "alerting-consumer", "auditoria", "alerts on degraded services, dead letters and stuck sagas"),
    # The audit service reads every business topic, not only afiliados.eventos.
    Subscription("conversiones.eventos", "audit-consumer", "auditoria", "append to the hash-chained audit log",
                 READ_MODEL_MS),
    Subscription("marketing.eventos", "audit-consumer", "auditoria", "append to the hash-chained audit log",
                 READ_MODEL_MS),
    Subscription("comisiones.eventos", "audit-consumer", "auditoria", "append to the hash-chained audit log"),
)


def subscriptions_of(service: str) -> list[Subscription]:
    return [s for s in SUBSCRIPTIONS if s.service == service]


# -- what each service publishes, and what a broker with authorization lets it do ------------------
# The topics each service produces to (its events, its lifecycle and dead-letter alerts on
# sistema.eventos); besides these it writes only the dead-letter topics of its own subscriptions.
# tests/test_contract.py checks this against the OutgoingEvents the code builds.
PUBLISHES: dict[str, tuple[str, ...]] = {
    "afiliados": ("afiliados.eventos", "sistema.eventos"),
    "conversiones": ("conversiones.eventos", "sistema.eventos"),
    "marketing": ("marketing.eventos", "comisiones.eventos", "sistema.eventos"),
    "auditoria": ("auditoria.eventos", "sistema.eventos"),
}


# -- which event types travel on which topic ------------------------------------------------------
# Every event type (one per src/alpes/schemas/<Event>.v<N>.avsc) and the topic it is published on;
# the AsyncAPI document (alpes/asyncapi.py) is built from it. tests/test_broker_contract.py checks it
# against the OutgoingEvents the code builds, and that every schema has a topic.
EVENT_TOPICS: dict[str, str] = {
    # afiliados
    "AfiliadoRegistrado": "afiliados.eventos",
    "AfiliadoValidado": "afiliados.eventos",
    "AfiliadoRechazado": "afiliados.eventos",
    "AfiliadoAprobado": "afiliados.eventos",
    "AfiliadoSuspendido": "afiliados.eventos",
    "AfiliadoReactivado": "afiliados.eventos",
    "DatosPersonalesBorrados": "afiliados.eventos",
    # conversiones
    "ClickRecorded": "conversiones.eventos",  # retired (RETIRED_EVENTS)
    "ClicksRecorded": "conversiones.eventos",
    "ConversionDetected": "conversiones.eventos",
    "ConversionValidated": "conversiones.eventos",
    "ConversionRejected": "conversiones.eventos",
    "ConversionHeld": "conversiones.eventos",
    "ConversionRefunded": "conversiones.eventos",
    "CommissionRequested": "conversiones.eventos",
    # marketing: advertisers, keys, campaigns, enrollments, affiliate states, the saga's answers
    "AnuncianteRegistrado": "marketing.eventos",
    "AnuncianteActualizado": "marketing.eventos",
    "SecretoPostbackRotado": "marketing.eventos",
    "ClaveApiEmitida": "marketing.eventos",
    "ClaveApiRevocada": "marketing.eventos",
    "CampanaCreada": "marketing.eventos",
    "CampanaActivada": "marketing.eventos",
    "CampanaPausada": "marketing.eventos",
    "CampanaFinalizada": "marketing.eventos",
    "CampanaActualizada": "marketing.eventos",
    "ReglasComisionActualizadas": "marketing.eventos",
    "AfiliadoInscrito": "marketing.eventos",
    "InscripcionSuspendida": "marketing.eventos",
    "InscripcionReactivada": "marketing.eventos",
    "AfiliadoHabilitado": "marketing.eventos",
    "AfiliadoInhabilitado": "marketing.eventos",
    "ComisionRegistrada": "marketing.eventos",
    "ComisionDenegada": "marketing.eventos",
    "ReversionComisionRegistrada": "marketing.eventos",
    # marketing: the commission lifecycle and payouts
    "ComisionCalculada": "comisiones.eventos",
    "ComisionAprobada": "comisiones.eventos",
    "ComisionRevertida": "comisiones.eventos",
    "ComisionPagada": "comisiones.eventos",
    "PagoCreado": "comisiones.eventos",
    "PagoRealizado": "comisiones.eventos",
    # auditoria
    "EventoAuditado": "auditoria.eventos",  # retired (RETIRED_EVENTS)
    "EventosAuditados": "auditoria.eventos",
    # sistema.eventos: see SYSTEM_EVENT_PUBLISHERS
    "ServicioIniciado": "sistema.eventos",
    "ServicioDetenido": "sistema.eventos",
    "ServicioDegradado": "sistema.eventos",
    "ServicioRecuperado": "sistema.eventos",
    "MensajeEnviadoADeadLetter": "sistema.eventos",
    "SagaAtascada": "sistema.eventos",
    "WebhookDeshabilitado": "sistema.eventos",
}

# sistema.eventos is written by every service: the runtime's notices (kernel/runtime.py) by all of
# them, the rest by the service named. Every other topic has one publisher (PUBLISHES).
SYSTEM_EVENT_PUBLISHERS: dict[str, tuple[str, ...]] = {
    **{event: tuple(SERVICES) for event in ("ServicioIniciado", "ServicioDetenido", "ServicioDegradado",
                                            "ServicioRecuperado", "MensajeEnviadoADeadLetter")},
    "SagaAtascada": ("conversiones",),
    "WebhookDeshabilitado": ("marketing",),
}


# Event types no service emits any more. Their consumers still read them (messages already in a
# backlog or retained on the topic), and their schemas stay to decode them.
RETIRED_EVENTS: frozenset[str] = frozenset({
    "ClickRecorded",  # one event per click; now ClicksRecorded, one per batch of a link's clicks (issue 11)
    "EventoAuditado",  # one event per audit record; now EventosAuditados, one per batch of records (issue 11)
})


def publishers_of(event_type: str) -> tuple[str, ...]:
    """The services that publish an event type, in SERVICES order (none for a retired one)."""
    topic = EVENT_TOPICS[event_type]
    if event_type in RETIRED_EVENTS:
        return ()
    if topic == "sistema.eventos":
        return SYSTEM_EVENT_PUBLISHERS[event_type]
    return tuple(service for service, topics in PUBLISHES.items() if topic in topics)


def dead_letter_topic(topic: str, subscription: str) -> str:
    """Where a subscription's unprocessable messages go (kernel/consumer.py, and the client's
    DeadLetterPolicy on Apache Pulsar)."""
    return f"{topic}-{subscription}-DLQ"


DEAD_LETTER_TOPICS: tuple[str, ...] = tuple(dead_letter_topic(s.topic, s.name) for s in SUBSCRIPTIONS)

# The broker role (the JWT subject) of each service on Apache Pulsar with authorization; `admin` is
# the super-user that provisions.
ADMIN_ROLE = "admin"


def broker_role(service: str) -> str:
    return f"alpes-{service}"


def topic_permissions() -> dict[str, dict[str, tuple[str, ...]]]:
    """topic -> role -> actions, least privilege: `consume` on the topics a service subscribes to,
    `produce` on those it publishes to and on its subscriptions' dead-letter topics. (Reading a
    topic's stats for the backlog in /health needs either, so nothing more.)"""
    grants: dict[str, dict[str, set[str]]] = {}
    for service, topics in PUBLISHES.items():
        for topic in topics:
            grants.setdefault(topic, {}).setdefault(broker_role(service), set()).add("produce")
    for s in SUBSCRIPTIONS:
        grants.setdefault(s.topic, {}).setdefault(broker_role(s.service), set()).add("consume")
        grants.setdefault(dead_letter_topic(s.topic, s.name), {}).setdefault(broker_role(s.service), set()).add("produce")
    return {topic: {role: tuple(sorted(actions)) for role, actions in sorted(roles.items())}
            for topic, roles in sorted(grants.items())}


def subscription_roles() -> dict[str, tuple[str, ...]]:
    """subscription name -> the roles that may use it (its owner's): another service that may
    consume the topic cannot attach to it and take its messages."""
    roles: dict[str, set[str]] = {}
    for s in SUBSCRIPTIONS:
        roles.setdefault(s.name, set()).add(broker_role(s.service))
    return {name: tuple(sorted(r)) for name, r in sorted(roles.items())}


# Namespace policies provisioned on Apache Pulsar. Retention keeps acknowledged messages (and the
# dead-letter topics, which have no subscription) for a week or 2 GB; the backlog quota (which
# Pulsar requires to be below the retention size) holds producers when a subscription falls 1 GB
# behind: the outbox keeps the events and retries, nothing is evicted.
NAMESPACE_RETENTION = {"retentionTimeInMinutes": 7 * 24 * 60, "retentionSizeInMB": 2048}
NAMESPACE_BACKLOG_QUOTA = {"limitSize": 1024 ** 3, "limitTime": -1, "policy": "producer_request_hold"}
