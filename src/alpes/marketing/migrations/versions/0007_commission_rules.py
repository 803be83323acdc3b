"""commission rules: versioned rule sets per campaign, lineage of each commission

Revision ID: 0007_commission_rules
Revises: 0006_reporting
Create Date: 2026-11-28 06:40:00
"""
import sqlalchemy as sa
from alembic import op

import alpes.kernel.db

revision = '0007_commission_rules'
down_revision = '0006_reporting'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('reglas_comision',
    sa.Column('campana_id', sa.String(length=36), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('vigente_desde', alpes.kernel.db.UtcDateTime(), nullable=False),
    sa.Column('reglas', sa.Text(), nullable=False),
    sa.Column('tope_monto', alpes.kernel.db.ScaledDecimal(), nullable=True),
    sa.Column('tope_periodo', sa.String(length=10), nullable=True),
    sa.PrimaryKeyConstraint('campana_id', 'version', name='pk_reglas_comision')
    )
    with op.batch_alter_table('comisiones', schema=None) as batch_op:
        batch_op.add_column(sa.Column('momento_conversion', alpes.kernel.db.UtcDateTime(), nullable=True))
        batch_op.add_column(sa.Column('version_reglas', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('regla_id', sa.String(length=40), nullable=True))
        batch_op.add_column(sa.Column('tipo_regla', sa.String(length=10), nullable=True))
        batch_op.add_column(sa.Column('limitado_por', sa.String(length=20), nullable=True))
        batch_op.add_column(sa.Column('explicacion', sa.Text(), nullable=True))
        batch_op.create_index('ix_comisiones_topes', ['campana_id', 'afiliado_id', 'momento_conversion'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('comisiones', schema=None) as batch_op:
        batch_op.drop_index('ix_comisiones_topes')
        for column in ('explicacion', 'limitado_por', 'tipo_regla', 'regla_id', 'version_reglas', 'momento_conversion'):
            batch_op.drop_column(column)
    op.drop_table('reglas_comision')
