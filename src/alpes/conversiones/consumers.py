"""What conversiones does with each message of its subscriptions (declared in alpes.contract)."""

from alpes.kernel.codec import SchemaRegistry
from alpes.kernel.eventstore import EventStore
from alpes.kernel.runtime import ConsumerSpec

from . import handlers


def consumer_specs(store: EventStore | None = None) -> list[ConsumerSpec]:
    """`store`: the conversion event store, for the compensations a denied commission appends."""
    store = store or handlers.event_store(SchemaRegistry.from_directory())
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
            # marketing's answers to the conversion → commission saga
            "ComisionRegistrada": handlers.note_commission_booked,
            "ComisionDenegada": handlers.note_commission_denied(store),
            "ReversionComisionRegistrada": handlers.note_commission_reversed,
        }),
    ]
