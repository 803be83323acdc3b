"""What conversiones does with each message of its subscriptions (declared in alpes.contract)."""

from alpes.kernel.runtime import ConsumerSpec

from . import handlers


def consumer_specs() -> list[ConsumerSpec]:
    return [
        ConsumerSpec("marketing.eventos", "conversiones-consumer", {
            "CampanaCreada": handlers.learn_campana,
            "AfiliadoHabilitado": handlers.learn_afiliado,
            "AfiliadoInhabilitado": handlers.learn_afiliado_inhabilitado,
        }),
    ]
