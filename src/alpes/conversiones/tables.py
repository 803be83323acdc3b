from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
)

from alpes.kernel.access import keys_table
from alpes.kernel.db import ScaledDecimal, UtcDateTime
from alpes.kernel.eventstore import event_store_table
from alpes.kernel.inbox import inbox_table
from alpes.kernel.outbox import outbox_table
from alpes.kernel.request_signing import replay_table

metadata = MetaData()

# The write side: the source of truth.
event_store = event_store_table(metadata)

# Postback idempotency: one conversion per order id and scope, durable, no TTL. The scope is the
# campaign's advertiser (`anunciante:<id>`, as Stripe scopes keys per account), or the campaign
# itself (`campana:<id>`) when it has none or is not known yet; keys stored before advertisers
# existed are per campaign (and still found by campaign: commands.order_keys). The one unique key
# is the primary key: racing postbacks meet on one index (two unique ones deadlock on InnoDB).
# The fingerprint (sha256 of the postback's parameters) tells a repeat (same id) from a conflict
# (409); NULL on keys stored before it (taken as repeats).
order_keys = Table(
    "order_keys", metadata,
    Column("scope", String(80), nullable=False),
    Column("campaign_id", String(36), nullable=False),
    Column("order_id", String(120), nullable=False),
    Column("conversion_id", String(36), nullable=False),
    Column("fingerprint", String(64)),
    PrimaryKeyConstraint("scope", "order_id", name="pk_order_keys"),
    Index("ix_order_keys_campaign_order", "campaign_id", "order_id"),
)

# Read side: projection fed from the event store in the same transaction as each append.
conversiones_view = Table(
    "conversiones_view", metadata,
    Column("id", String(36), primary_key=True),
    Column("affiliate_id", String(36), nullable=False, index=True),
    Column("campaign_id", String(36), nullable=False, index=True),
    Column("user_id", String(120), nullable=False),
    Column("conversion_value", ScaledDecimal(2), nullable=False),
    Column("currency", String(3), nullable=False),
    Column("conversion_type", String(20), nullable=False),
    Column("order_id", String(120)),
    Column("status", String(20), nullable=False),
    Column("reason", String(80)),
    Column("timestamp", UtcDateTime(), nullable=False),
    Column("updated_at", UtcDateTime(), nullable=False),
    Index("ix_conversiones_view_timestamp", "timestamp", "id"),
    Index("ix_conversiones_view_status", "status", "timestamp"),
)

# Read side: figures per affiliate, campaign and currency (money is never summed across
# currencies), fed by the same projection call as conversiones_view. pending = detected -
# validated - rejected.
conversion_figures = Table(
    "conversion_figures", metadata,
    Column("affiliate_id", String(36), nullable=False),
    Column("campaign_id", String(36), nullable=False),
    Column("currency", String(3), nullable=False),
    Column("detected", Integer, nullable=False),
    Column("validated", Integer, nullable=False),
    Column("rejected", Integer, nullable=False),
    Column("validated_revenue", ScaledDecimal(2), nullable=False),
    PrimaryKeyConstraint("affiliate_id", "campaign_id", "currency", name="pk_conversion_figures"),
    Index("ix_conversion_figures_campaign", "campaign_id"),
)

# Every table built only from the event store: what a replay deletes and rebuilds.
projection_tables = (conversiones_view, conversion_figures)

# Reference data learned from marketing.eventos (conversiones-consumer).
ref_afiliados = Table(
    "ref_afiliados", metadata,
    Column("afiliado_id", String(36), primary_key=True),
    Column("estado", String(20), nullable=False),
    Column("updated_at", UtcDateTime(), nullable=False),
    Column("email_sha256", String(64)),  # hex; compared with the customer's for self-referral
)
ref_campanas = Table(
    "ref_campanas", metadata,
    Column("campana_id", String(36), primary_key=True),
    Column("estado", String(20), nullable=False),
    Column("moneda", String(3), nullable=False),
    Column("updated_at", UtcDateTime(), nullable=False),
    Column("landing_url", String(2000)),  # where its tracking links redirect; None: links answer 404
    Column("ventana_atribucion_dias", Integer, nullable=False, server_default="30"),
    Column("fecha_inicio", UtcDateTime()),  # None: open-ended
    Column("fecha_fin", UtcDateTime()),
    # None: not enforced (the campaign set no minimum, or was announced before CampanaCreada v3).
    Column("min_segundos_click_conversion", Integer),
    # ultimo_click or primer_click (CampanaCreada v4); campaigns announced before it: last click.
    Column("modelo_atribucion", String(20), nullable=False, server_default="ultimo_click"),
    # The advertiser that owns it (CampanaCreada v5); None: operator-owned, or announced before v5.
    Column("anunciante_id", String(36), index=True),
    # In the campaign's currency; a conversion worth more is held for review. None: no maximum.
    Column("valor_maximo_conversion", ScaledDecimal(2)),
)

# Advertisers' postback signing secrets, by version (the secrets themselves are derived, never
# stored: kernel/request_signing.py). AnuncianteRegistrado is version 1; each
# SecretoPostbackRotado moves to its version and keeps the one before valid until
# `secreto_anterior_hasta` (24 h after the rotation). An advertiser not known here signs with 1.
ref_anunciantes = Table(
    "ref_anunciantes", metadata,
    Column("anunciante_id", String(36), primary_key=True),
    Column("secreto_version", Integer, nullable=False),
    Column("secreto_anterior_hasta", UtcDateTime()),
    Column("updated_at", UtcDateTime(), nullable=False),
)

# Enrollments learned from marketing.eventos: which affiliate and campaign a tracking link is for.
ref_inscripciones = Table(
    "ref_inscripciones", metadata,
    Column("link_code", String(16), primary_key=True),
    Column("inscripcion_id", String(36), nullable=False, unique=True),
    Column("afiliado_id", String(36), nullable=False),
    Column("campana_id", String(36), nullable=False),
    Column("activa", Boolean, nullable=False),
    Column("updated_at", UtcDateTime(), nullable=False),
    Index("ix_ref_inscripciones_campana_afiliado", "campana_id", "afiliado_id"),
)

# Clicks on tracking links: their own table, not the conversion event store (many more
# clicks than conversions; a click is a fact about a link, not about a conversion).
clicks = Table(
    "clicks", metadata,
    Column("id", String(36), primary_key=True),
    Column("link_code", String(16), nullable=False, index=True),
    Column("affiliate_id", String(36), nullable=False),
    Column("campaign_id", String(36), nullable=False),
    Column("clicked_at", UtcDateTime(), nullable=False),
    Column("ip", String(45)),
    Column("user_agent", String(500)),
    Column("referrer", String(2000)),
    # The visitor's cookie (alpes_vid): links the visitor's clicks for first/last-click attribution.
    Column("visitor_id", String(32)),
    Index("ix_clicks_visitor", "campaign_id", "visitor_id", "clicked_at"),
)

# Which click a conversion was attributed through (write side, beside the event store like
# order_keys): validation reads it back to apply the campaign's attribution window.
click_attributions = Table(
    "click_attributions", metadata,
    Column("conversion_id", String(36), primary_key=True),
    Column("click_id", String(36), nullable=False, index=True),
)

# Fraud signals a postback carried (write side, like click_attributions): its IP, and only the
# sha256 of the customer's email (privacy: the address itself is never stored nor sent); and who
# sent it (caller_key: its address, or its API key once callers have keys), counted by velocity.
conversion_signals = Table(
    "conversion_signals", metadata,
    Column("conversion_id", String(36), primary_key=True),
    Column("campaign_id", String(36), nullable=False),
    Column("ip", String(45)),
    Column("customer_email_sha256", String(64)),
    Column("detected_at", UtcDateTime(), nullable=False),
    Column("caller_key", String(80)),
    Index("ix_conversion_signals_campaign_ip", "campaign_id", "ip", "detected_at"),
    Index("ix_conversion_signals_campaign_caller", "campaign_id", "caller_key", "detected_at"),
    # What reference.forget_unread_signals deletes by: the oldest first, without a scan.
    Index("ix_conversion_signals_detected_at", "detected_at"),
)

# A caller's conversions per campaign and UTC minute of detection (issue 11): what the caller
# velocity rule reads first. Counting the caller's signals of the last hour read one index entry per
# conversion, so a busy caller's every postback read thousands; these add up, in at most
# 61 × shards rows, to a bound from above, and the exact count runs only when that bound reaches
# the limit (reference.postback_facts). Written in each postback's transaction, with its signals.
# shard: 0 on SQLite (one writer at a time anyway); elsewhere 0-7 by conversion id, so that one
# caller's concurrent postbacks do not all queue for one row's lock until their commits.
caller_minutes = Table(
    "caller_minutes", metadata,
    Column("campaign_id", String(36), nullable=False),
    Column("caller_key", String(80), nullable=False),
    Column("minute", UtcDateTime(), nullable=False),
    Column("shard", Integer, nullable=False),
    Column("conversions", Integer, nullable=False),
    PrimaryKeyConstraint("campaign_id", "caller_key", "minute", "shard", name="pk_caller_minutes"),
    # What reference.forget_unread_signals deletes by, a minute at a time (written once per row).
    Index("ix_caller_minutes_minute", "minute"),
)

# The conversion → commission saga's log (see saga.py). Not a projection: it also records
# marketing's answers and the retries after timeouts, which are not in the event store, so a
# replay leaves it alone. saga_id = conversion id = the flow's correlation id.
sagas = Table(
    "sagas", metadata,
    Column("saga_id", String(36), primary_key=True),
    Column("estado", String(20), nullable=False),  # running, stuck, completed, compensated
    Column("paso_actual", String(30), nullable=False),
    Column("intentos", Integer, nullable=False),  # commission requests sent (ConversionValidated + retries)
    Column("esperando_desde", UtcDateTime()),  # set while waiting on marketing: the timeout counts from it
    # When the saga asks again if no answer came: the timeout, then (stuck) a capped backoff. None on
    # sagas logged before it existed: they wait the plain timeout from esperando_desde.
    Column("reintentar_en", UtcDateTime()),
    Column("resultado", String(120)),
    Column("created_at", UtcDateTime(), nullable=False),
    Column("updated_at", UtcDateTime(), nullable=False),
    Index("ix_sagas_estado_esperando", "estado", "esperando_desde"),
)
saga_pasos = Table(
    "saga_pasos", metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("saga_id", String(36), nullable=False),
    Column("paso", String(30), nullable=False),
    Column("estado", String(20), nullable=False),  # waiting, done, failed
    Column("started_at", UtcDateTime(), nullable=False),
    Column("finished_at", UtcDateTime()),
    Column("detalle", String(500)),
    Index("ix_saga_pasos_saga", "saga_id", "paso", "estado"),
)

# Signed postbacks already accepted: a replay inside the 5-minute window is refused.
firmas_usadas = replay_table(metadata)

outbox = outbox_table(metadata)
inbox = inbox_table(metadata)
# This service's copy of the API keys (kernel/access.py).
claves_api = keys_table(metadata)
