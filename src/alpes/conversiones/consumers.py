"""What conversiones does with each message of its subscriptions (declared in alpes.contract)."""

from alpes.kernel.runtime import ConsumerSpec

from . import handlers


def consumer_specs() -> list[ConsumerSpec]:
    return [
        ConsumerSpec("marketing.eventos", "conversiones-consumer", {
            "CampanaCreada": handlers.learn_campana,
            "CampanaActivada": handlers.learn_campana_estado,
            "CampanaPausada": handlers.learn_campana_estado,
            "CampanaFinalizada": handlers.learn_campana_estado,
            "AfiliadoHabilitado": handlers.learn_afiliado,
            "AfiliadoInhabilitado": handlers.learn_afiliado_inhabilitado,
            "AfiliadoInscrito": handlers.learn_inscripcion,
            "InscripcionSuspendida": handlers.learn_inscripcion_estado,
            "InscripcionReactivada": handlers.learn_inscripcion_estado,
        }),
    ]
