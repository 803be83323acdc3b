"""the conversion → commission saga's log: sagas and their steps

Revision ID: 0006_saga_log
Revises: 0005_attribution_model
Create Date: 2026-11-28 08:10:00
"""
import sqlalchemy as sa
from alembic import op

import alpes.kernel.db

revision = '0006_saga_log'
down_revision = '0005_attribution_model'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Conversions recorded before this revision get no saga: their flow ran without one.
    op.create_table('sagas',
    sa.Column('saga_id', sa.String(length=36), nullable=False),
    sa.Column('estado', sa.String(length=20), nullable=False),
    sa.Column('paso_actual', sa.String(length=30), nullable=False),
    sa.Column('intentos', sa.Integer(), nullable=False),
    sa.Column('esperando_desde', alpes.kernel.db.UtcDateTime(), nullable=True),
    sa.Column('resultado', sa.String(length=120), nullable=True),
    sa.Column('created_at', alpes.kernel.db.UtcDateTime(), nullable=False),
    sa.Column('updated_at', alpes.kernel.db.UtcDateTime(), nullable=False),
    sa.PrimaryKeyConstraint('saga_id')
    )
    with op.batch_alter_table('sagas', schema=None) as batch_op:
        batch_op.create_index('ix_sagas_estado_esperando', ['estado', 'esperando_desde'], unique=False)
    op.create_table('saga_pasos',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('saga_id', sa.String(length=36), nullable=False),
    sa.Column('paso', sa.String(length=30), nullable=False),
    sa.Column('estado', sa.String(length=20), nullable=False),
    sa.Column('started_at', alpes.kernel.db.UtcDateTime(), nullable=False),
    sa.Column('finished_at', alpes.kernel.db.UtcDateTime(), nullable=True),
    sa.Column('detalle', sa.String(length=500), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('saga_pasos', schema=None) as batch_op:
        batch_op.create_index('ix_saga_pasos_saga', ['saga_id', 'paso', 'estado'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('saga_pasos', schema=None) as batch_op:
        batch_op.drop_index('ix_saga_pasos_saga')
    op.drop_table('saga_pasos')
    with op.batch_alter_table('sagas', schema=None) as batch_op:
        batch_op.drop_index('ix_sagas_estado_esperando')
    op.drop_table('sagas')
