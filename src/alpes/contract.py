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

TOPICS: dict[str, int] = {
    "afiliados.eventos": 4,
    "conversiones.eventos": 6,
    "marketing.eventos": 4,
    "comisiones.eventos": 8,
    "auditoria.eventos": 4,
    "sistema.eventos": 2,
}

BUSINESS_TOPICS = ("afiliados.eventos", "conversiones.eventos", "marketing.eventos", "comisiones.eventos")


@dataclass(frozen=True)
class Subscription:
    topic: str
    name: str
    service: str
    purpose: str


SUBSCRIPTIONS: tuple[Subscription, ...] = (
    # The table of the architecture contract.
    Subscription("afiliados.eventos", "audit-consumer", "auditoria", "append to the hash-chained audit log"),
    Subscription("afiliados.eventos", "marketing-consumer", "marketing", "enable/disable affiliates for programs"),
    Subscription("conversiones.eventos", "analytics-consumer", "marketing", "conversion analytics per campaign/affiliate/day"),
    Subscription("conversiones.eventos", "marketing-consumer", "marketing", "compute the commission of validated conversions"),
    Subscription("marketing.eventos", "afiliados-consumer", "afiliados", "catalogue of programs affiliates may join"),
    Subscription("marketing.eventos", "conversiones-consumer", "conversiones", "affiliate/campaign state used to validate conversions"),
    Subscription("comisiones.eventos", "reporting-consumer", "marketing", "commission reporting per campaign/affiliate/day"),
    Subscription("comisiones.eventos", "afiliados-consumer", "afiliados", "affiliate earnings"),
    Subscription("comisiones.eventos", "payment-consumer", "marketing", "payment ledger entries"),
    Subscription("auditoria.eventos", "security-consumer", "auditoria", "security findings from audited events"),
    Subscription("auditoria.eventos", "compliance-consumer", "auditoria", "incremental verification of the hash chain"),
    Subscription("sistema.eventos", "monitoring-consumer", "auditoria", "status of every service instance"),
    Subscription("sistema.eventos", "alerting-consumer", "auditoria", "alerts on stopped/degraded services and dead letters"),
    # The audit service reads every business topic, not only afiliados.eventos.
    Subscription("conversiones.eventos", "audit-consumer", "auditoria", "append to the hash-chained audit log"),
    Subscription("marketing.eventos", "audit-consumer", "auditoria", "append to the hash-chained audit log"),
    Subscription("comisiones.eventos", "audit-consumer", "auditoria", "append to the hash-chained audit log"),
)


def subscriptions_of(service: str) -> list[Subscription]:
    return [s for s in SUBSCRIPTIONS if s.service == service]
