"""Prometheus metrics of the consumer and the API."""

from __future__ import annotations

import time

from prometheus_client import Counter, Gauge, Histogram

EVENTS_APPLIED = Counter(
    "license_report_events_applied",
    "Events applied to the projection, by event type.",
    ["type"],
)
DUPLICATES = Counter(
    "license_report_duplicate_events",
    "Events skipped because their id was already in the event store.",
)
DEAD_LETTERS = Counter(
    "license_report_dead_letters",
    "Events rejected and stored as dead letters.",
)
BATCH_SECONDS = Histogram(
    "license_report_batch_duration_seconds",
    "Time to decode and apply one batch, including its commit.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
BATCH_RETRIES = Counter(
    "license_report_batch_retries",
    "Batches rolled back and retried after a database error or a fence.",
    ["reason"],
)
CONSUMER_LAG = Gauge(
    "license_report_consumer_lag",
    "Records between the consumer's position and the partition's high watermark.",
    ["topic", "partition"],
)
NEWEST_EVENT_TIME = Gauge(
    "license_report_newest_event_time_seconds",
    "Unix time of the newest event this process applied.",
)
NEWEST_EVENT_AGE = Gauge(
    "license_report_newest_event_age_seconds",
    "Seconds since the time of the newest event this process applied.",
)
_newest = {"seconds": 0.0}


def record_newest_event(time_us: int) -> None:
    """Note the time of an applied event; the newest one sets both gauges."""
    seconds = time_us / 1_000_000
    if seconds > _newest["seconds"]:
        _newest["seconds"] = seconds
        NEWEST_EVENT_TIME.set(seconds)


def _newest_event_age() -> float:
    if not _newest["seconds"]:
        return float("nan")
    return time.time() - _newest["seconds"]


NEWEST_EVENT_AGE.set_function(_newest_event_age)
