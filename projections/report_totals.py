"""Keep the per-company totals of listed report rows in ``report_totals``.

Database triggers on ``license_allocations`` add each written row's change of
``listed``, ``suspended`` or ``company_id`` to its company's totals in the same
transaction, so every path that writes report rows keeps them: the fold, the
copies refresh and a rebuild's catch-up. On PostgreSQL they are statement
triggers that read the statement's changed rows (transition tables) and write
one row per company; on SQLite they are row triggers. A rebuild fills its
tables without them, then calls ``recount`` and ``install`` once at the end.

PostgreSQL batches that write report rows take their turns under the copies
lock (projections.apply), so updates of a company's totals do not deadlock.

NOTE: no trigger watches deletions, because nothing deletes report rows. Code
that deletes them must also add a DELETE trigger or call ``recount``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlalchemy import DDL, Connection, delete, event, func, insert, select

if TYPE_CHECKING:
    from projections.schema import Projection

# The columns whose change moves a row in or out of a company's totals.
_COUNTED = "company_id, listed, suspended"


def keep_with_tables(projection: Projection) -> None:
    """Install the triggers whenever ``metadata.create_all`` creates the tables.

    Dropping the tables drops their triggers. On PostgreSQL, the trigger
    functions are dropped after them.
    """

    def created(target, connection: Connection, **kw) -> None:
        install(connection, projection)

    def dropped(target, connection: Connection, **kw) -> None:
        if connection.dialect.name == "postgresql":
            for name in trigger_names(projection):
                connection.execute(DDL(f"DROP FUNCTION IF EXISTS {name}()"))

    event.listen(projection.metadata, "after_create", created)
    event.listen(projection.metadata, "after_drop", dropped)


def install(conn: Connection, projection: Projection) -> None:
    """Create the triggers, replacing any that exist."""
    rows = projection.license_allocations.name
    totals = projection.report_totals.name
    on_insert, on_update = trigger_names(projection)
    if conn.dialect.name == "postgresql":
        statements = _postgresql(rows, totals, on_insert, on_update)
    else:
        statements = _sqlite(rows, totals, on_insert, on_update)
    for statement in statements:
        conn.execute(DDL(statement))


def recount(conn: Connection, projection: Projection) -> None:
    """Replace the totals by a count of the report rows."""
    rows, totals = projection.license_allocations, projection.report_totals
    counted = (
        select(
            rows.c.company_id,
            func.count(),
            func.count().filter(rows.c.suspended),
        )
        .where(rows.c.listed)
        .group_by(rows.c.company_id)
    )
    conn.execute(delete(totals))
    conn.execute(
        insert(totals).from_select(
            ["company_id", "listed_rows", "suspended_rows"], counted
        )
    )


def trigger_names(projection: Projection) -> tuple[str, str]:
    """Return the names of the insert and update triggers and their functions."""
    totals = projection.report_totals.name
    return f"{totals}_on_insert", f"{totals}_on_update"


def _postgresql(rows: str, totals: str, on_insert: str, on_update: str) -> list[str]:
    """Return the DDL of the two trigger functions and their triggers.

    New rows are added per statement. Updates are counted per row: PostgreSQL
    allows a column list only on triggers without transition tables, and
    with the list and the WHEN condition the fold's updates of counts and
    dates fire nothing.
    """
    return [
        _plpgsql(
            on_insert,
            f"""
            INSERT INTO {totals} (company_id, listed_rows, suspended_rows)
            SELECT company_id, count(*), count(*) FILTER (WHERE suspended)
            FROM new_rows
            WHERE listed
            GROUP BY company_id
            {_add_on_conflict(totals)};
            """,
        ),
        _plpgsql(
            on_update,
            f"""
            IF OLD.listed THEN
                {_add_row(totals, "OLD", "-")}
            END IF;
            IF NEW.listed THEN
                {_add_row(totals, "NEW", "")}
            END IF;
            """,
        ),
        f"DROP TRIGGER IF EXISTS {on_insert} ON {rows}",
        f"DROP TRIGGER IF EXISTS {on_update} ON {rows}",
        f"CREATE TRIGGER {on_insert} AFTER INSERT ON {rows}"
        " REFERENCING NEW TABLE AS new_rows"
        f" FOR EACH STATEMENT EXECUTE FUNCTION {on_insert}()",
        f"CREATE TRIGGER {on_update} AFTER UPDATE OF {_COUNTED} ON {rows}"
        f" FOR EACH ROW WHEN ({_changed('OLD', 'NEW', 'IS DISTINCT FROM')})"
        f" EXECUTE FUNCTION {on_update}()",
    ]


def _sqlite(rows: str, totals: str, on_insert: str, on_update: str) -> list[str]:
    """Return the DDL of one row trigger per operation."""
    return [
        f"DROP TRIGGER IF EXISTS {on_insert}",
        f"DROP TRIGGER IF EXISTS {on_update}",
        f"""
        CREATE TRIGGER {on_insert} AFTER INSERT ON {rows} WHEN new.listed
        BEGIN {_add_row(totals, "new", "")} END
        """,
        f"""
        CREATE TRIGGER {on_update} AFTER UPDATE OF {_COUNTED} ON {rows}
        WHEN {_changed("old", "new", "IS NOT")}
        BEGIN
            {_add_row(totals, "old", "-", where="old.listed")}
            {_add_row(totals, "new", "", where="new.listed")}
        END
        """,
    ]


def _add_on_conflict(totals: str) -> str:
    return f"""
        ON CONFLICT (company_id) DO UPDATE SET
            listed_rows = {totals}.listed_rows + excluded.listed_rows,
            suspended_rows = {totals}.suspended_rows + excluded.suspended_rows
    """


def _add_row(totals: str, row: str, sign: str, where: str = "true") -> str:
    """Return the statement that adds (or, with sign "-", removes) one row."""
    # SELECT ... WHERE rather than VALUES, so that SQLite skips it by condition.
    # The WHERE clause also keeps SQLite from reading ON CONFLICT as a join.
    return f"""
        INSERT INTO {totals} (company_id, listed_rows, suspended_rows)
        SELECT {row}.company_id, {sign}1, {sign}CAST({row}.suspended AS integer)
        WHERE {where}
        {_add_on_conflict(totals)};
    """


def _changed(old: str, new: str, differs: str) -> str:
    """Return the condition that a row's change moves it between totals."""
    columns = " OR ".join(
        f"{old}.{column} {differs} {new}.{column}" for column in _COUNTED.split(", ")
    )
    return f"({old}.listed OR {new}.listed) AND ({columns})"


def _plpgsql(name: str, body: str) -> str:
    return f"""
        CREATE OR REPLACE FUNCTION {name}() RETURNS trigger
        LANGUAGE plpgsql AS $body$
        BEGIN
            {body}
            RETURN NULL;
        END
        $body$
    """
