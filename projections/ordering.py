"""Order keys that make the projection independent of arrival order.

A license event sorts by ``(time_us, order_sequence)``. The order sequence is
derived from the event's ``sequence`` so that one integer comparison settles every
tie at the same ``time``:

- both events carry a sequence: the higher sequence is later, and at an equal
  sequence the unallocation is later;
- either one carries none: the unallocation is later.

A reference-data change sorts by ``(time_us, sequence or NO_SEQUENCE, position)``,
where ``position`` is the event's arrival order in the event store.
"""

from __future__ import annotations

from sqlalchemy import ColumnElement, case

# Sequences must stay below this bound; larger ones are rejected when decoding.
MAX_SEQUENCE = 2**60
NO_SEQUENCE = -(2**62)
_UNALLOCATION_WITHOUT_SEQUENCE = 2**62

ALLOCATED = 1
UNALLOCATED = 0


def order_sequence(sequence: int | None, action: int) -> int:
    """Return the tie-breaking integer of a license event at its ``time``."""
    if sequence is None:
        return NO_SEQUENCE if action == ALLOCATED else _UNALLOCATION_WITHOUT_SEQUENCE
    return 2 * sequence + (1 if action == UNALLOCATED else 0)


def version_sequence(sequence: int | None) -> int:
    """Return the sequence part of a reference-data version."""
    return NO_SEQUENCE if sequence is None else sequence


def order_sequence_sql(sequence, allocated: ColumnElement[bool]) -> ColumnElement:
    """Return ``order_sequence`` as a SQL expression of a sequence column.

    ``allocated`` is true for an allocation and false for an unallocation.
    """
    return case(
        (
            sequence.is_(None),
            case((allocated, NO_SEQUENCE), else_=_UNALLOCATION_WITHOUT_SEQUENCE),
        ),
        else_=2 * sequence + case((allocated, 0), else_=1),
    )
