"""API keys learnt from marketing.eventos, and the actor of each outbox event

Revision ID: 0005_api_keys
Revises: 0004_personal_data
Create Date: 2026-12-05 01:10:00
"""
from alembic import op

from alpes.kernel.migration_steps import add_api_keys_and_actors, drop_api_keys_and_actors

revision = '0005_api_keys'
down_revision = '0004_personal_data'
branch_labels = None
depends_on = None


def upgrade() -> None:
    add_api_keys_and_actors(op)


def downgrade() -> None:
    drop_api_keys_and_actors(op)
