"""Engine and sessions: one engine per process and database URL, one session per unit of work."""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from worker.config import get_settings


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


def make_engine(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=10)


@functools.cache
def _engine_for(url: str, pid: int) -> Engine:
    # Keyed by pid: a forked Celery child must not share its parent's sockets.
    engine = make_engine(url)
    _engines.append(engine)
    return engine


_engines: list[Engine] = []


def get_engine() -> Engine:
    return _engine_for(get_settings().database_url, os.getpid())


@functools.cache
def _sessionmaker_for(engine: Engine) -> sessionmaker[Session]:
    from worker import hooks

    factory = sessionmaker(bind=engine, expire_on_commit=False)
    hooks.install(factory)
    return factory


def new_session() -> Session:
    return _sessionmaker_for(get_engine())()


@contextmanager
def session_scope() -> Iterator[Session]:
    """One transaction: commit on success, roll back on error, always close."""
    session = new_session()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def is_postgres(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def reset_engines() -> None:
    """Forget every engine (tests switching databases); call before forking nothing."""
    for engine in _engines:
        engine.dispose()
    _engines.clear()
    _engine_for.cache_clear()
    _sessionmaker_for.cache_clear()
