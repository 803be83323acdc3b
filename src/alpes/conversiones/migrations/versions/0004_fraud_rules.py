"""fraud rules: campaign dates and click-to-conversion minimum, affiliate email hash, postback signals

Revision ID: 0004_fraud_rules
Revises: 0003_clicks
Create Date: 2026-11-28 06:40:00
"""
import sqlalchemy as sa
from alembic import op

import alpes.kernel.db

revision = '0004_fraud_rules'
down_revision = '0003_clicks'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('ref_campanas', schema=None) as batch_op:
        batch_op.add_column(sa.Column('fecha_inicio', alpes.kernel.db.UtcDateTime(), nullable=True))
        batch_op.add_column(sa.Column('fecha_fin', alpes.kernel.db.UtcDateTime(), nullable=True))
        batch_op.add_column(sa.Column('min_segundos_click_conversion', sa.Integer(), nullable=True))
    with op.batch_alter_table('ref_afiliados', schema=None) as batch_op:
        batch_op.add_column(sa.Column('email_sha256', sa.String(length=64), nullable=True))
    op.create_table('conversion_signals',
    sa.Column('conversion_id', sa.String(length=36), nullable=False),
    sa.Column('campaign_id', sa.String(length=36), nullable=False),
    sa.Column('ip', sa.String(length=45), nullable=True),
    sa.Column('customer_email_sha256', sa.String(length=64), nullable=True),
    sa.Column('detected_at', alpes.kernel.db.UtcDateTime(), nullable=False),
    sa.PrimaryKeyConstraint('conversion_id')
    )
    with op.batch_alter_table('conversion_signals', schema=None) as batch_op:
        batch_op.create_index('ix_conversion_signals_campaign_ip', ['campaign_id', 'ip', 'detected_at'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('conversion_signals', schema=None) as batch_op:
        batch_op.drop_index('ix_conversion_signals_campaign_ip')
    op.drop_table('conversion_signals')
    with op.batch_alter_table('ref_afiliados', schema=None) as batch_op:
        batch_op.drop_column('email_sha256')
    with op.batch_alter_table('ref_campanas', schema=None) as batch_op:
        batch_op.drop_column('min_segundos_click_conversion')
        batch_op.drop_column('fecha_fin')
        batch_op.drop_column('fecha_inicio')
