"""The event contract: CloudEvents types and the validated shape of their data.

docs/events.md describes the contract for producers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, NamedTuple

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from consumer.timestamps import format_us, parse_rfc3339

Id = Annotated[int, Field(ge=1, lt=2**63)]
Name = Annotated[str, Field(max_length=10_000)]


def _optional_time(value: object) -> int | None:
    return None if value is None else parse_rfc3339(value)


def _optional_parent(value: object) -> object:
    # IOMAD stores the top department's parent as 0.
    return None if value == 0 else value


Timestamp = Annotated[int, BeforeValidator(parse_rfc3339)]
OptionalTimestamp = Annotated[int | None, BeforeValidator(_optional_time)]


class EventData(BaseModel):
    """Base of all ``data`` models: strict types, unknown fields ignored."""

    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)

    # Names of fields that hold instants, rendered back to RFC 3339 in payloads.
    time_fields: ClassVar[frozenset[str]] = frozenset()


class CompanyUpserted(EventData):
    company_id: Id
    name: Name


class DepartmentUpserted(EventData):
    department_id: Id
    company_id: Id
    name: Name
    parent_id: Annotated[Id | None, BeforeValidator(_optional_parent)] = None


class DepartmentDeleted(EventData):
    department_id: Id


class UserUpserted(EventData):
    user_id: Id
    firstname: Name
    lastname: Name
    email: Name
    suspended: bool = False


class UserDeleted(EventData):
    user_id: Id


class UserDepartmentChanged(EventData):
    user_id: Id
    company_id: Id
    department_id: Id


class CourseUpserted(EventData):
    course_id: Id
    name: Name


class LicenseUpserted(EventData):
    time_fields = frozenset({"start_date", "expiry_date"})

    license_id: Id
    company_id: Id
    name: Name
    reusable: bool
    program: bool = False
    start_date: OptionalTimestamp = None
    expiry_date: OptionalTimestamp = None


class LicenseDeleted(EventData):
    license_id: Id


class LicenseAllocated(EventData):
    time_fields = frozenset({"issued_at"})

    user_id: Id
    license_id: Id
    course_id: Id
    # None means the event's own time; the decoder fills it in.
    issued_at: OptionalTimestamp = None


class LicenseUnallocated(EventData):
    user_id: Id
    license_id: Id
    course_id: Id


DATA_MODELS: dict[str, type[EventData]] = {
    "company.upserted": CompanyUpserted,
    "department.upserted": DepartmentUpserted,
    "department.deleted": DepartmentDeleted,
    "user.upserted": UserUpserted,
    "user.deleted": UserDeleted,
    "user.department.assigned": UserDepartmentChanged,
    "user.department.unassigned": UserDepartmentChanged,
    "course.upserted": CourseUpserted,
    "license.upserted": LicenseUpserted,
    "license.deleted": LicenseDeleted,
    "license.allocated": LicenseAllocated,
    "license.unallocated": LicenseUnallocated,
}


@dataclass(frozen=True, slots=True)
class Event:
    """One accepted event in its normalised CloudEvents form."""

    event_id: str
    type: str
    source: str
    time_us: int
    sequence: int | None
    data: EventData

    def to_cloudevent(self) -> dict[str, Any]:
        """Return the event as a CloudEvents 1.0 structured JSON object."""
        data = self.data.model_dump()
        for name in self.data.time_fields:
            if data.get(name) is not None:
                data[name] = format_us(data[name])
        envelope: dict[str, Any] = {
            "specversion": "1.0",
            "id": self.event_id,
            "source": self.source,
            "type": self.type,
            "time": format_us(self.time_us),
            "datacontenttype": "application/json",
            "data": data,
        }
        if self.sequence is not None:
            envelope["sequence"] = self.sequence
        return envelope

    def to_stored(self) -> StoredEvent:
        """Return the event in the plain form that the projection reads.

        The returned data is the model's own field dict, not a copy, so it
        must not be changed.
        """
        # A frozen pydantic model keeps its field values in __dict__; reading
        # it is much cheaper than model_dump, which copies every value.
        return StoredEvent(
            self.event_id, self.type, self.time_us, self.sequence, vars(self.data)
        )


class StoredEvent(NamedTuple):
    """An accepted event as the projection reads it: its data as a plain dict.

    ``data`` maps each field of the type's EventData model to its value, with
    instants in microseconds. Building one costs no validation, so a rebuild
    reads stored events in this form.
    """

    event_id: str
    type: str
    time_us: int
    sequence: int | None
    data: dict[str, Any]
