"""running totals of the commissions booked: per day, per affiliate and per campaign (issue 11)

Revision ID: 0018_comisiones_acumuladas
Revises: 0017_comisiones_topes_covering
Create Date: 2026-12-06 03:00:00

Booking a commission counted the affiliate's commissions of the month and summed what the caps and
the budget had spent, reading every commission of the period (0017 made that read the index only,
but still one entry per commission): booking slowed as a program grew. The totals are kept now,
written with each booking and reversal, and filled here from the commissions already booked; the
covering index those reads used goes.
"""
import sqlalchemy as sa
from alembic import op

from alpes.kernel.db import ScaledDecimal

revision = '0018_comisiones_acumuladas'
down_revision = '0017_comisiones_topes_covering'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'comisiones_por_dia',
        sa.Column('campana_id', sa.String(length=36), nullable=False),
        sa.Column('afiliado_id', sa.String(length=36), nullable=False),
        sa.Column('dia', sa.Date(), nullable=False),
        sa.Column('no_revertidas', sa.Integer(), nullable=False),
        sa.Column('monto', ScaledDecimal(2), nullable=False),
        sa.PrimaryKeyConstraint('campana_id', 'afiliado_id', 'dia', name='pk_comisiones_por_dia'),
    )
    op.create_table(
        'gasto_por_afiliado',
        sa.Column('campana_id', sa.String(length=36), nullable=False),
        sa.Column('afiliado_id', sa.String(length=36), nullable=False),
        sa.Column('monto', ScaledDecimal(2), nullable=False),
        sa.PrimaryKeyConstraint('campana_id', 'afiliado_id', name='pk_gasto_por_afiliado'),
    )
    op.create_table(
        'gasto_por_campana',
        sa.Column('campana_id', sa.String(length=36), nullable=False),
        sa.Column('monto', ScaledDecimal(2), nullable=False),
        sa.PrimaryKeyConstraint('campana_id'),
    )
    # DATE() of the stored UTC datetime is its UTC day on SQLite (text 'YYYY-MM-DD', as SQLAlchemy's
    # Date stores it) and on MariaDB. monto is an integer of cents: the sums are exact.
    op.execute(sa.text(
        "INSERT INTO comisiones_por_dia (campana_id, afiliado_id, dia, no_revertidas, monto)"
        " SELECT campana_id, afiliado_id, DATE(momento_conversion),"
        " SUM(CASE WHEN estado = 'revertida' THEN 0 ELSE 1 END), SUM(monto)"
        " FROM comisiones WHERE momento_conversion IS NOT NULL"
        " GROUP BY campana_id, afiliado_id, DATE(momento_conversion)"))
    op.execute(sa.text(
        "INSERT INTO gasto_por_afiliado (campana_id, afiliado_id, monto)"
        " SELECT campana_id, afiliado_id, SUM(monto) FROM comisiones GROUP BY campana_id, afiliado_id"))
    op.execute(sa.text(
        "INSERT INTO gasto_por_campana (campana_id, monto)"
        " SELECT campana_id, SUM(monto) FROM comisiones GROUP BY campana_id"))
    op.drop_index('ix_comisiones_topes_v2', table_name='comisiones')


def downgrade() -> None:
    op.create_index('ix_comisiones_topes_v2', 'comisiones',
                    ['campana_id', 'afiliado_id', 'momento_conversion', 'estado', 'monto'], unique=False)
    op.drop_table('gasto_por_campana')
    op.drop_table('gasto_por_afiliado')
    op.drop_table('comisiones_por_dia')
