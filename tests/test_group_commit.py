"""Group commit on SQLite (kernel/group_commit.py): concurrent units of work share commits, each
returns only once its work is committed, and one that fails takes only its own work with it."""

from __future__ import annotations

import sqlite3
import threading

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, insert, select
from sqlalchemy.exc import IntegrityError

from alpes.kernel.db import Database

metadata = MetaData()
items = Table("items", metadata, Column("id", Integer, primary_key=True), Column("name", String(40), unique=True))


@pytest.fixture
def db(tmp_path):
    database = Database(f"sqlite:///{tmp_path / 'g.db'}")
    metadata.create_all(database.engine)
    yield database, tmp_path / "g.db"
    database.dispose()


def _committed(path, name: str) -> bool:
    """Read with a connection of its own: only committed rows are visible to it."""
    connection = sqlite3.connect(str(path), timeout=30)
    try:
        return connection.execute("SELECT count(*) FROM items WHERE name = ?", (name,)).fetchone()[0] == 1
    finally:
        connection.close()


def test_concurrent_units_share_commits_and_each_returns_only_once_its_work_is_committed(db):
    database, path = db
    seen_committed: list[bool] = []
    errors: list[BaseException] = []
    start = threading.Barrier(24)

    def unit(i: int) -> None:
        try:
            start.wait()
            for j in range(10):
                name = f"t{i}-{j}"
                with database.transaction() as session:
                    session.execute(insert(items).values(name=name))
                seen_committed.append(_committed(path, name))
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=unit, args=(i,)) for i in range(24)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    assert len(seen_committed) == 240 and all(seen_committed)
    committer = database.committer
    assert committer.units == 240
    # Under contention several units share one commit (one fsync).
    assert committer.batches < committer.units


def test_a_failing_unit_takes_only_its_own_work_with_it(db):
    database, path = db
    with database.transaction() as session:
        session.execute(insert(items).values(name="taken"))
    outcomes: dict[str, str] = {}
    start = threading.Barrier(12)

    def unit(i: int) -> None:
        start.wait()
        try:
            with database.transaction() as session:
                session.execute(insert(items).values(name=f"ok-{i}"))
                if i % 3 == 0:  # a duplicate: this unit fails, after writing its first row
                    session.execute(insert(items).values(name="taken"))
            outcomes[f"ok-{i}"] = "committed"
        except Exception as error:
            outcomes[f"ok-{i}"] = type(error).__name__

    threads = [threading.Thread(target=unit, args=(i,)) for i in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for i in range(12):
        name = f"ok-{i}"
        if i % 3 == 0:
            assert outcomes[name] == "IntegrityError" and not _committed(path, name)
        else:
            assert outcomes[name] == "committed" and _committed(path, name)


def test_a_transaction_nested_in_the_same_thread_is_part_of_the_outer_one(db):
    database, path = db
    with pytest.raises(RuntimeError):
        with database.transaction() as outer:
            outer.execute(insert(items).values(name="outer"))
            with database.transaction() as inner:
                inner.execute(insert(items).values(name="inner"))
            raise RuntimeError("the outer unit fails")
    assert not _committed(path, "outer") and not _committed(path, "inner")
    with database.transaction() as outer:
        outer.execute(insert(items).values(name="outer"))
        with database.transaction() as inner:
            inner.execute(insert(items).values(name="inner"))
    with database.read() as session:
        assert sorted(session.scalars(select(items.c.name))) == ["inner", "outer"]


def test_a_lone_unit_that_fails_takes_its_work_with_it_and_the_next_one_commits(db):
    """A batch's first unit runs without a savepoint of its own: its failure, whether its own or the
    database's, rolls the batch's transaction back, and the next unit begins another."""
    database, path = db
    with database.transaction() as session:
        session.execute(insert(items).values(name="taken"))
    with pytest.raises(RuntimeError):
        with database.transaction() as session:
            session.execute(insert(items).values(name="lost-1"))
            raise RuntimeError("the unit fails")
    with pytest.raises(IntegrityError):
        with database.transaction() as session:
            session.execute(insert(items).values(name="lost-2"))
            session.execute(insert(items).values(name="taken"))
    with database.transaction() as session:
        session.execute(insert(items).values(name="kept"))
        with database.transaction() as nested:  # nested in it: a savepoint of its own, as before
            nested.execute(insert(items).values(name="kept-nested"))
    assert not _committed(path, "lost-1") and not _committed(path, "lost-2")
    assert _committed(path, "kept") and _committed(path, "kept-nested") and _committed(path, "taken")
    assert (database.committer.units, database.committer.batches) == (2, 2)
