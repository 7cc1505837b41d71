"""A throwaway PostgreSQL database per benchmark run."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, create_engine
from sqlalchemy.engine import URL, make_url
from sqlalchemy.pool import NullPool


def nullpool_engine(url: URL | str, **kwargs: Any) -> Engine:
    # NullPool: a benchmark may fork (the load generator), and forked children
    # must not inherit pooled PostgreSQL sockets; connecting per use costs nothing here.
    return create_engine(url, poolclass=NullPool, **kwargs)


def create_database(admin_url: str, name: str) -> URL:
    """Create ``name`` (dropping a leftover of that name first); return its URL."""
    admin = nullpool_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    finally:
        admin.dispose()
    return make_url(admin_url).set(database=name)


def drop_database(admin_url: str, name: str) -> None:
    admin = nullpool_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            # FORCE: a server that did not shut down cleanly must not leave it behind.
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        admin.dispose()
