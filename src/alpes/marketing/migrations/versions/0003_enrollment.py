"""enrollments with tracking link codes; the affiliate's country for segmentation

Revision ID: 0003_enrollment
Revises: 0002
Create Date: 2026-11-28 06:10:00
"""
import sqlalchemy as sa
from alembic import op

import alpes.kernel.db

revision = '0003_enrollment'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('afiliados', schema=None) as batch_op:
        batch_op.add_column(sa.Column('pais', sa.String(length=2), nullable=True))
    op.create_table('inscripciones',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('campana_id', sa.String(length=36), nullable=False),
    sa.Column('afiliado_id', sa.String(length=36), nullable=False),
    sa.Column('link_code', sa.String(length=16), nullable=False),
    sa.Column('canal', sa.String(length=40), nullable=True),
    sa.Column('categoria', sa.String(length=40), nullable=True),
    sa.Column('estado', sa.String(length=20), nullable=False),
    sa.Column('inscrita_en', alpes.kernel.db.UtcDateTime(), nullable=False),
    sa.Column('actualizada_en', alpes.kernel.db.UtcDateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('campana_id', 'afiliado_id', name='uq_inscripciones_campana_afiliado'),
    sa.UniqueConstraint('link_code')
    )
    with op.batch_alter_table('inscripciones', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_inscripciones_afiliado_id'), ['afiliado_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('inscripciones', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_inscripciones_afiliado_id'))
    op.drop_table('inscripciones')
    with op.batch_alter_table('afiliados', schema=None) as batch_op:
        batch_op.drop_column('pais')
