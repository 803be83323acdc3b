"""campaign terms and lifecycle: dates, landing URL, budget, windows, segmentation

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28 06:00:00
"""
import sqlalchemy as sa
from alembic import op

import alpes.kernel.db

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('campanas', schema=None) as batch_op:
        batch_op.add_column(sa.Column('fecha_inicio', alpes.kernel.db.UtcDateTime(), nullable=True))
        batch_op.add_column(sa.Column('fecha_fin', alpes.kernel.db.UtcDateTime(), nullable=True))
        batch_op.add_column(sa.Column('landing_url', sa.String(length=2000), nullable=True))
        batch_op.add_column(sa.Column('presupuesto', alpes.kernel.db.ScaledDecimal(), nullable=True))
        batch_op.add_column(sa.Column('ventana_atribucion_dias', sa.Integer(), server_default='30', nullable=False))
        batch_op.add_column(sa.Column('periodo_bloqueo_dias', sa.Integer(), server_default='30', nullable=False))
        batch_op.add_column(sa.Column('paises', sa.String(length=1000), server_default='', nullable=False))
        batch_op.add_column(sa.Column('canales', sa.String(length=1000), server_default='', nullable=False))
        batch_op.add_column(sa.Column('categorias', sa.String(length=1000), server_default='', nullable=False))
        batch_op.add_column(sa.Column('actualizada_en', alpes.kernel.db.UtcDateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('campanas', schema=None) as batch_op:
        for column in ('actualizada_en', 'categorias', 'canales', 'paises', 'periodo_bloqueo_dias',
                       'ventana_atribucion_dias', 'presupuesto', 'landing_url', 'fecha_fin', 'fecha_inicio'):
            batch_op.drop_column(column)
