"""conversion figures projection

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28 06:00:00.000000

Backfilled from conversiones_view, which already holds every conversion's status and value
(in minor units), so a database with conversions gets the same figures a replay would give.
"""
import sqlalchemy as sa
from alembic import op

import alpes.kernel.db

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('conversion_figures',
    sa.Column('affiliate_id', sa.String(length=36), nullable=False),
    sa.Column('campaign_id', sa.String(length=36), nullable=False),
    sa.Column('currency', sa.String(length=3), nullable=False),
    sa.Column('detected', sa.Integer(), nullable=False),
    sa.Column('validated', sa.Integer(), nullable=False),
    sa.Column('rejected', sa.Integer(), nullable=False),
    sa.Column('validated_revenue', alpes.kernel.db.ScaledDecimal(), nullable=False),
    sa.PrimaryKeyConstraint('affiliate_id', 'campaign_id', 'currency', name='pk_conversion_figures')
    )
    with op.batch_alter_table('conversion_figures', schema=None) as batch_op:
        batch_op.create_index('ix_conversion_figures_campaign', ['campaign_id'], unique=False)

    op.execute(sa.text(
        "INSERT INTO conversion_figures"
        " (affiliate_id, campaign_id, currency, detected, validated, rejected, validated_revenue)"
        " SELECT affiliate_id, campaign_id, currency, COUNT(*),"
        " SUM(CASE WHEN status = 'validated' THEN 1 ELSE 0 END),"
        " SUM(CASE WHEN status = 'rejected' THEN 1 ELSE 0 END),"
        " SUM(CASE WHEN status = 'validated' THEN conversion_value ELSE 0 END)"
        " FROM conversiones_view GROUP BY affiliate_id, campaign_id, currency"))


def downgrade() -> None:
    with op.batch_alter_table('conversion_figures', schema=None) as batch_op:
        batch_op.drop_index('ix_conversion_figures_campaign')

    op.drop_table('conversion_figures')
