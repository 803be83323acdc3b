from sqlalchemy import BigInteger, Column, Integer, MetaData, String, Table, Text

from alpes.kernel.db import UtcDateTime
from alpes.kernel.access import keys_table
from alpes.kernel.inbox import inbox_table
from alpes.kernel.outbox import outbox_table

metadata = MetaData()

audit_log = Table(
    "audit_log", metadata,
    Column("seq", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=False),
    Column("event_id", String(36), nullable=False, unique=True),
    Column("topic", String(120), nullable=False),
    Column("event_type", String(80), nullable=False, index=True),
    Column("schema_version", Integer, nullable=False),
    Column("aggregate_id", String(80), nullable=False, index=True),
    Column("occurred_at", UtcDateTime(), nullable=False, index=True),
    Column("correlation_id", String(36), nullable=False, index=True),
    Column("causation_id", String(36), nullable=False),
    Column("payload_json", Text, nullable=False),
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
    Column("recorded_at", UtcDateTime(), nullable=False),
    # Who caused the event (in the hash when present; null on records from before actors).
    Column("actor_id", String(64), index=True),
    Column("actor_role", String(16)),
    # What the payload says the record belongs to (domain.owners_of): an advertiser reads the records
    # of its campaigns (owners in campanas_auditadas), of their conversions and its own.
    Column("campana_id", String(80), index=True),
    Column("conversion_id", String(80), index=True),
    Column("anunciante_id", String(80), index=True),
)

# Each campaign's advertiser, from CampanaCreada (v5 on; null before campaigns had owners).
campanas_auditadas = Table(
    "campanas_auditadas", metadata,
    Column("campana_id", String(80), primary_key=True),
    Column("anunciante_id", String(80), index=True),
)

# Each conversion's campaign, from the first audited record naming both: the records that name
# only the conversion (a commission paid, a reversal) belong to the campaign's advertiser too.
conversiones_auditadas = Table(
    "conversiones_auditadas", metadata,
    Column("conversion_id", String(80), primary_key=True),
    Column("campana_id", String(80), nullable=False, index=True),
)

# The chain head, one row, locked while appending so records get consecutive seq numbers.
audit_head = Table(
    "audit_head", metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("seq", BigInteger, nullable=False),
    Column("hash", String(64), nullable=False),
)

# security-consumer
security_findings = Table(
    "security_findings", metadata,
    Column("audit_seq", BigInteger, primary_key=True, autoincrement=False),
    Column("event_type", String(80), nullable=False),
    Column("aggregate_id", String(80), nullable=False, index=True),
    Column("motivo", String(500), nullable=False),
    Column("detected_at", UtcDateTime(), nullable=False),
)

# compliance-consumer: how far the chain has been re-verified, and any break found.
compliance_state = Table(
    "compliance_state", metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("verified", BigInteger, nullable=False),
    Column("highest_seq", BigInteger, nullable=False),
    Column("broken_seq", BigInteger),
    Column("problem", String(300)),
    Column("updated_at", UtcDateTime(), nullable=False),
)

# monitoring-consumer
servicios = Table(
    "servicios", metadata,
    Column("instancia", String(200), primary_key=True),
    Column("servicio", String(40), nullable=False),
    Column("estado", String(20), nullable=False),
    Column("motivo", String(300)),
    Column("actualizado_en", UtcDateTime(), nullable=False),
)

# alerting-consumer
alertas = Table(
    "alertas", metadata,
    Column("event_id", String(36), primary_key=True),
    Column("servicio", String(40), nullable=False),
    Column("tipo", String(40), nullable=False),
    Column("mensaje", String(600), nullable=False),
    Column("creada_en", UtcDateTime(), nullable=False, index=True),
)

outbox = outbox_table(metadata)
inbox = inbox_table(metadata)
# This service's copy of the API keys (kernel/access.py).
claves_api = keys_table(metadata)
