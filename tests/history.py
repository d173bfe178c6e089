"""Deterministic generator of realistic license event histories.

A history has two views of the same events. ``logical`` gives what each distinct
event means, independent of its wire shape, so that ``tests/oracle.py`` can compute
the expected report. ``messages`` gives the Kafka records that carry those events,
in delivery order: CloudEvents and Moodle's own event data, redelivered duplicates,
events out of order, and values that are invalid on purpose.

All instants in logical events are integer microseconds since the Unix epoch (UTC).
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, NamedTuple

import orjson

SECOND = 1_000_000
DAY = 86_400 * SECOND
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# Sources of CloudEvents. The primary source numbers its events with the
# ``sequence`` extension, while the batch synchroniser sends no sequence.
SEQUENCED_SOURCE = "https://lms.example.org/iomad"
UNSEQUENCED_SOURCE = "https://lms.example.org/iomad-sync"
MOODLE_SOURCE = "moodle"

MOODLE_ASSIGNED = "\\block_iomad_company_admin\\event\\user_license_assigned"
MOODLE_UNASSIGNED = "\\block_iomad_company_admin\\event\\user_license_unassigned"

LICENSE_EVENT_TYPES = frozenset({"license.allocated", "license.unallocated"})
# Data fields that hold instants: microseconds in logical events, RFC 3339 on the wire.
TIME_FIELDS = ("start_date", "expiry_date", "issued_at")

# Wire shapes of an event.
CLOUDEVENT = "cloudevent"
CLOUDEVENT_UNSEQUENCED = "cloudevent-unsequenced"
MOODLE_LOG = "moodle-log"
MOODLE_OBSERVED = "moodle-observed"

# Ways a row can end with an allocation and an unallocation at the same ``time``,
# and the ``allocated`` value that the ordering rules give each of them.
TIE_CASES = {
    "sequenced-unallocation-first": True,
    "sequenced-allocation-first": False,
    "allocation-unsequenced": False,
    "unallocation-unsequenced": False,
    "both-unsequenced": False,
    "equal-sequence": False,
    "moodle-reallocated-same-second": True,
}

# Approximate number of logical events per user with the default settings,
# measured with generate_history_of_size(seed, 100_000) for seeds 1 to 3. It sizes
# generate_history_of_size.
EVENTS_PER_USER = 13.3
MIN_USERS = 16

_FIRST_NAMES = [
    ("Anna", "anna"),
    ("Ben", "ben"),
    ("Chloé", "chloe"),
    ("Dmitri", "dmitri"),
    ("Emma", "emma"),
    ("Farid", "farid"),
    ("Grace", "grace"),
    ("Hiroshi", "hiroshi"),
    ("Inês", "ines"),
    ("Jonas", "jonas"),
    ("Kofi", "kofi"),
    ("Lena", "lena"),
    ("Łukasz", "lukasz"),
    ("Mateo", "mateo"),
    ("Nadia", "nadia"),
    ("Oskar", "oskar"),
    ("Priya", "priya"),
    ("Quentin", "quentin"),
    ("Rosa", "rosa"),
    ("Søren", "soren"),
    ("Tomasz", "tomasz"),
    ("Uma", "uma"),
    ("Viktor", "viktor"),
    ("Wen", "wen"),
    ("Xavier", "xavier"),
    ("Yasmin", "yasmin"),
    ("Zoë", "zoe"),
]
_LAST_NAMES = [
    ("Andersen", "andersen"),
    ("Berg", "berg"),
    ("Castillo", "castillo"),
    ("Dubois", "dubois"),
    ("Eriksson", "eriksson"),
    ("Fischer", "fischer"),
    ("García", "garcia"),
    ("Hughes", "hughes"),
    ("Ivanova", "ivanova"),
    ("Jensen", "jensen"),
    ("Kowalski", "kowalski"),
    ("López", "lopez"),
    ("Müller", "muller"),
    ("Nakamura", "nakamura"),
    ("O'Brien", "obrien"),
    ("Patel", "patel"),
    ("Quinn", "quinn"),
    ("Rossi", "rossi"),
    ("Schmidt", "schmidt"),
    ("Tanaka", "tanaka"),
    ("Usman", "usman"),
    ("Van der Berg", "vanderberg"),
    ("Wójcik", "wojcik"),
    ("Young", "young"),
    ("Zhang", "zhang"),
]
_COMPANY_NAMES = [
    "Northwind Training",
    "Contoso Health",
    "Fabrikam Logistics",
    "Tailspin Aviation",
    "Wingtip Retail",
    "Adatum Energy",
    "Litware Publishing",
    "Proseware Finance",
]
_DEPARTMENT_NAMES = [
    "Sales",
    "Engineering",
    "Support",
    "Finance",
    "Operations",
    "Marketing",
    "People",
    "Logistics",
    "Research",
    "Quality",
    "Legal",
    "Facilities",
]
_REGIONS = ["North", "South", "East", "West", "Central"]
_COURSE_NAMES = [
    "Fire Safety",
    "First Aid",
    "Data Protection",
    "Manual Handling",
    "Food Hygiene",
    "Equality and Diversity",
    "Information Security",
    "Anti-Bribery",
    "Working at Height",
    "Customer Service",
    "Leadership Essentials",
    "Forklift Operation",
]
# Offsets, in minutes, used for some wire times so that decoders must convert to UTC.
_OFFSETS = [120, -300, 330, 60, -480]


class Malformed(NamedTuple):
    """A message value that is invalid on purpose, with the kind of defect."""

    kind: str
    value: bytes


@dataclass(frozen=True, slots=True)
class LogicalEvent:
    """The meaning of one distinct event, independent of its wire shape.

    ``data`` has the fields of the event contract, with instants as microseconds
    and ``issued_at`` of an allocation always filled in. ``sequence`` is the
    CloudEvents ``sequence`` extension or, for Moodle events, the log id.
    """

    event_id: str
    type: str
    time_us: int
    sequence: int | None
    data: Mapping[str, Any]
    source: str = SEQUENCED_SOURCE


@dataclass(slots=True)
class History:
    """A generated event history and the messages that deliver it.

    ``logical`` lists each distinct event once, in time order. ``messages`` are
    the ``(key, value)`` records in delivery order, including duplicates and the
    values in ``malformed``. ``message_events[i]`` is the index in ``logical`` of
    the event that ``messages[i]`` carries, or None for a malformed value.
    ``notable`` maps the name of each deliberate edge case to the ids involved:
    ``<role>_user_id`` for the roles suspended, unsuspended, deleted, revived,
    leaver (with ``leaver_company_id``), mover, sequence_tie, unsequenced_tie and
    unknown (never upserted); ``two_company_user_ids``; ``deleted_license_id``,
    ``deleted_department_id`` and ``deleted_department_member_id``;
    ``moved_department_id``; ``unknown_course_id``; ``late_license_id``,
    ``late_course_id`` and ``late_user_id`` (first upsert delivered after use);
    and ``tie_rows``, the (user, license, course) row of each TIE_CASES case.
    """

    seed: int
    logical: list[LogicalEvent]
    messages: list[tuple[bytes | None, bytes]]
    message_events: list[int | None]
    malformed: list[Malformed]
    company_ids: list[int]
    notable: dict[str, Any] = field(default_factory=dict)


def generate_history(
    seed: int,
    companies: int = 3,
    users: int = 60,
    *,
    years: int = 2,
    start: date = date(2023, 9, 1),
    id_offset: int = 0,
) -> History:
    """Generate a history of ``years`` years of license activity.

    The same arguments always give the same logical events and the same message
    bytes. The number of logical events is about ``EVENTS_PER_USER * users``.
    Entity ids and Moodle log ids start above ``id_offset``, so histories
    generated with offsets far enough apart share no id and can be concatenated.
    """
    if companies < 2:
        raise ValueError(f"companies must be at least 2, got {companies}")
    if users < MIN_USERS:
        raise ValueError(f"users must be at least {MIN_USERS}, got {users}")
    if years < 1:
        raise ValueError(f"years must be at least 1, got {years}")
    if id_offset < 0:
        raise ValueError(f"id_offset must not be negative, got {id_offset}")
    builder = _Builder(seed, companies, users, years, start, id_offset)
    return builder.build()


def generate_history_of_size(
    seed: int, events: int, companies: int | None = None, id_offset: int = 0
) -> History:
    """Generate a history with about ``events`` logical events, for benchmarks.

    The user count is estimated from ``EVENTS_PER_USER``. On seeds 1 to 8 the
    result was within 11 % of ``events`` for 20,000 events and within 3 % for
    100,000, but up to 28 % short for 2,000. Without ``companies``, the history
    has one company per 300 users, and at least 3.
    """
    users = max(MIN_USERS, round(events / EVENTS_PER_USER))
    if companies is None:
        companies = max(3, users // 300)
    return generate_history(seed, companies=companies, users=users, id_offset=id_offset)


def write_jsonl(
    history: History, path: str | Path, *, include_invalid_utf8: bool = False
) -> int:
    """Write each message value as one line and return the number of lines.

    A value that is not valid UTF-8 is skipped, so the file stays a text file,
    unless ``include_invalid_utf8`` is true: then its raw bytes are written as a line.
    """
    lines = []
    for _, value in history.messages:
        if not include_invalid_utf8 and not _is_utf8(value):
            continue
        lines.append(value)
    with open(path, "wb") as file:
        for value in lines:
            file.write(value)
            file.write(b"\n")
    return len(lines)


def parse_time(text: str) -> int:
    """Parse an RFC 3339 timestamp with a zone into microseconds since the epoch."""
    instant = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if instant.tzinfo is None:
        raise ValueError(f"{text!r} has no time zone")
    return _to_us(instant)


def format_time(micros: int, offset_minutes: int = 0) -> str:
    """Format microseconds as RFC 3339, in UTC with "Z" or at the given offset."""
    zone = timezone(timedelta(minutes=offset_minutes))
    instant = (_EPOCH + timedelta(microseconds=micros)).astimezone(zone)
    text = instant.strftime("%Y-%m-%dT%H:%M:%S")
    if instant.microsecond:
        text += f".{instant.microsecond:06d}"
    if offset_minutes == 0:
        return text + "Z"
    sign = "+" if offset_minutes > 0 else "-"
    hours, minutes = divmod(abs(offset_minutes), 60)
    return f"{text}{sign}{hours:02d}:{minutes:02d}"


def make_event(
    event_type: str,
    time: str | int,
    data: Mapping[str, Any],
    *,
    sequence: int | None = None,
    event_id: str | None = None,
    source: str = SEQUENCED_SOURCE,
) -> LogicalEvent:
    """Build a logical event by hand, for small histories in tests.

    ``time`` and the instants in ``data`` may be RFC 3339 strings or microseconds.
    An allocation without ``issued_at`` gets the event's time, as in the event contract.
    Without ``event_id``, the id is derived from the other arguments.
    """
    time_us = parse_time(time) if isinstance(time, str) else time
    values = dict(data)
    for name in TIME_FIELDS:
        if isinstance(values.get(name), str):
            values[name] = parse_time(values[name])
    if event_type == "license.allocated" and values.get("issued_at") is None:
        values["issued_at"] = time_us
    if event_id is None:
        fingerprint = orjson.dumps(
            [event_type, time_us, sequence, values], option=orjson.OPT_SORT_KEYS
        )
        event_id = "hand-" + uuid.uuid5(uuid.NAMESPACE_URL, fingerprint.decode()).hex
    return LogicalEvent(event_id, event_type, time_us, sequence, values, source)


def encode_cloudevent(event: LogicalEvent, offset_minutes: int = 0) -> bytes:
    """Encode a logical event as a CloudEvents 1.0 structured JSON value."""
    data = dict(event.data)
    for name in TIME_FIELDS:
        if data.get(name) is not None:
            data[name] = format_time(data[name], offset_minutes)
    envelope: dict[str, Any] = {
        "specversion": "1.0",
        "id": event.event_id,
        "source": event.source,
        "type": event.type,
        "time": format_time(event.time_us, offset_minutes),
        "datacontenttype": "application/json",
    }
    if event.sequence is not None:
        envelope["sequence"] = event.sequence
    envelope["data"] = data
    return orjson.dumps(envelope)


# Generation


@dataclass(slots=True)
class _Draft:
    """An event while it is generated, before sequences and ids are assigned."""

    type: str
    time_us: int
    data: dict[str, Any]
    shape: str
    key: bytes | None
    order: int
    sequence: int | None = None
    # A draft whose sequence this one copies, for the equal-sequence tie.
    same_sequence_as: _Draft | None = None
    event_id: str = ""
    # Delivery position: drafts are delivered in ascending order of it.
    position: float = 0.0


@dataclass(slots=True)
class _Department:
    department_id: int
    company_id: int
    name: str
    parent_id: int | None
    depth: int


@dataclass(slots=True)
class _License:
    license_id: int
    company_id: int
    name: str
    kind: str
    reusable: bool
    program: bool
    start_us: int
    expiry_us: int | None
    course_ids: list[int]
    created_us: int


@dataclass(slots=True)
class _User:
    user_id: int
    firstname: str
    lastname: str
    email: str
    created_us: int
    # Departments per company, as assigned when the user is created.
    departments: dict[int, list[int]] = field(default_factory=dict)
    role: str = ""


class _Builder:
    """Generates one history. build() runs the steps in order, and later steps
    read what earlier ones stored on the builder."""

    def __init__(
        self,
        seed: int,
        companies: int,
        users: int,
        years: int,
        start: date,
        id_offset: int = 0,
    ) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.company_count = companies
        self.user_count = users
        self.start_us = _to_us(datetime(start.year, start.month, start.day, tzinfo=UTC))
        self.end_us = self.start_us + years * 365 * DAY
        self.drafts: list[_Draft] = []
        self.id_offset = id_offset
        self.next_id = id_offset
        # (entity key, time) pairs already used by reference data, to avoid ties.
        self.reference_times: set[tuple[Any, int]] = set()
        self.moodle_fingerprints: set[tuple[Any, ...]] = set()
        self.companies: list[tuple[int, str, str]] = []
        self.departments: dict[int, list[_Department]] = {}
        self.course_ids: list[int] = []
        self.licenses: dict[int, list[_License]] = {}
        self.users: list[_User] = []
        self.notable: dict[str, Any] = {}
        # (user id, company id) of users with a row on a license that is not deleted.
        self.users_with_rows: set[tuple[int, int]] = set()
        # Drafts whose delivery is moved after a later event: (draft, after draft).
        self.late_deliveries: list[tuple[_Draft, _Draft]] = []

    # Ids and drafts

    def new_id(self) -> int:
        # One counter for every kind of entity, so that no license id equals a
        # course id or a user id and a mixed-up join shows in the report.
        self.next_id += self.rng.randint(1, 3)
        return self.next_id

    def add(
        self,
        event_type: str,
        time_us: int,
        data: dict[str, Any],
        key: bytes | None,
        shape: str | None = None,
    ) -> _Draft:
        if shape is None:
            shape = CLOUDEVENT if self.rng.random() < 0.6 else CLOUDEVENT_UNSEQUENCED
        draft = _Draft(event_type, time_us, data, shape, key, len(self.drafts))
        self.drafts.append(draft)
        return draft

    def add_reference(
        self,
        event_type: str,
        entity: tuple[Any, ...],
        time_us: int,
        data: dict[str, Any],
        key: bytes | None,
        shape: str | None = None,
    ) -> _Draft:
        """Add a reference-data event at the first free time of its entity.

        Two versions of one entity never share a time, so the winner never depends
        on arrival order. Some times get a millisecond fraction.
        """
        if self.rng.random() < 0.2:
            time_us += self.rng.randint(1, 999) * 1000
        while (entity, time_us) in self.reference_times:
            time_us += SECOND
        self.reference_times.add((entity, time_us))
        return self.add(event_type, time_us, data, key, shape)

    def user_key(self, user_id: int) -> bytes | None:
        if self.rng.random() < 0.05:
            return None
        return str(user_id).encode()

    def random_time(self, low: int, high: int) -> int:
        """Return a whole-second instant in [low, high]."""
        return self.rng.randint(low // SECOND, max(low, high) // SECOND) * SECOND

    # The whole history

    def build(self) -> History:
        self.make_companies()
        self.make_courses()
        self.make_licenses()
        self.make_users()
        self.make_special_users()
        self.make_memberships()
        self.make_allocations()
        self.delete_department()
        self.delete_license()
        self.assign_sequences()
        logical = self.make_logical()
        messages, message_events, malformed = self.deliver(logical)
        return History(
            seed=self.seed,
            logical=logical,
            messages=messages,
            message_events=message_events,
            malformed=malformed,
            company_ids=[company_id for company_id, _, _ in self.companies],
            notable=self.notable,
        )

    # Reference data

    def make_companies(self) -> None:
        for index in range(self.company_count):
            company_id = self.new_id()
            base = _COMPANY_NAMES[index % len(_COMPANY_NAMES)]
            name = base if index < len(_COMPANY_NAMES) else f"{base} {index + 1}"
            domain = name.lower().replace(" ", "") + ".example"
            self.companies.append((company_id, name, domain))
            key = f"company-{company_id}".encode()
            created = self.start_us - 30 * DAY + index * 3600 * SECOND
            self.add_reference(
                "company.upserted",
                ("company", company_id),
                created,
                {"company_id": company_id, "name": name},
                key,
            )
            self.make_departments(company_id, name, created)

        company_id, name, _ = self.companies[0]
        renamed = self.random_time(self.start_us + 200 * DAY, self.end_us - 100 * DAY)
        self.add_reference(
            "company.upserted",
            ("company", company_id),
            renamed,
            {"company_id": company_id, "name": name + " Group"},
            f"company-{company_id}".encode(),
        )

    def make_departments(self, company_id: int, name: str, created: int) -> None:
        users_per_company = self.user_count / self.company_count
        top = _Department(self.new_id(), company_id, name, None, 1)
        tree = [top]
        children = min(len(_DEPARTMENT_NAMES), 2 + self.rng.randint(0, 2))
        children = min(len(_DEPARTMENT_NAMES), children + int(users_per_company // 60))
        for child_name in self.rng.sample(_DEPARTMENT_NAMES, children):
            child = _Department(
                self.new_id(), company_id, child_name, top.department_id, 2
            )
            tree.append(child)
            for region in self.rng.sample(_REGIONS, self.rng.randint(0, 3)):
                tree.append(
                    _Department(
                        self.new_id(),
                        company_id,
                        f"{child_name} {region}",
                        child.department_id,
                        3,
                    )
                )
        # Two third-level departments at least: one to move and one to delete.
        names = {department.name for department in tree}
        for region in _REGIONS:
            if sum(1 for department in tree if department.depth == 3) >= 2:
                break
            child = tree[-1] if tree[-1].depth == 2 else tree[1]
            leaf_name = f"{child.name} {region}"
            if leaf_name not in names:
                names.add(leaf_name)
                tree.append(
                    _Department(
                        self.new_id(), company_id, leaf_name, child.department_id, 3
                    )
                )
        if sum(1 for department in tree if department.depth == 2) < 2:
            raise AssertionError("a company needs two second-level departments")
        self.departments[company_id] = tree
        for department in tree:
            self.upsert_department(
                department, created + self.rng.randint(1, 3600) * SECOND
            )

        # Move one third-level department under another second-level one.
        leaves = [department for department in tree if department.depth == 3]
        seconds = [department for department in tree if department.depth == 2]
        moved = self.rng.choice(leaves)
        targets = [d for d in seconds if d.department_id != moved.parent_id]
        if targets and "moved_department_id" not in self.notable:
            moved.parent_id = self.rng.choice(targets).department_id
            moved.name = f"{moved.name} Hub"
            when = self.random_time(self.start_us + 100 * DAY, self.end_us - 200 * DAY)
            self.upsert_department(moved, when)
            self.notable["moved_department_id"] = moved.department_id

    def upsert_department(self, department: _Department, time_us: int) -> _Draft:
        return self.add_reference(
            "department.upserted",
            ("department", department.department_id),
            time_us,
            {
                "department_id": department.department_id,
                "company_id": department.company_id,
                "name": department.name,
                "parent_id": department.parent_id,
            },
            f"company-{department.company_id}".encode(),
        )

    def make_courses(self) -> None:
        count = max(8, self.user_count // 8)
        for index in range(count):
            course_id = self.new_id()
            self.course_ids.append(course_id)
            base = _COURSE_NAMES[index % len(_COURSE_NAMES)]
            level = index // len(_COURSE_NAMES)
            name = base if level == 0 else f"{base} {level + 1}"
            if index == 1:
                # Never upserted: the report shows it without a name.
                self.notable["unknown_course_id"] = course_id
                continue
            created = self.start_us - 60 * DAY + index * 60 * SECOND
            if index == 2:
                # Published in the middle of the history, after allocations use it.
                created = self.start_us + 150 * DAY
                self.notable["late_course_id"] = course_id
            # Course events carry no message key.
            self.add_reference(
                "course.upserted",
                ("course", course_id),
                created,
                {"course_id": course_id, "name": name},
                None,
            )
            if self.rng.random() < 0.1:
                renamed = self.random_time(created + 30 * DAY, self.end_us)
                self.add_reference(
                    "course.upserted",
                    ("course", course_id),
                    renamed,
                    {"course_id": course_id, "name": name + " (updated)"},
                    None,
                )

    def make_licenses(self) -> None:
        users_per_company = self.user_count / self.company_count
        count = max(5, int(users_per_company // 12))
        kinds = ["reusable", "single", "program", "expired", "future"]
        for company_index, (company_id, company_name, _) in enumerate(self.companies):
            licenses = []
            for index in range(count):
                kind = (
                    kinds[index] if index < len(kinds) else self.rng.choice(kinds[:3])
                )
                licenses.append(
                    self.make_license(company_id, company_name, kind, index)
                )
            if company_index == 0:
                # The course that is never upserted and the course upserted late
                # get allocations too.
                unknown = self.notable["unknown_course_id"]
                if unknown not in licenses[1].course_ids:
                    licenses[1].course_ids.append(unknown)
                late = self.notable["late_course_id"]
                if late not in licenses[0].course_ids:
                    licenses[0].course_ids.append(late)
            self.licenses[company_id] = licenses
            for license_ in licenses:
                self.upsert_license(license_, license_.created_us)

        # A license renamed later in its life.
        renamed = self.licenses[self.companies[0][0]][0]
        renamed.name += " (renewed)"
        when = self.random_time(self.start_us + 250 * DAY, self.end_us - 30 * DAY)
        self.upsert_license(renamed, when)

    def make_license(
        self, company_id: int, company_name: str, kind: str, index: int
    ) -> _License:
        program = kind == "program"
        reusable = kind == "reusable" or (kind != "single" and self.rng.random() < 0.5)
        start_us = self.start_us - self.rng.randint(0, 60) * DAY
        expiry_us: int | None = start_us + self.rng.randint(800, 1200) * DAY
        if kind == "expired":
            expiry_us = self.start_us + self.rng.randint(200, 320) * DAY
        elif kind == "future":
            start_us = self.end_us + self.rng.randint(30, 90) * DAY
            # The first company's future license never expires, so that every
            # history has a license without an expiry date.
            open_ended = company_id == self.companies[0][0] or self.rng.random() < 0.5
            expiry_us = None if open_ended else start_us + 365 * DAY
        elif self.rng.random() < 0.2:
            expiry_us = None
        if program:
            courses = self.rng.sample(self.course_ids, 3)
        else:
            courses = self.rng.sample(self.course_ids, self.rng.randint(1, 2))
        label = {
            "reusable": "Reusable",
            "single": "Single-use",
            "program": "Programme",
            "expired": "2023 Intake",
            "future": "Next Year",
        }[kind]
        return _License(
            license_id=self.new_id(),
            company_id=company_id,
            name=f"{company_name} {label} {index + 1}",
            kind=kind,
            reusable=reusable,
            program=program,
            start_us=start_us,
            expiry_us=expiry_us,
            course_ids=courses,
            created_us=self.start_us - 20 * DAY + self.rng.randint(0, 19) * DAY,
        )

    def upsert_license(self, license_: _License, time_us: int) -> _Draft:
        data: dict[str, Any] = {
            "license_id": license_.license_id,
            "company_id": license_.company_id,
            "name": license_.name,
            "reusable": license_.reusable,
            "start_date": license_.start_us,
            "expiry_date": license_.expiry_us,
        }
        if license_.program or self.rng.random() < 0.5:
            data["program"] = license_.program
        return self.add_reference(
            "license.upserted",
            ("license", license_.license_id),
            time_us,
            data,
            f"company-{license_.company_id}".encode(),
        )

    # Users

    def make_users(self) -> None:
        two_company = []
        for index in range(self.user_count):
            user_id = self.new_id()
            first, first_ascii = self.rng.choice(_FIRST_NAMES)
            last, last_ascii = self.rng.choice(_LAST_NAMES)
            company_id, _, domain = self.companies[index % self.company_count]
            email = f"{first_ascii}.{last_ascii}.{user_id}@{domain}"
            created = self.random_time(
                self.start_us - 30 * DAY, self.start_us + 300 * DAY
            )
            user = _User(user_id, first, last, email, created)
            user.departments[company_id] = self.pick_departments(company_id)
            if index % 10 == 3:
                other = self.companies[(index + 1) % self.company_count][0]
                user.departments[other] = self.pick_departments(other, max_count=1)
                two_company.append(user_id)
            self.users.append(user)
        self.notable["two_company_user_ids"] = two_company

    def pick_departments(self, company_id: int, max_count: int = 3) -> list[int]:
        tree = self.departments[company_id]
        count = min(max_count, self.rng.choice([1, 1, 1, 2, 2, 3]))
        return [d.department_id for d in self.rng.sample(tree, count)]

    def upsert_user(
        self, user: _User, time_us: int, suspended: bool | None = None, **fields: Any
    ) -> _Draft:
        data: dict[str, Any] = {
            "user_id": user.user_id,
            "firstname": fields.get("firstname", user.firstname),
            "lastname": fields.get("lastname", user.lastname),
            "email": fields.get("email", user.email),
        }
        if suspended is not None:
            data["suspended"] = suspended
        return self.add_reference(
            "user.upserted",
            ("user", user.user_id),
            time_us,
            data,
            self.user_key(user.user_id),
        )

    def make_special_users(self) -> None:
        """Give some users the roles of the deliberate edge cases."""
        single_company = [user for user in self.users if len(user.departments) == 1]
        roles = [
            "suspended",
            "unsuspended",
            "deleted",
            "revived",
            "leaver",
            "mover",
            "sequence_tie",
            "unsequenced_tie",
            "unknown",
        ]
        for role, user in zip(roles, single_company[1:], strict=False):
            user.role = role

        for user in self.users:
            if user.role == "unknown":
                # Has memberships and allocations but no user.upserted.
                self.notable["unknown_user_id"] = user.user_id
                continue
            first = self.upsert_user(user, user.created_us, suspended=False)
            if user.role == "":
                if self.rng.random() < 0.15:
                    later = self.random_time(user.created_us + DAY, self.end_us)
                    user.lastname = self.rng.choice(_LAST_NAMES)[0]
                    self.upsert_user(user, later)
                continue
            self.notable[f"{user.role}_user_id"] = user.user_id
            middle = self.start_us + 400 * DAY
            if user.role == "suspended":
                self.upsert_user(user, middle, suspended=True)
            elif user.role == "unsuspended":
                self.upsert_user(user, middle, suspended=True)
                self.upsert_user(user, middle + 20 * DAY, suspended=False)
            elif user.role == "deleted":
                stale = self.upsert_user(user, middle - DAY, email="old." + user.email)
                deleted = self.add_reference(
                    "user.deleted",
                    ("user", user.user_id),
                    middle,
                    {"user_id": user.user_id},
                    self.user_key(user.user_id),
                )
                # The older update arrives after the deletion and must lose to it.
                self.late_deliveries.append((stale, deleted))
                self.late_deliveries.append((first, deleted))
            elif user.role == "revived":
                self.add_reference(
                    "user.deleted",
                    ("user", user.user_id),
                    middle,
                    {"user_id": user.user_id},
                    self.user_key(user.user_id),
                )
                user.email = "returned." + user.email
                self.upsert_user(user, middle + 30 * DAY, suspended=False)
            elif user.role in ("sequence_tie", "unsequenced_tie"):
                # Two versions at the same instant: the one with the higher
                # sequence wins, and a missing sequence is the lowest.
                if user.role == "sequence_tie":
                    old_shape = CLOUDEVENT
                else:
                    old_shape = CLOUDEVENT_UNSEQUENCED
                tie = user.created_us + 10 * DAY + 7 * SECOND
                entity = ("user", user.user_id)
                if (entity, tie) in self.reference_times:
                    raise AssertionError(f"tie time of user {user.user_id} is taken")
                self.reference_times.add((entity, tie))
                old = self.add(
                    "user.upserted",
                    tie,
                    self.user_data(user, email="before." + user.email),
                    self.user_key(user.user_id),
                    shape=old_shape,
                )
                user.email = "after." + user.email
                new = self.add(
                    "user.upserted",
                    tie,
                    self.user_data(user),
                    self.user_key(user.user_id),
                    shape=CLOUDEVENT,
                )
                # Deliver the winner first, so a consumer that lets the last
                # arrival win gets this user wrong.
                self.late_deliveries.append((old, new))

    def user_data(self, user: _User, **fields: Any) -> dict[str, Any]:
        return {
            "user_id": user.user_id,
            "firstname": user.firstname,
            "lastname": user.lastname,
            "email": fields.get("email", user.email),
            "suspended": False,
        }

    def membership(
        self, kind: str, user: _User, company_id: int, department_id: int, time_us: int
    ) -> _Draft:
        return self.add_reference(
            f"user.department.{kind}",
            ("membership", user.user_id, company_id, department_id),
            time_us,
            {
                "user_id": user.user_id,
                "company_id": company_id,
                "department_id": department_id,
            },
            self.user_key(user.user_id),
        )

    def make_memberships(self) -> None:
        for user in self.users:
            for company_id, departments in user.departments.items():
                for department_id in departments:
                    when = user.created_us + self.rng.randint(0, 3600) * SECOND
                    self.membership("assigned", user, company_id, department_id, when)

            company_id = next(iter(user.departments))
            departments = user.departments[company_id]
            leave_at = self.start_us + 450 * DAY
            if user.role == "leaver":
                for department_id in departments:
                    self.membership(
                        "unassigned", user, company_id, department_id, leave_at
                    )
                self.notable["leaver_company_id"] = company_id
            elif user.role == "mover":
                tree = self.departments[company_id]
                target = next(
                    d.department_id for d in tree if d.department_id not in departments
                )
                self.membership(
                    "unassigned", user, company_id, departments[0], leave_at
                )
                self.membership("assigned", user, company_id, target, leave_at + DAY)
                departments[0] = target

    # Allocations

    def make_allocations(self) -> None:
        tie_cases = list(TIE_CASES)
        self.notable["tie_rows"] = {}
        for user in self.users:
            for company_index, company_id in enumerate(user.departments):
                licenses = self.licenses[company_id]
                count = 1 if company_index else self.rng.choice([1, 2, 2, 3])
                chosen = self.rng.sample(licenses, count)
                if user.role == "leaver" and licenses[0] not in chosen:
                    chosen.append(licenses[0])
                if user.role:
                    # Rows of a deleted license are hidden, and these users must
                    # show up in the report.
                    chosen = [
                        item for item in chosen if item is not self.deleted_license()
                    ]
                rows = 0
                for license_ in chosen:
                    if license_.program:
                        courses = list(license_.course_ids)
                    else:
                        courses = [self.rng.choice(license_.course_ids)]
                    last = self.allocation_rows(user, license_, courses)
                    if last is None:
                        continue
                    rows += 1
                    if license_ is not self.deleted_license():
                        self.users_with_rows.add((user.user_id, company_id))
                    # Tie rows go to users and licenses shown in the default report.
                    if license_.program or user.role:
                        continue
                    if license_ is self.deleted_license():
                        continue
                    if tie_cases:
                        case = tie_cases.pop(0)
                    elif self.rng.random() < 0.01:
                        case = self.rng.choice(list(TIE_CASES))
                    else:
                        continue
                    self.tie_pair(user, license_, courses[0], last, case)
                if rows == 0 and user.role and company_index == 0:
                    # A user with a role must have a row. The first license is
                    # valid for two years, so a course of it always fits.
                    course_id = licenses[0].course_ids[0]
                    if self.allocation_rows(user, licenses[0], [course_id]) is None:
                        raise AssertionError(f"no allocation fits user {user.user_id}")
                    self.users_with_rows.add((user.user_id, company_id))
        if tie_cases:
            raise AssertionError(f"no row left for tie cases {tie_cases}")

        # move_reference_after_use delivers this license's first upsert after its
        # first allocation.
        first_license = self.licenses[self.companies[0][0]][0]
        self.notable["late_license_id"] = first_license.license_id

    def allocation_rows(
        self, user: _User, license_: _License, courses: list[int]
    ) -> int | None:
        """Add the allocation cycles of one license and return the last event time.

        Returns None, and adds nothing, when the license leaves no room for a cycle.
        """
        begin = max(user.created_us, license_.created_us) + DAY
        end = self.end_us - 20 * DAY
        if license_.expiry_us is not None:
            end = min(end, license_.expiry_us)
        if user.role in ("leaver", "deleted", "revived"):
            end = min(end, self.start_us + 380 * DAY)
        if end <= begin + 10 * DAY:
            return None
        cycles = self.rng.randint(1, 4) if license_.reusable else 1
        time_us = self.random_time(begin, begin + (end - begin) // 3)
        last = None
        for _ in range(cycles):
            if time_us >= end:
                break
            shape = self.license_shape()
            for course_id in courses:
                self.license_event(
                    "license.allocated", user, license_, course_id, time_us, shape
                )
            last = time_us
            stays = not license_.reusable and self.rng.random() < 0.75
            if stays:
                break
            unallocate = time_us + self.rng.randint(10, 150) * DAY
            if unallocate >= end:
                break
            shape = self.license_shape()
            for course_id in courses:
                self.license_event(
                    "license.unallocated", user, license_, course_id, unallocate, shape
                )
            last = unallocate
            if not license_.reusable and self.rng.random() < 0.5:
                break
            time_us = unallocate + self.rng.randint(1, 90) * DAY
        return last

    def license_shape(self) -> str:
        draw = self.rng.random()
        if draw < 0.45:
            return CLOUDEVENT
        if draw < 0.75:
            return CLOUDEVENT_UNSEQUENCED
        if draw < 0.9:
            return MOODLE_LOG
        return MOODLE_OBSERVED

    def license_event(
        self,
        event_type: str,
        user: _User,
        license_: _License,
        course_id: int,
        time_us: int,
        shape: str,
    ) -> _Draft:
        data: dict[str, Any] = {
            "user_id": user.user_id,
            "license_id": license_.license_id,
            "course_id": course_id,
        }
        if event_type == "license.allocated":
            # A missing issued_at means the event's time.
            draw = self.rng.random()
            if 0.35 <= draw < 0.7:
                data["issued_at"] = time_us
            elif draw >= 0.7:
                data["issued_at"] = time_us - self.rng.randint(1, 3 * 86_400) * SECOND
        if shape == MOODLE_OBSERVED:
            fingerprint = (
                event_type,
                user.user_id,
                course_id,
                license_.license_id,
                time_us,
            )
            if fingerprint in self.moodle_fingerprints:
                # Same content means the same event to the decoder, so keep it a
                # CloudEvent instead.
                shape = CLOUDEVENT
            self.moodle_fingerprints.add(fingerprint)
        return self.add(event_type, time_us, data, self.user_key(user.user_id), shape)

    def tie_pair(
        self, user: _User, license_: _License, course_id: int, last: int, case: str
    ) -> None:
        """End a row with an allocation and an unallocation at the same time."""
        time_us = last + self.rng.randint(2, 10) * DAY
        allocate, unallocate = "license.allocated", "license.unallocated"
        args = (user, license_, course_id, time_us)
        if case == "sequenced-unallocation-first":
            self.license_event(unallocate, *args, CLOUDEVENT)
            self.license_event(allocate, *args, CLOUDEVENT)
        elif case == "sequenced-allocation-first":
            self.license_event(allocate, *args, CLOUDEVENT)
            self.license_event(unallocate, *args, CLOUDEVENT)
        elif case == "allocation-unsequenced":
            self.license_event(unallocate, *args, CLOUDEVENT)
            self.license_event(allocate, *args, CLOUDEVENT_UNSEQUENCED)
        elif case == "unallocation-unsequenced":
            self.license_event(unallocate, *args, CLOUDEVENT_UNSEQUENCED)
            self.license_event(allocate, *args, CLOUDEVENT)
        elif case == "both-unsequenced":
            self.license_event(unallocate, *args, CLOUDEVENT_UNSEQUENCED)
            self.license_event(allocate, *args, CLOUDEVENT_UNSEQUENCED)
        elif case == "equal-sequence":
            first = self.license_event(allocate, *args, CLOUDEVENT)
            second = self.license_event(unallocate, *args, CLOUDEVENT)
            second.same_sequence_as = first
        elif case == "moodle-reallocated-same-second":
            self.license_event(unallocate, *args, MOODLE_LOG)
            self.license_event(allocate, *args, MOODLE_LOG)
        else:
            raise ValueError(f"unknown tie case {case!r}")
        row = (user.user_id, license_.license_id, course_id)
        self.notable["tie_rows"].setdefault(case, row)

    # Deletions

    def delete_department(self) -> None:
        """Delete a third-level department of the first company.

        Its members move to the parent department first, except one user who
        stays assigned to the deleted department and is also in its parent.
        """
        company_id = self.companies[0][0]
        tree = self.departments[company_id]
        moved = self.notable.get("moved_department_id")
        leaf = next(d for d in tree if d.depth == 3 and d.department_id != moved)
        parent_id = leaf.parent_id
        deleted_at = self.start_us + 500 * DAY
        members = [
            user
            for user in self.users
            if leaf.department_id in user.departments.get(company_id, [])
            and user.role == ""
        ]
        # The user who stays must have rows, so the report shows the effect.
        members_with_rows = [
            user
            for user in members
            if (user.user_id, company_id) in self.users_with_rows
        ]
        if not members_with_rows:
            staying = next(
                user
                for user in self.users
                if (user.user_id, company_id) in self.users_with_rows
                and user.role == ""
                and user not in members
            )
            self.membership(
                "assigned", staying, company_id, leaf.department_id, staying.created_us
            )
            staying.departments[company_id].append(leaf.department_id)
            members.insert(0, staying)
        else:
            staying = members_with_rows[0]
        for user in members:
            if parent_id not in user.departments[company_id]:
                when = deleted_at - 5 * DAY
                self.membership("assigned", user, company_id, parent_id, when)
                user.departments[company_id].append(parent_id)
            if user is not staying:
                when = deleted_at - 2 * DAY
                self.membership(
                    "unassigned", user, company_id, leaf.department_id, when
                )
        self.add_reference(
            "department.deleted",
            ("department", leaf.department_id),
            deleted_at,
            {"department_id": leaf.department_id},
            f"company-{company_id}".encode(),
        )
        self.notable["deleted_department_id"] = leaf.department_id
        self.notable["deleted_department_member_id"] = staying.user_id

    def deleted_license(self) -> _License:
        """Return the license that delete_license deletes near the end."""
        return self.licenses[self.companies[1][0]][1]

    def delete_license(self) -> None:
        license_ = self.deleted_license()
        company_id = license_.company_id
        self.add_reference(
            "license.deleted",
            ("license", license_.license_id),
            self.end_us - 10 * DAY,
            {"license_id": license_.license_id},
            f"company-{company_id}".encode(),
        )
        self.notable["deleted_license_id"] = license_.license_id

    # Sequences, ids and delivery

    def assign_sequences(self) -> None:
        """Number events in time order, as their sources would.

        CloudEvents from the sequenced source get increasing sequences and Moodle
        log rows get increasing log ids. At an equal time, the event generated
        first gets the lower number.
        """
        self.drafts.sort(key=lambda draft: (draft.time_us, draft.order))
        sequence = 1000
        log_id = 50_000 + self.id_offset
        for draft in self.drafts:
            if draft.shape == CLOUDEVENT:
                sequence += self.rng.randint(1, 3)
                draft.sequence = sequence
            elif draft.shape == MOODLE_LOG:
                log_id += self.rng.randint(1, 5)
                draft.sequence = log_id
        for draft in self.drafts:
            if draft.same_sequence_as is not None:
                draft.sequence = draft.same_sequence_as.sequence

    def make_logical(self) -> list[LogicalEvent]:
        logical = []
        for draft in self.drafts:
            draft.event_id = self.event_id(draft)
            source = {
                CLOUDEVENT: SEQUENCED_SOURCE,
                CLOUDEVENT_UNSEQUENCED: UNSEQUENCED_SOURCE,
            }.get(draft.shape, MOODLE_SOURCE)
            data = dict(draft.data)
            if draft.type == "license.allocated" and "issued_at" not in data:
                data["issued_at"] = draft.time_us
            logical.append(
                LogicalEvent(
                    draft.event_id,
                    draft.type,
                    draft.time_us,
                    draft.sequence,
                    data,
                    source,
                )
            )
        return logical

    def event_id(self, draft: _Draft) -> str:
        if draft.shape == MOODLE_LOG:
            return f"moodle-log-{draft.sequence}"
        if draft.shape == MOODLE_OBSERVED:
            # Moodle data without a log id is identified by its content. This key
            # names the content that the decoder hashes, but it is not the decoder's id.
            data = draft.data
            parts = [
                draft.type,
                data["user_id"],
                data["course_id"],
                data["license_id"],
                draft.time_us // SECOND,
                data.get("issued_at", draft.time_us) // SECOND
                if draft.type == "license.allocated"
                else "",
            ]
            return "moodle-content:" + ":".join(str(part) for part in parts)
        return str(uuid.UUID(int=self.rng.getrandbits(128), version=4))

    def deliver(
        self, logical: list[LogicalEvent]
    ) -> tuple[list[tuple[bytes | None, bytes]], list[int | None], list[Malformed]]:
        """Encode every event and order the messages for delivery.

        Each message is delivered near its time order, shuffled within a window of
        about 40 messages. Some reference data is moved much later, duplicates
        follow their original, and malformed values are spread over the stream.
        """
        rng = self.rng
        count = len(self.drafts)
        for index, draft in enumerate(self.drafts):
            draft.position = index + rng.uniform(0, 40)
            if draft.type.endswith(".upserted") and rng.random() < 0.05:
                draft.position += rng.uniform(200, 2000)
        self.move_reference_after_use()
        for late, after in self.late_deliveries:
            late.position = max(late.position, after.position + rng.uniform(0.5, 20))

        # At least one redelivery of each Moodle shape, whatever the seed.
        forced = {}
        for index, draft in enumerate(self.drafts):
            if draft.shape in (MOODLE_LOG, MOODLE_OBSERVED):
                forced.setdefault(draft.shape, index)
        forced_indexes = set(forced.values())

        entries: list[tuple[float, int, bytes | None, bytes, int | None]] = []
        for index, draft in enumerate(self.drafts):
            value = self.encode(draft, logical[index])
            entries.append((draft.position, len(entries), draft.key, value, index))
            if rng.random() >= 0.02 and index not in forced_indexes:
                continue
            # A redelivery carries the same bytes, except that a Moodle log row
            # may come back in another wire shape with the same log id.
            again = value
            if draft.shape == MOODLE_LOG and (
                rng.random() < 0.5 or index == forced[MOODLE_LOG]
            ):
                # Encoding draws its shape at random, so retry until it differs.
                for _ in range(20):
                    again = self.encode(draft, logical[index])
                    if again != value:
                        break
            delay = rng.uniform(1, 500)
            entries.append(
                (draft.position + delay, len(entries), draft.key, again, index)
            )

        malformed = self.malformed_values()
        for item in malformed:
            key = None if rng.random() < 0.5 else b"malformed"
            entries.append((rng.uniform(0, count), len(entries), key, item.value, None))

        entries.sort()
        messages = [(key, value) for _, _, key, value, _ in entries]
        message_events = [index for _, _, _, _, index in entries]
        return messages, message_events, malformed

    def move_reference_after_use(self) -> None:
        """Deliver the first version of a license, a course and a user after use."""
        late_license = self.notable["late_license_id"]
        late_course = self.notable["late_course_id"]
        late_user = self.users[0].user_id
        first_upsert: dict[tuple[str, int], _Draft] = {}
        first_use: dict[tuple[str, int], _Draft] = {}
        for draft in self.drafts:
            data = draft.data
            if draft.type == "license.upserted" and data["license_id"] == late_license:
                first_upsert.setdefault(("license", late_license), draft)
            elif draft.type == "course.upserted" and data["course_id"] == late_course:
                first_upsert.setdefault(("course", late_course), draft)
            elif draft.type == "user.upserted" and data["user_id"] == late_user:
                first_upsert.setdefault(("user", late_user), draft)
            elif draft.type == "license.allocated":
                for entity, value in (
                    ("license", data["license_id"]),
                    ("course", data["course_id"]),
                    ("user", data["user_id"]),
                ):
                    first_use.setdefault((entity, value), draft)
        for entity, upsert in first_upsert.items():
            use = first_use.get(entity)
            if use is not None:
                self.late_deliveries.append((upsert, use))
        self.notable["late_user_id"] = late_user

    # Wire encoding

    def encode(self, draft: _Draft, event: LogicalEvent) -> bytes:
        if draft.shape in (MOODLE_LOG, MOODLE_OBSERVED):
            return self.encode_moodle(draft)
        offset = self.rng.choice(_OFFSETS) if self.rng.random() < 0.15 else 0
        if draft.type == "license.allocated" and "issued_at" not in draft.data:
            # The contract's default: issued_at is the event's time.
            data = {k: v for k, v in event.data.items() if k != "issued_at"}
            event = LogicalEvent(
                event.event_id,
                event.type,
                event.time_us,
                event.sequence,
                data,
                event.source,
            )
        return encode_cloudevent(event, offset)

    def encode_moodle(self, draft: _Draft) -> bytes:
        rng = self.rng
        data = draft.data
        allocated = draft.type == "license.allocated"
        timecreated = draft.time_us // SECOND
        from_log = draft.shape == MOODLE_LOG
        as_text = from_log and rng.random() < 0.7 or rng.random() < 0.15

        other: dict[str, Any] = {"licenseid": data["license_id"]}
        if allocated:
            issued = data.get("issued_at", draft.time_us) // SECOND
            draw = rng.random()
            if issued != timecreated:
                other["issuedate"] = issued
            elif draw < 0.3:
                pass  # Missing: the decoder uses timecreated.
            elif draw < 0.55:
                other["issuedate"] = 0
            else:
                other["issuedate"] = issued
            other["duedate"] = 0
        if as_text or rng.random() < 0.1:
            other = {name: str(value) for name, value in other.items()}

        if from_log:
            other_value: Any = (
                _php_serialize(other)
                if rng.random() < 0.55
                else orjson.dumps(other).decode()
            )
            if rng.random() < 0.2:
                other_value = other
        else:
            draw = rng.random()
            if draw < 0.6:
                other_value = other
            elif draw < 0.85:
                other_value = orjson.dumps(other).decode()
            else:
                other_value = _php_serialize(other)

        eventname = MOODLE_ASSIGNED if allocated else MOODLE_UNASSIGNED
        if rng.random() < 0.2:
            eventname = eventname.lstrip("\\")
        course_id = data["course_id"]
        record: dict[str, Any] = {}
        if from_log:
            record["id"] = draft.sequence
        record |= {
            "eventname": eventname,
            "component": "block_iomad_company_admin",
            "action": "assigned" if allocated else "unassigned",
            "target": "user_license",
            "objecttable": "companylicense",
            "objectid": data["license_id"],
            "crud": "c" if allocated else "d",
            "edulevel": 0,
            "contextid": 100_000 + course_id,
            "contextlevel": 50,
            "contextinstanceid": course_id,
            "userid": data["user_id"],
            "courseid": course_id,
            "relateduserid": None,
            "anonymous": 0,
            "other": other_value,
            "timecreated": timecreated,
        }
        if from_log:
            record |= {"origin": "web", "ip": "10.20.0.5", "realuserid": None}
        if as_text:
            # Rows read from the log table through PHP carry numbers as strings.
            for name, value in record.items():
                if isinstance(value, int) and not isinstance(value, bool):
                    record[name] = str(value)
        return orjson.dumps(record)

    # Invalid values

    def malformed_values(self) -> list[Malformed]:
        """Return each kind of invalid value, once per 20,000 events (at least once)."""
        copies = max(1, len(self.drafts) // 20_000)
        user_id = self.users[0].user_id
        license_id = self.licenses[self.companies[0][0]][0].license_id
        course_id = self.course_ids[0]
        values = []
        for copy in range(copies):
            for kind, value in _malformed_kinds(copy, user_id, license_id, course_id):
                values.append(Malformed(kind, value))
        return values


def _malformed_kinds(
    copy: int, user_id: int, license_id: int, course_id: int
) -> list[tuple[str, bytes]]:
    """Return one invalid value of each kind, with ids unique to ``copy``."""

    def cloudevent(kind: str, **changes: Any) -> bytes:
        envelope: dict[str, Any] = {
            "specversion": "1.0",
            "id": f"malformed-{kind}-{copy}",
            "source": SEQUENCED_SOURCE,
            "type": "license.allocated",
            "time": "2024-05-01T12:00:00Z",
            "data": {
                "user_id": user_id,
                "license_id": license_id,
                "course_id": course_id,
            },
        }
        for name, value in changes.items():
            if value is _DROP:
                envelope.pop(name)
            else:
                envelope[name] = value
        return orjson.dumps(envelope)

    def moodle(other: Any, eventname: str = MOODLE_ASSIGNED) -> bytes:
        return orjson.dumps(
            {
                "id": 900_000 + copy,
                "eventname": eventname,
                "userid": user_id,
                "courseid": course_id,
                "other": other,
                "timecreated": 1_714_564_800,
            }
        )

    broken_php = f'a:2:{{s:9:"licenseid";i:{license_id};s:9:"issuedate";'
    utf8 = cloudevent("invalid-utf8")
    invalid_utf8 = utf8.replace(b'"source":"', b'"source":"\xff\xfe', 1)
    return [
        ("not-json", b'{"specversion": "1.0", "id": "truncated-' + str(copy).encode()),
        ("empty", b""),
        ("json-array", orjson.dumps([{"specversion": "1.0"}, copy])),
        ("json-number", str(copy).encode()),
        ("unknown-type", cloudevent("unknown-type", type="license.renewed")),
        ("missing-specversion", cloudevent("missing-specversion", specversion=_DROP)),
        ("missing-id", cloudevent("missing-id", id=_DROP)),
        (
            "missing-field",
            cloudevent(
                "missing-field", data={"user_id": user_id, "course_id": course_id}
            ),
        ),
        (
            "wrong-type",
            cloudevent(
                "wrong-type",
                data={
                    "user_id": str(user_id),
                    "license_id": license_id,
                    "course_id": course_id,
                },
            ),
        ),
        (
            "boolean-id",
            cloudevent(
                "boolean-id",
                data={
                    "user_id": True,
                    "license_id": license_id,
                    "course_id": course_id,
                },
            ),
        ),
        ("data-not-object", cloudevent("data-not-object", data=[user_id, license_id])),
        ("impossible-date", cloudevent("impossible-date", time="2024-02-30T10:00:00Z")),
        (
            "time-without-zone",
            cloudevent("time-without-zone", time="2024-05-01T12:00:00"),
        ),
        ("negative-sequence", cloudevent("negative-sequence", sequence=-1)),
        ("broken-php-other", moodle(broken_php)),
        ("moodle-missing-licenseid", moodle({"issuedate": 1_714_564_800})),
        (
            "moodle-unsupported-eventname",
            moodle({"licenseid": license_id}, "\\core\\event\\user_loggedin"),
        ),
        ("invalid-utf8", invalid_utf8),
    ]


_DROP = object()


def _php_serialize(values: Mapping[str, Any]) -> str:
    """Serialize a flat mapping of str keys to int or str values as PHP does."""
    parts = [f"a:{len(values)}:{{"]
    for name, value in values.items():
        parts.append(_php_scalar(name))
        parts.append(_php_scalar(value))
    parts.append("}")
    return "".join(parts)


def _php_scalar(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise TypeError(f"cannot PHP-serialize {value!r}")
    if isinstance(value, int):
        return f"i:{value};"
    return f's:{len(value.encode())}:"{value}";'


def _is_utf8(value: bytes) -> bool:
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _to_us(instant: datetime) -> int:
    delta = instant - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * SECOND + delta.microseconds
