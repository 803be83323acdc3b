"""reporting: clicks and refunds per day, commission amounts by state, each commission's report state

Revision ID: 0006_reporting
Revises: 0005_ledger_lines
Create Date: 2026-11-28 06:40:00
"""
import sqlalchemy as sa
from alembic import op

import alpes.kernel.db

revision = '0006_reporting'
down_revision = '0005_ledger_lines'
branch_labels = None
depends_on = None


def _money(name: str) -> sa.Column:
    return sa.Column(name, alpes.kernel.db.ScaledDecimal(2), nullable=False, server_default='0')


def upgrade() -> None:
    with op.batch_alter_table('analitica_conversiones', schema=None) as batch_op:
        batch_op.add_column(sa.Column('clicks', sa.Integer(), nullable=False, server_default='0'))
        batch_op.add_column(sa.Column('reembolsadas', sa.Integer(), nullable=False, server_default='0'))
        batch_op.add_column(_money('ingresos_reembolsados'))
    with op.batch_alter_table('reporte_comisiones', schema=None) as batch_op:
        for name in ('monto_pendiente', 'monto_aprobado', 'monto_pagado', 'monto_revertido'):
            batch_op.add_column(_money(name))
    # Rows older than the split: their commissions are counted as pending (their later state
    # moves cannot be placed without reporte_comision_estado, which starts empty).
    op.execute("UPDATE reporte_comisiones SET monto_pendiente = monto")
    op.create_table('reporte_comision_estado',
    sa.Column('comision_id', sa.String(length=36), nullable=False),
    sa.Column('dia', sa.Date(), nullable=False),
    sa.Column('campana_id', sa.String(length=36), nullable=False),
    sa.Column('afiliado_id', sa.String(length=36), nullable=False),
    sa.Column('monto', alpes.kernel.db.ScaledDecimal(2), nullable=False),
    sa.Column('estado', sa.String(length=20), nullable=False),
    sa.PrimaryKeyConstraint('comision_id')
    )


def downgrade() -> None:
    op.drop_table('reporte_comision_estado')
    with op.batch_alter_table('reporte_comisiones', schema=None) as batch_op:
        for name in ('monto_revertido', 'monto_pagado', 'monto_aprobado', 'monto_pendiente'):
            batch_op.drop_column(name)
    with op.batch_alter_table('analitica_conversiones', schema=None) as batch_op:
        batch_op.drop_column('ingresos_reembolsados')
        batch_op.drop_column('reembolsadas')
        batch_op.drop_column('clicks')
