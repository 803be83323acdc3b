from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Date,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    UniqueConstraint,
)

from alpes.kernel.db import ScaledDecimal, UtcDateTime
from alpes.kernel.access import keys_table
from alpes.kernel.inbox import inbox_table
from alpes.kernel.outbox import outbox_table

metadata = MetaData()

campanas = Table(
    "campanas", metadata,
    Column("id", String(36), primary_key=True),
    Column("nombre", String(200), nullable=False),
    Column("porcentaje_comision", ScaledDecimal(4), nullable=False),
    Column("moneda", String(3), nullable=False),
    Column("estado", String(20), nullable=False),
    Column("creada_en", UtcDateTime(), nullable=False),
    Column("fecha_inicio", UtcDateTime()),
    Column("fecha_fin", UtcDateTime()),
    Column("landing_url", String(2000)),
    Column("presupuesto", ScaledDecimal(2)),
    Column("ventana_atribucion_dias", Integer, nullable=False, server_default="30"),
    Column("periodo_bloqueo_dias", Integer, nullable=False, server_default="30"),
    # Segmentation criteria as comma-separated codes (empty: any).
    Column("paises", String(1000), nullable=False, server_default=""),
    Column("canales", String(1000), nullable=False, server_default=""),
    Column("categorias", String(1000), nullable=False, server_default=""),
    Column("actualizada_en", UtcDateTime()),
    Column("min_segundos_click_conversion", Integer),
    # ultimo_click or primer_click: announced to conversiones, which attributes with it.
    Column("modelo_atribucion", String(20), nullable=False, server_default="ultimo_click"),
    # The advertiser that owns it; null on campaigns created before advertisers existed (operator's).
    Column("anunciante_id", String(36), index=True),
    # A conversion worth more than this (campaign currency) is held for review; null: no maximum.
    Column("valor_maximo_conversion", ScaledDecimal(2)),
)

# Advertisers (brands): they own campaigns, send their postbacks, pay their affiliates.
anunciantes = Table(
    "anunciantes", metadata,
    Column("id", String(36), primary_key=True),
    Column("nombre", String(200), nullable=False),
    # Hosts its campaigns' landing URLs may point to, comma-separated (a domain covers its subdomains).
    Column("dominios", String(2000), nullable=False, server_default=""),
    # The default maximum conversion value of its new campaigns; null: none.
    Column("valor_maximo_conversion", ScaledDecimal(2)),
    # The version of its postback signing secret (derived, never stored: kernel/request_signing.py);
    # the previous version stays valid until `secreto_anterior_hasta`.
    Column("secreto_version", Integer, nullable=False, server_default="1"),
    Column("secreto_anterior_hasta", UtcDateTime()),
    Column("creado_en", UtcDateTime(), nullable=False),
    Column("actualizado_en", UtcDateTime(), nullable=False),
)

# Affiliates marketing learned of on afiliados.eventos.
afiliados = Table(
    "afiliados", metadata,
    Column("afiliado_id", String(36), primary_key=True),
    Column("estado", String(20), nullable=False),
    Column("actualizado_en", UtcDateTime(), nullable=False),
    Column("pais", String(2)),  # from AfiliadoRegistrado v2; checked against campaign segmentation
    # sha256 of the email, announced on AfiliadoHabilitado v2 for conversiones' self-referral check;
    # the email itself is not kept here.
    Column("email_sha256", String(64)),
)

# Enrollments: an affiliate in a campaign, with its tracking link code (one per pair).
inscripciones = Table(
    "inscripciones", metadata,
    Column("id", String(36), primary_key=True),
    Column("campana_id", String(36), nullable=False),
    Column("afiliado_id", String(36), nullable=False, index=True),
    Column("link_code", String(16), nullable=False, unique=True),
    Column("canal", String(40)),
    Column("categoria", String(40)),
    Column("estado", String(20), nullable=False),
    Column("inscrita_en", UtcDateTime(), nullable=False),
    Column("actualizada_en", UtcDateTime(), nullable=False),
    UniqueConstraint("campana_id", "afiliado_id", name="uq_inscripciones_campana_afiliado"),
)

comisiones = Table(
    "comisiones", metadata,
    Column("id", String(36), primary_key=True),
    # One commission per conversion, by construction.
    Column("conversion_id", String(36), nullable=False, unique=True),
    Column("afiliado_id", String(36), nullable=False, index=True),
    Column("campana_id", String(36), nullable=False, index=True),
    Column("base", ScaledDecimal(2), nullable=False),
    Column("porcentaje", ScaledDecimal(4), nullable=False),
    Column("monto", ScaledDecimal(2), nullable=False),
    Column("moneda", String(3), nullable=False),
    Column("estado", String(20), nullable=False),
    Column("correlation_id", String(36), nullable=False),
    Column("calculada_en", UtcDateTime(), nullable=False),
    # Lifecycle. aprobable_desde = calculada_en + the campaign's lock period at calculation time
    # (null only for rows older than the lifecycle, which the migration backfills).
    Column("aprobable_desde", UtcDateTime()),
    Column("aprobada_en", UtcDateTime()),
    Column("pago_id", String(36)),
    Column("pagada_en", UtcDateTime()),
    Column("revertida_en", UtcDateTime()),
    Column("motivo_reversion", String(20)),
    # Lineage (null on rows older than commission rules): the rule set version (0: the campaign's
    # flat percentage), the rule, its kind, the cap that cut it, and the explanation as JSON.
    Column("momento_conversion", UtcDateTime()),
    Column("version_reglas", Integer),
    Column("regla_id", String(40)),
    Column("tipo_regla", String(10)),
    Column("limitado_por", String(20)),
    Column("explicacion", Text),
    # The click the conversion was attributed through (ConversionValidated v2); null: by ids, or older.
    Column("click_id", String(36)),
    Index("ix_comisiones_por_aprobar", "estado", "aprobable_desde"),
    Index("ix_comisiones_por_pagar", "estado", "pago_id", "afiliado_id"),
)

# Running totals of the commissions booked, written in the same transaction as each booking and
# reversal (the campaign's row locked first): what the tier count and the caps and budget read when
# a commission is calculated. Counting and summing the commissions themselves read every one of the
# period (a month's, or all time's), so booking slowed as a program grew (issue 11); these read at
# most 31 day rows, or one. Reversed commissions keep their amount here: a reversal gives no cap or
# budget back.
# By the conversion's UTC day (momento_conversion; rows older than commission rules have none and
# are only in the totals below): the tier count (not reversed) and the day/week/month cap sums.
comisiones_por_dia = Table(
    "comisiones_por_dia", metadata,
    Column("campana_id", String(36), nullable=False),
    Column("afiliado_id", String(36), nullable=False),
    Column("dia", Date, nullable=False),
    Column("no_revertidas", Integer, nullable=False),
    Column("monto", ScaledDecimal(2), nullable=False),
    PrimaryKeyConstraint("campana_id", "afiliado_id", "dia", name="pk_comisiones_por_dia"),
)
# All time, per affiliate in a campaign (the "total" cap) and per campaign (its budget).
gasto_por_afiliado = Table(
    "gasto_por_afiliado", metadata,
    Column("campana_id", String(36), nullable=False),
    Column("afiliado_id", String(36), nullable=False),
    Column("monto", ScaledDecimal(2), nullable=False),
    PrimaryKeyConstraint("campana_id", "afiliado_id", name="pk_gasto_por_afiliado"),
)
gasto_por_campana = Table(
    "gasto_por_campana", metadata,
    Column("campana_id", String(36), primary_key=True),
    Column("monto", ScaledDecimal(2), nullable=False),
)

# Commission rule sets: one row per version, never edited; the rules as ordered JSON.
reglas_comision = Table(
    "reglas_comision", metadata,
    Column("campana_id", String(36), nullable=False),
    Column("version", Integer, nullable=False),
    Column("vigente_desde", UtcDateTime(), nullable=False),
    Column("reglas", Text, nullable=False),
    Column("tope_monto", ScaledDecimal(2)),
    Column("tope_periodo", String(10)),
    PrimaryKeyConstraint("campana_id", "version", name="pk_reglas_comision"),
)

# analytics-consumer (conversiones.eventos): conversions per day, campaign and affiliate.
analitica_conversiones = Table(
    "analitica_conversiones", metadata,
    Column("dia", Date, nullable=False),
    Column("campana_id", String(36), nullable=False),
    Column("afiliado_id", String(36), nullable=False),
    Column("detectadas", Integer, nullable=False, default=0),
    Column("validadas", Integer, nullable=False, default=0),
    Column("rechazadas", Integer, nullable=False, default=0),
    Column("ingresos", ScaledDecimal(2), nullable=False, default=0),
    # Clicks (each click of ClicksRecorded) and refunds (ConversionRefunded), each on its own day.
    Column("clicks", Integer, nullable=False, default=0, server_default="0"),
    Column("reembolsadas", Integer, nullable=False, default=0, server_default="0"),
    Column("ingresos_reembolsados", ScaledDecimal(2), nullable=False, default=0, server_default="0"),
    PrimaryKeyConstraint("dia", "campana_id", "afiliado_id", name="pk_analitica_conversiones"),
)

# reporting-consumer (comisiones.eventos): commissions per day, campaign and affiliate.
reporte_comisiones = Table(
    "reporte_comisiones", metadata,
    Column("dia", Date, nullable=False),
    Column("campana_id", String(36), nullable=False),
    Column("afiliado_id", String(36), nullable=False),
    Column("comisiones", Integer, nullable=False, default=0),
    Column("monto", ScaledDecimal(2), nullable=False, default=0),
    # monto split by the commissions' current state, on the day each was calculated, so that
    # pendiente + aprobado + pagado + revertido = monto for every day.
    Column("monto_pendiente", ScaledDecimal(2), nullable=False, default=0, server_default="0"),
    Column("monto_aprobado", ScaledDecimal(2), nullable=False, default=0, server_default="0"),
    Column("monto_pagado", ScaledDecimal(2), nullable=False, default=0, server_default="0"),
    Column("monto_revertido", ScaledDecimal(2), nullable=False, default=0, server_default="0"),
    PrimaryKeyConstraint("dia", "campana_id", "afiliado_id", name="pk_reporte_comisiones"),
)

# reporting-consumer: each commission's report row and current state, to move its amount between
# states on the day it was calculated (ComisionPagada carries neither its campaign nor that day).
reporte_comision_estado = Table(
    "reporte_comision_estado", metadata,
    Column("comision_id", String(36), primary_key=True),
    Column("dia", Date, nullable=False),
    Column("campana_id", String(36), nullable=False),
    Column("afiliado_id", String(36), nullable=False),
    Column("monto", ScaledDecimal(2), nullable=False),
    Column("estado", String(20), nullable=False),
)

# payment-consumer (comisiones.eventos): the payment ledger, what is owed to each affiliate.
ledger_pagos = Table(
    "ledger_pagos", metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("afiliado_id", String(36), nullable=False, index=True),
    Column("comision_id", String(36), nullable=False),
    Column("tipo", String(20), nullable=False),
    Column("monto", ScaledDecimal(2), nullable=False),
    Column("moneda", String(3), nullable=False),
    Column("registrado_en", UtcDateTime(), nullable=False),
    # devengo, reversion, pago, compensacion: each at most once per commission.
    UniqueConstraint("comision_id", "tipo", name="uq_ledger_pagos_comision_tipo"),
)

outbox = outbox_table(metadata)
inbox = inbox_table(metadata)
# This service's copy of the API keys (kernel/access.py).
claves_api = keys_table(metadata)

# -- commission lifecycle: refunds, adjustments and payouts -------------------------------------
# Refunds marketing learned on conversiones.eventos, kept even when no commission was booked
# (rejected conversion, or the refund overtook the validation): a late commission is not booked.
conversiones_reembolsadas = Table(
    "conversiones_reembolsadas", metadata,
    Column("conversion_id", String(36), primary_key=True),
    Column("tipo", String(20), nullable=False),
    Column("motivo", String(500)),
    Column("reembolsada_en", UtcDateTime(), nullable=False),
)

# Conversions marketing answered ComisionDenegada for (the conversion → commission saga), or whose
# validation conversiones compensated with a rejection: never booked afterwards, and a repeated
# request gets the same answer. Durable, like every money decision.
comisiones_denegadas = Table(
    "comisiones_denegadas", metadata,
    Column("conversion_id", String(36), primary_key=True),
    Column("razon", String(60), nullable=False),
    Column("denegada_en", UtcDateTime(), nullable=False),
)

# Negative adjustments: a commission reversed after it went into a payout. Carried into the
# affiliate's next payout in the same currency (pago_id set then); never edited otherwise.
ajustes = Table(
    "ajustes", metadata,
    Column("id", String(36), primary_key=True),
    Column("afiliado_id", String(36), nullable=False),
    Column("comision_id", String(36), nullable=False, unique=True),
    Column("monto", ScaledDecimal(2), nullable=False),
    Column("moneda", String(3), nullable=False),
    Column("motivo", String(20), nullable=False),
    Column("creado_en", UtcDateTime(), nullable=False),
    Column("pago_id", String(36)),
    Index("ix_ajustes_pendientes", "afiliado_id", "moneda", "pago_id"),
)

pagos = Table(
    "pagos", metadata,
    Column("id", String(36), primary_key=True),
    # The advertiser paying: its campaigns' commissions only. Null: the operator's own campaigns
    # (and every payout made before payouts belonged to an advertiser).
    Column("anunciante_id", String(36), index=True),
    Column("afiliado_id", String(36), nullable=False, index=True),
    Column("moneda", String(3), nullable=False),
    # Written once, from the sum of pago_lineas in the transaction that inserts them.
    Column("monto", ScaledDecimal(2), nullable=False),
    Column("estado", String(20), nullable=False),
    Column("creado_en", UtcDateTime(), nullable=False),
    Column("pagado_en", UtcDateTime()),
)

pago_lineas = Table(
    "pago_lineas", metadata,
    Column("pago_id", String(36), nullable=False),
    Column("linea", Integer, nullable=False),
    Column("tipo", String(20), nullable=False),
    Column("referencia_id", String(36), nullable=False),
    Column("monto", ScaledDecimal(2), nullable=False),
    PrimaryKeyConstraint("pago_id", "linea", name="pk_pago_lineas"),
    # A commission or an adjustment is in one payout at most, by construction.
    UniqueConstraint("tipo", "referencia_id", name="uq_pago_lineas_referencia"),
)

# -- webhooks (marketing/webhooks.py) -------------------------------------------------------------
# Endpoints: an advertiser's, an affiliate's, or an operator's (platform-wide: propietario_id null).
# The signing secret is derived from the master key, the id and secreto_version, never stored.
webhooks = Table(
    "webhooks", metadata,
    Column("id", String(36), primary_key=True),
    Column("propietario_rol", String(16), nullable=False),
    Column("propietario_id", String(36)),
    Column("url", String(2000), nullable=False),
    Column("eventos", String(400), nullable=False),  # event kinds, comma-separated
    Column("descripcion", String(500)),
    Column("habilitado", Boolean, nullable=False),
    # Why it was disabled by the platform (consecutive failures); null when its owner did it or it is on.
    Column("deshabilitado_motivo", String(300)),
    Column("deshabilitado_en", UtcDateTime()),
    Column("fallos_consecutivos", Integer, nullable=False, server_default="0"),
    Column("secreto_version", Integer, nullable=False, server_default="1"),
    Column("secreto_anterior_hasta", UtcDateTime()),
    Column("creado_en", UtcDateTime(), nullable=False),
    Column("actualizado_en", UtcDateTime(), nullable=False),
    Index("ix_webhooks_propietario", "propietario_rol", "propietario_id"),
)

# One row per (endpoint, event), written in the transaction of the fact that causes it. The body is
# built then and sent byte for byte on every attempt. `id` orders the deliveries of one object:
# two events of one object are causally ordered, so their transactions are too.
webhook_entregas = Table(
    "webhook_entregas", metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("webhook_id", String(36), nullable=False),
    Column("event_id", String(36), nullable=False),
    Column("tipo", String(40), nullable=False),
    Column("objeto_id", String(36), nullable=False),
    Column("cuerpo", Text, nullable=False),
    Column("estado", String(12), nullable=False),  # pendiente, entregada, fallida
    Column("intentos", Integer, nullable=False, server_default="0"),
    # When it is due; while a dispatcher holds it, the end of that dispatcher's lease.
    Column("proximo_intento_en", UtcDateTime(), nullable=False),
    Column("primer_intento_en", UtcDateTime()),
    Column("entregada_en", UtcDateTime()),
    Column("ultimo_status", Integer),
    Column("ultima_latencia_ms", Integer),
    Column("ultimo_error", String(500)),
    Column("creada_en", UtcDateTime(), nullable=False),
    UniqueConstraint("webhook_id", "event_id", name="uq_webhook_entregas_webhook_event"),
    Index("ix_webhook_entregas_pendientes", "estado", "proximo_intento_en"),
    Index("ix_webhook_entregas_objeto", "webhook_id", "objeto_id", "estado"),
)

# Every attempt of every delivery: the delivery log.
webhook_intentos = Table(
    "webhook_intentos", metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("entrega_id", BigInteger().with_variant(Integer, "sqlite"), nullable=False, index=True),
    Column("numero", Integer, nullable=False),
    Column("en", UtcDateTime(), nullable=False),
    Column("status", Integer),
    Column("latencia_ms", Integer, nullable=False),
    Column("error", String(500)),
)
