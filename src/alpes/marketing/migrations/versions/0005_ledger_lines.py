"""payment ledger: reversal, payout and adjustment lines beside accruals, once per commission and kind

Revision ID: 0005_ledger_lines
Revises: 0004_commission_lifecycle
Create Date: 2026-11-28 06:30:00
"""
from alembic import op

revision = '0005_ledger_lines'
down_revision = '0004_commission_lifecycle'
branch_labels = None
depends_on = None

# 0001 created UNIQUE(comision_id) without a name: SQLite reflects it unnamed (batch mode names
# it by this convention to drop it); MySQL/MariaDB named its index after the column.
_SQLITE_NAMES = {"uq": "uq_%(table_name)s_%(column_0_name)s"}


def upgrade() -> None:
    if op.get_bind().dialect.name == 'sqlite':
        with op.batch_alter_table('ledger_pagos', naming_convention=_SQLITE_NAMES) as batch_op:
            batch_op.drop_constraint('uq_ledger_pagos_comision_id', type_='unique')
            batch_op.create_unique_constraint('uq_ledger_pagos_comision_tipo', ['comision_id', 'tipo'])
    else:
        op.create_unique_constraint('uq_ledger_pagos_comision_tipo', 'ledger_pagos', ['comision_id', 'tipo'])
        op.drop_constraint('comision_id', 'ledger_pagos', type_='unique')


def downgrade() -> None:
    # Only possible while the ledger holds accruals alone (one line per commission).
    if op.get_bind().dialect.name == 'sqlite':
        with op.batch_alter_table('ledger_pagos') as batch_op:
            batch_op.drop_constraint('uq_ledger_pagos_comision_tipo', type_='unique')
            batch_op.create_unique_constraint('uq_ledger_pagos_comision_id', ['comision_id'])
    else:
        op.create_unique_constraint('comision_id', 'ledger_pagos', ['comision_id'])
        op.drop_constraint('uq_ledger_pagos_comision_tipo', 'ledger_pagos', type_='unique')
