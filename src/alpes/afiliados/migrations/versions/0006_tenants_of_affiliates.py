"""who registered each affiliate, each program's owner and state, and the enrollments in programs

Revision ID: 0006_tenants_of_affiliates
Revises: 0005_api_keys
Create Date: 2026-12-05 03:00:00

What scopes an advertiser to its affiliates (tenancy.py). Affiliates registered before this
revision were registered by an operator (null); programs learnt before it have no owner (the
campaigns of before CampanaCreada v5 had none) and are taken as active, as CampanaCreada's own
default says; enrollments start with those announced from now on.
"""
import sqlalchemy as sa
from alembic import op

import alpes.kernel.db

revision = '0006_tenants_of_affiliates'
down_revision = '0005_api_keys'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('afiliados', schema=None) as batch_op:
        batch_op.add_column(sa.Column('registrado_por_anunciante', sa.String(length=36), nullable=True))
        batch_op.create_index(batch_op.f('ix_afiliados_registrado_por_anunciante'), ['registrado_por_anunciante'],
                              unique=False)
    with op.batch_alter_table('programas', schema=None) as batch_op:
        batch_op.add_column(sa.Column('anunciante_id', sa.String(length=36), nullable=True))
        batch_op.add_column(sa.Column('estado', sa.String(length=20), server_default='activa', nullable=False))
        batch_op.create_index(batch_op.f('ix_programas_anunciante_id'), ['anunciante_id'], unique=False)
    op.create_table('inscripciones',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('campana_id', sa.String(length=36), nullable=False),
    sa.Column('afiliado_id', sa.String(length=36), nullable=False),
    sa.Column('inscrita_en', alpes.kernel.db.UtcDateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('inscripciones', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_inscripciones_afiliado_id'), ['afiliado_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_inscripciones_campana_id'), ['campana_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('inscripciones', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_inscripciones_campana_id'))
        batch_op.drop_index(batch_op.f('ix_inscripciones_afiliado_id'))
    op.drop_table('inscripciones')
    with op.batch_alter_table('programas', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_programas_anunciante_id'))
        batch_op.drop_column('estado')
        batch_op.drop_column('anunciante_id')
    with op.batch_alter_table('afiliados', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_afiliados_registrado_por_anunciante'))
        batch_op.drop_column('registrado_por_anunciante')
