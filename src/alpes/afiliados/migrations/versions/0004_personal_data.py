"""personal data sealed per affiliate: data keys, sealed column, blind indexes, erasure

Revision ID: 0004_personal_data
Revises: 0003_commission_lifecycle
Create Date: 2026-11-30 10:00:00

The clear columns (email, nombre, numero_documento, metodo_pago) stay, nullable and without the
unique email (a duplicate email is now registered and rejected, not refused with 409): the
service's sealing job (handlers.seal_personal_data, run at start and periodically) seals the rows
written before this revision and empties them. Sealing needs the master key, which migrations do
not have.
"""
import sqlalchemy as sa
from alembic import op

import alpes.kernel.db

revision = '0004_personal_data'
down_revision = '0003_commission_lifecycle'
branch_labels = None
depends_on = None


def _email_unique_constraint() -> str | None:
    """The name of the unique constraint on email (MariaDB calls it `email`; SQLite leaves it unnamed)."""
    for constraint in sa.inspect(op.get_bind()).get_unique_constraints('afiliados'):
        if constraint['column_names'] == ['email']:
            return constraint['name'] or 'uq_afiliados_email'
    return None


def upgrade() -> None:
    op.create_table('claves',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('kek_id', sa.String(length=16), nullable=False),
    sa.Column('clave', sa.LargeBinary(), nullable=False),
    sa.Column('creada_en', alpes.kernel.db.UtcDateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    unique = _email_unique_constraint()
    # SQLite: the table is recreated; its unnamed unique constraint gets the convention's name to be dropped.
    with op.batch_alter_table('afiliados', schema=None,
                              naming_convention={'uq': 'uq_%(table_name)s_%(column_0_name)s'}) as batch_op:
        if unique is not None:
            batch_op.drop_constraint(unique, type_='unique')
        batch_op.alter_column('email', existing_type=sa.String(length=254), nullable=True)
        batch_op.alter_column('nombre', existing_type=sa.String(length=200), nullable=True)
        batch_op.add_column(sa.Column('datos_personales', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('email_indice', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('documento_indice', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('datos_borrados_en', alpes.kernel.db.UtcDateTime(), nullable=True))
        batch_op.drop_index('ix_afiliados_documento')
        batch_op.create_index(batch_op.f('ix_afiliados_email_indice'), ['email_indice'], unique=False)
        batch_op.create_index(batch_op.f('ix_afiliados_documento_indice'), ['documento_indice'], unique=False)


def downgrade() -> None:
    # Structure only: sealed data is not unsealed (the master key is not here), and a database with
    # two registrations of one email cannot take the unique constraint back.
    with op.batch_alter_table('afiliados', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_afiliados_documento_indice'))
        batch_op.drop_index(batch_op.f('ix_afiliados_email_indice'))
        batch_op.create_index('ix_afiliados_documento', ['tipo_documento', 'numero_documento'], unique=False)
        batch_op.drop_column('datos_borrados_en')
        batch_op.drop_column('documento_indice')
        batch_op.drop_column('email_indice')
        batch_op.drop_column('datos_personales')
        batch_op.create_unique_constraint('email', ['email'])
    op.drop_table('claves')
