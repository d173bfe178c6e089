"""The baselines of the ingest and rebuild benchmarks: PostgreSQL doing it alone.

The events are loaded with one COPY into a staging table and merged into the
projection tables by one INSERT ... SELECT ... ON CONFLICT per table, in one
transaction, with no Python code touching an event. Two inputs are measured:

- typed rows, with the JSON parsed before the timing starts: what the database
  needs to write the projection, the floor for any pipeline;
- the stored CloudEvents JSON, parsed by PostgreSQL after the COPY.

The result has the same rows as the projection that license-report builds
(``compare_projections`` checks it), so the baseline and the pipeline do the
same work.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from sqlalchemy import Connection, Engine, func, select, text

from projections import schema
from projections.ordering import NO_SEQUENCE
from projections.registry import tables
from projections.schema import Projection

STAGING = "bench_staging"
PARSED = "bench_events"
# order_sequence of an unallocation without a sequence: see projections.ordering.
UNALLOCATION_WITHOUT_SEQUENCE = 2**62
COMPARED = [
    "license_allocations",
    "license_events",
    "companies",
    "departments",
    "users",
    "memberships",
    "courses",
    "licenses",
]
# Arrival positions differ between any two ways of building the tables.
IGNORED_COLUMNS = {"version_position"}


def _micros(expression: str) -> str:
    """SQL for an RFC 3339 text ``expression`` as microseconds since the epoch."""
    return f"(extract(epoch FROM ({expression})::timestamptz) * 1000000)::bigint"


# The columns of the parsed events: name, SQL type, and the SQL that reads the
# value from the CloudEvent ``document``.
_COLUMNS = [
    ("position", "bigint", "position"),
    ("event_id", "text", "document->>'id'"),
    ("type", "text", "document->>'type'"),
    ("source", "text", "document->>'source'"),
    ("time_us", "bigint", _micros("document->>'time'")),
    ("sequence", "bigint", "(document->>'sequence')::bigint"),
    ("payload", "text", "payload"),
    *(
        (name, "bigint", f"(document->'data'->>'{name}')::bigint")
        for name in (
            "user_id",
            "license_id",
            "course_id",
            "company_id",
            "department_id",
            "parent_id",
        )
    ),
    *(
        (name, "text", f"document->'data'->>'{name}'")
        for name in ("name", "firstname", "lastname", "email")
    ),
    *(
        (name, "boolean", f"(document->'data'->>'{name}')::boolean")
        for name in ("suspended", "reusable", "program")
    ),
    ("issued_at_us", "bigint", _micros("document->'data'->>'issued_at'")),
    ("start_us", "bigint", _micros("document->'data'->>'start_date'")),
    ("expiry_us", "bigint", _micros("document->'data'->>'expiry_date'")),
]


@dataclass(frozen=True)
class Input:
    """The events to load: stored payloads, or the same events as typed rows."""

    payloads: bytes | None = None
    rows: bytes | None = None
    events: int = 0


def export_payloads(engine: Engine) -> Input:
    """Return the event store's payloads in COPY text format, one per line."""
    query = "COPY (SELECT payload FROM event_store ORDER BY position) TO STDOUT"
    return Input(payloads=_copy_out(engine, query), events=_count(engine))


def export_rows(engine: Engine, with_payloads: bool) -> Input:
    """Return the stored events as typed rows in COPY text format.

    PostgreSQL parses the JSON here, before any timing starts, so loading these
    rows measures only what the database needs to write the projection. The
    payload column is NULL unless ``with_payloads``.
    """
    columns = ", ".join(
        f"{sql if with_payloads or name != 'payload' else 'NULL'} AS {name}"
        for name, _, sql in _COLUMNS
    )
    query = (
        f"COPY (SELECT {columns} FROM (SELECT position, payload, payload::jsonb "
        "AS document FROM event_store) AS stored ORDER BY position) TO STDOUT"
    )
    return Input(rows=_copy_out(engine, query), events=_count(engine))


def _copy_out(engine: Engine, query: str) -> bytes:
    raw = engine.raw_connection()
    try:
        cursor = raw.driver_connection.cursor()
        with cursor.copy(query) as copy:
            return b"".join(bytes(chunk) for chunk in copy)
    finally:
        raw.close()


def _count(engine: Engine) -> int:
    with engine.connect() as conn:
        count = select(func.count()).select_from(schema.event_store)
        return conn.execute(count).scalar_one()


def unused_version(engine: Engine) -> Projection:
    """Return table definitions of a version that the registry does not list."""
    with engine.connect() as conn:
        newest = conn.execute(select(func.max(schema.projections.c.version))).scalar()
    return tables((newest or 0) + 100)


def copy_merge(
    engine: Engine, events: Input, projection: Projection, store: bool
) -> float:
    """Load ``events`` into ``projection`` (and the event store); return seconds.

    The tables of ``projection`` must exist and be empty. With ``store``, the
    events are also inserted into the event store, as the consumer does.
    """
    started = time.monotonic()
    with engine.begin() as conn:
        if events.rows is not None:
            _copy_rows(conn, events.rows)
        else:
            _copy_payloads(conn, events.payloads)
            _parse(conn)
        if store:
            _merge_store(conn)
        _merge_license_events(conn, projection)
        _merge_references(conn, projection)
        _merge_allocations(conn, projection)
    return time.monotonic() - started


def _copy_in(conn: Connection, table: str, columns: str, data: bytes) -> None:
    cursor = conn.connection.driver_connection.cursor()
    with cursor.copy(f"COPY {table} ({columns}) FROM STDIN") as copy:
        view = memoryview(data)
        for start in range(0, len(view), 1 << 20):
            copy.write(view[start : start + (1 << 20)])


def _copy_rows(conn: Connection, rows: bytes) -> None:
    definitions = ", ".join(f"{name} {sql_type}" for name, sql_type, _ in _COLUMNS)
    conn.execute(
        text(f"CREATE TEMPORARY TABLE {PARSED} ({definitions}) ON COMMIT DROP")
    )
    _copy_in(conn, PARSED, ", ".join(name for name, _, _ in _COLUMNS), rows)


def _copy_payloads(conn: Connection, payloads: bytes) -> None:
    conn.execute(
        text(
            f"CREATE TEMPORARY TABLE {STAGING} "
            "(position bigint GENERATED ALWAYS AS IDENTITY, payload text) "
            "ON COMMIT DROP"
        )
    )
    _copy_in(conn, STAGING, "payload", payloads)


def _parse(conn: Connection) -> None:
    columns = ", ".join(f"{sql} AS {name}" for name, _, sql in _COLUMNS)
    conn.execute(
        text(
            f"CREATE TEMPORARY TABLE {PARSED} ON COMMIT DROP AS "
            f"SELECT {columns} FROM (SELECT position, payload, payload::jsonb "
            f"AS document FROM {STAGING}) AS staged"
        )
    )


def _merge_store(conn: Connection) -> None:
    conn.execute(
        text(
            f"""
            INSERT INTO event_store
                (event_id, type, source, time_us, sequence, payload, recorded_at_us)
            SELECT event_id, type, source, time_us, sequence, payload,
                   (extract(epoch FROM now()) * 1000000)::bigint
            FROM {PARSED}
            ORDER BY event_id
            ON CONFLICT (event_id) DO NOTHING
            """
        )
    )


def _merge_license_events(conn: Connection, projection: Projection) -> None:
    conn.execute(
        text(
            f"""
            INSERT INTO {projection.license_events.name}
                (event_id, user_id, license_id, course_id, action, at_us, time_us,
                 order_sequence)
            SELECT event_id, user_id, license_id, course_id, action,
                   CASE WHEN action = 1 THEN issued_at_us ELSE time_us END,
                   time_us,
                   CASE WHEN sequence IS NOT NULL THEN 2 * sequence + 1 - action
                        WHEN action = 1 THEN {NO_SEQUENCE}
                        ELSE {UNALLOCATION_WITHOUT_SEQUENCE} END
            FROM (SELECT *, CASE type WHEN 'license.allocated' THEN 1 ELSE 0 END
                         AS action
                  FROM {PARSED}
                  WHERE type IN ('license.allocated', 'license.unallocated'))
                 AS license_event
            ON CONFLICT (event_id) DO NOTHING
            """
        )
    )


def _merge_allocations(conn: Connection, projection: Projection) -> None:
    """Fold the license events into report rows, with their copied columns.

    Runs after the reference tables are merged, since the copies come from
    them.
    """
    latest = "ORDER BY time_us DESC, order_sequence DESC"
    p = projection
    conn.execute(
        text(
            f"""
            INSERT INTO {p.license_allocations.name} AS allocation
                (user_id, license_id, course_id, allocations, unallocations,
                 allocated, last_time_us, last_order_sequence, last_allocated_us,
                 last_unallocated_us, first_allocated_us, first_unallocated_us,
                 company_id, listed, suspended,
                 lastname_key, firstname_key, email_key, department_key,
                 license_key, course_key)
            SELECT folded.*, l.company_id,
                   coalesce(NOT l.deleted AND l.company_id IS NOT NULL
                            AND NOT u.deleted AND m.user_id IS NOT NULL, false),
                   coalesce(u.suspended, false),
                   lower(u.lastname), lower(u.firstname), lower(u.email),
                   m.department_key, lower(l.name), lower(c.name)
            FROM (SELECT user_id, license_id, course_id,
                         count(*) FILTER (WHERE action = 1),
                         count(*) FILTER (WHERE action = 0),
                         (array_agg(action {latest}))[1] = 1,
                         max(time_us),
                         (array_agg(order_sequence {latest}))[1],
                         max(at_us) FILTER (WHERE action = 1),
                         max(at_us) FILTER (WHERE action = 0),
                         min(at_us) FILTER (WHERE action = 1),
                         min(at_us) FILTER (WHERE action = 0)
                  FROM {p.license_events.name}
                  GROUP BY user_id, license_id, course_id) AS folded
            LEFT JOIN {p.licenses.name} l USING (license_id)
            LEFT JOIN {p.users.name} u USING (user_id)
            LEFT JOIN {p.courses.name} c USING (course_id)
            LEFT JOIN (SELECT m.user_id, m.company_id,
                              min(lower(d.name)) AS department_key
                       FROM {p.memberships.name} m
                       LEFT JOIN {p.departments.name} d
                         ON d.department_id = m.department_id
                        AND d.company_id = m.company_id AND NOT d.deleted
                       WHERE m.assigned
                       GROUP BY m.user_id, m.company_id) AS m
              ON m.user_id = folded.user_id AND m.company_id = l.company_id
            ON CONFLICT (user_id, license_id, course_id) DO UPDATE SET
                allocations = allocation.allocations + excluded.allocations,
                unallocations = allocation.unallocations + excluded.unallocations
            """
        )
    )


# Per reference table: its key, the event types that change it, and the SQL of
# each of its other columns over the parsed events. A deletion leaves every
# column but the key NULL, or false where the column is NOT NULL.
_REFERENCES = {
    "companies": (["company_id"], ["company.upserted"], {"name": "name"}),
    "departments": (
        ["department_id"],
        ["department.upserted", "department.deleted"],
        {
            "company_id": "company_id",
            "name": "name",
            "parent_id": "parent_id",
            "deleted": "type = 'department.deleted'",
        },
    ),
    "users": (
        ["user_id"],
        ["user.upserted", "user.deleted"],
        {
            "firstname": "firstname",
            "lastname": "lastname",
            "email": "email",
            "suspended": "coalesce(suspended, false)",
            "deleted": "type = 'user.deleted'",
        },
    ),
    "memberships": (
        ["user_id", "company_id", "department_id"],
        ["user.department.assigned", "user.department.unassigned"],
        {"assigned": "type = 'user.department.assigned'"},
    ),
    "courses": (["course_id"], ["course.upserted"], {"name": "name"}),
    "licenses": (
        ["license_id"],
        ["license.upserted", "license.deleted"],
        {
            "company_id": "company_id",
            "name": "name",
            "reusable": "coalesce(reusable, false)",
            "program": "coalesce(program, false)",
            "start_us": "start_us",
            "expiry_us": "expiry_us",
            "deleted": "type = 'license.deleted'",
        },
    ),
}


def _merge_references(conn: Connection, projection: Projection) -> None:
    version = f"coalesce(sequence, {NO_SEQUENCE})"
    for name, (key, event_types, columns) in _REFERENCES.items():
        table = getattr(projection, name).name
        keys = ", ".join(key)
        names = ", ".join(columns)
        values = ", ".join(columns.values())
        updates = ", ".join(
            f"{column} = excluded.{column}"
            for column in [*columns, "version_time_us", "version_sequence"]
        )
        types = ", ".join(f"'{event_type}'" for event_type in event_types)
        conn.execute(
            text(
                f"""
                INSERT INTO {table} AS target ({keys}, {names}, version_time_us,
                    version_sequence, version_position)
                SELECT DISTINCT ON ({keys}) {keys}, {values}, time_us, {version},
                       position
                FROM {PARSED}
                WHERE type IN ({types})
                ORDER BY {keys}, time_us DESC, {version} DESC, position DESC
                ON CONFLICT ({keys}) DO UPDATE SET {updates}
                """
            )
        )


def compare_projections(engine: Engine, first: Projection, second: Projection) -> int:
    """Count the rows that are in only one of two projections' tables."""
    differing = 0
    with engine.connect() as conn:
        for name in COMPARED:
            one, other = getattr(first, name), getattr(second, name)
            columns = [c.name for c in one.c if c.name not in IGNORED_COLUMNS]
            for left, right in ((one, other), (other, one)):
                difference = (
                    _select_columns(left, columns)
                    .except_all(_select_columns(right, columns))
                    .subquery()
                )
                count = select(func.count()).select_from(difference)
                differing += conn.execute(count).scalar_one()
    return differing


def _select_columns(table, columns: list[str]):
    return select(*(table.c[column] for column in columns))
