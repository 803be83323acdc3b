"""a caller's conversions per campaign and minute, read by the caller velocity rule (issue 11)

Revision ID: 0012_caller_minutes
Revises: 0011_outbox_traceparent
Create Date: 2026-12-06 03:30:00

Filled from the signals of the last two hours: the rule reads the hour up to a postback's
detection (reference.postback_facts), so older signals never count again (a conversion decided
later by the validation job is counted from the signals themselves, as before).
"""
from datetime import timedelta

import sqlalchemy as sa
from alembic import op

from alpes.kernel.db import UtcDateTime
from alpes.kernel.messages import utcnow

revision = '0012_caller_minutes'
down_revision = '0011_outbox_traceparent'
branch_labels = None
depends_on = None


def upgrade() -> None:
    caller_minutes = op.create_table(
        'caller_minutes',
        sa.Column('campaign_id', sa.String(length=36), nullable=False),
        sa.Column('caller_key', sa.String(length=80), nullable=False),
        sa.Column('minute', UtcDateTime(), nullable=False),
        sa.Column('shard', sa.Integer(), nullable=False),
        sa.Column('conversions', sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint('campaign_id', 'caller_key', 'minute', 'shard', name='pk_caller_minutes'),
    )
    signals = sa.table('conversion_signals', sa.column('campaign_id', sa.String()), sa.column('caller_key', sa.String()),
                       sa.column('detected_at', UtcDateTime()))
    counts: dict[tuple, int] = {}
    recent = sa.select(signals.c.campaign_id, signals.c.caller_key, signals.c.detected_at).where(
        signals.c.caller_key.is_not(None), signals.c.detected_at > utcnow() - timedelta(hours=2))
    for campaign_id, caller_key, detected_at in op.get_bind().execute(recent):
        key = (campaign_id, caller_key, detected_at.replace(second=0, microsecond=0))
        counts[key] = counts.get(key, 0) + 1
    if counts:
        op.bulk_insert(caller_minutes, [{"campaign_id": c, "caller_key": k, "minute": m, "shard": 0, "conversions": n}
                                        for (c, k, m), n in counts.items()])


def downgrade() -> None:
    op.drop_table('caller_minutes')
