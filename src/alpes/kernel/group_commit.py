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
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session

GROUP_COMMIT_WINDOW_S = 0.002  # a batch takes newcomers for this long after it began, then commits


class BatchFailed(RuntimeError):
    """The batch this unit of work belonged to could not be committed: its work is not durable."""


class _Batch:
    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.members = 0


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
    def transaction(self) -> Iterator[Session]:
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
            first = batch.members == 0
            session = Session(bind=self._connection, expire_on_commit=False,
                              join_transaction_mode="rollback_only" if first else "create_savepoint")
            self._local.session = session
            try:
                # SAVEPOINT ... RELEASE, or ROLLBACK TO on an error; the first: ROLLBACK on an error.
                with session.begin():
                    yield session
            finally:
                self._local.session = None
                session.close()
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
