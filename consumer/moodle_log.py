"""Import IOMAD's license events from an export of Moodle's logstore_standard_log.

Each kept row becomes Moodle event data and goes through the consumer's decoder
and projection code, so the event id is ``moodle-log-<id>`` and importing a file
again changes nothing but the dead letters, which are recorded once per import.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import orjson
from sqlalchemy import Engine

from consumer.moodle import EVENT_TYPES
from consumer.moodle_import import (
    DEFAULT_BATCH_SIZE,
    BatchApplier,
    ImportResult,
    MoodleImportError,
    is_blank,
    open_export,
)

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("id", "eventname", "userid", "courseid", "other", "timecreated")


def import_log_files(
    engine: Engine, paths: Sequence[str], batch_size: int = DEFAULT_BATCH_SIZE
) -> ImportResult:
    """Import the license events of each log export, one transaction per batch.

    Rows of other events are counted as skipped. A row that cannot be decoded is
    stored as a dead letter, with origin ``moodle-log:<path>`` and the line on
    which the row starts as its offset. Raises MoodleImportError for a file that
    cannot be read, such as a CSV header without the required columns; the
    batches of earlier files stay committed.
    """
    total = ImportResult()
    for path in paths:
        total.add(_import_file(engine, path, batch_size))
    return total


def moodle_event(fields: dict[str, Any]) -> dict[str, Any]:
    """Build the Moodle event data that ``consumer.moodle`` decodes from a log row.

    The license holder is ``relateduserid`` where the export has that column and
    it is neither NULL nor 0, and ``userid`` otherwise: docs/moodle-import.md gives
    the reasons. NULL values become JSON null, so the decoder reports them as
    missing.
    """
    holder = fields.get("relateduserid")
    if is_blank(holder) or str(holder).strip() == "0":
        holder = fields.get("userid")
    return {
        "id": _value(fields.get("id")),
        "eventname": _value(fields.get("eventname")),
        "userid": _value(holder),
        "courseid": _value(fields.get("courseid")),
        "other": _value(fields.get("other")),
        "timecreated": _value(fields.get("timecreated")),
    }


def is_license_event(eventname: object) -> bool:
    """Tell whether an eventname is one of IOMAD's two license events."""
    if not isinstance(eventname, str):
        return False
    return "\\" + eventname.strip().lstrip("\\") in EVENT_TYPES


def _import_file(engine: Engine, path: str, batch_size: int) -> ImportResult:
    result = ImportResult()
    origin = f"moodle-log:{path}"
    applier = BatchApplier(engine, result, batch_size)
    logger.info("moodle log import starting path=%s", path)
    with open_export(path) as export:
        if export.columns is not None:
            missing = [name for name in REQUIRED_COLUMNS if name not in export.columns]
            if missing:
                raise MoodleImportError(
                    f"{path}: the CSV header lacks the column(s) {', '.join(missing)}; "
                    f"a log export needs {', '.join(REQUIRED_COLUMNS)}"
                )
        for row in export:
            result.rows += 1
            if row.fields is None:
                applier.reject(origin, row.number, row.raw, row.problem or "")
                continue
            if not is_license_event(row.fields.get("eventname")):
                result.skipped += 1
                continue
            try:
                value = orjson.dumps(moodle_event(row.fields))
            except TypeError as error:
                # orjson rejects integers beyond 64 bits, which JSON lines may hold.
                applier.reject(
                    origin, row.number, row.raw, f"cannot encode the row: {error}"
                )
                continue
            applier.add(origin, row.number, value)
        applier.flush()
    logger.info(
        "moodle log import finished path=%s rows=%d skipped=%d applied=%d "
        "duplicates=%d dead_letters=%d",
        path,
        result.rows,
        result.skipped,
        result.applied,
        result.duplicates,
        result.dead_letters,
    )
    return result


def _value(value: object) -> object:
    return None if is_blank(value) else value
