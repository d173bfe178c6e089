"""Decode raw message values into validated events, or reject them with a reason."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import orjson
from pydantic import ValidationError

from consumer.events import DATA_MODELS, Event, StoredEvent
from consumer.moodle import decode_moodle, is_moodle_event
from consumer.timestamps import parse_rfc3339, to_us
from license_report.errors import RejectedEvent
from projections.ordering import MAX_SEQUENCE

# Larger message values are rejected before parsing.
MAX_EVENT_BYTES = 1_000_000
MAX_ID_LENGTH = 255


def decode(raw: bytes | None) -> Event:
    """Decode one message value: a CloudEvent or Moodle's own event data.

    Raises RejectedEvent with a reason fit for the dead-letter table.
    """
    if raw is None:
        raise RejectedEvent("empty message: the value is null (a tombstone record)")
    if len(raw) > MAX_EVENT_BYTES:
        raise RejectedEvent(
            f"event is {len(raw)} bytes, more than the limit of {MAX_EVENT_BYTES}"
        )
    try:
        document = orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        raise RejectedEvent(f"not valid JSON: {error}") from None
    if not isinstance(document, dict):
        raise RejectedEvent(
            f"event must be a JSON object, got a JSON {type(document).__name__}"
        )
    if is_moodle_event(document):
        return decode_moodle(document)
    return decode_cloudevent(document)


def decode_cloudevent(document: dict[str, Any]) -> Event:
    """Validate a CloudEvents 1.0 structured JSON event."""
    if document.get("specversion") != "1.0":
        raise RejectedEvent(
            'not a CloudEvent: specversion must be "1.0" (or send Moodle event data '
            "with an eventname)"
        )
    event_id = _required_string(document, "id")
    source = _required_string(document, "source")
    event_type = _required_string(document, "type")
    model = DATA_MODELS.get(event_type)
    if model is None:
        raise RejectedEvent(f"unknown event type {event_type[:100]!r}")
    try:
        time_us = parse_rfc3339(document.get("time"))
    except ValueError as error:
        raise RejectedEvent(f"invalid time: {error}") from None
    sequence = _sequence(document.get("sequence"))

    payload = document.get("data")
    if not isinstance(payload, dict):
        raise RejectedEvent(f"{event_type}: data must be a JSON object")
    try:
        data = model.model_validate(payload)
    except ValidationError as error:
        raise RejectedEvent(f"{event_type}: {_describe(error)}") from None
    if event_type == "license.allocated" and data.issued_at is None:
        data = data.model_copy(update={"issued_at": time_us})
    return Event(event_id, event_type, source, time_us, sequence, data)


def decode_stored(payload: str | bytes) -> StoredEvent:
    """Read back a payload that the event store holds, without validating it.

    The event store holds what Event.to_cloudevent wrote for validated events,
    so only the instants need converting, from the RFC 3339 UTC text that
    format_us writes. Data fields missing from the payload get their model's
    default. Raises KeyError or ValueError for a payload of another shape.
    """
    document = orjson.loads(payload)
    event_type = document["type"]
    data = _STORED_DEFAULTS[event_type] | document["data"]
    for name in _STORED_TIME_FIELDS[event_type]:
        value = data.get(name)
        if value is not None:
            data[name] = to_us(datetime.fromisoformat(value))
    time_us = to_us(datetime.fromisoformat(document["time"]))
    return StoredEvent(
        document["id"], event_type, time_us, document.get("sequence"), data
    )


# Per event type, the defaults of its optional data fields and its instants.
_STORED_DEFAULTS = {
    event_type: {
        name: field.default
        for name, field in model.model_fields.items()
        if not field.is_required()
    }
    for event_type, model in DATA_MODELS.items()
}
_STORED_TIME_FIELDS = {
    event_type: tuple(sorted(model.time_fields))
    for event_type, model in DATA_MODELS.items()
}


def _required_string(document: dict[str, Any], name: str) -> str:
    value = document.get(name)
    if not isinstance(value, str) or not value:
        state = "missing" if value is None else "not a non-empty string"
        raise RejectedEvent(f"CloudEvent attribute {name} is {state}")
    if len(value) > MAX_ID_LENGTH:
        raise RejectedEvent(
            f"CloudEvent attribute {name} is longer than {MAX_ID_LENGTH} characters"
        )
    return value


def _sequence(value: object) -> int | None:
    """Read the optional ``sequence`` extension: an integer or a digit string."""
    if value is None:
        return None
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise RejectedEvent("CloudEvent attribute sequence must be an integer")
    if not 0 <= value < MAX_SEQUENCE:
        raise RejectedEvent(
            f"CloudEvent attribute sequence must be between 0 and {MAX_SEQUENCE - 1}"
        )
    return value


def _describe(error: ValidationError) -> str:
    """Summarise pydantic's errors as 'data.field: message' pairs."""
    parts = []
    for detail in error.errors(include_url=False)[:5]:
        location = ".".join(str(part) for part in detail["loc"])
        message = detail["msg"].removeprefix("Value error, ")
        parts.append(f"data.{location}: {message}")
    return "; ".join(parts)
