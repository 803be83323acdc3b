"""commission lifecycle: approval date, payouts and their lines, negative adjustments, refunds

Revision ID: 0004_commission_lifecycle
Revises: 0003_enrollment
Create Date: 2026-11-28 06:20:00
"""
from datetime import timedelta

import sqlalchemy as sa
from alembic import op

import alpes.kernel.db

revision = '0004_commission_lifecycle'
down_revision = '0003_enrollment'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('comisiones', schema=None) as batch_op:
        batch_op.add_column(sa.Column('aprobable_desde', alpes.kernel.db.UtcDateTime(), nullable=True))
        batch_op.add_column(sa.Column('aprobada_en', alpes.kernel.db.UtcDateTime(), nullable=True))
        batch_op.add_column(sa.Column('pago_id', sa.String(length=36), nullable=True))
        batch_op.add_column(sa.Column('pagada_en', alpes.kernel.db.UtcDateTime(), nullable=True))
        batch_op.add_column(sa.Column('revertida_en', alpes.kernel.db.UtcDateTime(), nullable=True))
        batch_op.add_column(sa.Column('motivo_reversion', sa.String(length=20), nullable=True))
        batch_op.create_index('ix_comisiones_por_aprobar', ['estado', 'aprobable_desde'], unique=False)
        batch_op.create_index('ix_comisiones_por_pagar', ['estado', 'pago_id', 'afiliado_id'], unique=False)
    _backfill_aprobable_desde()

    op.create_table('conversiones_reembolsadas',
    sa.Column('conversion_id', sa.String(length=36), nullable=False),
    sa.Column('tipo', sa.String(length=20), nullable=False),
    sa.Column('motivo', sa.String(length=500), nullable=True),
    sa.Column('reembolsada_en', alpes.kernel.db.UtcDateTime(), nullable=False),
    sa.PrimaryKeyConstraint('conversion_id')
    )
    op.create_table('ajustes',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('afiliado_id', sa.String(length=36), nullable=False),
    sa.Column('comision_id', sa.String(length=36), nullable=False),
    sa.Column('monto', alpes.kernel.db.ScaledDecimal(), nullable=False),
    sa.Column('moneda', sa.String(length=3), nullable=False),
    sa.Column('motivo', sa.String(length=20), nullable=False),
    sa.Column('creado_en', alpes.kernel.db.UtcDateTime(), nullable=False),
    sa.Column('pago_id', sa.String(length=36), nullable=True),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('comision_id')
    )
    with op.batch_alter_table('ajustes', schema=None) as batch_op:
        batch_op.create_index('ix_ajustes_pendientes', ['afiliado_id', 'moneda', 'pago_id'], unique=False)
    op.create_table('pagos',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('afiliado_id', sa.String(length=36), nullable=False),
    sa.Column('moneda', sa.String(length=3), nullable=False),
    sa.Column('monto', alpes.kernel.db.ScaledDecimal(), nullable=False),
    sa.Column('estado', sa.String(length=20), nullable=False),
    sa.Column('creado_en', alpes.kernel.db.UtcDateTime(), nullable=False),
    sa.Column('pagado_en', alpes.kernel.db.UtcDateTime(), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('pagos', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_pagos_afiliado_id'), ['afiliado_id'], unique=False)
    op.create_table('pago_lineas',
    sa.Column('pago_id', sa.String(length=36), nullable=False),
    sa.Column('linea', sa.Integer(), nullable=False),
    sa.Column('tipo', sa.String(length=20), nullable=False),
    sa.Column('referencia_id', sa.String(length=36), nullable=False),
    sa.Column('monto', alpes.kernel.db.ScaledDecimal(), nullable=False),
    sa.PrimaryKeyConstraint('pago_id', 'linea', name='pk_pago_lineas'),
    sa.UniqueConstraint('tipo', 'referencia_id', name='uq_pago_lineas_referencia')
    )


def _backfill_aprobable_desde() -> None:
    """Commissions calculated before the lifecycle existed wait their campaign's lock period too."""
    comisiones = sa.table('comisiones', sa.column('id', sa.String), sa.column('campana_id', sa.String),
                          sa.column('calculada_en', alpes.kernel.db.UtcDateTime()),
                          sa.column('aprobable_desde', alpes.kernel.db.UtcDateTime()))
    campanas = sa.table('campanas', sa.column('id', sa.String), sa.column('periodo_bloqueo_dias', sa.Integer))
    bind = op.get_bind()
    rows = bind.execute(sa.select(comisiones.c.id, comisiones.c.calculada_en, campanas.c.periodo_bloqueo_dias)
                        .select_from(comisiones.join(campanas, campanas.c.id == comisiones.c.campana_id))).all()
    for comision_id, calculada_en, dias in rows:
        bind.execute(sa.update(comisiones).where(comisiones.c.id == comision_id)
                     .values(aprobable_desde=calculada_en + timedelta(days=dias)))


def downgrade() -> None:
    op.drop_table('pago_lineas')
    with op.batch_alter_table('pagos', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_pagos_afiliado_id'))
    op.drop_table('pagos')
    with op.batch_alter_table('ajustes', schema=None) as batch_op:
        batch_op.drop_index('ix_ajustes_pendientes')
    op.drop_table('ajustes')
    op.drop_table('conversiones_reembolsadas')
    with op.batch_alter_table('comisiones', schema=None) as batch_op:
        batch_op.drop_index('ix_comisiones_por_pagar')
        batch_op.drop_index('ix_comisiones_por_aprobar')
        for column in ('motivo_reversion', 'revertida_en', 'pagada_en', 'pago_id', 'aprobada_en', 'aprobable_desde'):
            batch_op.drop_column(column)
