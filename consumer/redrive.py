"""Re-drive dead letters: decode them again and apply those that now pass."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from sqlalchemy import Engine, bindparam, select, update

from consumer.batch import decode_values
from consumer.timestamps import now_us
from projections import schema
from projections.apply import apply_batch

logger = logging.getLogger(__name__)

BATCH_SIZE = 1_000


@dataclass(slots=True)
class RedriveResult:
    """Totals of one re-drive."""

    accepted: int = 0
    applied: int = 0
    still_rejected: list[tuple[int, str]] = field(default_factory=list)


def redrive(engine: Engine, ids: Sequence[int] = ()) -> RedriveResult:
    """Re-decode dead letters not yet re-driven (all of them, or only ``ids``).

    Accepted events are applied like any others and their dead letters marked
    as re-driven, in the same transaction; rejected ones stay as they are.
    """
    table = schema.dead_letters
    result = RedriveResult()
    last_id = 0
    while True:
        query = (
            select(table.c.id, table.c.raw)
            .where(table.c.redriven_at_us.is_(None), table.c.id > last_id)
            .order_by(table.c.id)
            .limit(BATCH_SIZE)
        )
        if ids:
            query = query.where(table.c.id.in_(ids))
        with engine.begin() as conn:
            rows = conn.execute(query).all()
            if not rows:
                break
            last_id = rows[-1].id
            _redrive_rows(conn, rows, result)
    logger.info(
        "re-drive finished accepted=%d applied=%d still_rejected=%d",
        result.accepted,
        result.applied,
        len(result.still_rejected),
    )
    return result


def _redrive_rows(conn, rows, result: RedriveResult) -> None:
    table = schema.dead_letters
    decoded = decode_values(("dead-letter", None, row.id, row.raw) for row in rows)
    for letter in decoded.dead_letters:
        result.still_rejected.append((letter.offset, letter.reason))
    if not decoded.events:
        return
    applied = apply_batch(conn, decoded.events)
    result.accepted += len(decoded.events)
    result.applied += sum(applied.applied.values())
    statement = (
        update(table)
        .where(table.c.id == bindparam("letter_id"))
        .values(redriven_at_us=now_us(), redriven_event_id=bindparam("event_id"))
    )
    conn.execute(
        statement,
        [
            {"letter_id": item.offset, "event_id": item.event.event_id}
            for item in decoded.events
        ],
    )
