"""Turn raw message values into accepted events and dead letters."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from consumer.decoding import decode
from consumer.events import Event
from license_report.collector import rare_collections
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


@rare_collections()
def decode_values(
    values: Iterable[tuple[str, int | None, int | None, bytes | None]],
) -> DecodedBatch:
    """Decode ``(origin, partition, offset, value)`` tuples.

    A value that cannot be decoded becomes a dead letter with its reason; it
    never stops the batch.
    """
    batch = DecodedBatch()
    decoder_failures = 0
    for origin, partition, offset, value in values:
        try:
            event = decode(value)
            check_storable(event)
        except RejectedEvent as rejection:
            reason = rejection.reason
        except Exception as error:  # noqa: BLE001 - a decoder bug must not stop ingestion
            decoder_failures += 1
            if decoder_failures <= MAX_LOGGED_REJECTIONS:
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

        # PostgreSQL text cannot hold U+0000, and a reason that the database
        # rejects would fail the whole batch on every retry.
        reason = reason.replace("\x00", "\\x00")
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
    if decoder_failures > MAX_LOGGED_REJECTIONS:
        logger.error(
            "decoder failed on %d more values of this batch",
            decoder_failures - MAX_LOGGED_REJECTIONS,
        )
    return batch


def check_storable(event: Event) -> None:
    """Raise RejectedEvent if a text field of the event contains U+0000.

    PostgreSQL text cannot hold that character, so such an event would fail its
    batch on every retry and stop the partition. SQLite could store it, but the
    event is rejected there too, so both databases accept the same events.
    """
    fields = {"id": event.event_id, "source": event.source}
    for name in type(event.data).model_fields:
        fields[f"data.{name}"] = getattr(event.data, name)
    for name, value in fields.items():
        if isinstance(value, str) and "\x00" in value:
            raise RejectedEvent(
                f"CloudEvent {name} contains the NUL character U+0000, which "
                "PostgreSQL text cannot store"
            )
