"""Apply a batch of events to the event store and the projection in one transaction.

Every change is a set-based upsert whose outcome does not depend on the order in
which events arrive: counters add up distinct events, and the latest event by
``(time, sequence)`` decides current state. An event id already in the event
store changes nothing.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import orjson
from sqlalchemy import Connection, case, func, tuple_

from consumer.events import Event
from consumer.timestamps import now_us
from license_report.errors import LicenseReportError
from projections import schema
from projections.ordering import (
    ALLOCATED,
    UNALLOCATED,
    order_sequence,
    version_sequence,
)
from projections.registry import live_projection
from projections.schema import Projection
from projections.sql import insert

STATE_ROW = "live"


@dataclass(frozen=True, slots=True)
class IncomingEvent:
    """A decoded event and where it was read from."""

    event: Event
    origin: str | None = None
    partition: int | None = None
    offset: int | None = None


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A rejected message value, kept with the reason it was rejected."""

    origin: str
    partition: int | None
    offset: int | None
    raw: bytes
    reason: str


# (group id, topic, partition)
OffsetKey = tuple[str, str, int]


@dataclass(frozen=True, slots=True)
class OffsetUpdate:
    """Move a stored offset from ``expected`` (None: no row yet) to ``next_offset``."""

    expected: int | None
    next_offset: int


class OffsetsFenced(LicenseReportError):
    """Another consumer stored offsets for the partition since this one read them."""

    def __init__(self, group_id: str, topic: str, partition: int, expected: int | None):
        super().__init__(
            f"stored offset moved: group_id={group_id} topic={topic} "
            f"partition={partition} expected={expected}; the partition was "
            "reassigned to another consumer"
        )
        self.topic = topic
        self.partition = partition


@dataclass(slots=True)
class BatchResult:
    """What one applied batch changed."""

    applied: Counter[str] = field(default_factory=Counter)
    duplicates: int = 0
    dead_letters: int = 0
    # Time of the newest newly applied event, if any.
    newest_time_us: int | None = None


def apply_batch(
    conn: Connection,
    incoming: Sequence[IncomingEvent],
    dead_letters: Sequence[DeadLetter] = (),
    offsets: Mapping[OffsetKey, OffsetUpdate] | None = None,
) -> BatchResult:
    """Store and project a batch inside the caller's transaction.

    ``offsets`` are stored in the same transaction, so the batch and its
    offsets commit or roll back together. Raises OffsetsFenced when another
    consumer stored offsets for one of the partitions first.
    """
    result = BatchResult(dead_letters=len(dead_letters))
    projection = live_projection(conn, lock=True)
    if offsets:
        # First, so a fenced consumer fails before it writes anything.
        _store_offsets(conn, offsets)
    new_events = store_events(conn, incoming)
    result.duplicates = len(incoming) - len(new_events)

    if new_events:
        project_events(conn, projection, new_events)
        result.applied.update(event.type for event, _ in new_events)
        result.newest_time_us = max(event.time_us for event, _ in new_events)
    if dead_letters:
        _store_dead_letters(conn, dead_letters)
    return result


def store_events(
    conn: Connection, incoming: Sequence[IncomingEvent]
) -> list[tuple[Event, int]]:
    """Append the events whose ids are new; return them with their positions."""
    unique: dict[str, IncomingEvent] = {}
    for item in incoming:
        unique.setdefault(item.event.event_id, item)
    if not unique:
        return []

    recorded_at = now_us()
    # Sorted ids make concurrent writers lock index entries in the same order.
    rows = [
        {
            "event_id": item.event.event_id,
            "type": item.event.type,
            "source": item.event.source,
            "time_us": item.event.time_us,
            "sequence": item.event.sequence,
            "payload": orjson.dumps(item.event.to_cloudevent()).decode(),
            "origin": item.origin,
            "partition": item.partition,
            "offset": item.offset,
            "recorded_at_us": recorded_at,
        }
        for _, item in sorted(unique.items())
    ]
    table = schema.event_store
    statement = (
        insert(conn, table)
        .on_conflict_do_nothing(index_elements=[table.c.event_id])
        .returning(table.c.event_id, table.c.position)
    )
    positions = dict(conn.execute(statement, rows).all())
    return [
        (unique[event_id].event, position) for event_id, position in positions.items()
    ]


def project_events(
    conn: Connection, projection: Projection, events: Sequence[tuple[Event, int]]
) -> None:
    """Apply events, given with their event store positions, to a projection.

    Applying an event a second time changes nothing, so a rebuild may apply an
    overlapping range of the event store again.
    """
    if not events:
        return
    by_type: dict[str, list[tuple[Event, int]]] = {}
    for event, position in events:
        by_type.setdefault(event.type, []).append((event, position))

    def of(*types: str) -> list[tuple[Event, int]]:
        return [item for name in types for item in by_type.get(name, [])]

    p = projection
    _apply_reference(conn, p.companies, ["company_id"], of("company.upserted"))
    _apply_reference(
        conn,
        p.departments,
        ["department_id"],
        of("department.upserted", "department.deleted"),
    )
    _apply_reference(conn, p.users, ["user_id"], of("user.upserted", "user.deleted"))
    _apply_reference(
        conn,
        p.memberships,
        ["user_id", "company_id", "department_id"],
        of("user.department.assigned", "user.department.unassigned"),
    )
    _apply_reference(conn, p.courses, ["course_id"], of("course.upserted"))
    _apply_reference(
        conn,
        p.licenses,
        ["license_id"],
        of("license.upserted", "license.deleted"),
    )
    _apply_license_events(conn, p, of("license.allocated", "license.unallocated"))
    _update_state(conn, p, events)


def _reference_row(event: Event) -> dict[str, object]:
    """Map a reference-data event to the columns it sets."""
    data = event.data
    match event.type:
        case "company.upserted":
            return {"company_id": data.company_id, "name": data.name}
        case "department.upserted":
            return {
                "department_id": data.department_id,
                "company_id": data.company_id,
                "name": data.name,
                "parent_id": data.parent_id,
                "deleted": False,
            }
        case "user.upserted":
            return {
                "user_id": data.user_id,
                "firstname": data.firstname,
                "lastname": data.lastname,
                "email": data.email,
                "suspended": data.suspended,
                "deleted": False,
            }
        case "user.department.assigned" | "user.department.unassigned":
            return {
                "user_id": data.user_id,
                "company_id": data.company_id,
                "department_id": data.department_id,
                "assigned": event.type == "user.department.assigned",
            }
        case "course.upserted":
            return {"course_id": data.course_id, "name": data.name}
        case "license.upserted":
            return {
                "license_id": data.license_id,
                "company_id": data.company_id,
                "name": data.name,
                "reusable": data.reusable,
                "program": data.program,
                "start_us": data.start_date,
                "expiry_us": data.expiry_date,
                "deleted": False,
            }
        case "department.deleted":
            return {"department_id": data.department_id, "deleted": True}
        case "user.deleted":
            return {"user_id": data.user_id, "deleted": True}
        case "license.deleted":
            return {"license_id": data.license_id, "deleted": True}
    raise ValueError(f"no reference row for event type {event.type}")


# Columns a tombstone sets besides its key and "deleted"; every other column is
# cleared, which also drops a deleted user's personal data from the projection.
_TOMBSTONE_DEFAULTS = {"suspended": False, "reusable": False, "program": False}


def _apply_reference(
    conn: Connection, table, key: list[str], events: list[tuple[Event, int]]
) -> None:
    """Upsert reference rows; a change wins only over older versions of its row."""
    if not events:
        return
    latest: dict[tuple, dict[str, object]] = {}
    for event, position in events:
        row = _reference_row(event)
        row["version_time_us"] = event.time_us
        row["version_sequence"] = version_sequence(event.sequence)
        row["version_position"] = position
        row_key = tuple(row[name] for name in key)
        current = latest.get(row_key)
        if current is None or _version(row) > _version(current):
            latest[row_key] = row

    rows = [latest[row_key] for row_key in sorted(latest)]
    _upsert_versioned(conn, table, key, rows)


def _version(row: Mapping[str, object]) -> tuple:
    return (row["version_time_us"], row["version_sequence"], row["version_position"])


def _upsert_versioned(
    conn: Connection, table, key: list[str], rows: list[dict[str, object]]
) -> None:
    """Write whole rows, so a tombstone clears every column the same in any order."""
    names = [column.name for column in table.c]
    values = []
    for row in rows:
        full = dict.fromkeys(names) | _TOMBSTONE_DEFAULTS | row
        values.append({name: full[name] for name in names})

    statement = insert(conn, table)
    excluded = statement.excluded
    versions = ["version_time_us", "version_sequence", "version_position"]
    statement = statement.on_conflict_do_update(
        index_elements=[table.c[name] for name in key],
        set_={name: excluded[name] for name in names if name not in key},
        where=tuple_(*(table.c[name] for name in versions))
        < tuple_(*(excluded[name] for name in versions)),
    )
    conn.execute(statement, values)


def _apply_license_events(
    conn: Connection, projection: Projection, events: list[tuple[Event, int]]
) -> None:
    """Record allocations and unallocations and fold the new ones into report rows."""
    if not events:
        return
    history = {}
    for event, _ in events:
        data = event.data
        action = ALLOCATED if event.type == "license.allocated" else UNALLOCATED
        history[event.event_id] = {
            "event_id": event.event_id,
            "user_id": data.user_id,
            "license_id": data.license_id,
            "course_id": data.course_id,
            "action": action,
            "at_us": data.issued_at if action == ALLOCATED else event.time_us,
            "time_us": event.time_us,
            "order_sequence": order_sequence(event.sequence, action),
        }
    table = projection.license_events
    statement = (
        insert(conn, table)
        .on_conflict_do_nothing(index_elements=[table.c.event_id])
        .returning(table.c.event_id)
    )
    new_ids = conn.execute(statement, [history[key] for key in sorted(history)])

    rows: dict[tuple[int, int, int], dict[str, object]] = {}
    for (event_id,) in new_ids:
        item = history[event_id]
        row_key = (item["user_id"], item["license_id"], item["course_id"])
        row = rows.setdefault(
            row_key,
            {
                "user_id": item["user_id"],
                "license_id": item["license_id"],
                "course_id": item["course_id"],
                "allocations": 0,
                "unallocations": 0,
                "allocated": False,
                "last_time_us": None,
                "last_order_sequence": None,
                "last_allocated_us": None,
                "last_unallocated_us": None,
            },
        )
        _fold(row, item)
    if not rows:
        return

    table = projection.license_allocations
    statement = insert(conn, table)
    excluded = statement.excluded
    newer = tuple_(excluded.last_time_us, excluded.last_order_sequence) > tuple_(
        table.c.last_time_us, table.c.last_order_sequence
    )
    statement = statement.on_conflict_do_update(
        index_elements=[table.c.user_id, table.c.license_id, table.c.course_id],
        set_={
            "allocations": table.c.allocations + excluded.allocations,
            "unallocations": table.c.unallocations + excluded.unallocations,
            "allocated": case((newer, excluded.allocated), else_=table.c.allocated),
            "last_time_us": case(
                (newer, excluded.last_time_us), else_=table.c.last_time_us
            ),
            "last_order_sequence": case(
                (newer, excluded.last_order_sequence),
                else_=table.c.last_order_sequence,
            ),
            "last_allocated_us": _greatest(
                table.c.last_allocated_us, excluded.last_allocated_us
            ),
            "last_unallocated_us": _greatest(
                table.c.last_unallocated_us, excluded.last_unallocated_us
            ),
        },
    )
    conn.execute(statement, [rows[row_key] for row_key in sorted(rows)])


def _fold(row: dict[str, object], item: dict[str, int]) -> None:
    """Add one license event to a report row's batch delta."""
    allocation = item["action"] == ALLOCATED
    counter, latest = (
        ("allocations", "last_allocated_us")
        if allocation
        else ("unallocations", "last_unallocated_us")
    )
    row[counter] += 1
    if row[latest] is None or item["at_us"] > row[latest]:
        row[latest] = item["at_us"]
    order = (item["time_us"], item["order_sequence"])
    if row["last_time_us"] is None or order > (
        row["last_time_us"],
        row["last_order_sequence"],
    ):
        row["last_time_us"], row["last_order_sequence"] = order
        row["allocated"] = allocation


def _greatest(current, incoming):
    """The larger of two nullable columns, portable to SQLite and PostgreSQL."""
    return case(
        (current.is_(None), incoming),
        (incoming.is_(None), current),
        (incoming > current, incoming),
        else_=current,
    )


def _store_dead_letters(conn: Connection, dead_letters: Sequence[DeadLetter]) -> None:
    received_at = now_us()
    conn.execute(
        schema.dead_letters.insert(),
        [
            {
                "origin": letter.origin,
                "partition": letter.partition,
                "offset": letter.offset,
                "raw": letter.raw,
                "reason": letter.reason,
                "received_at_us": received_at,
            }
            for letter in dead_letters
        ],
    )


def _store_offsets(conn: Connection, offsets: Mapping[OffsetKey, OffsetUpdate]) -> None:
    """Advance stored offsets, failing if another consumer moved them first.

    Each update is a compare-and-set on the offset this consumer last stored or
    resumed from, so a consumer that lost a partition in a rebalance cannot
    commit a batch for it afterwards.
    """
    table = schema.consumer_offsets
    updated_at = now_us()
    for (group_id, topic, partition), update_ in sorted(offsets.items()):
        key = (
            (table.c.group_id == group_id)
            & (table.c.topic == topic)
            & (table.c.partition == partition)
        )
        if update_.expected is None:
            statement = (
                insert(conn, table)
                .values(
                    group_id=group_id,
                    topic=topic,
                    partition=partition,
                    next_offset=update_.next_offset,
                    updated_at_us=updated_at,
                )
                .on_conflict_do_nothing()
                .returning(table.c.next_offset)
            )
        else:
            statement = (
                table.update()
                .where(key, table.c.next_offset == update_.expected)
                .values(next_offset=update_.next_offset, updated_at_us=updated_at)
                .returning(table.c.next_offset)
            )
        # RETURNING, because psycopg reports no rowcount for INSERT ... ON CONFLICT.
        if conn.execute(statement).first() is None:
            raise OffsetsFenced(group_id, topic, partition, update_.expected)


def _update_state(
    conn: Connection, projection: Projection, events: Sequence[tuple[Event, int]]
) -> None:
    """Record the newest applied event time; runs last to hold its row lock briefly."""
    table = projection.state
    statement = insert(conn, table)
    excluded = statement.excluded
    statement = statement.on_conflict_do_update(
        index_elements=[table.c.name],
        set_={
            "newest_event_time_us": _greatest(
                table.c.newest_event_time_us, excluded.newest_event_time_us
            ),
            "applied_at_us": excluded.applied_at_us,
            "events_applied": table.c.events_applied + excluded.events_applied,
        },
    )
    conn.execute(
        statement,
        {
            "name": STATE_ROW,
            "newest_event_time_us": max(event.time_us for event, _ in events),
            "applied_at_us": now_us(),
            "events_applied": len(events),
        },
    )


def count_events(conn: Connection) -> int:
    """Return the number of events in the event store."""
    return conn.execute(
        func.count().select().select_from(schema.event_store)
    ).scalar_one()
