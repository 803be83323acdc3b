"""the signals and the callers' minutes by time, so those no rule reads are deleted without a scan

Revision ID: 0013_rows_by_time
Revises: 0012_caller_minutes
Create Date: 2026-12-06 06:10:00

reference.forget_unread_signals (a periodic job) deletes the signals and the callers' minutes no
velocity rule reads any more; these indexes find the oldest.
"""
from alembic import op

revision = '0013_rows_by_time'
down_revision = '0012_caller_minutes'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index('ix_conversion_signals_detected_at', 'conversion_signals', ['detected_at'])
    op.create_index('ix_caller_minutes_minute', 'caller_minutes', ['minute'])


def downgrade() -> None:
    op.drop_index('ix_caller_minutes_minute', table_name='caller_minutes')
    op.drop_index('ix_conversion_signals_detected_at', table_name='conversion_signals')
