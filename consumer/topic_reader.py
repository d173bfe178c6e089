"""Read a whole Kafka topic from its beginning, outside any consumer group."""

from __future__ import annotations

import logging
from collections.abc import Iterator

from kafka import KafkaConsumer, TopicPartition

from license_report.settings import Settings

logger = logging.getLogger(__name__)

Value = tuple[str, int, int, bytes | None]


def read_topic(settings: Settings, idle_ms: int = 2_000) -> Iterator[list[Value]]:
    """Yield batches of ``(topic, partition, offset, value)`` up to the end offsets.

    The end offsets are read once at the start; events produced later are left
    to the consumer. Reading also stops after ``idle_ms`` without a record.
    """
    consumer = KafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap_servers.split(","),
        group_id=None,
        enable_auto_commit=False,
        max_poll_records=settings.batch_max_records,
        max_partition_fetch_bytes=settings.kafka_max_partition_fetch_bytes,
        fetch_max_bytes=settings.kafka_fetch_max_bytes,
    )
    try:
        topic = settings.kafka_topic
        numbers = consumer.partitions_for_topic(topic) or set()
        partitions = [TopicPartition(topic, number) for number in sorted(numbers)]
        if not partitions:
            logger.warning("topic has no partitions topic=%s", topic)
            return
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        ends = consumer.end_offsets(partitions)
        logger.info("reading topic topic=%s partitions=%d", topic, len(partitions))
        pending = {tp for tp in partitions if ends[tp] > 0}
        while pending:
            records = consumer.poll(
                timeout_ms=idle_ms, max_records=settings.batch_max_records
            )
            if not records:
                break
            batch = [
                (record.topic, record.partition, record.offset, record.value)
                for tp_records in records.values()
                for record in tp_records
            ]
            yield batch
            # Positions may pass the reported end offsets on some brokers.
            pending = {tp for tp in pending if consumer.position(tp) < ends[tp]}
    finally:
        consumer.close(autocommit=False)
