"""What afiliados does with each message of its subscriptions (declared in alpes.contract)."""

from alpes.kernel.access import KeyRing
from alpes.kernel.runtime import ConsumerSpec

from . import handlers, tables


def consumer_specs() -> list[ConsumerSpec]:
    keys = KeyRing(tables.claves_api)
    return [
        ConsumerSpec("marketing.eventos", "afiliados-consumer", {
            "CampanaCreada": handlers.record_programa,
            **keys.handlers(),
        }),
        ConsumerSpec("comisiones.eventos", "afiliados-consumer", {
            "ComisionCalculada": handlers.record_comision,
            "ComisionAprobada": handlers.record_aprobacion,
            "ComisionPagada": handlers.record_pago,
            "ComisionRevertida": handlers.record_reversion,
        }),
    ]
