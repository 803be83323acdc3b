"""advertisers: the owner of each campaign, its landing domains and maximum conversion value

Revision ID: 0013_advertisers
Revises: 0012_api_keys
Create Date: 2026-12-05 01:20:00
"""
import sqlalchemy as sa
from alembic import op

import alpes.kernel.db

revision = '0013_advertisers'
down_revision = '0012_api_keys'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('anunciantes',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('nombre', sa.String(length=200), nullable=False),
    sa.Column('dominios', sa.String(length=2000), server_default='', nullable=False),
    sa.Column('valor_maximo_conversion', alpes.kernel.db.ScaledDecimal(2), nullable=True),
    sa.Column('secreto_version', sa.Integer(), server_default='1', nullable=False),
    sa.Column('secreto_anterior_hasta', alpes.kernel.db.UtcDateTime(), nullable=True),
    sa.Column('creado_en', alpes.kernel.db.UtcDateTime(), nullable=False),
    sa.Column('actualizado_en', alpes.kernel.db.UtcDateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('campanas', schema=None) as batch_op:
        batch_op.add_column(sa.Column('anunciante_id', sa.String(length=36), nullable=True))
        batch_op.add_column(sa.Column('valor_maximo_conversion', alpes.kernel.db.ScaledDecimal(2), nullable=True))
        batch_op.create_index(batch_op.f('ix_campanas_anunciante_id'), ['anunciante_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('campanas', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_campanas_anunciante_id'))
        batch_op.drop_column('valor_maximo_conversion')
        batch_op.drop_column('anunciante_id')
    op.drop_table('anunciantes')
