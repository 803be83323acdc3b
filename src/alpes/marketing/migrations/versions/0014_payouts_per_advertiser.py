"""payouts per advertiser: each payout pays the commissions of one advertiser's campaigns

Payouts made before this were all of campaigns without an advertiser (0013 gave every existing
campaign a null owner), so null, the operator's, is right for every existing row.

Revision ID: 0014_payouts_per_advertiser
Revises: 0013_advertisers
Create Date: 2026-12-05 03:00:00
"""
import sqlalchemy as sa
from alembic import op

revision = '0014_payouts_per_advertiser'
down_revision = '0013_advertisers'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('pagos', schema=None) as batch_op:
        batch_op.add_column(sa.Column('anunciante_id', sa.String(length=36), nullable=True))
        batch_op.create_index(batch_op.f('ix_pagos_anunciante_id'), ['anunciante_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('pagos', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_pagos_anunciante_id'))
        batch_op.drop_column('anunciante_id')
