"""Replay JSON-lines files through the same decoding and projection code."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import BinaryIO

from sqlalchemy import Engine

from consumer.batch import decode_values
from projections.apply import apply_batch

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 5_000


@dataclass(slots=True)
class ReplayResult:
    """Totals of one replay."""

    lines: int = 0
    applied: int = 0
    duplicates: int = 0
    dead_letters: int = 0
    by_type: dict[str, int] = field(default_factory=dict)


def replay_files(
    engine: Engine, paths: Sequence[str], batch_size: int = DEFAULT_BATCH_SIZE
) -> ReplayResult:
    """Apply every line of each file (``-`` is standard input) in batches.

    Each batch commits in its own transaction; replaying a file again changes
    nothing but the dead letters, which are kept once per replay.
    """
    result = ReplayResult()
    for path in paths:
        logger.info("replay starting path=%s", path)
        with _open(path) as stream:
            origin = f"file:{path}"
            replay_values(engine, _batches(stream, origin, batch_size), result)
        logger.info(
            "replay finished path=%s lines=%d applied=%d duplicates=%d dead_letters=%d",
            path,
            result.lines,
            result.applied,
            result.duplicates,
            result.dead_letters,
        )
    return result


def replay_values(
    engine: Engine, batches: Iterable[list[tuple]], result: ReplayResult | None = None
) -> ReplayResult:
    """Apply batches of ``(origin, partition, offset, value)`` tuples."""
    result = result or ReplayResult()
    for batch in batches:
        _apply(engine, batch, result)
    return result


def _apply(engine: Engine, batch: list, result: ReplayResult) -> None:
    decoded = decode_values(batch)
    with engine.begin() as conn:
        applied = apply_batch(conn, decoded.events, decoded.dead_letters)
    result.lines += len(batch)
    result.applied += sum(applied.applied.values())
    result.duplicates += applied.duplicates
    result.dead_letters += applied.dead_letters
    for name, count in applied.applied.items():
        result.by_type[name] = result.by_type.get(name, 0) + count


def _batches(
    stream: BinaryIO, origin: str, size: int
) -> Iterator[list[tuple[str, None, int, bytes]]]:
    batch: list[tuple[str, None, int, bytes]] = []
    for number, line in enumerate(stream, start=1):
        value = line.rstrip(b"\r\n")
        if not value.strip():
            continue
        batch.append((origin, None, number, value))
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


@contextmanager
def _open(path: str) -> Iterator[BinaryIO]:
    if path == "-":
        yield sys.stdin.buffer
        return
    with open(path, "rb") as stream:
        yield stream
