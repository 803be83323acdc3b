"""What afiliados does with each message of its subscriptions (declared in alpes.contract)."""

from alpes.kernel.access import KeyRing
from alpes.kernel.runtime import ConsumerSpec

from . import handlers, tables


def consumer_specs() -> list[ConsumerSpec]:
    keys = KeyRing(tables.claves_api)
    return [
        ConsumerSpec("marketing.eventos", "afiliados-consumer", {
            "CampanaCreada": handlers.record_programa,
            "CampanaActivada": handlers.record_programa_estado,
            "CampanaPausada": handlers.record_programa_estado,
            "CampanaFinalizada": handlers.record_programa_estado,
            "CampanaActualizada": handlers.record_programa_nombre,
            "AfiliadoInscrito": handlers.record_inscripcion,
            **keys.handlers(),
        }),
        ConsumerSpec("comisiones.eventos", "afiliados-consumer", {
            "ComisionCalculada": handlers.record_comision,
            "ComisionAprobada": handlers.record_aprobacion,
            "ComisionPagada": handlers.record_pago,
            "ComisionRevertida": handlers.record_reversion,
        }),
    ]
