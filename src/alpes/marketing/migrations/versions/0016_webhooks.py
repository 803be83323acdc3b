"""webhooks: endpoints, their deliveries and every attempt (marketing/webhooks.py)

Revision ID: 0016_webhooks
Revises: 0015_outbox_traceparent
Create Date: 2026-12-05 05:00:00

New tables only: events before this revision produced no deliveries (no endpoint existed).
"""
import sqlalchemy as sa
from alembic import op

from alpes.kernel.db import UtcDateTime

revision = '0016_webhooks'
down_revision = '0015_outbox_traceparent'
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        'webhooks',
        sa.Column('id', sa.String(length=36), nullable=False),
        sa.Column('propietario_rol', sa.String(length=16), nullable=False),
        sa.Column('propietario_id', sa.String(length=36), nullable=True),
        sa.Column('url', sa.String(length=2000), nullable=False),
        sa.Column('eventos', sa.String(length=400), nullable=False),
        sa.Column('descripcion', sa.String(length=500), nullable=True),
        sa.Column('habilitado', sa.Boolean(), nullable=False),
        sa.Column('deshabilitado_motivo', sa.String(length=300), nullable=True),
        sa.Column('deshabilitado_en', UtcDateTime(), nullable=True),
        sa.Column('fallos_consecutivos', sa.Integer(), server_default='0', nullable=False),
        sa.Column('secreto_version', sa.Integer(), server_default='1', nullable=False),
        sa.Column('secreto_anterior_hasta', UtcDateTime(), nullable=True),
        sa.Column('creado_en', UtcDateTime(), nullable=False),
        sa.Column('actualizado_en', UtcDateTime(), nullable=False),
        sa.PrimaryKeyConstraint('id'),
    )
    op.create_index('ix_webhooks_propietario', 'webhooks', ['propietario_rol', 'propietario_id'], unique=False)
    op.create_table(
        'webhook_entregas',
        sa.Column('id', _ID, autoincrement=True, nullable=False),
        sa.Column('webhook_id', sa.String(length=36), nullable=False),
        sa.Column('event_id', sa.String(length=36), nullable=False),
        sa.Column('tipo', sa.String(length=40), nullable=False),
        sa.Column('objeto_id', sa.String(length=36), nullable=False),
        sa.Column('cuerpo', sa.Text(), nullable=False),
        sa.Column('estado', sa.String(length=12), nullable=False),
        sa.Column('intentos', sa.Integer(), server_default='0', nullable=False),
        sa.Column('proximo_intento_en', UtcDateTime(), nullable=False),
        sa.Column('primer_intento_en', UtcDateTime(), nullable=True),
        sa.Column('entregada_en', UtcDateTime(), nullable=True),
        sa.Column('ultimo_status', sa.Integer(), nullable=True),
        sa.Column('ultima_latencia_ms', sa.Integer(), nullable=True),
        sa.Column('ultimo_error', sa.String(length=500), nullable=True),
        sa.Column('creada_en', UtcDateTime(), nullable=False),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('webhook_id', 'event_id', name='uq_webhook_entregas_webhook_event'),
    )
    op.create_index('ix_webhook_entregas_pendientes', 'webhook_entregas', ['estado', 'proximo_intento_en'],
                    unique=False)
    op.create_index('ix_webhook_entregas_objeto', 'webhook_entregas', ['webhook_id', 'objeto_id', 'estado'],
                    unique=False)
    op.create_table(
        'webhook_intentos',
        sa.Column('id', _ID, autoincrement=True, nullable=False),
        sa.Column('entrega_id', _ID, nullable=False),
        sa.Column('numero', sa.Integer(), nullable=False),
        sa.Column('en', UtcDateTime(), nullable=False),
        sa.Column('status', sa.Integer(), nullable=True),
        sa.Column('latencia_ms', sa.Integer(), nullable=False),
        sa.Column('error', sa.String(length=500), nullable=True),
        sa.PrimaryKeyConstraint('id'),
    )
    op.create_index(op.f('ix_webhook_intentos_entrega_id'), 'webhook_intentos', ['entrega_id'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_webhook_intentos_entrega_id'), table_name='webhook_intentos')
    op.drop_table('webhook_intentos')
    op.drop_index('ix_webhook_entregas_objeto', table_name='webhook_entregas')
    op.drop_index('ix_webhook_entregas_pendientes', table_name='webhook_entregas')
    op.drop_table('webhook_entregas')
    op.drop_index('ix_webhooks_propietario', table_name='webhooks')
    op.drop_table('webhooks')
