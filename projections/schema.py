"""Tables of the event store, the consumer's offsets and the report projection.

All instants are stored as integer microseconds since the Unix epoch (UTC), in
columns whose names end in ``_us``: they compare and sort the same way on
PostgreSQL and SQLite.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    SmallInteger,
    String,
    Table,
    Text,
)

# SQLite only auto-increments an INTEGER PRIMARY KEY column.
AutoId = BigInteger().with_variant(Integer(), "sqlite")

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "pk": "pk_%(table_name)s",
    }
)


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

projection_state = Table(
    "projection_state",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("newest_event_time_us", BigInteger, nullable=True),
    Column("applied_at_us", BigInteger, nullable=True),
    Column("events_applied", BigInteger, nullable=False),
)

companies = Table(
    "companies",
    metadata,
    Column("company_id", BigInteger, primary_key=True, autoincrement=False),
    Column("name", Text, nullable=False),
    *_version_columns(),
)

departments = Table(
    "departments",
    metadata,
    Column("department_id", BigInteger, primary_key=True, autoincrement=False),
    Column("company_id", BigInteger, nullable=True),
    Column("name", Text, nullable=True),
    Column("parent_id", BigInteger, nullable=True),
    Column("deleted", Boolean, nullable=False),
    *_version_columns(),
    Index(None, "company_id"),
)

users = Table(
    "users",
    metadata,
    Column("user_id", BigInteger, primary_key=True, autoincrement=False),
    Column("firstname", Text, nullable=True),
    Column("lastname", Text, nullable=True),
    Column("email", Text, nullable=True),
    Column("suspended", Boolean, nullable=False),
    Column("deleted", Boolean, nullable=False),
    *_version_columns(),
)

memberships = Table(
    "memberships",
    metadata,
    Column("user_id", BigInteger, primary_key=True, autoincrement=False),
    Column("company_id", BigInteger, primary_key=True, autoincrement=False),
    Column("department_id", BigInteger, primary_key=True, autoincrement=False),
    Column("assigned", Boolean, nullable=False),
    *_version_columns(),
    Index(None, "company_id", "user_id"),
)

courses = Table(
    "courses",
    metadata,
    Column("course_id", BigInteger, primary_key=True, autoincrement=False),
    Column("name", Text, nullable=False),
    *_version_columns(),
)

licenses = Table(
    "licenses",
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

# One row per distinct license.allocated or license.unallocated event.
license_events = Table(
    "license_events",
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

# The report rows: counts and current state per (user, license, course).
license_allocations = Table(
    "license_allocations",
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
    Index(None, "license_id", "user_id"),
)
