"""Database access of the API and the SQL that differs between PostgreSQL and SQLite."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from fastapi import Request
from sqlalchemy import Connection, Engine, Text
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.functions import FunctionElement

from projections.registry import live_projection
from projections.schema import Projection


class UnicodeLower(FunctionElement):
    """``lower(text)`` that folds non-ASCII letters on both databases.

    On SQLite this relies on the Python ``lower`` function that
    ``projections.sql.make_engine`` registers on every connection.
    """

    type = Text()
    name = "lower"
    inherit_cache = True


@compiles(UnicodeLower)
def _lower(element: UnicodeLower, compiler: Any, **options: Any) -> str:
    return f"lower({compiler.process(element.clauses, **options)})"


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


async def get_engine(request: Request) -> Engine:
    """Return the engine that create_app stored on the application.

    It is async so that FastAPI calls it on the event loop, not in a thread.
    """
    return request.app.state.engine
