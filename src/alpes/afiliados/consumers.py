"""What afiliados does with each message of its subscriptions (declared in alpes.contract)."""

from alpes.kernel.runtime import ConsumerSpec

from . import handlers


def consumer_specs() -> list[ConsumerSpec]:
    return [
        ConsumerSpec("marketing.eventos", "afiliados-consumer", {"CampanaCreada": handlers.record_programa}),
        ConsumerSpec("comisiones.eventos", "afiliados-consumer", {
            "ComisionCalculada": handlers.record_comision,
            "ComisionAprobada": handlers.record_aprobacion,
            "ComisionPagada": handlers.record_pago,
            "ComisionRevertida": handlers.record_reversion,
        }),
    ]
