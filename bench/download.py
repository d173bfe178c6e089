"""Benchmark the CSV download of the report against PostgreSQL's own COPY.

One run builds report data with one company of about 100,000 report rows at
full scale (bench/dataset.py), starts the API in a subprocess, and measures:

1. ``GET /v1/companies/{id}/license-allocations?format=csv`` of every row of
   that company, streamed by httpx, and the server's resident memory before
   and after (VmRSS, VmHWM), once for the rows of one license and once for
   all of them, so a growth with the row count shows;
2. ``COPY (SELECT ...) TO STDOUT WITH (FORMAT csv)`` of the same rows, with
   the SELECT that the download itself runs, compiled with its parameters.

    python -m bench.download --scale full
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import httpx
from sqlalchemy import Engine, text

from bench import dataset
from bench.common import (
    ResultTable,
    configure_logging,
    parser,
    stop_process,
    target,
    temporary_database,
    work_directory,
)
from bench.report import API_KEY, REPORT, start_api
from projections.sql import make_engine

logger = logging.getLogger("bench.download")

TARGET_ROWS_PER_SECOND = 300_000
TARGET_COPY_RATIO = 0.25


@dataclass(frozen=True)
class Download:
    rows: int
    bytes: int
    seconds: float
    rss_before_mb: float
    peak_after_mb: float

    @property
    def rate(self) -> float:
        return self.rows / self.seconds


def _memory_mb(pid: int, field: str) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


def download_csv(base_url: str, server_pid: int, company: int, params) -> Download:
    """Stream one CSV download; count its data rows (the header excluded)."""
    before = _memory_mb(server_pid, "VmRSS")
    size = 0
    lines = 0
    started = time.perf_counter()
    with (
        httpx.Client(base_url=base_url, timeout=600) as client,
        client.stream(
            "GET",
            REPORT.format(company=company),
            params={"format": "csv", **params},
            headers={"Authorization": f"Bearer {API_KEY}"},
        ) as response,
    ):
        if response.status_code != 200:
            response.read()
            raise RuntimeError(f"HTTP {response.status_code}: {response.text[:300]}")
        for chunk in response.iter_bytes():
            size += len(chunk)
            lines += chunk.count(b"\n")
    seconds = time.perf_counter() - started
    # NOTE: a quoted cell with a line break would count twice; the generated
    # names and department names have none.
    return Download(lines - 1, size, seconds, before, _memory_mb(server_pid, "VmHWM"))


def copy_statement(database_url: str, company: int, params) -> str:
    """Return the SELECT that a download runs, with its parameters inlined."""
    from api.database import live_snapshot
    from api.params import report_query
    from api.report import count_rows, download_statement

    engine = make_engine(database_url)
    try:
        with live_snapshot(engine) as (conn, tables):
            query = report_query(**params)
            matching = count_rows(conn, tables, company, query)
            statement = download_statement(matching, query)
            compiled = statement.compile(
                dialect=engine.dialect, compile_kwargs={"literal_binds": True}
            )
            return str(compiled)
    finally:
        engine.dispose()


def copy_csv(engine: Engine, select_sql: str) -> tuple[int, int, float]:
    """Run COPY (SELECT ...) TO STDOUT as CSV; return rows, bytes and seconds."""
    raw = engine.raw_connection()
    try:
        cursor = raw.driver_connection.cursor()
        size = 0
        lines = 0
        started = time.perf_counter()
        with cursor.copy(f"COPY ({select_sql}) TO STDOUT WITH (FORMAT csv)") as copy:
            for chunk in copy:
                size += len(chunk)
                lines += bytes(chunk).count(b"\n")
        seconds = time.perf_counter() - started
        raw.driver_connection.rollback()
    finally:
        raw.close()
    return lines, size, seconds


def main(argv: list[str] | None = None) -> None:
    arguments = parser(__doc__.split("\n\n")[0])
    options = arguments.parse_args(argv)
    configure_logging(options.verbose)
    with (
        work_directory(options.work_dir) as work,
        temporary_database(options.postgres_url, "download") as url,
    ):
        engine = make_engine(url)
        try:
            large, _ = dataset.build(url, engine, work, options.scale, options.seed)
            part, whole = measure_api(url, engine, work, large)
            copied = copy_csv(engine, copy_statement(url, large, {}))
        finally:
            engine.dispose()
    print(render(large, part, whole, copied, options.scale).render())


def measure_api(url: str, engine: Engine, work, company: int):
    """Download one license's rows, then every row, from a fresh API process."""
    license_id = _largest_license(engine, company)
    process, base_url = start_api(url, work)
    try:
        part = download_csv(base_url, process.pid, company, {"license_id": license_id})
        whole = download_csv(base_url, process.pid, company, {})
    finally:
        stop_process(process)
    return part, whole


def render(company, part: Download, whole: Download, copied, scale: str):
    copy_rows, copy_bytes, copy_seconds = copied
    table = ResultTable(
        f"CSV download of company {company}",
        ["run", "rows", "MB", "seconds", "rows/s", "server RSS before / peak MiB"],
    )
    for label, run in (("one license", part), ("every row", whole)):
        table.add(
            f"API format=csv, {label}",
            run.rows,
            run.bytes / 1e6,
            run.seconds,
            run.rate,
            f"{run.rss_before_mb:.0f} / {run.peak_after_mb:.0f}",
        )
    copy_rate = copy_rows / copy_seconds
    table.add(
        "COPY (SELECT ...) TO STDOUT CSV",
        copy_rows,
        copy_bytes / 1e6,
        copy_seconds,
        copy_rate,
        None,
    )
    ratio = whole.rate / copy_rate
    growth = whole.peak_after_mb - whole.rss_before_mb
    table.notes += [
        f"scale {scale}; the API's CSV has IOMAD's columns and formatting, "
        "COPY writes the raw columns of the same SELECT",
        f"target >= {TARGET_ROWS_PER_SECOND:,} rows/s: {whole.rate:,.0f}, "
        f"{target(whole.rate >= TARGET_ROWS_PER_SECOND)}",
        f"target >= {TARGET_COPY_RATIO} of the COPY rate: {ratio:.2f}, "
        f"{target(ratio >= TARGET_COPY_RATIO)}",
        f"server peak grew by {growth:.0f} MiB over its RSS before the whole "
        f"download, {part.peak_after_mb - part.rss_before_mb:.0f} MiB for "
        "the one-license download",
    ]
    return table


def _largest_license(engine: Engine, company: int) -> int:
    p = dataset.live(engine)
    with engine.connect() as conn:
        return conn.execute(
            text(
                f"SELECT a.license_id FROM {p.license_allocations.name} a "
                f"JOIN {p.licenses.name} l USING (license_id) "
                "WHERE l.company_id = :c GROUP BY a.license_id "
                "ORDER BY count(*) DESC LIMIT 1"
            ),
            {"c": company},
        ).scalar_one()


if __name__ == "__main__":
    main()
