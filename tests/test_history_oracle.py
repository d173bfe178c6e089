"""Tests of the history generator, the report oracle and the Kafka broker fixture."""

from __future__ import annotations

import time
import uuid
from collections import Counter
from datetime import date

import orjson
import phpserialize
import pytest
from kafka import KafkaConsumer, TopicPartition

from consumer.decoding import decode
from license_report.errors import RejectedEvent
from tests.history import (
    DAY,
    MOODLE_SOURCE,
    TIE_CASES,
    UNSEQUENCED_SOURCE,
    History,
    encode_cloudevent,
    format_time,
    generate_history,
    generate_history_of_size,
    make_event,
    parse_time,
    write_jsonl,
)
from tests.kafka_broker import GROUP_TIMINGS
from tests.oracle import (
    department_members,
    department_subtree,
    expected_report,
    filter_rows,
)

SEED = 20240501


@pytest.fixture(scope="module")
def history() -> History:
    return generate_history(SEED)


# Helpers for reading generated messages


def _documents(history: History) -> list[tuple[int, dict | None]]:
    """Return (message index, decoded JSON object or None) for every message."""
    documents = []
    for index, (_, value) in enumerate(history.messages):
        try:
            document = orjson.loads(value)
        except orjson.JSONDecodeError:
            document = None
        documents.append((index, document if isinstance(document, dict) else None))
    return documents


def _moodle_documents(history: History) -> list[dict]:
    return [
        document
        for index, document in _documents(history)
        if document is not None
        and "eventname" in document
        and history.message_events[index] is not None
    ]


def _decode_other(other: object) -> dict:
    if isinstance(other, dict):
        return other
    assert isinstance(other, str)
    if other.startswith("{"):
        return orjson.loads(other)
    return phpserialize.loads(other.encode(), decode_strings=True)


def _license_companies(history: History) -> dict[int, int]:
    """Map each license id to the company of its latest upsert."""
    latest = {}
    for event in history.logical:
        if event.type == "license.upserted":
            license_id = event.data["license_id"]
            if license_id not in latest or event.time_us > latest[license_id][0]:
                latest[license_id] = (event.time_us, event.data["company_id"])
    return {license_id: company for license_id, (_, company) in latest.items()}


# Generator: determinism and size


def test_generate_history_same_seed_same_bytes():
    first = generate_history(SEED)
    second = generate_history(SEED)
    assert first.messages == second.messages
    assert first.logical == second.logical
    assert first.notable == second.notable


def test_generate_history_other_seed_differs():
    first = generate_history(SEED)
    second = generate_history(SEED + 1)
    assert first.messages != second.messages


def test_generate_history_logical_in_time_order(history):
    times = [event.time_us for event in history.logical]
    assert times == sorted(times)
    ids = [event.event_id for event in history.logical]
    assert len(ids) == len(set(ids))


def test_generate_history_spans_two_years(history):
    license_times = [
        event.time_us for event in history.logical if event.type.startswith("license.")
    ]
    assert max(license_times) - min(license_times) > 600 * DAY


def test_generate_history_of_size_near_target():
    started = time.perf_counter()
    history = generate_history_of_size(SEED, 20_000)
    elapsed = time.perf_counter() - started
    assert 17_000 <= len(history.logical) <= 23_000
    assert len(history.company_ids) >= 3
    # This took about 0.4 s on a 2-core machine, so the bound only catches a blow-up.
    assert elapsed < 10


def test_generate_history_rejects_tiny_sizes():
    with pytest.raises(ValueError, match="users"):
        generate_history(SEED, users=3)
    with pytest.raises(ValueError, match="companies"):
        generate_history(SEED, companies=1)


# Generator: what the messages contain


def test_history_messages_decode_to_logical_events(history):
    """Every valid message decodes, with the project's decoder, to its logical event."""
    decoded_ids: dict[int, str] = {}
    for (_, value), index in zip(history.messages, history.message_events, strict=True):
        if index is None:
            with pytest.raises(RejectedEvent):
                decode(value)
            continue
        logical = history.logical[index]
        event = decode(value)
        assert event.type == logical.type, logical.event_id
        assert event.time_us == logical.time_us, logical.event_id
        assert event.sequence == logical.sequence, logical.event_id
        assert event.source == logical.source, logical.event_id
        data = event.data.model_dump()
        # Fields that the contract lets producers leave out, with their defaults.
        expected = dict(logical.data)
        for name in data.keys() - expected.keys():
            expected[name] = {"suspended": False, "program": False}[name]
        assert data == expected, logical.event_id
        if not logical.event_id.startswith("moodle-content:"):
            assert event.event_id == logical.event_id
        assert decoded_ids.setdefault(index, event.event_id) == event.event_id
    # Distinct logical events never share a decoded id.
    assert len(set(decoded_ids.values())) == len(decoded_ids)
    assert len(decoded_ids) == len(history.logical)


def test_history_duplicates_redelivered(history):
    counts = Counter(index for index in history.message_events if index is not None)
    repeated = [index for index, count in counts.items() if count > 1]
    assert len(repeated) >= 5
    values = Counter(value for _, value in history.messages)
    assert any(count > 1 for count in values.values()), "no byte-identical redelivery"


def test_history_moodle_duplicate_in_other_shape(history):
    """A Moodle log row comes back with the same log id but different bytes."""
    values_by_log_id: dict[int, set[bytes]] = {}
    for (_, value), index in zip(history.messages, history.message_events, strict=True):
        if index is None:
            continue
        document = orjson.loads(value)
        if "eventname" in document and document.get("id") is not None:
            values_by_log_id.setdefault(int(document["id"]), set()).add(value)
    assert any(len(values) > 1 for values in values_by_log_id.values())


def test_history_moodle_shapes(history):
    documents = _moodle_documents(history)
    with_log_id = [d for d in documents if d.get("id") is not None]
    without_log_id = [d for d in documents if d.get("id") is None]
    assert with_log_id
    assert without_log_id

    other_kinds = Counter()
    for document in documents:
        other = document["other"]
        if isinstance(other, dict):
            other_kinds["object"] += 1
        elif other.startswith("{"):
            other_kinds["json"] += 1
        else:
            other_kinds["php"] += 1
    assert set(other_kinds) == {"object", "json", "php"}

    assigned = [
        d for d in documents if d["eventname"].endswith("user_license_assigned")
    ]
    others = [_decode_other(d["other"]) for d in assigned]
    assert any("issuedate" not in other for other in others)
    assert any(str(other.get("issuedate")) == "0" for other in others)
    assert any(
        str(other.get("issuedate", "0")) not in ("0", str(d["timecreated"]))
        for other, d in zip(others, assigned, strict=True)
    ), "no allocation with an issue date before its log time"
    assert any(isinstance(d["userid"], str) for d in documents)
    assert any(
        isinstance(_decode_other(d["other"])["licenseid"], str) for d in documents
    )
    assert any(not d["eventname"].startswith("\\") for d in documents)
    assert any(d["eventname"].endswith("user_license_unassigned") for d in documents)


def test_history_cloudevent_variants(history):
    documents = [
        document
        for index, document in _documents(history)
        if document is not None
        and document.get("specversion") == "1.0"
        and history.message_events[index] is not None
    ]
    allocations = [d for d in documents if d["type"] == "license.allocated"]
    assert any("issued_at" not in d["data"] for d in allocations)
    assert any(
        "issued_at" in d["data"]
        and parse_time(d["data"]["issued_at"]) < parse_time(d["time"])
        for d in allocations
    )
    assert any(not d["time"].endswith("Z") for d in documents), "no time with an offset"
    assert any("." in d["time"] for d in documents), "no time with a fraction"
    assert any("sequence" in d for d in documents)
    assert any("sequence" not in d for d in documents)


def test_history_delivery_out_of_order(history):
    times = [
        history.logical[index].time_us
        for index in history.message_events
        if index is not None
    ]
    inversions = sum(
        1 for earlier, later in zip(times, times[1:], strict=False) if earlier > later
    )
    assert inversions > len(times) // 10


def test_history_reference_delivered_after_use(history):
    """The late license's first upsert arrives after an allocation that uses it."""
    late_license = history.notable["late_license_id"]
    first_allocation = None
    first_upsert = None
    for position, index in enumerate(history.message_events):
        if index is None:
            continue
        event = history.logical[index]
        if event.data.get("license_id") != late_license:
            continue
        if event.type == "license.allocated" and first_allocation is None:
            first_allocation = position
        if event.type == "license.upserted" and first_upsert is None:
            first_upsert = position
    assert first_allocation is not None
    assert first_upsert is not None
    assert first_upsert > first_allocation


def test_history_tombstone_before_stale_upsert(history):
    deleted_user = history.notable["deleted_user_id"]
    deleted_at = None
    stale_after_delete = False
    for index in history.message_events:
        if index is None:
            continue
        event = history.logical[index]
        if event.data.get("user_id") != deleted_user:
            continue
        if event.type == "user.deleted":
            deleted_at = event.time_us
        elif event.type == "user.upserted" and deleted_at is not None:
            stale_after_delete = stale_after_delete or event.time_us < deleted_at
    assert deleted_at is not None
    assert stale_after_delete


def test_history_license_tie_variants(history):
    by_row_time: dict[tuple, list] = {}
    for event in history.logical:
        if event.type in ("license.allocated", "license.unallocated"):
            data = event.data
            key = (
                data["user_id"],
                data["license_id"],
                data["course_id"],
                event.time_us,
            )
            by_row_time.setdefault(key, []).append(event)
    ties = [events for events in by_row_time.values() if len(events) > 1]
    sequenced = [
        [event.sequence for event in events]
        for events in ties
        if len({event.type for event in events}) == 2
    ]
    assert any(
        None not in sequences and len(set(sequences)) == 2 for sequences in sequenced
    )
    assert any(
        None not in sequences and len(set(sequences)) == 1 for sequences in sequenced
    )
    assert any(sequences.count(None) == 1 for sequences in sequenced)
    assert any(sequences.count(None) == 2 for sequences in sequenced)
    assert set(history.notable["tie_rows"]) == set(TIE_CASES)


def test_history_reference_ties_settled_by_sequence(history):
    for role in ("sequence_tie", "unsequenced_tie"):
        user_id = history.notable[f"{role}_user_id"]
        upserts = [
            event
            for event in history.logical
            if event.type == "user.upserted" and event.data["user_id"] == user_id
        ]
        times = Counter(event.time_us for event in upserts)
        tied = [event for event in upserts if times[event.time_us] > 1]
        assert len(tied) == 2, role
        sequences = sorted(
            tied, key=lambda event: -1 if event.sequence is None else event.sequence
        )
        assert sequences[-1].sequence is not None, role
        if role == "unsequenced_tie":
            assert sequences[0].sequence is None
            assert sequences[0].source == UNSEQUENCED_SOURCE


def test_history_malformed_kinds(history):
    kinds = {item.kind for item in history.malformed}
    expected = {
        "not-json",
        "empty",
        "json-array",
        "unknown-type",
        "missing-field",
        "wrong-type",
        "impossible-date",
        "broken-php-other",
        "invalid-utf8",
    }
    assert expected <= kinds
    delivered = {
        value
        for (_, value), index in zip(
            history.messages, history.message_events, strict=True
        )
        if index is None
    }
    assert delivered == {item.value for item in history.malformed}
    invalid = next(
        item.value for item in history.malformed if item.kind == "invalid-utf8"
    )
    with pytest.raises(UnicodeDecodeError):
        invalid.decode("utf-8")
    for item in history.malformed:
        assert b"\n" not in item.value, item.kind


def test_history_message_keys(history):
    keys = [key for key, _ in history.messages]
    user_events = [
        (key, history.logical[index])
        for key, index in zip(keys, history.message_events, strict=True)
        if index is not None and "user_id" in history.logical[index].data
    ]
    keyed = [key == str(event.data["user_id"]).encode() for key, event in user_events]
    assert sum(keyed) > 0.8 * len(keyed)
    assert any(key is None for key in keys)


def test_history_reference_data_features(history):
    logical = history.logical
    notable = history.notable
    assert len(history.company_ids) == 3

    parents = {
        event.data["department_id"]: event.data["parent_id"]
        for event in logical
        if event.type == "department.upserted"
    }

    def depth(department_id):
        parent = parents[department_id]
        return 1 if parent is None else 1 + depth(parent)

    assert max(depth(department_id) for department_id in parents) == 3

    memberships = Counter(
        (event.data["user_id"], event.data["company_id"])
        for event in logical
        if event.type == "user.department.assigned"
    )
    assert any(count >= 2 for count in memberships.values()), (
        "no user in two departments"
    )
    companies_per_user = Counter(user_id for user_id, _ in memberships)
    assert any(count == 2 for count in companies_per_user.values())

    licenses = [event.data for event in logical if event.type == "license.upserted"]
    end = max(event.time_us for event in logical)
    assert any(data["reusable"] for data in licenses)
    assert any(not data["reusable"] for data in licenses)
    assert any(data.get("program") for data in licenses)
    assert any(
        data["expiry_date"] is not None and data["expiry_date"] < end
        for data in licenses
    )
    assert any(data["start_date"] > end for data in licenses)
    assert any(data["expiry_date"] is None for data in licenses)

    types = Counter(event.type for event in logical)
    assert types["user.deleted"] >= 2
    assert types["license.deleted"] == 1
    assert types["department.deleted"] == 1
    assert types["user.department.unassigned"] >= 2
    suspended = [
        event.data["user_id"]
        for event in logical
        if event.type == "user.upserted" and event.data.get("suspended")
    ]
    assert notable["suspended_user_id"] in suspended
    assert any(event.source == MOODLE_SOURCE for event in logical)


def test_write_jsonl_skips_invalid_utf8(history, tmp_path):
    path = tmp_path / "events.jsonl"
    written = write_jsonl(history, path)
    lines = path.read_text(encoding="utf-8").split("\n")
    assert lines[-1] == ""
    assert len(lines) - 1 == written
    invalid = [item for item in history.malformed if item.kind == "invalid-utf8"]
    assert invalid
    assert written == len(history.messages) - len(invalid)


def test_write_jsonl_includes_invalid_utf8(history, tmp_path):
    path = tmp_path / "events.jsonl"
    written = write_jsonl(history, path, include_invalid_utf8=True)
    assert written == len(history.messages)
    assert path.read_bytes().split(b"\n")[:-1] == [
        value for _, value in history.messages
    ]


def test_encode_cloudevent_round_trip():
    event = make_event(
        "license.allocated",
        "2024-05-01T12:00:00Z",
        {"user_id": 1, "license_id": 2, "course_id": 3},
        sequence=7,
    )
    decoded = decode(encode_cloudevent(event, offset_minutes=120))
    assert decoded.event_id == event.event_id
    assert decoded.time_us == parse_time("2024-05-01T12:00:00Z")
    assert decoded.sequence == 7
    assert decoded.data.issued_at == decoded.time_us


def test_make_event_defaults_issued_at():
    data = {"user_id": 1, "license_id": 2, "course_id": 3}
    event = make_event("license.allocated", T0, data)
    assert event.data["issued_at"] == parse_time(T0)
    assert event.time_us == parse_time(T0)
    sequenced = make_event("license.allocated", T0, data, sequence=1)
    assert sequenced.event_id != event.event_id
    assert make_event("license.allocated", T0, data).event_id == event.event_id


def test_format_time_offsets():
    instant = parse_time("2024-05-01T12:00:00Z")
    assert format_time(instant) == "2024-05-01T12:00:00Z"
    assert format_time(instant, 120) == "2024-05-01T14:00:00+02:00"
    assert format_time(instant, -300) == "2024-05-01T07:00:00-05:00"
    assert format_time(instant + 250_000) == "2024-05-01T12:00:00.250000Z"
    assert parse_time("2024-05-01T14:00:00+02:00") == instant


# Oracle: hand-written histories

T0 = "2024-01-10T09:00:00Z"
COMPANY, OTHER_COMPANY = 1, 2
USER, LICENSE, COURSE = 100, 200, 300
TOP, SALES, SALES_NORTH = 10, 11, 12


def _company(company_id=COMPANY, user_id=USER, license_id=LICENSE, time=T0, **user):
    """Return reference events: a company with one user, license and course."""
    top = TOP if company_id == COMPANY else 20
    return [
        make_event(
            "company.upserted", time, {"company_id": company_id, "name": "Acme"}
        ),
        make_event(
            "department.upserted",
            time,
            {
                "department_id": top,
                "company_id": company_id,
                "name": "Acme",
                "parent_id": None,
            },
        ),
        make_event(
            "user.upserted",
            time,
            {
                "user_id": user_id,
                "firstname": user.get("firstname", "Ada"),
                "lastname": user.get("lastname", "Lovelace"),
                "email": user.get("email", "ada@acme.example"),
                "suspended": user.get("suspended", False),
            },
        ),
        make_event(
            "user.department.assigned",
            time,
            {"user_id": user_id, "company_id": company_id, "department_id": top},
        ),
        make_event(
            "license.upserted",
            time,
            {
                "license_id": license_id,
                "company_id": company_id,
                "name": f"License {license_id}",
                "reusable": True,
                "start_date": "2024-01-01T00:00:00Z",
                "expiry_date": None,
            },
        ),
        make_event("course.upserted", time, {"course_id": COURSE, "name": "First Aid"}),
    ]


def _allocate(
    time, sequence=None, user_id=USER, license_id=LICENSE, course_id=COURSE, **data
):
    return make_event(
        "license.allocated",
        time,
        {"user_id": user_id, "license_id": license_id, "course_id": course_id, **data},
        sequence=sequence,
    )


def _unallocate(
    time, sequence=None, user_id=USER, license_id=LICENSE, course_id=COURSE
):
    return make_event(
        "license.unallocated",
        time,
        {"user_id": user_id, "license_id": license_id, "course_id": course_id},
        sequence=sequence,
    )


def _only_row(events, company_id=COMPANY, **options):
    rows = expected_report(events, company_id, **options)
    assert len(rows) == 1, rows
    return rows[0]


def test_expected_report_single_allocation_row():
    events = _company() + [
        _allocate("2024-02-01T10:00:00Z", issued_at="2024-01-31T08:00:00Z")
    ]
    assert expected_report(events, COMPANY) == [
        {
            "user_id": USER,
            "firstname": "Ada",
            "lastname": "Lovelace",
            "email": "ada@acme.example",
            "departments": ["Acme"],
            "license_id": LICENSE,
            "license_name": "License 200",
            "reusable": True,
            "course_id": COURSE,
            "course_name": "First Aid",
            "allocated": True,
            "dates_allocated": ["2024-01-31T08:00:00Z"],
            "dates_unallocated": [],
            "allocations": 1,
            "unallocations": 0,
        }
    ]


def test_expected_report_duplicate_counted_once():
    allocation = _allocate("2024-02-01T10:00:00Z")
    unallocation = _unallocate("2024-03-01T10:00:00Z")
    events = _company() + [
        allocation,
        unallocation,
        allocation,
        unallocation,
        allocation,
    ]
    row = _only_row(events)
    assert row["allocations"] == 1
    assert row["unallocations"] == 1
    assert row["dates_allocated"] == ["2024-02-01T10:00:00Z"]
    assert row["allocated"] is False


def test_expected_report_counts_every_distinct_event():
    events = _company() + [
        _allocate("2024-02-01T10:00:00Z"),
        _unallocate("2024-03-01T10:00:00Z"),
        _allocate("2024-04-01T10:00:00Z"),
        _unallocate("2024-05-01T10:00:00Z"),
        _allocate("2024-06-01T10:00:00Z"),
    ]
    row = _only_row(events)
    assert row["allocations"] == 3
    assert row["unallocations"] == 2
    assert row["allocated"] is True
    assert row["dates_unallocated"] == ["2024-03-01T10:00:00Z", "2024-05-01T10:00:00Z"]


def test_expected_report_dates_sorted_by_instant():
    # Listed newest first; issued_at defaults to the event's time.
    events = _company() + [
        _allocate("2024-06-01T10:00:00Z"),
        _unallocate("2024-05-01T10:00:00Z"),
        _allocate("2024-02-01T10:00:00Z", issued_at="2024-01-15T00:00:00+02:00"),
        _unallocate("2024-03-01T10:00:00Z"),
    ]
    row = _only_row(events)
    assert row["dates_allocated"] == ["2024-01-14T22:00:00Z", "2024-06-01T10:00:00Z"]
    assert row["dates_unallocated"] == ["2024-03-01T10:00:00Z", "2024-05-01T10:00:00Z"]


# Each case: two events at the same time as (kind, sequence), and the expected value
# of ``allocated``.
TIE_TABLE = [
    pytest.param(
        ("allocate", 5), ("unallocate", 6), False, id="higher-sequence-unallocation"
    ),
    pytest.param(
        ("unallocate", 5), ("allocate", 6), True, id="higher-sequence-allocation"
    ),
    pytest.param(
        ("allocate", 9), ("unallocate", 3), True, id="lower-sequence-unallocation"
    ),
    pytest.param(
        ("allocate", None), ("unallocate", 6), False, id="allocation-unsequenced"
    ),
    pytest.param(
        ("allocate", 6), ("unallocate", None), False, id="unallocation-unsequenced"
    ),
    pytest.param(
        ("allocate", None), ("unallocate", None), False, id="both-unsequenced"
    ),
    pytest.param(("allocate", 6), ("unallocate", 6), False, id="equal-sequence"),
]


@pytest.mark.parametrize(("first", "second", "allocated"), TIE_TABLE)
def test_expected_report_tie_at_same_time(first, second, allocated):
    at = "2024-02-01T10:00:00Z"
    build = {"allocate": _allocate, "unallocate": _unallocate}
    pair = [build[first[0]](at, first[1]), build[second[0]](at, second[1])]
    for order in (pair, pair[::-1]):
        row = _only_row(_company() + order)
        assert row["allocated"] is allocated, [event.type for event in order]


def test_expected_report_time_beats_sequence():
    events = _company() + [
        _unallocate("2024-02-01T10:00:00Z", sequence=99),
        _allocate("2024-02-01T10:00:01Z", sequence=1),
    ]
    assert _only_row(events)["allocated"] is True
    events = _company() + [
        _allocate("2024-02-01T10:00:01Z"),
        _unallocate("2024-02-01T10:00:02Z"),
    ]
    assert _only_row(events)["allocated"] is False


def test_expected_report_three_way_tie():
    at = "2024-02-01T10:00:00Z"
    events = _company() + [_allocate(at, 10), _unallocate(at, 3), _allocate(at, None)]
    assert _only_row(events)["allocated"] is True
    events.append(_unallocate(at, None))
    assert _only_row(events)["allocated"] is False


def test_expected_report_delete_beats_stale_upsert():
    """A deletion wins over an upsert with an earlier time that is listed after it."""
    delete = make_event("user.deleted", "2024-03-01T00:00:00Z", {"user_id": USER})
    stale = make_event(
        "user.upserted",
        "2024-02-15T00:00:00Z",
        {
            "user_id": USER,
            "firstname": "Ada",
            "lastname": "King",
            "email": "a@acme.example",
        },
    )
    events = _company() + [_allocate("2024-02-01T10:00:00Z"), delete, stale]
    assert expected_report(events, COMPANY) == []
    assert expected_report(events, COMPANY, include_suspended=True) == []


def test_expected_report_upsert_after_delete_revives():
    delete = make_event("user.deleted", "2024-03-01T00:00:00Z", {"user_id": USER})
    revive = make_event(
        "user.upserted",
        "2024-04-01T00:00:00Z",
        {
            "user_id": USER,
            "firstname": "Ada",
            "lastname": "King",
            "email": "k@acme.example",
        },
    )
    events = _company() + [revive, _allocate("2024-02-01T10:00:00Z"), delete]
    row = _only_row(events)
    assert row["lastname"] == "King"
    assert row["email"] == "k@acme.example"


def test_expected_report_deleted_license_hidden():
    delete = make_event(
        "license.deleted", "2024-05-01T00:00:00Z", {"license_id": LICENSE}
    )
    events = [delete] + _company() + [_allocate("2024-02-01T10:00:00Z")]
    assert expected_report(events, COMPANY) == []


def test_expected_report_reference_tie_by_sequence():
    at = "2024-02-01T00:00:00Z"
    names = {"user_id": USER, "firstname": "Ada", "lastname": "Lovelace"}
    unsequenced = make_event(
        "user.upserted", at, {**names, "email": "none@acme.example"}
    )
    low = make_event(
        "user.upserted", at, {**names, "email": "low@acme.example"}, sequence=4
    )
    high = make_event(
        "user.upserted", at, {**names, "email": "high@acme.example"}, sequence=5
    )
    base = _company() + [_allocate("2024-02-02T10:00:00Z")]
    for order in (
        [high, low, unsequenced],
        [unsequenced, low, high],
        [low, unsequenced],
    ):
        row = _only_row(base + order)
        expected = "high@acme.example" if high in order else "low@acme.example"
        assert row["email"] == expected


def test_expected_report_unresolvable_tie_raises():
    at = "2024-02-01T00:00:00Z"
    names = {"user_id": USER, "firstname": "Ada", "lastname": "Lovelace"}
    first = make_event("user.upserted", at, {**names, "email": "one@acme.example"})
    second = make_event("user.upserted", at, {**names, "email": "two@acme.example"})
    events = _company() + [first, second, _allocate("2024-02-02T10:00:00Z")]
    with pytest.raises(ValueError, match="same time and sequence"):
        expected_report(events, COMPANY)


def test_expected_report_user_in_two_companies():
    other_license = 201
    events = (
        _company()
        + _company(OTHER_COMPANY, license_id=other_license)
        + [
            _allocate("2024-02-01T10:00:00Z"),
            _allocate("2024-02-02T10:00:00Z", license_id=other_license),
        ]
    )
    own = expected_report(events, COMPANY)
    other = expected_report(events, OTHER_COMPANY)
    assert [row["license_id"] for row in own] == [LICENSE]
    assert [row["license_id"] for row in other] == [other_license]
    assert own[0]["departments"] == ["Acme"]


def test_expected_report_other_company_license_hidden():
    # The user is a member of COMPANY only, and the license moves to OTHER_COMPANY.
    moved = make_event(
        "license.upserted",
        "2024-01-20T00:00:00Z",
        {
            "license_id": LICENSE,
            "company_id": OTHER_COMPANY,
            "name": "License 200",
            "reusable": False,
            "start_date": None,
            "expiry_date": None,
        },
    )
    events = _company() + [_allocate("2024-02-01T10:00:00Z"), moved]
    assert expected_report(events, COMPANY) == []
    assert expected_report(events, OTHER_COMPANY) == []


def test_expected_report_suspended_user():
    events = _company(suspended=True) + [_allocate("2024-02-01T10:00:00Z")]
    assert expected_report(events, COMPANY) == []
    assert len(expected_report(events, COMPANY, include_suspended=True)) == 1


def test_expected_report_unassigned_member_hidden():
    unassign = make_event(
        "user.department.unassigned",
        "2024-03-01T00:00:00Z",
        {"user_id": USER, "company_id": COMPANY, "department_id": TOP},
    )
    events = _company() + [_allocate("2024-02-01T10:00:00Z"), unassign]
    assert expected_report(events, COMPANY) == []
    reassign = make_event(
        "user.department.assigned",
        "2024-04-01T00:00:00Z",
        {"user_id": USER, "company_id": COMPANY, "department_id": TOP},
    )
    assert len(expected_report(events + [reassign], COMPANY)) == 1


def _tree_events():
    """Acme > Sales > Sales North, and Acme > Support, with the user in two of them."""

    def department(department_id, name, parent_id, time=T0):
        return make_event(
            "department.upserted",
            time,
            {
                "department_id": department_id,
                "company_id": COMPANY,
                "name": name,
                "parent_id": parent_id,
            },
        )

    def assign(department_id, user_id=USER):
        return make_event(
            "user.department.assigned",
            T0,
            {"user_id": user_id, "company_id": COMPANY, "department_id": department_id},
        )

    return [
        department(SALES, "Sales", TOP),
        department(SALES_NORTH, "Sales North", SALES),
        department(13, "Support", TOP),
        assign(SALES_NORTH),
        assign(13),
    ]


def test_expected_report_departments_sorted_live_only():
    events = _company() + _tree_events() + [_allocate("2024-02-01T10:00:00Z")]
    assert _only_row(events)["departments"] == ["Acme", "Sales North", "Support"]
    deleted = make_event(
        "department.deleted", "2024-03-01T00:00:00Z", {"department_id": 13}
    )
    assert _only_row(events + [deleted])["departments"] == ["Acme", "Sales North"]
    unknown = make_event(
        "user.department.assigned",
        T0,
        {"user_id": USER, "company_id": COMPANY, "department_id": 999},
    )
    assert _only_row(events + [unknown])["departments"] == [
        "Acme",
        "Sales North",
        "Support",
    ]


def test_expected_report_deleted_department_member():
    """Membership, not the department's state, decides whether a user is a member."""
    events = _company() + [_allocate("2024-02-01T10:00:00Z")]
    events.append(
        make_event("department.deleted", "2024-03-01T00:00:00Z", {"department_id": TOP})
    )
    row = _only_row(events)
    assert row["departments"] == []


def test_expected_report_unknown_course_and_user():
    events = _company() + [
        _allocate("2024-02-01T10:00:00Z", course_id=301),
        make_event(
            "user.department.assigned",
            T0,
            {"user_id": 101, "company_id": COMPANY, "department_id": TOP},
        ),
        _allocate("2024-02-01T10:00:00Z", user_id=101),
    ]
    row = _only_row(events)
    assert row["course_id"] == 301
    assert row["course_name"] is None


def test_expected_report_rows_sorted():
    second_user = make_event(
        "user.upserted",
        T0,
        {
            "user_id": 99,
            "firstname": "Bo",
            "lastname": "Zed",
            "email": "bo@acme.example",
        },
    )
    member = make_event(
        "user.department.assigned",
        T0,
        {"user_id": 99, "company_id": COMPANY, "department_id": TOP},
    )
    events = _company() + [
        second_user,
        member,
        _allocate("2024-02-01T10:00:00Z", course_id=302),
        _allocate("2024-02-01T10:00:00Z", course_id=301),
        _allocate("2024-02-01T10:00:00Z", user_id=99),
    ]
    keys = [
        (row["user_id"], row["license_id"], row["course_id"])
        for row in expected_report(events, COMPANY)
    ]
    assert keys == [(99, LICENSE, COURSE), (USER, LICENSE, 301), (USER, LICENSE, 302)]


# Oracle: subtree and filters


def test_department_subtree_nested_and_moved():
    events = _company() + _tree_events()
    assert department_subtree(events, TOP) == {TOP, SALES, SALES_NORTH, 13}
    assert department_subtree(events, SALES) == {SALES, SALES_NORTH}
    moved = make_event(
        "department.upserted",
        "2024-03-01T00:00:00Z",
        {
            "department_id": SALES_NORTH,
            "company_id": COMPANY,
            "name": "North",
            "parent_id": 13,
        },
    )
    assert department_subtree(events + [moved], SALES) == {SALES}
    assert department_subtree(events + [moved], 13) == {13, SALES_NORTH}


def test_department_subtree_deleted_cuts_branch():
    events = _company() + _tree_events()
    deleted = make_event(
        "department.deleted", "2024-03-01T00:00:00Z", {"department_id": SALES}
    )
    assert department_subtree(events + [deleted], TOP) == {TOP, 13}
    assert department_subtree(events + [deleted], SALES) == set()
    assert department_subtree(events, 999) == set()


def test_department_members_current_only():
    events = _company() + _tree_events()
    assert department_members(events, COMPANY, {SALES_NORTH}) == {USER}
    assert department_members(events, OTHER_COMPANY, {SALES_NORTH}) == set()
    unassign = make_event(
        "user.department.unassigned",
        "2024-03-01T00:00:00Z",
        {"user_id": USER, "company_id": COMPANY, "department_id": SALES_NORTH},
    )
    assert department_members(events + [unassign], COMPANY, {SALES_NORTH}) == set()


def _filter_fixture():
    """Two users, one in Sales North and one only in the top department."""
    second_user = make_event(
        "user.upserted",
        T0,
        {
            "user_id": 99,
            "firstname": "Bo",
            "lastname": "Zed",
            "email": "bo@zed.example",
        },
    )
    member = make_event(
        "user.department.assigned",
        T0,
        {"user_id": 99, "company_id": COMPANY, "department_id": TOP},
    )
    unassign_top = make_event(
        "user.department.unassigned",
        "2024-01-11T00:00:00Z",
        {"user_id": USER, "company_id": COMPANY, "department_id": TOP},
    )
    events = _company() + _tree_events() + [second_user, member, unassign_top]
    events += [
        _allocate("2024-02-01T23:59:59Z"),
        _unallocate("2024-03-10T00:00:00Z"),
        _allocate("2024-02-05T10:00:00Z", user_id=99),
    ]
    return events, expected_report(events, COMPANY)


def test_filter_rows_department_subtree():
    events, rows = _filter_fixture()

    def users(department_id):
        matching = filter_rows(
            rows, department_id=department_id, logical_events=events, company_id=COMPANY
        )
        return [row["user_id"] for row in matching]

    assert users(TOP) == [99, USER]
    assert users(SALES) == [USER]
    assert users(13) == [USER]
    with pytest.raises(ValueError, match="logical_events"):
        filter_rows(rows, department_id=SALES)


def test_filter_rows_allocated_and_ids():
    _, rows = _filter_fixture()
    assert [row["user_id"] for row in filter_rows(rows, allocated=True)] == [99]
    assert [row["user_id"] for row in filter_rows(rows, allocated=False)] == [USER]
    assert len(filter_rows(rows, license_id=LICENSE, course_id=COURSE)) == 2
    assert filter_rows(rows, license_id=LICENSE + 1) == []
    assert filter_rows(rows, course_id=COURSE + 1) == []


def test_filter_rows_date_bounds_inclusive():
    _, rows = _filter_fixture()

    def users(**bounds):
        return [row["user_id"] for row in filter_rows(rows, **bounds)]

    assert users(allocated_from="2024-02-01", allocated_to="2024-02-01") == [USER]
    assert users(allocated_from=date(2024, 2, 2)) == [99]
    assert users(allocated_to="2024-02-04") == [USER]
    assert users(allocated_from="2024-02-02", allocated_to="2024-02-04") == []
    assert users(unallocated_from="2024-03-10", unallocated_to="2024-03-10") == [USER]
    assert users(unallocated_to="2024-03-09") == []


def test_filter_rows_search_and_initials():
    _, rows = _filter_fixture()

    def users(**filters):
        return [row["user_id"] for row in filter_rows(rows, **filters)]

    assert users(search="ADA") == [USER]
    assert users(search="ada lovelace") == [USER]
    assert users(search="zed.example") == [99]
    assert users(search="a l") == [USER]
    assert users(search="nobody") == []
    assert users(first_initial="b") == [99]
    assert users(last_initial="L") == [USER]
    assert users(first_initial="a", last_initial="z") == []


# Oracle: the generated history's edge cases


def test_expected_report_generated_edge_cases(history):
    notable = history.notable
    reports = {c: expected_report(history.logical, c) for c in history.company_ids}
    with_suspended = {
        c: expected_report(history.logical, c, include_suspended=True)
        for c in history.company_ids
    }
    visible = {row["user_id"] for rows in reports.values() for row in rows}
    visible_with_suspended = {
        row["user_id"] for rows in with_suspended.values() for row in rows
    }

    assert notable["deleted_user_id"] not in visible_with_suspended
    assert notable["unknown_user_id"] not in visible_with_suspended
    assert notable["suspended_user_id"] not in visible
    assert notable["suspended_user_id"] in visible_with_suspended
    assert notable["unsuspended_user_id"] in visible
    assert notable["revived_user_id"] in visible
    assert notable["mover_user_id"] in visible
    leaver_rows = reports[notable["leaver_company_id"]]
    assert notable["leaver_user_id"] not in {row["user_id"] for row in leaver_rows}

    all_rows = [row for rows in with_suspended.values() for row in rows]
    assert notable["deleted_license_id"] not in {row["license_id"] for row in all_rows}
    assert any(
        event.type == "license.allocated"
        and event.data["license_id"] == notable["deleted_license_id"]
        for event in history.logical
    ), "the deleted license was never allocated"
    unknown_course = [
        row for row in all_rows if row["course_id"] == notable["unknown_course_id"]
    ]
    assert unknown_course
    assert all(row["course_name"] is None for row in unknown_course)
    assert any(row["allocated"] for row in all_rows)
    assert any(not row["allocated"] for row in all_rows)
    assert any(row["allocations"] > 1 for row in all_rows)


def test_expected_report_generated_tie_rows(history):
    rows = {
        (row["user_id"], row["license_id"], row["course_id"]): row
        for company_id in history.company_ids
        for row in expected_report(history.logical, company_id)
    }
    for case, row_key in history.notable["tie_rows"].items():
        assert row_key in rows, case
        assert rows[row_key]["allocated"] is TIE_CASES[case], case


def test_expected_report_generated_companies_separate(history):
    license_company = _license_companies(history)
    for company_id in history.company_ids:
        for row in expected_report(history.logical, company_id):
            assert license_company[row["license_id"]] == company_id
    companies_of_user = Counter()
    for company_id in history.company_ids:
        rows = expected_report(history.logical, company_id)
        companies_of_user.update({row["user_id"] for row in rows})
    two_company = history.notable["two_company_user_ids"]
    assert any(companies_of_user[user_id] == 2 for user_id in two_company)


def test_expected_report_generated_reference_edge_cases(history):
    notable = history.notable
    rows = [
        row
        for company_id in history.company_ids
        for row in expected_report(history.logical, company_id)
    ]
    by_user = {row["user_id"]: row for row in rows}
    assert by_user[notable["revived_user_id"]]["email"].startswith("returned.")
    assert by_user[notable["sequence_tie_user_id"]]["email"].startswith("after.")
    assert by_user[notable["unsequenced_tie_user_id"]]["email"].startswith("after.")

    deleted_department = notable["deleted_department_id"]
    deleted_name = next(
        event.data["name"]
        for event in history.logical
        if event.type == "department.upserted"
        and event.data["department_id"] == deleted_department
    )
    member = by_user[notable["deleted_department_member_id"]]
    assert deleted_name not in member["departments"]
    assert member["departments"]


def test_expected_report_generated_duplicates_ignored(history):
    """Feeding every delivered event, duplicates included, gives the same report."""
    delivered = [history.logical[i] for i in history.message_events if i is not None]
    for company_id in history.company_ids:
        assert expected_report(delivered, company_id) == expected_report(
            history.logical, company_id
        )


def test_expected_report_generated_filters_consistent(history):
    company_id = history.company_ids[0]
    rows = expected_report(history.logical, company_id)
    top = next(
        event.data["department_id"]
        for event in history.logical
        if event.type == "department.upserted"
        and event.data["company_id"] == company_id
        and event.data["parent_id"] is None
    )
    everyone = filter_rows(
        rows, department_id=top, logical_events=history.logical, company_id=company_id
    )
    # Only leaf departments are deleted, so the top department's subtree contains every
    # live department, and a user matches when the row lists any department.
    assert everyone == [row for row in rows if row["departments"]]
    allocated = filter_rows(rows, allocated=True)
    unallocated = filter_rows(rows, allocated=False)
    assert len(allocated) + len(unallocated) == len(rows)


# Kafka broker fixture


def _process_state(pid: int) -> str:
    """Return the state letter of a Linux process, such as "T" when it is stopped."""
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0]


def test_kafka_broker_round_trip(kafka_broker, history):
    topic = f"round-trip-{uuid.uuid4().hex[:8]}"
    kafka_broker.create_topic(topic, partitions=3)
    messages = history.messages[:300]
    assert any(key is None for key, _ in messages)
    assert kafka_broker.produce(topic, messages) == len(messages)

    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=kafka_broker.bootstrap_servers,
        group_id=f"group-{topic}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        **GROUP_TIMINGS,
    )
    received = []
    deadline = time.monotonic() + 30
    try:
        while len(received) < len(messages) and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=500).values():
                received.extend(records)
        consumer.commit()
        partitions = {TopicPartition(r.topic, r.partition) for r in received}
        assert len(partitions) > 1
        for partition in partitions:
            assert consumer.committed(partition) is not None, partition
    finally:
        consumer.close()

    assert Counter((r.key, r.value) for r in received) == Counter(messages)
    # Records with one key stay in the order they were produced.
    for key in {key for key, _ in messages if key is not None}:
        sent = [value for k, value in messages if k == key]
        got = [
            r.value for r in sorted(received, key=lambda r: r.offset) if r.key == key
        ]
        assert got == sent, key


def test_kafka_broker_pause_resume(kafka_broker):
    topic = f"pause-{uuid.uuid4().hex[:8]}"
    kafka_broker.create_topic(topic)
    kafka_broker.pause()
    try:
        assert kafka_broker.paused
        assert _process_state(kafka_broker.process.pid) == "T"
    finally:
        kafka_broker.resume()
    assert _process_state(kafka_broker.process.pid) in ("R", "S")
    assert kafka_broker.produce(topic, [(b"k", b"after-pause")]) == 1
    consumer = KafkaConsumer(
        bootstrap_servers=kafka_broker.bootstrap_servers, enable_auto_commit=False
    )
    values = []
    try:
        partition = TopicPartition(topic, 0)
        consumer.assign([partition])
        consumer.seek_to_beginning(partition)
        deadline = time.monotonic() + 10
        while not values and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=500).values():
                values.extend(record.value for record in records)
    finally:
        consumer.close()
    assert values == [b"after-pause"]
