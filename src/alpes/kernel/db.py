"""Database mechanics: engines, transactions (unit of work) and Alembic migrations."""

from __future__ import annotations

import fcntl
import functools
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timezone
from decimal import MAX_PREC, Context, Decimal
from pathlib import Path

from sqlalchemy import (
    BigInteger,
    DateTime,
    Table,
    TypeDecorator,
    bindparam,
    create_engine,
    event,
    text,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import Session, sessionmaker

from .group_commit import DEFERRED_WRITES, GroupCommitter


def make_engine(url: str, *, pool_size: int = 10, for_writes: bool = True) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:" and not parsed.database.startswith("file:"):
            private_sqlite_file(parsed.database)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})
        _sqlite_pragmas(engine, "BEGIN IMMEDIATE" if for_writes else "BEGIN")
        return engine
    return create_engine(
        url,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=True,
        pool_recycle=1800,
        # Read committed: SKIP LOCKED claims and unique-key inbox inserts without gap locks.
        isolation_level="READ COMMITTED",
    )


def _sqlite_pragmas(engine: Engine, begin: str) -> None:
    @event.listens_for(engine, "connect")
    def on_connect(dbapi_connection, _record):  # pragma: no cover - exercised by every sqlite test
        # Let SQLAlchemy, not pysqlite, emit BEGIN: pysqlite's deferred BEGIN upgrades a read
        # lock to a write lock mid-transaction, which fails at once instead of waiting.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")  # a commit is on disk before we ack
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def on_begin(connection):  # pragma: no cover
        # Writers: one at a time is SQLite's rule, so take the write lock up front and wait
        # for it. Readers: a plain BEGIN reads a WAL snapshot without blocking anyone.
        connection.exec_driver_sql(begin)


class Database:
    """A service's session factory; `transaction()` is the unit of work."""

    def __init__(self, url: str, *, pool_size: int = 10) -> None:
        self.url = url
        self.engine = make_engine(url, pool_size=pool_size)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        # SQLite: a separate engine whose transactions do not take the write lock, so queries
        # and health checks are not queued behind consumers' writes. Elsewhere: the same engine.
        self.read_engine = make_engine(url, pool_size=pool_size, for_writes=False) if self.is_sqlite else self.engine
        self._readers = sessionmaker(self.read_engine, expire_on_commit=False)
        # SQLite: one writer at a time, and an fsync per commit. The process's units of work take
        # turns on one connection and share commits (kernel/group_commit.py); each still returns
        # only once its work is on disk. Other databases: a transaction per unit, as they
        # group-commit themselves (InnoDB's binlog/redo group commit).
        self.committer = GroupCommitter(self.engine) if self.is_sqlite else None

    @property
    def is_sqlite(self) -> bool:
        return self.engine.dialect.name == "sqlite"

    @contextmanager
    def transaction(self, defer_writes: bool = False) -> Iterator[Session]:
        """Commit everything done in the block (state, outbox, inbox) or nothing. `defer_writes`
        (SQLite): its bulk_insert and upsert_add run with its commit group's, just before the
        commit (kernel/group_commit.py); the block must not read back what it wrote that way
        (`stop_deferring` first), and reads what others wrote that way with `pending_rows`."""
        if self.committer is None:
            with self._sessions.begin() as session:
                yield session
            return
        with self.committer.transaction(defer_writes) as session:
            yield session

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A read-only snapshot: for queries, never for changes (it is rolled back)."""
        with self._readers() as session:
            try:
                yield session
            finally:
                session.rollback()

    @contextmanager
    def exclusive(self, name: str, *, blocking: bool = True) -> Iterator[bool]:
        """Across processes sharing this SQLite file (instances of one service): only one holds
        `name` at a time (flock on `<file>.<name>.lock`, released if the process dies). Yields
        False when not blocking and another process holds it. Other databases yield True: there
        row locks (SKIP LOCKED) keep instances apart."""
        path = self.engine.url.database if self.is_sqlite else None
        if not path or path == ":memory:":
            yield True
            return
        with file_lock(f"{path}.{name}.lock", blocking=blocking) as held:
            yield held

    def ping(self) -> None:
        with self.read() as session:
            session.execute(text("SELECT 1"))

    def dispose(self) -> None:
        if self.committer is not None:
            self.committer.dispose()
        self.engine.dispose()
        if self.read_engine is not self.engine:
            self.read_engine.dispose()


# -- files only the service's own user reads ------------------------------------------------------
PRIVATE_FILE = 0o600
PRIVATE_DIRECTORY = 0o700
_SQLITE_COMPANIONS = ("", "-wal", "-shm", "-journal")


def private_directory(path: str | Path) -> None:
    """Create `path` (and missing parents) so that only this user may enter it (0700)."""
    Path(path).mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIRECTORY)


def tighten_directory(path: str | Path) -> None:
    """Make an existing directory of ours 0700 (the platform's data directory: databases, keys,
    logs). Left alone when another user owns it or it is a shared sticky directory like /tmp."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return
    if info.st_uid == os.getuid() and not info.st_mode & stat.S_ISVTX and stat.S_IMODE(info.st_mode) & 0o077:
        os.chmod(path, stat.S_IMODE(info.st_mode) & PRIVATE_DIRECTORY)


def private_sqlite_file(database: str | Path) -> None:
    """A SQLite database file only this user reads: its folder created 0700 when missing, the file
    created 0600 before SQLite opens it (SQLite gives its -wal, -shm and -journal files the mode of
    the database file), and any of them left world- or group-readable by an older version made 0600."""
    path = Path(database)
    private_directory(path.parent)
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, PRIVATE_FILE))
    for suffix in _SQLITE_COMPANIONS:
        _tighten_file(f"{path}{suffix}")


def _tighten_file(path: str) -> None:
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
        if mode & 0o077:
            os.chmod(path, mode & PRIVATE_FILE)
    except (FileNotFoundError, PermissionError):  # absent, or not ours to change
        pass


@contextmanager
def file_lock(path: str, *, blocking: bool = True) -> Iterator[bool]:
    """flock on `path` (created 0600, with its folder 0700), released on exit or when the process
    dies. Yields False when not blocking and another holder has it."""
    private_directory(os.path.dirname(os.path.abspath(path)))
    # A new open file description each time: flock excludes other threads of this process too.
    fd = os.open(path, os.O_RDWR | os.O_CREAT, PRIVATE_FILE)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)  # releases the lock


def migrate(url: str, script_location: str, revision: str = "head") -> None:
    """Bring the database at `url` to the newest Alembic revision of `script_location` (or to
    `revision`: a database as an older release left it, for migration tests)."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", script_location)
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    database = make_url(url).database if url.startswith("sqlite") else None
    if not database or database == ":memory:":
        command.upgrade(config, revision)
        return
    # Instances of one service start together on one SQLite file: one migrates, the others wait
    # and then find it at head (two upgrading at once failed with "duplicate column name").
    with file_lock(f"{database}.migrate.lock"):
        command.upgrade(config, revision)


def run_alembic_env(target_metadata) -> None:
    """Body of every context's migrations/env.py (online mode only: we always have a database)."""
    from alembic import context

    url = context.config.get_main_option("sqlalchemy.url")
    engine = make_engine(url, pool_size=1)
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=connection.dialect.name == "sqlite",
        )
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


_EXACT = Context(prec=MAX_PREC)


class ScaledDecimal(TypeDecorator):
    """Exact decimal stored as an integer of 10^-scale units (money in minor units).

    SQLite has no exact decimal type (NUMERIC becomes a float there); an integer is exact on
    every backend and sums exactly in SQL.
    """

    impl = BigInteger
    cache_ok = True

    def __init__(self, scale: int = 2) -> None:
        super().__init__()
        self.scale = scale

    def process_bind_param(self, value, dialect):
        if value is None:
            return None
        # Exact shift: the default context (28 digits) would round away extra places unseen.
        units = Decimal(value).scaleb(self.scale, context=_EXACT)
        if units != units.to_integral_value():
            raise ValueError(f"{value} has more than {self.scale} decimal places")
        return int(units)

    def process_result_value(self, value, dialect):
        if value is None:
            return None
        return Decimal(int(value)).scaleb(-self.scale)


def bulk_insert(session: Session, table: Table, rows: list[dict]) -> None:
    """INSERT many rows (all with the same keys) in one driver executemany, each value converted
    by its column's own type (what `session.execute(table.insert(), rows)` does, without
    SQLAlchemy's per-row parameter bookkeeping, which the replay's profile showed to cost more
    than the driver's own work). The statement is compiled once per table, keys and dialect, so a
    single row costs less than the ordinary path too (a hot path's inserts, issue 11)."""
    if not rows:
        return
    deferred = session.info.get(DEFERRED_WRITES)
    dialect = session.get_bind().dialect
    plan = _insert_plan(dialect, table, tuple(rows[0]))
    if plan is None:  # defaults to fill, or renamed parameters: the ordinary path
        if deferred is not None:
            stop_deferring(session)  # in the order the unit wrote them
        session.execute(table.insert(), rows)
        return
    sql, pairs, positional = plan
    # qmark/format drivers (pysqlite) take tuples in the statement's order, pyformat ones (pymysql) dicts.
    if positional:
        values: list = [tuple(row[name] if process is None else process(row[name]) for name, process in pairs)
                        for row in rows]
    else:
        values = [{name: row[name] if process is None else process(row[name]) for name, process in pairs}
                  for row in rows]
    if deferred is not None:  # only the group committer defers: SQLite, positional parameters
        head, _, placeholders = sql.partition(" VALUES ")
        deferred.insert(table, head, placeholders, rows, values)
        return
    session.connection().exec_driver_sql(sql, values[0] if len(values) == 1 else values)


def pending_rows(session: Session, table: Table) -> list[dict]:
    """The rows inserted into `table` by this unit of work's commit group that are not in the table
    yet (deferred: Database.transaction), as given to bulk_insert. None anywhere else."""
    deferred = session.info.get(DEFERRED_WRITES)
    return [] if deferred is None else deferred.pending(table)


def stop_deferring(session: Session) -> None:
    """This unit of work's deferred writes run now (in its own transaction or savepoint, so they
    stay its own), and its writes from here on at once: before it reads what it wrote, or writes
    anything but through bulk_insert and upsert_add."""
    deferred = session.info.get(DEFERRED_WRITES)
    if deferred is not None:
        deferred.stop(session)


@functools.lru_cache(maxsize=256)
def _insert_plan(dialect, table: Table, keys: tuple[str, ...]):
    """(SQL, [(parameter, its column type's bind processor)], positional?) of `table`'s INSERT of
    `keys` on `dialect`; None when the compiled statement binds other parameters than `keys`."""
    compiled = table.insert().compile(dialect=dialect, column_keys=list(keys))
    if set(compiled.binds) != set(keys):
        return None
    names = list(compiled.positiontup) if dialect.positional else list(keys)
    pairs = tuple((name, table.c[name].type.dialect_impl(dialect).bind_processor(dialect)) for name in names)
    return str(compiled), pairs, dialect.positional


def once_per_transaction(session: Session, key: str, read):
    """`read(session)`, done once per transaction and kept in `session.info[key]` (a consumer's
    batch reads it once, not per event). For what nobody else can change before the commit (a row
    this transaction locked, or one whose writers take a lock this transaction holds), or whose
    value as of the first read is right for the whole transaction (the caller says why); and for
    what this transaction does not change itself, or drops with `forget_in_transaction` when it
    does. Kept for the innermost transaction it was read in: a savepoint begun, rolled back or
    released since means a new read."""
    transaction = session.get_nested_transaction() or session.get_transaction()
    kept = session.info.get(key)
    if kept is None or kept[0] is not transaction:
        kept = session.info[key] = (transaction, read(session))
    return kept[1]


def forget_in_transaction(session: Session, key: str) -> None:
    """Drop what `once_per_transaction` kept under `key`: this transaction changed it."""
    session.info.pop(key, None)


def upsert_add(session: Session, table: Table, keys: dict, increments: dict) -> None:
    """INSERT the row or add `increments` to its columns, atomically (counters, totals)."""
    dialect = session.get_bind().dialect.name
    statement = _upsert_add_statement(dialect, table, tuple(keys), tuple(increments))
    deferred = session.info.get(DEFERRED_WRITES)
    if deferred is not None:
        deferred.add(table, statement, keys, increments)
        return
    session.execute(statement, {**keys, **increments})


@functools.lru_cache(maxsize=256)
def _upsert_add_statement(dialect: str, table: Table, keys: tuple[str, ...], increments: tuple[str, ...]):
    # Built once per shape, values bound at execution: building it per call cost SQLAlchemy a
    # new statement and cache key each time (a tenth of a postback's CPU, issue 11).
    values = {c: bindparam(c, type_=table.c[c].type) for c in (*keys, *increments)}
    if dialect in ("mysql", "mariadb"):
        from sqlalchemy.dialects.mysql import insert
        statement = insert(table).values(values)
        return statement.on_duplicate_key_update({c: table.c[c] + statement.inserted[c] for c in increments})
    if dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    else:
        from sqlalchemy.dialects.postgresql import insert
    statement = insert(table).values(values)
    return statement.on_conflict_do_update(
        index_elements=list(keys), set_={c: table.c[c] + statement.excluded[c] for c in increments})


class UtcDateTime(TypeDecorator):
    """Aware UTC datetimes in, aware UTC datetimes out, microseconds kept on every backend."""

    impl = DateTime
    cache_ok = True

    def load_dialect_impl(self, dialect):
        if dialect.name in ("mysql", "mariadb"):
            from sqlalchemy.dialects.mysql import DATETIME
            return dialect.type_descriptor(DATETIME(fsp=6))
        return dialect.type_descriptor(DateTime())

    def process_bind_param(self, value, dialect):
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime: use aware UTC datetimes")
        return value.astimezone(timezone.utc).replace(tzinfo=None)

    def process_result_value(self, value, dialect):
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc)


def where_equal(query, table: Table, **filters):
    """Add `column = value` for every filter given (None means no filter)."""
    for column, value in filters.items():
        if value is not None:
            query = query.where(table.c[column] == value)
    return query
