"""Decoding of CloudEvents and of Moodle's own event data."""

from __future__ import annotations

import orjson
import pytest

from consumer.decoding import MAX_EVENT_BYTES, decode
from consumer.timestamps import format_us, parse_rfc3339
from license_report.errors import RejectedEvent

ASSIGNED = "\\block_iomad_company_admin\\event\\user_license_assigned"
UNASSIGNED = "\\block_iomad_company_admin\\event\\user_license_unassigned"


def cloudevent(type_="license.allocated", data=None, **envelope) -> bytes:
    document = {
        "specversion": "1.0",
        "id": "event-1",
        "source": "/moodle/iomad",
        "type": type_,
        "time": "2024-05-01T12:00:00Z",
        "data": {"user_id": 7, "license_id": 3, "course_id": 11}
        if data is None
        else data,
    }
    document.update(envelope)
    return orjson.dumps({k: v for k, v in document.items() if v is not ...})


def moodle(**fields) -> bytes:
    document = {
        "eventname": ASSIGNED,
        "userid": 7,
        "courseid": 11,
        "other": {"licenseid": 3, "duedate": 0},
        "timecreated": 1714564800,
        "id": 501,
    }
    document.update(fields)
    return orjson.dumps({k: v for k, v in document.items() if v is not ...})


def test_decode_allocation_defaults_issued_at_to_time():
    event = decode(cloudevent())
    assert event.data.issued_at == parse_rfc3339("2024-05-01T12:00:00Z")
    assert event.sequence is None


def test_decode_keeps_explicit_issued_at_and_sequence():
    data = {
        "user_id": 7,
        "license_id": 3,
        "course_id": 11,
        "issued_at": "2024-04-30T22:00:00+02:00",
    }
    event = decode(cloudevent(data=data, sequence="42"))
    assert format_us(event.data.issued_at) == "2024-04-30T20:00:00Z"
    assert event.sequence == 42


def test_decode_round_trips_through_cloudevent_form():
    event = decode(cloudevent(sequence=5))
    again = decode(orjson.dumps(event.to_cloudevent()))
    assert again == event


def test_decode_user_suspended_defaults_false():
    data = {"user_id": 1, "firstname": "Ana", "lastname": "Silva", "email": "a@x.org"}
    assert decode(cloudevent("user.upserted", data)).data.suspended is False


def test_decode_department_parent_zero_is_top():
    data = {"department_id": 4, "company_id": 1, "name": "Top", "parent_id": 0}
    assert decode(cloudevent("department.upserted", data)).data.parent_id is None


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"not json", "not valid JSON"),
        (b"\xff\xfe{}", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (None, "null"),
        (b" " * (MAX_EVENT_BYTES + 1), "more than the limit"),
        (cloudevent(specversion="0.3"), "specversion"),
        (cloudevent(id=...), "id is missing"),
        (cloudevent(id=""), "id is not a non-empty string"),
        (cloudevent(source=...), "source is missing"),
        (cloudevent("license.exploded"), "unknown event type"),
        (cloudevent(time="2024-02-30T00:00:00Z"), "impossible date"),
        (cloudevent(time="2024-05-01T12:00:00"), "time zone"),
        (cloudevent(time="9001-01-01T00:00:00Z"), "outside the years"),
        (cloudevent(time=1714564800), "RFC 3339"),
        (cloudevent(data=[1]), "data must be a JSON object"),
        (
            cloudevent(data={"user_id": 7, "license_id": 3}),
            "data.course_id: Field required",
        ),
        (
            cloudevent(data={"user_id": "7", "license_id": 3, "course_id": 1}),
            "data.user_id",
        ),
        (
            cloudevent(data={"user_id": True, "license_id": 3, "course_id": 1}),
            "data.user_id",
        ),
        (
            cloudevent(data={"user_id": 0, "license_id": 3, "course_id": 1}),
            "data.user_id",
        ),
        (cloudevent(sequence=-1), "sequence must be between"),
        (cloudevent(sequence=1.5), "sequence must be an integer"),
        (
            cloudevent(
                "license.upserted", {"license_id": 1, "company_id": 1, "name": "L"}
            ),
            "data.reusable: Field required",
        ),
    ],
)
def test_decode_rejects_invalid_cloudevent(raw, reason):
    with pytest.raises(RejectedEvent) as caught:
        decode(raw)
    assert reason in caught.value.reason


def test_decode_moodle_assigned_uses_log_id():
    event = decode(moodle())
    assert event.type == "license.allocated"
    assert event.event_id == "moodle-log-501"
    assert event.sequence == 501
    assert (event.data.user_id, event.data.license_id, event.data.course_id) == (
        7,
        3,
        11,
    )


def test_decode_moodle_missing_issuedate_means_timecreated():
    event = decode(moodle())
    assert format_us(event.data.issued_at) == "2024-05-01T12:00:00Z"


def test_decode_moodle_zero_issuedate_means_timecreated():
    event = decode(moodle(other={"licenseid": 3, "issuedate": 0}))
    assert event.data.issued_at == event.time_us


def test_decode_moodle_issuedate_as_string():
    event = decode(moodle(other={"licenseid": "3", "issuedate": "1714478400"}))
    assert format_us(event.data.issued_at) == "2024-04-30T12:00:00Z"


def test_decode_moodle_other_as_json_string():
    event = decode(moodle(other='{"licenseid":"3","issuedate":1714478400}'))
    assert event.data.license_id == 3


def test_decode_moodle_other_php_serialized():
    other = 'a:2:{s:9:"licenseid";s:1:"3";s:9:"issuedate";i:1714478400;}'
    event = decode(moodle(other=other))
    assert event.data.license_id == 3
    assert format_us(event.data.issued_at) == "2024-04-30T12:00:00Z"


def test_decode_moodle_without_log_id_is_stable():
    first = decode(moodle(id=...))
    second = decode(moodle(id=...))
    other = decode(moodle(id=..., userid=8))
    assert first.event_id == second.event_id
    assert first.event_id != other.event_id
    assert first.sequence is None


def test_decode_moodle_unassigned():
    event = decode(moodle(eventname=UNASSIGNED.lstrip("\\"), userid="7"))
    assert event.type == "license.unallocated"
    assert event.data.user_id == 7


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"eventname": "\\core\\event\\user_loggedin"}, "unsupported eventname"),
        ({"other": 'a:1:{s:9:"licenseid";'}, "PHP-serialized"),
        ({"other": "{broken"}, "not valid JSON"),
        ({"other": {"duedate": 0}}, "other.licenseid is missing"),
        ({"other": None}, "other must be"),
        ({"userid": "seven"}, "userid is not an integer"),
        ({"userid": 0}, "userid is out of range"),
        ({"timecreated": ...}, "timecreated is missing"),
        ({"timecreated": 10**15}, "outside the years"),
        ({"timecreated": 221_876_928_000}, "outside the years"),
        ({"other": "a:1:{i:0;" * 1100 + "N;" + "}" * 1100}, "PHP-serialized"),
    ],
)
def test_decode_rejects_invalid_moodle_event(fields, reason):
    with pytest.raises(RejectedEvent) as caught:
        decode(moodle(**fields))
    assert reason in caught.value.reason
