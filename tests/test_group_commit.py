"""Group commit on SQLite (kernel/group_commit.py): concurrent units of work share commits, each
returns only once its work is committed, and one that fails takes only its own work with it. Units
that defer their writes have them written at their group's commit, one statement per table, and see
the group's rows not written yet through pending_rows."""

from __future__ import annotations

import sqlite3
import threading
from decimal import Decimal

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, event, func, insert, select
from sqlalchemy.exc import IntegrityError

from alpes.kernel.db import Database, ScaledDecimal, bulk_insert, pending_rows, stop_deferring, upsert_add
from alpes.kernel.group_commit import BatchFailed
from commit_groups import in_one_commit_group

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


# -- deferred writes: a commit group's inserts and additions in one statement per table ----------
counters = Table("counters", metadata, Column("name", String(40), primary_key=True), Column("hits", Integer))
amounts = Table("amounts", metadata, Column("id", Integer, primary_key=True), Column("amount", ScaledDecimal(2)))


def _statements(database: Database, seen: list[str]) -> None:
    event.listen(database.engine, "before_cursor_execute",
                 lambda _c, _cursor, statement, parameters, _x, _many: seen.append((statement, parameters)))


def _deferring_unit(database: Database, name: str, fail: bool = False):
    def unit() -> tuple[list[str], bool]:
        with database.transaction(defer_writes=True) as session:
            before = sorted(row["name"] for row in pending_rows(session, items))
            bulk_insert(session, items, [{"id": None, "name": name}])
            upsert_add(session, counters, {"name": "units"}, {"hits": 1})
            # Deferred: not in the table yet, for itself either; counted by pending_rows.
            written = session.scalar(select(func.count()).select_from(items).where(items.c.name == name))
            assert name in [row["name"] for row in pending_rows(session, items)]
            if fail:
                raise RuntimeError("this unit fails after deferring its writes")
        return before, written == 1
    return unit


def test_a_commit_groups_deferred_writes_are_one_statement_per_table_and_drop_a_failed_units(db):
    database, path = db
    seen: list = []
    _statements(database, seen)
    names = ["d0", "d1", "d2", "failed", "d3"]
    results = in_one_commit_group(
        database, [_deferring_unit(database, name, fail=name == "failed") for name in names])
    assert isinstance(results[3], RuntimeError)
    kept = [results[i] for i in (0, 1, 2, 4)]
    # Each unit saw the rows of the units before it in the group, none of its own yet, and
    # never the failed unit's.
    assert sorted(len(before) for before, _ in kept) == [0, 1, 2, 3]
    assert all(not written and "failed" not in before for before, written in kept)
    seen_before = sorted((before for before, _ in kept), key=len)
    assert all(set(a) < set(b) for a, b in zip(seen_before, seen_before[1:]))
    for name in names:
        assert _committed(path, name) == (name != "failed")
    with database.read() as session:
        assert session.scalar(select(counters.c.hits).where(counters.c.name == "units")) == 4
    inserts = [(statement, parameters) for statement, parameters in seen if statement.startswith("INSERT INTO items")]
    assert len(inserts) == 1 and len(inserts[0][1]) == 8  # four rows of two values, one statement
    assert len([s for s, _ in seen if s.startswith("INSERT INTO counters")]) == 1  # the four additions summed
    # Nothing of theirs was in the transaction before the commit: none needed a SAVEPOINT.
    assert not [s for s, _ in seen if s.startswith("SAVEPOINT")]


def test_a_deferring_unit_that_writes_at_once_and_fails_takes_only_its_own_rows_with_it(db):
    database, path = db

    def stops_then_fails() -> None:
        with database.transaction(defer_writes=True) as session:
            bulk_insert(session, items, [{"id": None, "name": "deferred-then-written"}])
            stop_deferring(session)  # its SAVEPOINT begins here
            session.execute(insert(items).values(name="written-at-once"))
            raise RuntimeError("fails after writing at once")

    results = in_one_commit_group(database, [_deferring_unit(database, "before"), stops_then_fails,
                                             _deferring_unit(database, "after")])
    assert isinstance(results[1], RuntimeError)
    assert _committed(path, "before") and _committed(path, "after")
    assert not _committed(path, "deferred-then-written") and not _committed(path, "written-at-once")


def test_a_deferring_unit_that_writes_at_once_without_stopping_and_fails_fails_its_group(db):
    """Its change cannot be told from the group's without a savepoint: nobody is told it is durable."""
    database, path = db

    def writes_unannounced_then_fails() -> None:
        with database.transaction(defer_writes=True) as session:
            session.execute(insert(items).values(name="unannounced"))
            raise RuntimeError("fails after writing at once, not through stop_deferring")

    def writes_unannounced() -> None:
        with database.transaction(defer_writes=True) as session:
            session.execute(insert(items).values(name="unannounced-kept"))

    results = in_one_commit_group(database, [_deferring_unit(database, "g1"), writes_unannounced_then_fails],
                                  commits=False)
    assert isinstance(results[1], RuntimeError)
    # The other is told its work is not durable, or (when it came after) met a group already gone
    # and committed in a new one.
    assert isinstance(results[0], BatchFailed) or _committed(path, "g1")
    assert not _committed(path, "unannounced")
    if isinstance(results[0], BatchFailed):
        assert not _committed(path, "g1")
    writes_unannounced()  # succeeding, the same write commits with its unit
    assert _committed(path, "unannounced-kept")


def test_a_commit_group_of_many_writes_each_row_once(db):
    database, path = db
    units = [_deferring_unit(database, f"m{i}") for i in range(100)]
    results = in_one_commit_group(database, units)
    assert not [r for r in results if isinstance(r, Exception)]
    with database.read() as session:
        assert sorted(session.scalars(select(items.c.name))) == sorted(f"m{i}" for i in range(100))
        assert session.scalar(select(counters.c.hits)) == 100


def test_a_value_the_column_refuses_fails_the_unit_that_gave_it_not_its_group(db):
    database, path = db

    def bad() -> None:
        with database.transaction(defer_writes=True) as session:
            bulk_insert(session, amounts, [{"id": 1, "amount": Decimal("1.005")}])

    results = in_one_commit_group(database, [bad, _deferring_unit(database, "fine")])
    assert isinstance(results[0], ValueError) and "decimal places" in str(results[0])
    assert results[1] == ([], False) and _committed(path, "fine")


def test_a_unit_that_stops_deferring_reads_what_it_wrote_and_writes_at_once_after(db):
    database, path = db
    with database.transaction(defer_writes=True) as session:
        bulk_insert(session, items, [{"id": None, "name": "early"}])
        assert not session.scalar(select(func.count()).select_from(items))
        stop_deferring(session)
        assert session.scalars(select(items.c.name)).all() == ["early"]
        bulk_insert(session, items, [{"id": None, "name": "late"}])
        assert pending_rows(session, items) == []
        assert sorted(session.scalars(select(items.c.name))) == ["early", "late"]
    assert _committed(path, "early") and _committed(path, "late")


def test_deferring_on_any_database_writes_each_row_once(db_url):
    """Elsewhere than SQLite a unit's writes run at once (each unit is its own transaction, which
    the database group-commits itself): in the table or pending, never both, committed once."""
    database = Database(db_url)
    metadata.create_all(database.engine)
    try:
        with database.transaction(defer_writes=True) as session:
            bulk_insert(session, items, [{"id": None, "name": "once"}])
            upsert_add(session, counters, {"name": "once"}, {"hits": 2})
            stored = session.scalar(select(func.count()).select_from(items))
            assert stored + len(pending_rows(session, items)) == 1
        with database.read() as session:
            assert session.scalars(select(items.c.name)).all() == ["once"]
            assert session.scalar(select(counters.c.hits)) == 2
    finally:
        metadata.drop_all(database.engine)
        database.dispose()
