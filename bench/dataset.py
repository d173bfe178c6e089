"""Report data for the API benchmarks: a generated history, replicated in SQL.

A history is generated and replayed through ``license-report replay``, then
its live projection is copied inside PostgreSQL with shifted ids, which gives
a large projection in seconds instead of the minutes a replay of millions of
events takes:

- ``replicate_companies`` copies every company with all its departments,
  users, licenses, courses, license events and report rows;
- ``replicate_users`` copies the users of one company, with their
  memberships, license events and report rows, so one company gets large.

Copies keep the shape of the generated data (departments per user, licenses
per user, events per report row), but their names repeat.
"""

from __future__ import annotations

import logging
from pathlib import Path

from sqlalchemy import Engine, text

from bench.common import cli_command, cli_environment, run_process
from bench.generate import generate, plan_chunks
from projections.registry import tables
from projections.schema import Projection

logger = logging.getLogger("bench.dataset")

# Ids of company copy k are the original's plus k times this; generated ids
# stay far below it.
ID_SHIFT = 10_000_000_000
# User copies are shifted by multiples of this, clear of up to 99 company copies.
USER_ID_SHIFT = 100 * ID_SHIFT


def load_history(
    database_url: str,
    work_dir: Path,
    events: int,
    companies: int | None = None,
    seed: int = 1,
    chunk_events: int = 100_000,
) -> None:
    """Generate a history and replay it into the database with the CLI."""
    history = work_dir / "history.jsonl"
    generate(
        plan_chunks(events, companies, seed, chunk_events),
        out=history,
    )
    run_process(
        [*cli_command(), "replay", str(history)],
        work_dir / "replay.log",
        cli_environment(database_url),
    )


def live(engine: Engine) -> Projection:
    with engine.connect() as conn:
        version = conn.execute(
            text("SELECT version FROM projections WHERE status = 'live'")
        ).scalar_one()
    return tables(version)


def replicate_companies(engine: Engine, copies: int) -> None:
    """Add ``copies`` shifted copies of every company's data to the live projection."""
    if copies < 1:
        return
    p = live(engine)
    shift = f"copy.k * {ID_SHIFT}"
    series = f"generate_series(1, {copies}) AS copy(k)"
    statements = [
        _copy(p.companies, {"company_id": f"company_id + {shift}"}, series),
        _copy(
            p.departments,
            {
                "department_id": f"department_id + {shift}",
                "company_id": f"company_id + {shift}",
                "parent_id": f"parent_id + {shift}",
            },
            series,
        ),
        _copy(p.users, {"user_id": f"user_id + {shift}"}, series),
        _copy(
            p.memberships,
            {
                "user_id": f"user_id + {shift}",
                "company_id": f"company_id + {shift}",
                "department_id": f"department_id + {shift}",
            },
            series,
        ),
        _copy(p.courses, {"course_id": f"course_id + {shift}"}, series),
        _copy(
            p.licenses,
            {
                "license_id": f"license_id + {shift}",
                "company_id": f"company_id + {shift}",
            },
            series,
        ),
        _copy(
            p.license_events,
            {
                "event_id": "event_id || '-copy-' || copy.k",
                "user_id": f"user_id + {shift}",
                "license_id": f"license_id + {shift}",
                "course_id": f"course_id + {shift}",
            },
            series,
        ),
        _copy(
            p.license_allocations,
            {
                "user_id": f"user_id + {shift}",
                "license_id": f"license_id + {shift}",
                "course_id": f"course_id + {shift}",
                "company_id": f"company_id + {shift}",
            },
            series,
        ),
    ]
    _run(engine, p, statements)
    logger.info("companies replicated copies=%d", copies)


def replicate_users(engine: Engine, company_id: int, copies: int) -> None:
    """Add ``copies`` shifted copies of the users of one company, and their rows."""
    if copies < 1:
        return
    p = live(engine)
    shift = f"copy.k * {USER_ID_SHIFT}"
    series = f"generate_series(1, {copies}) AS copy(k)"
    licenses = (
        f"license_id IN (SELECT license_id FROM {p.licenses.name} "
        f"WHERE company_id = {int(company_id)})"
    )
    members = (
        f"user_id IN (SELECT user_id FROM {p.memberships.name} "
        f"WHERE company_id = {int(company_id)})"
    )
    statements = [
        _copy(p.users, {"user_id": f"user_id + {shift}"}, series, members),
        _copy(
            p.memberships,
            {"user_id": f"user_id + {shift}"},
            series,
            f"company_id = {int(company_id)}",
        ),
        _copy(
            p.license_events,
            {
                "event_id": "event_id || '-user-copy-' || copy.k",
                "user_id": f"user_id + {shift}",
            },
            series,
            f"{licenses} AND {members}",
        ),
        _copy(
            p.license_allocations,
            {"user_id": f"user_id + {shift}"},
            series,
            f"{licenses} AND {members}",
        ),
    ]
    _run(engine, p, statements)
    logger.info("users replicated company_id=%d copies=%d", company_id, copies)


def _copy(table, shifted: dict[str, str], series: str, where: str = "TRUE") -> str:
    """Return an INSERT that copies ``table``'s rows once per row of ``series``."""
    names = [column.name for column in table.c]
    values = ", ".join(shifted.get(name, name) for name in names)
    return (
        f"INSERT INTO {table.name} ({', '.join(names)}) "
        f"SELECT {values} FROM {table.name}, {series} WHERE {where}"
    )


def _run(engine: Engine, projection: Projection, statements: list[str]) -> None:
    with engine.begin() as conn:
        for statement in statements:
            conn.execute(text(statement))
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        for table in projection.metadata.sorted_tables:
            conn.execute(text(f"VACUUM ANALYZE {table.name}"))


def company_sizes(engine: Engine) -> list[tuple[int, int]]:
    """Return (company id, report rows) of every company, the largest first."""
    p = live(engine)
    query = text(
        f"SELECT l.company_id, count(*) FROM {p.license_allocations.name} a "
        f"JOIN {p.licenses.name} l USING (license_id) "
        "GROUP BY l.company_id ORDER BY count(*) DESC, l.company_id"
    )
    with engine.connect() as conn:
        return [(row[0], row[1]) for row in conn.execute(query)]


def allocation_rows(engine: Engine) -> int:
    p = live(engine)
    with engine.connect() as conn:
        return conn.execute(
            text(f"SELECT count(*) FROM {p.license_allocations.name}")
        ).scalar_one()


# Per scale: events generated, copies of every company, and the report rows
# that the one large company should reach.
SCALES = {
    "tiny": (3_000, 1, 2_000),
    "small": (50_000, 3, 20_000),
    "full": (250_000, 16, 100_000),
}


def build(database_url: str, engine: Engine, work_dir: Path, scale: str, seed: int):
    """Load and replicate the report data of ``scale``; return two company ids.

    The first company is the large one, whose rows reach the scale's size; the
    second is a company of the median size.
    """
    events, copies, large_rows = SCALES[scale]
    load_history(database_url, work_dir, events, seed=seed)
    large, rows = company_sizes(engine)[0]
    replicate_companies(engine, copies)
    # Copies of the users that bring the large company to about large_rows.
    replicate_users(engine, large, max(0, -(-large_rows // rows) - 1))
    sizes = company_sizes(engine)
    typical = sizes[len(sizes) // 2][0]
    logger.info(
        "report data ready rows=%d companies=%d large_company=%d large_rows=%d",
        allocation_rows(engine),
        len(sizes),
        large,
        dict(sizes)[large],
    )
    return large, typical
