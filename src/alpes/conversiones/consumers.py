"""What conversiones does with each message of its subscriptions (declared in alpes.contract)."""

from __future__ import annotations

from sqlalchemy.orm import Session

from alpes.kernel.access import KeyRing
from alpes.kernel.eventstore import EventStore
from alpes.kernel.inbox import Handlers
from alpes.kernel.messages import IncomingEvent, OutgoingEvent
from alpes.kernel.runtime import ConsumerSpec

from . import reference, saga_answers, tables


def consumer_specs(store: EventStore) -> list[ConsumerSpec]:
    """`store`: the service's conversion event store, for the compensation a denied commission appends."""
    def commission_denied(session: Session, event: IncomingEvent) -> list[OutgoingEvent]:
        return saga_answers.note_commission_denied(session, event, store)

    after_answers = saga_answers.noting_waiting_answers_first

    return [
        # marketing's booked answers of a batch are noted together at its end (answers_batch)
        ConsumerSpec("marketing.eventos", "conversiones-consumer", Handlers({
            "CampanaCreada": reference.learn_campana,
            # Advertisers' postback secret versions (signed postbacks: signed_postbacks.py).
            "AnuncianteRegistrado": reference.learn_anunciante,
            "SecretoPostbackRotado": reference.learn_secreto_rotado,
            **KeyRing(tables.claves_api).handlers(),
            "CampanaActivada": reference.learn_campana_estado,
            "CampanaPausada": reference.learn_campana_estado,
            "CampanaFinalizada": reference.learn_campana_estado,
            "CampanaActualizada": reference.learn_campana_terminos,
            "AfiliadoHabilitado": reference.learn_afiliado,
            "AfiliadoInhabilitado": reference.learn_afiliado_inhabilitado,
            "AfiliadoInscrito": reference.learn_inscripcion,
            "InscripcionSuspendida": reference.learn_inscripcion_estado,
            "InscripcionReactivada": reference.learn_inscripcion_estado,
            # marketing's answers to the conversion → commission saga
            "ComisionRegistrada": saga_answers.note_commission_booked,
            "ComisionDenegada": after_answers(commission_denied),
            "ReversionComisionRegistrada": after_answers(saga_answers.note_commission_reversed),
        }, batch=saga_answers.answers_batch)),
    ]
