"""Benchmark the report endpoint against the report computed the way IOMAD does.

One run builds report data (bench/dataset.py: a generated history, replicated
in SQL to over a million report rows at full scale, with one company enlarged
to about 100,000 rows for deep pages), starts ``license-report serve`` with
uvicorn in a subprocess, and measures:

1. the latency of the endpoint for a spread of filters, sort keys and pages,
   from 4 client threads (httpx, one connection each), a bounded number of
   requests per case;
2. the same pages computed the IOMAD way: a query over the log of license
   events (``license_events_vN`` plays IOMAD's log) for the page's distinct
   user, license and course combinations, then count and list queries for
   every row, from 4 threads with their own database connections;
3. the SQL statements one request runs, counted in this process with
   SQLAlchemy's ``before_cursor_execute`` event on the same app.

With ``--explain FILE``, the statements of the slowest cases are written to
FILE with their EXPLAIN (ANALYZE, BUFFERS) plans.

    python -m bench.report --scale full --explain explain.txt
"""

from __future__ import annotations

import logging
import math
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psycopg
from sqlalchemy import Engine, event, text

from api.params import RowKey, encode_cursor
from bench import dataset
from bench.common import (
    ResultTable,
    cli_command,
    cli_environment,
    configure_logging,
    free_port,
    parser,
    start_process,
    stop_process,
    tail,
    target,
    temporary_database,
    work_directory,
)
from projections.schema import Projection
from projections.sql import make_engine

logger = logging.getLogger("bench.report")

API_KEY = "bench-report-key"
REPORT = "/v1/companies/{company}/license-allocations"
PER_PAGE = 50
CONCURRENCY = 4
REQUESTS = {"tiny": 8, "small": 100, "full": 200}
IOMAD_REQUESTS = {"tiny": 4, "small": 12, "full": 12}
# No new request of a case starts after this many seconds. Slow cases thus
# end with fewer requests, and their p99 is close to their maximum.
CASE_SECONDS = {"tiny": 5.0, "small": 15.0, "full": 15.0}
# A case whose request takes longer is reported as timed out and skipped.
# The API's PostgreSQL sessions get the same statement_timeout, so a timed-out
# query stops instead of slowing the cases after it.
REQUEST_TIMEOUT_S = 30.0
WARMUP_REQUESTS = 4
TARGET_FIRST_PAGE_P99_MS = 10.0
TARGET_DEEP_RATIO = 1.5
TARGET_IOMAD_RATIO = 20.0
TARGET_STATEMENTS = 3


@dataclass(frozen=True)
class Case:
    """One kind of request: a company, query parameters, and whether IOMAD's way
    can compute it (it sorts by name only)."""

    name: str
    company: int
    params: dict[str, object]
    iomad: bool = False

    @property
    def first_page(self) -> bool:
        return int(self.params.get("page", 1)) == 1 and "cursor" not in self.params


@dataclass
class Latencies:
    seconds: list[float] = field(default_factory=list)

    def percentile(self, fraction: float) -> float:
        ordered = sorted(self.seconds)
        index = min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))
        return ordered[index] * 1000

    @property
    def p50(self) -> float:
        return statistics.median(self.seconds) * 1000

    @property
    def p99(self) -> float:
        return self.percentile(0.99)


def build_cases(engine: Engine, large: int, typical: int) -> list[Case]:
    """Return the measured requests, with filter values taken from the data."""
    p = dataset.live(engine)
    total = _count(engine, p, large)
    last_page = max(1, math.ceil(total / PER_PAGE))
    license_id = _scalar(
        engine,
        f"SELECT a.license_id FROM {p.license_allocations.name} a "
        f"JOIN {p.licenses.name} l USING (license_id) WHERE l.company_id = :c "
        "GROUP BY a.license_id ORDER BY count(*) DESC LIMIT 1",
        c=large,
    )
    department_id = _scalar(
        engine,
        f"SELECT department_id FROM {p.departments.name} "
        "WHERE company_id = :c AND parent_id IS NULL LIMIT 1",
        c=large,
    )
    cases = []
    for label, company in (("typical", typical), ("large", large)):
        cases += [
            Case(f"{label}: default sort", company, {}, iomad=True),
            Case(f"{label}: firstname desc", company, _sort("firstname", "desc")),
            Case(f"{label}: sort department", company, _sort("department")),
            Case(
                f"{label}: sort last_allocated desc",
                company,
                _sort("last_allocated", "desc"),
            ),
            Case(f"{label}: sort license", company, _sort("license")),
            Case(f"{label}: search", company, {"search": "ber"}),
            Case(f"{label}: allocated=false", company, {"allocated": "false"}),
            Case(
                f"{label}: allocated in 2024 H1",
                company,
                {"allocated_from": "2024-01-01", "allocated_to": "2024-06-30"},
            ),
        ]
    cases += [
        Case("large: license filter", large, {"license_id": license_id}, iomad=True),
        Case("large: department subtree", large, {"department_id": department_id}),
        Case("large: page 20", large, {"page": min(20, last_page)}, iomad=True),
        Case("large: deepest page", large, {"page": last_page}, iomad=True),
        Case(
            "large: deepest page, sort department",
            large,
            {"page": last_page, "sort": "department"},
        ),
        Case(
            "large: deepest page by cursor",
            large,
            {"cursor": _cursor_before(engine, p, large, last_page, "lastname_key")},
        ),
        Case(
            "large: deepest page by cursor, sort department",
            large,
            {
                "cursor": _cursor_before(engine, p, large, last_page, "department_key"),
                "sort": "department",
            },
        ),
    ]
    return cases


def _cursor_before(
    engine: Engine, p: Projection, company: int, page: int, sort_column: str
) -> str:
    """Return the cursor of the last row before ``page`` in the ascending order."""
    row = _row(
        engine,
        f"SELECT user_id, license_id, course_id FROM {p.license_allocations.name} "
        "WHERE company_id = :c AND listed AND NOT suspended "
        f"ORDER BY {sort_column} IS NULL, {sort_column}, lastname_key, "
        "firstname_key, user_id, license_id, course_id "
        "OFFSET :skip LIMIT 1",
        c=company,
        skip=max(0, (page - 1) * PER_PAGE - 1),
    )
    return encode_cursor(RowKey(*row))


def _sort(key: str, order: str = "asc") -> dict[str, object]:
    return {"sort": key, "order": order}


def _scalar(engine: Engine, sql: str, **parameters: object):
    with engine.connect() as conn:
        return conn.execute(text(sql), parameters).scalar()


def _row(engine: Engine, sql: str, **parameters: object) -> tuple:
    with engine.connect() as conn:
        return tuple(conn.execute(text(sql), parameters).one())


def _count(engine: Engine, p: Projection, company: int) -> int:
    return _scalar(
        engine,
        f"SELECT count(*) FROM {p.license_allocations.name} a "
        f"JOIN {p.licenses.name} l USING (license_id) "
        f"JOIN {p.users.name} u USING (user_id) "
        "WHERE l.company_id = :c AND NOT l.deleted AND NOT u.deleted "
        f"AND NOT u.suspended AND a.user_id IN (SELECT user_id FROM "
        f"{p.memberships.name} WHERE company_id = :c AND assigned)",
        c=company,
    )


def run_concurrently(
    work: Callable[[int], None],
    requests: int,
    threads: int = CONCURRENCY,
    max_seconds: float | None = None,
) -> Latencies:
    """Call ``work(i)`` up to ``requests`` times from ``threads`` threads.

    Each call is timed. After ``max_seconds`` no new call starts, once every
    thread has made one.
    """
    latencies = Latencies()
    lock = threading.Lock()
    counter = iter(range(requests))
    errors: list[BaseException] = []
    deadline = None if max_seconds is None else time.monotonic() + max_seconds

    def worker() -> None:
        while True:
            with lock:
                late = deadline is not None and time.monotonic() > deadline
                number = None if late and latencies.seconds else next(counter, None)
            if number is None or errors:
                return
            started = time.perf_counter()
            try:
                work(number)
            except BaseException as error:  # noqa: BLE001 - reported below
                errors.append(error)
                return
            elapsed = time.perf_counter() - started
            with lock:
                latencies.seconds.append(elapsed)

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    if errors:
        raise errors[0]
    return latencies


class CaseTimedOut(Exception):
    """A request of a case took longer than REQUEST_TIMEOUT_S."""


class ApiClients:
    """One httpx client per thread, all on the benchmark's API server."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self._local = threading.local()
        self._all: list[httpx.Client] = []

    def get(self, case: Case) -> None:
        client = getattr(self._local, "client", None)
        if client is None:
            client = httpx.Client(
                base_url=self.base_url,
                headers={"Authorization": f"Bearer {API_KEY}"},
                timeout=REQUEST_TIMEOUT_S + 10,
            )
            self._local.client = client
            self._all.append(client)
        params = {"per_page": PER_PAGE, **case.params}
        try:
            response = client.get(REPORT.format(company=case.company), params=params)
        except httpx.TimeoutException:
            raise CaseTimedOut(case.name) from None
        cancelled = response.elapsed.total_seconds() >= REQUEST_TIMEOUT_S - 1
        if response.status_code >= 500 and cancelled:
            raise CaseTimedOut(case.name)
        if response.status_code != 200:
            raise RuntimeError(
                f"{case.name}: HTTP {response.status_code}: {response.text[:300]}"
            )

    def close(self) -> None:
        for client in self._all:
            client.close()


def measure_api(
    base_url: str, cases: list[Case], requests: int, max_seconds: float
) -> dict[str, Latencies]:
    clients = ApiClients(base_url)
    results = {}
    try:
        for case in cases:
            try:
                run_concurrently(lambda _, c=case: clients.get(c), WARMUP_REQUESTS)
                results[case.name] = run_concurrently(
                    lambda _, c=case: clients.get(c), requests, max_seconds=max_seconds
                )
            except CaseTimedOut:
                logger.warning(
                    "api case timed out case=%r timeout_s=%.0f",
                    case.name,
                    REQUEST_TIMEOUT_S,
                )
                continue
            logger.info(
                "api case=%r p50_ms=%.1f p99_ms=%.1f",
                case.name,
                results[case.name].p50,
                results[case.name].p99,
            )
    finally:
        clients.close()
    return results


class IomadReport:
    """The report computed as IOMAD computes it, over the license event log.

    The page comes from the distinct (user, license, course) combinations in
    the log of the company's licenses, sorted by name; then, for every row of
    the page, separate queries read the user's departments, the license and
    course, whether the license is allocated now, the two counts and the two
    lists of dates.
    """

    def __init__(self, dsn: str, projection: Projection) -> None:
        self.dsn = dsn
        self.t = {name: getattr(projection, name).name for name in _TABLES}
        self._local = threading.local()
        self._all: list[psycopg.Connection] = []

    def _connection(self) -> psycopg.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = psycopg.connect(self.dsn, autocommit=True)
            self._local.conn = conn
            self._all.append(conn)
        return conn

    def page(self, case: Case) -> list[dict[str, object]]:
        conn = self._connection()
        page = int(case.params.get("page", 1))
        license_id = case.params.get("license_id")
        t = self.t
        license_filter = "AND e.license_id = %(license)s" if license_id else ""
        combinations = f"""
            SELECT DISTINCT e.user_id, e.license_id, e.course_id
            FROM {t["license_events"]} e
            JOIN {t["licenses"]} l ON l.license_id = e.license_id
            JOIN {t["users"]} u ON u.user_id = e.user_id
            WHERE l.company_id = %(company)s AND NOT l.deleted AND NOT u.deleted
              AND NOT u.suspended {license_filter}
              AND EXISTS (SELECT 1 FROM {t["memberships"]} m
                          WHERE m.user_id = e.user_id
                            AND m.company_id = %(company)s AND m.assigned)
        """
        parameters = {
            "company": case.company,
            "license": license_id,
            "limit": PER_PAGE,
            "offset": (page - 1) * PER_PAGE,
        }
        conn.execute(f"SELECT count(*) FROM ({combinations}) AS c", parameters)
        rows = conn.execute(
            f"""
            SELECT c.user_id, c.license_id, c.course_id, u.firstname, u.lastname,
                   u.email
            FROM ({combinations}) AS c JOIN {t["users"]} u USING (user_id)
            ORDER BY lower(u.lastname), lower(u.firstname), c.user_id,
                     c.license_id, c.course_id
            LIMIT %(limit)s OFFSET %(offset)s
            """,
            parameters,
        ).fetchall()
        return [self._row(conn, case.company, row) for row in rows]

    def _row(self, conn, company: int, row) -> dict[str, object]:
        user_id, license_id, course_id = row[0], row[1], row[2]
        t = self.t
        key = {"u": user_id, "l": license_id, "c": course_id, "company": company}
        one_row = "user_id = %(u)s AND license_id = %(l)s AND course_id = %(c)s"

        def values(sql: str) -> list:
            return [found[0] for found in conn.execute(sql, key).fetchall()]

        return {
            "departments": values(
                f"SELECT d.name FROM {t['memberships']} m JOIN {t['departments']} d "
                "ON d.department_id = m.department_id WHERE m.user_id = %(u)s "
                "AND m.company_id = %(company)s AND m.assigned AND NOT d.deleted"
            ),
            "license": values(
                f"SELECT name, reusable FROM {t['licenses']} WHERE license_id = %(l)s"
            ),
            "course": values(
                f"SELECT name FROM {t['courses']} WHERE course_id = %(c)s"
            ),
            "allocated": values(
                f"SELECT action FROM {t['license_events']} WHERE {one_row} "
                "ORDER BY time_us DESC, order_sequence DESC LIMIT 1"
            ),
            "allocations": values(
                f"SELECT count(*) FROM {t['license_events']} "
                f"WHERE {one_row} AND action = 1"
            ),
            "unallocations": values(
                f"SELECT count(*) FROM {t['license_events']} "
                f"WHERE {one_row} AND action = 0"
            ),
            "dates_allocated": values(
                f"SELECT at_us FROM {t['license_events']} "
                f"WHERE {one_row} AND action = 1 ORDER BY at_us"
            ),
            "dates_unallocated": values(
                f"SELECT at_us FROM {t['license_events']} "
                f"WHERE {one_row} AND action = 0 ORDER BY at_us"
            ),
        }

    def close(self) -> None:
        for conn in self._all:
            conn.close()


_TABLES = (
    "license_events",
    "licenses",
    "users",
    "memberships",
    "departments",
    "courses",
)


def measure_iomad(
    dsn: str,
    projection: Projection,
    cases: list[Case],
    requests: int,
    max_seconds: float,
) -> dict[str, Latencies]:
    report = IomadReport(dsn, projection)
    results = {}
    try:
        for case in (case for case in cases if case.iomad):
            run_concurrently(lambda _, c=case: report.page(c), CONCURRENCY)
            results[case.name] = run_concurrently(
                lambda _, c=case: report.page(c), requests, max_seconds=max_seconds
            )
            logger.info("iomad case=%r p50_ms=%.1f", case.name, results[case.name].p50)
    finally:
        report.close()
    return results


@dataclass
class Statements:
    """The SQL statements that requests ran, per case."""

    captured: dict[str, list[tuple[str, object]]] = field(default_factory=dict)

    def count(self, name: str) -> int:
        return len(self.captured.get(name, []))


def capture_statements(database_url: str, cases: list[Case]) -> Statements:
    """Run one request per case in this process and record its SQL statements.

    Pass only cases that did not time out: this client has no time limit.
    """
    from fastapi.testclient import TestClient

    from api.app import create_app
    from license_report.settings import Settings

    engine = make_engine(database_url)
    statements = Statements()
    current: list[tuple[str, object]] = []

    def record(_conn, _cursor, statement, parameters, _context, _executemany):
        current.append((statement, parameters))

    settings = Settings(
        database_url=database_url,
        api_keys=f'{{"{API_KEY}": "*"}}',
        rate_limit_per_minute=0,
    )
    try:
        with TestClient(create_app(settings, engine)) as client:
            client.headers["Authorization"] = f"Bearer {API_KEY}"
            event.listen(engine, "before_cursor_execute", record)
            for case in cases:
                current.clear()
                params = {"per_page": PER_PAGE, **case.params}
                response = client.get(
                    REPORT.format(company=case.company), params=params
                )
                if response.status_code != 200:
                    raise RuntimeError(f"{case.name}: HTTP {response.status_code}")
                statements.captured[case.name] = list(current)
    finally:
        engine.dispose()
    return statements


def write_explain(
    database_url: str,
    statements: Statements,
    api: dict[str, Latencies],
    path: Path,
    count: int = 4,
) -> None:
    """Write the EXPLAIN ANALYZE plans of the ``count`` slowest cases' statements."""
    slowest = sorted(api, key=lambda name: api[name].p99, reverse=True)[:count]
    engine = make_engine(database_url)
    raw = engine.raw_connection()
    try:
        cursor = raw.driver_connection.cursor()
        with open(path, "w") as out:
            for name in slowest:
                out.write(f"=== {name}: p50 {api[name].p50:.1f} ms, ")
                out.write(f"p99 {api[name].p99:.1f} ms\n")
                for statement, parameters in statements.captured[name]:
                    cursor.execute(
                        "EXPLAIN (ANALYZE, BUFFERS) " + statement, parameters
                    )
                    plan = "\n".join(row[0] for row in cursor.fetchall())
                    out.write(f"\n{statement}\n{parameters}\n\n{plan}\n\n")
        raw.driver_connection.rollback()
    finally:
        raw.close()
        engine.dispose()
    logger.info("plans written path=%s", path)


def write_plans_without_running(
    database_url: str, cases: list[Case], path: Path
) -> None:
    """Append the EXPLAIN plans, without ANALYZE, of the page query of ``cases``.

    For cases that timed out: running them again would take as long.
    """
    from api.database import live_snapshot
    from api.params import report_query
    from api.report import count_rows, page_statement

    engine = make_engine(database_url)
    try:
        with open(path, "a") as out, live_snapshot(engine) as (conn, tables):
            for case in cases:
                params = {
                    name: {"true": True, "false": False}.get(value, value)
                    for name, value in case.params.items()
                }
                query = report_query(per_page=PER_PAGE, **params)
                matching = count_rows(conn, tables, case.company, query)
                statement = page_statement(matching, query).compile(
                    dialect=engine.dialect, compile_kwargs={"literal_binds": True}
                )
                plan = conn.exec_driver_sql(f"EXPLAIN {statement}").scalars()
                out.write(f"=== {case.name}: timed out after {REQUEST_TIMEOUT_S} s, ")
                out.write("plan without ANALYZE\n\n")
                out.write(f"{statement}\n\n" + "\n".join(plan) + "\n\n")
    finally:
        engine.dispose()


def start_api(database_url: str, work_dir: Path, workers: int = 1):
    """Start the API under uvicorn; return the process and its base URL.

    With one worker this is ``license-report serve``; with more, uvicorn's own
    command with the app factory, as api/app.py describes.
    """
    port = free_port()
    environment = cli_environment(
        database_url,
        api_keys=f'{{"{API_KEY}": "*"}}',
        rate_limit_per_minute="0",
        log_level="WARNING",
    )
    # libpq passes these server settings to every connection the API opens.
    timeout_ms = int(REQUEST_TIMEOUT_S * 1000)
    environment["PGOPTIONS"] = f"-c statement_timeout={timeout_ms}"
    address = ["--host", "127.0.0.1", "--port", str(port)]
    if workers == 1:
        command = [*cli_command(), "serve", *address]
    else:
        command = [
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            "api.app:app_from_environment",
            "--workers",
            str(workers),
            "--no-access-log",
            *address,
        ]
    process = start_process(command, work_dir / "api.log", environment)
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError("the API exited:\n" + tail(work_dir / "api.log"))
        try:
            httpx.get(base_url + "/healthz", timeout=1)
            return process, base_url
        except httpx.TransportError:
            time.sleep(0.1)
    stop_process(process)
    raise TimeoutError("the API did not respond within 60 s; see its log")


def main(argv: list[str] | None = None) -> None:
    arguments = parser(__doc__.split("\n\n")[0])
    arguments.add_argument(
        "--explain",
        type=Path,
        default=None,
        help="file to write the EXPLAIN ANALYZE plans of the slowest cases to",
    )
    arguments.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="uvicorn worker processes (default: one per CPU)",
    )
    options = arguments.parse_args(argv)
    configure_logging(options.verbose)
    with (
        work_directory(options.work_dir) as work,
        temporary_database(options.postgres_url, "report") as url,
    ):
        engine = make_engine(url)
        try:
            large, typical = dataset.build(
                url, engine, work, options.scale, options.seed
            )
            rows = dataset.allocation_rows(engine)
            cases = build_cases(engine, large, typical)
            projection = dataset.live(engine)
        finally:
            engine.dispose()
        process, base_url = start_api(url, work, options.workers)
        try:
            api = measure_api(
                base_url, cases, REQUESTS[options.scale], CASE_SECONDS[options.scale]
            )
        finally:
            stop_process(process)
        dsn = make_engine(url).url.render_as_string(hide_password=False)
        dsn = dsn.replace("postgresql+psycopg://", "postgresql://")
        iomad = measure_iomad(
            dsn,
            projection,
            cases,
            IOMAD_REQUESTS[options.scale],
            CASE_SECONDS[options.scale],
        )
        statements = capture_statements(
            url, [case for case in cases if case.name in api]
        )
        if options.explain:
            write_explain(url, statements, api, options.explain)
            timed_out = [case for case in cases if case.name not in api]
            write_plans_without_running(url, timed_out, options.explain)
    table = render(cases, api, iomad, statements, rows, options.scale, options.workers)
    print(table.render())


def render(
    cases, api, iomad, statements, rows: int, scale: str, workers: int
) -> ResultTable:
    table = ResultTable(
        f"Report endpoint, {rows:,} report rows, {CONCURRENCY} concurrent clients, "
        f"{workers} uvicorn workers, {PER_PAGE} rows per page",
        [
            "case",
            "requests",
            "p50 ms",
            "p99 ms",
            "SQL statements",
            "IOMAD-style p50 ms",
            "IOMAD / API (p50)",
        ],
    )
    for case in cases:
        result = api.get(case.name)
        other = iomad.get(case.name)
        if result is None:
            timed_out = f"> {REQUEST_TIMEOUT_S:.0f} s"
            table.add(case.name, 0, timed_out, timed_out, None, None, None)
            continue
        table.add(
            case.name,
            len(result.seconds),
            result.p50,
            result.p99,
            statements.count(case.name),
            other.p50 if other else None,
            other.p50 / result.p50 if other else None,
        )
    first_pages = [
        api[case.name].p99 if case.name in api else REQUEST_TIMEOUT_S * 1000
        for case in cases
        if case.first_page
    ]
    worst_first = max(first_pages)
    first = api["large: default sort"].p50
    deep = api["large: deepest page"].p50 / first
    deep_cursor = api["large: deepest page by cursor"].p50 / first
    ratios = [iomad[name].p50 / api[name].p50 for name in iomad if name in api]
    max_statements = max(statements.count(name) for name in statements.captured)
    table.notes += [
        f"scale {scale}; latencies include HTTP and JSON encoding, IOMAD-style "
        "latencies only the database round trips",
        f"target p99 < {TARGET_FIRST_PAGE_P99_MS:.0f} ms for every first page: "
        f"worst {worst_first:.1f} ms, "
        f"{target(worst_first < TARGET_FIRST_PAGE_P99_MS)}",
        f"target deepest page within {TARGET_DEEP_RATIO}x of the first (p50): "
        f"by cursor {deep_cursor:.2f}x, {target(deep_cursor <= TARGET_DEEP_RATIO)}; "
        f"by page number {deep:.2f}x",
        f"target >= {TARGET_IOMAD_RATIO:.0f}x faster than IOMAD-style (p50): "
        f"lowest {min(ratios):.1f}x, {target(min(ratios) >= TARGET_IOMAD_RATIO)}",
        f"target <= {TARGET_STATEMENTS} SQL statements per request: at most "
        f"{max_statements}, {target(max_statements <= TARGET_STATEMENTS)}",
    ]
    return table


if __name__ == "__main__":
    main()
