"""tenants and signed postbacks: each campaign's advertiser and maximum conversion value, each
advertiser's postback secret version, the signatures already used, and idempotency keys scoped
per advertiser

Revision ID: 0010_tenants_signed_postbacks
Revises: 0009_api_keys
Create Date: 2026-12-05 12:00:00
"""
import sqlalchemy as sa
from alembic import op

import alpes.kernel.db

revision = '0010_tenants_signed_postbacks'
down_revision = '0009_api_keys'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # NULL on campaigns announced before CampanaCreada v5: operator-owned, no maximum.
    with op.batch_alter_table('ref_campanas', schema=None) as batch_op:
        batch_op.add_column(sa.Column('anunciante_id', sa.String(length=36), nullable=True))
        batch_op.add_column(sa.Column('valor_maximo_conversion', alpes.kernel.db.ScaledDecimal(2), nullable=True))
        batch_op.create_index('ix_ref_campanas_anunciante_id', ['anunciante_id'], unique=False)
    op.create_table('ref_anunciantes',
    sa.Column('anunciante_id', sa.String(length=36), nullable=False),
    sa.Column('secreto_version', sa.Integer(), nullable=False),
    sa.Column('secreto_anterior_hasta', alpes.kernel.db.UtcDateTime(), nullable=True),
    sa.Column('updated_at', alpes.kernel.db.UtcDateTime(), nullable=False),
    sa.PrimaryKeyConstraint('anunciante_id')
    )
    op.create_table('firmas_usadas',
    sa.Column('signature', sa.String(length=64), nullable=False),
    sa.Column('signed_at', sa.BigInteger(), nullable=False),
    sa.Column('seen_at', alpes.kernel.db.UtcDateTime(), nullable=False),
    sa.PrimaryKeyConstraint('signature')
    )
    with op.batch_alter_table('firmas_usadas', schema=None) as batch_op:
        batch_op.create_index('ix_firmas_usadas_signed_at', ['signed_at'], unique=False)
    # Keys stored so far stay scoped per campaign (their campaigns' owners were not known); the
    # primary key becomes (scope, order id), the campaign's keys stay indexed.
    with op.batch_alter_table('order_keys', schema=None) as batch_op:
        batch_op.add_column(sa.Column('scope', sa.String(length=80), nullable=True))
    order_keys = sa.table('order_keys', sa.column('campaign_id', sa.String()), sa.column('scope', sa.String()))
    op.execute(order_keys.update().values(scope=sa.literal('campana:', sa.String()) + order_keys.c.campaign_id))
    with op.batch_alter_table('order_keys', schema=None) as batch_op:
        batch_op.alter_column('scope', existing_type=sa.String(length=80), nullable=False)
        batch_op.drop_constraint('pk_order_keys', type_='primary')
        batch_op.create_primary_key('pk_order_keys', ['scope', 'order_id'])
        batch_op.create_index('ix_order_keys_campaign_order', ['campaign_id', 'order_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('order_keys', schema=None) as batch_op:
        batch_op.drop_index('ix_order_keys_campaign_order')
        batch_op.drop_constraint('pk_order_keys', type_='primary')
        batch_op.create_primary_key('pk_order_keys', ['campaign_id', 'order_id'])
        batch_op.drop_column('scope')
    with op.batch_alter_table('firmas_usadas', schema=None) as batch_op:
        batch_op.drop_index('ix_firmas_usadas_signed_at')
    op.drop_table('firmas_usadas')
    op.drop_table('ref_anunciantes')
    with op.batch_alter_table('ref_campanas', schema=None) as batch_op:
        batch_op.drop_index('ix_ref_campanas_anunciante_id')
        batch_op.drop_column('valor_maximo_conversion')
        batch_op.drop_column('anunciante_id')
