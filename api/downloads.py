"""CSV and XLSX downloads of the license allocations report.

A download contains every row that matches the request's filters, in its sort
order; ``page``, ``per_page`` and ``cursor`` are ignored. The rows are read with a
server-side cursor (PostgreSQL) or SQLite's lazy cursor, ``FETCH_ROWS`` at a
time, so the server's memory does not grow with the number of rows. A thread
reads the next rows while the ones before are formatted. A CSV is
streamed as it is written. An XLSX is written to a temporary file first,
because its ZIP container is finished only at the end, and the file is
streamed from there.

Cells follow what IOMAD shows: departments and dates are joined with ``; ``,
and for a license that is not reusable the unallocation dates and both counts
are blank. Text that a spreadsheet could read as a formula gets a leading
single quote.
"""

from __future__ import annotations

import codecs
import csv
import io
import queue
import tempfile
import threading
from collections.abc import Callable, Generator, Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo

import anyio
import anyio.to_thread
import xlsxwriter
from fastapi import Query, Request
from sqlalchemy import RowMapping
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from api.errors import ApiError, Problem
from api.params import ReportQuery
from consumer.timestamps import format_us

CSV_MEDIA_TYPE = "text/csv"
XLSX_MEDIA_TYPE = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"
JSON_MEDIA_TYPE = "application/json"

Format = Literal["json", "csv", "xlsx"]
DateFormat = Literal["rfc3339", "date", "datetime"]

COLUMNS = (
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
)
LIST_SEPARATOR = "; "
# Rows fetched from the database per round trip.
FETCH_ROWS = 1_000
# Bytes of output collected before a chunk is sent to the client.
CHUNK_BYTES = 64 * 1024
# A worksheet has at most 1,048,576 rows, and the header takes one.
MAX_XLSX_ROWS = 1_048_575
SHEET_NAME = "License allocations"

# Leading characters that make Excel, LibreOffice or Google Sheets evaluate a
# cell as a formula (the list OWASP gives for CSV injection).
_FORMULA_TRIGGERS = ("=", "+", "-", "@", "\t", "\r")
_DATE_PATTERNS = {"date": "%Y-%m-%d", "datetime": "%Y-%m-%d %H:%M"}
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MEDIA_FORMATS: dict[str, Format] = {
    JSON_MEDIA_TYPE: "json",
    CSV_MEDIA_TYPE: "csv",
    XLSX_MEDIA_TYPE: "xlsx",
}

Cell = str | int | None

# The report endpoint's 200 response in OpenAPI: JSON, CSV or XLSX.
OPENAPI_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "One page of the report as JSON, or every matching row "
        "as a CSV or XLSX download (format or Accept).",
        "content": {
            CSV_MEDIA_TYPE: {"schema": {"type": "string"}},
            XLSX_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


@dataclass(frozen=True, slots=True)
class DownloadRequest:
    """The file format, date format and time zone of one download."""

    format: Literal["csv", "xlsx"]
    date_format: DateFormat = "rfc3339"
    time_zone: str = "UTC"


def download_request(
    request: Request,
    format_: Annotated[Format | None, Query(alias="format")] = None,
    date_format: DateFormat = "rfc3339",
    # report_query validates tz, so an invalid name never reaches a download.
    tz: str = "UTC",
) -> DownloadRequest | None:
    """Return the download that a request wants, or None for the JSON report.

    ``format`` decides when given; otherwise the Accept header does.
    """
    chosen = format_ or negotiate_format(request.headers.get("accept"))
    if chosen == "json":
        return None
    return DownloadRequest(chosen, date_format, tz)


def negotiate_format(accept: str | None) -> Format:
    """Choose JSON, CSV or XLSX by the q-values of an HTTP Accept header.

    The most specific media range that matches a type gives its quality. JSON
    wins ties and is the result when nothing matches, so a client that sends
    no Accept header or ``*/*`` gets JSON as before.
    """
    ranges = _parse_accept(accept or "")
    best: Format = "json"
    best_quality = _quality(JSON_MEDIA_TYPE, ranges)
    for media_type, name in _MEDIA_FORMATS.items():
        quality = _quality(media_type, ranges)
        if quality > best_quality:
            best, best_quality = name, quality
    return best


def _parse_accept(accept: str) -> list[tuple[str, float]]:
    ranges = []
    for part in accept.split(","):
        media_range, *parameters = part.split(";")
        media_range = media_range.strip().lower()
        if not media_range:
            continue
        quality = 1.0
        for parameter in parameters:
            name, _, value = parameter.partition("=")
            if name.strip().lower() != "q":
                continue
            try:
                quality = min(max(float(value), 0.0), 1.0)
            except ValueError:
                quality = 0.0
        ranges.append((media_range, quality))
    return ranges


def _quality(media_type: str, ranges: list[tuple[str, float]]) -> float:
    main_type = media_type.split("/", 1)[0]
    matches = {media_range: quality for media_range, quality in ranges}
    for candidate in (media_type, f"{main_type}/*", "*/*"):
        if candidate in matches:
            return matches[candidate]
    return 0.0


def download_response(
    request: Request, company_id: int, query: ReportQuery, download: DownloadRequest
) -> StreamingResponse:
    """Stream every row of the report that matches ``query`` as a file.

    The count, which also checks the request's ids, runs before the response
    starts, so an unknown company or id still gets a 404 error response. The
    connection stays open until the last chunk is sent or the client leaves.
    """
    # Imported here because api.report imports this module for its endpoint.
    from api.report import count_rows, download_statement, report_source

    query = replace(query, after=None)
    zone = ZoneInfo(download.time_zone)
    cells = row_cells_formatter(download.date_format, zone)
    stack = ExitStack()
    try:
        conn, tables = stack.enter_context(report_source(request, query))
        matching = count_rows(conn, tables, company_id, query)
        if download.format == "xlsx" and matching.total > MAX_XLSX_ROWS:
            raise _too_many_rows(matching.total)
        rows: Iterator[RowMapping] = iter(())
        if matching.total:
            statement = download_statement(matching, query).execution_options(
                stream_results=True, yield_per=FETCH_ROWS
            )
            result = conn.execute(statement).mappings()
            rows = fetch_ahead(result.partitions())
        if query.as_of_us is not None:
            # A point-in-time snapshot lives in memory behind one connection
            # that other requests share, so it is read at once and released.
            rows = iter(list(rows))
            stack.close()
    except BaseException:
        stack.close()
        raise

    if download.format == "csv":
        chunks = csv_chunks(map(cells, rows))
        media_type = f"{CSV_MEDIA_TYPE}; charset=utf-8"
    else:
        chunks = xlsx_chunks(map(cells, rows))
        media_type = XLSX_MEDIA_TYPE
    filename = download_filename(company_id, download.format, zone)
    headers = {"Content-Disposition": f'attachment; filename="{filename}"'}
    return ClosingStreamingResponse(
        _closing(chunks, stack), media_type=media_type, headers=headers
    )


class ClosingStreamingResponse(StreamingResponse):
    """A streamed file whose generator is closed however the response ends.

    Starlette 1.10 stops iterating when the client disconnects but leaves the
    generator open, so its reader thread and database connection would wait
    for a garbage collection. Closing it runs the generator's cleanup.
    """

    def __init__(self, content: Generator[bytes, None, None], **options: Any):
        super().__init__(content, **options)
        self._content = content

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            # Starlette waits for the worker thread that runs the generator even
            # when the response is cancelled, so the generator is idle here.
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self._content.close)


def fetch_ahead(partitions: Iterator[list[Any]], depth: int = 1) -> Iterator[Any]:
    """Yield the rows of ``partitions``, read by a thread up to ``depth`` ahead.

    The database computes the next rows while the caller formats these ones.
    When the generator closes, it stops the thread and waits for it, so the
    caller may then close the connection. The exception is a close from the
    reader thread itself, by a garbage collection there, which cannot wait.
    """
    chunks: queue.Queue[list[Any] | BaseException | None] = queue.Queue(depth)
    stopping = threading.Event()

    def put(item: list[Any] | BaseException | None) -> bool:
        while not stopping.is_set():
            try:
                chunks.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def read() -> None:
        try:
            for chunk in partitions:
                if not put(chunk):
                    return
        except BaseException as error:  # noqa: BLE001 - raised again by the caller
            put(error)
            return
        put(None)

    reader = threading.Thread(target=read, name="download-reader", daemon=True)
    reader.start()
    try:
        while (chunk := chunks.get()) is not None:
            if isinstance(chunk, BaseException):
                raise chunk
            yield from chunk
    finally:
        stopping.set()
        # A garbage collection in the reader thread may close this generator.
        # The reader then stops by itself after its current fetch.
        if threading.current_thread() is not reader:
            reader.join()


def _closing(chunks: Iterator[bytes], stack: ExitStack) -> Generator[bytes, None, None]:
    try:
        yield from chunks
    finally:
        stack.close()


def _too_many_rows(total: int) -> ApiError:
    message = (
        f"the report has {total} matching rows, more than the {MAX_XLSX_ROWS} that "
        "fit in an XLSX worksheet; download CSV (format=csv) or narrow the filters"
    )
    return ApiError(422, [Problem(message, "format", "query", "value_error")])


def download_filename(company_id: int, extension: str, zone: ZoneInfo) -> str:
    """Return the file name ``license-allocations-<company>-<YYYYMMDD>.<extension>``.

    The date is today's in ``zone``.
    """
    today = datetime.now(zone).strftime("%Y%m%d")
    return f"license-allocations-{company_id}-{today}.{extension}"


def row_cells_formatter(
    date_format: DateFormat, zone: ZoneInfo
) -> Callable[[RowMapping], list[Cell]]:
    """Return a function that turns a row of the report's SQL into the file's cells.

    The cells hold what the JSON report holds, formatted as the file shows it.
    """
    # Imported here because api.report imports this module for its endpoint.
    from api.report import department_sort_key, json_array

    instant = instant_formatter(date_format, zone)

    def dates(text: str | None) -> str:
        return LIST_SEPARATOR.join(map(instant, sorted(json_array(text))))

    def cells(row: RowMapping) -> list[Cell]:
        reusable = row["reusable"]
        departments = sorted(json_array(row["departments"]), key=department_sort_key)
        return [
            neutralise(row["firstname"]),
            neutralise(row["lastname"]),
            neutralise(LIST_SEPARATOR.join(departments)),
            neutralise(row["email"]),
            neutralise(row["license_name"]),
            neutralise(row["course_name"]),
            "Yes" if row["allocated"] else "No",
            dates(row["dates_allocated"]),
            dates(row["dates_unallocated"]) if reusable else None,
            row["allocations"] if reusable else None,
            row["unallocations"] if reusable else None,
        ]

    return cells


def instant_formatter(date_format: DateFormat, zone: ZoneInfo) -> Callable[[int], str]:
    """Return a function that formats microseconds since the epoch in ``zone``.

    ``rfc3339`` gives the instant with its UTC offset (``Z`` for UTC), as the
    JSON report does; ``date`` gives YYYY-MM-DD and ``datetime`` YYYY-MM-DD
    HH:MM, both local to ``zone``.
    """
    if date_format == "rfc3339" and zone.key == "UTC":
        return format_us
    pattern = _DATE_PATTERNS.get(date_format)

    def local(micros: int) -> str:
        instant = (_EPOCH + timedelta(microseconds=micros)).astimezone(zone)
        if pattern is not None:
            return instant.strftime(pattern)
        timespec = "microseconds" if instant.microsecond else "seconds"
        return instant.isoformat(timespec=timespec)

    return local


def neutralise(text: str | None) -> str | None:
    """Prefix a single quote to text that a spreadsheet would run as a formula."""
    if text and text.startswith(_FORMULA_TRIGGERS):
        return "'" + text
    return text


def csv_chunks(rows: Iterable[list[Cell]]) -> Iterator[bytes]:
    """Write a header and ``rows`` as UTF-8 CSV with a byte order mark, in chunks.

    The byte order mark makes Excel read the file as UTF-8. Lines end with
    CRLF, as RFC 4180 specifies, and fields are quoted when they contain a comma, a
    quote or a line break.
    """
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    yield codecs.BOM_UTF8
    writer.writerow(COLUMNS)
    for row in rows:
        writer.writerow(["" if cell is None else cell for cell in row])
        if buffer.tell() >= CHUNK_BYTES:
            yield buffer.getvalue().encode("utf-8")
            buffer.seek(0)
            buffer.truncate()
    yield buffer.getvalue().encode("utf-8")


def xlsx_chunks(rows: Iterable[list[Cell]]) -> Iterator[bytes]:
    """Write a header and ``rows`` to an XLSX workbook, then yield its bytes.

    xlsxwriter's constant_memory mode flushes each row to a temporary file, so
    memory stays flat. Text is always written as a string cell, never as a
    formula, and counts as numbers. Blank cells are left empty.
    """
    with tempfile.TemporaryFile() as output:
        options = {
            "constant_memory": True,
            "strings_to_formulas": False,
            "strings_to_numbers": False,
            "strings_to_urls": False,
        }
        workbook = xlsxwriter.Workbook(output, options)
        try:
            sheet = workbook.add_worksheet(SHEET_NAME)
            header = workbook.add_format({"bold": True})
            for column, name in enumerate(COLUMNS):
                sheet.write_string(0, column, name, header)
            sheet.freeze_panes(1, 0)
            row_count = _write_rows(sheet, rows)
            sheet.autofilter(0, 0, row_count, len(COLUMNS) - 1)
        finally:
            workbook.close()
        output.seek(0)
        while chunk := output.read(CHUNK_BYTES):
            yield chunk


def _write_rows(sheet: Any, rows: Iterable[list[Cell]]) -> int:
    # NOTE: a cell can contain at most 32,767 characters, so xlsxwriter cuts longer
    # text, such as the dates of a row with thousands of allocations.
    row_number = 0
    for row_number, row in enumerate(rows, start=1):
        for column, cell in enumerate(row):
            if cell is None or cell == "":
                continue
            if isinstance(cell, int):
                sheet.write_number(row_number, column, cell)
            else:
                sheet.write_string(row_number, column, cell)
    return row_number
