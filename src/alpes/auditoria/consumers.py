"""What auditoria does with each message of its subscriptions (declared in alpes.contract)."""

from alpes.contract import BUSINESS_TOPICS
from alpes.kernel.access import KeyRing
from alpes.kernel.inbox import Handlers
from alpes.kernel.runtime import ConsumerSpec

from . import handlers, tables


class _EveryEvent(Handlers):
    """The audit log takes every event type, including ones added after this code was written.
    `also`: what some types teach besides (API keys, campaign owners), learnt in the same
    transaction right after the event is audited, so no event is learnt without its record.
    A consumer batch's records are written together at its end (handlers.audit_batch)."""

    def __init__(self, also: dict | None = None) -> None:
        super().__init__(batch=handlers.audit_batch)
        self.also = also or {}

    def get(self, event_type, default=None):
        learn = self.also.get(event_type)
        if learn is None:
            return handlers.audit_event

        def audit_and_learn(session, event):
            return handlers.audit_event(session, event) + (learn(session, event) or [])
        return audit_and_learn


def consumer_specs() -> list[ConsumerSpec]:
    # marketing.eventos also carries the API keys (every service verifies locally) and the campaigns'
    # owners (an advertiser reads the records of its own campaigns).
    learnt_from_marketing = {**KeyRing(tables.claves_api).handlers(), "CampanaCreada": handlers.learn_campaign_owner}
    audit = [ConsumerSpec(topic, "audit-consumer", _EveryEvent(learnt_from_marketing if topic == "marketing.eventos"
                                                               else None))
             for topic in BUSINESS_TOPICS]
    return audit + [
        # EventoAuditado (one record each) is retired: still read from a backlog.
        ConsumerSpec("auditoria.eventos", "security-consumer", {
            "EventosAuditados": handlers.flag_security_events, "EventoAuditado": handlers.flag_security_events}),
        ConsumerSpec("auditoria.eventos", "compliance-consumer",
                     Handlers({"EventosAuditados": handlers.verify_audited_links,
                               "EventoAuditado": handlers.verify_audited_links}, batch=handlers.compliance_batch)),
        ConsumerSpec("sistema.eventos", "monitoring-consumer", {
            "ServicioIniciado": handlers.track_service, "ServicioDetenido": handlers.track_service,
            "ServicioDegradado": handlers.track_service, "ServicioRecuperado": handlers.track_service,
        }),
        ConsumerSpec("sistema.eventos", "alerting-consumer", {
            "ServicioDegradado": handlers.raise_alert, "MensajeEnviadoADeadLetter": handlers.raise_alert,
            "SagaAtascada": handlers.raise_alert, "WebhookDeshabilitado": handlers.raise_alert,
        }),
    ]
