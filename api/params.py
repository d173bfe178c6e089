"""Query parameters of the report, validated into a ReportQuery."""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from functools import cache, wraps
from typing import Annotated, Literal, ParamSpec, TypeVar, get_args
from zoneinfo import ZoneInfo, available_timezones

import orjson
from fastapi import Query
from pydantic import AfterValidator

from api.auth import MAX_ID
from api.errors import ApiError, Problem
from consumer.timestamps import parse_rfc3339

SortKey = Literal[
    "lastname",
    "firstname",
    "email",
    "department",
    "license",
    "course",
    "allocated",
    "allocations",
    "unallocations",
    "last_allocated",
    "last_unallocated",
]
SORT_KEYS: tuple[str, ...] = get_args(SortKey)
MAX_PER_PAGE = 1000
DEFAULT_PER_PAGE = 50
# OFFSET must fit a signed 64-bit integer on both databases.
MAX_OFFSET = 2**63 - 1
# The years in which the consumer accepts event times.
MIN_YEAR = 1900
MAX_YEAR = 9000

_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_P = ParamSpec("_P")
_T = TypeVar("_T")


def _check_date(value: str | None) -> str | None:
    if value is None:
        return None
    if not _DATE.fullmatch(value):
        raise ValueError(
            "must be a calendar date in the form YYYY-MM-DD, such as 2024-05-01"
        )
    try:
        day = date.fromisoformat(value)
    except ValueError:
        raise ValueError(
            f"must be a real calendar date; {value} does not exist"
        ) from None
    if not MIN_YEAR <= day.year <= MAX_YEAR:
        raise ValueError(f"must be a date in the years {MIN_YEAR} to {MAX_YEAR}")
    return value


def _check_instant(value: str | None) -> str | None:
    if value is not None:
        try:
            parse_rfc3339(value)
        except ValueError as error:
            raise ValueError(f"must be an RFC 3339 instant: {error}") from None
    return value


def _check_initial(value: str | None) -> str | None:
    if value is not None and (len(value) != 1 or not value.isalpha()):
        raise ValueError("must be a single letter, such as A")
    return value


@cache
def _time_zone_names() -> frozenset[str]:
    return frozenset(available_timezones())


def _check_time_zone(value: str) -> str:
    if value not in _time_zone_names():
        raise ValueError("must be an IANA time zone name, such as Europe/Paris or UTC")
    return value


OptionalId = Annotated[int | None, Query(ge=1, le=MAX_ID)]
DateText = Annotated[str | None, AfterValidator(_check_date), Query()]
Initial = Annotated[str | None, AfterValidator(_check_initial), Query()]
TimeZoneName = Annotated[str, AfterValidator(_check_time_zone), Query()]
TextFilter = Annotated[str | None, Query(max_length=1000)]


@dataclass(frozen=True, slots=True)
class RowKey:
    """The primary key of one report row, which a cursor names."""

    user_id: int
    license_id: int
    course_id: int


def encode_cursor(key: RowKey) -> str:
    """Return the cursor that continues the report after the row ``key``.

    It contains only the row's ids, as base64url JSON without padding, so it
    carries no personal data into URLs and logs.
    """
    ids = [key.user_id, key.license_id, key.course_id]
    return base64.urlsafe_b64encode(orjson.dumps(ids)).rstrip(b"=").decode()


def decode_cursor(text: str) -> RowKey:
    """Return the row key of a cursor, or raise ValueError naming what is wrong."""
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        ids = orjson.loads(raw)
    except (binascii.Error, ValueError):
        ids = None
    valid = (
        isinstance(ids, list)
        and len(ids) == 3
        and all(type(value) is int and 0 <= value <= MAX_ID for value in ids)
    )
    if not valid:
        raise ValueError(
            "must be a next_cursor value from an earlier response of this "
            "endpoint; request the first page without cursor to get one"
        )
    return RowKey(*ids)


def _check_cursor(value: str | None) -> str | None:
    if value is not None:
        decode_cursor(value)
    return value


CursorText = Annotated[str | None, AfterValidator(_check_cursor), Query(max_length=200)]


@dataclass(frozen=True, slots=True)
class InstantRange:
    """Microseconds since the epoch: ``start_us`` inclusive, ``end_us`` exclusive."""

    start_us: int | None
    end_us: int | None


@dataclass(frozen=True, slots=True)
class ReportQuery:
    """Filters, order and page of one report request."""

    license_id: int | None = None
    course_id: int | None = None
    department_id: int | None = None
    first_initial: str | None = None
    last_initial: str | None = None
    search: str | None = None
    firstname: str | None = None
    lastname: str | None = None
    email: str | None = None
    allocated: bool | None = None
    allocated_range: InstantRange | None = None
    unallocated_range: InstantRange | None = None
    include_suspended: bool = False
    sort: str = "lastname"
    descending: bool = False
    page: int = 1
    per_page: int = DEFAULT_PER_PAGE
    # The row after which the page starts, instead of a page number.
    after: RowKey | None = None
    # Microseconds since the epoch of a point-in-time report, or None for now.
    as_of_us: int | None = None

    @property
    def offset(self) -> int:
        return (self.page - 1) * self.per_page


def report_query(
    license_id: OptionalId = None,
    course_id: OptionalId = None,
    department_id: OptionalId = None,
    first_initial: Initial = None,
    last_initial: Initial = None,
    search: TextFilter = None,
    firstname: TextFilter = None,
    lastname: TextFilter = None,
    email: TextFilter = None,
    allocated: bool | None = None,
    allocated_from: DateText = None,
    allocated_to: DateText = None,
    unallocated_from: DateText = None,
    unallocated_to: DateText = None,
    tz: TimeZoneName = "UTC",
    include_suspended: bool = False,
    sort: SortKey = "lastname",
    order: Literal["asc", "desc"] = "asc",
    page: Annotated[int, Query(ge=1)] = 1,
    per_page: Annotated[int, Query(ge=1, le=MAX_PER_PAGE)] = DEFAULT_PER_PAGE,
    cursor: CursorText = None,
    as_of: Annotated[str | None, AfterValidator(_check_instant), Query()] = None,
) -> ReportQuery:
    """Build the ReportQuery of a request, or raise 422 for inconsistent parameters."""
    problems = [
        *_check_range("allocated", allocated_from, allocated_to),
        *_check_range("unallocated", unallocated_from, unallocated_to),
        *_check_offset(page, per_page),
    ]
    if cursor is not None and page != 1:
        message = (
            "page and cursor cannot be combined; leave out page to continue "
            "from the cursor, or leave out cursor to request a page by number"
        )
        problems.append(Problem(message, "page", "query", "value_error"))
    if problems:
        raise ApiError(422, problems)
    zone = ZoneInfo(tz)
    return ReportQuery(
        license_id=license_id,
        course_id=course_id,
        department_id=department_id,
        first_initial=first_initial,
        last_initial=last_initial,
        search=search or None,
        firstname=firstname or None,
        lastname=lastname or None,
        email=email or None,
        allocated=allocated,
        allocated_range=day_range(allocated_from, allocated_to, zone),
        unallocated_range=day_range(unallocated_from, unallocated_to, zone),
        include_suspended=include_suspended,
        sort=sort,
        descending=order == "desc",
        page=page,
        per_page=per_page,
        after=None if cursor is None else decode_cursor(cursor),
        as_of_us=None if as_of is None else parse_rfc3339(as_of),
    )


def on_event_loop(dependency: Callable[_P, _T]) -> Callable[_P, Awaitable[_T]]:
    """Wrap a dependency that does no I/O so that FastAPI calls it on the event loop.

    FastAPI runs a plain function in a worker thread, and the trip there and
    back costs more than validating a request's parameters. The wrapper is a
    coroutine function with the same signature, so the parameters, their
    validation and the OpenAPI schema stay the same.
    """

    @wraps(dependency)
    async def call(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        return dependency(*args, **kwargs)

    return call


def _check_range(prefix: str, first: str | None, last: str | None) -> list[Problem]:
    if first is None or last is None or first <= last:
        return []
    message = (
        f"{prefix}_from ({first}) is after {prefix}_to ({last}); "
        f"set {prefix}_from to a date on or before {prefix}_to"
    )
    return [Problem(message, f"{prefix}_from", "query", "value_error")]


def _check_offset(page: int, per_page: int) -> list[Problem]:
    max_page = MAX_OFFSET // per_page + 1
    if page <= max_page:
        return []
    message = f"page must be at most {max_page} when per_page is {per_page}"
    return [Problem(message, "page", "query", "less_than_equal")]


def day_range(
    first: str | None, last: str | None, zone: ZoneInfo
) -> InstantRange | None:
    """Return the instants from the start of day ``first`` to the end of day ``last``.

    Days begin at local midnight in ``zone``. Where midnight falls in a
    daylight-saving gap, the day begins at the first instant after the gap.
    """
    if first is None and last is None:
        return None
    start = None if first is None else _midnight_us(date.fromisoformat(first), zone)
    end = None
    if last is not None:
        end = _midnight_us(date.fromisoformat(last) + timedelta(days=1), zone)
    return InstantRange(start, end)


def _midnight_us(day: date, zone: ZoneInfo) -> int:
    # fold=0 gives a skipped midnight the offset from before the transition,
    # which lands on the first instant of the day.
    local_midnight = datetime.combine(day, time.min, tzinfo=zone)
    return (local_midnight - _EPOCH) // timedelta(microseconds=1)
