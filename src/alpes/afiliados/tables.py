from sqlalchemy import Column, Integer, LargeBinary, MetaData, String, Table, Text

from alpes.kernel.db import ScaledDecimal, UtcDateTime
from alpes.kernel.access import keys_table
from alpes.kernel.inbox import inbox_table
from alpes.kernel.outbox import outbox_table

metadata = MetaData()

afiliados = Table(
    "afiliados", metadata,
    Column("id", String(36), primary_key=True),
    Column("user_id", String(120), nullable=False, index=True),
    # Personal data (pii.py): email, name, document number and payment method, sealed together with
    # the affiliate's data key; null once erased (and for legacy rows until the sealing job runs).
    Column("datos_personales", Text),
    # Blind indexes (HMAC with the service's index key) of the normalized email and document number:
    # duplicates are found without the clear value. Not unique: a duplicate is stored, then rejected.
    Column("email_indice", String(64), index=True),
    Column("documento_indice", String(64), index=True),
    Column("datos_borrados_en", UtcDateTime()),  # erasure: the data key was shredded then
    # Legacy clear columns (before migration 0004): emptied by the sealing job, never written again.
    Column("email", String(254)),
    Column("nombre", String(200)),
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
    Column("numero_documento", String(20)),  # legacy clear column, like email
    Column("pais", String(2)),
    Column("metodo_pago", String(20)),  # legacy clear column, like email
    Column("motivo_suspension", String(500)),
    # The advertiser that registered (onboarded) the affiliate; null when an operator did. It may
    # read the affiliate and approve, suspend or reactivate it (tenancy.py).
    Column("registrado_por_anunciante", String(36), index=True),
)

# Data keys (pii.py): one per affiliate (id = the affiliate's id), wrapped with a master key, plus
# the service's blind-index key. Deleting an affiliate's row is the erasure of its personal data.
claves = Table(
    "claves", metadata,
    Column("id", String(36), primary_key=True),
    Column("kek_id", String(16), nullable=False),  # which master key wrapped it
    Column("clave", LargeBinary, nullable=False),  # nonce | wrapped key | tag
    Column("creada_en", UtcDateTime(), nullable=False),
)

programas = Table(
    "programas", metadata,
    Column("id", String(36), primary_key=True),
    Column("nombre", String(200), nullable=False),
    Column("porcentaje_comision", ScaledDecimal(4), nullable=False),
    Column("moneda", String(3), nullable=False),
    Column("creada_en", UtcDateTime(), nullable=False),
    # Its owner (CampanaCreada v5; null for campaigns created before campaigns had one) and its state
    # (the campaign's lifecycle events): affiliates see the active ones only.
    Column("anunciante_id", String(36), index=True),
    Column("estado", String(20), nullable=False, default="activa", server_default="activa"),
)

# Enrollments (AfiliadoInscrito on marketing.eventos): which affiliates are in which program, so an
# advertiser sees the affiliates of its programs. Kept apart from `programas` because the two arrive
# in any order (different partition keys): the join happens when reading.
inscripciones = Table(
    "inscripciones", metadata,
    Column("id", String(36), primary_key=True),
    Column("campana_id", String(36), nullable=False, index=True),
    Column("afiliado_id", String(36), nullable=False, index=True),
    Column("inscrita_en", UtcDateTime(), nullable=False),
)

outbox = outbox_table(metadata)
inbox = inbox_table(metadata)
# This service's copy of the API keys (kernel/access.py).
claves_api = keys_table(metadata)
