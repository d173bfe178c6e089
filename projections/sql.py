"""Small SQL helpers that hide the differences between PostgreSQL and SQLite."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, Engine, Table, create_engine, event
from sqlalchemy.dialects import postgresql, sqlite


def insert(conn: Connection, table: Table) -> Any:
    """Return an INSERT for the connection's dialect, with ON CONFLICT support."""
    if conn.dialect.name == "postgresql":
        return postgresql.insert(table)
    if conn.dialect.name == "sqlite":
        return sqlite.insert(table)
    raise NotImplementedError(
        f"unsupported database {conn.dialect.name!r}; use PostgreSQL or SQLite"
    )


def make_engine(url: str, **options: Any) -> Engine:
    """Create an engine; psycopg 3 is the PostgreSQL driver whatever the URL says."""
    if url.startswith(("postgresql://", "postgres://")):
        url = "postgresql+psycopg://" + url.split("://", 1)[1]
    if url.startswith("sqlite"):
        engine = create_engine(url, **options)
        event.listen(engine, "connect", _configure_sqlite)
        return engine
    return create_engine(url, pool_pre_ping=True, **options)


def without_jit(engine: Engine) -> Engine:
    """Turn PostgreSQL's JIT compilation off for the engine's new connections.

    A count over a large company's rows is costed above ``jit_above_cost``, and
    compiling it took about 100 ms of a 150 ms query. Short queries never
    repay that. Other databases are left as they are.
    """
    if engine.dialect.name == "postgresql":
        event.listen(engine, "connect", _set_jit_off)
    return engine


def _set_jit_off(dbapi_connection: Any, _record: Any) -> None:
    # A connection of the pool starts outside a transaction, and the SET lasts
    # for the session.
    with dbapi_connection.cursor() as cursor:
        cursor.execute("SET jit = off")
    dbapi_connection.commit()


def _configure_sqlite(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets the API read while the consumer writes; the busy timeout makes
    # concurrent writers wait instead of failing at once.
    # SQLite's own lower() folds ASCII letters only; Python's folds all of them,
    # as PostgreSQL's does in a UTF-8 database.
    dbapi_connection.create_function("lower", 1, _lower, deterministic=True)
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _lower(value: object) -> object:
    return value.lower() if isinstance(value, str) else value
