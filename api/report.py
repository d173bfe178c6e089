"""The license allocations report endpoint.

A request runs at most three queries, all in one snapshot: the live projection
version; the count, which also checks the request's ids and reads the
projection's freshness; and the page. The page query selects the keys of the
page's rows in a subquery, then collects the department names and event dates
of those rows into JSON arrays with correlated subqueries. It is skipped when
the page lies past the last row. A CSV or XLSX download (api.downloads) runs the
same first two queries, then ``download_statement``, which selects every
matching row, and streams its result.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Request
from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    RowMapping,
    Select,
    func,
    select,
)
from starlette.responses import Response

from api.auth import AuthorizedCompany, CompanyAccess, department_limit
from api.database import get_engine, live_snapshot
from api.downloads import (
    OPENAPI_RESPONSES,
    DownloadRequest,
    download_request,
    download_response,
)
from api.errors import ApiError, JsonResponse, Problem
from api.lookups import Freshness, id_checks, verify_ids
from api.params import (
    ReportQuery,
    RowKey,
    encode_cursor,
    on_event_loop,
    report_query,
)
from api.report_sql import (
    ReportSql,
    page_parameters,
    page_template,
    request_shape,
)
from consumer.timestamps import format_us
from projections.as_of import SnapshotTooLarge
from projections.schema import Projection

router = APIRouter()


@router.get(
    "/v1/companies/{company_id}/license-allocations", responses=OPENAPI_RESPONSES
)
def get_license_allocations(
    company_id: AuthorizedCompany,
    query: Annotated[ReportQuery, Depends(on_event_loop(report_query))],
    engine: Annotated[Engine, Depends(get_engine)],
    request: Request,
    download: Annotated[
        DownloadRequest | None, Depends(on_event_loop(download_request))
    ],
) -> Response:
    """Return one page of the company's license allocations report.

    A CSV or XLSX download, chosen by ``format`` or the Accept header, contains
    every matching row instead.
    """
    if download is not None:
        return download_response(request, company_id, query, download)
    if query.as_of_us is not None:
        total, rows, freshness = _fetch_as_of(request, company_id, query)
    else:
        with live_snapshot(engine) as (conn, tables):
            total, rows, freshness = fetch_report(conn, tables, company_id, query)
    body = {
        "company_id": company_id,
        "total": total,
        "page": None if query.after is not None else query.page,
        "per_page": query.per_page,
        "next_cursor": _next_cursor(rows, query),
        "rows": rows,
        **freshness.to_json(),
    }
    return JsonResponse(body)


def _next_cursor(rows: list[dict[str, Any]], query: ReportQuery) -> str | None:
    """Return the cursor after the page's last row, or None after a short page."""
    if len(rows) < query.per_page:
        return None
    last = rows[-1]
    return encode_cursor(RowKey(last["user_id"], last["license_id"], last["course_id"]))


def _fetch_as_of(
    request: Request, company_id: int, query: ReportQuery
) -> tuple[int, list[dict[str, Any]], Freshness]:
    """Compute the report from the events up to ``query.as_of_us``."""
    with report_source(request, query) as (conn, tables):
        return fetch_report(conn, tables, company_id, query)


@contextmanager
def report_source(
    request: Request, query: ReportQuery
) -> Iterator[tuple[Connection, Projection]]:
    """Open the connection and tables that ``query`` reads.

    These are the live projection in one snapshot or, with ``as_of``, the
    in-memory projection of the events up to that instant. Raises 422 (ApiError)
    when that instant needs more events replayed than the limit.
    """
    if query.as_of_us is None:
        with live_snapshot(request.app.state.engine) as opened:
            yield opened
        return
    try:
        snapshot = request.app.state.snapshots.get(query.as_of_us)
    except SnapshotTooLarge as error:
        raise ApiError(
            422, [Problem(str(error), "as_of", "query", "value_error")]
        ) from None
    with snapshot.engine.connect() as conn:
        yield conn, snapshot.tables


def fetch_report(
    conn: Connection, tables: Projection, company_id: int, query: ReportQuery
) -> tuple[int, list[dict[str, Any]], Freshness]:
    """Return the number of matching rows, the page's rows and the freshness.

    Raises 404 (ApiError) for an unknown company or a license_id or
    department_id that is not the company's.
    """
    matching = count_rows(conn, tables, company_id, query)
    if query.offset >= matching.total:
        return matching.total, [], matching.freshness

    page = page_template(tables, company_id, query)
    result = conn.execute(page, page_parameters(company_id, query))
    rows = [row_json(row) for row in result.mappings()]
    return matching.total, rows, matching.freshness


@dataclass(frozen=True, slots=True)
class MatchingRows:
    """The SQL of a request's report, the number of its rows and the freshness."""

    report: ReportSql
    total: int
    freshness: Freshness


def count_rows(
    conn: Connection, tables: Projection, company_id: int, query: ReportQuery
) -> MatchingRows:
    """Count the rows that match ``query`` and check its ids in one statement.

    Raises 404 (ApiError) as ``fetch_report`` does.
    """
    scoped = department_limit(company_id) is not None
    count = _count_template(tables, scoped, request_shape(query))
    result = conn.execute(count, page_parameters(company_id, query))
    counted = result.mappings().one()
    freshness = verify_ids(counted, company_id, query.license_id, query.department_id)
    if query.after is not None and not counted["cursor_known"]:
        message = (
            "the row this cursor continues after is no longer in the report of "
            f"company {company_id}; request the first page again without cursor"
        )
        raise ApiError(422, [Problem(message, "cursor", "query", "value_error")])
    report = ReportSql(tables, company_id)
    return MatchingRows(report, counted["total"], freshness)


# One entry per shape of request and projection version, as for the page.
@functools.lru_cache(maxsize=512)
def _count_template(tables: Projection, scoped: bool, shape: ReportQuery) -> Select:
    """Return the count and id checks of ``shape``, with bound parameters.

    Without filters or a department, the total comes from the kept totals.
    """
    company = CompanyAccess(0, 0 if scoped else None)
    report = ReportSql(tables, company, bound=True)
    checks = id_checks(
        tables, company, shape.license_id, shape.department_id, bound=True
    )
    if shape.after is not None:
        checks.append(report.anchor_check(shape.after))
    filters = report.filters(shape)
    if filters or shape.department_id is not None or scoped:
        source, conditions = report.visible(
            shape.include_suspended, shape.department_id
        )
        count = select(func.count().label("total"), *checks)
        return count.select_from(source).where(*conditions, *filters)
    total = _company_total(tables, report.company_id, shape.include_suspended)
    return select(total.label("total"), *checks)


def _company_total(
    tables: Projection, company_id: Any, include_suspended: bool
) -> ColumnElement[int]:
    """Return the number of the company's report rows, from ``report_totals``.

    The projection keeps these numbers as it writes the rows, so the
    unfiltered total reads one row instead of counting the company's rows.
    """
    totals = tables.report_totals
    listed = totals.c.listed_rows
    visible_rows = listed if include_suspended else listed - totals.c.suspended_rows
    row = select(visible_rows).where(totals.c.company_id == company_id)
    return func.coalesce(row.scalar_subquery(), 0)


def page_statement(matching: MatchingRows, query: ReportQuery) -> Select:
    """Select the rows of the page that ``query`` requests, in its order.

    The statement carries the request's values, so it runs without parameters.
    """
    report = matching.report
    template = page_template(report.tables, report.company_id, query)
    return template.params(page_parameters(report.company_id, query))


def row_json(row: RowMapping) -> dict[str, Any]:
    """Convert a row of ``page_statement`` to a row of the JSON report."""
    departments = sorted(json_array(row["departments"]), key=department_sort_key)
    return {
        "user_id": row["user_id"],
        "firstname": row["firstname"],
        "lastname": row["lastname"],
        "email": row["email"],
        "departments": departments,
        "license_id": row["license_id"],
        "license_name": row["license_name"],
        "reusable": row["reusable"],
        "course_id": row["course_id"],
        "course_name": row["course_name"],
        "allocated": row["allocated"],
        "dates_allocated": _dates(row["dates_allocated"]),
        "dates_unallocated": _dates(row["dates_unallocated"]),
        "allocations": row["allocations"],
        "unallocations": row["unallocations"],
    }


def department_sort_key(name: str) -> tuple[str, str]:
    """Order department names case-insensitively, as the department sort does."""
    return (name.lower(), name)


def json_array(text: str | None) -> list[Any]:
    """Parse a JSON array column of the report's SQL, where NULL is an empty list."""
    # PostgreSQL's json_agg returns NULL for no rows, SQLite's json_group_array "[]".
    return [] if text is None else orjson.loads(text)


def _dates(text: str | None) -> list[str]:
    return [format_us(micros) for micros in sorted(json_array(text))]


def download_statement(matching: MatchingRows, query: ReportQuery) -> Select:
    """Select every row that ``query`` matches, in its order, for a download.

    The statement carries the request's values, so it runs without parameters.
    """
    report = matching.report
    source, conditions = report.visible(query.include_suspended, query.department_id)
    conditions.extend(report.filters(query))
    return report.every_row(query, source, conditions)
