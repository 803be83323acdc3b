"""postbacks: the fingerprint of each order key (same key, other parameters: 409) and the caller
each conversion came from (velocity counts per caller, with or without `ip`)

Revision ID: 0008_postback_keys
Revises: 0007_saga_backoff
Create Date: 2026-12-03 09:00:00
"""
import sqlalchemy as sa
from alembic import op

revision = '0008_postback_keys'
down_revision = '0007_saga_backoff'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # NULL on keys and signals stored before: such keys are taken as repeats, such conversions
    # are not counted per caller.
    with op.batch_alter_table('order_keys', schema=None) as batch_op:
        batch_op.add_column(sa.Column('fingerprint', sa.String(length=64), nullable=True))
    with op.batch_alter_table('conversion_signals', schema=None) as batch_op:
        batch_op.add_column(sa.Column('caller_key', sa.String(length=80), nullable=True))
        batch_op.create_index('ix_conversion_signals_campaign_caller', ['campaign_id', 'caller_key', 'detected_at'],
                              unique=False)


def downgrade() -> None:
    with op.batch_alter_table('conversion_signals', schema=None) as batch_op:
        batch_op.drop_index('ix_conversion_signals_campaign_caller')
        batch_op.drop_column('caller_key')
    with op.batch_alter_table('order_keys', schema=None) as batch_op:
        batch_op.drop_column('fingerprint')
