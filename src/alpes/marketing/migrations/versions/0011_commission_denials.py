"""the conversion → commission saga: commissions denied (or compensated) per conversion

Revision ID: 0011_commission_denials
Revises: 0010_attribution_and_click
Create Date: 2026-11-28 08:15:00
"""
import sqlalchemy as sa
from alembic import op

import alpes.kernel.db

revision = '0011_commission_denials'
down_revision = '0010_attribution_and_click'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('comisiones_denegadas',
    sa.Column('conversion_id', sa.String(length=36), nullable=False),
    sa.Column('razon', sa.String(length=60), nullable=False),
    sa.Column('denegada_en', alpes.kernel.db.UtcDateTime(), nullable=False),
    sa.PrimaryKeyConstraint('conversion_id')
    )


def downgrade() -> None:
    op.drop_table('comisiones_denegadas')
