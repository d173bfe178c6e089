"""Conversions between RFC 3339 text, Unix seconds and integer microseconds (UTC)."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_NAIVE_EPOCH = datetime(1970, 1, 1)
# Date, "T" or space, time, optional fraction, then "Z" or a numeric offset.
_RFC3339 = re.compile(
    r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})"
)
# Instants outside years 1900 to 9000 are rejected as impossible.
MIN_US = -2_208_988_800 * 1_000_000
# The last microsecond of 9000-12-31 UTC.
MAX_US = 221_876_928_000 * 1_000_000 - 1


def parse_rfc3339(text: object) -> int:
    """Parse an RFC 3339 timestamp into microseconds since the epoch.

    Raises ValueError with a message fit for a dead letter's reason.
    """
    if not isinstance(text, str):
        raise ValueError(f"expected an RFC 3339 timestamp string, got {_kind(text)}")
    if not _RFC3339.fullmatch(text):
        raise ValueError(
            f"{text[:64]!r} is not an RFC 3339 timestamp with a time zone, such as "
            "2024-05-01T12:00:00Z"
        )
    fraction = re.search(r"\.(\d+)", text)
    normalised = text.replace("z", "Z").replace("t", "T")
    if fraction and len(fraction.group(1)) > 6:
        # datetime keeps microseconds only; drop the nanosecond digits.
        digits = fraction.group(1)
        normalised = normalised.replace("." + digits, "." + digits[:6], 1)
    try:
        instant = datetime.fromisoformat(normalised)
    except ValueError as error:
        raise ValueError(
            f"{text[:64]!r} is an impossible date or time: {error}"
        ) from None
    return to_us(instant)


def from_unix_seconds(value: int) -> int:
    """Convert Unix seconds to microseconds, rejecting impossible instants."""
    micros = value * 1_000_000
    if not MIN_US <= micros <= MAX_US:
        raise ValueError(f"Unix time {value} is outside the years 1900 to 9000")
    return micros


def to_us(instant: datetime) -> int:
    """Convert an aware datetime to microseconds since the epoch."""
    delta = instant - _EPOCH
    micros = (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
    if not MIN_US <= micros <= MAX_US:
        raise ValueError(f"{instant.isoformat()} is outside the years 1900 to 9000")
    return micros


def format_us(micros: int) -> str:
    """Format microseconds since the epoch as RFC 3339 UTC: 2024-05-01T12:00:00Z.

    The fraction has six digits and is left out when it is zero.
    """
    # isoformat of a naive datetime is about twice as fast as strftime and
    # writes the same text for the years 1000 to 9999.
    return (_NAIVE_EPOCH + timedelta(microseconds=micros)).isoformat() + "Z"


def now_us() -> int:
    """Return the current time in microseconds since the epoch."""
    return to_us(datetime.now(UTC))


def _kind(value: object) -> str:
    return "null" if value is None else type(value).__name__
