from sqlalchemy import Column, Index, Integer, MetaData, String, Table, Text

from alpes.kernel.db import ScaledDecimal, UtcDateTime
from alpes.kernel.inbox import inbox_table
from alpes.kernel.outbox import outbox_table

metadata = MetaData()

afiliados = Table(
    "afiliados", metadata,
    Column("id", String(36), primary_key=True),
    Column("user_id", String(120), nullable=False, index=True),
    Column("email", String(254), nullable=False, unique=True),
    Column("nombre", String(200), nullable=False),
    Column("estado", String(20), nullable=False, index=True),
    Column("motivos", Text, nullable=False, default=""),
    Column("registrado_en", UtcDateTime(), nullable=False),
    Column("validado_en", UtcDateTime()),
    # Earnings fed from comisiones.eventos (exact decimal money).
    Column("comisiones", Integer, nullable=False, default=0),
    Column("ganancias_pendientes", ScaledDecimal(2), nullable=False, default=0),
    # The rest of the commission lifecycle: approved (unpaid), paid, and reversed amounts.
    Column("ganancias_aprobadas", ScaledDecimal(2), nullable=False, default=0, server_default="0"),
    Column("ganancias_pagadas", ScaledDecimal(2), nullable=False, default=0, server_default="0"),
    Column("ganancias_revertidas", ScaledDecimal(2), nullable=False, default=0, server_default="0"),
    # Identity and payment data; null for affiliates registered before they were asked for.
    Column("tipo_documento", String(20)),
    Column("numero_documento", String(20)),
    Column("pais", String(2)),
    Column("metodo_pago", String(20)),
    Column("motivo_suspension", String(500)),
    # Not unique: a second registration with a taken document is stored, then rejected.
    Index("ix_afiliados_documento", "tipo_documento", "numero_documento"),
)

programas = Table(
    "programas", metadata,
    Column("id", String(36), primary_key=True),
    Column("nombre", String(200), nullable=False),
    Column("porcentaje_comision", ScaledDecimal(4), nullable=False),
    Column("moneda", String(3), nullable=False),
    Column("creada_en", UtcDateTime(), nullable=False),
)

outbox = outbox_table(metadata)
inbox = inbox_table(metadata)
