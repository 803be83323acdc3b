from alpes.kernel.db import run_alembic_env
from alpes.marketing.tables import metadata

run_alembic_env(metadata)
