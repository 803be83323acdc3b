"""What marketing does with each message of its subscriptions (declared in alpes.contract)."""

from alpes.kernel.runtime import ConsumerSpec

from . import handlers


def consumer_specs() -> list[ConsumerSpec]:
    return [
        ConsumerSpec("afiliados.eventos", "marketing-consumer", {
            "AfiliadoRegistrado": handlers.note_registered_afiliado,
            "AfiliadoValidado": handlers.enable_afiliado,
            "AfiliadoAprobado": handlers.enable_afiliado,
            "AfiliadoReactivado": handlers.enable_afiliado,
            "AfiliadoRechazado": handlers.note_rejected_afiliado,
            "AfiliadoSuspendido": handlers.disable_afiliado,
        }),
        ConsumerSpec("conversiones.eventos", "marketing-consumer", {
            # The conversion → commission saga: book once and answer on marketing.eventos.
            "ConversionValidated": handlers.answer_comision_request,
            "CommissionRequested": handlers.answer_comision_request,
            "ConversionRejected": handlers.undo_compensated_comision,
            "ConversionRefunded": handlers.reverse_comision,
        }),
        ConsumerSpec("conversiones.eventos", "analytics-consumer", {
            "ConversionDetected": handlers.count_detected,
            "ConversionValidated": handlers.count_validated,
            "ConversionRejected": handlers.count_rejected_conversion,
            "ConversionRefunded": handlers.count_refunded,
            "ClickRecorded": handlers.count_click,
        }),
        ConsumerSpec("comisiones.eventos", "reporting-consumer", {
            "ComisionCalculada": handlers.report_comision,
            "ComisionAprobada": handlers.report_approved_comision,
            "ComisionPagada": handlers.report_paid_comision,
            "ComisionRevertida": handlers.report_reversed_comision,
        }),
        ConsumerSpec("comisiones.eventos", "payment-consumer", {
            "ComisionCalculada": handlers.book_accrual,
            "ComisionRevertida": handlers.book_reversal,
            "PagoRealizado": handlers.book_payout,
        }),
    ]
