"""Remove a deleted user's personal data from the event store and old projections.

A ``user.deleted`` event makes the live projection drop the user's names and
email (its tombstone clears them). The functions here also blank those fields in
the stored ``user.upserted`` events that the deletion supersedes, so a rebuild
or a point-in-time report never brings them back, and in retired projection
versions. docs/privacy.md lists what is removed and what is kept.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterator
from typing import Any

from sqlalchemy import (
    Connection,
    Text,
    exists,
    func,
    literal,
    select,
    tuple_,
    update,
)
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.functions import FunctionElement

from consumer.events import Event
from projections import schema
from projections.ordering import NO_SEQUENCE
from projections.registry import RETIRED, tables

logger = logging.getLogger(__name__)

# The event types whose data has a user_id that event_store.subject_user_id
# records.
SUBJECT_USER_TYPES = frozenset(
    {
        "user.upserted",
        "user.deleted",
        "user.department.assigned",
        "user.department.unassigned",
    }
)
PERSONAL_FIELDS = ("firstname", "lastname", "email")
# Their lower-cased copies on the report rows.
PERSONAL_KEYS = tuple(f"{name}_key" for name in PERSONAL_FIELDS)
# User ids per UPDATE, well below the bind parameter limits of SQLite (32,766)
# and PostgreSQL (65,535).
_CHUNK = 1_000


class ScrubbedUserPayload(FunctionElement):
    """A user.upserted payload (JSON text) with firstname, lastname and email "".

    The fields become empty strings, not null, because the event contract
    requires strings there and a rebuild decodes the payload again.
    """

    type = Text()
    name = "scrubbed_user_payload"
    inherit_cache = True


@compiles(ScrubbedUserPayload, "sqlite")
def _scrubbed_sqlite(element: ScrubbedUserPayload, compiler: Any, **kw: Any) -> str:
    payload = compiler.process(element.clauses, **kw)
    paths = ", ".join(f"'$.data.{name}', ''" for name in PERSONAL_FIELDS)
    return f"json_set({payload}, {paths})"


@compiles(ScrubbedUserPayload, "postgresql")
def _scrubbed_postgresql(element: ScrubbedUserPayload, compiler: Any, **kw: Any) -> str:
    expression = f"CAST({compiler.process(element.clauses, **kw)} AS jsonb)"
    for name in PERSONAL_FIELDS:
        expression = f"jsonb_set({expression}, '{{data,{name}}}', '\"\"')"
    return f"CAST({expression} AS TEXT)"


def scrub_deleted_users(conn: Connection, user_ids: Collection[int]) -> int:
    """Blank the personal data of those ``user_ids`` that have a stored deletion.

    In the event store, a user.upserted event is blanked when a user.deleted
    event of the same user is newer by the projection's order (time, sequence,
    position), so exactly the upserts that the tombstone beats lose their
    names. An upsert newer than every deletion re-creates the user and is
    kept. In retired projection versions, which nothing updates any more, the
    deleted users' personal columns are cleared. Runs in the caller's
    transaction and returns the number of event store rows changed.
    """
    deleted = _deleted_users(conn, sorted(set(user_ids)))
    if not deleted:
        return 0
    changed = 0
    for chunk in _chunks(deleted):
        changed += conn.execute(_scrub_store_statement(chunk)).rowcount
    retired = _retired_versions(conn)
    for version, layout in retired:
        retired_tables = tables(version)
        users = retired_tables.users
        # Layout 2 added lower-cased copies of the fields to the report rows.
        copies = retired_tables.license_allocations if layout >= 2 else None
        for chunk in _chunks(deleted):
            conn.execute(
                update(users)
                .where(users.c.user_id.in_(chunk))
                .values(dict.fromkeys(PERSONAL_FIELDS))
            )
            if copies is not None:
                conn.execute(
                    update(copies)
                    .where(copies.c.user_id.in_(chunk))
                    .values(dict.fromkeys(PERSONAL_KEYS))
                )
    logger.info(
        "personal data scrubbed users=%d stored_events=%d retired_versions=%d",
        len(deleted),
        changed,
        len(retired),
    )
    return changed


def subject_user_id(event: Event) -> int | None:
    """Return the user id that ``event_store.subject_user_id`` records for an event."""
    return event.data.user_id if event.type in SUBJECT_USER_TYPES else None


def _deleted_users(conn: Connection, user_ids: list[int]) -> list[int]:
    """Return the ids among ``user_ids`` that have a user.deleted event stored."""
    store = schema.event_store
    # The type is rendered into the SQL text, not bound, so that the condition
    # matches the predicate of the partial index ix_event_store_user_deleted.
    # psycopg prepares a query once it has run 5 times, and PostgreSQL may then
    # switch to a generic plan, which cannot use that index when the type is a
    # parameter.
    deletion = store.c.type == literal("user.deleted", literal_execute=True)
    found: set[int] = set()
    for chunk in _chunks(user_ids):
        query = select(store.c.subject_user_id).where(
            store.c.subject_user_id.in_(chunk), deletion
        )
        found.update(conn.execute(query.distinct()).scalars())
    return sorted(found)


def _scrub_store_statement(user_ids: list[int]):
    store = schema.event_store
    deletion = store.alias("deletion")

    def version(table):
        sequence = func.coalesce(table.c.sequence, NO_SEQUENCE)
        return tuple_(table.c.time_us, sequence, table.c.position)

    superseded = exists().where(
        deletion.c.type == "user.deleted",
        deletion.c.subject_user_id == store.c.subject_user_id,
        version(deletion) > version(store),
    )
    return (
        update(store)
        .where(
            store.c.subject_user_id.in_(user_ids),
            store.c.type == "user.upserted",
            superseded,
        )
        .values(payload=ScrubbedUserPayload(store.c.payload))
    )


def _retired_versions(conn: Connection) -> list[tuple[int, int]]:
    """Return the version and layout of each retired projection version."""
    registry = schema.projections
    query = select(registry.c.version, registry.c.layout).where(
        registry.c.status == RETIRED
    )
    return [tuple(row) for row in conn.execute(query)]


def _chunks(ids: list[int]) -> Iterator[list[int]]:
    for start in range(0, len(ids), _CHUNK):
        yield ids[start : start + _CHUNK]
