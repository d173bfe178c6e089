"""Point-in-time projections: the report as it stood at an earlier instant.

A snapshot replays the event store's events whose ``time`` is at or before the
instant into a private in-memory SQLite projection, through the same projection
code as the live one. Its cost grows with the number of those events, so a
request over ``max_events`` is rejected; the few newest snapshots are cached
until the event store grows.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from sqlalchemy import Engine, func, select
from sqlalchemy.pool import StaticPool

from license_report.errors import LicenseReportError
from projections import schema
from projections.apply import project_events
from projections.rebuild import stored_event
from projections.registry import tables
from projections.schema import Projection
from projections.sql import make_engine

logger = logging.getLogger(__name__)

BATCH_SIZE = 10_000
CACHED_SNAPSHOTS = 4


class SnapshotTooLarge(LicenseReportError):
    """More events lie before the instant than a snapshot may replay."""

    def __init__(self, events: int, limit: int) -> None:
        super().__init__(
            f"the report at that instant needs {events} events replayed, more than "
            f"the limit of {limit} (LICENSE_REPORT_AS_OF_MAX_EVENTS); choose an "
            "earlier as_of or raise the limit"
        )
        self.events = events
        self.limit = limit


@dataclass(frozen=True)
class Snapshot:
    """An in-memory projection of the events up to ``as_of_us``."""

    as_of_us: int
    engine: Engine
    tables: Projection
    events: int


class SnapshotCache:
    """Builds snapshots and keeps the newest few, keyed by instant and store size."""

    def __init__(self, source: Engine, max_events: int) -> None:
        self.source = source
        self.max_events = max_events
        self._cache: OrderedDict[tuple[int, int], Snapshot] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, as_of_us: int) -> Snapshot:
        """Return the snapshot at ``as_of_us``; raise SnapshotTooLarge if too big."""
        with self.source.connect() as conn:
            store = schema.event_store
            # NOTE: without an index on time_us this count scans the event store.
            count, newest = conn.execute(
                select(
                    func.count().filter(store.c.time_us <= as_of_us),
                    func.coalesce(func.max(store.c.position), 0),
                )
            ).one()
        if count > self.max_events:
            raise SnapshotTooLarge(count, self.max_events)
        key = (as_of_us, newest)
        with self._lock:
            snapshot = self._cache.get(key)
            if snapshot is None:
                snapshot = build_snapshot(self.source, as_of_us, newest)
                self._cache[key] = snapshot
                while len(self._cache) > CACHED_SNAPSHOTS:
                    _, old = self._cache.popitem(last=False)
                    old.engine.dispose()
            self._cache.move_to_end(key)
        return snapshot

    def close(self) -> None:
        with self._lock:
            for snapshot in self._cache.values():
                snapshot.engine.dispose()
            self._cache.clear()


def build_snapshot(source: Engine, as_of_us: int, end_position: int) -> Snapshot:
    """Replay stored events with time at or before ``as_of_us`` into memory."""
    started = time.monotonic()
    memory = make_engine(
        "sqlite://",
        poolclass=StaticPool,
        connect_args={"check_same_thread": False},
    )
    projection = tables(1)
    projection.metadata.create_all(memory)
    store = schema.event_store
    position = 0
    events = 0
    while True:
        with source.connect() as conn:
            rows = conn.execute(
                select(store.c.position, store.c.payload)
                .where(
                    store.c.position > position,
                    store.c.position <= end_position,
                    store.c.time_us <= as_of_us,
                )
                .order_by(store.c.position)
                .limit(BATCH_SIZE)
            ).all()
        if not rows:
            break
        batch = [
            (stored_event(payload), row_position) for row_position, payload in rows
        ]
        with memory.begin() as conn:
            project_events(conn, projection, batch)
        position = rows[-1].position
        events += len(rows)
    logger.info(
        "snapshot built as_of_us=%d events=%d seconds=%.2f",
        as_of_us,
        events,
        time.monotonic() - started,
    )
    return Snapshot(as_of_us, memory, projection, events)
