"""Turn raw message values into accepted events and dead letters."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from consumer.decoding import decode
from license_report.errors import RejectedEvent
from projections.apply import DeadLetter, IncomingEvent

logger = logging.getLogger(__name__)

# Raw bytes kept in a dead letter are cut to this size.
MAX_DEAD_LETTER_BYTES = 1_000_000
# Rejections logged one by one per batch; the rest are counted in one line.
MAX_LOGGED_REJECTIONS = 10


@dataclass(slots=True)
class DecodedBatch:
    """The events and dead letters of one batch, in input order."""

    events: list[IncomingEvent] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)


def decode_values(
    values: Iterable[tuple[str, int | None, int | None, bytes | None]],
) -> DecodedBatch:
    """Decode ``(origin, partition, offset, value)`` tuples.

    A value that cannot be decoded becomes a dead letter with its reason; it
    never stops the batch.
    """
    batch = DecodedBatch()
    for origin, partition, offset, value in values:
        try:
            event = decode(value)
        except RejectedEvent as rejection:
            reason = rejection.reason
        except Exception as error:  # noqa: BLE001 - a decoder bug must not stop ingestion
            logger.exception(
                "decoder failed origin=%s partition=%s offset=%s",
                origin,
                partition,
                offset,
            )
            reason = f"unexpected decoding error: {type(error).__name__}: {error}"
        else:
            batch.events.append(IncomingEvent(event, origin, partition, offset))
            continue

        if len(batch.dead_letters) < MAX_LOGGED_REJECTIONS:
            logger.warning(
                "event rejected origin=%s partition=%s offset=%s reason=%s",
                origin,
                partition,
                offset,
                reason,
            )
        raw = (value or b"")[:MAX_DEAD_LETTER_BYTES]
        batch.dead_letters.append(DeadLetter(origin, partition, offset, raw, reason))

    hidden = len(batch.dead_letters) - MAX_LOGGED_REJECTIONS
    if hidden > 0:
        logger.warning("%d more events of this batch rejected as dead letters", hidden)
    return batch
