"""affiliate email hash, announced on AfiliadoHabilitado v2 for the self-referral check

Revision ID: 0008_affiliate_email_hash
Revises: 0007_commission_rules
Create Date: 2026-11-28 06:50:00
"""
import sqlalchemy as sa
from alembic import op

revision = '0008_affiliate_email_hash'
down_revision = '0007_commission_rules'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('afiliados', schema=None) as batch_op:
        batch_op.add_column(sa.Column('email_sha256', sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('afiliados', schema=None) as batch_op:
        batch_op.drop_column('email_sha256')
