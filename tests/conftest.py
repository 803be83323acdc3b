"""Shared fixtures: fresh databases on SQLite and MariaDB, a real embedded broker."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
from hypothesis import settings

from alpes.kernel import embedded_broker
from alpes.kernel.codec import SchemaRegistry

MARIADB_URL = os.environ.get("ALPES_TEST_MARIADB_URL", "mysql+pymysql://alpes:alpes@127.0.0.1:3306")
REQUIRE_MARIADB = os.environ.get("ALPES_REQUIRE_MARIADB", "").lower() in ("1", "true", "yes")
# The real Redis server's test database (CI starts it; ALPES_REQUIRE_MARIADB requires it too).
REDIS_URL = os.environ.get("ALPES_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")

# CI replays the same examples on every run (a red build must be reproducible, not a roll of the
# dice); local runs keep exploring new ones. `.ci/run` sets HYPOTHESIS_PROFILE=ci.
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def mariadb_available() -> bool:
    import pymysql

    try:
        from sqlalchemy.engine import make_url

        url = make_url(MARIADB_URL)
        pymysql.connect(host=url.host, port=url.port or 3306, user=url.username, password=url.password or "",
                        connect_timeout=2).close()
        return True
    except Exception:
        return False


def require_mariadb() -> None:
    """Skip the test when the MariaDB server is absent; fail instead with ALPES_REQUIRE_MARIADB."""
    if not mariadb_available():
        if REQUIRE_MARIADB:
            pytest.fail(f"MariaDB required (ALPES_REQUIRE_MARIADB) but not reachable at {MARIADB_URL}")
        pytest.skip(f"MariaDB not reachable at {MARIADB_URL}")


def create_mariadb_database(prefix: str = "alpes_t") -> tuple[str, callable]:
    """A fresh database on the MariaDB server; returns (SQLAlchemy URL, drop function)."""
    from alpes.platform_harness import create_mariadb_database as create

    require_mariadb()
    return create(MARIADB_URL, prefix)


@pytest.fixture(params=["sqlite", pytest.param("mariadb", marks=pytest.mark.mariadb)])
def db_url(request, tmp_path: Path):
    """A fresh, empty database URL on each backend."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'test.db'}"
        return
    url, drop = create_mariadb_database()
    yield url
    drop()


@pytest.fixture(scope="session")
def registry() -> SchemaRegistry:
    return SchemaRegistry.from_directory()


@pytest.fixture(scope="session")
def broker_url(tmp_path_factory):
    """A real embedded pulsar-lite broker for the session. New topics get 4 partitions."""
    directory = tmp_path_factory.mktemp("broker")
    port = embedded_broker.free_port()
    process = embedded_broker.start_broker_process(directory, port, default_partitions=4)
    yield f"pulsar://127.0.0.1:{port}"
    embedded_broker.stop_process(process)


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def redis_url() -> str:
    """The test database of the real Redis server, emptied before and after each test; skipped
    when the server is absent (failed instead with ALPES_REQUIRE_MARIADB, CI's "all servers")."""
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        client.flushdb()
    except redis.RedisError as error:
        if REQUIRE_MARIADB:
            pytest.fail(f"Redis required (ALPES_REQUIRE_MARIADB) but not reachable at {REDIS_URL}: {error}")
        pytest.skip(f"Redis not reachable at {REDIS_URL}")
    yield REDIS_URL
    client.flushdb()
    client.close()
