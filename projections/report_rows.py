"""Keep the report rows' copies of license, user, course and membership data.

Each row of ``license_allocations`` carries what the report filters and sorts
by (see projections.schema), so a report page is an index range scan of that
table alone. After a batch changes reference data, ``refresh`` recomputes
these columns for the rows that the changed ids can reach, in set-based UPDATE
statements that write only the rows whose values differ. A rebuild fills its
tables without them and calls ``refresh_all`` once at the end.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator

from sqlalchemy import (
    Alias,
    ColumnElement,
    Connection,
    and_,
    exists,
    false,
    func,
    or_,
    select,
    true,
    update,
)

from projections.schema import Projection

# Ids per statement, well below the bind parameter limits of SQLite (32,766)
# and PostgreSQL (65,535).
_CHUNK = 5_000

# The columns this module keeps.
COPIED_COLUMNS = (
    "company_id",
    "listed",
    "suspended",
    "lastname_key",
    "firstname_key",
    "email_key",
    "department_key",
    "license_key",
    "course_key",
)


def refresh(
    conn: Connection,
    projection: Projection,
    user_ids: Collection[int] = (),
    license_ids: Collection[int] = (),
    course_ids: Collection[int] = (),
    department_ids: Collection[int] = (),
) -> None:
    """Recompute the copied columns of every row that the given ids can change.

    These are the rows of the users, licenses and courses named, and the rows
    of every user with a membership of one of the departments.
    """
    membership = projection.memberships
    for chunk in _chunks(department_ids):
        members = select(membership.c.user_id).where(
            membership.c.department_id.in_(chunk)
        )
        _refresh_where(conn, projection, lambda row, m=members: row.c.user_id.in_(m))
    for name, ids in (
        ("user_id", user_ids),
        ("license_id", license_ids),
        ("course_id", course_ids),
    ):
        for chunk in _chunks(ids):
            _refresh_where(
                conn, projection, lambda row, n=name, c=chunk: row.c[n].in_(c)
            )


def refresh_all(conn: Connection, projection: Projection) -> None:
    """Recompute the copied columns of every report row."""
    _refresh_where(conn, projection, lambda row: true())


# Given the table of the rows to recompute, the condition that selects them.
Target = Callable[[Alias], ColumnElement[bool]]


def _refresh_where(conn: Connection, projection: Projection, target: Target) -> None:
    allocation = projection.license_allocations
    computed = _computed(projection, target)
    differs = [
        allocation.c[name].is_distinct_from(computed.c[name]) for name in COPIED_COLUMNS
    ]
    statement = (
        update(allocation)
        .where(
            allocation.c.user_id == computed.c.user_id,
            allocation.c.license_id == computed.c.license_id,
            allocation.c.course_id == computed.c.course_id,
            or_(*differs),
        )
        .values({name: computed.c[name] for name in COPIED_COLUMNS})
    )
    conn.execute(statement)


def _computed(projection: Projection, target: Target):
    """Select the copied columns' new values for the rows that match ``target``.

    The rows are read through an alias, so the UPDATE's own table and the one
    read here stay apart.
    """
    p = projection
    allocation = p.license_allocations.alias("current")
    license_, user, course = p.licenses, p.users, p.courses
    source = (
        allocation.outerjoin(license_, license_.c.license_id == allocation.c.license_id)
        .outerjoin(user, user.c.user_id == allocation.c.user_id)
        .outerjoin(course, course.c.course_id == allocation.c.course_id)
    )
    member = exists().where(
        p.memberships.c.user_id == allocation.c.user_id,
        p.memberships.c.company_id == license_.c.company_id,
        p.memberships.c.assigned == true(),
    )
    listed = and_(
        license_.c.license_id.is_not(None),
        license_.c.deleted == false(),
        license_.c.company_id.is_not(None),
        user.c.user_id.is_not(None),
        user.c.deleted == false(),
        member,
    )
    return (
        select(
            allocation.c.user_id,
            allocation.c.license_id,
            allocation.c.course_id,
            license_.c.company_id.label("company_id"),
            # NULL when the license or user is unknown; stored as false.
            func.coalesce(listed, false()).label("listed"),
            func.coalesce(user.c.suspended, false()).label("suspended"),
            func.lower(user.c.lastname).label("lastname_key"),
            func.lower(user.c.firstname).label("firstname_key"),
            func.lower(user.c.email).label("email_key"),
            _department_key(p, allocation, license_.c.company_id).label(
                "department_key"
            ),
            func.lower(license_.c.name).label("license_key"),
            func.lower(course.c.name).label("course_key"),
        )
        .select_from(source)
        .where(target(allocation))
        .subquery("computed")
    )


def _department_key(
    projection: Projection, allocation: Alias, company_id: ColumnElement
) -> ColumnElement:
    """The smallest lower-cased name of the user's live departments in the company."""
    membership, department = projection.memberships, projection.departments
    joined = membership.join(
        department, department.c.department_id == membership.c.department_id
    )
    return (
        select(func.min(func.lower(department.c.name)))
        .select_from(joined)
        .where(
            membership.c.user_id == allocation.c.user_id,
            membership.c.company_id == company_id,
            membership.c.assigned == true(),
            department.c.company_id == company_id,
            department.c.deleted == false(),
        )
        .scalar_subquery()
    )


def _chunks(ids: Collection[int]) -> Iterator[list[int]]:
    ordered = sorted(ids)
    for start in range(0, len(ordered), _CHUNK):
        yield ordered[start : start + _CHUNK]
