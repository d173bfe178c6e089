"""Recompute the projection from the event store and compare it with the live one."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from sqlalchemy import Engine, Table, select

from projections.rebuild import (
    DEFAULT_BATCH_SIZE,
    create_version,
    drop_version,
    fill,
    lock_live,
    max_position,
)
from projections.registry import tables
from projections.schema import Projection

logger = logging.getLogger(__name__)

SCRATCH = "verifying"
# Tables compared row by row; the state table only holds timestamps.
COMPARED = [
    "license_allocations",
    "license_events",
    "companies",
    "departments",
    "users",
    "memberships",
    "courses",
    "licenses",
    "report_totals",
]
# Arrival positions differ between an incremental and a batch build.
IGNORED_COLUMNS = {"version_position"}
# A company whose rows were all unlisted may keep a row of zeros in one
# build and have none in the other.
ZERO_TOTALS_IGNORED = "report_totals"


@dataclass(slots=True)
class Difference:
    """One row found in only one of the two projections."""

    table: str
    side: str
    row: dict[str, object]


@dataclass(slots=True)
class VerifyResult:
    """The outcome of a verification."""

    live_version: int
    events: int
    differences: list[Difference] = field(default_factory=list)


def verify(
    engine: Engine, max_differences: int = 100, batch_size: int = DEFAULT_BATCH_SIZE
) -> VerifyResult:
    """Build a scratch projection from the event store and compare it with live.

    The scratch version is filled while ingestion goes on; the last events and
    the comparison run under the exclusive lock on the live registry row, so the
    consumer waits for the length of the comparison.
    """
    with engine.begin() as conn:
        scratch = create_version(conn, SCRATCH, "verify")
    try:
        position = 0
        events = 0
        end = _end(engine)
        while position < end:
            with engine.begin() as conn:
                count, position = fill(conn, scratch, position, end, batch_size)
            events += count
        with engine.begin() as conn:
            live_version = lock_live(conn)
            end = max_position(conn)
            while position < end:
                count, position = fill(conn, scratch, position, end, batch_size)
                events += count
            result = VerifyResult(live_version, events)
            live = tables(live_version)
            for name in COMPARED:
                found = _compare(conn, live, scratch, name, max_differences)
                result.differences += found
    finally:
        with engine.begin() as conn:
            drop_version(conn, scratch.version)
    logger.info(
        "verify finished live_version=%d events=%d differences=%d",
        result.live_version,
        result.events,
        len(result.differences),
    )
    return result


def _end(engine: Engine) -> int:
    with engine.begin() as conn:
        lock_live(conn)
        return max_position(conn)


def _compare(
    conn, live: Projection, scratch: Projection, name: str, limit: int
) -> list[Difference]:
    live_table: Table = getattr(live, name)
    scratch_table: Table = getattr(scratch, name)
    columns = [c.name for c in live_table.c if c.name not in IGNORED_COLUMNS]

    def rows(table: Table):
        selected = select(*(table.c[column] for column in columns))
        if name == ZERO_TOTALS_IGNORED:
            selected = selected.where(table.c.listed_rows != 0)
        return selected

    differences = []
    for side, first, second in (
        ("live", live_table, scratch_table),
        ("recomputed", scratch_table, live_table),
    ):
        query = rows(first).except_(rows(second)).limit(limit)
        for row in conn.execute(query):
            differences.append(Difference(name, side, dict(row._mapping)))
    return differences
