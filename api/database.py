"""Database access of the API and the SQL that differs between PostgreSQL and SQLite."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from fastapi import Request
from sqlalchemy import Connection, Engine, Text, event
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.functions import FunctionElement

from projections.registry import live_projection
from projections.schema import Projection

# Name of the SQLite function that lower-cases all of Unicode, as PostgreSQL's
# lower() does in a UTF-8 database. SQLite's own lower() folds only ASCII.
_SQLITE_LOWER = "unicode_lower"


class UnicodeLower(FunctionElement):
    """``lower(text)`` that folds non-ASCII letters on both databases."""

    type = Text()
    name = "unicode_lower"
    inherit_cache = True


@compiles(UnicodeLower)
def _lower_default(element: UnicodeLower, compiler: Any, **options: Any) -> str:
    return f"lower({compiler.process(element.clauses, **options)})"


@compiles(UnicodeLower, "sqlite")
def _lower_sqlite(element: UnicodeLower, compiler: Any, **options: Any) -> str:
    return f"{_SQLITE_LOWER}({compiler.process(element.clauses, **options)})"


class JsonArrayAgg(FunctionElement):
    """Aggregate values into a JSON array, returned as text (NULL or ``[]`` if none)."""

    type = Text()
    name = "json_array_agg"
    inherit_cache = True


@compiles(JsonArrayAgg)
def _json_agg_default(element: JsonArrayAgg, compiler: Any, **options: Any) -> str:
    return f"CAST(json_agg({compiler.process(element.clauses, **options)}) AS TEXT)"


@compiles(JsonArrayAgg, "sqlite")
def _json_agg_sqlite(element: JsonArrayAgg, compiler: Any, **options: Any) -> str:
    return f"json_group_array({compiler.process(element.clauses, **options)})"


def prepare_engine(engine: Engine) -> None:
    """Add what the API's SQL needs to ``engine``: on SQLite, ``unicode_lower``.

    The function is registered when a connection is checked out, so it also
    reaches connections that were pooled before this call.
    """
    if engine.dialect.name != "sqlite":
        return
    if not event.contains(engine, "checkout", _register_sqlite_functions):
        event.listen(engine, "checkout", _register_sqlite_functions)


def _register_sqlite_functions(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
    if record.info.get(_SQLITE_LOWER):
        return
    dbapi_connection.create_function(
        _SQLITE_LOWER, 1, _unicode_lower, deterministic=True
    )
    record.info[_SQLITE_LOWER] = True


def _unicode_lower(value: object) -> object:
    return value.lower() if isinstance(value, str) else value


@contextmanager
def live_snapshot(engine: Engine) -> Iterator[tuple[Connection, Projection]]:
    """Open a connection whose queries all read one committed state.

    Yields the connection and the tables of the live projection in that
    state, so a rebuild that switches versions meanwhile changes nothing.
    PostgreSQL runs the queries in one REPEATABLE READ transaction. On SQLite,
    the explicit BEGIN opens the read transaction that Python's sqlite3 module
    does not open for SELECT, and the rollback on close ends it. Raises
    SchemaOutOfDate when the database has no usable live projection.
    """
    with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            conn.execution_options(isolation_level="REPEATABLE READ")
        else:
            conn.exec_driver_sql("BEGIN")
        yield conn, live_projection(conn)


def get_engine(request: Request) -> Engine:
    """Return the engine that create_app stored on the application."""
    return request.app.state.engine
