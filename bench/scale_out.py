"""Benchmark ingestion with 1, 2 and 4 consumer processes in one group.

One run produces a history to a topic with 8 partitions, then for each
consumer count starts that many ``license-report consume`` processes in a new
consumer group on a new database, and measures the rate from the first
committed batch until the event store holds every event. The consumers, the
broker and PostgreSQL share the machine's cores, so the figures show what more
processes give on this machine, not what consumers on machines of their own
would give. A single consumer waits for PostgreSQL for about half of its time,
so a second one can use that time; past the number of cores, more consumers
only add contention and rebalancing.

    python -m bench.scale_out --scale full
"""

from __future__ import annotations

import logging
import os
import uuid

from bench.common import (
    ResultTable,
    configure_logging,
    kafka_broker,
    parser,
    temporary_database,
    work_directory,
)
from bench.generate import generate, plan_chunks
from bench.ingest import run_consumers

logger = logging.getLogger("bench.scale_out")

EVENTS = {"tiny": 3_000, "small": 100_000, "full": 500_000}
PARTITIONS = 8
CONSUMER_COUNTS = (1, 2, 4)


def main(argv: list[str] | None = None) -> None:
    arguments = parser(__doc__.split("\n\n")[0])
    options = arguments.parse_args(argv)
    configure_logging(options.verbose)
    runs = {}
    with work_directory(options.work_dir) as work, kafka_broker(work) as broker:
        topic = f"bench-scale-out-{uuid.uuid4().hex[:8]}"
        totals = generate(
            plan_chunks(EVENTS[options.scale], seed=options.seed),
            produce=broker.bootstrap_servers,
            topic=topic,
            partitions=PARTITIONS,
        )
        for count in CONSUMER_COUNTS:
            log_dir = work / f"consumers-{count}"
            log_dir.mkdir(exist_ok=True)
            with temporary_database(options.postgres_url, f"scale{count}") as url:
                runs[count] = run_consumers(
                    url, broker.bootstrap_servers, topic, totals, log_dir, count
                )
            logger.info("consumers=%d rate=%s", count, runs[count].rate.per_second)

    table = ResultTable(
        f"Scale-out, {totals.messages:,} messages, {PARTITIONS} partitions",
        [
            "consumers",
            "seconds from first",
            "seconds total",
            "messages/s",
            "rate / 1 consumer",
            "peak RSS MiB each",
        ],
    )
    single = runs[1].rate.per_second
    for count, run in runs.items():
        rate = run.rate.per_second
        table.add(
            count,
            run.rate.seconds_from_first,
            run.rate.seconds_total,
            rate,
            rate / single if rate and single else None,
            " ".join(f"{peak:.0f}" for peak in run.peak_rss_mb),
        )
    table.notes.append(
        f"scale {options.scale}; the broker, the consumers and PostgreSQL share "
        f"this machine's {os.cpu_count()} cores, so more consumers than cores add "
        "contention, not speed; consumers on machines of their own would scale "
        "differently"
    )
    print(table.render())


if __name__ == "__main__":
    main()
