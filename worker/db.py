"""Engine and sessions: one engine per process and database URL, one session per unit of work."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from worker.hooks import (
    AFTER_THE_END_KEY,
    AfterTheEnd,
    Consumer,
    committed_anyway,
    hand_over,
    install,
)

T = TypeVar("T")


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # Let SQLAlchemy, not pysqlite, emit BEGIN (see _sqlite_begin).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _sqlite_begin(conn: Any) -> None:
    # Take the write lock when the transaction starts: read-then-write
    # transactions (claim, apply an update) then serialize instead of failing
    # with "database is locked" when two processes upgrade at once.
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def make_engine(url: str, pool_size: int = 5) -> Engine:
    """The engine of ``url``; on PostgreSQL a pool that keeps up to ``pool_size``
    connections (opened on demand) and opens up to as many more at a peak."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    # No pool_pre_ping: a ping is a round trip on every checkout. A connection the
    # server dropped fails its first statement instead; SQLAlchemy then invalidates
    # the whole pool, and the code that already retries database errors (the
    # submit flow, Celery retries, the sweep, the provider's webhook retries)
    # runs the unit of work again on a fresh connection.
    return create_engine(url, pool_size=pool_size, max_overflow=pool_size)


class Database:
    """One database of one process: its engine and the sessions made from it.

    Built by an entry point from the settings (worker.runtime); ``consumers``
    are told about every job that reached a terminal status, after commit;
    ``after_the_end`` says which ended jobs need no finalize_job (worker.hooks).
    """

    def __init__(
        self,
        url: str,
        consumers: Sequence[Consumer] = (),
        after_the_end: AfterTheEnd | None = None,
        pool_size: int = 5,
    ) -> None:
        self.url = url
        self._consumers = tuple(consumers)
        self.engine = make_engine(url, pool_size)
        info = {AFTER_THE_END_KEY: after_the_end} if after_the_end is not None else {}
        self._factory = sessionmaker(bind=self.engine, expire_on_commit=False, info=info)
        install(self._factory, consumers)

    @property
    def is_postgres(self) -> bool:
        return self.engine.dialect.name == "postgresql"

    def new_session(self) -> Session:
        return self._factory()

    @contextmanager
    def session(self) -> Iterator[Session]:
        """One transaction: commit on success, roll back on error, always close."""
        session = self._factory()
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    @contextmanager
    def autocommit(self) -> Iterator[Session]:
        """A unit of work whose statements are each atomic by themselves: one
        statement, or writes guarded by what was read (worker.jobs, optimistic).

        On PostgreSQL it runs in autocommit mode: no BEGIN and no COMMIT round
        trip (psycopg sends each as a round trip of its own), so a one-statement
        step costs one round trip instead of three. Nothing can hold a lock
        across statements here: read-then-write steps that need one use
        :meth:`session`. Terminal-job consumers run as after any commit.
        """
        if not self.is_postgres:  # SQLite: BEGIN IMMEDIATE is how writers queue up
            with self.session() as session:
                yield session
            return
        with self.engine.connect() as connection:
            session = self._factory(bind=connection.execution_options(isolation_level="AUTOCOMMIT"))
            try:
                yield session
                session.commit()
            except BaseException:
                # What was written is committed (statement by statement): the jobs it
                # ended are handed over even though the unit of work failed later.
                ended = committed_anyway(session)
                session.rollback()
                hand_over(ended, self._consumers)
                raise
            finally:
                session.close()

    def dispose(self) -> None:
        self.engine.dispose()


# What a database that is restarting or unreachable raises: worth trying again.
DB_UNAVAILABLE = (OperationalError, InterfaceError)


def is_unavailable(exc: BaseException) -> bool:
    """The database could not be reached (as opposed to refusing a statement)."""
    return isinstance(exc, DB_UNAVAILABLE) or (
        isinstance(exc, DBAPIError) and exc.connection_invalidated
    )


def is_postgres(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def retry_dropped(work: Callable[[], T], attempts: int = 2) -> T:
    """Run a unit of work, once more if the database connection was dropped.

    There is no ping per checkout: after a database restart or failover, the
    first use of each pooled connection fails, and SQLAlchemy then replaces the
    whole pool. For work that is safe to repeat (a read, a transaction that was
    rolled back, an idempotent write, a create deduplicated by its own id),
    trying again at once on a fresh connection hides that from the caller.
    """
    for attempt in range(1, attempts + 1):
        try:
            return work()
        except DBAPIError as exc:
            if attempt == attempts or not exc.connection_invalidated:
                raise
    raise AssertionError("unreachable")  # pragma: no cover
