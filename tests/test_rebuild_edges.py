"""Rebuilds of license events at the edges of what the decoder accepts.

On PostgreSQL the rebuild's fill reads license events out of the stored
payloads in SQL. Verify recomputes them through the Python decoder, so any
difference between the two shows up as a row in only one projection.
"""

from __future__ import annotations

import orjson
import pytest
from sqlalchemy import select

from consumer.batch import decode_values
from consumer.decoding import decode_stored
from projections import schema
from projections.apply import _license_event_rows, apply_batch
from projections.ordering import MAX_SEQUENCE
from projections.rebuild import rebuild_from_store
from projections.registry import live_projection
from projections.verify import verify

pytestmark = pytest.mark.timeout(300)

BIG_ID = 2**63 - 1
SOURCE = "https://lms.example.org/iomad"
_UNSET = object()


def _event(
    event_id: str,
    event_type: str,
    time: str,
    data: dict,
    sequence: object = _UNSET,
) -> bytes:
    document = {
        "specversion": "1.0",
        "id": event_id,
        "source": SOURCE,
        "type": event_type,
        "time": time,
        "data": data,
    }
    if sequence is not _UNSET:
        document["sequence"] = sequence
    return orjson.dumps(document)


def _allocated(event_id, time, user, sequence=_UNSET, issued_at=_UNSET, **ids):
    data = {
        "user_id": user,
        "license_id": ids.get("license_id", 7),
        "course_id": ids.get("course_id", 9),
    }
    if issued_at is not _UNSET:
        data["issued_at"] = issued_at
    return _event(event_id, "license.allocated", time, data, sequence)


def _unallocated(event_id, time, user, sequence=_UNSET, **ids):
    data = {
        "user_id": user,
        "license_id": ids.get("license_id", 7),
        "course_id": ids.get("course_id", 9),
    }
    return _event(event_id, "license.unallocated", time, data, sequence)


def _edge_messages() -> list[bytes]:
    """Return license events with unusual times, sequences and ids."""
    return [
        # Fractions of a second, with nanoseconds cut to microseconds.
        _allocated("a1", "2024-05-01T12:00:00.123456Z", 1, 5),
        _allocated("a2", "2024-05-01T12:00:00.123456789Z", 2, 6),
        _allocated(
            "a3", "2024-05-01T12:00:00.1Z", 3, issued_at="2024-04-01T00:00:00.5Z"
        ),
        # issued_at differs from time, in another offset and with a fraction.
        _allocated(
            "a4",
            "2024-05-01T12:00:00+05:30",
            4,
            issued_at="2024-03-01T23:59:59.999999-11:00",
        ),
        _allocated("a5", "2024-05-01T12:00:00Z", 5, issued_at=None),
        # Sequences: missing, as a digit string, zero, and the largest allowed.
        _allocated("a6", "2024-05-01T12:00:00Z", 6),
        _allocated("a7", "2024-05-01T12:00:00Z", 7, "123"),
        _allocated("a8", "2024-05-01T12:00:00Z", 8, 0),
        _allocated("a9", "2024-05-01T12:00:00Z", 9, MAX_SEQUENCE - 1),
        _unallocated("u9", "2024-05-01T12:00:00Z", 9, MAX_SEQUENCE - 1),
        # The first and last instants the decoder accepts, and just before 1970.
        _allocated("a10", "1900-01-01T00:00:00Z", 10, issued_at="1900-01-01T00:00:00Z"),
        _allocated(
            "a11",
            "9000-12-31T23:59:59.999999Z",
            11,
            issued_at="9000-12-31T23:59:59.999999Z",
        ),
        _allocated(
            "a12",
            "1969-12-31T23:59:59.999999Z",
            12,
            issued_at="1900-01-01T00:00:00.000001Z",
        ),
        _unallocated("u12", "1970-01-01T00:00:00.000001Z", 12),
        _allocated("a13", "2024-02-29T23:59:59.999999+14:00", 13, issued_at=None),
        # Ids at the top of the BIGINT range.
        _allocated(
            "a14",
            "2024-05-01T12:00:00Z",
            BIG_ID,
            1,
            license_id=BIG_ID,
            course_id=BIG_ID,
        ),
        _unallocated(
            "u14", "2024-05-01T12:00:00Z", BIG_ID, license_id=BIG_ID, course_id=BIG_ID
        ),
    ]


def _tie_messages() -> list[bytes]:
    """Return events of one report row per user that tie on time, sequence or both."""
    time = "2024-06-01T08:00:00.000001Z"
    return [
        # Allocation and unallocation with equal time and sequence.
        _allocated("t1a", time, 101, 4, issued_at="2024-01-01T00:00:00Z"),
        _unallocated("t1u", time, 101, 4),
        # Both without a sequence.
        _unallocated("t2u", time, 102),
        _allocated("t2a", time, 102),
        # Two allocations with equal time and sequence but other issued_at.
        _allocated("t3a", time, 103, 8, issued_at="2024-01-01T00:00:00Z"),
        _allocated("t3b", time, 103, 8, issued_at="2024-02-01T00:00:00Z"),
        _unallocated("t3u", time, 103, 7),
        # Two unallocations without sequence and an allocation with one.
        _unallocated("t4u", time, 104),
        _unallocated("t4v", time, 104),
        _allocated("t4a", time, 104, 3),
        # Only allocations without a sequence at one time.
        _allocated("t5a", time, 105),
        _allocated("t5b", time, 105, issued_at="2020-01-01T00:00:00Z"),
    ]


def _apply(engine, messages: list[bytes]) -> None:
    values = (("test", None, i, value) for i, value in enumerate(messages))
    decoded = decode_values(values)
    assert decoded.dead_letters == [], decoded.dead_letters
    with engine.begin() as conn:
        apply_batch(conn, decoded.events, decoded.dead_letters)


def _expected_license_events(conn) -> set[tuple]:
    """Compute license_events rows from the stored payloads through Python."""
    store = schema.event_store
    rows = conn.execute(select(store.c.payload, store.c.position)).all()
    decoded = [(decode_stored(payload), position) for payload, position in rows]
    return {tuple(row.values()) for row in _license_event_rows(decoded)}


def _live_license_events(conn) -> set[tuple]:
    table = live_projection(conn).license_events
    return {tuple(row) for row in conn.execute(select(table))}


@pytest.mark.parametrize("batch_size", [1, 4, 1000])
def test_edge_events_rebuild_matches_python(engine, batch_size):
    messages = _edge_messages() + _tie_messages()
    _apply(engine, messages)

    # A threshold of one makes the fill, not the switch, read every event.
    result = rebuild_from_store(engine, batch_size=batch_size, switch_threshold=1)

    assert result.events == len(messages)
    with engine.connect() as conn:
        assert _live_license_events(conn) == _expected_license_events(conn)
    assert verify(engine).differences == []


def test_ties_fold_like_python(engine):
    _apply(engine, _tie_messages())
    rebuild_from_store(engine, batch_size=2, switch_threshold=1)

    with engine.connect() as conn:
        table = live_projection(conn).license_allocations
        rows = conn.execute(select(table.c.user_id, table.c.allocated))
        allocated = {user_id: value for user_id, value in rows}
    # At an equal sequence, or when either event lacks one, the unallocation
    # is the later event (users 101, 102 and 104).
    assert allocated[101] is False
    assert allocated[102] is False
    assert allocated[103] is True
    assert allocated[104] is False
    assert allocated[105] is True
    assert verify(engine).differences == []
