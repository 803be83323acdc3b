"""the W3C trace context of each outbox event (kernel/tracing.py)

Revision ID: 0011_outbox_traceparent
Revises: 0010_tenants_signed_postbacks
Create Date: 2026-12-05 04:00:00

Events written before this revision have none: their messages carry no traceparent, as before.
"""
from alembic import op

from alpes.kernel.migration_steps import add_outbox_traceparent, drop_outbox_traceparent

revision = '0011_outbox_traceparent'
down_revision = '0010_tenants_signed_postbacks'
branch_labels = None
depends_on = None


def upgrade() -> None:
    add_outbox_traceparent(op)


def downgrade() -> None:
    drop_outbox_traceparent(op)
