"""Benchmark ingestion: Kafka to a committed PostgreSQL projection.

One run generates a history, produces it to a topic of a test broker it
starts, and measures on the same machine:

1. the raw rate at which kafka-python alone fetches the topic and parses each
   value with orjson, in a fresh process;
2. ``license-report consume`` as a subprocess, from its first committed batch
   until the event store holds every event and every dead letter, and its peak
   RSS (VmHWM) just before it is stopped;
3. the baseline: the stored events, as typed rows with their payloads, loaded
   into an empty database by one COPY and plain SQL merges (bench/baseline.py).

Rates count Kafka messages, duplicates and invalid values included, except the
baseline's, which loads each distinct event once.

    python -m bench.ingest --scale full
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from bench import baseline
from bench.common import (
    ResultTable,
    cli_command,
    cli_environment,
    configure_logging,
    kafka_broker,
    parser,
    peak_rss_mb,
    run_in_child,
    start_process,
    stop_process,
    tail,
    target,
    temporary_database,
    work_directory,
)
from bench.generate import Totals, generate, plan_chunks
from projections.registry import tables
from projections.sql import make_engine

logger = logging.getLogger("bench.ingest")

EVENTS = {"tiny": 3_000, "small": 100_000, "full": 1_000_000}
PARTITIONS = 3
TARGET_RAW_RATIO = 0.7
TARGET_PEAK_RSS_MB = 150.0
# Consumer group timings, in milliseconds. kafka-python's defaults made a new
# group wait about 23 s for its first records on the test broker. The rates
# are measured from the first committed batch, so this only shortens the run.
GROUP_TIMINGS = {
    "kafka_session_timeout_ms": "6000",
    "kafka_heartbeat_interval_ms": "1000",
    "kafka_max_poll_interval_ms": "10000",
}
POLL_INTERVAL_S = 0.1


@dataclass(frozen=True)
class Rate:
    """Records done between the first observation and the end, and the time."""

    total: int
    first: int
    seconds_from_first: float
    seconds_total: float

    @property
    def per_second(self) -> float | None:
        """Records per second after the first observation; None if all came at once."""
        if self.total == self.first or self.seconds_from_first <= 0:
            return None
        return (self.total - self.first) / self.seconds_from_first


def raw_consume(bootstrap_servers: str, topic: str, expected: int) -> Rate:
    """Fetch every record of ``topic`` and parse its value; runs in a child."""
    import orjson
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap_servers,
        group_id=None,
        enable_auto_commit=False,
        max_poll_records=5_000,
    )
    try:
        partitions = [
            TopicPartition(topic, number)
            for number in sorted(consumer.partitions_for_topic(topic) or ())
        ]
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        started = time.monotonic()
        count = first = 0
        first_at = None
        deadline = started + 600
        while count < expected and time.monotonic() < deadline:
            records = consumer.poll(timeout_ms=1_000, max_records=5_000)
            for batch in records.values():
                for record in batch:
                    # try/except as the consumer's decoder has, not the slower
                    # contextlib.suppress.
                    try:  # noqa: SIM105
                        orjson.loads(record.value)
                    except orjson.JSONDecodeError:
                        pass
                    count += 1
            if first_at is None and count:
                first_at, first = time.monotonic(), count
        ended = time.monotonic()
    finally:
        consumer.close(autocommit=False)
    if count < expected:
        raise TimeoutError(f"raw consumer read {count} of {expected} records")
    return Rate(count, first, ended - (first_at or ended), ended - started)


@dataclass(frozen=True)
class ConsumerRun:
    """Consumers that ingested a whole topic into one database."""

    rate: Rate
    peak_rss_mb: list[float]


def run_consumers(
    database_url: str,
    bootstrap_servers: str,
    topic: str,
    totals: Totals,
    log_dir: Path,
    count: int = 1,
    timeout_s: float = 900,
) -> ConsumerRun:
    """Start ``count`` consumers in one group and wait until all events are stored.

    The rate counts Kafka messages from the first committed batch to the last.
    """
    environment = cli_environment(
        database_url,
        kafka_bootstrap_servers=bootstrap_servers,
        kafka_topic=topic,
        kafka_group_id=f"bench-{uuid.uuid4().hex[:8]}",
        **GROUP_TIMINGS,
    )
    engine = make_engine(database_url)
    state = tables(1).state.name
    progress_sql = (
        f"SELECT (SELECT coalesce(sum(events_applied), 0) FROM {state}), "
        "(SELECT count(*) FROM dead_letters)"
    )
    started = time.monotonic()
    processes = [
        start_process(
            [*cli_command(), "consume"],
            log_dir / f"consumer-{number}.log",
            environment,
        )
        for number in range(1, count + 1)
    ]
    try:
        first_at, first, done_at = _wait_for_all(
            engine, progress_sql, totals, processes, log_dir, started + timeout_s
        )
        peaks = [peak_rss_mb(process.pid) or 0.0 for process in processes]
    finally:
        for process in processes:
            stop_process(process)
        engine.dispose()
    # Messages per stored event: duplicates and dead letters arrive in between.
    messages_per_done = totals.messages / (totals.events + totals.malformed)
    rate = Rate(
        totals.messages,
        round(first * messages_per_done),
        done_at - first_at,
        done_at - started,
    )
    return ConsumerRun(rate, peaks)


def _wait_for_all(engine, progress_sql, totals, processes, log_dir, deadline):
    """Poll the projection's applied count; return (first time, first count, end)."""
    from sqlalchemy import text

    expected = (totals.events, totals.malformed)
    first_at = first = None
    while True:
        with engine.connect() as conn:
            applied, letters = (int(v) for v in conn.execute(text(progress_sql)).one())
        now = time.monotonic()
        if first_at is None and applied + letters:
            first_at, first = now, applied + letters
        if (applied, letters) == expected:
            return first_at, first, now
        for process in processes:
            if process.poll() is not None:
                raise RuntimeError(
                    f"a consumer exited with {process.returncode}:\n"
                    + tail(log_dir / "consumer-1.log")
                )
        if now > deadline:
            raise TimeoutError(
                f"consumers stored {applied} events and {letters} dead letters, "
                f"expected {expected}"
            )
        time.sleep(POLL_INTERVAL_S)


def measure_baseline(postgres_url: str, events: baseline.Input) -> float:
    """Load the events into an empty database's store and projection."""
    with temporary_database(postgres_url, "ingest_baseline") as url:
        engine = make_engine(url)
        try:
            return baseline.copy_merge(engine, events, tables(1), store=True)
        finally:
            engine.dispose()


def main(argv: list[str] | None = None) -> None:
    arguments = parser(__doc__.split("\n\n")[0])
    arguments.add_argument(
        "--partitions", type=int, default=PARTITIONS, help="partitions of the topic"
    )
    options = arguments.parse_args(argv)
    configure_logging(options.verbose)
    events = EVENTS[options.scale]

    with work_directory(options.work_dir) as work, kafka_broker(work) as broker:
        topic = f"bench-ingest-{uuid.uuid4().hex[:8]}"
        totals = generate(
            plan_chunks(events, seed=options.seed),
            produce=broker.bootstrap_servers,
            topic=topic,
            partitions=options.partitions,
        )
        raw, _ = run_in_child(
            raw_consume, broker.bootstrap_servers, topic, totals.messages
        )
        logger.info("raw consume rate=%s", raw.per_second)
        with temporary_database(options.postgres_url, "ingest") as url:
            run = run_consumers(url, broker.bootstrap_servers, topic, totals, work)
            engine = make_engine(url)
            try:
                events = baseline.export_rows(engine, with_payloads=True)
            finally:
                engine.dispose()
        logger.info("consumer rate=%s", run.rate.per_second)
        baseline_seconds = measure_baseline(options.postgres_url, events)
    print(report(totals, raw, run, baseline_seconds, options).render())


def report(totals, raw: Rate, run: ConsumerRun, baseline_seconds, options):
    table = ResultTable(
        f"Ingest, {totals.messages:,} messages carrying {totals.events:,} events "
        f"and {totals.malformed:,} invalid values, {options.partitions} partitions",
        [
            "run",
            "seconds from first",
            "seconds total",
            "messages/s",
            "peak RSS MiB",
            "rate / raw",
        ],
    )
    raw_rate = raw.per_second
    consumer_rate = run.rate.per_second
    ratio = consumer_rate / raw_rate if raw_rate and consumer_rate else None
    table.add(
        "kafka-python fetch + orjson.loads",
        raw.seconds_from_first,
        raw.seconds_total,
        raw_rate,
        None,
        1.0,
    )
    table.add(
        "license-report consume",
        run.rate.seconds_from_first,
        run.rate.seconds_total,
        consumer_rate,
        run.peak_rss_mb[0],
        ratio,
    )
    table.add(
        "baseline: COPY typed rows + SQL merge (events/s)",
        baseline_seconds,
        baseline_seconds,
        totals.events / baseline_seconds,
        None,
        None,
    )
    rss = max(run.peak_rss_mb)
    table.notes += [
        f"scale {options.scale}; the consumer's total includes its start and the "
        "consumer group join",
        f"target >= {TARGET_RAW_RATIO} of the raw rate: "
        + (f"{ratio:.2f}, {target(ratio >= TARGET_RAW_RATIO)}" if ratio else "n/a"),
        f"target consumer peak RSS < {TARGET_PEAK_RSS_MB:.0f} MiB: {rss:.0f} MiB, "
        f"{target(rss < TARGET_PEAK_RSS_MB)}",
    ]
    return table


if __name__ == "__main__":
    main()
