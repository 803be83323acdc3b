"""What marketing does with each message of its subscriptions (declared in alpes.contract)."""

from alpes.kernel.runtime import ConsumerSpec

from . import campaigns, commissions, payouts, reporting, webhooks


def consumer_specs() -> list[ConsumerSpec]:
    return [
        # The webhook deliveries a consumed event owes are written with its effect (webhooks.py).
        ConsumerSpec("afiliados.eventos", "marketing-consumer", webhooks.delivered_kinds({
            "AfiliadoRegistrado": campaigns.note_registered_afiliado,
            "AfiliadoValidado": campaigns.enable_afiliado,
            "AfiliadoAprobado": campaigns.enable_afiliado,
            "AfiliadoReactivado": campaigns.enable_afiliado,
            "AfiliadoRechazado": campaigns.note_rejected_afiliado,
            "AfiliadoSuspendido": campaigns.disable_afiliado,
            "DatosPersonalesBorrados": campaigns.forget_personal_data,
        }, ("AfiliadoAprobado", "AfiliadoSuspendido"))),
        ConsumerSpec("conversiones.eventos", "marketing-consumer", webhooks.delivered_kinds({
            # The conversion → commission saga: book once and answer on marketing.eventos.
            "ConversionValidated": commissions.answer_comision_request,
            "CommissionRequested": commissions.answer_comision_request,
            "ConversionRejected": commissions.undo_compensated_comision,
            "ConversionRefunded": commissions.reverse_comision,
        }, ("ConversionValidated", "ConversionRejected", "ConversionRefunded"))),
        ConsumerSpec("conversiones.eventos", "analytics-consumer", {
            "ConversionDetected": reporting.count_detected,
            "ConversionValidated": reporting.count_validated,
            "ConversionRejected": reporting.count_rejected_conversion,
            "ConversionRefunded": reporting.count_refunded,
            "ClickRecorded": reporting.count_click,
            "ClicksRecorded": reporting.count_clicks,
        }),
        ConsumerSpec("comisiones.eventos", "reporting-consumer", {
            "ComisionCalculada": reporting.report_comision,
            "ComisionAprobada": reporting.report_approved_comision,
            "ComisionPagada": reporting.report_paid_comision,
            "ComisionRevertida": reporting.report_reversed_comision,
        }),
        ConsumerSpec("comisiones.eventos", "payment-consumer", {
            "ComisionCalculada": payouts.book_accrual,
            "ComisionRevertida": payouts.book_reversal,
            "PagoRealizado": payouts.book_payout,
        }),
    ]
