"""Checks that a request's ids name known records, and the projection's freshness.

``id_checks`` returns uncorrelated subqueries, so a caller can add them to a
statement it runs anyway (the report adds them to its count) and save a query.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, Connection, exists, false, select

from api.auth import department_limit
from api.errors import ApiError, Problem, not_found
from api.report_sql import ReportSql
from consumer.timestamps import format_us
from projections.apply import STATE_ROW
from projections.schema import Projection


@dataclass(frozen=True, slots=True)
class Freshness:
    """The projection's newest event time and last update, as RFC 3339 UTC or None."""

    newest_event_time: str | None
    updated_at: str | None

    def to_json(self) -> dict[str, str | None]:
        return {
            "newest_event_time": self.newest_event_time,
            "updated_at": self.updated_at,
        }


def id_checks(
    tables: Projection,
    company_id: int,
    license_id: int | None = None,
    department_id: int | None = None,
    bound: bool = False,
) -> list[ColumnElement]:
    """Return labelled columns that ``verify_ids`` reads from a result row.

    The subqueries use aliases, so they never correlate with the tables of a
    statement they are added to. When the access to ``company_id`` is limited
    to a department subtree, a ``department_in_scope`` column is true when
    ``department_id`` lies in it. With ``bound``, the ids are bound parameters
    as in ``ReportSql``, and the given values only tell which checks to make.
    """
    report = ReportSql(tables, company_id, bound=bound)
    company = report.company_id
    state = tables.state
    columns = [
        _state_value(state, state.c.newest_event_time_us, "newest_event_time_us"),
        _state_value(state, state.c.applied_at_us, "applied_at_us"),
        exists()
        .where(tables.companies.alias().c.company_id == company)
        .label("company_known"),
    ]
    if license_id is not None:
        license_ = tables.licenses.alias()
        known = exists().where(
            license_.c.license_id == report.value("license_id", license_id),
            license_.c.company_id == company,
            license_.c.deleted == false(),
        )
        columns.append(known.label("license_known"))
    if department_id is not None:
        department_id = report.value("department_id", department_id)
        department = tables.departments.alias()
        known = exists().where(
            department.c.department_id == department_id,
            department.c.company_id == company,
            department.c.deleted == false(),
        )
        columns.append(known.label("department_known"))
        if report.scope_department_id is not None:
            columns.append(_in_scope(report, department_id))
    return columns


def _in_scope(report: ReportSql, department_id) -> ColumnElement:
    scope = report.value("scope_department_id", report.scope_department_id)
    subtree = report.department_subtree(scope, "scope_check_subtree")
    found = select(subtree.c.department_id).where(
        subtree.c.department_id == department_id
    )
    return found.exists().label("department_in_scope")


def _state_value(state, column, label: str) -> ColumnElement:
    query = select(column).where(state.c.name == STATE_ROW)
    return query.scalar_subquery().label(label)


def verify_ids(
    row: Mapping[str, Any],
    company_id: int,
    license_id: int | None = None,
    department_id: int | None = None,
) -> Freshness:
    """Raise 404 unless the company is known and the ids are its own.

    A license or department counts only while it is not deleted. Raises 403
    when ``department_id`` lies outside the credential's department subtree,
    before telling whether it exists. Returns the projection's freshness from
    the same row.
    """
    if not row["company_known"]:
        raise not_found(
            "company_id", f"company {company_id} is not known", location="path"
        )
    scoped = department_limit(company_id) is not None
    if department_id is not None and scoped and not row["department_in_scope"]:
        raise _outside_scope(department_id)
    if license_id is not None and not row["license_known"]:
        raise not_found(
            "license_id",
            f"license_id {license_id} is not a license of company {company_id}",
        )
    if department_id is not None and not row["department_known"]:
        raise not_found(
            "department_id",
            f"department_id {department_id} is not a department of company "
            f"{company_id}",
        )
    return Freshness(
        _format_optional(row["newest_event_time_us"]),
        _format_optional(row["applied_at_us"]),
    )


def _outside_scope(department_id: int) -> ApiError:
    problem = Problem(
        f"this credential may not read department_id {department_id}, which is "
        "outside its department subtree; choose a department within it",
        "department_id",
        "query",
        "forbidden",
    )
    return ApiError(403, [problem])


def check_ids(
    conn: Connection,
    tables: Projection,
    company_id: int,
    license_id: int | None = None,
) -> Freshness:
    """Run the id checks as one statement and raise 404 as ``verify_ids`` does."""
    statement = select(*id_checks(tables, company_id, license_id))
    row = conn.execute(statement).mappings().one()
    return verify_ids(row, company_id, license_id)


def _format_optional(micros: int | None) -> str | None:
    return None if micros is None else format_us(micros)
