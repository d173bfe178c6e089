"""Endpoints that fill the report's selectors: licenses, courses and departments."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends
from sqlalchemy import Connection, Engine, RowMapping, Select, false, select

from api.auth import AuthorizedCompany
from api.database import UnicodeLower, get_engine, live_snapshot
from api.errors import JsonResponse
from api.lookups import check_ids
from api.params import OptionalId
from api.report_sql import ReportSql, nulls_last
from consumer.timestamps import format_us, now_us
from projections.schema import Projection

router = APIRouter()

EngineDependency = Annotated[Engine, Depends(get_engine)]


@router.get("/v1/companies/{company_id}/licenses")
def get_licenses(
    company_id: AuthorizedCompany, engine: EngineDependency
) -> JsonResponse:
    """Return the company's licenses that are not deleted, sorted by name."""
    with live_snapshot(engine) as (conn, tables):
        check_ids(conn, tables, company_id)
        licenses = list_licenses(conn, tables, company_id)
    return JsonResponse({"company_id": company_id, "licenses": licenses})


def list_licenses(
    conn: Connection, tables: Projection, company_id: int
) -> list[dict[str, Any]]:
    """Return the company's licenses that are not deleted, sorted by name."""
    table = tables.licenses
    statement = (
        select(table)
        .where(table.c.company_id == company_id, table.c.deleted == false())
        .order_by(*nulls_last(UnicodeLower(table.c.name)), table.c.license_id)
    )
    rows = conn.execute(statement).mappings().all()
    now = now_us()
    return [_license_json(row, now) for row in rows]


def _license_json(row: RowMapping, now: int) -> dict[str, Any]:
    start, expiry = row["start_us"], row["expiry_us"]
    return {
        "license_id": row["license_id"],
        "name": row["name"],
        "reusable": row["reusable"],
        "program": row["program"],
        "start_date": None if start is None else format_us(start),
        "expiry_date": None if expiry is None else format_us(expiry),
        "expired": expiry is not None and expiry < now,
        "not_yet_valid": start is not None and start > now,
    }


@router.get("/v1/companies/{company_id}/courses")
def get_courses(
    company_id: AuthorizedCompany,
    engine: EngineDependency,
    license_id: OptionalId = None,
    include_suspended: bool = False,
) -> JsonResponse:
    """Return the courses of the rows that the company's report shows.

    ``license_id`` keeps the courses of one license, and ``include_suspended``
    counts the rows of suspended users as the report parameter does.
    """
    with live_snapshot(engine) as (conn, tables):
        check_ids(conn, tables, company_id, license_id)
        courses = list_courses(conn, tables, company_id, license_id, include_suspended)
    return JsonResponse({"company_id": company_id, "courses": courses})


def list_courses(
    conn: Connection,
    tables: Projection,
    company_id: int,
    license_id: int | None = None,
    include_suspended: bool = False,
) -> list[dict[str, Any]]:
    """Return the courses of the company's report rows, sorted by name."""
    statement = _courses_statement(tables, company_id, license_id, include_suspended)
    rows = conn.execute(statement).all()
    return [{"course_id": course_id, "course_name": name} for course_id, name in rows]


def _courses_statement(
    tables: Projection,
    company_id: int,
    license_id: int | None,
    include_suspended: bool,
) -> Select:
    allocation, conditions = ReportSql(tables, company_id).visible(include_suspended)
    course = tables.courses
    source = allocation.outerjoin(course, course.c.course_id == allocation.c.course_id)
    if license_id is not None:
        conditions.append(allocation.c.license_id == license_id)
    # GROUP BY, unlike DISTINCT, lets PostgreSQL order by expressions of the
    # grouped columns.
    return (
        select(allocation.c.course_id, course.c.name)
        .select_from(source)
        .where(*conditions)
        .group_by(allocation.c.course_id, course.c.name)
        .order_by(*nulls_last(UnicodeLower(course.c.name)), allocation.c.course_id)
    )


@router.get("/v1/companies/{company_id}/departments")
def get_departments(
    company_id: AuthorizedCompany, engine: EngineDependency
) -> JsonResponse:
    """Return the company's departments that are not deleted, as a tree."""
    with live_snapshot(engine) as (conn, tables):
        check_ids(conn, tables, company_id)
        tree = list_departments(conn, tables, company_id)
    # NOTE: orjson rejects JSON nested deeper than 255 levels, so a tree 127 or
    # more departments deep fails here with a 500 response.
    return JsonResponse({"company_id": company_id, "departments": tree})


def list_departments(
    conn: Connection, tables: Projection, company_id: int
) -> list[dict[str, Any]]:
    """Return the company's departments that are not deleted, as a tree.

    With access limited to a department subtree, only that subtree, whose top
    department is then the tree's root.
    """
    table = tables.departments
    statement = select(table.c.department_id, table.c.name, table.c.parent_id).where(
        table.c.company_id == company_id, table.c.deleted == false()
    )
    scope = ReportSql(tables, company_id).scope_subtree()
    if scope is not None:
        statement = statement.where(
            table.c.department_id.in_(select(scope.c.department_id))
        )
    rows = conn.execute(statement).all()
    return department_tree([tuple(row) for row in rows])


def department_tree(
    rows: list[tuple[int, str | None, int | None]],
) -> list[dict[str, Any]]:
    """Nest (department_id, name, parent_id) rows under their parents.

    A department whose parent is not among the rows (deleted, of another
    company or unknown) is a root. A cycle of parent ids is cut at its
    smallest id, which becomes a root. Siblings sort by name, then id.
    """
    nodes = {
        department_id: {
            "department_id": department_id,
            "name": name,
            "parent_id": parent_id,
            "children": [],
        }
        for department_id, name, parent_id in rows
    }
    children: dict[int, list[int]] = {}
    root_ids = []
    for department_id, node in nodes.items():
        parent_id = node["parent_id"]
        if parent_id in nodes and parent_id != department_id:
            children.setdefault(parent_id, []).append(department_id)
        else:
            root_ids.append(department_id)

    placed: set[int] = set()
    roots = []
    # Departments left over after the true roots lie on or below a cycle.
    for root_id in [*root_ids, *sorted(nodes)]:
        if root_id not in placed:
            roots.append(root_id)
            _attach_descendants(root_id, nodes, children, placed)
    return [nodes[root_id] for root_id in _by_name(roots, nodes)]


def _attach_descendants(
    root_id: int,
    nodes: dict[int, dict[str, Any]],
    children: dict[int, list[int]],
    placed: set[int],
) -> None:
    """Append each department below ``root_id`` to its parent's children."""
    placed.add(root_id)
    stack = [root_id]
    while stack:
        parent_id = stack.pop()
        for child_id in _by_name(children.get(parent_id, []), nodes):
            if child_id in placed:
                continue
            placed.add(child_id)
            nodes[parent_id]["children"].append(nodes[child_id])
            stack.append(child_id)


def _by_name(ids: list[int], nodes: dict[int, dict[str, Any]]) -> list[int]:
    return sorted(ids, key=lambda key: ((nodes[key]["name"] or "").lower(), key))
