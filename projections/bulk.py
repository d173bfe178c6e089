"""PostgreSQL bulk writes: COPY rows into a temporary staging table, then merge.

An executemany of INSERT ... ON CONFLICT costs a round trip or a large
statement per few rows. Here each batch of rows goes to PostgreSQL with one
COPY, and one INSERT ... SELECT from the staging table merges them, so the
server does the row-by-row work.

Each target table has one staging table per database session, created on
first use and emptied by PostgreSQL at every commit (ON COMMIT DELETE ROWS).
Its name is stable, so the statements that read it stay in SQLAlchemy's
compiled cache. A new table per batch made every statement new, which cost a
compilation each time and filled the cache with statements never used again.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Iterable, Sequence
from typing import Any

from psycopg import sql
from sqlalchemy import Column, Connection, MetaData, Table, delete
from sqlalchemy.schema import CreateTable


def stage(
    conn: Connection,
    target: Table,
    columns: Sequence[str],
    rows: Iterable[Sequence[Any]],
) -> Table:
    """Copy ``rows`` into the session's staging table for ``target``'s ``columns``.

    Each row gives the values of ``columns`` in that order. Returns the staging
    table, which has no keys or constraints and holds only these rows until
    the transaction ends or the next ``stage`` call for the same columns.
    """
    staging = _staging_table(target, tuple(columns))
    conn.execute(CreateTable(staging, if_not_exists=True))
    # Empty unless the same transaction staged rows for this table before.
    conn.execute(delete(staging))
    copy_rows(conn, staging, columns, rows)
    return staging


def copy_rows(
    conn: Connection,
    target: Table,
    columns: Sequence[str],
    rows: Iterable[Sequence[Any]],
) -> None:
    """Copy ``rows`` into ``target``'s ``columns`` with one COPY.

    A row that violates a constraint of ``target`` fails the whole COPY.
    """
    cursor = conn.connection.driver_connection.cursor()
    statement = sql.SQL("COPY {} ({}) FROM STDIN").format(
        sql.Identifier(target.name),
        sql.SQL(", ").join(map(sql.Identifier, columns)),
    )
    with cursor.copy(statement) as copy:
        for row in rows:
            copy.write_row(row)


@functools.lru_cache(maxsize=256)
def _staging_table(target: Table, columns: tuple[str, ...]) -> Table:
    # The name covers the column list, so a different list gets its own table.
    digest = zlib.crc32(",".join(columns).encode())
    name = f"staging_{target.name}_{digest:08x}"
    return Table(
        name,
        MetaData(),
        *(Column(column, target.c[column].type) for column in columns),
        prefixes=["TEMPORARY"],
        postgresql_on_commit="DELETE ROWS",
    )
