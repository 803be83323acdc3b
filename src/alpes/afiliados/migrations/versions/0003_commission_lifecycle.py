"""commission lifecycle: approved, paid and reversed earnings beside the pending ones

Revision ID: 0003_commission_lifecycle
Revises: 0002
Create Date: 2026-11-28 06:20:00
"""
import sqlalchemy as sa
from alembic import op

import alpes.kernel.db

revision = '0003_commission_lifecycle'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Existing affiliates start at zero: nothing was approved, paid or reversed before this.
    with op.batch_alter_table('afiliados', schema=None) as batch_op:
        batch_op.add_column(sa.Column('ganancias_aprobadas', alpes.kernel.db.ScaledDecimal(), server_default='0',
                                      nullable=False))
        batch_op.add_column(sa.Column('ganancias_pagadas', alpes.kernel.db.ScaledDecimal(), server_default='0',
                                      nullable=False))
        batch_op.add_column(sa.Column('ganancias_revertidas', alpes.kernel.db.ScaledDecimal(), server_default='0',
                                      nullable=False))


def downgrade() -> None:
    with op.batch_alter_table('afiliados', schema=None) as batch_op:
        batch_op.drop_column('ganancias_revertidas')
        batch_op.drop_column('ganancias_pagadas')
        batch_op.drop_column('ganancias_aprobadas')
