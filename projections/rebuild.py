"""Rebuild a projection from the event store beside the live one, then switch.

The new version is filled in batches while the consumer keeps writing to the
live version and the API keeps reading it. Reaching the end of the event store
is decided under a short exclusive lock on the live registry row: consumers
hold a shared lock on that row for the whole of each batch, so while the
exclusive lock is held no batch is in flight and every position up to the
store's maximum is committed. The switch takes the same lock, applies what is
left and makes the new version live in one transaction.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

from sqlalchemy import Connection, Engine, Table, func, inspect, select, text, update
from sqlalchemy.schema import CreateTable

from consumer.decoding import decode_stored
from consumer.events import StoredEvent
from consumer.timestamps import now_us
from license_report.collector import rare_collections
from projections import report_rows, report_totals, schema
from projections.apply import (
    LICENSE_EVENT_TYPES,
    PreparedBatch,
    copy_stored_license_events,
    prepare_events,
    project_events,
    refold,
    write_prepared,
)
from projections.registry import BUILDING, LIVE, RETIRED, tables
from projections.schema import PROJECTION_LAYOUT, Projection

logger = logging.getLogger(__name__)

# Stored events per rebuild transaction. On 2 cores, a million events took
# about 20 % less time in batches of 50,000 than of 20,000, and the process
# peaked at 197 MiB instead of 131 MiB: two batches are in memory at a time.
DEFAULT_BATCH_SIZE = 50_000
# The switch happens once fewer events than this remain to catch up.
SWITCH_THRESHOLD = 5_000

Progress = Callable[[int, int], None]


@dataclass(slots=True)
class RebuildResult:
    """Outcome of one rebuild."""

    version: int
    previous_version: int
    events: int
    seconds: float
    resumed: bool


def rebuild_from_store(
    engine: Engine,
    batch_size: int = DEFAULT_BATCH_SIZE,
    discard: bool = False,
    progress: Progress | None = None,
    source: str = "store",
    switch_threshold: int = SWITCH_THRESHOLD,
) -> RebuildResult:
    """Build a new projection version from the event store and make it live.

    An interrupted rebuild (a version still "building") is resumed, or dropped
    first when ``discard`` is true. ``progress`` is called with the events done
    and the events known so far. The switch waits until fewer than
    ``switch_threshold`` events remain, since consumers wait while it runs.
    """
    with rare_collections():
        return _rebuild(engine, batch_size, discard, progress, source, switch_threshold)


def _rebuild(
    engine: Engine,
    batch_size: int,
    discard: bool,
    progress: Progress | None,
    source: str,
    switch_threshold: int,
) -> RebuildResult:
    started = time.monotonic()
    projection, position, resumed = _start(engine, discard, source)
    logger.info(
        "rebuild starting version=%d from_position=%d resumed=%s",
        projection.version,
        position,
        resumed,
    )
    # On PostgreSQL the fill copies license events in unfolded, and one fold
    # of all of them afterwards writes the report rows. On the 1M-event
    # history of bench/rebuild.py that took 14.4 to 14.7 s instead of 15.5
    # to 17.8 s with a fold per batch (2 cores, one machine, runs alternated).
    # PostgreSQL also reads the license events' payloads itself, so the
    # reader thread decodes only the reference events.
    fold_once = engine.dialect.name == "postgresql"
    done = 0
    while True:
        end = _committed_end(engine)
        remaining = _count_between(engine, position, end)
        if progress:
            progress(done, done + remaining)
        if remaining < max(switch_threshold, 1):
            break
        skip = LICENSE_EVENT_TYPES if fold_once else ()
        batches = _read_ahead(engine, projection, position, end, batch_size, skip)
        for batch, upto in batches:
            with engine.begin() as conn:
                if fold_once:
                    batch = _with_license_events(
                        conn, projection, batch, position, upto
                    )
                write_prepared(
                    conn, projection, batch, copies=False, fold=not fold_once
                )
                _set_position(conn, projection, upto)
            position = upto
            done += batch.events
            remaining -= batch.events
            if progress:
                progress(done, done + remaining)

    filled = time.monotonic()
    events = projection.license_events
    with ThreadPoolExecutor(1, thread_name_prefix="rebuild-indexer") as indexer:
        # On PostgreSQL the license events' indexes are built while the fold
        # reads that table, which CREATE INDEX allows.
        events_indexed = None
        if fold_once:
            events_indexed = indexer.submit(
                create_indexes, engine, projection, [events]
            )
        with engine.begin() as conn:
            if fold_once:
                refold(conn, projection)
            else:
                report_rows.refresh_all(conn, projection)
            # The totals triggers from here on, for the events the switch
            # catches up.
            report_totals.recount(conn, projection)
            report_totals.install(conn, projection)
        if events_indexed is not None:
            events_indexed.result()
    copied = time.monotonic()
    create_indexes(engine, projection)
    logger.info(
        "rebuild filled version=%d events=%d fill_seconds=%.1f "
        "copies_seconds=%.1f index_seconds=%.1f",
        projection.version,
        done,
        filled - started,
        copied - filled,
        time.monotonic() - copied,
    )
    previous, switched_events = _switch(engine, projection, position)
    done += switched_events
    if progress:
        progress(done, done)
    seconds = time.monotonic() - started
    logger.info(
        "rebuild finished version=%d previous_version=%d events=%d seconds=%.1f",
        projection.version,
        previous,
        done,
        seconds,
    )
    return RebuildResult(projection.version, previous, done, seconds, resumed)


def discard_building(engine: Engine) -> list[int]:
    """Drop every version that is still building; return their numbers."""
    registry = schema.projections
    with engine.begin() as conn:
        versions = conn.execute(
            select(registry.c.version).where(registry.c.status == BUILDING)
        ).scalars()
        versions = list(versions)
        for version in versions:
            drop_version(conn, version)
    for version in versions:
        logger.info("rebuild discarded version=%d", version)
    return versions


def _start(engine: Engine, discard: bool, source: str) -> tuple[Projection, int, bool]:
    """Return the building version to fill, its position, and whether it resumes."""
    if discard:
        discard_building(engine)
    registry = schema.projections
    with engine.begin() as conn:
        building = conn.execute(
            select(registry.c.version, registry.c.position, registry.c.layout).where(
                registry.c.status == BUILDING
            )
        ).first()
        if building is not None:
            if building.layout == PROJECTION_LAYOUT:
                return tables(building.version), building.position, True
            # This code cannot resume filling tables of another layout.
            drop_version(conn, building.version)
        # The secondary indexes come after the bulk fill, which is faster
        # than keeping them up to date row by row.
        projection = create_version(conn, BUILDING, source, indexes=False)
    return projection, 0, False


def create_version(
    conn: Connection, status: str, source: str, indexes: bool = True
) -> Projection:
    """Create the tables of a new, empty projection version and register it.

    Without ``indexes``, only the primary keys are created, except on
    PostgreSQL the license events' key, and no triggers keep
    ``report_totals``: ``create_indexes`` adds the indexes and that key, and
    ``report_totals.recount`` and ``report_totals.install`` the totals.
    """
    registry = schema.projections
    newest = conn.execute(select(func.max(registry.c.version))).scalar() or 0
    projection = tables(newest + 1)
    if indexes:
        projection.metadata.create_all(conn)
    else:
        for table in projection.metadata.sorted_tables:
            conn.execute(CreateTable(table))
        if conn.dialect.name == "postgresql":
            # A rebuild on PostgreSQL copies license events in without ON
            # CONFLICT, and their ids are unique in the event store. Building
            # the key afterwards took 0.8 s for 760,000 events where keeping
            # it during the fill cost 2.7 s.
            # Plain SQL: in SQLAlchemy 2.0, DropConstraint also keeps the key
            # out of later CREATE TABLEs of this cached Table.
            events = projection.license_events
            quote = conn.dialect.identifier_preparer.quote
            conn.execute(
                text(
                    f"ALTER TABLE {quote(events.name)} "
                    f"DROP CONSTRAINT {quote(events.primary_key.name)}"
                )
            )
    conn.execute(
        registry.insert().values(
            version=projection.version,
            layout=PROJECTION_LAYOUT,
            status=status,
            source=source,
            position=0,
            created_at_us=now_us(),
        )
    )
    return projection


def create_indexes(
    engine: Engine, projection: Projection, only: Sequence[Table] = ()
) -> None:
    """Create the indexes a version lacks, then refresh PostgreSQL's statistics.

    ``only`` limits the work to those tables of the version. Runs before the
    switch, so the API's first queries on the new version are planned with
    its real sizes.
    """
    with engine.begin() as conn:
        for table in only or projection.metadata.sorted_tables:
            for index in table.indexes:
                index.create(conn, checkfirst=True)
            if conn.dialect.name == "postgresql":
                conn.execute(text(f'ANALYZE "{table.name}"'))
            if table is projection.license_events:
                _create_event_key(conn, table)


def _create_event_key(conn: Connection, events: Table) -> None:
    """Add the license events' primary key if the table lacks it.

    The key's index is built first, which lets readers of the table in. Only
    adding the constraint on it waits for them.
    """
    if inspect(conn).get_pk_constraint(events.name)["constrained_columns"]:
        return
    quote = conn.dialect.identifier_preparer.quote
    name, table = quote(events.primary_key.name), quote(events.name)
    columns = ", ".join(quote(column.name) for column in events.primary_key.columns)
    conn.execute(
        text(f"CREATE UNIQUE INDEX IF NOT EXISTS {name} ON {table} ({columns})")
    )
    conn.execute(
        text(
            f"ALTER TABLE {table} ADD CONSTRAINT {name} PRIMARY KEY USING INDEX {name}"
        )
    )


def lock_live(conn: Connection) -> int:
    """Take the exclusive lock on the live registry row; return the live version.

    The no-op UPDATE waits for batches holding the shared lock and makes new
    ones wait. On SQLite it takes the database's write lock, which does the same.
    """
    registry = schema.projections
    conn.execute(
        update(registry)
        .where(registry.c.status == LIVE)
        .values(status=registry.c.status)
    )
    return conn.execute(
        select(registry.c.version).where(registry.c.status == LIVE)
    ).scalar_one()


def _committed_end(engine: Engine) -> int:
    """Return a position up to which every event store row is committed."""
    with engine.begin() as conn:
        lock_live(conn)
        return max_position(conn)


def max_position(conn: Connection) -> int:
    return conn.execute(select(func.max(schema.event_store.c.position))).scalar() or 0


def _count_between(engine: Engine, start: int, end: int) -> int:
    store = schema.event_store
    with engine.connect() as conn:
        return conn.execute(
            select(func.count()).where(
                store.c.position > start, store.c.position <= end
            )
        ).scalar_one()


def fill(
    conn: Connection, projection: Projection, start: int, end: int, batch_size: int
) -> tuple[int, int]:
    """Apply one batch of stored events after ``start``; return count and position."""
    events, position = read_batch(conn, start, end, batch_size)
    project_events(conn, projection, events)
    _set_position(conn, projection, position)
    return len(events), position


def read_batch(
    conn: Connection,
    start: int,
    end: int,
    batch_size: int,
    skip: Sequence[str] = (),
) -> tuple[list[tuple[StoredEvent, int]], int]:
    """Read the stored events of the next ``batch_size`` positions after ``start``.

    Returns them with their positions, and the position up to which the batch
    covers the store: ``start + batch_size``, or ``end`` if that comes first.
    Positions skipped by rejected duplicates make a batch smaller, and so do
    events of the types in ``skip``, which are left out.
    """
    # A range of positions, not a LIMIT, so the plan does not depend on the
    # table's statistics: without them, PostgreSQL 15 sorted every row up to
    # ``end`` for each batch after a bulk load.
    position = min(start + batch_size, end)
    store = schema.event_store
    statement = (
        select(store.c.position, store.c.payload)
        .where(store.c.position > start, store.c.position <= position)
        .order_by(store.c.position)
    )
    if skip:
        statement = statement.where(store.c.type.not_in(skip))
    rows = conn.execute(statement).all()
    events = [(stored_event(payload), row_position) for row_position, payload in rows]
    return events, position


def _read_ahead(
    engine: Engine,
    projection: Projection,
    start: int,
    end: int,
    batch_size: int,
    skip: Sequence[str] = (),
) -> Iterator[tuple[PreparedBatch, int]]:
    """Yield prepared batches of stored events up to ``end``, with their positions.

    A thread reads, decodes and prepares the next batch on its own connection
    while the caller writes the current one, so Python works while PostgreSQL
    writes. At most two batches are in memory. Events of the types in
    ``skip`` are left out.
    """
    with ThreadPoolExecutor(1, thread_name_prefix="rebuild-reader") as reader:

        def read(after: int) -> tuple[PreparedBatch, int]:
            with engine.connect() as conn:
                events, position = read_batch(conn, after, end, batch_size, skip)
            return prepare_events(projection, events), position

        position = start
        pending = reader.submit(read, position)
        while position < end:
            events, position = pending.result()
            if position < end:
                pending = reader.submit(read, position)
            yield events, position


def _with_license_events(
    conn: Connection,
    projection: Projection,
    batch: PreparedBatch,
    after: int,
    upto: int,
) -> PreparedBatch:
    """Copy the license events stored in the batch's positions and count them."""
    count, newest = copy_stored_license_events(conn, projection, after, upto)
    if not count:
        return batch
    times = [
        time_us for time_us in (batch.newest_time_us, newest) if time_us is not None
    ]
    return replace(batch, events=batch.events + count, newest_time_us=max(times))


def stored_event(payload: str) -> StoredEvent:
    """Decode an event store payload, which was validated when it was stored."""
    return decode_stored(payload)


def _set_position(conn: Connection, projection: Projection, position: int) -> None:
    registry = schema.projections
    conn.execute(
        update(registry)
        .where(registry.c.version == projection.version)
        .values(position=position)
    )


def _switch(engine: Engine, projection: Projection, position: int) -> tuple[int, int]:
    """Catch up under the exclusive lock and make ``projection`` live."""
    registry = schema.projections
    applied = 0
    with engine.begin() as conn:
        previous = lock_live(conn)
        end = max_position(conn)
        while position < end:
            count, position = fill(conn, projection, position, end, DEFAULT_BATCH_SIZE)
            applied += count
        conn.execute(
            update(registry)
            .where(registry.c.version == previous)
            .values(status=RETIRED)
        )
        conn.execute(
            update(registry)
            .where(registry.c.version == projection.version)
            .values(status=LIVE, live_since_us=now_us())
        )
        _drop_old_retired(conn, keep=previous)
    logger.info(
        "projection switched version=%d previous_version=%d caught_up=%d",
        projection.version,
        previous,
        applied,
    )
    return previous, applied


def _drop_old_retired(conn: Connection, keep: int) -> None:
    """Drop retired versions except ``keep``, which readers may still hold."""
    registry = schema.projections
    old = conn.execute(
        select(registry.c.version).where(
            registry.c.status == RETIRED, registry.c.version != keep
        )
    ).scalars()
    for version in list(old):
        drop_version(conn, version)
        logger.info("projection dropped version=%d", version)


def drop_version(conn: Connection, version: int) -> None:
    registry = schema.projections
    tables(version).metadata.drop_all(conn)
    conn.execute(registry.delete().where(registry.c.version == version))
