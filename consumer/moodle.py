"""Map Moodle's own IOMAD license event data to CloudEvents-shaped events.

Accepts what ``\\core\\event\\base::get_data()`` returns or what a
``logstore_standard_log`` row holds for IOMAD's ``user_license_assigned`` and
``user_license_unassigned`` events.
"""

from __future__ import annotations

import hashlib
from typing import Any

import orjson
import phpserialize

from consumer.events import DATA_MODELS, Event
from consumer.timestamps import from_unix_seconds
from license_report.errors import RejectedEvent
from projections.ordering import MAX_SEQUENCE

EVENT_TYPES = {
    "\\block_iomad_company_admin\\event\\user_license_assigned": "license.allocated",
    "\\block_iomad_company_admin\\event\\user_license_unassigned": (
        "license.unallocated"
    ),
}
SOURCE = "moodle"


def is_moodle_event(document: dict[str, Any]) -> bool:
    """Tell whether a decoded JSON object has the shape of Moodle event data."""
    return "eventname" in document and "specversion" not in document


def decode_moodle(document: dict[str, Any]) -> Event:
    """Validate Moodle event data and map it to license.allocated or .unallocated."""
    eventname = document.get("eventname")
    if not isinstance(eventname, str):
        raise RejectedEvent("Moodle event: eventname must be a string")
    event_type = EVENT_TYPES.get("\\" + eventname.lstrip("\\"))
    if event_type is None:
        raise RejectedEvent(
            f"Moodle event: unsupported eventname {eventname[:200]!r}; only IOMAD's "
            "user_license_assigned and user_license_unassigned are accepted"
        )

    other = _decode_other(document.get("other"))
    user_id = _moodle_int(document, "userid", minimum=1)
    course_id = _moodle_int(document, "courseid", minimum=1)
    license_id = _moodle_int(other, "licenseid", prefix="other.", minimum=1)
    timecreated = _moodle_int(document, "timecreated")
    log_id = None
    if document.get("id") is not None:
        log_id = _moodle_int(document, "id", minimum=1)
    try:
        time_us = from_unix_seconds(timecreated)
    except ValueError as error:
        raise RejectedEvent(f"Moodle event: timecreated: {error}") from None

    data: dict[str, Any] = {
        "user_id": user_id,
        "license_id": license_id,
        "course_id": course_id,
    }
    if event_type == "license.allocated":
        issuedate = other.get("issuedate")
        issued = _moodle_int(other, "issuedate", prefix="other.") if issuedate else 0
        try:
            data["issued_at"] = from_unix_seconds(issued or timecreated)
        except ValueError as error:
            raise RejectedEvent(f"Moodle event: other.issuedate: {error}") from None

    if log_id is not None:
        event_id = f"moodle-log-{log_id}"
    else:
        fingerprint = orjson.dumps(
            [
                event_type,
                user_id,
                course_id,
                license_id,
                timecreated,
                data.get("issued_at"),
            ]
        )
        event_id = "moodle-" + hashlib.sha256(fingerprint).hexdigest()[:40]

    model = DATA_MODELS[event_type]
    return Event(
        event_id=event_id,
        type=event_type,
        source=SOURCE,
        time_us=time_us,
        sequence=log_id,
        data=model.model_construct(**data),
    )


def _decode_other(other: object) -> dict[str, Any]:
    """Decode ``other``: an object, a JSON string or a PHP-serialized string."""
    if isinstance(other, dict):
        return other
    if not isinstance(other, str) or not other.strip():
        raise RejectedEvent(
            "Moodle event: other must be an object, a JSON string or a "
            "PHP-serialized string with licenseid"
        )
    text = other.strip()
    if text.startswith("{"):
        try:
            decoded = orjson.loads(text)
        except orjson.JSONDecodeError as error:
            raise RejectedEvent(
                f"Moodle event: other is not valid JSON: {error}"
            ) from None
    else:
        try:
            decoded = phpserialize.loads(text.encode("utf-8"), decode_strings=True)
        except (ValueError, TypeError, EOFError, IndexError, RecursionError) as error:
            raise RejectedEvent(
                f"Moodle event: other is neither JSON nor valid PHP-serialized data: "
                f"{error or type(error).__name__}"
            ) from None
    if not isinstance(decoded, dict):
        raise RejectedEvent("Moodle event: other must decode to an object or array")
    return decoded


def _moodle_int(
    document: dict[Any, Any], name: str, prefix: str = "", minimum: int = 0
) -> int:
    """Read an integer that Moodle may send as a number or as a digit string."""
    value = document.get(name)
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, bytes) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int):
        state = "missing" if value is None else f"not an integer: {str(value)[:64]!r}"
        raise RejectedEvent(f"Moodle event: {prefix}{name} is {state}")
    if not minimum <= value < MAX_SEQUENCE:
        raise RejectedEvent(f"Moodle event: {prefix}{name} is out of range: {value}")
    return value
