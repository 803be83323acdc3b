"""The platform harness for tests: `alpes.platform_harness`, with a shorter reference grace period
(conversiones waits 2 s, not 10, for an affiliate or campaign it has not heard of yet), and
`databases="mariadb"` on the test MariaDB server (skipped when it is absent, failed instead with
ALPES_REQUIRE_MARIADB)."""

from __future__ import annotations

from pathlib import Path

from alpes.platform_harness import Platform as _Platform
from alpes.platform_harness import PlatformError, wait_until

__all__ = ["Platform", "PlatformError", "wait_until"]


class Platform(_Platform):
    def __init__(self, data_dir: Path, env: dict[str, str] | None = None,
                 instances: dict[str, int] | None = None, *, databases: str = "sqlite",
                 broker: str = "embedded") -> None:
        from conftest import MARIADB_URL, require_mariadb

        if databases == "mariadb":
            require_mariadb()
        super().__init__(data_dir, {"ALPES_REFERENCE_GRACE_SECONDS": "2", **(env or {})}, instances,
                         databases=databases, mariadb_server=MARIADB_URL, broker=broker)
