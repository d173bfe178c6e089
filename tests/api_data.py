"""A small history of two companies with the cases the report must get right.

Company 1 (Acme) and company 2 (Globex) share user 102 (Carol). The history also
contains a suspended user (103), a deleted user (104), a user of company 2 only
with a license of company 1 (105), a user whose membership was withdrawn (108),
an allocation of an unknown user (999), a deleted license (502), a non-reusable
and expired license (501), a license not yet valid (504), repeated allocations
and unallocations, two allocations at one instant (106) and an unknown course
(999).
"""

from __future__ import annotations

import itertools

import orjson
from sqlalchemy import Engine

from consumer.decoding import decode
from projections.apply import IncomingEvent, apply_batch

ACME = 1
GLOBEX = 2
UNKNOWN_COMPANY = 3

# Department ids.
ACME_HQ = 10
SALES = 11
SALES_EAST = 12
RESEARCH = 13
OLD_UNIT = 14
GLOBEX_MAIN = 20
GLOBEX_OPS = 21

# License ids.
SAFETY = 500
COMPLIANCE = 501
OLD_LICENSE = 502
GLOBEX_TRAINING = 503
FUTURE_SKILLS = 504

# Course ids.
FIRE_SAFETY = 900
ETHICS = 901
FIRST_AID = 902
UNKNOWN_COURSE = 999

# User ids.
ALICE = 100
BOB = 101
CAROL = 102
DAN = 103
EVE = 104
FRANK = 105
GRACE = 106
EMILE = 107
HENRY = 108
UNKNOWN_USER = 999

# (user_id, license_id, course_id) of the rows each report shows by default.
ACME_ROWS = {
    (ALICE, SAFETY, FIRE_SAFETY),
    (ALICE, COMPLIANCE, ETHICS),
    (BOB, SAFETY, FIRE_SAFETY),
    (BOB, SAFETY, UNKNOWN_COURSE),
    (CAROL, SAFETY, ETHICS),
    (GRACE, COMPLIANCE, FIRST_AID),
}
ACME_SUSPENDED_ROW = (DAN, SAFETY, FIRST_AID)
GLOBEX_ROWS = {
    (CAROL, GLOBEX_TRAINING, FIRE_SAFETY),
    (FRANK, GLOBEX_TRAINING, ETHICS),
    (EMILE, GLOBEX_TRAINING, FIRST_AID),
}


class History:
    """Build CloudEvents as JSON bytes with unique ids and rising times."""

    def __init__(self) -> None:
        self.values: list[bytes] = []
        self._ids = itertools.count(1)
        self._minutes = itertools.count(0)

    def add(self, type_: str, data: dict, time: str | None = None) -> None:
        if time is None:
            minute = next(self._minutes)
            time = f"2023-12-01T{minute // 60:02d}:{minute % 60:02d}:00Z"
        document = {
            "specversion": "1.0",
            "id": f"api-test-{next(self._ids)}",
            "source": "/tests/api",
            "type": type_,
            "time": time,
            "data": data,
        }
        self.values.append(orjson.dumps(document))

    def company(self, company_id: int, name: str) -> None:
        self.add("company.upserted", {"company_id": company_id, "name": name})

    def department(self, department_id, company_id, name, parent_id=None) -> None:
        data = {
            "department_id": department_id,
            "company_id": company_id,
            "name": name,
            "parent_id": parent_id,
        }
        self.add("department.upserted", data)

    def user(self, user_id, firstname, lastname, email, suspended=False) -> None:
        data = {
            "user_id": user_id,
            "firstname": firstname,
            "lastname": lastname,
            "email": email,
            "suspended": suspended,
        }
        self.add("user.upserted", data)

    def member(self, user_id, company_id, department_id, assigned=True) -> None:
        kind = "assigned" if assigned else "unassigned"
        data = {
            "user_id": user_id,
            "company_id": company_id,
            "department_id": department_id,
        }
        self.add(f"user.department.{kind}", data)

    def license(self, license_id, company_id, name, reusable=True, **dates) -> None:
        data = {
            "license_id": license_id,
            "company_id": company_id,
            "name": name,
            "reusable": reusable,
            **dates,
        }
        self.add("license.upserted", data)

    def allocate(self, user_id, license_id, course_id, issued_at, time=None) -> None:
        data = {
            "user_id": user_id,
            "license_id": license_id,
            "course_id": course_id,
            "issued_at": issued_at,
        }
        self.add("license.allocated", data, time or issued_at)

    def unallocate(self, user_id, license_id, course_id, time) -> None:
        data = {"user_id": user_id, "license_id": license_id, "course_id": course_id}
        self.add("license.unallocated", data, time)


def build_history() -> History:
    """Return the events of the module docstring's history."""
    history = History()
    _add_organisation(history)
    _add_users(history)
    _add_licenses(history)
    _add_allocations(history)
    return history


def _add_organisation(history: History) -> None:
    history.company(ACME, "Acme")
    history.company(GLOBEX, "Globex")
    history.department(ACME_HQ, ACME, "Acme HQ")
    history.department(SALES, ACME, "Sales", ACME_HQ)
    history.department(SALES_EAST, ACME, "Sales East", SALES)
    history.department(RESEARCH, ACME, "Research", ACME_HQ)
    history.department(OLD_UNIT, ACME, "Old Unit", ACME_HQ)
    history.add("department.deleted", {"department_id": OLD_UNIT})
    history.department(GLOBEX_MAIN, GLOBEX, "Globex Main")
    history.department(GLOBEX_OPS, GLOBEX, "Globex Ops", GLOBEX_MAIN)


def _add_users(history: History) -> None:
    history.user(ALICE, "Alice", "Able", "alice.able@example.com")
    history.user(BOB, "bob", "baker", "bob.baker@example.com")
    history.user(CAROL, "Carol", "Clark", "carol.clark@example.com")
    history.user(DAN, "Dan", "Drake", "dan.drake@example.com", suspended=True)
    history.user(EVE, "Eve", "Evans", "eve.evans@example.com")
    history.add("user.deleted", {"user_id": EVE})
    history.user(FRANK, "Frank", "Fox", "frank.fox@example.com")
    history.user(GRACE, "Grace", "Hopper", "grace_hopper@example.com")
    history.user(EMILE, "Émile", "Zola", "emile.zola@example.com")
    history.user(HENRY, "Henry", "Hill", "henry.hill@example.com")

    history.member(ALICE, ACME, SALES_EAST)
    history.member(ALICE, ACME, RESEARCH)
    history.member(BOB, ACME, SALES)
    history.member(CAROL, ACME, ACME_HQ)
    history.member(CAROL, GLOBEX, GLOBEX_OPS)
    history.member(DAN, ACME, RESEARCH)
    history.member(EVE, ACME, SALES)
    history.member(FRANK, GLOBEX, GLOBEX_MAIN)
    history.member(GRACE, ACME, SALES)
    history.member(GRACE, ACME, OLD_UNIT)
    history.member(EMILE, GLOBEX, GLOBEX_MAIN)
    history.member(HENRY, ACME, SALES)
    history.member(HENRY, ACME, SALES, assigned=False)


def _add_licenses(history: History) -> None:
    history.license(SAFETY, ACME, "Safety 101", start_date="2020-01-01T00:00:00Z")
    history.license(
        COMPLIANCE,
        ACME,
        "Compliance",
        reusable=False,
        expiry_date="2020-06-30T00:00:00Z",
    )
    history.license(OLD_LICENSE, ACME, "Old License")
    history.add("license.deleted", {"license_id": OLD_LICENSE})
    history.license(GLOBEX_TRAINING, GLOBEX, "Globex Training")
    history.license(
        FUTURE_SKILLS,
        ACME,
        "Future Skills",
        start_date="2999-01-01T00:00:00Z",
        expiry_date="2999-12-31T00:00:00Z",
    )
    history.add("course.upserted", {"course_id": FIRE_SAFETY, "name": "Fire Safety"})
    history.add("course.upserted", {"course_id": ETHICS, "name": "Ethics"})
    history.add("course.upserted", {"course_id": FIRST_AID, "name": "First Aid"})


def _add_allocations(history: History) -> None:
    history.allocate(ALICE, SAFETY, FIRE_SAFETY, "2024-01-10T09:00:00Z")
    history.unallocate(ALICE, SAFETY, FIRE_SAFETY, "2024-02-01T10:00:00Z")
    history.allocate(ALICE, SAFETY, FIRE_SAFETY, "2024-03-05T12:00:00Z")
    history.allocate(ALICE, COMPLIANCE, ETHICS, "2024-01-15T08:00:00Z")
    # 2024-03-09 22:30 in New York.
    history.allocate(BOB, SAFETY, FIRE_SAFETY, "2024-03-10T03:30:00Z")
    history.allocate(BOB, SAFETY, UNKNOWN_COURSE, "2024-04-01T12:00:00Z")
    history.allocate(CAROL, SAFETY, ETHICS, "2024-02-20T12:00:00Z")
    history.unallocate(CAROL, SAFETY, ETHICS, "2024-02-25T12:00:00Z")
    history.allocate(CAROL, GLOBEX_TRAINING, FIRE_SAFETY, "2024-02-21T12:00:00Z")
    history.allocate(DAN, SAFETY, FIRST_AID, "2024-01-05T12:00:00Z")
    history.allocate(EVE, SAFETY, FIRE_SAFETY, "2024-01-06T12:00:00Z")
    history.allocate(FRANK, SAFETY, FIRE_SAFETY, "2024-01-07T12:00:00Z")
    history.allocate(FRANK, GLOBEX_TRAINING, ETHICS, "2024-01-08T12:00:00Z")
    history.allocate(GRACE, OLD_LICENSE, FIRE_SAFETY, "2024-01-09T12:00:00Z")
    history.allocate(GRACE, COMPLIANCE, FIRST_AID, "2024-05-01T12:00:00Z")
    history.unallocate(GRACE, COMPLIANCE, FIRST_AID, "2024-05-02T12:00:00Z")
    # A second allocation issued at the same instant as the first.
    history.allocate(
        GRACE,
        COMPLIANCE,
        FIRST_AID,
        "2024-05-01T12:00:00Z",
        time="2024-05-03T12:00:00Z",
    )
    history.allocate(EMILE, GLOBEX_TRAINING, FIRST_AID, "2024-02-22T12:00:00Z")
    history.allocate(HENRY, SAFETY, FIRE_SAFETY, "2024-01-11T12:00:00Z")
    history.allocate(UNKNOWN_USER, SAFETY, FIRE_SAFETY, "2024-01-12T12:00:00Z")


def load_history(engine: Engine, history: History | None = None) -> None:
    """Decode and apply the history in one batch."""
    history = history or build_history()
    incoming = [IncomingEvent(decode(value)) for value in history.values]
    with engine.begin() as conn:
        apply_batch(conn, incoming)
