"""The report rows' copied columns and the totals stay equal to a recomputation."""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import Engine, select

from consumer.batch import decode_values
from projections import report_totals, schema
from projections.apply import apply_batch
from projections.registry import live_projection
from projections.report_rows import COPIED_COLUMNS, refresh_all
from tests.history import generate_history
from tests.test_projection import apply, event

T0 = "2024-03-01T09:00:00Z"
T1 = "2024-03-02T09:00:00Z"


def copies(engine: Engine) -> list[tuple]:
    table = schema.license_allocations
    keys = [table.c.user_id, table.c.license_id, table.c.course_id]
    columns = [table.c[name] for name in COPIED_COLUMNS]
    with engine.connect() as conn:
        rows = conn.execute(select(*keys, *columns).order_by(*keys)).all()
    return [tuple(row) for row in rows]


def recomputed(engine: Engine) -> list[tuple]:
    """Recompute every row's copies in a transaction that is rolled back."""
    with engine.connect() as conn:
        transaction = conn.begin()
        refresh_all(conn, live_projection(conn))
        table = schema.license_allocations
        keys = [table.c.user_id, table.c.license_id, table.c.course_id]
        columns = [table.c[name] for name in COPIED_COLUMNS]
        rows = conn.execute(select(*keys, *columns).order_by(*keys)).all()
        transaction.rollback()
    return [tuple(row) for row in rows]


def totals(engine: Engine, recount: bool = False) -> dict[int, tuple[int, int]]:
    """Return the non-zero totals per company, kept or (``recount``) recounted."""
    with engine.connect() as conn:
        transaction = conn.begin()
        projection = live_projection(conn)
        if recount:
            report_totals.recount(conn, projection)
        table = projection.report_totals
        rows = conn.execute(select(table).where(table.c.listed_rows != 0)).all()
        transaction.rollback()
    return {row.company_id: (row.listed_rows, row.suspended_rows) for row in rows}


def assert_totals_kept(engine: Engine) -> None:
    assert totals(engine) == totals(engine, recount=True)


def apply_messages(engine: Engine, messages, batch_size: int) -> None:
    """Apply a history's messages in batches of ``batch_size``, each committed."""
    values = [value for _, value in messages]
    for start in range(0, len(values), batch_size):
        chunk = values[start : start + batch_size]
        decoded = decode_values(
            ("test", 0, start + i, value) for i, value in enumerate(chunk)
        )
        with engine.begin() as conn:
            apply_batch(conn, decoded.events, decoded.dead_letters)


@pytest.mark.parametrize("batch_size", [1, 37])
def test_copies_match_after_a_history(engine, batch_size):
    # Renamed users, departments, courses and licenses, moves, suspensions,
    # deletions and late reference data, delivered out of order.
    history = generate_history(seed=7, companies=3, users=60)
    apply_messages(engine, history.messages, batch_size)

    incremental = copies(engine)
    assert incremental == recomputed(engine)
    assert_totals_kept(engine)
    assert any(suspended for _, suspended in totals(engine).values())
    listed = [row for row in incremental if row[COPIED_COLUMNS.index("listed") + 3]]
    assert 0 < len(listed) < len(incremental)
    department = COPIED_COLUMNS.index("department_key") + 3
    assert any(row[department] is not None for row in listed)


USER = {"user_id": 1, "firstname": "Ana", "lastname": "Silva", "email": "A@X.org"}
SETUP = [
    event("c1", "company.upserted", T0, {"company_id": 1, "name": "Acme"}),
    event(
        "d1",
        "department.upserted",
        T0,
        {"department_id": 5, "company_id": 1, "name": "Sales", "parent_id": None},
    ),
    event("u1", "user.upserted", T0, USER),
    event(
        "m1",
        "user.department.assigned",
        T0,
        {"user_id": 1, "company_id": 1, "department_id": 5},
    ),
    event(
        "l1",
        "license.upserted",
        T0,
        {
            "license_id": 10,
            "company_id": 1,
            "name": "Safety",
            "reusable": False,
            "program": False,
        },
    ),
    event("k1", "course.upserted", T0, {"course_id": 100, "name": "Ladders"}),
    event(
        "a1",
        "license.allocated",
        T0,
        {"user_id": 1, "license_id": 10, "course_id": 100},
    ),
]


def only_row(engine: Engine) -> dict:
    table = schema.license_allocations
    with engine.connect() as conn:
        return dict(conn.execute(select(table)).mappings().one())


def test_copies_of_one_row(engine):
    apply(engine, SETUP)
    row = only_row(engine)
    assert row["company_id"] == 1
    assert row["listed"] is True
    assert row["suspended"] is False
    assert (row["lastname_key"], row["firstname_key"]) == ("silva", "ana")
    assert row["email_key"] == "a@x.org"
    assert row["department_key"] == "sales"
    assert (row["license_key"], row["course_key"]) == ("safety", "ladders")
    assert totals(engine) == {1: (1, 0)}


def test_totals_new_suspended_row(engine):
    suspended = event("u1", "user.upserted", T0, USER | {"suspended": True})
    apply(engine, [suspended if b'"id":"u1"' in item else item for item in SETUP])
    assert only_row(engine)["suspended"] is True
    assert totals(engine) == {1: (1, 1)}


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        pytest.param(
            event("u2", "user.upserted", T1, USER | {"lastname": "Émond"}),
            {"lastname_key": "émond", "listed": True},
            id="user-renamed",
        ),
        pytest.param(
            event("u2", "user.upserted", T1, USER | {"suspended": True}),
            {"suspended": True, "listed": True},
            id="user-suspended",
        ),
        pytest.param(
            event("u2", "user.deleted", T1, {"user_id": 1}),
            {"listed": False, "lastname_key": None, "email_key": None},
            id="user-deleted",
        ),
        pytest.param(
            event(
                "d2",
                "department.upserted",
                T1,
                {"department_id": 5, "company_id": 1, "name": "Ops", "parent_id": None},
            ),
            {"department_key": "ops"},
            id="department-renamed",
        ),
        pytest.param(
            event("d2", "department.deleted", T1, {"department_id": 5}),
            {"department_key": None, "listed": True},
            id="department-deleted",
        ),
        pytest.param(
            event(
                "m2",
                "user.department.unassigned",
                T1,
                {"user_id": 1, "company_id": 1, "department_id": 5},
            ),
            {"listed": False, "department_key": None},
            id="membership-ended",
        ),
        pytest.param(
            event("l2", "license.deleted", T1, {"license_id": 10}),
            {"listed": False, "company_id": None, "license_key": None},
            id="license-deleted",
        ),
        pytest.param(
            event("k2", "course.upserted", T1, {"course_id": 100, "name": "Roofs"}),
            {"course_key": "roofs"},
            id="course-renamed",
        ),
    ],
)
def test_copies_follow_a_change(engine, change, expected):
    apply(engine, SETUP)
    apply(engine, [change])
    row = only_row(engine)
    assert {name: row[name] for name in expected} == expected
    assert copies(engine) == recomputed(engine)
    assert_totals_kept(engine)


def test_copies_after_late_references(engine):
    apply(engine, SETUP[-1:])
    assert only_row(engine)["listed"] is False
    apply(engine, SETUP[:-1])
    assert only_row(engine)["listed"] is True


RENAMED = USER | {"lastname": "Moreau"}


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(event("u2", "user.upserted", T1, RENAMED), id="user-renamed"),
        pytest.param(
            event("u2", "user.deleted", T1, {"user_id": 1}), id="user-deleted"
        ),
        pytest.param(
            event("l2", "license.deleted", T1, {"license_id": 10}), id="license-deleted"
        ),
    ],
)
def test_copies_of_concurrent_new_row(engine, change):
    """A batch creates a row while another, not yet committed, changes its user."""
    apply(engine, SETUP[:-1])
    changed = threading.Event()

    def change_then_wait():
        with engine.connect() as conn, conn.begin():
            decoded = decode_values([("test", 0, 0, change)])
            apply_batch(conn, decoded.events)
            changed.set()
            # The other batch would compute its row's copies meanwhile.
            time.sleep(1)

    changer = threading.Thread(target=change_then_wait)
    changer.start()
    assert changed.wait(30)
    apply(engine, SETUP[-1:])
    changer.join()

    assert copies(engine) == recomputed(engine)
    assert_totals_kept(engine)
