from alpes.marketing.tables import metadata
from alpes.kernel.db import run_alembic_env

run_alembic_env(metadata)
