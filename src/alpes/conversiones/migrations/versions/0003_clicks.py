"""tracking links, clicks and click attribution

Revision ID: 0003_clicks
Revises: 0002
Create Date: 2026-11-28 06:10:00
"""
import sqlalchemy as sa
from alembic import op

import alpes.kernel.db

revision = '0003_clicks'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('ref_campanas', schema=None) as batch_op:
        batch_op.add_column(sa.Column('landing_url', sa.String(length=2000), nullable=True))
        batch_op.add_column(sa.Column('ventana_atribucion_dias', sa.Integer(), server_default='30', nullable=False))
    op.create_table('ref_inscripciones',
    sa.Column('link_code', sa.String(length=16), nullable=False),
    sa.Column('inscripcion_id', sa.String(length=36), nullable=False),
    sa.Column('afiliado_id', sa.String(length=36), nullable=False),
    sa.Column('campana_id', sa.String(length=36), nullable=False),
    sa.Column('activa', sa.Boolean(), nullable=False),
    sa.Column('updated_at', alpes.kernel.db.UtcDateTime(), nullable=False),
    sa.PrimaryKeyConstraint('link_code'),
    sa.UniqueConstraint('inscripcion_id')
    )
    with op.batch_alter_table('ref_inscripciones', schema=None) as batch_op:
        batch_op.create_index('ix_ref_inscripciones_campana_afiliado', ['campana_id', 'afiliado_id'], unique=False)
    op.create_table('clicks',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('link_code', sa.String(length=16), nullable=False),
    sa.Column('affiliate_id', sa.String(length=36), nullable=False),
    sa.Column('campaign_id', sa.String(length=36), nullable=False),
    sa.Column('clicked_at', alpes.kernel.db.UtcDateTime(), nullable=False),
    sa.Column('ip', sa.String(length=45), nullable=True),
    sa.Column('user_agent', sa.String(length=500), nullable=True),
    sa.Column('referrer', sa.String(length=2000), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('clicks', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_clicks_link_code'), ['link_code'], unique=False)
    op.create_table('click_attributions',
    sa.Column('conversion_id', sa.String(length=36), nullable=False),
    sa.Column('click_id', sa.String(length=36), nullable=False),
    sa.PrimaryKeyConstraint('conversion_id')
    )
    with op.batch_alter_table('click_attributions', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_click_attributions_click_id'), ['click_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('click_attributions', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_click_attributions_click_id'))
    op.drop_table('click_attributions')
    with op.batch_alter_table('clicks', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_clicks_link_code'))
    op.drop_table('clicks')
    with op.batch_alter_table('ref_inscripciones', schema=None) as batch_op:
        batch_op.drop_index('ix_ref_inscripciones_campana_afiliado')
    op.drop_table('ref_inscripciones')
    with op.batch_alter_table('ref_campanas', schema=None) as batch_op:
        batch_op.drop_column('ventana_atribucion_dias')
        batch_op.drop_column('landing_url')
