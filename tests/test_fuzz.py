"""Generated invalid message values mixed with valid events.

A seeded generator makes values of every kind that the consumer must reject.
They are: not JSON, JSON that is not an object, unknown types, missing or
mistyped attributes, impossible dates, values over 1 MB, invalid UTF-8, broken
PHP-serialized ``other``, deep nesting, nulls, empty values, and text that the
database cannot store. Each one must become a dead letter with a reason, every
valid event must be applied, and no batch may fail.
"""

from __future__ import annotations

import os
import random
import string
import uuid
from collections.abc import Callable

import orjson
import pytest
from sqlalchemy import select

from consumer.batch import decode_values
from consumer.decoding import MAX_EVENT_BYTES
from projections import schema
from projections.apply import apply_batch
from projections.sql import make_engine
from tests.consumer_process import (
    ConsumerPool,
    check_exactly_once,
    expected_reports_later,
    produce,
    read_progress,
    wait_until,
)
from tests.history import SEQUENCED_SOURCE, generate_history

SEED = 20241205
SOAK = os.environ.get("LICENSE_REPORT_SOAK") == "1"
# Ids of the valid extra events start here, far above the history's ids, so they
# change no report row.
EXTRA_ID_BASE = 10**15
MOODLE_ASSIGNED = "\\block_iomad_company_admin\\event\\user_license_assigned"

Maker = Callable[[random.Random, int], bytes | None]


def _cloudevent(index: int, **changes: object) -> dict[str, object]:
    """Return a valid license.allocated envelope that ``changes`` then breaks."""
    envelope: dict[str, object] = {
        "specversion": "1.0",
        "id": f"fuzz-{index}",
        "source": SEQUENCED_SOURCE,
        "type": "license.allocated",
        "time": "2024-05-01T12:00:00Z",
        "data": {"user_id": 7, "license_id": 3, "course_id": 11},
    }
    envelope.update(changes)
    return envelope


def _dumps(document: object) -> bytes:
    return orjson.dumps(document)


def _random_text(rng: random.Random, length: int) -> str:
    return "".join(rng.choice(string.printable) for _ in range(length))


def _not_json(rng: random.Random, index: int) -> bytes:
    while True:
        value = rng.choice([b"{", b"[", b'{"id": ', b""]) + bytes(
            rng.randrange(256) for _ in range(rng.randrange(1, 60))
        )
        try:
            orjson.loads(value)
        except orjson.JSONDecodeError:
            return value


def _json_not_object(rng: random.Random, index: int) -> bytes:
    choices = [
        [_cloudevent(index)],
        f"fuzz-{index}",
        index,
        rng.random() * 1e6,
        True,
        None,
        [],
    ]
    return _dumps(rng.choice(choices))


def _unknown_type(rng: random.Random, index: int) -> bytes:
    event_type = rng.choice(["license.renewed", "", "LICENSE.ALLOCATED", "x" * 300])
    return _dumps(_cloudevent(index, type=event_type))


def _missing_attribute(rng: random.Random, index: int) -> bytes:
    envelope = _cloudevent(index)
    del envelope[rng.choice(["specversion", "id", "source", "type", "time", "data"])]
    return _dumps(envelope)


def _null_attribute(rng: random.Random, index: int) -> bytes:
    name = rng.choice(["id", "source", "type", "time", "data", "specversion"])
    return _dumps(_cloudevent(index, **{name: None}))


def _wrong_type(rng: random.Random, index: int) -> bytes:
    field = rng.choice(["user_id", "license_id", "course_id"])
    value = rng.choice(["7", 7.5, True, None, 0, -1, 2**63, [7], {"id": 7}, ""])
    data = {"user_id": 7, "license_id": 3, "course_id": 11, field: value}
    changes: dict[str, object] = {"data": data}
    draw = rng.random()
    if draw < 0.2:
        changes = {"id": index}
    elif draw < 0.3:
        changes = {"sequence": rng.choice([-1, 2**60, 1.5, "12a", True])}
    elif draw < 0.4:
        changes = {"specversion": rng.choice([1.0, "0.3", "1"])}
    elif draw < 0.5:
        changes = {"id": "i" * 256}
    elif draw < 0.6:
        changes = {
            "type": "user.upserted",
            "data": {"user_id": 9, "firstname": 1, "lastname": "L", "email": "e"},
        }
    return _dumps(_cloudevent(index, **changes))


def _impossible_date(rng: random.Random, index: int) -> bytes:
    time = rng.choice(
        [
            "2024-02-30T10:00:00Z",
            "2023-13-01T00:00:00Z",
            "2024-01-01T25:00:00Z",
            "2024-01-01T12:61:00Z",
            "1899-12-31T23:59:59Z",
            "9999-12-31T23:59:59Z",
            "2024-05-01T12:00:00",
            "2024-05-01",
            "yesterday",
            "",
            1_714_564_800,
        ]
    )
    if rng.random() < 0.3:
        data = {"user_id": 7, "license_id": 3, "course_id": 11, "issued_at": time}
        return _dumps(_cloudevent(index, data=data))
    return _dumps(_cloudevent(index, time=time))


def _huge(rng: random.Random, index: int) -> bytes:
    padding = "p" * (MAX_EVENT_BYTES + rng.randrange(1, 200_000))
    data = {"company_id": EXTRA_ID_BASE + index, "name": padding}
    return _dumps(_cloudevent(index, type="company.upserted", data=data))


def _invalid_utf8(rng: random.Random, index: int) -> bytes:
    value = _dumps(_cloudevent(index))
    broken = rng.choice([b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xe2\x82", b"\x80"])
    return value.replace(b'"source":"', b'"source":"' + broken, 1)


def _lone_surrogate(rng: random.Random, index: int) -> bytes:
    escape = rng.choice([b"\\ud800", b"\\udfff", b"\\ud83d x"])
    return _dumps(_cloudevent(index)).replace(b'"source":"', b'"source":"' + escape, 1)


def _moodle(index: int, other: object, **changes: object) -> bytes:
    record: dict[str, object] = {
        "id": EXTRA_ID_BASE + index,
        "eventname": MOODLE_ASSIGNED,
        "userid": 7,
        "courseid": 11,
        "other": other,
        "timecreated": 1_714_564_800,
    }
    record.update(changes)
    return _dumps(record)


def _broken_php(rng: random.Random, index: int) -> bytes:
    other = rng.choice(
        [
            'a:2:{s:9:"licenseid";i:3;s:9:"issuedate";',
            'a:1:{s:99:"licenseid";i:3;}',
            'a:1:{s:9:"licenseid";i:-3;}',
            'a:1:{s:9:"licenseid";s:3:"abc";}',
            'O:8:"stdClass":1:{s:9:"licenseid";i:3;}',
            "b:1;",
            "i:3;",
            "N;",
            'a:1:{s:9:"issuedate";i:1714564800;}',
            _random_text(rng, 40),
            "   ",
            "{not json",
            '{"licenseid": "three"}',
        ]
    )
    return _moodle(index, other)


def _moodle_out_of_range(rng: random.Random, index: int) -> bytes:
    changes = rng.choice(
        [
            {"userid": "abc"},
            {"userid": 0},
            {"courseid": None},
            {"timecreated": 10**12},
            {"timecreated": -(10**10)},
            {"id": 0},
            {"eventname": 7},
            {"eventname": "\\core\\event\\user_loggedin"},
        ]
    )
    return _moodle(index, {"licenseid": 3}, **changes)


def _deep_nesting(rng: random.Random, index: int) -> bytes:
    depth = rng.choice([1_100, 5_000, 50_000])
    draw = rng.random()
    if draw < 0.4:
        return b"[" * depth + b"]" * depth
    if draw < 0.7:
        nested = b'{"a":' * depth + b"1" + b"}" * depth
        return _dumps(_cloudevent(index)).replace(
            b'"data":{', b'"deep":' + nested + b',"data":{', 1
        )
    # PHP-serialized arrays nested deeper than Python's recursion limit.
    php = "a:1:{i:0;" * depth + "N;" + "}" * depth
    return _moodle(index, php)


def _empty(rng: random.Random, index: int) -> bytes | None:
    return rng.choice([None, b"", b" ", b"\n", b"{}", b"null", b'""'])


def _nul_text(rng: random.Random, index: int) -> bytes:
    """Return an event with U+0000 in a text field, which PostgreSQL cannot store."""
    draw = rng.random()
    if draw < 0.3:
        return _dumps(_cloudevent(index, id=f"fuzz-{index}\x00"))
    if draw < 0.5:
        return _dumps(_cloudevent(index, source="/iomad\x00"))
    data = {"company_id": EXTRA_ID_BASE + index, "name": "Acme\x00 Ltd"}
    return _dumps(_cloudevent(index, type="company.upserted", data=data))


MAKERS: dict[str, Maker] = {
    "not-json": _not_json,
    "json-not-object": _json_not_object,
    "unknown-type": _unknown_type,
    "missing-attribute": _missing_attribute,
    "null-attribute": _null_attribute,
    "wrong-type": _wrong_type,
    "impossible-date": _impossible_date,
    "invalid-utf8": _invalid_utf8,
    "lone-surrogate": _lone_surrogate,
    "broken-php-other": _broken_php,
    "moodle-out-of-range": _moodle_out_of_range,
    "deep-nesting": _deep_nesting,
    "empty": _empty,
    "nul-text": _nul_text,
}
# Values over 1 MB are few, so the test's topic stays small.
HUGE_VALUES = 4


def fuzz_values(seed: int, count: int) -> list[tuple[str, bytes | None]]:
    """Return ``count`` invalid values of every kind in turn, then a few huge ones."""
    rng = random.Random(seed)
    kinds = list(MAKERS)
    values = [
        (kinds[index % len(kinds)], MAKERS[kinds[index % len(kinds)]](rng, index))
        for index in range(count)
    ]
    values += [("huge", _huge(rng, count + index)) for index in range(HUGE_VALUES)]
    return values


def valid_extras() -> list[tuple[str, bytes]]:
    """Return valid events at the edges of the contract, as (event id, value)."""
    names = [
        "Zoë 🚀 東京 مرحبا e\u0301",
        "n" * 10_000,
        "",
        "line\nbreak\ttab",
        "'; DROP TABLE event_store; --",
    ]
    events = []
    for index, name in enumerate(names):
        event_id = f"extra-company-{index}"
        document = {
            "specversion": "1.0",
            "id": event_id,
            "source": "/fuzz",
            "type": "company.upserted",
            "time": "2024-05-01T12:00:00.123456789+14:00",
            "sequence": str(index + 1),
            "data": {"company_id": EXTRA_ID_BASE + index, "name": name, "x": [1]},
        }
        events.append((event_id, _dumps(document)))
    long_id = "i" * 255
    document = {
        "specversion": "1.0",
        "id": long_id,
        "source": "/fuzz",
        "type": "course.upserted",
        "time": "1900-01-01T00:00:00Z",
        "sequence": 2**60 - 1,
        "data": {"course_id": 2**63 - 1, "name": "Last course"},
    }
    events.append((long_id, _dumps(document)))
    return events


def test_decode_values_fuzz_rejected_with_reason():
    values = fuzz_values(SEED, 20_000 if SOAK else 4_000)
    decoded = decode_values(
        ("fuzz", 0, offset, value) for offset, (_, value) in enumerate(values)
    )
    accepted = [
        (values[item.offset][0], item.event.event_id) for item in decoded.events
    ]
    assert not accepted, f"invalid values accepted as events: {accepted[:5]}"
    assert len(decoded.dead_letters) == len(values), (
        f"{len(decoded.dead_letters)} dead letters for {len(values)} invalid values"
    )
    no_reason = [
        values[letter.offset][0] for letter in decoded.dead_letters if not letter.reason
    ]
    assert not no_reason, f"dead letters without a reason, of kinds {set(no_reason)}"
    with_nul = [
        letter.reason for letter in decoded.dead_letters if "\x00" in letter.reason
    ]
    assert not with_nul, f"reasons that hold U+0000: {with_nul[:3]}"


def test_decode_values_extras_accepted():
    extras = valid_extras()
    decoded = decode_values(
        ("fuzz", 0, offset, value) for offset, (_, value) in enumerate(extras)
    )
    reasons = [letter.reason for letter in decoded.dead_letters]
    assert not reasons, f"valid edge-case events rejected: {reasons}"
    ids = [item.event.event_id for item in decoded.events]
    assert ids == [event_id for event_id, _ in extras]


def test_apply_batch_fuzz_dead_letters(engine):
    """Every dead letter of a fuzzed batch, and every edge-case event, is storable."""
    values = fuzz_values(SEED + 1, 1_500) + [
        ("valid", value) for _, value in valid_extras()
    ]
    decoded = decode_values(
        ("fuzz", 0, offset, value) for offset, (_, value) in enumerate(values)
    )
    with engine.begin() as conn:
        result = apply_batch(conn, decoded.events, decoded.dead_letters)
    assert result.dead_letters == len(values) - len(valid_extras())
    with engine.connect() as conn:
        stored = set(conn.execute(select(schema.event_store.c.event_id)).scalars())
    assert stored == {event_id for event_id, _ in valid_extras()}


@pytest.mark.timeout(300)
def test_consume_fuzzed_values(kafka_broker, postgres_url, tmp_path):
    history = generate_history(SEED, users=300 if SOAK else 80)
    fuzz = fuzz_values(SEED + 2, 12_000 if SOAK else 3_000)
    extras = valid_extras()
    rng = random.Random(SEED + 3)
    mixed: list[tuple[bytes | None, bytes | None]] = list(history.messages)
    for value in [value for _, value in fuzz] + [value for _, value in extras]:
        key = rng.choice([None, b"fuzz", str(rng.randrange(100)).encode()])
        if value is None:
            # Kafka's producer needs a key or a value; a null value is a tombstone.
            key = b"tombstone"
        mixed.insert(rng.randrange(len(mixed) + 1), (key, value))

    expected = expected_reports_later(history)
    name = uuid.uuid4().hex[:10]
    topic = group_id = f"fuzz-{name}"
    kafka_broker.create_topic(topic, partitions=2)
    last_offsets = produce(kafka_broker.bootstrap_servers, topic, mixed)
    engine = make_engine(postgres_url)
    pool = ConsumerPool(
        tmp_path,
        database_url=postgres_url,
        bootstrap_servers=kafka_broker.bootstrap_servers,
        topic=topic,
        group_id=group_id,
    )
    try:
        consumer = pool.start()

        def done() -> bool:
            assert consumer.alive, f"the consumer exited\n{consumer.log_tail()}"
            failed = consumer.log_count("batch failed")
            assert not failed, (
                f"{failed} batches failed: a value that the decoder accepted could "
                f"not be stored\n{consumer.log_tail()}"
            )
            return read_progress(engine, group_id, topic).done(last_offsets)

        wait_until(
            done,
            120.0,
            lambda: (
                read_progress(engine, group_id, topic).describe(last_offsets)
                + "\n"
                + consumer.log_tail()
            ),
            interval_s=0.5,
        )
        consumer.terminate()
        code = consumer.wait_exit()
        assert code == 0, f"exit code {code} after SIGTERM\n{consumer.log_tail()}"

        check_exactly_once(
            engine,
            history,
            topic,
            expected=expected,
            extra_event_ids=[event_id for event_id, _ in extras],
            extra_dead_letters=[value for _, value in fuzz],
        )
    finally:
        pool.stop_all()
        engine.dispose()
