"""What auditoria does with each message of its subscriptions (declared in alpes.contract)."""

from alpes.contract import BUSINESS_TOPICS
from alpes.kernel.runtime import ConsumerSpec

from . import handlers


class _EveryEvent(dict):
    """The audit log takes every event type, including ones added after this code was written."""

    def get(self, _event_type, default=None):
        return handlers.audit_event


def consumer_specs() -> list[ConsumerSpec]:
    audit = [ConsumerSpec(topic, "audit-consumer", _EveryEvent()) for topic in BUSINESS_TOPICS]
    return audit + [
        ConsumerSpec("auditoria.eventos", "security-consumer", {"EventoAuditado": handlers.flag_security_event}),
        ConsumerSpec("auditoria.eventos", "compliance-consumer", {"EventoAuditado": handlers.verify_audited_link}),
        ConsumerSpec("sistema.eventos", "monitoring-consumer", {
            "ServicioIniciado": handlers.track_service, "ServicioDetenido": handlers.track_service,
            "ServicioDegradado": handlers.track_service, "ServicioRecuperado": handlers.track_service,
        }),
        ConsumerSpec("sistema.eventos", "alerting-consumer", {
            "ServicioDegradado": handlers.raise_alert, "MensajeEnviadoADeadLetter": handlers.raise_alert,
            "SagaAtascada": handlers.raise_alert,
        }),
    ]
