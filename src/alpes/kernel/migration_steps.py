"""Schema steps every service's migrations take alike, each frozen once released (a migration
that ran must mean the same thing forever: change the schema with a new step, never by editing one)."""

from __future__ import annotations

import sqlalchemy as sa

from .db import UtcDateTime


def add_api_keys_and_actors(op) -> None:
    """The service's copy of the API keys (kernel/access.py) and who caused each outbox event."""
    op.create_table(
        'claves_api',
        sa.Column('key_id', sa.String(length=40), nullable=False),
        sa.Column('digest', sa.String(length=64), nullable=False),
        sa.Column('rol', sa.String(length=16), nullable=False),
        sa.Column('anunciante_id', sa.String(length=36), nullable=True),
        sa.Column('afiliado_id', sa.String(length=36), nullable=True),
        sa.Column('scopes', sa.String(length=1000), nullable=False),
        sa.Column('nombre', sa.String(length=120), nullable=True),
        sa.Column('expira_en', UtcDateTime(), nullable=True),
        sa.Column('revocada_en', UtcDateTime(), nullable=True),
        sa.Column('creada_en', UtcDateTime(), nullable=False),
        sa.Column('usada_en', UtcDateTime(), nullable=True),
        sa.PrimaryKeyConstraint('key_id'),
    )
    with op.batch_alter_table('outbox', schema=None) as batch_op:
        batch_op.add_column(sa.Column('actor_id', sa.String(length=64), server_default='system', nullable=False))
        batch_op.add_column(sa.Column('actor_role', sa.String(length=16), server_default='system', nullable=False))


def drop_api_keys_and_actors(op) -> None:
    with op.batch_alter_table('outbox', schema=None) as batch_op:
        batch_op.drop_column('actor_role')
        batch_op.drop_column('actor_id')
    op.drop_table('claves_api')


def add_outbox_traceparent(op) -> None:
    """The W3C trace context of each outbox event (kernel/tracing.py); rows written before have none."""
    with op.batch_alter_table('outbox', schema=None) as batch_op:
        batch_op.add_column(sa.Column('traceparent', sa.String(length=55), nullable=True))


def drop_outbox_traceparent(op) -> None:
    with op.batch_alter_table('outbox', schema=None) as batch_op:
        batch_op.drop_column('traceparent')
