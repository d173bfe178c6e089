"""Read exports of Moodle tables and apply the events built from them in batches.

An export is CSV with a header row, as ``psql \\copy ... WITH CSV HEADER`` or a
Moodle CSV download writes it, or JSON lines with one row object per line. Files
are streamed, so their size is bounded only by the disk. docs/moodle-import.md
describes the formats and the SQL that produces each export.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import Engine

from consumer.batch import MAX_DEAD_LETTER_BYTES, MAX_LOGGED_REJECTIONS, decode_values
from license_report.errors import LicenseReportError
from projections.apply import DeadLetter, apply_batch

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 5_000
JSON_LINES_SUFFIXES = frozenset({".jsonl", ".ndjson", ".json"})
CSV = "csv"
JSON_LINES = "jsonl"

# Moodle's "other" column can hold large serialized values, far above the csv
# module's default field limit of 131,072 characters. The decoder rejects events
# over 1,000,000 bytes, so such rows become dead letters instead of stopping the
# import. 2**31 - 1 fits the C long of every platform.
MAX_CSV_FIELD_CHARS = 2**31 - 1
_UTF8_BOM = b"\xef\xbb\xbf"
_SNIFF_CHUNK_BYTES = 65_536


class MoodleImportError(LicenseReportError):
    """An export file that cannot be read at all: missing, empty, wrong columns."""


@dataclass(frozen=True, slots=True)
class ExportRow:
    """One row of an export, or the reason it could not be read as a row."""

    # Line of the file (from 1) on which the row starts.
    number: int
    # Column name (lower case) to value: strings from CSV, JSON values from JSON
    # lines. None when ``problem`` is set.
    fields: dict[str, Any] | None
    # The row as it appears in the file, kept in a dead letter if it is rejected.
    raw: bytes
    problem: str | None = None


@dataclass(slots=True)
class ImportResult:
    """Totals of one import."""

    rows: int = 0
    skipped: int = 0
    applied: int = 0
    duplicates: int = 0
    dead_letters: int = 0
    by_type: dict[str, int] = field(default_factory=dict)

    def add(self, other: ImportResult) -> None:
        """Add the totals of ``other`` to these."""
        self.rows += other.rows
        self.skipped += other.skipped
        self.applied += other.applied
        self.duplicates += other.duplicates
        self.dead_letters += other.dead_letters
        for name, count in other.by_type.items():
            self.by_type[name] = self.by_type.get(name, 0) + count


class ExportFile:
    """An open export file: its format, its CSV columns and an iterator of rows."""

    def __init__(self, path: str, file_format: str, stream: Any) -> None:
        self.path = path
        self.format = file_format
        self._stream = stream
        # Column names of a CSV header, or None for JSON lines, whose rows each
        # name their own columns.
        self.columns: tuple[str, ...] | None = None
        self._reader: Any = None
        self._header_lines = 0
        if file_format == CSV:
            self._read_header()

    def __iter__(self) -> Iterator[ExportRow]:
        if self.format == CSV:
            return self._csv_rows()
        return self._json_rows()

    def _read_header(self) -> None:
        self._reader = csv.reader(self._stream)
        try:
            header = next(self._reader, None)
        except (csv.Error, UnicodeDecodeError) as error:
            raise MoodleImportError(
                f"{self.path}: cannot read the CSV header row: {error}"
            ) from None
        if header is None or not any(name.strip() for name in header):
            raise MoodleImportError(
                f"{self.path}: the file is empty; expected a CSV header row with "
                "column names"
            )
        columns = tuple(name.strip().lower() for name in header)
        repeated = sorted({name for name in columns if columns.count(name) > 1})
        if repeated:
            raise MoodleImportError(
                f"{self.path}: the CSV header names these columns more than once: "
                f"{', '.join(repeated)}"
            )
        self.columns = columns
        self._header_lines = self._reader.line_num

    def _csv_rows(self) -> Iterator[ExportRow]:
        columns = self.columns or ()
        reader = self._reader
        consumed = self._header_lines
        while True:
            start = consumed + 1
            try:
                values = next(reader, None)
            except (csv.Error, UnicodeDecodeError) as error:
                # The text layer decodes blocks of bytes, so a UTF-8 error may lie
                # a few lines past the last row read.
                raise MoodleImportError(
                    f"{self.path}: cannot read the CSV file past line {consumed}: "
                    f"{error}; the batches before were committed, and importing the "
                    "fixed file again skips their rows as duplicates"
                ) from None
            if values is None:
                return
            consumed = reader.line_num
            if not any(value.strip() for value in values):
                continue
            raw = _csv_line(values)
            if len(values) != len(columns):
                problem = (
                    f"malformed CSV row: it has {len(values)} fields but the header "
                    f"has {len(columns)} columns"
                )
                yield ExportRow(start, None, raw, problem)
                continue
            yield ExportRow(start, dict(zip(columns, values, strict=True)), raw)

    def _json_rows(self) -> Iterator[ExportRow]:
        for number, line in enumerate(self._stream, start=1):
            if number == 1:
                line = line.removeprefix(_UTF8_BOM)
            value = line.rstrip(b"\r\n")
            if not value.strip():
                continue
            try:
                document = orjson.loads(value)
            except orjson.JSONDecodeError as error:
                yield ExportRow(number, None, value, f"not valid JSON: {error}")
                continue
            if not isinstance(document, dict):
                kind = type(document).__name__
                problem = f"a JSON-lines row must be a JSON object, got a JSON {kind}"
                yield ExportRow(number, None, value, problem)
                continue
            fields = {
                str(name).strip().lower(): item for name, item in document.items()
            }
            yield ExportRow(number, fields, value)


@contextmanager
def open_export(path: str) -> Iterator[ExportFile]:
    """Open an export as CSV or JSON lines, detected from its name or content.

    A name ending in .jsonl, .ndjson or .json, or a first non-blank character
    ``{``, means JSON lines; anything else is read as CSV. Raises
    MoodleImportError when the file cannot be opened or has no CSV header.
    """
    file_format = detect_format(path)
    try:
        if file_format == CSV:
            csv.field_size_limit(max(csv.field_size_limit(), MAX_CSV_FIELD_CHARS))
            # utf-8-sig drops a leading byte order mark, which CSV downloads may write.
            stream = open(path, encoding="utf-8-sig", newline="")  # noqa: SIM115
        else:
            stream = open(path, "rb")  # noqa: SIM115
    except OSError as error:
        raise MoodleImportError(f"cannot open {path}: {error.strerror}") from None
    with stream:
        yield ExportFile(path, file_format, stream)


def detect_format(path: str) -> str:
    """Return ``"jsonl"`` or ``"csv"`` for an export file."""
    if Path(path).suffix.lower() in JSON_LINES_SUFFIXES:
        return JSON_LINES
    try:
        with open(path, "rb") as stream:
            first = _first_non_blank_byte(stream)
    except OSError as error:
        raise MoodleImportError(f"cannot open {path}: {error.strerror}") from None
    return JSON_LINES if first == b"{" else CSV


def _first_non_blank_byte(stream: io.BufferedIOBase) -> bytes | None:
    chunk = stream.read(_SNIFF_CHUNK_BYTES).removeprefix(_UTF8_BOM)
    while chunk:
        text = chunk.lstrip()
        if text:
            return text[:1]
        chunk = stream.read(_SNIFF_CHUNK_BYTES)
    return None


def _csv_line(values: list[str]) -> bytes:
    """Write fields back as one CSV record, for a dead letter's raw bytes."""
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="").writerow(values)
    return buffer.getvalue().encode("utf-8")


def is_blank(value: object) -> bool:
    """Tell whether an export value is NULL: a JSON null or an empty CSV field.

    psql writes NULL as an empty unquoted field and an empty string as ``""``.
    The csv module reads both as ``""``, so both count as NULL here.
    """
    return value is None or (isinstance(value, str) and not value.strip())


class BatchApplier:
    """Collect message values and rejected rows, and apply them in transactions.

    Values go through ``consumer.batch.decode_values`` and
    ``projections.apply.apply_batch``, the same code as the Kafka consumer, so an
    undecodable value becomes a dead letter and never stops the import.
    """

    def __init__(self, engine: Engine, result: ImportResult, batch_size: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self._engine = engine
        self._result = result
        self._batch_size = batch_size
        self._values: list[tuple[str, None, int, bytes]] = []
        self._rejected: list[DeadLetter] = []

    def add(self, origin: str, offset: int, value: bytes) -> None:
        """Queue one message value, and apply the batch once it is full."""
        self._values.append((origin, None, offset, value))
        self._flush_if_full()

    def reject(self, origin: str, offset: int, raw: bytes, reason: str) -> None:
        """Queue a row that cannot become a message value, as a dead letter."""
        if len(self._rejected) < MAX_LOGGED_REJECTIONS:
            logger.warning(
                "row rejected origin=%s offset=%s reason=%s", origin, offset, reason
            )
        letter = DeadLetter(origin, None, offset, raw[:MAX_DEAD_LETTER_BYTES], reason)
        self._rejected.append(letter)
        self._flush_if_full()

    def flush(self) -> None:
        """Apply what is queued in one transaction."""
        if not self._values and not self._rejected:
            return
        hidden = len(self._rejected) - MAX_LOGGED_REJECTIONS
        if hidden > 0:
            logger.warning(
                "%d more rows of this batch rejected as dead letters", hidden
            )
        decoded = decode_values(self._values)
        dead_letters = sorted(
            [*decoded.dead_letters, *self._rejected], key=lambda letter: letter.offset
        )
        with self._engine.begin() as conn:
            applied = apply_batch(conn, decoded.events, dead_letters)
        result = self._result
        result.applied += sum(applied.applied.values())
        result.duplicates += applied.duplicates
        result.dead_letters += applied.dead_letters
        for name, count in applied.applied.items():
            result.by_type[name] = result.by_type.get(name, 0) + count
        self._values = []
        self._rejected = []

    def _flush_if_full(self) -> None:
        if len(self._values) + len(self._rejected) >= self._batch_size:
            self.flush()
