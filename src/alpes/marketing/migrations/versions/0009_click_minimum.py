"""campaign minimum seconds from click to conversion (too_fast), announced in CampanaCreada v3

Revision ID: 0009_click_minimum
Revises: 0008_affiliate_email_hash
Create Date: 2026-11-28 07:00:00
"""
import sqlalchemy as sa
from alembic import op

revision = '0009_click_minimum'
down_revision = '0008_affiliate_email_hash'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('campanas', schema=None) as batch_op:
        batch_op.add_column(sa.Column('min_segundos_click_conversion', sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('campanas', schema=None) as batch_op:
        batch_op.drop_column('min_segundos_click_conversion')
