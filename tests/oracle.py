"""Expected license allocation reports, computed from logical events.

This module is the independent check of the projection and the API, so it uses
no project code. It works on any objects with the attributes of
``tests.history.LogicalEvent``: ``event_id``, ``type``, ``time_us``, ``sequence``
and ``data``, with instants in microseconds since the Unix epoch (UTC).

Ordering rules, as the event contract states them:

- An allocation or unallocation is later than another when its ``time`` is later.
  At the same ``time``, the higher sequence is later when both events have one.
  If either one has no sequence, or both have the same sequence, the unallocation
  is later.
- A version of reference data (an upsert, a deletion or a membership change) is
  later when its ``time`` is later, then when its sequence is higher, where a
  missing sequence is lower than any sequence. Ties beyond that depend on arrival
  order, which this module does not know, so it raises ValueError on them.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from datetime import UTC, date, datetime, timedelta
from typing import Any, Protocol

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# Entity key of each reference event type, and whether the event removes it.
_REFERENCE_TYPES: dict[str, tuple[str, tuple[str, ...], bool]] = {
    "company.upserted": ("company", ("company_id",), False),
    "department.upserted": ("department", ("department_id",), False),
    "department.deleted": ("department", ("department_id",), True),
    "user.upserted": ("user", ("user_id",), False),
    "user.deleted": ("user", ("user_id",), True),
    "user.department.assigned": (
        "membership",
        ("user_id", "company_id", "department_id"),
        False,
    ),
    "user.department.unassigned": (
        "membership",
        ("user_id", "company_id", "department_id"),
        True,
    ),
    "course.upserted": ("course", ("course_id",), False),
    "license.upserted": ("license", ("license_id",), False),
    "license.deleted": ("license", ("license_id",), True),
}
_ALLOCATED = "license.allocated"
_UNALLOCATED = "license.unallocated"


class Event(Protocol):
    """The attributes that the oracle reads from an event."""

    event_id: str
    type: str
    time_us: int
    sequence: int | None
    data: Any


def expected_report(
    logical_events: Iterable[Event], company_id: int, include_suspended: bool = False
) -> list[dict[str, Any]]:
    """Compute the report rows of one company, sorted by user, license and course.

    A row exists for each (user, license, course) with at least one allocation or
    unallocation. It is shown when the license currently belongs to the company,
    the user is known, not deleted, not suspended (unless ``include_suspended``)
    and currently assigned to at least one department of the company.
    """
    events = _distinct(logical_events)
    state = _ReferenceState(events)
    rows = []
    for (user_id, license_id, course_id), row_events in sorted(
        _license_rows(events).items()
    ):
        license_ = state.current("license", (license_id,))
        if license_ is None or license_["company_id"] != company_id:
            continue
        user = state.current("user", (user_id,))
        if user is None:
            continue
        if user.get("suspended", False) and not include_suspended:
            continue
        department_ids = state.assigned_departments(user_id, company_id)
        if not department_ids:
            continue
        course = state.current("course", (course_id,))
        rows.append(
            {
                "user_id": user_id,
                "firstname": user["firstname"],
                "lastname": user["lastname"],
                "email": user["email"],
                "departments": state.department_names(department_ids),
                "license_id": license_id,
                "license_name": license_["name"],
                "reusable": license_["reusable"],
                "course_id": course_id,
                "course_name": None if course is None else course["name"],
                "allocated": _is_allocated(row_events),
                "dates_allocated": _dates(row_events, _ALLOCATED),
                "dates_unallocated": _dates(row_events, _UNALLOCATED),
                "allocations": _count(row_events, _ALLOCATED),
                "unallocations": _count(row_events, _UNALLOCATED),
            }
        )
    return rows


def department_subtree(logical_events: Iterable[Event], department_id: int) -> set[int]:
    """Return the ids of a department and of every department below it.

    Parents are taken from each department's current version. Only live
    departments (upserted and not deleted) count, so a deleted department is not
    in any subtree, and neither is anything reachable only through it. The subtree
    of a deleted or unknown department is empty.
    """
    state = _ReferenceState(_distinct(logical_events))
    children: dict[int, list[int]] = {}
    live = set()
    for (child_id,), version in state.all_current("department"):
        live.add(child_id)
        parent_id = version["parent_id"]
        if parent_id is not None:
            children.setdefault(parent_id, []).append(child_id)
    if department_id not in live:
        return set()
    subtree = {department_id}
    pending = [department_id]
    while pending:
        # Only live departments are in ``children``, so a deleted one cuts its branch.
        for child_id in children.get(pending.pop(), []):
            if child_id not in subtree:
                subtree.add(child_id)
                pending.append(child_id)
    return subtree


def department_members(
    logical_events: Iterable[Event], company_id: int, department_ids: Collection[int]
) -> set[int]:
    """Return the users currently assigned in the company to any of the departments."""
    state = _ReferenceState(_distinct(logical_events))
    members = set()
    for (user_id, member_company, department_id), _ in state.all_current("membership"):
        if member_company == company_id and department_id in department_ids:
            members.add(user_id)
    return members


def filter_rows(
    rows: Iterable[dict[str, Any]],
    *,
    license_id: int | None = None,
    course_id: int | None = None,
    department_id: int | None = None,
    logical_events: Iterable[Event] | None = None,
    company_id: int | None = None,
    allocated: bool | None = None,
    allocated_from: date | str | None = None,
    allocated_to: date | str | None = None,
    unallocated_from: date | str | None = None,
    unallocated_to: date | str | None = None,
    search: str | None = None,
    first_initial: str | None = None,
    last_initial: str | None = None,
) -> list[dict[str, Any]]:
    """Keep the report rows that match every given filter.

    ``department_id`` keeps users assigned to that department or one below it
    (see ``department_subtree``), so it needs ``logical_events`` and ``company_id``.
    Date bounds are UTC calendar dates, inclusive. A row matches a date range when
    at least one of its allocation (or unallocation) dates lies in the range.
    ``search`` is a case-insensitive substring of the first name, last name,
    "first last" or email. The initials match the first letter of the first or
    last name, ignoring case.
    """
    members = None
    if department_id is not None:
        if logical_events is None or company_id is None:
            raise ValueError("department_id needs logical_events and company_id")
        events = list(logical_events)
        subtree = department_subtree(events, department_id)
        members = department_members(events, company_id, subtree)
    allocated_range = (_as_date(allocated_from), _as_date(allocated_to))
    unallocated_range = (_as_date(unallocated_from), _as_date(unallocated_to))
    needle = None if search is None else search.lower()

    matching = []
    for row in rows:
        if license_id is not None and row["license_id"] != license_id:
            continue
        if course_id is not None and row["course_id"] != course_id:
            continue
        if members is not None and row["user_id"] not in members:
            continue
        if allocated is not None and row["allocated"] != allocated:
            continue
        if not _any_date_in(row["dates_allocated"], *allocated_range):
            continue
        if not _any_date_in(row["dates_unallocated"], *unallocated_range):
            continue
        if needle is not None and not _matches_search(row, needle):
            continue
        if first_initial is not None and not _starts_with(
            row["firstname"], first_initial
        ):
            continue
        if last_initial is not None and not _starts_with(row["lastname"], last_initial):
            continue
        matching.append(row)
    return matching


def format_instant(micros: int) -> str:
    """Format microseconds as RFC 3339 UTC, with a fraction only when nonzero."""
    instant = _EPOCH + timedelta(microseconds=micros)
    text = instant.strftime("%Y-%m-%dT%H:%M:%S")
    if instant.microsecond:
        text += f".{instant.microsecond:06d}"
    return text + "Z"


# Reference data


class _ReferenceState:
    """The current version of every reference entity."""

    def __init__(self, events: list[Event]) -> None:
        winners: dict[tuple[str, tuple[Any, ...]], Event] = {}
        for event in events:
            kind = _REFERENCE_TYPES.get(event.type)
            if kind is None:
                continue
            entity, key_fields, _ = kind
            key = (entity, tuple(event.data[name] for name in key_fields))
            current = winners.get(key)
            if current is None or _reference_later(event, current):
                winners[key] = event
        self._winners = winners
        self._memberships: dict[tuple[int, int], list[int]] = {}
        for (user_id, company_id, department_id), _ in self.all_current("membership"):
            self._memberships.setdefault((user_id, company_id), []).append(
                department_id
            )

    def current(self, entity: str, key: tuple[Any, ...]) -> dict[str, Any] | None:
        """Return the data of the current version, or None if removed or unknown."""
        event = self._winners.get((entity, key))
        if event is None or _REFERENCE_TYPES[event.type][2]:
            return None
        return dict(event.data)

    def all_current(self, entity: str) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
        """Return (key, data) of every present entity of one kind, sorted by key."""
        found = []
        for (kind, key), event in self._winners.items():
            if kind == entity and not _REFERENCE_TYPES[event.type][2]:
                found.append((key, dict(event.data)))
        return sorted(found, key=lambda item: item[0])

    def assigned_departments(self, user_id: int, company_id: int) -> list[int]:
        return self._memberships.get((user_id, company_id), [])

    def department_names(self, department_ids: Iterable[int]) -> list[str]:
        names = []
        for department_id in department_ids:
            department = self.current("department", (department_id,))
            if department is not None:
                names.append(department["name"])
        return sorted(names)


def _reference_later(event: Event, current: Event) -> bool:
    """Tell whether ``event`` is a later version than ``current`` of one entity."""
    if event.time_us != current.time_us:
        return event.time_us > current.time_us
    if event.sequence is not None and current.sequence is None:
        return True
    if event.sequence is None and current.sequence is not None:
        return False
    if event.sequence is not None and event.sequence != current.sequence:
        return event.sequence > current.sequence
    raise ValueError(
        f"events {current.event_id} and {event.event_id} ({event.type}) change the "
        "same entity at the same time and sequence; only arrival order could decide"
    )


# License events


def _distinct(events: Iterable[Event]) -> list[Event]:
    """Keep the first event of each event id, because later ones are redeliveries."""
    seen: dict[str, Event] = {}
    for event in events:
        seen.setdefault(event.event_id, event)
    return list(seen.values())


def _license_rows(events: list[Event]) -> dict[tuple[int, int, int], list[Event]]:
    rows: dict[tuple[int, int, int], list[Event]] = {}
    for event in events:
        if event.type in (_ALLOCATED, _UNALLOCATED):
            data = event.data
            key = (data["user_id"], data["license_id"], data["course_id"])
            rows.setdefault(key, []).append(event)
    return rows


def _license_later(event: Event, other: Event) -> bool:
    """Tell whether ``event`` comes after ``other`` by the contract's rules.

    Two events of the same kind at the same time where either one lacks a
    sequence, or both share one, are not ordered, so neither is later.
    """
    if event.time_us != other.time_us:
        return event.time_us > other.time_us
    both_sequenced = event.sequence is not None and other.sequence is not None
    if both_sequenced and event.sequence != other.sequence:
        return event.sequence > other.sequence
    return event.type == _UNALLOCATED and other.type == _ALLOCATED


def _is_allocated(row_events: list[Event]) -> bool:
    """Tell whether the row's latest event is an allocation.

    Takes every event that no other event is later than. The rules leave some
    events unordered, but all of those latest events must agree.
    """
    latest = [
        event
        for event in row_events
        if not any(_license_later(other, event) for other in row_events)
    ]
    kinds = {event.type for event in latest}
    if len(kinds) != 1:
        ids = sorted(event.event_id for event in latest)
        raise ValueError(f"the ordering rules leave no single latest event among {ids}")
    return kinds.pop() == _ALLOCATED


def _dates(row_events: list[Event], event_type: str) -> list[str]:
    instants = []
    for event in row_events:
        if event.type != event_type:
            continue
        issued_at = event.data.get("issued_at") if event_type == _ALLOCATED else None
        instants.append(event.time_us if issued_at is None else issued_at)
    return [format_instant(instant) for instant in sorted(instants)]


def _count(row_events: list[Event], event_type: str) -> int:
    return sum(1 for event in row_events if event.type == event_type)


# Filters


def _as_date(value: date | str | None) -> date | None:
    if value is None or isinstance(value, date):
        return value
    return date.fromisoformat(value)


def _any_date_in(dates: list[str], low: date | None, high: date | None) -> bool:
    if low is None and high is None:
        return True
    for text in dates:
        day = date.fromisoformat(text[:10])
        if (low is None or day >= low) and (high is None or day <= high):
            return True
    return False


def _matches_search(row: dict[str, Any], needle: str) -> bool:
    fields = [
        row["firstname"],
        row["lastname"],
        f"{row['firstname']} {row['lastname']}",
        row["email"],
    ]
    return any(needle in field.lower() for field in fields)


def _starts_with(name: str, initial: str) -> bool:
    return name[:1].lower() == initial[:1].lower()
