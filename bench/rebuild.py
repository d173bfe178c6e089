"""Benchmark the rebuild of a projection from the event store and from a file.

One run generates a history, then on one PostgreSQL database:

1. ``license-report rebuild --from FILE`` on the empty database (the file is
   replayed into the event store and the live projection, then a new version is
   built from the store);
2. ``rebuild_from_store`` twice, each in a fresh process, whose peak RSS is
   its own; the second must build the same rows, and ``projections.verify``
   must then find no difference;
3. the baselines: the stored events loaded by one COPY, as typed rows and as
   JSON, and merged by plain SQL (bench/baseline.py) into a separate set of
   tables, which must hold the same rows as the live projection.

    python -m bench.rebuild --scale full
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy import Engine

from bench import baseline
from bench.common import (
    ResultTable,
    cli_command,
    cli_environment,
    configure_logging,
    parser,
    run_in_child,
    run_process,
    scalar,
    target,
    temporary_database,
    work_directory,
)
from bench.generate import generate, plan_chunks
from projections.rebuild import DEFAULT_BATCH_SIZE, rebuild_from_store
from projections.registry import tables
from projections.sql import make_engine
from projections.verify import verify

logger = logging.getLogger("bench.rebuild")

EVENTS = {"tiny": 3_000, "small": 100_000, "full": 1_000_000}
TARGET_SECONDS_PER_MILLION = 15.0
TARGET_BASELINE_RATIO = 1.5
TARGET_PEAK_RSS_MB = 256.0


@dataclass(frozen=True)
class StoreRebuild:
    """One rebuild_from_store run in a child process."""

    version: int
    events: int
    seconds: float
    peak_rss_mb: float

    @property
    def rate(self) -> float:
        return self.events / self.seconds


def rebuild_in_child(database_url: str, batch_size: int) -> tuple[int, int, float]:
    """Run rebuild_from_store; return the new version, its events and seconds."""
    engine = make_engine(database_url)
    try:
        result = rebuild_from_store(engine, batch_size=batch_size)
    finally:
        engine.dispose()
    return result.version, result.events, result.seconds


def rebuild_from_store_measured(database_url: str, batch_size: int) -> StoreRebuild:
    (version, events, seconds), rss = run_in_child(
        rebuild_in_child, database_url, batch_size
    )
    logger.info(
        "rebuild from store version=%d events=%d seconds=%.2f peak_rss_mb=%.0f",
        version,
        events,
        seconds,
        rss,
    )
    return StoreRebuild(version, events, seconds, rss)


def live_version(engine: Engine) -> int:
    return scalar(engine, "SELECT version FROM projections WHERE status = 'live'")


def measure_baselines(engine: Engine) -> dict[str, float]:
    """Run both COPY-plus-merge baselines; return the seconds of each.

    Raises SystemExit when a baseline's tables differ from the live projection.
    """
    inputs = {
        "typed rows": baseline.export_rows(engine, with_payloads=False),
        "JSON": baseline.export_payloads(engine),
    }
    seconds = {}
    for label, events in inputs.items():
        projection = baseline.unused_version(engine)
        with engine.begin() as conn:
            projection.metadata.create_all(conn)
        try:
            seconds[label] = baseline.copy_merge(
                engine, events, projection, store=False
            )
            live = tables(live_version(engine))
            differing = baseline.compare_projections(engine, live, projection)
        finally:
            with engine.begin() as conn:
                projection.metadata.drop_all(conn)
        logger.info(
            "baseline input=%s seconds=%.2f differing_rows=%d",
            label,
            seconds[label],
            differing,
        )
        if differing:
            raise SystemExit(
                f"FAILED: the baseline from {label} differs from the projection "
                f"in {differing} rows"
            )
    return seconds


def main(argv: list[str] | None = None) -> None:
    arguments = parser(__doc__.split("\n\n")[0])
    arguments.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULT_BATCH_SIZE,
        help="events per rebuild transaction",
    )
    options = arguments.parse_args(argv)
    configure_logging(options.verbose)
    events = EVENTS[options.scale]

    with work_directory(options.work_dir) as work:
        history = work / "history.jsonl"
        totals = generate(plan_chunks(events, seed=options.seed), out=history)
        with temporary_database(options.postgres_url, "rebuild") as url:
            engine = make_engine(url)
            try:
                table = run_benchmark(engine, url, options, history, work)
            finally:
                engine.dispose()
    table.notes.insert(0, f"history: {totals.messages:,} lines, scale {options.scale}")
    print(table.render())


def run_benchmark(engine: Engine, url: str, options, history, work) -> ResultTable:
    from_file = run_process(
        [*cli_command(), "rebuild", "--from", str(history)],
        work / "rebuild-from-file.log",
        cli_environment(url),
    )
    stored = scalar(engine, "SELECT count(*) FROM event_store")
    logger.info(
        "rebuild from file events=%d seconds=%.2f peak_rss_mb=%.0f",
        stored,
        from_file.seconds,
        from_file.peak_rss_mb,
    )
    first = rebuild_from_store_measured(url, options.batch_size)
    second = rebuild_from_store_measured(url, options.batch_size)
    changed = baseline.compare_projections(
        engine, tables(first.version), tables(second.version)
    )
    verified = verify(engine)
    baselines = measure_baselines(engine)
    floor = baselines["typed rows"]

    table = ResultTable(
        f"Rebuild, {stored:,} stored events",
        ["run", "seconds", "events/s", "peak RSS MiB", "time / baseline"],
    )
    for label, run in (("rebuild --from store", first), ("second rebuild", second)):
        table.add(label, run.seconds, run.rate, run.peak_rss_mb, run.seconds / floor)
    table.add(
        "rebuild --from FILE (CLI, replay + rebuild)",
        from_file.seconds,
        stored / from_file.seconds,
        from_file.peak_rss_mb,
        from_file.seconds / floor,
    )
    table.add("baseline: COPY typed rows + SQL merge", floor, stored / floor, None, 1.0)
    json_seconds = baselines["JSON"]
    table.add(
        "baseline: COPY JSON + SQL parse + merge",
        json_seconds,
        stored / json_seconds,
        None,
        json_seconds / floor,
    )
    best = min(first.seconds, second.seconds)
    per_million = best * 1_000_000 / stored
    rss = max(first.peak_rss_mb, second.peak_rss_mb)
    table.notes += [
        f"second rebuild changed {changed} rows; verify found "
        f"{len(verified.differences)} differences; both baselines built the "
        "projection's rows",
        f"target 1M events from the store in < {TARGET_SECONDS_PER_MILLION:.0f} s: "
        f"{per_million:.1f} s per million, "
        f"{target(per_million < TARGET_SECONDS_PER_MILLION)}",
        f"target within {TARGET_BASELINE_RATIO}x of the typed-rows baseline: "
        f"{best / floor:.2f}x, {target(best / floor <= TARGET_BASELINE_RATIO)}",
        f"target peak RSS < {TARGET_PEAK_RSS_MB:.0f} MiB: {rss:.0f} MiB, "
        f"{target(rss < TARGET_PEAK_RSS_MB)}",
    ]
    if changed or verified.differences:
        raise SystemExit(table.render() + "\n\nFAILED: the projections differ")
    return table


if __name__ == "__main__":
    main()
