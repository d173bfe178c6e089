"""SQL of the license allocations report: visibility, filters, order and page keys.

The correlated subqueries refer to the ``license_allocations`` table of the
statement that contains them. When the company id is an api.auth.CompanyAccess
limited to a department subtree, every query built here shows only users
assigned to a department of that subtree, and only those departments.

``page_template`` builds the page query once per shape of request (which
filters are set, the sort, the order, whether a cursor is given) with bound
parameters in place of the request's values, and ``page_parameters`` returns
those values. Building the nested statement and generating its SQLAlchemy
cache key took 1 to 3 ms of Python per request, measured in one process on
the small data set of bench/report.py (2 shared cores).
"""

from __future__ import annotations

import functools
from dataclasses import replace
from typing import Any, NamedTuple

from sqlalchemy import (
    ColumnElement,
    FromClause,
    Integer,
    Select,
    Subquery,
    and_,
    bindparam,
    case,
    exists,
    false,
    func,
    or_,
    select,
    true,
    tuple_,
    union_all,
)

from api.auth import CompanyAccess, department_limit
from api.database import JsonArrayAgg, UnicodeLower
from api.params import InstantRange, ReportQuery, RowKey
from projections.ordering import ALLOCATED, UNALLOCATED
from projections.schema import Projection

_LIKE_ESCAPE = "\\"


class ReportSql:
    """The report's SQL for one company over one projection version's tables.

    With ``bound``, the statements contain a bound parameter, named as in
    ``page_parameters``, wherever they would contain a value of the company
    or the request, so they serve every request of the same shape. The
    values then only tell which filters are set.
    """

    def __init__(
        self, tables: Projection, company_id: int, bound: bool = False
    ) -> None:
        self.tables = tables
        self.bound = bound
        self.company_id = self.value("company_id", company_id)
        # The department subtree that the request's credential is limited to.
        self.scope_department_id = department_limit(company_id)
        self._scope_subtree = None

    def value(self, name: str, value: Any, type_: Any = None) -> Any:
        """Return ``value``, or with ``bound`` the required parameter ``name``."""
        if self.bound:
            return bindparam(name, type_=type_, required=True)
        return value

    def scope_subtree(self):
        """Return the CTE of the credential's department subtree, or None.

        One CTE object serves every part of a statement, so the database
        evaluates the subtree once.
        """
        if self.scope_department_id is None:
            return None
        if self._scope_subtree is None:
            self._scope_subtree = self.department_subtree(
                self.value("scope_department_id", self.scope_department_id),
                "scope_subtree",
            )
        return self._scope_subtree

    def _in_scope(self, department_id_column) -> list[ColumnElement[bool]]:
        """Return the condition that a department lies in the credential's scope."""
        scope = self.scope_subtree()
        if scope is None:
            return []
        return [department_id_column.in_(select(scope.c.department_id))]

    def visible(
        self, include_suspended: bool, department_id: int | None = None
    ) -> tuple[FromClause, list[ColumnElement[bool]]]:
        """Return the table and conditions of the company's report rows.

        A row is visible when its license is the company's and not deleted, and
        its user is known, not deleted, not suspended (unless included) and an
        assigned member of the company: the projection keeps this in the
        row's ``listed`` and ``suspended`` columns. The course may be unknown.
        With ``department_id``, the user must also be assigned to that
        department or one below it.
        """
        allocation = self.tables.license_allocations
        conditions = [
            allocation.c.company_id == self.company_id,
            allocation.c.listed == true(),
        ]
        if not include_suspended:
            conditions.append(allocation.c.suspended == false())
        members = self._members(department_id)
        if members is not None:
            # IS TRUE keeps PostgreSQL from turning the IN into a join. It
            # estimated a few members where a large department has thousands,
            # and looked up each member's rows before sorting them. As a hashed
            # filter of the company's rows in index order, the cost stays
            # bounded by the company's size.
            conditions.append(allocation.c.user_id.in_(members).is_(true()))
        return allocation, conditions

    def _members(self, department_id: int | None) -> Select | None:
        """Select the users assigned within the department or the scope, or None.

        None when neither ``department_id`` nor a department scope limits the
        rows, since ``listed`` already requires membership of the company.
        """
        if department_id is None and self.scope_department_id is None:
            return None
        membership = self.tables.memberships
        members = select(membership.c.user_id).where(
            membership.c.company_id == self.company_id,
            membership.c.assigned == true(),
            *self._in_scope(membership.c.department_id),
        )
        if department_id is not None:
            subtree = self.department_subtree(
                self.value("department_id", department_id)
            )
            members = members.where(
                membership.c.department_id.in_(select(subtree.c.department_id))
            )
        return members

    def filters(self, query: ReportQuery) -> list[ColumnElement[bool]]:
        """Return the conditions of the request's filters but department_id.

        ``visible`` applies department_id, because it changes the joins.
        """
        allocation = self.tables.license_allocations
        conditions: list[ColumnElement[bool]] = []
        if query.license_id is not None:
            license_id = self.value("license_id", query.license_id)
            conditions.append(allocation.c.license_id == license_id)
        if query.course_id is not None:
            course_id = self.value("course_id", query.course_id)
            conditions.append(allocation.c.course_id == course_id)
        if query.allocated is not None:
            conditions.append(allocation.c.allocated == query.allocated)
        conditions.extend(self._name_filters(query))
        if query.allocated_range is not None:
            allocated = query.allocated_range
            conditions.append(self._has_event_in(ALLOCATED, allocated, "allocated"))
        if query.unallocated_range is not None:
            unallocated = self._has_event_in(
                UNALLOCATED, query.unallocated_range, "unallocated"
            )
            conditions.append(unallocated)
        return conditions

    def department_subtree(self, department_id, name: str = "department_subtree"):
        """Return a recursive CTE of the department and the live departments below it.

        UNION drops rows already found, so a cycle of parent ids still ends.
        CTEs of one statement need distinct names.
        """
        department = self.tables.departments
        top = (
            select(department.c.department_id)
            .where(
                department.c.department_id == department_id,
                department.c.company_id == self.company_id,
                department.c.deleted == false(),
            )
            .cte(name, recursive=True)
        )
        child = department.alias(f"{name}_child")
        below = (
            select(child.c.department_id)
            .join(top, child.c.parent_id == top.c.department_id)
            .where(child.c.company_id == self.company_id, child.c.deleted == false())
        )
        return top.union(below)

    def _name_filters(self, query: ReportQuery) -> list[ColumnElement[bool]]:
        """Match the lower-cased copies of the user's names and email."""
        row = self.tables.license_allocations.c
        keys = {
            "first_initial": row.firstname_key,
            "last_initial": row.lastname_key,
            "firstname": row.firstname_key,
            "lastname": row.lastname_key,
            "email": row.email_key,
        }
        patterns = _like_patterns(query)
        conditions = []
        for name, key in keys.items():
            if patterns[name] is not None:
                conditions.append(_like(key, self.value(name, patterns[name])))
        if query.search is not None:
            pattern = self.value("search", patterns["search"])
            full_name = row.firstname_key + " " + row.lastname_key
            columns = (row.firstname_key, row.lastname_key, full_name, row.email_key)
            conditions.append(or_(*(_like(column, pattern) for column in columns)))
        return conditions

    def _has_event_in(self, action: int, instants: InstantRange, prefix: str):
        """Return the condition that the row has an ``action`` event in ``instants``.

        The row's earliest and latest instants of that action decide it when
        either lies in the range, or when the range is open at one end. Only
        a row whose instants lie on both sides of a closed range has its
        events read. ``prefix`` names the bound parameters of the range's ends.
        """
        row = self.tables.license_allocations.c
        first, last = (
            (row.first_allocated_us, row.last_allocated_us)
            if action == ALLOCATED
            else (row.first_unallocated_us, row.last_unallocated_us)
        )
        start = end = None
        if instants.start_us is not None:
            start = self.value(f"{prefix}_start_us", instants.start_us)
        if instants.end_us is not None:
            end = self.value(f"{prefix}_end_us", instants.end_us)

        def within(column) -> ColumnElement[bool]:
            limits = [] if start is None else [column >= start]
            return and_(*limits, *([] if end is None else [column < end]))

        if start is None or end is None:
            return or_(within(first), within(last))
        event = self.tables.license_events
        between = exists().where(
            *self._same_row(event), event.c.action == action, within(event.c.at_us)
        )
        straddles = and_(first < start, last >= end, between)
        return or_(within(first), within(last), straddles)

    def _same_row(self, table) -> list[ColumnElement[bool]]:
        allocation = self.tables.license_allocations
        return [
            table.c.user_id == allocation.c.user_id,
            table.c.license_id == allocation.c.license_id,
            table.c.course_id == allocation.c.course_id,
        ]

    def event_times(self, action: int):
        """Return a scalar subquery: the JSON array of the row's ``action`` instants."""
        event = self.tables.license_events
        return (
            select(JsonArrayAgg(event.c.at_us))
            .where(*self._same_row(event), event.c.action == action)
            .scalar_subquery()
        )

    def department_names(self):
        """Return a scalar subquery: the JSON array of the user's department names."""
        membership, joined, conditions = self._listed_departments()
        return (
            select(JsonArrayAgg(self.tables.departments.c.name))
            .select_from(joined)
            .where(
                membership.c.user_id == self.tables.license_allocations.c.user_id,
                *conditions,
            )
            .scalar_subquery()
        )

    def _listed_departments(self) -> tuple[Any, FromClause, list[ColumnElement]]:
        """Return the memberships, their join to departments, and the conditions.

        The conditions select the user's assigned memberships of the company in
        live, named departments within the credential's scope.
        """
        membership, department = self.tables.memberships, self.tables.departments
        joined = membership.join(
            department, department.c.department_id == membership.c.department_id
        )
        conditions = [
            membership.c.company_id == self.company_id,
            membership.c.assigned == true(),
            department.c.company_id == self.company_id,
            department.c.deleted == false(),
            department.c.name.is_not(None),
            *self._in_scope(department.c.department_id),
        ]
        return membership, joined, conditions

    def page(self, query: ReportQuery, source: FromClause, conditions: list) -> Select:
        """Select the rows of the page that ``query`` requests, in its order.

        ``source`` and ``conditions`` are those of ``visible`` and ``filters``.
        """
        keys = self.page_keys(query, source, conditions)
        ordering = page_order(keys.c, query.descending)
        return self._page_columns(keys).order_by(*ordering)

    def _page_columns(self, keys: Subquery) -> Select:
        """Select the columns of the page's rows, with departments and dates as JSON."""
        allocation = self.tables.license_allocations
        source = keys.join(
            allocation,
            (allocation.c.user_id == keys.c.user_id)
            & (allocation.c.license_id == keys.c.license_id)
            & (allocation.c.course_id == keys.c.course_id),
        )
        columns = self._row_columns(allocation, self.department_names())
        return self._with_references(select(*columns), source, allocation)

    def _with_references(self, rows: Select, source: FromClause, allocation) -> Select:
        """Join the license, user and course of each report row to ``source``."""
        t = self.tables
        return rows.select_from(
            source.join(t.licenses, t.licenses.c.license_id == allocation.c.license_id)
            .join(t.users, t.users.c.user_id == allocation.c.user_id)
            .outerjoin(t.courses, t.courses.c.course_id == allocation.c.course_id)
        )

    def _row_columns(self, allocation, departments) -> list[ColumnElement]:
        """Return the columns of a report row, with departments and dates as JSON."""
        t = self.tables
        user = t.users
        return [
            allocation.c.user_id,
            user.c.firstname,
            user.c.lastname,
            user.c.email,
            departments.label("departments"),
            allocation.c.license_id,
            t.licenses.c.name.label("license_name"),
            t.licenses.c.reusable,
            allocation.c.course_id,
            t.courses.c.name.label("course_name"),
            allocation.c.allocated,
            self.event_times(ALLOCATED).label("dates_allocated"),
            self.event_times(UNALLOCATED).label("dates_unallocated"),
            allocation.c.allocations,
            allocation.c.unallocations,
        ]

    def every_row(
        self, query: ReportQuery, source: FromClause, conditions: list
    ) -> Select:
        """Select every row that ``query`` matches, in its order, for a download.

        ``source`` and ``conditions`` are those of ``visible`` and ``filters``.
        Each user's department names come from one aggregate per member of the
        company, joined by user, where a page runs a subquery per row. COPY of
        the 101,250 rows of the large company of bench/download.py took 1.3 to
        1.4 s this way instead of 1.8 to 1.9 s (PostgreSQL 15, 2 cores).
        """
        allocation = self.tables.license_allocations
        sort_value, source, _ = self._sort_value(query.sort, source)
        names = self._department_lists()
        source = source.outerjoin(names, names.c.user_id == allocation.c.user_id)
        columns = self._row_columns(allocation, names.c.names)
        keys = _OrderKeys(
            sort_value,
            allocation.c.lastname_key,
            allocation.c.firstname_key,
            allocation.c.user_id,
            allocation.c.license_id,
            allocation.c.course_id,
        )
        return (
            self._with_references(select(*columns), source, allocation)
            .where(*conditions)
            .order_by(*page_order(keys, query.descending))
        )

    def _department_lists(self) -> Subquery:
        """Select, per user, the JSON array that ``department_names`` returns."""
        membership, joined, conditions = self._listed_departments()
        names = JsonArrayAgg(self.tables.departments.c.name).label("names")
        return (
            select(membership.c.user_id, names)
            .select_from(joined)
            .where(*conditions)
            .group_by(membership.c.user_id)
            .subquery("department_lists")
        )

    def page_keys(
        self, query: ReportQuery, source: FromClause, conditions: list
    ) -> Subquery:
        """Select the primary keys and sort values of the requested page's rows.

        The page's other columns are joined to this subquery afterwards, so
        their correlated subqueries run for the page's rows only, not for the
        rows that OFFSET skips.

        Most sort keys have an index over the company's listed rows (see
        projections.schema.SORT_INDEX_COLUMNS), which returns rows in the key's
        order in either direction. Since NULL comes last in both, a key that
        can be NULL is read in two parts, the rows with a value and the rows
        without, each cut at the page's end, and the page is taken from their
        union.
        """
        allocation = self.tables.license_allocations
        sort_value, source, nullable = self._sort_value(query.sort, source)
        columns = [
            allocation.c.user_id,
            allocation.c.license_id,
            allocation.c.course_id,
            sort_value.label("sort_value"),
            allocation.c.lastname_key,
            allocation.c.firstname_key,
        ]
        rows = select(*columns).select_from(source).where(*conditions)
        anchor = None if query.after is None else self.anchor(query.after, query.sort)
        if nullable:
            return _two_part_page(self, rows, sort_value, anchor, query)
        if anchor is not None:
            rows = rows.where(_after(rows.selected_columns, anchor, query))
        ordered = rows.order_by(*_index_order(rows.selected_columns, query.descending))
        page = ordered.limit(self._page_size(query)).offset(self._offset(query))
        return page.subquery("page_keys")

    def anchor(self, key: RowKey, sort: str) -> dict[str, ColumnElement]:
        """Return scalar subqueries of the order values of the row ``key`` names.

        ``anchor_check`` checks that the row is one this report may show.
        """
        row = self.tables.license_allocations.alias("anchor")
        sort_value, _, _ = self._sort_value_of(row, sort)
        values = {
            "sort_value": sort_value,
            "lastname_key": row.c.lastname_key,
            "firstname_key": row.c.firstname_key,
            "user_id": row.c.user_id,
            "license_id": row.c.license_id,
            "course_id": row.c.course_id,
        }
        where = self._key_of(row, key)
        return {
            name: select(value).where(*where).scalar_subquery()
            for name, value in values.items()
        }

    def anchor_check(self, key: RowKey) -> ColumnElement[bool]:
        """Return a labelled EXISTS: the row ``key`` names is one this report may show.

        That is a listed row of the company and, for a credential limited to
        a department subtree, of a user assigned within it.
        """
        row = self.tables.license_allocations.alias("anchor_check")
        conditions = [
            *self._key_of(row, key),
            row.c.company_id == self.company_id,
            row.c.listed == true(),
        ]
        # A credential limited to a department subtree may not continue after
        # a row it cannot read, which would tell where that row sorts.
        members = self._members(None)
        if members is not None:
            conditions.append(row.c.user_id.in_(members))
        return exists().where(*conditions).label("cursor_known")

    def _key_of(self, row: FromClause, key: RowKey) -> list[ColumnElement[bool]]:
        return [
            row.c.user_id == self.value("after_user_id", key.user_id),
            row.c.license_id == self.value("after_license_id", key.license_id),
            row.c.course_id == self.value("after_course_id", key.course_id),
        ]

    def _page_size(self, query: ReportQuery):
        return self.value("per_page", query.per_page, Integer)

    def _offset(self, query: ReportQuery):
        return self.value("offset", query.offset, Integer)

    def _sort_value(
        self, sort: str, source: FromClause
    ) -> tuple[ColumnElement, FromClause, bool]:
        """Return the sort key's expression, the source it needs, and if it can be NULL.

        On listed rows the user's names and email and the license's name are
        never NULL, because the events that set them require them.
        """
        value, join, nullable = self._sort_value_of(
            self.tables.license_allocations, sort
        )
        if join is not None:
            source = source.outerjoin(*join)
        return value, source, nullable

    def _sort_value_of(
        self, row: FromClause, sort: str
    ) -> tuple[ColumnElement, tuple | None, bool]:
        """Return the sort value of ``row``, a join it needs, and if it can be NULL."""
        match sort:
            case "lastname" | "firstname" | "email" | "license":
                return row.c[f"{sort}_key"], None, False
            case "department" if self.scope_department_id is not None:
                first = self._first_department_names()
                if row is not self.tables.license_allocations:
                    # The anchor's value, looked up by its user.
                    value = (
                        select(first.c.name_key)
                        .where(first.c.user_id == row.c.user_id)
                        .scalar_subquery()
                    )
                    return value, None, True
                return first.c.name_key, (first, first.c.user_id == row.c.user_id), True
            case "department" | "course":
                return row.c[f"{sort}_key"], None, True
            case "allocated" | "allocations" | "unallocations":
                return row.c[sort], None, False
            case "last_allocated" | "last_unallocated":
                return row.c[f"{sort}_us"], None, True
        raise ValueError(f"unknown sort key {sort!r}")

    def _first_department_names(self) -> Subquery:
        """Return, per user, the smallest lower-cased name of their departments.

        Only the live departments within the credential's scope count, so this
        differs from the projection's ``department_key``.
        """
        membership, department = self.tables.memberships, self.tables.departments
        joined = membership.join(
            department, department.c.department_id == membership.c.department_id
        )
        name_key = func.min(UnicodeLower(department.c.name)).label("name_key")
        return (
            select(membership.c.user_id, name_key)
            .select_from(joined)
            .where(
                membership.c.company_id == self.company_id,
                membership.c.assigned == true(),
                department.c.company_id == self.company_id,
                department.c.deleted == false(),
                *self._in_scope(department.c.department_id),
            )
            .group_by(membership.c.user_id)
            .subquery("first_departments")
        )


class _OrderKeys(NamedTuple):
    """The columns that ``page_order`` orders by."""

    sort_value: ColumnElement
    lastname_key: ColumnElement
    firstname_key: ColumnElement
    user_id: ColumnElement
    license_id: ColumnElement
    course_id: ColumnElement


def page_template(tables: Projection, company_id: int, query: ReportQuery) -> Select:
    """Return the page query of ``query``'s shape, with bound parameters.

    Execute it with ``page_parameters(company_id, query)``. Every parameter is
    required, so a value left out raises instead of reading another request's.
    """
    scoped = department_limit(company_id) is not None
    return _page_template(tables, scoped, request_shape(query))


# One entry per shape (see request_shape) and projection version. A shape evicted
# from the cache is built again when requested.
@functools.lru_cache(maxsize=512)
def _page_template(tables: Projection, scoped: bool, shape: ReportQuery) -> Select:
    # Only whether a scope is set shapes the statement, because its
    # department is a parameter.
    company = CompanyAccess(0, 0 if scoped else None)
    report = ReportSql(tables, company, bound=True)
    source, conditions = report.visible(shape.include_suspended, shape.department_id)
    conditions.extend(report.filters(shape))
    return report.page(shape, source, conditions)


def request_shape(query: ReportQuery) -> ReportQuery:
    """Return ``query`` with placeholders for the values that parameters carry.

    What remains decides the statement's structure: which ids, texts, ranges
    and cursor are set, ``allocated``, ``include_suspended``, the sort and the
    order. The builders test the values that became placeholders with ``is
    not None`` only.
    """

    def mark(value: Any, placeholder: Any) -> Any:
        return None if value is None else placeholder

    def mark_range(instants: InstantRange | None) -> InstantRange | None:
        if instants is None:
            return None
        return InstantRange(mark(instants.start_us, 0), mark(instants.end_us, 0))

    return replace(
        query,
        license_id=mark(query.license_id, 0),
        course_id=mark(query.course_id, 0),
        department_id=mark(query.department_id, 0),
        first_initial=mark(query.first_initial, ""),
        last_initial=mark(query.last_initial, ""),
        search=mark(query.search, ""),
        firstname=mark(query.firstname, ""),
        lastname=mark(query.lastname, ""),
        email=mark(query.email, ""),
        allocated_range=mark_range(query.allocated_range),
        unallocated_range=mark_range(query.unallocated_range),
        page=1,
        per_page=1,
        after=mark(query.after, RowKey(0, 0, 0)),
        as_of_us=None,
    )


def page_parameters(company_id: int, query: ReportQuery) -> dict[str, Any]:
    """Return the values of ``page_template``'s parameters, by name.

    It includes values of parameters that the template of ``query`` lacks;
    SQLAlchemy ignores those.
    """
    no_range = InstantRange(None, None)
    allocated = query.allocated_range or no_range
    unallocated = query.unallocated_range or no_range
    after = query.after
    return {
        "company_id": int(company_id),
        "scope_department_id": department_limit(company_id),
        "department_id": query.department_id,
        "license_id": query.license_id,
        "course_id": query.course_id,
        **_like_patterns(query),
        "allocated_start_us": allocated.start_us,
        "allocated_end_us": allocated.end_us,
        "unallocated_start_us": unallocated.start_us,
        "unallocated_end_us": unallocated.end_us,
        "after_user_id": None if after is None else after.user_id,
        "after_license_id": None if after is None else after.license_id,
        "after_course_id": None if after is None else after.course_id,
        "per_page": query.per_page,
        "offset": query.offset,
        "page_end": query.offset + query.per_page,
    }


def page_order(keys, descending: bool) -> list[ColumnElement]:
    """Return the ORDER BY clauses over the columns of ``page_keys``.

    The sort value comes first, then the lower-cased last and first names, then
    the primary key, which makes the order total, so pages never overlap.
    NULL values sort last in both directions, on both databases. The
    tie-breakers always ascend.
    """
    return [
        *nulls_last(keys.sort_value, descending),
        *nulls_last(keys.lastname_key),
        *nulls_last(keys.firstname_key),
        keys.user_id.asc(),
        keys.license_id.asc(),
        keys.course_id.asc(),
    ]


def _two_part_page(
    report: ReportSql,
    rows: Select,
    sort_value: ColumnElement,
    anchor: dict[str, ColumnElement] | None,
    query: ReportQuery,
) -> Subquery:
    """Select the page from the rows with a sort value, then those without.

    Each part is ordered and cut at the page's end on its own, so each can be
    read from an index, and NULL comes last in either direction.
    """
    end = report.value("page_end", query.offset + query.per_page, Integer)
    present = rows.where(sort_value.is_not(None))
    missing = rows.where(sort_value.is_(None))
    if anchor is not None:
        # After a row with a value: later rows with a value, then every row
        # without. After a row without: later rows without a value.
        present = present.where(
            anchor["sort_value"].is_not(None),
            _after(present.selected_columns, anchor, query),
        )
        missing = missing.where(
            or_(
                anchor["sort_value"].is_not(None),
                _after_ties(missing.selected_columns, anchor),
            )
        )
    present = present.order_by(
        *_index_order(present.selected_columns, query.descending)
    ).limit(end)
    missing = missing.order_by(
        *_index_order(missing.selected_columns, query.descending)[1:]
    ).limit(end)
    both = union_all(
        present.subquery("present").select(),
        missing.subquery("missing").select(),
    ).subquery("both_parts")
    page = select(both).order_by(*page_order(both.c, query.descending))
    page = page.limit(report._page_size(query)).offset(report._offset(query))
    return page.subquery("page_keys")


def _index_order(keys, descending: bool) -> list[ColumnElement]:
    """Return ORDER BY clauses of non-NULL sort values that an index can serve.

    The same order as ``page_order``: the sort value in the requested
    direction, then the names and the primary key ascending.
    """
    sort_value = keys.sort_value.desc() if descending else keys.sort_value.asc()
    return [
        sort_value,
        keys.lastname_key.asc(),
        keys.firstname_key.asc(),
        keys.user_id.asc(),
        keys.license_id.asc(),
        keys.course_id.asc(),
    ]


_TIES = ("lastname_key", "firstname_key", "user_id", "license_id", "course_id")


def _after_ties(keys, anchor: dict[str, ColumnElement]) -> ColumnElement[bool]:
    """Return the condition that a row's tie-breakers come after the anchor's.

    ``keys`` are the selected columns of ``page_keys``, ``anchor`` the values
    that ``ReportSql.anchor`` returns, both looked up by name.
    """
    return tuple_(*(keys[name] for name in _TIES)) > tuple_(
        *(anchor[name] for name in _TIES)
    )


def _after(
    keys, anchor: dict[str, ColumnElement], query: ReportQuery
) -> ColumnElement[bool]:
    """Return the condition that a row with a sort value comes after the anchor.

    The order is the request's. The bound on the sort value alone comes first,
    so that an index on it starts its scan at the anchor.
    """
    sort_value, anchor_value = keys["sort_value"], anchor["sort_value"]
    if query.descending:
        return and_(
            sort_value <= anchor_value,
            or_(sort_value < anchor_value, _after_ties(keys, anchor)),
        )
    return and_(
        sort_value >= anchor_value,
        or_(sort_value > anchor_value, _after_ties(keys, anchor)),
    )


def nulls_last(
    expression: ColumnElement, descending: bool = False
) -> list[ColumnElement]:
    """Return ORDER BY clauses that put NULL after every value in either direction."""
    # SQLite puts NULL first in ascending order and PostgreSQL last, so a NULL
    # flag sorts first and makes both databases agree.
    null_flag = case((expression.is_(None), 1), else_=0)
    direction = expression.desc() if descending else expression.asc()
    return [null_flag.asc(), direction]


def _like_patterns(query: ReportQuery) -> dict[str, str | None]:
    """Return the LIKE pattern of each name filter of ``query``, or None if unset.

    The patterns match the lower-cased copies of the names and email, so they
    ignore case: the initials match a prefix and the other filters any part.
    """
    return {
        "first_initial": _starts_with(query.first_initial),
        "last_initial": _starts_with(query.last_initial),
        "firstname": _contains(query.firstname),
        "lastname": _contains(query.lastname),
        "email": _contains(query.email),
        "search": _contains(query.search),
    }


def _escape_like(text: str) -> str:
    for character in (_LIKE_ESCAPE, "%", "_"):
        text = text.replace(character, _LIKE_ESCAPE + character)
    return text


def _starts_with(text: str | None) -> str | None:
    return None if text is None else _escape_like(text.lower()) + "%"


def _contains(text: str | None) -> str | None:
    return None if text is None else "%" + _escape_like(text.lower()) + "%"


def _like(key, pattern) -> ColumnElement[bool]:
    return key.like(pattern, escape=_LIKE_ESCAPE)
