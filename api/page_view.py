"""Template data of the report page: links, options, rows and pages.

Every link on the page is built from the request's query parameters, which
have the names of the JSON report's parameters, so a page's address can be
bookmarked and shared, and the download links carry the same filters.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from typing import Any
from urllib.parse import urlencode
from zoneinfo import ZoneInfo, available_timezones

from api.errors import Problem
from api.lookups import Freshness
from api.params import ReportQuery

PAGE_PATH = "/companies/{company_id}/license-allocations"
REPORT_PATH = "/v1/companies/{company_id}/license-allocations"
INITIALS = tuple("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
PER_PAGE_CHOICES = (25, 50, 100, 200, 500, 1000)
# Dates of a cell shown before the rest fold into a <details> element.
SHOWN_DATES = 2
DISPLAY_TIME = "%Y-%m-%d %H:%M"
DISPLAY_DATE = "%Y-%m-%d"

# (sort key, column heading) of the table, in IOMAD's column order.
COLUMNS = (
    ("firstname", "First name"),
    ("lastname", "Last name"),
    ("department", "Department"),
    ("email", "Email"),
    ("license", "License"),
    ("course", "Course"),
    ("allocated", "License allocated"),
    ("last_allocated", "Date(s) allocated"),
    ("last_unallocated", "Date(s) unallocated"),
    ("allocations", "Number of allocations"),
    ("unallocations", "Number of unallocations"),
)
# Labels of the filter form's fields, which name the fields in error messages.
FIELD_LABELS = {
    "license_id": "License",
    "course_id": "Course",
    "department_id": "Department",
    "first_initial": "First name initial",
    "last_initial": "Last name initial",
    "search": "Search",
    "firstname": "First name",
    "lastname": "Last name",
    "email": "Email",
    "allocated": "License allocated",
    "allocated_from": "Allocated from",
    "allocated_to": "Allocated to",
    "unallocated_from": "Unallocated from",
    "unallocated_to": "Unallocated to",
    "include_suspended": "Include suspended users",
    "tz": "Time zone",
    "per_page": "Rows per page",
    "sort": "Sort",
    "order": "Sort order",
    "as_of": "Report as of",
}

# Parameters that the filter form carries in hidden inputs: the links of the
# initial bars and column headings set them.
HIDDEN_FIELDS = ("sort", "order", "first_initial", "last_initial")


@dataclass(frozen=True, slots=True)
class Option:
    """One ``<option>`` of a selector."""

    value: str
    label: str
    selected: bool


@dataclass(frozen=True, slots=True)
class Link:
    """A link with its text, and whether it stands for the current state."""

    text: str
    href: str
    current: bool = False


@dataclass(frozen=True, slots=True)
class DisplayDate:
    """An instant as RFC 3339 (for ``<time datetime>``) and as local text."""

    instant: str
    text: str


@dataclass(frozen=True, slots=True)
class DateList:
    """The dates of one cell: the latest few shown, the earlier ones folded."""

    latest: list[DisplayDate]
    earlier: list[DisplayDate]


class PageLinks:
    """Addresses of the page and the report with the request's parameters changed."""

    def __init__(self, company_id: int, params: Mapping[str, str]) -> None:
        self.company_id = company_id
        self.params = dict(params)

    def page(self, **changes: str | int | None) -> str:
        """Return the page's address with ``changes``; None removes a parameter."""
        return _address(
            PAGE_PATH.format(company_id=self.company_id), self._merged(changes)
        )

    def download(self, file_format: str) -> str:
        """Return the report's address for a download of every matching row."""
        params = self._merged({"page": None, "per_page": None, "format": file_format})
        return _address(REPORT_PATH.format(company_id=self.company_id), params)

    def _merged(self, changes: Mapping[str, str | int | None]) -> dict[str, str]:
        merged = dict(self.params)
        for name, value in changes.items():
            if value is None:
                merged.pop(name, None)
            else:
                merged[name] = str(value)
        if merged.get("page") == "1":
            del merged["page"]
        return merged


def _address(path: str, params: Mapping[str, str]) -> str:
    return f"{path}?{urlencode(params)}" if params else path


def report_context(
    *,
    company_id: int,
    query: ReportQuery,
    params: Mapping[str, str],
    raw_params: Mapping[str, str],
    problems: list[Problem],
    total: int,
    rows: list[dict[str, Any]],
    freshness: Freshness,
    licenses: list[dict[str, Any]],
    courses: list[dict[str, Any]],
    departments: list[dict[str, Any]],
    completion_url_template: str | None,
) -> dict[str, Any]:
    """Return the variables of the ``report.html`` template."""
    zone = ZoneInfo(params.get("tz", "UTC"))
    links = PageLinks(company_id, params)
    invalid = {problem.parameter for problem in problems}
    # A field shows what the user typed, even when it was invalid and ignored.
    form = {**params, **{name: raw_params.get(name, "") for name in invalid}}
    pages = max(1, math.ceil(total / query.per_page))
    return {
        "company_id": company_id,
        "query": query,
        "form": form,
        "problems": [problem_view(problem) for problem in problems],
        "invalid": invalid,
        "total": total,
        "first_row": query.offset + 1 if rows else 0,
        "last_row": query.offset + len(rows),
        "rows": [display_row(row, zone, completion_url_template) for row in rows],
        "freshness": freshness_text(freshness, zone),
        "license_options": license_options(licenses, query.license_id),
        "course_options": course_options(courses, query.course_id),
        "department_options": department_options(departments, query.department_id),
        "allocated_options": _choices(
            params.get("allocated", ""), [("", "Any"), ("true", "Yes"), ("false", "No")]
        ),
        "per_page_options": _choices(
            str(query.per_page),
            [(str(n), str(n)) for n in _per_page_choices(query.per_page)],
        ),
        "time_zone_options": _choices(
            zone.key, [(name, name) for name in time_zone_names()]
        ),
        "first_initials": initial_links(links, "first_initial", query.first_initial),
        "last_initials": initial_links(links, "last_initial", query.last_initial),
        "columns": column_headings(links, query),
        "pagination": page_links(links, query.page, pages),
        "page_count": pages,
        "downloads": {"csv": links.download("csv"), "xlsx": links.download("xlsx")},
        "clear_href": links.page(**{name: None for name in params}),
        "completion_links": completion_url_template is not None,
        "hidden_fields": _hidden_fields(params),
    }


def problem_view(problem: Problem) -> dict[str, Any]:
    """Return a problem's message with the field's label in place of its name."""
    name = problem.parameter or ""
    message = problem.message
    label = FIELD_LABELS.get(name)
    if label is not None and message.startswith(name + " "):
        message = label + message[len(name) :]
    return {
        "parameter": name,
        "message": message,
        "has_field": name in FIELD_LABELS and name not in HIDDEN_FIELDS,
    }


def display_row(
    row: dict[str, Any], zone: ZoneInfo, completion_url_template: str | None
) -> dict[str, Any]:
    """Prepare a JSON report row for the table.

    For a license that is not reusable the unallocation dates and both counts
    are None, so the cells stay blank, as IOMAD shows them.
    """
    reusable = row["reusable"]
    completion_url = None
    if completion_url_template is not None:
        completion_url = completion_url_template.format_map(
            {
                "course_id": row["course_id"],
                "user_id": row["user_id"],
                "license_id": row["license_id"],
            }
        )
    return {
        **row,
        "dates_allocated": date_list(row["dates_allocated"], zone),
        "dates_unallocated": (
            date_list(row["dates_unallocated"], zone) if reusable else None
        ),
        "allocations": row["allocations"] if reusable else None,
        "unallocations": row["unallocations"] if reusable else None,
        "completion_url": completion_url,
    }


def date_list(values: list[str], zone: ZoneInfo) -> DateList:
    """Split ascending RFC 3339 instants into the latest SHOWN_DATES and the rest."""
    dates = [DisplayDate(value, local_time(value, zone)) for value in values]
    split = max(0, len(dates) - SHOWN_DATES)
    return DateList(latest=dates[split:], earlier=dates[:split])


def local_time(value: str, zone: ZoneInfo, pattern: str = DISPLAY_TIME) -> str:
    """Format an RFC 3339 instant in ``zone`` as YYYY-MM-DD HH:MM."""
    instant = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return instant.astimezone(zone).strftime(pattern)


def freshness_text(freshness: Freshness, zone: ZoneInfo) -> str:
    """Describe how fresh the projection is, in ``zone``."""
    if freshness.newest_event_time is None:
        return "No events have been applied yet."
    newest = local_time(freshness.newest_event_time, zone)
    text = f"Data includes events up to {newest} ({zone.key})"
    if freshness.updated_at is not None:
        updated = local_time(freshness.updated_at, zone)
        text += f"; last updated {updated}"
    return text + "."


def license_options(
    licenses: list[dict[str, Any]], selected: int | None
) -> list[Option]:
    """Return the license selector's options, each marked when not valid today."""
    options = [Option("", "All licenses", selected is None)]
    for license_ in licenses:
        label = license_["name"] or f"License {license_['license_id']}"
        if license_["expired"]:
            label += f" (expired {_day(license_['expiry_date'])})"
        elif license_["not_yet_valid"]:
            label += f" (valid from {_day(license_['start_date'])})"
        value = license_["license_id"]
        options.append(Option(str(value), label, value == selected))
    return options


def _day(value: str) -> str:
    return local_time(value, ZoneInfo("UTC"), DISPLAY_DATE)


def course_options(courses: list[dict[str, Any]], selected: int | None) -> list[Option]:
    """Return the course selector's options; a course not known by name shows its id."""
    options = [Option("", "All courses", selected is None)]
    for course in courses:
        label = course["course_name"] or f"Unknown course {course['course_id']}"
        value = course["course_id"]
        options.append(Option(str(value), label, value == selected))
    return options


def department_options(
    tree: list[dict[str, Any]], selected: int | None
) -> list[Option]:
    """Flatten the department tree into options indented by depth."""
    options = [Option("", "All departments", selected is None)]
    for node, depth in _walk(tree):
        name = node["name"] or f"Department {node['department_id']}"
        # No-break spaces, because a browser collapses ordinary ones in options.
        label = "\u00a0\u00a0\u00a0" * depth + name
        value = node["department_id"]
        options.append(Option(str(value), label, value == selected))
    return options


def _walk(nodes: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], int]]:
    # An explicit stack, so a deep tree cannot exhaust Python's recursion limit.
    stack = [(node, 0) for node in reversed(nodes)]
    while stack:
        node, depth = stack.pop()
        yield node, depth
        stack.extend((child, depth + 1) for child in reversed(node["children"]))


def initial_links(links: PageLinks, name: str, current: str | None) -> list[Link]:
    """Return the "All" and A to Z links of one initial bar."""
    current_letter = current.upper() if current else None
    bar = [Link("All", links.page(**{name: None, "page": None}), current is None)]
    for letter in INITIALS:
        href = links.page(**{name: letter, "page": None})
        bar.append(Link(letter, href, letter == current_letter))
    return bar


def column_headings(links: PageLinks, query: ReportQuery) -> list[dict[str, Any]]:
    """Return each column's heading, sort link and aria-sort value."""
    headings = []
    for key, label in COLUMNS:
        sorted_here = query.sort == key
        descending = sorted_here and not query.descending
        aria_sort = None
        if sorted_here:
            aria_sort = "descending" if query.descending else "ascending"
        href = links.page(sort=key, order="desc" if descending else "asc", page=None)
        headings.append(
            {"key": key, "label": label, "href": href, "aria_sort": aria_sort}
        )
    return headings


def page_links(links: PageLinks, page: int, pages: int) -> dict[str, Any]:
    """Return the previous, next and numbered page links around ``page``."""
    numbers = sorted({1, pages, *range(max(1, page - 2), min(pages, page + 2) + 1)})
    numbered: list[Link | None] = []
    for index, number in enumerate(numbers):
        if index and number != numbers[index - 1] + 1:
            numbered.append(None)
        numbered.append(Link(str(number), links.page(page=number), number == page))
    return {
        "previous": links.page(page=page - 1) if page > 1 else None,
        "next": links.page(page=page + 1) if page < pages else None,
        "numbered": numbered,
    }


def _per_page_choices(current: int) -> list[int]:
    if current in PER_PAGE_CHOICES:
        return list(PER_PAGE_CHOICES)
    return sorted({*PER_PAGE_CHOICES, current})


def _choices(selected: str, pairs: list[tuple[str, str]]) -> list[Option]:
    return [Option(value, label, value == selected) for value, label in pairs]


def _hidden_fields(params: Mapping[str, str]) -> dict[str, str]:
    """Return the parameters that the filter form keeps but has no field for."""
    return {name: params[name] for name in HIDDEN_FIELDS if name in params}


@cache
def time_zone_names() -> list[str]:
    """Return the IANA time zone names, UTC first."""
    names = sorted(available_timezones() - {"UTC"})
    return ["UTC", *names]
