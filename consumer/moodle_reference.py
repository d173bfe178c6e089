"""Import reference data from exports of Moodle and IOMAD tables.

Each row becomes one CloudEvent, which goes through the consumer's decoder and
projection code. The event id is ``moodle-ref:<table>:<key>:<digest>``, where the
digest is a SHA-256 prefix of the event's type, data and the row's
``timemodified``: an unchanged row gets the same id again and changes nothing,
while a changed row gets a new id and, being newer, supersedes the old version.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from sqlalchemy import Engine

from consumer.moodle import SOURCE
from consumer.moodle_import import (
    DEFAULT_BATCH_SIZE,
    BatchApplier,
    ImportResult,
    MoodleImportError,
    is_blank,
    open_export,
)
from consumer.timestamps import format_us, from_unix_seconds, now_us
from license_report.errors import RejectedEvent

logger = logging.getLogger(__name__)

_DIGEST_CHARS = 16
_INTEGER = re.compile(r"[+-]?\d+")
_FLAGS = {"0": False, "1": True, "f": False, "t": True, "false": False, "true": True}
# IOMAD's companylicense.type, in the order of the license form's type menu:
# 0 standard, 1 reusable, 2 educator, 3 educator reusable.
REUSABLE_LICENSE_TYPES = frozenset({1, 3})


@dataclass(frozen=True, slots=True)
class ReferenceChange:
    """The event that one table row represents."""

    type: str
    # The row's identity within its table, part of the event id.
    key: str
    data: dict[str, Any]
    # The row's timemodified in microseconds, or None when it has none.
    modified_us: int | None


@dataclass(frozen=True, slots=True)
class ReferenceTable:
    """How to read the export of one Moodle table."""

    name: str
    required: tuple[str, ...]
    convert: Callable[[dict[str, Any]], ReferenceChange]


def import_reference_files(
    engine: Engine,
    files: Mapping[str, str],
    batch_size: int = DEFAULT_BATCH_SIZE,
    default_time_us: int | None = None,
) -> ImportResult:
    """Import exports of Moodle tables, given as table name to file path.

    Table names are the keys of ``TABLES``. A row's event time is its
    ``timemodified`` when that is present and not 0, and ``default_time_us``
    otherwise, which defaults to the time this import starts. Rows that cannot be
    converted or decoded become dead letters with origin
    ``moodle-ref:<table>:<path>``. Raises MoodleImportError for an unknown table
    or a file that cannot be read.
    """
    unknown = sorted(set(files) - set(TABLES))
    if unknown:
        raise MoodleImportError(
            f"unknown Moodle table(s) {', '.join(unknown)}; expected some of "
            f"{', '.join(TABLES)}"
        )
    time_us = now_us() if default_time_us is None else default_time_us
    total = ImportResult()
    for name, table in TABLES.items():
        if name in files:
            total.add(_import_file(engine, table, files[name], batch_size, time_us))
    return total


def reference_event(
    change: ReferenceChange, table: str, default_time_us: int
) -> dict[str, Any]:
    """Build the CloudEvent of a change, with its stable id."""
    fingerprint = orjson.dumps(
        [change.type, change.data, change.modified_us], option=orjson.OPT_SORT_KEYS
    )
    # NOTE: a row without timemodified that changes back to an earlier version
    # gets that version's id again, which is a duplicate, so the middle version
    # stays in the projection.
    digest = hashlib.sha256(fingerprint).hexdigest()[:_DIGEST_CHARS]
    time_us = default_time_us if change.modified_us is None else change.modified_us
    return {
        "specversion": "1.0",
        "id": f"moodle-ref:{table}:{change.key}:{digest}",
        "source": SOURCE,
        "type": change.type,
        "time": format_us(time_us),
        "datacontenttype": "application/json",
        "data": change.data,
    }


def _import_file(
    engine: Engine, table: ReferenceTable, path: str, batch_size: int, time_us: int
) -> ImportResult:
    result = ImportResult()
    origin = f"moodle-ref:{table.name}:{path}"
    applier = BatchApplier(engine, result, batch_size)
    logger.info("moodle reference import starting table=%s path=%s", table.name, path)
    with open_export(path) as export:
        if export.columns is not None:
            problem = _missing_columns(table, export.columns)
            if problem:
                raise MoodleImportError(f"{path}: the CSV header {problem}")
        for row in export:
            result.rows += 1
            if row.fields is None:
                applier.reject(origin, row.number, row.raw, row.problem or "")
                continue
            try:
                problem = _missing_columns(table, tuple(row.fields))
                if problem:
                    raise RejectedEvent(f"the row {problem}")
                change = table.convert(row.fields)
                value = orjson.dumps(reference_event(change, table.name, time_us))
            except RejectedEvent as rejection:
                reason = f"Moodle table {table.name}: {rejection.reason}"
                applier.reject(origin, row.number, row.raw, reason)
                continue
            except TypeError as error:
                # orjson rejects integers beyond 64 bits, which JSON lines may hold.
                reason = f"Moodle table {table.name}: cannot encode the row: {error}"
                applier.reject(origin, row.number, row.raw, reason)
                continue
            applier.add(origin, row.number, value)
        applier.flush()
    logger.info(
        "moodle reference import finished table=%s path=%s rows=%d applied=%d "
        "duplicates=%d dead_letters=%d",
        table.name,
        path,
        result.rows,
        result.applied,
        result.duplicates,
        result.dead_letters,
    )
    return result


def _missing_columns(table: ReferenceTable, columns: tuple[str, ...]) -> str | None:
    """Describe the required columns that ``columns`` lacks, or return None."""
    missing = [name for name in table.required if name not in columns]
    if table.name == "companylicense" and not {"reusable", "type"} & set(columns):
        missing.append("reusable or type")
    if not missing:
        return None
    return (
        f"lacks the column(s) {', '.join(missing)}; an export of {table.name} needs "
        f"{', '.join(table.required)}"
    )


def _company(fields: dict[str, Any]) -> ReferenceChange:
    data = {"company_id": _id(fields, "id"), "name": _text(fields, "name")}
    return ReferenceChange(
        "company.upserted", _key(fields, "id"), data, _modified(fields)
    )


def _department(fields: dict[str, Any]) -> ReferenceChange:
    data = {
        "department_id": _id(fields, "id"),
        "company_id": _id(fields, "company"),
        "name": _text(fields, "name"),
        # IOMAD stores 0 as the parent of a company's top department, and the
        # decoder reads 0 as no parent.
        "parent_id": _id(fields, "parent"),
    }
    return ReferenceChange(
        "department.upserted", _key(fields, "id"), data, _modified(fields)
    )


def _user(fields: dict[str, Any]) -> ReferenceChange:
    key = _key(fields, "id")
    if _flag(fields, "deleted"):
        # Moodle keeps deleted users as rows with deleted = 1.
        data: dict[str, Any] = {"user_id": _id(fields, "id")}
        return ReferenceChange("user.deleted", key, data, _modified(fields))
    data = {
        "user_id": _id(fields, "id"),
        "firstname": _text(fields, "firstname"),
        "lastname": _text(fields, "lastname"),
        "email": _text(fields, "email"),
        "suspended": _flag(fields, "suspended"),
    }
    return ReferenceChange("user.upserted", key, data, _modified(fields))


def _company_user(fields: dict[str, Any]) -> ReferenceChange:
    data = {
        "user_id": _id(fields, "userid"),
        "company_id": _id(fields, "companyid"),
        "department_id": _id(fields, "departmentid"),
    }
    key = ":".join(
        _key(fields, name) for name in ("userid", "companyid", "departmentid")
    )
    return ReferenceChange("user.department.assigned", key, data, _modified(fields))


def _course(fields: dict[str, Any]) -> ReferenceChange:
    data = {"course_id": _id(fields, "id"), "name": _text(fields, "fullname")}
    return ReferenceChange(
        "course.upserted", _key(fields, "id"), data, _modified(fields)
    )


def _license(fields: dict[str, Any]) -> ReferenceChange:
    if not is_blank(fields.get("reusable")):
        reusable = _flag(fields, "reusable")
    else:
        # IOMAD itself has no reusable column, so the license type decides.
        reusable = _strict_integer(fields, "type") in REUSABLE_LICENSE_TYPES
    data = {
        "license_id": _id(fields, "id"),
        "company_id": _id(fields, "companyid"),
        "name": _text(fields, "name"),
        "reusable": reusable,
        "program": _flag(fields, "program"),
        "start_date": _date(fields, "startdate"),
        "expiry_date": _date(fields, "expirydate"),
    }
    return ReferenceChange(
        "license.upserted", _key(fields, "id"), data, _modified(fields)
    )


TABLES: dict[str, ReferenceTable] = {
    table.name: table
    for table in (
        ReferenceTable("company", ("id", "name"), _company),
        ReferenceTable("department", ("id", "name", "company"), _department),
        ReferenceTable(
            "user",
            ("id", "firstname", "lastname", "email", "suspended", "deleted"),
            _user,
        ),
        ReferenceTable(
            "company_users", ("userid", "companyid", "departmentid"), _company_user
        ),
        ReferenceTable("course", ("id", "fullname"), _course),
        ReferenceTable(
            "companylicense",
            ("id", "name", "companyid", "program", "startdate", "expirydate"),
            _license,
        ),
    )
}


def _id(fields: dict[str, Any], name: str) -> object:
    """Read an id column: a digit string becomes an int.

    Any other value is passed on unchanged, so the decoder rejects it with the
    contract's own message.
    """
    value = fields.get(name)
    if is_blank(value):
        return None
    if isinstance(value, str) and _INTEGER.fullmatch(value.strip()):
        return int(value)
    return value


def _key(fields: dict[str, Any], name: str) -> str:
    value = fields.get(name)
    return "" if value is None else str(value).strip()[:64]


def _text(fields: dict[str, Any], name: str) -> object:
    # Moodle's text columns are NOT NULL with default '', so NULL reads as ''.
    value = fields.get(name)
    return "" if value is None else value


def _strict_integer(fields: dict[str, Any], name: str) -> int:
    """Read an integer column whose value this module interprets itself."""
    value = fields.get(name)
    if isinstance(value, str) and _INTEGER.fullmatch(value.strip()):
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    state = "missing" if is_blank(value) else f"not an integer: {str(value)[:32]!r}"
    raise RejectedEvent(f"{name} is {state}")


def _flag(fields: dict[str, Any], name: str) -> bool:
    """Read a 0/1 column. A missing column or NULL is 0."""
    value = fields.get(name)
    if is_blank(value):
        return False
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _FLAGS:
        return _FLAGS[value.strip().lower()]
    raise RejectedEvent(f"{name} must be 0 or 1, got {str(value)[:32]!r}")


def _unix_us(fields: dict[str, Any], name: str) -> int | None:
    """Read Unix seconds as microseconds. NULL, a missing column and 0 are None."""
    if is_blank(fields.get(name)):
        return None
    seconds = _strict_integer(fields, name)
    if seconds == 0:
        return None
    try:
        return from_unix_seconds(seconds)
    except ValueError as error:
        raise RejectedEvent(f"{name}: {error}") from None


def _date(fields: dict[str, Any], name: str) -> str | None:
    micros = _unix_us(fields, name)
    return None if micros is None else format_us(micros)


def _modified(fields: dict[str, Any]) -> int | None:
    return _unix_us(fields, "timemodified")
