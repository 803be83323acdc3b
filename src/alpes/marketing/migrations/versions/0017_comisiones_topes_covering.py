"""the commission-cap index also holds estado and monto (issue 11)

Revision ID: 0017_comisiones_topes_covering
Revises: 0016_webhooks
Create Date: 2026-12-05 07:15:00

Booking a commission counts the affiliate's commissions of the month in the campaign (not reversed)
and sums what the caps and the budget have spent: with estado and monto in the index those read
the index only, not a table row per commission (the count grew with every commission booked).
The new index starts with the old one's columns, so it serves every query the old one did.
"""
from alembic import op

revision = '0017_comisiones_topes_covering'
down_revision = '0016_webhooks'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index('ix_comisiones_topes_v2', 'comisiones',
                    ['campana_id', 'afiliado_id', 'momento_conversion', 'estado', 'monto'], unique=False)
    op.drop_index('ix_comisiones_topes', table_name='comisiones')


def downgrade() -> None:
    op.create_index('ix_comisiones_topes', 'comisiones', ['campana_id', 'afiliado_id', 'momento_conversion'],
                    unique=False)
    op.drop_index('ix_comisiones_topes_v2', table_name='comisiones')
