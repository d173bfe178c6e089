"""The projection contract, run on SQLite and PostgreSQL: order-independent effects."""

from __future__ import annotations

import random

import orjson
import pytest
from sqlalchemy import BigInteger, Engine, literal, select

from consumer.batch import decode_values
from consumer.timestamps import parse_rfc3339
from projections import schema
from projections.apply import apply_batch
from projections.ordering import (
    ALLOCATED,
    MAX_SEQUENCE,
    UNALLOCATED,
    order_sequence,
    order_sequence_sql,
)

T0 = "2024-03-01T09:00:00Z"
T1 = "2024-03-02T09:00:00Z"
T2 = "2024-03-03T09:00:00Z"


def event(event_id, type_, time, data, sequence=None) -> bytes:
    document = {
        "specversion": "1.0",
        "id": event_id,
        "source": "/test",
        "type": type_,
        "time": time,
        "data": data,
    }
    if sequence is not None:
        document["sequence"] = sequence
    return orjson.dumps(document)


def allocate(event_id, time, user=1, license_=10, course=100, sequence=None, **extra):
    data = {"user_id": user, "license_id": license_, "course_id": course, **extra}
    return event(event_id, "license.allocated", time, data, sequence)


def unallocate(event_id, time, user=1, license_=10, course=100, sequence=None):
    data = {"user_id": user, "license_id": license_, "course_id": course}
    return event(event_id, "license.unallocated", time, data, sequence)


def apply(engine: Engine, values: list[bytes], batch_size: int | None = None) -> None:
    size = batch_size or max(len(values), 1)
    for start in range(0, len(values), size):
        chunk = values[start : start + size]
        decoded = decode_values(("test", None, i, v) for i, v in enumerate(chunk))
        with engine.begin() as conn:
            apply_batch(conn, decoded.events, decoded.dead_letters)


def snapshot(engine: Engine) -> dict[str, list[tuple]]:
    """All projection rows, without the arrival positions that differ per order."""
    tables = [
        schema.license_allocations,
        schema.license_events,
        schema.companies,
        schema.departments,
        schema.users,
        schema.memberships,
        schema.courses,
        schema.licenses,
    ]
    result = {}
    for table in tables:
        columns = [c for c in table.c if c.name != "version_position"]
        with engine.connect() as conn:
            rows = conn.execute(select(*columns)).all()
        result[table.name] = sorted(tuple(row) for row in rows)
    return result


def allocation_row(engine: Engine, user=1, license_=10, course=100):
    table = schema.license_allocations
    query = select(table).where(
        table.c.user_id == user,
        table.c.license_id == license_,
        table.c.course_id == course,
    )
    with engine.connect() as conn:
        return conn.execute(query).one()


HISTORY = [
    event("c1", "company.upserted", T0, {"company_id": 1, "name": "Acme"}),
    event("c2", "company.upserted", T1, {"company_id": 1, "name": "Acme Ltd"}),
    event(
        "d1",
        "department.upserted",
        T0,
        {"department_id": 5, "company_id": 1, "name": "Sales", "parent_id": None},
    ),
    event("d2", "department.deleted", T2, {"department_id": 5}),
    event(
        "u1",
        "user.upserted",
        T0,
        {"user_id": 1, "firstname": "Ana", "lastname": "Silva", "email": "a@x.org"},
    ),
    event(
        "m1",
        "user.department.assigned",
        T0,
        {"user_id": 1, "company_id": 1, "department_id": 5},
    ),
    event(
        "m2",
        "user.department.unassigned",
        T1,
        {"user_id": 1, "company_id": 1, "department_id": 5},
    ),
    allocate("a1", T0),
    unallocate("x1", T1),
    allocate("a2", T2, issued_at="2024-03-02T10:00:00Z"),
    allocate("a3", T0, course=101, sequence=4),
    unallocate("x2", T0, course=101, sequence=3),
]


def test_projection_independent_of_order(engine, tmp_path):
    apply(engine, HISTORY, batch_size=1)
    expected = snapshot(engine)

    for seed in range(3):
        shuffled = HISTORY[:]
        random.Random(seed).shuffle(shuffled)
        fresh = _fresh_engine(engine, tmp_path, seed)
        apply(fresh, shuffled, batch_size=seed + 2)
        assert snapshot(fresh) == expected


def test_projection_duplicate_ids_count_once(engine):
    apply(engine, HISTORY)
    apply(engine, HISTORY + HISTORY[:3], batch_size=4)
    row = allocation_row(engine)
    assert row.allocations == 2
    assert row.unallocations == 1


@pytest.mark.parametrize("batch_size", [1, 4])
def test_projection_first_and_last_instants(engine, batch_size):
    # Newest first: the earlier instants come in a later batch, or later in
    # the same batch.
    apply(
        engine,
        [
            allocate("a2", T2),
            allocate("a1", T1, issued_at="2024-01-01T00:00:00Z"),
            unallocate("x2", T2),
            unallocate("x1", T1),
        ],
        batch_size=batch_size,
    )
    row = allocation_row(engine)
    assert row.first_allocated_us == parse_rfc3339("2024-01-01T00:00:00Z")
    assert row.last_allocated_us == parse_rfc3339(T2)
    assert row.first_unallocated_us == parse_rfc3339(T1)
    assert row.last_unallocated_us == parse_rfc3339(T2)


def test_projection_latest_event_decides_allocated(engine):
    apply(engine, [allocate("a2", T2), unallocate("x1", T1), allocate("a1", T0)])
    assert allocation_row(engine).allocated is True


def test_projection_unallocation_wins_tie_without_sequence(engine):
    apply(engine, [unallocate("x1", T1), allocate("a1", T1, sequence=9)])
    assert allocation_row(engine).allocated is False


def test_projection_sequence_breaks_tie(engine):
    apply(engine, [allocate("a1", T1, sequence=9), unallocate("x1", T1, sequence=8)])
    assert allocation_row(engine).allocated is True


def test_projection_unallocation_wins_equal_sequence(engine):
    apply(engine, [allocate("a1", T1, sequence=8), unallocate("x1", T1, sequence=8)])
    assert allocation_row(engine).allocated is False


def test_projection_tombstone_beats_older_upsert(engine):
    apply(engine, [HISTORY[3], HISTORY[2]])
    with engine.connect() as conn:
        department = conn.execute(select(schema.departments)).one()
    assert department.deleted is True


def test_projection_latest_upsert_wins(engine):
    apply(engine, [HISTORY[1], HISTORY[0]])
    with engine.connect() as conn:
        company = conn.execute(select(schema.companies)).one()
    assert company.name == "Acme Ltd"


def test_projection_keeps_dead_letters_and_valid_events(engine):
    apply(engine, [b"{", allocate("a1", T0), b"[]"])
    with engine.connect() as conn:
        reasons = conn.execute(select(schema.dead_letters.c.reason)).scalars().all()
        stored = conn.execute(select(schema.event_store.c.event_id)).scalars().all()
    assert len(reasons) == 2
    assert stored == ["a1"]


def _fresh_engine(engine: Engine, tmp_path, seed: int) -> Engine:
    """Another empty, migrated database of the same kind as ``engine``."""
    from sqlalchemy import text

    from projections.migrate import upgrade
    from projections.sql import make_engine

    if engine.dialect.name == "sqlite":
        fresh = make_engine(f"sqlite:///{tmp_path / f'fresh-{seed}.db'}")
    else:
        # A schema per run keeps PostgreSQL databases few.
        fresh = make_engine(
            engine.url.render_as_string(hide_password=False),
            connect_args={"options": f"-csearch_path=fresh_{seed}"},
        )
        with engine.begin() as conn:
            conn.execute(text(f"CREATE SCHEMA fresh_{seed}"))
    upgrade(fresh)
    return fresh


@pytest.mark.parametrize("sequence", [None, 0, 7, MAX_SEQUENCE - 1])
@pytest.mark.parametrize("action", [ALLOCATED, UNALLOCATED])
def test_order_sequence_sql_matches_python(engine, sequence, action):
    expression = order_sequence_sql(
        literal(sequence, BigInteger), literal(action == ALLOCATED)
    )
    with engine.connect() as conn:
        computed = conn.execute(select(expression)).scalar_one()
    assert computed == order_sequence(sequence, action)


def upsert_user(event_id, time, lastname):
    data = {"user_id": 1, "firstname": "Ana", "lastname": lastname, "email": "a@x.org"}
    return event(event_id, "user.upserted", time, data)


def test_projection_repeated_upsert_outranks_older_change(engine):
    """An upsert that repeats a row's values still makes its version the row's."""
    apply(
        engine,
        [
            upsert_user("u1", T0, "Silva"),
            allocate("a1", T0),
            upsert_user("u2", T2, "Silva"),
            upsert_user("u3", T1, "Souza"),
        ],
        batch_size=1,
    )
    assert allocation_row(engine).lastname_key == "silva"
    apply(engine, [upsert_user("u4", "2024-03-04T09:00:00Z", "Costa")])
    assert allocation_row(engine).lastname_key == "costa"
    with engine.connect() as conn:
        assert conn.execute(select(schema.users.c.lastname)).scalar_one() == "Costa"
