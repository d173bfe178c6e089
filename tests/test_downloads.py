"""CSV and XLSX downloads of the report on SQLite and PostgreSQL.

The downloads are checked against the JSON report for the same query, over the
history of tests/api_data.py plus users whose names need quoting or look like
spreadsheet formulas.
"""

from __future__ import annotations

import asyncio
import csv
import io
import itertools
import re
import threading
import time
import tracemalloc
import zipfile
from collections.abc import Iterator
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import openpyxl
import orjson
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, event

from api.app import create_app
from api.downloads import fetch_ahead, negotiate_format
from license_report.settings import Settings
from projections.sql import make_engine
from tests.api_data import (
    ACME,
    COMPLIANCE,
    FIRE_SAFETY,
    GRACE,
    SAFETY,
    SALES,
    History,
    build_history,
    load_history,
)

KEY = "download-test-key"
REPORT = "/v1/companies/{company}/license-allocations"
XLSX = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"
HEADER = [
    "First name",
    "Last name",
    "Department",
    "Email",
    "License",
    "Course",
    "License allocated",
    "Date(s) allocated",
    "Date(s) unallocated",
    "Number of allocations",
    "Number of unallocations",
]
FORMULA_TRIGGERS = ("=", "+", "-", "@", "\t", "\r")
_OOXML_ESCAPE = re.compile(r"_x([0-9A-Fa-f]{4})_")

# Users whose names test quoting and formula neutralisation, all in Sales.
QUOTED = 300
FORMULAS = 301
MORE_FORMULAS = 302
CARRIAGE_RETURN = 303
UNICODE = 304
FORMULA_DEPARTMENT = 15
SPECIAL_NAMES = {
    QUOTED: ('Smith, "Jr"', "Line\nBreak", "quoted@example.com"),
    FORMULAS: ("=1+1", "+SUM(A1:A2)", "@evil.example.com"),
    MORE_FORMULAS: ("-2", "\tTabbed", "tab@example.com"),
    CARRIAGE_RETURN: ("\rReturn", "Plain", "cr@example.com"),
    UNICODE: ("Zoë", "Łukaszewicz", "zoe@example.com"),
}
FORMULA_DEPARTMENT_NAME = "=cmd|' /C calc'!A0"

FILTERS = [
    pytest.param({}, id="default"),
    pytest.param({"sort": "department", "order": "desc"}, id="department-desc"),
    pytest.param({"sort": "last_allocated"}, id="last-allocated"),
    pytest.param({"license_id": SAFETY, "sort": "email"}, id="license"),
    pytest.param({"department_id": SALES, "sort": "firstname"}, id="department"),
    pytest.param(
        {"include_suspended": "true", "sort": "allocations", "order": "desc"},
        id="suspended",
    ),
    pytest.param({"search": "a", "allocated": "true"}, id="search-allocated"),
    pytest.param({"first_initial": "b"}, id="first-initial"),
    pytest.param(
        {"allocated_from": "2024-02-01", "unallocated_to": "2024-12-31"},
        id="date-ranges",
    ),
]


def special_history() -> History:
    """Return the shared test history plus the users of SPECIAL_NAMES."""
    history = build_history()
    history.department(FORMULA_DEPARTMENT, ACME, FORMULA_DEPARTMENT_NAME, SALES)
    for user_id, (firstname, lastname, email) in SPECIAL_NAMES.items():
        history.user(user_id, firstname, lastname, email)
        history.member(user_id, ACME, SALES)
        history.allocate(user_id, SAFETY, FIRE_SAFETY, "2024-06-01T12:00:00Z")
    history.member(FORMULAS, ACME, FORMULA_DEPARTMENT)
    return history


def _settings() -> Settings:
    return Settings(api_keys=orjson.dumps({KEY: "*"}).decode(), rate_limit_per_minute=0)


@pytest.fixture
def client(engine: Engine) -> Iterator[TestClient]:
    load_history(engine, special_history())
    with TestClient(create_app(_settings(), engine)) as test_client:
        yield test_client


def get(client: TestClient, headers: dict | None = None, **params):
    headers = {"Authorization": f"Bearer {KEY}", **(headers or {})}
    return client.get(REPORT.format(company=ACME), params=params, headers=headers)


def json_rows(client: TestClient, **params) -> list[dict]:
    """Return every row of the JSON report, two rows per page."""
    rows: list[dict] = []
    page = 1
    while True:
        response = get(client, **params, page=page, per_page=2)
        assert response.status_code == 200, response.text
        body = response.json()
        rows.extend(body["rows"])
        if page * 2 >= body["total"]:
            return rows
        page += 1


def csv_rows(content: bytes) -> list[list[str]]:
    text = content.decode("utf-8-sig")
    return list(csv.reader(io.StringIO(text, newline="")))


def xlsx_rows(content: bytes) -> list[list[str]]:
    """Return the worksheet's cells as text: numbers as digits, blanks as ""."""
    sheet = openpyxl.load_workbook(io.BytesIO(content), read_only=True).active
    return [
        ["" if value is None else unescape_ooxml(str(value)) for value in row]
        for row in sheet.iter_rows(values_only=True)
    ]


def unescape_ooxml(text: str) -> str:
    """Decode the _xHHHH_ escapes of OOXML strings, as Excel does on reading.

    xlsxwriter writes a carriage return as _x000D_, and openpyxl 3.1 returns
    such escapes undecoded.
    """
    return _OOXML_ESCAPE.sub(lambda match: chr(int(match.group(1), 16)), text)


def neutralised(text: str | None) -> str:
    text = text or ""
    return "'" + text if text.startswith(FORMULA_TRIGGERS) else text


def expected_cells(row: dict, zone: str = "UTC", date_format: str = "rfc3339"):
    """Return the download cells of a JSON row, computed independently."""

    def dates(values: list[str]) -> str:
        return "; ".join(expected_date(value, zone, date_format) for value in values)

    reusable = row["reusable"]
    return [
        neutralised(row["firstname"]),
        neutralised(row["lastname"]),
        neutralised("; ".join(row["departments"])),
        neutralised(row["email"]),
        neutralised(row["license_name"]),
        neutralised(row["course_name"]),
        "Yes" if row["allocated"] else "No",
        dates(row["dates_allocated"]),
        dates(row["dates_unallocated"]) if reusable else "",
        str(row["allocations"]) if reusable else "",
        str(row["unallocations"]) if reusable else "",
    ]


def expected_date(value: str, zone: str, date_format: str) -> str:
    instant = datetime.fromisoformat(value.replace("Z", "+00:00"))
    local = instant.astimezone(ZoneInfo(zone))
    if date_format == "date":
        return local.strftime("%Y-%m-%d")
    if date_format == "datetime":
        return local.strftime("%Y-%m-%d %H:%M")
    if zone == "UTC":
        return value
    return local.isoformat()


def row_of(rows: list[list[str]], email: str) -> list[str]:
    for row in rows:
        if row[3] in (email, neutralised(email)):
            return row
    raise AssertionError(f"no row with email {email!r}")


# Content against the JSON report.


@pytest.mark.parametrize("params", FILTERS)
def test_csv_equals_json_rows(client, params):
    expected = [expected_cells(row) for row in json_rows(client, **params)]
    response = get(client, **params, format="csv")
    assert response.status_code == 200, response.text
    rows = csv_rows(response.content)
    assert rows[0] == HEADER
    assert rows[1:] == expected


@pytest.mark.parametrize("params", FILTERS)
def test_xlsx_equals_csv(client, params):
    csv_response = get(client, **params, format="csv")
    xlsx_response = get(client, **params, format="xlsx")
    assert xlsx_response.status_code == 200, xlsx_response.text
    assert xlsx_rows(xlsx_response.content) == csv_rows(csv_response.content)


def test_download_ignores_paging(client):
    everything = csv_rows(get(client, format="csv").content)
    paged = csv_rows(get(client, format="csv", page=3, per_page=1).content)
    assert len(everything) > 3
    assert paged == everything


def test_download_of_no_rows_has_header(client):
    response = get(client, format="csv", search="nobody-matches-this")
    assert csv_rows(response.content) == [HEADER]
    xlsx = get(client, format="xlsx", search="nobody-matches-this")
    assert xlsx_rows(xlsx.content) == [HEADER]


def test_download_as_of_equals_json(client):
    params = {"as_of": "2024-02-22T00:00:00Z"}
    expected = [expected_cells(row) for row in json_rows(client, **params)]
    rows = csv_rows(get(client, **params, format="csv").content)
    assert rows[1:] == expected
    carol = next(row for row in expected if row[3] == "carol.clark@example.com")
    assert carol[6] == "Yes"


# CSV encoding.


def test_csv_starts_with_bom(client):
    content = get(client, format="csv").content
    assert content.startswith(b"\xef\xbb\xbfFirst name,Last name,")


def test_csv_uses_crlf_lines(client):
    content = get(client, format="csv").content
    header_line = content[3:].split(b"\n", 1)[0]
    assert header_line.endswith(b"\r")


def test_csv_quotes_comma_quote_newline(client):
    content = get(client, format="csv").content.decode("utf-8-sig")
    assert '"Smith, ""Jr""","Line\nBreak",' in content
    row = row_of(csv_rows(content.encode()), "quoted@example.com")
    assert row[0] == 'Smith, "Jr"'
    assert row[1] == "Line\nBreak"


def test_csv_is_utf8(client):
    response = get(client, format="csv")
    assert response.headers["content-type"] == "text/csv; charset=utf-8"
    assert "Zoë,Łukaszewicz,".encode() in response.content


# Formula injection.


@pytest.mark.parametrize(
    ("email", "column", "text"),
    [
        pytest.param("@evil.example.com", 0, "=1+1", id="equals"),
        pytest.param("@evil.example.com", 1, "+SUM(A1:A2)", id="plus"),
        pytest.param("@evil.example.com", 3, "@evil.example.com", id="at"),
        pytest.param("tab@example.com", 0, "-2", id="minus"),
        pytest.param("tab@example.com", 1, "\tTabbed", id="tab"),
        pytest.param("cr@example.com", 0, "\rReturn", id="carriage-return"),
    ],
)
def test_formula_cells_neutralised(client, email, column, text):
    csv_row = row_of(csv_rows(get(client, format="csv").content), email)
    xlsx_row = row_of(xlsx_rows(get(client, format="xlsx").content), email)
    assert csv_row[column] == "'" + text
    assert xlsx_row[column] == "'" + text


def test_formula_department_neutralised(client):
    row = row_of(csv_rows(get(client, format="csv").content), "@evil.example.com")
    assert row[2] == f"'{FORMULA_DEPARTMENT_NAME}; Sales"


def test_xlsx_has_no_formulas(client):
    content = get(client, format="xlsx").content
    with zipfile.ZipFile(io.BytesIO(content)) as archive:
        sheets = [name for name in archive.namelist() if "worksheets/" in name]
        xml = b"".join(archive.read(name) for name in sheets)
    assert sheets
    assert b"<f>" not in xml
    assert b"<f " not in xml
    workbook = openpyxl.load_workbook(io.BytesIO(content))
    types = {cell.data_type for row in workbook.active.iter_rows() for cell in row}
    assert types <= {"s", "n"}


def test_xlsx_counts_are_numbers(client):
    workbook = openpyxl.load_workbook(io.BytesIO(get(client, format="xlsx").content))
    rows = list(workbook.active.iter_rows(min_row=2, values_only=True))
    alice = next(row for row in rows if row[3] == "alice.able@example.com")
    assert alice[9] == 2
    assert alice[10] == 1


# Licenses that are not reusable.


@pytest.mark.parametrize("file_format", ["csv", "xlsx"])
def test_non_reusable_cells_blank(client, file_format):
    response = get(client, format=file_format, license_id=COMPLIANCE)
    if file_format == "csv":
        rows = csv_rows(response.content)
    else:
        rows = xlsx_rows(response.content)
    grace = row_of(rows, "grace_hopper@example.com")
    assert grace[7] == "2024-05-01T12:00:00Z; 2024-05-01T12:00:00Z"
    assert grace[8:] == ["", "", ""]


def test_json_keeps_non_reusable_values(client):
    rows = json_rows(client, license_id=COMPLIANCE)
    grace = next(row for row in rows if row["user_id"] == GRACE)
    assert grace["dates_unallocated"] == ["2024-05-02T12:00:00Z"]
    assert grace["allocations"] == 2
    assert grace["unallocations"] == 1


# Dates and time zones.


@pytest.mark.parametrize(
    ("date_format", "zone", "text"),
    [
        ("rfc3339", "UTC", "2024-03-10T03:30:00Z"),
        ("rfc3339", "America/New_York", "2024-03-09T22:30:00-05:00"),
        ("date", "UTC", "2024-03-10"),
        ("date", "America/New_York", "2024-03-09"),
        ("datetime", "UTC", "2024-03-10 03:30"),
        ("datetime", "America/New_York", "2024-03-09 22:30"),
    ],
)
def test_date_format_and_zone(client, date_format, zone, text):
    params = {"format": "csv", "date_format": date_format, "tz": zone}
    rows = csv_rows(get(client, **params, course_id=FIRE_SAFETY).content)
    assert row_of(rows, "bob.baker@example.com")[7] == text


def test_dates_joined_in_zone(client):
    expected = [
        expected_cells(row, "Europe/Paris", "datetime")
        for row in json_rows(client, sort="email")
    ]
    params = {"format": "csv", "tz": "Europe/Paris", "date_format": "datetime"}
    rows = csv_rows(get(client, **params, sort="email").content)
    assert rows[1:] == expected
    alice = row_of(rows, "alice.able@example.com")
    assert alice[7] == "2024-01-10 10:00; 2024-03-05 13:00"


def test_invalid_date_format_rejected(client):
    response = get(client, format="csv", date_format="excel")
    assert response.status_code == 422
    assert response.json()["detail"][0]["parameter"] == "date_format"


# Negotiation and headers.


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        (None, "json"),
        ("", "json"),
        ("*/*", "json"),
        ("application/json", "json"),
        ("text/csv", "csv"),
        ("text/*", "csv"),
        (XLSX, "xlsx"),
        ("text/csv;q=0.5, application/json", "json"),
        ("application/json;q=0.1, text/csv", "csv"),
        (f"text/csv;q=0.4, {XLSX};q=0.6", "xlsx"),
        ("text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8", "json"),
        ("image/png", "json"),
        ("text/csv;q=0", "json"),
        ("text/csv;q=bad", "json"),
    ],
)
def test_negotiate_format(accept, expected):
    assert negotiate_format(accept) == expected


@pytest.mark.parametrize(
    ("accept", "media_type"),
    [
        ("text/csv", "text/csv; charset=utf-8"),
        (XLSX, XLSX),
        ("application/json", "application/json"),
    ],
)
def test_accept_header_chooses_format(client, accept, media_type):
    response = get(client, headers={"Accept": accept})
    assert response.status_code == 200
    assert response.headers["content-type"] == media_type


def test_format_parameter_overrides_accept(client):
    as_json = get(client, headers={"Accept": "text/csv"}, format="json")
    as_xlsx = get(client, headers={"Accept": "application/json"}, format="xlsx")
    assert as_json.headers["content-type"] == "application/json"
    assert as_xlsx.headers["content-type"] == XLSX


@pytest.mark.parametrize("file_format", ["csv", "xlsx"])
def test_content_disposition_filename(client, file_format):
    before = datetime.now(UTC)
    response = get(client, format=file_format)
    after = datetime.now(UTC)
    disposition = response.headers["content-disposition"]
    match = re.fullmatch(
        rf'attachment; filename="license-allocations-{ACME}-(\d{{8}})\.{file_format}"',
        disposition,
    )
    assert match, disposition
    days = {before.strftime("%Y%m%d"), after.strftime("%Y%m%d")}
    assert match.group(1) in days


def test_invalid_format_rejected(client):
    response = get(client, format="pdf")
    assert response.status_code == 422
    assert response.json()["detail"][0]["parameter"] == "format"


def test_download_unknown_company_404(client):
    response = client.get(
        REPORT.format(company=999),
        params={"format": "csv"},
        headers={"Authorization": f"Bearer {KEY}"},
    )
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/json"


def test_download_needs_key(client):
    response = client.get(REPORT.format(company=ACME), params={"format": "csv"})
    assert response.status_code == 401


def test_download_unknown_license_404(client):
    response = get(client, format="xlsx", license_id=123456)
    assert response.status_code == 404
    assert response.json()["detail"][0]["parameter"] == "license_id"


# Streaming: a server-side cursor on PostgreSQL, and memory that stays flat
# as the number of rows grows on SQLite.


def test_postgres_download_uses_server_cursor(postgres_url):
    engine = make_engine(postgres_url)
    load_history(engine, special_history())
    cursors: list[tuple[str, str]] = []

    def record(conn, cursor, statement, parameters, context, executemany):
        cursors.append((type(cursor).__name__, statement))

    event.listen(engine, "before_cursor_execute", record)
    try:
        with TestClient(create_app(_settings(), engine)) as client:
            response = get(client, format="csv")
    finally:
        event.remove(engine, "before_cursor_execute", record)
        engine.dispose()
    assert response.status_code == 200
    streamed = [statement for name, statement in cursors if name == "ServerCursor"]
    assert len(streamed) == 1
    assert "ORDER BY" in streamed[0]


LICENSES = 10
COURSES = 10
TIME = "2024-01-01T00:00:00Z"


def bulk_history(rows: int) -> History:
    """Return a history of ``rows`` report rows: users x 10 licenses x 10 courses."""
    history = History()
    history.add("company.upserted", {"company_id": 1, "name": "Bulk"}, TIME)
    department = {
        "department_id": 10,
        "company_id": 1,
        "name": "All",
        "parent_id": None,
    }
    history.add("department.upserted", department, TIME)
    for number in range(LICENSES):
        license_ = {
            "license_id": 100 + number,
            "company_id": 1,
            "name": f"License {number}",
            "reusable": number % 2 == 0,
        }
        history.add("license.upserted", license_, TIME)
    for number in range(COURSES):
        course = {"course_id": 200 + number, "name": f"Course {number}"}
        history.add("course.upserted", course, TIME)
    for number in range(rows // (LICENSES * COURSES)):
        user_id = 1000 + number
        user = {
            "user_id": user_id,
            "firstname": f"First{number}",
            "lastname": f"Last{number}",
            "email": f"user{number}@example.com",
            "suspended": False,
        }
        history.add("user.upserted", user, TIME)
        member = {"user_id": user_id, "company_id": 1, "department_id": 10}
        history.add("user.department.assigned", member, TIME)
        for license_number in range(LICENSES):
            for course_number in range(COURSES):
                history.allocate(
                    user_id, 100 + license_number, 200 + course_number, TIME
                )
    return history


async def _consume(app, query: bytes) -> tuple[int, int, int]:
    """Send one GET through the ASGI app; return (status, body bytes, chunks)."""
    requests = [{"type": "http.request", "body": b"", "more_body": False}]
    never = asyncio.Event()
    result = {"status": 0, "bytes": 0, "chunks": 0}

    async def receive():
        if requests:
            return requests.pop()
        await never.wait()

    async def send(message):
        if message["type"] == "http.response.start":
            result["status"] = message["status"]
        elif message["type"] == "http.response.body":
            result["bytes"] += len(message.get("body", b""))
            result["chunks"] += 1

    path = REPORT.format(company=1)
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query,
        "root_path": "",
        "headers": [(b"authorization", f"Bearer {KEY}".encode()), (b"host", b"test")],
        "client": ("127.0.0.1", 50000),
        "server": ("test", 80),
    }
    await app(scope, receive, send)
    return result["status"], result["bytes"], result["chunks"]


def _peak_memory(app, query: bytes) -> tuple[int, int]:
    """Return the traced peak of Python memory while serving, and the chunks."""
    tracemalloc.start()
    try:
        status, size, chunks = asyncio.run(_consume(app, query))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert status == 200
    assert size > 0
    return peak, chunks


@pytest.fixture(scope="module")
def bulk_apps(tmp_path_factory) -> Iterator[dict[int, object]]:
    """Apps over SQLite databases of 10,000 and 100,000 report rows."""
    from projections.migrate import upgrade

    apps = {}
    engines = []
    for rows in (10_000, 100_000):
        path = tmp_path_factory.mktemp("bulk") / "report.db"
        engine = make_engine(f"sqlite:///{path}")
        engines.append(engine)
        upgrade(engine)
        load_history(engine, bulk_history(rows))
        app = create_app(_settings(), engine)
        # Warm up: compile the statements and fill SQLAlchemy's caches.
        asyncio.run(_consume(app, b"format=csv&license_id=100&course_id=200"))
        apps[rows] = app
    yield apps
    for engine in engines:
        engine.dispose()


@pytest.mark.timeout(120)
def test_csv_memory_flat_for_100k_rows(bulk_apps):
    small, _ = _peak_memory(bulk_apps[10_000], b"format=csv")
    large, chunks = _peak_memory(bulk_apps[100_000], b"format=csv")
    # Buffering the rows would make the peak grow about tenfold.
    assert large < small * 2, (small, large)
    assert chunks > 50


@pytest.mark.timeout(240)
def test_xlsx_memory_flat(bulk_apps):
    small, _ = _peak_memory(bulk_apps[10_000], b"format=xlsx")
    large, _ = _peak_memory(bulk_apps[100_000], b"format=xlsx")
    # Buffering the rows would make the peak grow about tenfold.
    assert large < small * 2, (small, large)


def test_bulk_csv_row_count(bulk_apps):
    status, size, _ = asyncio.run(_consume(bulk_apps[10_000], b"format=csv"))
    assert status == 200
    # Header plus 10,000 rows of at least 60 bytes each.
    assert size > 10_000 * 60


# Reading rows ahead of the formatting.


def test_fetch_ahead_keeps_order():
    chunks = [[1, 2], [3], [], [4, 5, 6]]
    assert list(fetch_ahead(iter(chunks))) == [1, 2, 3, 4, 5, 6]


def test_fetch_ahead_raises_reader_error():
    def chunks():
        yield [1]
        raise RuntimeError("connection lost")

    rows = fetch_ahead(chunks())
    assert next(rows) == 1
    with pytest.raises(RuntimeError, match="connection lost"):
        next(rows)


def test_fetch_ahead_close_stops_reader():
    """Closing the rows stops the reader before the caller closes the connection."""
    read: list[int] = []

    def chunks():
        for number in itertools.count():
            read.append(number)
            yield [number]

    rows = fetch_ahead(chunks(), depth=2)
    assert next(rows) == 0
    rows.close()
    stopped_at = len(read)
    time.sleep(0.3)
    assert len(read) == stopped_at
    # The depth bounds how far the reader got: one chunk taken, two queued,
    # one waiting to be queued.
    assert stopped_at <= 4
    readers = [t for t in threading.enumerate() if t.name == "download-reader"]
    assert not readers
