"""The consume loop: poll a batch, apply it with its offsets in one transaction.

The database, not Kafka, is the source of truth for consumed offsets. On every
partition assignment the consumer seeks to the offsets stored in the database;
offsets committed to Kafka exist only for monitoring tools.
"""

from __future__ import annotations

import contextlib
import logging
import random
import signal
import threading
import time
from collections.abc import Iterable
from typing import NamedTuple

import prometheus_client
from kafka import (
    ConsumerRebalanceListener,
    KafkaConsumer,
    OffsetAndMetadata,
    TopicPartition,
)
from kafka.errors import KafkaError
from sqlalchemy import Engine, select
from sqlalchemy.exc import DBAPIError

from consumer.batch import decode_values
from license_report import metrics
from license_report.settings import Settings
from projections import schema
from projections.apply import OffsetsFenced, OffsetUpdate, apply_batch

logger = logging.getLogger(__name__)

# Back-off between retries of a failed batch, in seconds.
RETRY_BASE_SECONDS = 0.5
RETRY_MAX_SECONDS = 30.0
# Time limits, in milliseconds, of the Kafka calls that serve only monitoring
# (the offset commit) or a clean exit (leaving the group). Without them, each call
# waits up to request_timeout_ms while the broker does not respond. That stalls
# the loop after every batch and delays a shutdown past what supervisors allow.
KAFKA_COMMIT_TIMEOUT_MS = 5_000
KAFKA_CLOSE_TIMEOUT_MS = 5_000


class _Span(NamedTuple):
    """The first and the last offset of one partition's records in a batch."""

    first: int
    last: int


class LicenseEventConsumer:
    """Consumes the license topic into the projection, exactly once in effect."""

    def __init__(self, settings: Settings, engine: Engine) -> None:
        self.settings = settings
        self.engine = engine
        self.stopping = threading.Event()
        self._kafka: KafkaConsumer | None = None
        self._failures = 0
        # SQLAlchemy wraps the driver's errors in DBAPIError, except in code that
        # uses the driver connection itself, such as a COPY into a staging table.
        self.database_errors: tuple[type[Exception], ...] = (
            DBAPIError,
            engine.dialect.loaded_dbapi.Error,
        )
        # The stored next offset per partition this process last read or wrote;
        # None when the database has no row for the partition yet.
        self.expected: dict[TopicPartition, int | None] = {}

    def run(self) -> None:
        """Consume until ``stop()`` is called or SIGTERM/SIGINT arrives."""
        settings = self.settings
        logger.info(
            "consumer starting topic=%s group_id=%s bootstrap_servers=%s",
            settings.kafka_topic,
            settings.kafka_group_id,
            settings.kafka_bootstrap_servers,
        )
        self._kafka = KafkaConsumer(
            bootstrap_servers=settings.kafka_bootstrap_servers.split(","),
            group_id=settings.kafka_group_id,
            client_id=f"license-report-{settings.kafka_group_id}",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=settings.kafka_session_timeout_ms,
            heartbeat_interval_ms=settings.kafka_heartbeat_interval_ms,
            max_poll_interval_ms=settings.kafka_max_poll_interval_ms,
            max_poll_records=settings.batch_max_records,
            max_partition_fetch_bytes=settings.kafka_max_partition_fetch_bytes,
            fetch_max_bytes=settings.kafka_fetch_max_bytes,
        )
        self._kafka.subscribe([settings.kafka_topic], listener=_Rebalance(self))
        if settings.metrics_port:
            prometheus_client.start_http_server(
                settings.metrics_port, addr=settings.metrics_host
            )
            logger.info(
                "metrics served host=%s port=%d",
                settings.metrics_host,
                settings.metrics_port,
            )
        try:
            while not self.stopping.is_set():
                records = self._kafka.poll(
                    timeout_ms=settings.batch_timeout_ms,
                    max_records=settings.batch_max_records,
                )
                if records:
                    self._process(records)
                self._record_lag()
        finally:
            self._kafka.close(autocommit=False, timeout_ms=KAFKA_CLOSE_TIMEOUT_MS)
            logger.info("consumer stopped group_id=%s", settings.kafka_group_id)

    def stop(self) -> None:
        """Ask the loop to stop after the batch in flight; safe from any thread."""
        self.stopping.set()

    def install_signal_handlers(self) -> None:
        """Stop cleanly on SIGTERM and SIGINT."""

        def handle(signum: int, _frame: object) -> None:
            logger.info(
                "signal received, stopping signal=%s", signal.Signals(signum).name
            )
            self.stop()

        signal.signal(signal.SIGTERM, handle)
        signal.signal(signal.SIGINT, handle)

    def stored_offsets(
        self, partitions: Iterable[TopicPartition]
    ) -> dict[TopicPartition, int]:
        """Read the next offsets to consume from the database."""
        wanted = {(tp.topic, tp.partition): tp for tp in partitions}
        table = schema.consumer_offsets
        query = select(table.c.topic, table.c.partition, table.c.next_offset).where(
            table.c.group_id == self.settings.kafka_group_id,
            table.c.topic.in_({topic for topic, _ in wanted}),
        )
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        return {
            wanted[(topic, partition)]: offset
            for topic, partition, offset in rows
            if (topic, partition) in wanted
        }

    def _process(self, records: dict[TopicPartition, list]) -> None:
        """Apply one polled batch, or rewind it for another try if that fails.

        ``records`` is emptied once decoded, so that the fetched records and
        their raw values are freed before the database work begins.
        """
        started = time.monotonic()
        count = sum(len(batch) for batch in records.values())
        spans = {
            tp: _Span(batch[0].offset, batch[-1].offset)
            for tp, batch in records.items()
        }
        values = (
            (record.topic, record.partition, record.offset, record.value)
            for partition_records in records.values()
            for record in partition_records
        )
        decoded = decode_values(values)
        records.clear()
        group_id = self.settings.kafka_group_id
        offsets = {
            (group_id, tp.topic, tp.partition): OffsetUpdate(
                self.expected.get(tp), span.last + 1
            )
            for tp, span in spans.items()
        }
        try:
            with self.engine.begin() as conn:
                result = apply_batch(
                    conn, decoded.events, decoded.dead_letters, offsets
                )
        except OffsetsFenced as fenced:
            self._resync(spans, fenced)
            return
        except self.database_errors as error:
            metrics.BATCH_RETRIES.labels(reason="database").inc()
            self._rewind(spans)
            self._back_off(error, offsets)
            return

        self._failures = 0
        for tp, span in spans.items():
            self.expected[tp] = span.last + 1
        self._record(result, time.monotonic() - started)
        logger.info(
            "batch applied records=%d applied=%d duplicates=%d dead_letters=%d "
            "seconds=%.3f",
            count,
            sum(result.applied.values()),
            result.duplicates,
            result.dead_letters,
            time.monotonic() - started,
        )
        self._commit_to_kafka(spans)

    def _record(self, result, seconds: float) -> None:
        metrics.BATCH_SECONDS.observe(seconds)
        for event_type, count in result.applied.items():
            metrics.EVENTS_APPLIED.labels(type=event_type).inc(count)
        metrics.DUPLICATES.inc(result.duplicates)
        metrics.DEAD_LETTERS.inc(result.dead_letters)
        if result.newest_time_us is not None:
            metrics.record_newest_event(result.newest_time_us)

    def _record_lag(self) -> None:
        for tp in self._kafka.assignment():
            highwater = self._kafka.highwater(tp)
            if highwater is None:
                continue
            position = self._kafka.position(tp, timeout_ms=0)
            if position is None:
                continue
            lag = max(0, highwater - position)
            metrics.CONSUMER_LAG.labels(topic=tp.topic, partition=tp.partition).set(lag)

    def _resync(
        self, spans: dict[TopicPartition, _Span], fenced: OffsetsFenced
    ) -> None:
        """Drop a batch another consumer got to first; resume from stored offsets."""
        metrics.BATCH_RETRIES.labels(reason="fenced").inc()
        logger.warning("batch dropped, %s", fenced)
        partitions = set(spans)
        try:
            stored = self.stored_offsets(partitions)
        except self.database_errors as error:
            self._rewind(spans)
            self._back_off(error, {})
            return
        for tp in partitions:
            self.expected[tp] = stored.get(tp)
            if tp in stored:
                self._kafka.seek(tp, stored[tp])
            else:
                self._kafka.seek(tp, spans[tp].first)

    def _rewind(self, spans: dict[TopicPartition, _Span]) -> None:
        """Seek back to the first record of each partition so it is polled again."""
        for tp, span in spans.items():
            self._kafka.seek(tp, span.first)

    def _back_off(self, error: Exception, offsets: dict) -> None:
        self._failures += 1
        delay = min(RETRY_MAX_SECONDS, RETRY_BASE_SECONDS * 2 ** (self._failures - 1))
        delay *= random.uniform(0.5, 1.0)
        log = (
            logger.warning
            if self._failures <= 5 or self._failures % 20 == 0
            else logger.debug
        )
        log(
            "batch failed, retrying attempt=%d delay_seconds=%.1f partitions=%s "
            "error=%s",
            self._failures,
            delay,
            sorted((topic, partition) for _, topic, partition in offsets),
            _one_line(error),
        )
        self.stopping.wait(delay)

    def _commit_to_kafka(self, spans: dict[TopicPartition, _Span]) -> None:
        """Commit the applied offsets to Kafka for monitoring; failures are harmless."""
        offsets = {
            tp: OffsetAndMetadata(span.last + 1, "", -1) for tp, span in spans.items()
        }
        try:
            self._kafka.commit(offsets, timeout_ms=KAFKA_COMMIT_TIMEOUT_MS)
        except KafkaError as error:
            logger.warning(
                "offset commit to Kafka failed; the database keeps the offsets "
                "error=%s",
                _one_line(error),
            )


class _Rebalance(ConsumerRebalanceListener):
    """Seeks newly assigned partitions to the offsets stored in the database."""

    def __init__(self, consumer: LicenseEventConsumer) -> None:
        self.consumer = consumer

    def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        # Batches are applied between polls, so no work is in flight here.
        logger.info("partitions revoked partitions=%s", _names(revoked))
        for tp in revoked:
            self.consumer.expected.pop(tp, None)
            with contextlib.suppress(KeyError):
                metrics.CONSUMER_LAG.remove(tp.topic, str(tp.partition))

    def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        logger.info("partitions assigned partitions=%s", _names(assigned))
        if not assigned:
            return
        kafka = self.consumer._kafka
        try:
            stored = self.consumer.stored_offsets(assigned)
        except self.consumer.database_errors as error:
            # Kafka's committed offsets are never ahead of the database's, and
            # the event store drops events applied before, so resuming there
            # is safe. The first batch then fails its offset check and resyncs
            # from the database once it answers again.
            logger.warning(
                "stored offsets unavailable, resuming from Kafka's error=%s",
                _one_line(error),
            )
            for tp in assigned:
                self.consumer.expected[tp] = -1
            return
        for tp in assigned:
            self.consumer.expected[tp] = stored.get(tp)
            if tp in stored:
                kafka.seek(tp, stored[tp])
                logger.info(
                    "resuming topic=%s partition=%d offset=%d",
                    tp.topic,
                    tp.partition,
                    stored[tp],
                )
            else:
                kafka.seek_to_beginning(tp)
                logger.info(
                    "no stored offset, starting at the beginning topic=%s partition=%d",
                    tp.topic,
                    tp.partition,
                )


def _names(partitions: Iterable[TopicPartition]) -> str:
    return ",".join(f"{tp.topic}:{tp.partition}" for tp in sorted(partitions))


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())[:500]
