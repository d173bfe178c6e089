"""The projection registry: which projection version is live."""

from __future__ import annotations

import functools
import logging

from sqlalchemy import Connection, Engine, select, update

from consumer.timestamps import now_us
from license_report.errors import SchemaOutOfDate
from projections import schema
from projections.schema import PROJECTION_LAYOUT, Projection, projection_tables

logger = logging.getLogger(__name__)

LIVE = "live"
BUILDING = "building"
RETIRED = "retired"


@functools.lru_cache(maxsize=16)
def tables(version: int) -> Projection:
    """Return the (cached) table definitions of projection ``version``."""
    return projection_tables(version)


def live_projection(
    conn: Connection, lock: bool = False, any_layout: bool = False
) -> Projection:
    """Return the live projection's tables.

    Raises SchemaOutOfDate when there is none, or, unless ``any_layout``, when
    it has a layout other than this code's.

    With ``lock``, hold a shared lock on the registry row until the transaction
    ends, so a rebuild cannot switch versions under a batch that writes.
    SQLite has no row locks: there the no-op UPDATE takes the database's write
    lock first, which also makes Python's sqlite3 module open the transaction
    before the registry is read rather than after.
    """
    registry = schema.projections
    query = select(registry.c.version, registry.c.layout).where(
        registry.c.status == LIVE
    )
    if lock and conn.dialect.name == "postgresql":
        query = query.with_for_update(read=True)
    elif lock:
        conn.execute(
            update(registry)
            .where(registry.c.status == LIVE)
            .values(status=registry.c.status)
        )
    row = conn.execute(query).one_or_none()
    if row is None and lock:
        # A switch that committed while this statement waited for the row lock
        # retired the row it found; the next statement sees the new live row.
        row = conn.execute(query).one_or_none()
    if row is None:
        raise SchemaOutOfDate(
            "the database has no live projection; run `license-report migrate`"
        )
    if row.layout != PROJECTION_LAYOUT and not any_layout:
        raise SchemaOutOfDate(
            f"the live projection has layout {row.layout} but this version of "
            f"license-report needs layout {PROJECTION_LAYOUT}; run "
            "`license-report rebuild --from store`"
        )
    return tables(row.version)


def ensure_live(engine: Engine) -> None:
    """Create projection version 1 and make it live, unless one is live already."""
    registry = schema.projections
    with engine.begin() as conn:
        live = conn.execute(
            select(registry.c.version).where(registry.c.status == LIVE)
        ).first()
        if live is not None:
            return
        projection = tables(1)
        projection.metadata.create_all(conn)
        now = now_us()
        conn.execute(
            registry.insert().values(
                version=1,
                layout=PROJECTION_LAYOUT,
                status=LIVE,
                source="initial",
                position=0,
                created_at_us=now,
                live_since_us=now,
            )
        )
    logger.info("projection created version=1 layout=%d", PROJECTION_LAYOUT)
