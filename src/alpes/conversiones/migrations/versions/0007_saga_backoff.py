"""the saga's next retry time: a stuck saga keeps asking with a capped backoff

Revision ID: 0007_saga_backoff
Revises: 0006_saga_log
Create Date: 2026-12-02 09:00:00
"""
import sqlalchemy as sa
from alembic import op

import alpes.kernel.db

revision = '0007_saga_backoff'
down_revision = '0006_saga_log'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Left NULL on existing sagas: the timer then waits the plain timeout from esperando_desde.
    with op.batch_alter_table('sagas', schema=None) as batch_op:
        batch_op.add_column(sa.Column('reintentar_en', alpes.kernel.db.UtcDateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('sagas', schema=None) as batch_op:
        batch_op.drop_column('reintentar_en')
