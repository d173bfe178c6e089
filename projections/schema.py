"""Tables of the event store, the consumer's offsets and the report projections.

Alembic migrates the shared tables defined on ``metadata``. The projection tables
come in versions, each a complete set named with a ``_v<N>`` suffix: a rebuild
fills a new version beside the live one, and the ``projections`` registry says
which version readers and the consumer use.

All instants are stored as integer microseconds since the Unix epoch (UTC), in
columns whose names end in ``_us``: they compare and sort the same way on
PostgreSQL and SQLite.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    SmallInteger,
    String,
    Table,
    Text,
    false,
    text,
)

from projections import report_totals

# SQLite only auto-increments an INTEGER PRIMARY KEY column.
AutoId = BigInteger().with_variant(Integer(), "sqlite")

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "pk": "pk_%(table_name)s",
}
metadata = MetaData(naming_convention=NAMING_CONVENTION)

# The layout of projection tables this code reads and writes. Changing a
# projection table means raising it; a rebuild then creates tables of the new
# layout, and the commands refuse to run on an older live projection.
PROJECTION_LAYOUT = 3


def _version_columns() -> list[Column]:
    """Columns that order the changes of one reference row: the latest one wins."""
    return [
        Column("version_time_us", BigInteger, nullable=False),
        Column("version_sequence", BigInteger, nullable=False),
        Column("version_position", BigInteger, nullable=False),
    ]


event_store = Table(
    "event_store",
    metadata,
    # Arrival order of accepted events; the last tie-breaker for reference data.
    Column("position", AutoId, primary_key=True, autoincrement=True),
    Column("event_id", String(255), nullable=False, unique=True),
    Column("type", String(64), nullable=False),
    Column("source", Text, nullable=False),
    Column("time_us", BigInteger, nullable=False),
    Column("sequence", BigInteger, nullable=True),
    # The event in its normalised CloudEvents form, as JSON text.
    Column("payload", Text, nullable=False),
    Column("origin", Text, nullable=True),
    Column("partition", Integer, nullable=True),
    Column("offset", BigInteger, nullable=True),
    Column("recorded_at_us", BigInteger, nullable=False),
    # The user a user.* event is about, so a deletion finds that user's stored
    # events without parsing every payload. NULL for other events.
    Column("subject_user_id", BigInteger, nullable=True),
    Index(None, "subject_user_id"),
    # The stored deletions alone, so that projections.privacy finds which users
    # of a batch are deleted without reading their other events. A query
    # matches this predicate reliably only when the type value is written into
    # the SQL text: see privacy._deleted_users.
    Index(
        "ix_event_store_user_deleted",
        "subject_user_id",
        postgresql_where=text("type = 'user.deleted'"),
        sqlite_where=text("type = 'user.deleted'"),
    ),
)

dead_letters = Table(
    "dead_letters",
    metadata,
    Column("id", AutoId, primary_key=True, autoincrement=True),
    # Kafka topic, or "file:<path>" for replayed files.
    Column("origin", Text, nullable=False),
    Column("partition", Integer, nullable=True),
    # Kafka offset, or the line number (from 1) in a replayed file.
    Column("offset", BigInteger, nullable=True),
    Column("raw", LargeBinary, nullable=False),
    Column("reason", Text, nullable=False),
    Column("received_at_us", BigInteger, nullable=False),
    # Set when a later re-drive accepted the event.
    Column("redriven_at_us", BigInteger, nullable=True),
    Column("redriven_event_id", String(255), nullable=True),
)

consumer_offsets = Table(
    "consumer_offsets",
    metadata,
    Column("group_id", String(255), primary_key=True),
    Column("topic", String(255), primary_key=True),
    Column("partition", Integer, primary_key=True),
    # The offset of the next record to consume, as Kafka commits it.
    Column("next_offset", BigInteger, nullable=False),
    Column("updated_at_us", BigInteger, nullable=False),
)


# API keys created with `license-report keys create`. Only a SHA-256 hash of
# each key is stored, and the prefix (its first 8 characters) names it in lists.
api_keys = Table(
    "api_keys",
    metadata,
    Column("id", AutoId, primary_key=True, autoincrement=True),
    Column("prefix", String(8), nullable=False),
    # Hex SHA-256 of the whole key.
    Column("key_hash", String(64), nullable=False, unique=True),
    Column("name", Text, nullable=False),
    # "all", "company" (company_id) or "department" (company_id, department_id).
    Column("scope", String(16), nullable=False),
    Column("company_id", BigInteger, nullable=True),
    Column("department_id", BigInteger, nullable=True),
    Column("created_at_us", BigInteger, nullable=False),
    Column("revoked_at_us", BigInteger, nullable=True),
    # Updated at most once a minute per key and API process.
    Column("last_used_at_us", BigInteger, nullable=True),
    CheckConstraint(
        "(scope = 'all' AND company_id IS NULL AND department_id IS NULL)"
        " OR (scope = 'company' AND company_id IS NOT NULL"
        " AND department_id IS NULL)"
        " OR (scope = 'department' AND company_id IS NOT NULL"
        " AND department_id IS NOT NULL)",
        name="ck_api_keys_scope",
    ),
    Index(None, "prefix"),
)


# One row per projection version; exactly one has status "live" once the
# database is initialised.
projections = Table(
    "projections",
    metadata,
    Column("version", Integer, primary_key=True, autoincrement=False),
    Column("layout", Integer, nullable=False),
    # "building", "live" or "retired".
    Column("status", String(16), nullable=False),
    Column("source", Text, nullable=False),
    # Event store position up to which a building version has been filled.
    Column("position", BigInteger, nullable=False),
    Column("created_at_us", BigInteger, nullable=False),
    Column("live_since_us", BigInteger, nullable=True),
)


@dataclass(frozen=True)
class Projection:
    """The tables of one projection version."""

    version: int
    metadata: MetaData
    state: Table
    companies: Table
    departments: Table
    users: Table
    memberships: Table
    courses: Table
    licenses: Table
    license_events: Table
    license_allocations: Table
    report_totals: Table


def projection_tables(version: int) -> Projection:
    """Define the tables of projection ``version`` on a metadata of their own.

    Creating them with ``metadata.create_all`` also creates the triggers that
    keep ``report_totals`` (see projections.report_totals).
    """
    own = MetaData(naming_convention=NAMING_CONVENTION)
    suffix = f"_v{version}"
    tables = {name: build(own, name + suffix) for name, build in _BUILDERS.items()}
    projection = Projection(version=version, metadata=own, **tables)
    report_totals.keep_with_tables(projection)
    return projection


def _state(metadata: MetaData, name: str) -> Table:
    """Freshness of the projection: one row, named "live"."""
    return Table(
        name,
        metadata,
        Column("name", String(64), primary_key=True),
        Column("newest_event_time_us", BigInteger, nullable=True),
        Column("applied_at_us", BigInteger, nullable=True),
        Column("events_applied", BigInteger, nullable=False),
    )


def _companies(metadata: MetaData, name: str) -> Table:
    return Table(
        name,
        metadata,
        Column("company_id", BigInteger, primary_key=True, autoincrement=False),
        Column("name", Text, nullable=False),
        *_version_columns(),
    )


def _departments(metadata: MetaData, name: str) -> Table:
    return Table(
        name,
        metadata,
        Column("department_id", BigInteger, primary_key=True, autoincrement=False),
        Column("company_id", BigInteger, nullable=True),
        Column("name", Text, nullable=True),
        Column("parent_id", BigInteger, nullable=True),
        Column("deleted", Boolean, nullable=False),
        *_version_columns(),
        Index(None, "company_id"),
    )


def _users(metadata: MetaData, name: str) -> Table:
    return Table(
        name,
        metadata,
        Column("user_id", BigInteger, primary_key=True, autoincrement=False),
        Column("firstname", Text, nullable=True),
        Column("lastname", Text, nullable=True),
        Column("email", Text, nullable=True),
        Column("suspended", Boolean, nullable=False),
        Column("deleted", Boolean, nullable=False),
        *_version_columns(),
    )


def _memberships(metadata: MetaData, name: str) -> Table:
    return Table(
        name,
        metadata,
        Column("user_id", BigInteger, primary_key=True, autoincrement=False),
        Column("company_id", BigInteger, primary_key=True, autoincrement=False),
        Column("department_id", BigInteger, primary_key=True, autoincrement=False),
        Column("assigned", Boolean, nullable=False),
        *_version_columns(),
        Index(None, "company_id", "user_id"),
    )


def _courses(metadata: MetaData, name: str) -> Table:
    return Table(
        name,
        metadata,
        Column("course_id", BigInteger, primary_key=True, autoincrement=False),
        Column("name", Text, nullable=False),
        *_version_columns(),
    )


def _licenses(metadata: MetaData, name: str) -> Table:
    return Table(
        name,
        metadata,
        Column("license_id", BigInteger, primary_key=True, autoincrement=False),
        Column("company_id", BigInteger, nullable=True),
        Column("name", Text, nullable=True),
        Column("reusable", Boolean, nullable=False),
        Column("program", Boolean, nullable=False),
        Column("start_us", BigInteger, nullable=True),
        Column("expiry_us", BigInteger, nullable=True),
        Column("deleted", Boolean, nullable=False),
        *_version_columns(),
        Index(None, "company_id"),
    )


def _license_events(metadata: MetaData, name: str) -> Table:
    """Table of the distinct license.allocated and license.unallocated events."""
    return Table(
        name,
        metadata,
        Column("event_id", String(255), primary_key=True),
        Column("user_id", BigInteger, nullable=False),
        Column("license_id", BigInteger, nullable=False),
        Column("course_id", BigInteger, nullable=False),
        # 1 allocated, 0 unallocated, as in IOMAD's own log.
        Column("action", SmallInteger, nullable=False),
        # issued_at of an allocation, time of an unallocation.
        Column("at_us", BigInteger, nullable=False),
        Column("time_us", BigInteger, nullable=False),
        Column("order_sequence", BigInteger, nullable=False),
        Index(None, "user_id", "license_id", "course_id", "action", "at_us"),
    )


def _license_allocations(metadata: MetaData, name: str) -> Table:
    """The report rows: counts and current state per (user, license, course)."""
    return Table(
        name,
        metadata,
        Column("user_id", BigInteger, primary_key=True, autoincrement=False),
        Column("license_id", BigInteger, primary_key=True, autoincrement=False),
        Column("course_id", BigInteger, primary_key=True, autoincrement=False),
        Column("allocations", Integer, nullable=False),
        Column("unallocations", Integer, nullable=False),
        Column("allocated", Boolean, nullable=False),
        # Order key (time, order sequence) of the row's latest event: see
        # projections.ordering.
        Column("last_time_us", BigInteger, nullable=False),
        Column("last_order_sequence", BigInteger, nullable=False),
        Column("last_allocated_us", BigInteger, nullable=True),
        Column("last_unallocated_us", BigInteger, nullable=True),
        # The earliest instants, which let a date filter decide most rows
        # without reading their events.
        Column("first_allocated_us", BigInteger, nullable=True),
        Column("first_unallocated_us", BigInteger, nullable=True),
        # Copies of what the report filters and sorts by, kept by
        # projections.report_rows, so a page reads this table alone.
        # company_id is the license's company, NULL while the license is unknown.
        Column("company_id", BigInteger, nullable=True),
        # True when the license is known and not deleted, and the user known,
        # not deleted and an assigned member of the license's company.
        Column("listed", Boolean, nullable=False, server_default=false()),
        Column("suspended", Boolean, nullable=False, server_default=false()),
        # Lower-cased names. department_key is the smallest lower-cased name
        # of the user's live departments in the company.
        Column("lastname_key", Text, nullable=True),
        Column("firstname_key", Text, nullable=True),
        Column("email_key", Text, nullable=True),
        Column("department_key", Text, nullable=True),
        Column("license_key", Text, nullable=True),
        Column("course_key", Text, nullable=True),
        Index(None, "license_id", "user_id"),
        # The default order, whole, so a first page is an index range scan.
        _listed_index(
            name,
            "lastname",
            "company_id",
            "lastname_key",
            "firstname_key",
            "user_id",
            "license_id",
            "course_id",
        ),
        # The other sort keys: ties are sorted among rows of equal keys.
        *(
            _listed_index(name, key, "company_id", column)
            for key, column in SORT_INDEX_COLUMNS.items()
        ),
        # Free space for in-place updates, see SORT_INDEX_COLUMNS.
        postgresql_with={"fillfactor": 80},
    )


# The sort keys that have an index of their own, and the column it orders by.
# The other sort keys sort the company's rows. An index on a column that every
# new license event changes (the counts, allocated, the last instants) would
# make each such update write a new entry in every index of the table; without
# one, and with free space in each page (fillfactor), PostgreSQL updates the
# row in place (a HOT update) and touches no index.
SORT_INDEX_COLUMNS = {
    "firstname": "firstname_key",
    "email": "email_key",
    "department": "department_key",
    "license": "license_key",
    "course": "course_key",
}


def _listed_index(table: str, key: str, *columns: str) -> Index:
    """Return an index over the listed rows, carrying ``suspended`` on PostgreSQL."""
    listed = text("listed")
    return Index(
        f"ix_{table}_{key}_order",
        *columns,
        postgresql_where=listed,
        sqlite_where=listed,
        postgresql_include=["suspended"],
    )


def _report_totals(metadata: MetaData, name: str) -> Table:
    """Per company, the number of listed report rows, kept by database triggers.

    The report's unfiltered total reads one row here instead of counting the
    company's rows. A company whose rows were all unlisted may keep a row of
    zeros.
    """
    return Table(
        name,
        metadata,
        Column("company_id", BigInteger, primary_key=True, autoincrement=False),
        # Rows with listed true and this company_id.
        Column("listed_rows", BigInteger, nullable=False),
        # Those of them with suspended true.
        Column("suspended_rows", BigInteger, nullable=False),
    )


_BUILDERS = {
    "state": _state,
    "companies": _companies,
    "departments": _departments,
    "users": _users,
    "memberships": _memberships,
    "courses": _courses,
    "licenses": _licenses,
    "license_events": _license_events,
    "license_allocations": _license_allocations,
    "report_totals": _report_totals,
}

# TODO: remove these aliases of version 1 once every reader resolves the live
# projection through projections.registry.
_V1 = projection_tables(1)
projection_state = _V1.state
companies = _V1.companies
departments = _V1.departments
users = _V1.users
memberships = _V1.memberships
courses = _V1.courses
licenses = _V1.licenses
license_events = _V1.license_events
license_allocations = _V1.license_allocations
