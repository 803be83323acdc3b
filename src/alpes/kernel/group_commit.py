"""Group commit for a SQLite database: the write transactions of one process share one connection
and, when they come close together, one durable commit.

SQLite has one writer at a time and every commit with `synchronous=FULL` is an fsync (~3 ms here,
more than a tracking click's own work). Left to SQLite, the threads of a process queue for the
write lock by polling with the busy handler's growing sleeps (up to 100 ms each): a lock convoy.
Here each unit of work takes its turn on a lock (handed over at once), runs inside a SAVEPOINT of
the batch's transaction (so its failure rolls back its own work only; the batch's first unit needs
none, its failure rolls back the transaction that holds only its work), and leaves. The one that
finds nobody waiting for a turn — or the batch older than `window` — commits the batch. Every
member returns from `transaction()` only once its batch is committed (on disk): a 200 still means
durable, and a kill -9 before the commit loses only work nobody was answered for.

A unit may also defer its inserts and counter additions (`transaction(defer_writes=True)`;
kernel.db.bulk_insert and upsert_add put them in its DeferredWrites): they join the batch's when
the unit succeeds and are written just before the commit, one multi-row INSERT per table for the
whole batch instead of one per unit; having put nothing in the transaction, such a unit needs no
SAVEPOINT either until it writes at once (`DeferredWrites.stop`). Each statement inside the turn
lets the GIL go and its holder waits to get it back while the queue waits behind it (README,
"Where target 2 stops"), so fewer statements per unit is what lets the turn go round faster.
Deferring is for writes that cannot collide (fresh ids) or whose collisions the unit checks first,
counting the batch's rows not written yet (`pending_rows`); a deferred write that fails at the
commit fails the whole batch.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Table
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session

GROUP_COMMIT_WINDOW_S = 0.002  # a batch takes newcomers for this long after it began, then commits


DEFERRED_WRITES = "alpes.deferred_writes"  # Session.info: the unit's DeferredWrites, while it defers


class BatchFailed(RuntimeError):
    """The batch this unit of work belonged to could not be committed: its work is not durable."""


class _Insert:
    """Rows for one table, their values already converted for the driver (a bad value fails the
    unit that gave it, not the batch): `head` is `INSERT INTO t (a, b)`, `values` `(?, ?)`."""

    __slots__ = ("table", "head", "values", "rows", "parameters")

    def __init__(self, table: Table, head: str, values: str, rows: list[dict], parameters: list[tuple]) -> None:
        self.table, self.head, self.values, self.rows, self.parameters = table, head, values, rows, parameters


class _Add:
    """Increments for one counters row (kernel.db.upsert_add's statement, keys and increments)."""

    __slots__ = ("table", "statement", "keys", "increments")

    def __init__(self, table: Table, statement, keys: dict, increments: dict) -> None:
        self.table, self.statement, self.keys, self.increments = table, statement, keys, increments


class DeferredWrites:
    """A unit of work's deferred inserts and additions, in the order it made them.
    `needs_savepoint`: the unit (not its batch's first) runs without one until it writes at once
    (`stop`)."""

    def __init__(self, batch: list, *, needs_savepoint: bool = False) -> None:
        self._batch = batch  # the writes of the batch's members that succeeded before this unit
        self.writes: list[_Insert | _Add] = []
        self.needs_savepoint = needs_savepoint
        self.savepoint = None  # the unit's SAVEPOINT, once `stop` began it

    def stop(self, session: Session) -> None:
        """Write this unit's deferred writes now, inside a SAVEPOINT of its own when it needs one
        (begun here, so a unit that only deferred runs none), and no longer defer."""
        session.info.pop(DEFERRED_WRITES, None)
        if self.needs_savepoint and self.savepoint is None:
            self.savepoint = session.begin_nested()
        if self.writes:
            write(session.connection(), self.writes)
            self.writes = []

    def insert(self, table: Table, head: str, values: str, rows: list[dict], parameters: list[tuple]) -> None:
        self.writes.append(_Insert(table, head, values, rows, parameters))

    def add(self, table: Table, statement, keys: dict, increments: dict) -> None:
        self.writes.append(_Add(table, statement, keys, increments))

    def pending(self, table: Table) -> list[dict]:
        """The rows deferred for `table` in this batch, this unit's too: not in the table yet."""
        return [row for item in (*self._batch, *self.writes)
                if item.table is table and isinstance(item, _Insert) for row in item.rows]


def write(connection: Connection, writes: list[_Insert | _Add]) -> None:
    """Run deferred writes: the rows of each INSERT shape (a table and its columns) as multi-row
    statements, in the order the shapes were first deferred; then each counters row's increments,
    summed into one statement per row."""
    inserts: dict[tuple[str, str], list[tuple]] = {}
    adds: dict[tuple, _Add] = {}
    for item in writes:
        if isinstance(item, _Insert):
            inserts.setdefault((item.head, item.values), []).extend(item.parameters)
            continue
        key = (item.statement, tuple(item.keys.items()), tuple(item.increments))
        known = adds.get(key)
        if known is None:
            adds[key] = _Add(item.table, item.statement, item.keys, dict(item.increments))
        else:
            for column, value in item.increments.items():
                known.increments[column] += value
    for (head, values), parameters in inserts.items():
        _insert_many(connection, head, values, parameters)
    for item in adds.values():
        connection.execute(item.statement, {**item.keys, **item.increments})


# Rows per multi-row INSERT: powers of two up to this, so a table has a handful of statement texts
# (the driver keeps the prepared statements of the last 128 texts) whatever the batch's size;
# SQLite takes up to 32,766 parameters per statement.
_MOST_ROWS = 64


def _insert_many(connection: Connection, head: str, values: str, parameters: list[tuple]) -> None:
    start = 0
    while start < len(parameters):
        size = _MOST_ROWS
        while size > len(parameters) - start:
            size //= 2
        chunk = parameters[start:start + size]
        flat = chunk[0] if size == 1 else tuple(value for row in chunk for value in row)
        connection.exec_driver_sql(f"{head} VALUES {', '.join([values] * size)}", flat)
        start += size


class _Batch:
    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.members = 0
        self.deferred: list[_Insert | _Add] = []  # its members' deferred writes, written at its commit


class GroupCommitter:
    def __init__(self, engine: Engine, window: float = GROUP_COMMIT_WINDOW_S) -> None:
        self.engine = engine
        self.window = window
        self._turn = threading.Lock()
        self._state = threading.Lock()  # guards _waiting
        self._waiting = 0
        self._connection: Connection | None = None
        self._batch: _Batch | None = None
        self._local = threading.local()  # this thread's open session (a nested transaction joins it)
        self.batches = 0  # committed, for /metrics-like inspection and tests
        self.units = 0

    @contextmanager
    def transaction(self, defer_writes: bool = False) -> Iterator[Session]:
        """A unit of work, returning once its batch is committed. `defer_writes`: its inserts and
        additions wait for the batch's commit (DeferredWrites); ignored when nested in another."""
        outer = getattr(self._local, "session", None)
        if outer is not None:  # nested in this thread's unit of work: part of it, as before
            with outer.begin_nested():
                yield outer
            return
        with self._state:
            self._waiting += 1
        self._turn.acquire()
        with self._state:
            self._waiting -= 1
        batch: _Batch | None = None
        try:
            batch = self._open()
            # The batch's first unit needs no SAVEPOINT: nothing but its own work is in the
            # transaction, so its failure rolls the whole transaction back (and the next unit
            # begins another). A lone unit (a postback usually commits alone) saves the SAVEPOINT,
            # the RELEASE and the Session's nested-transaction bookkeeping (issue 11).
            # A unit that defers its writes puts nothing in the transaction until it writes at once
            # (DeferredWrites.stop begins its SAVEPOINT then): until then it needs none either.
            first = batch.members == 0
            lazy = defer_writes and not first
            session = Session(bind=self._connection, expire_on_commit=False,
                              join_transaction_mode="rollback_only" if first or lazy else "create_savepoint")
            self._local.session = session
            deferred = None
            if defer_writes:
                deferred = session.info[DEFERRED_WRITES] = DeferredWrites(batch.deferred, needs_savepoint=lazy)
            try:
                if lazy:
                    with self._savepoint_if_begun(session, deferred):
                        yield session
                else:
                    # SAVEPOINT ... RELEASE, or ROLLBACK TO on an error; the first: ROLLBACK on an error.
                    with session.begin():
                        yield session
            finally:
                self._local.session = None
                session.close()
            if deferred is not None:
                batch.deferred.extend(deferred.writes)  # it succeeded: its writes are the batch's now
            batch.members += 1
            self.units += 1
        except BaseException:
            # Its own work is rolled back; the batch goes on unless its transaction ended (the
            # first unit's rollback, or SQLite's own): then the next unit begins another.
            if batch is not None and self._connection is not None and not self._alive():
                self._fail(batch, BatchFailed("the batch's transaction was ended by an error"))
            self._leave()
            raise
        self._leave()
        batch.done.wait()
        if batch.error is not None:
            raise BatchFailed("the unit of work was not made durable") from batch.error

    @contextmanager
    def _savepoint_if_begun(self, session: Session, deferred: DeferredWrites) -> Iterator[None]:
        """A deferring unit's end: its SAVEPOINT released, or rolled back on an error, when it began
        one. A unit that changed rows at once without one (not through DeferredWrites.stop) and
        then failed cannot be told from its batch: the batch's transaction is rolled back, and
        every member fails (BatchFailed) rather than commit part of a failed unit."""
        changes = self._changes()
        try:
            yield
        except BaseException:
            if deferred.savepoint is not None:
                deferred.savepoint.rollback()
            elif self._changes() != changes:
                self._connection.get_transaction().rollback()
            raise
        if deferred.savepoint is not None:
            deferred.savepoint.commit()
        session.commit()  # joined "rollback_only": the batch's transaction is left open

    def _changes(self) -> int:
        """Rows changed on the batch's connection since it was opened (sqlite3's total_changes)."""
        return self._connection.connection.dbapi_connection.total_changes

    # -- the batch (called with the turn held) ---------------------------------------------------
    def _open(self) -> _Batch:
        if self._connection is None or self._connection.closed:
            self._connection = self.engine.connect()
        if self._batch is None:
            self._connection.begin()  # BEGIN IMMEDIATE (kernel.db's begin event): the write lock
            self._batch = _Batch()
        return self._batch

    def _alive(self) -> bool:
        dbapi = self._connection.connection.dbapi_connection
        return bool(dbapi is not None and dbapi.in_transaction)

    def _leave(self) -> None:
        """Commit the open batch when nobody waits for a turn (the last one in commits, so no batch
        is left behind) or its window is over; release the turn."""
        try:
            batch = self._batch
            if batch is not None:
                with self._state:
                    others = self._waiting
                if others == 0 or time.perf_counter() - batch.started >= self.window:
                    self._commit(batch)
        finally:
            self._turn.release()

    def _commit(self, batch: _Batch) -> None:
        self._batch = None
        try:
            transaction = self._connection.get_transaction()
            if batch.members == 0:
                if transaction is not None:
                    transaction.rollback()
            elif transaction is None:
                raise BatchFailed("the batch's transaction is gone")
            else:
                if batch.deferred:
                    write(self._connection, batch.deferred)
                transaction.commit()
                self.batches += 1
        except BaseException as error:
            self._fail(batch, error)
            return
        batch.done.set()

    def _fail(self, batch: _Batch, error: BaseException) -> None:
        batch.error = error
        self._batch = None
        try:
            self._connection.close()  # a fresh connection for the next batch
        except Exception:  # closing a broken connection may fail too; it is dropped either way
            pass
        self._connection = None
        batch.done.set()

    def dispose(self) -> None:
        with self._turn:
            if self._batch is not None:  # members are waiting for it: commit it before closing
                self._commit(self._batch)
            if self._connection is not None:
                self._connection.close()
                self._connection = None
