"""Imports of Moodle's log and reference tables, run on SQLite and PostgreSQL."""

from __future__ import annotations

import logging
from pathlib import Path

import orjson
import pytest
from sqlalchemy import Engine, select, text
from typer.testing import CliRunner

from consumer.moodle_import import MoodleImportError, detect_format
from consumer.moodle_log import import_log_files, is_license_event, moodle_event
from consumer.moodle_reference import (
    TABLES,
    import_reference_files,
    reference_event,
)
from consumer.timestamps import format_us, parse_rfc3339
from license_report.cli import app
from projections import schema
from projections.registry import live_projection
from projections.sql import make_engine

DATA = Path(__file__).parent / "data" / "moodle"
LOG_CSV = DATA / "logstore_standard_log.csv"
LOG_JSONL = DATA / "logstore_standard_log.jsonl"
LOG_MINIMAL = DATA / "logstore_minimal.csv"
REFERENCE = DATA / "reference"
REFERENCE_FILES = {
    "company": REFERENCE / "company.csv",
    "department": REFERENCE / "department.csv",
    "user": REFERENCE / "user.csv",
    "company_users": REFERENCE / "company_users.csv",
    "course": REFERENCE / "course.csv",
    "companylicense": REFERENCE / "companylicense.csv",
}
ASSIGNED = "\\block_iomad_company_admin\\event\\user_license_assigned"
SECOND = 1_000_000
FIRST_IMPORT_US = parse_rfc3339("2024-06-01T00:00:00Z")
SECOND_IMPORT_US = parse_rfc3339("2024-07-01T00:00:00Z")


def us(seconds: int) -> int:
    return seconds * SECOND


def snapshot(engine: Engine) -> dict[str, list[tuple]]:
    """Every row of the event store and of the live projection's tables."""
    with engine.connect() as conn:
        projection = live_projection(conn)
        tables = [
            schema.event_store,
            projection.state,
            projection.companies,
            projection.departments,
            projection.users,
            projection.memberships,
            projection.courses,
            projection.licenses,
            projection.license_events,
            projection.license_allocations,
        ]
        return {
            table.name: sorted(tuple(row) for row in conn.execute(select(table)))
            for table in tables
        }


def rows_by_key(engine: Engine, name: str, *key: str) -> dict[tuple, dict]:
    with engine.connect() as conn:
        table = getattr(live_projection(conn), name)
        rows = conn.execute(select(table)).mappings().all()
    return {tuple(row[column] for column in key): dict(row) for row in rows}


def allocations(engine: Engine) -> dict[tuple, dict]:
    return rows_by_key(
        engine, "license_allocations", "user_id", "license_id", "course_id"
    )


def license_events(engine: Engine) -> dict[str, dict]:
    rows = rows_by_key(engine, "license_events", "event_id")
    return {event_id: row for (event_id,), row in rows.items()}


def dead_letters(engine: Engine) -> list[dict]:
    table = schema.dead_letters
    with engine.connect() as conn:
        query = select(table).order_by(table.c.id)
        return [dict(row) for row in conn.execute(query).mappings()]


def stored_offsets(engine: Engine) -> dict[str, tuple[str, int]]:
    table = schema.event_store
    with engine.connect() as conn:
        query = select(table.c.event_id, table.c.origin, table.c.offset)
        return {row.event_id: (row.origin, row.offset) for row in conn.execute(query)}


def assert_log_projection(engine: Engine) -> None:
    """The report rows that both test log files describe."""
    rows = allocations(engine)
    assert set(rows) == {(7, 3, 11), (8, 3, 11), (9, 4, 12), (8, 4, 12), (9, 5, 13)}

    unallocated = rows[(7, 3, 11)]
    assert unallocated["allocations"] == 1
    assert unallocated["unallocations"] == 1
    assert unallocated["allocated"] is False
    # Row 104's issuedate is 0, then row 111 takes the license back.
    returned = rows[(9, 4, 12)]
    assert returned["allocations"] == 1
    assert returned["unallocations"] == 1
    assert returned["allocated"] is False
    for key in [(8, 3, 11), (8, 4, 12), (9, 5, 13)]:
        assert rows[key]["allocations"] == 1, key
        assert rows[key]["unallocations"] == 0, key
        assert rows[key]["allocated"] is True, key

    events = license_events(engine)
    assert set(events) == {
        "moodle-log-102",
        "moodle-log-103",
        "moodle-log-104",
        "moodle-log-105",
        "moodle-log-106",
        "moodle-log-109",
        "moodle-log-111",
    }
    # issuedate given as a JSON number.
    assert events["moodle-log-102"]["at_us"] == us(1714478400)
    # issuedate missing from PHP-serialized other: the row's timecreated.
    assert events["moodle-log-103"]["at_us"] == us(1714568400)
    # issuedate 0: the row's timecreated.
    assert events["moodle-log-104"]["at_us"] == us(1714572000)
    # An unallocation is dated by its timecreated.
    assert events["moodle-log-105"]["at_us"] == us(1714658400)
    # issuedate given as a digit string.
    assert events["moodle-log-106"]["at_us"] == us(1714600000)
    # other spread over several lines.
    assert events["moodle-log-109"]["at_us"] == us(1714700000)
    assert events["moodle-log-111"]["at_us"] == us(1714800000)
    # Row 106 was logged by user 2 for user 8 in relateduserid.
    assert events["moodle-log-106"]["user_id"] == 8


def run_log_import(engine: Engine, path: Path, **options):
    return import_log_files(engine, [str(path)], **options)


def test_log_csv_imports_expected_rows(engine: Engine):
    result = run_log_import(engine, LOG_CSV)

    assert result.rows == 12
    assert result.skipped == 2
    assert result.applied == 7
    assert result.duplicates == 1
    assert result.dead_letters == 2
    assert_log_projection(engine)


def test_log_csv_dead_letters_name_rows(engine: Engine):
    run_log_import(engine, LOG_CSV)

    letters = dead_letters(engine)
    origin = f"moodle-log:{LOG_CSV}"
    assert [letter["origin"] for letter in letters] == [origin, origin]
    assert [letter["offset"] for letter in letters] == [9, 14]
    assert "PHP-serialized" in letters[0]["reason"]
    assert "4 fields but the header has 21 columns" in letters[1]["reason"]
    assert letters[1]["raw"].startswith(b"110,")


def test_log_csv_offsets_are_starting_lines(engine: Engine):
    run_log_import(engine, LOG_CSV)

    offsets = stored_offsets(engine)
    origin = f"moodle-log:{LOG_CSV}"
    # The first of the two rows with id 102 is kept.
    assert offsets["moodle-log-102"] == (origin, 3)
    # Row 109 spans lines 11 to 13, so row 111 starts on line 15.
    assert offsets["moodle-log-109"] == (origin, 11)
    assert offsets["moodle-log-111"] == (origin, 15)


def test_log_csv_reimport_changes_nothing(engine: Engine):
    run_log_import(engine, LOG_CSV)
    before = snapshot(engine)

    result = run_log_import(engine, LOG_CSV)

    assert snapshot(engine) == before
    assert result.applied == 0
    assert result.duplicates == 8
    # Dead letters are recorded once per import, as replay records them.
    assert len(dead_letters(engine)) == 4


def test_log_jsonl_imports_expected_rows(engine: Engine):
    result = run_log_import(engine, LOG_JSONL)

    assert result.rows == 12
    assert result.skipped == 2
    assert result.applied == 7
    assert result.duplicates == 1
    assert result.dead_letters == 2
    assert_log_projection(engine)
    assert [letter["offset"] for letter in dead_letters(engine)] == [9, 11]
    assert "not valid JSON" in dead_letters(engine)[1]["reason"]


def test_log_jsonl_reimport_changes_nothing(engine: Engine):
    run_log_import(engine, LOG_JSONL)
    before = snapshot(engine)

    result = run_log_import(engine, LOG_JSONL)

    assert snapshot(engine) == before
    assert result.applied == 0
    assert result.duplicates == 8


def test_log_jsonl_after_csv_adds_nothing(engine: Engine):
    run_log_import(engine, LOG_CSV)
    before = snapshot(engine)

    result = run_log_import(engine, LOG_JSONL)

    assert snapshot(engine) == before
    assert result.applied == 0


def test_log_small_batches_give_same_rows(engine: Engine):
    result = run_log_import(engine, LOG_CSV, batch_size=1)

    assert result.applied == 7
    assert result.duplicates == 1
    assert result.dead_letters == 2
    assert_log_projection(engine)


def test_log_minimal_columns_use_userid(engine: Engine):
    result = run_log_import(engine, LOG_MINIMAL)

    assert result.rows == 2
    assert result.skipped == 1
    assert result.applied == 1
    assert set(allocations(engine)) == {(7, 3, 11)}


def test_log_large_other_is_read(engine: Engine, tmp_path: Path):
    # Larger than the csv module's default field limit of 131,072 characters.
    other = orjson.dumps({"licenseid": 3, "padding": "x" * 200_000}).decode()
    quoted = other.replace('"', '""')
    path = tmp_path / "large.csv"
    path.write_text(
        "id,eventname,userid,courseid,other,timecreated\n"
        f'401,{ASSIGNED},7,11,"{quoted}",1714564800\n'
    )

    result = run_log_import(engine, path)

    assert result.applied == 1
    assert set(allocations(engine)) == {(7, 3, 11)}


def test_log_invalid_utf8_keeps_earlier_batches(engine: Engine, tmp_path: Path):
    lines = [
        "id,eventname,userid,courseid,other,timecreated",
        f'501,{ASSIGNED},7,11,"{{""licenseid"":3}}",1714564800',
    ]
    # Unrelated rows push the invalid byte past the text layer's first block.
    lines += [f"{600 + n},\\core\\event\\user_loggedin,7,0,,1" for n in range(800)]
    path = tmp_path / "latin1.csv"
    path.write_bytes("\n".join(lines).encode() + b"\n502,\xe9,7,11,,1\n")

    with pytest.raises(MoodleImportError, match="cannot read the CSV file past line"):
        run_log_import(engine, path, batch_size=1)

    assert set(allocations(engine)) == {(7, 3, 11)}


def test_log_missing_column_raises(engine: Engine, tmp_path: Path):
    path = tmp_path / "no-other.csv"
    path.write_text(f"id,eventname,userid,courseid,timecreated\n1,{ASSIGNED},7,11,1\n")

    with pytest.raises(MoodleImportError, match="lacks the column.s. other"):
        run_log_import(engine, path)


def test_log_empty_file_raises(engine: Engine, tmp_path: Path):
    path = tmp_path / "empty.csv"
    path.write_text("")

    with pytest.raises(MoodleImportError, match="the file is empty"):
        run_log_import(engine, path)


def test_log_missing_file_raises(engine: Engine, tmp_path: Path):
    with pytest.raises(MoodleImportError, match="cannot open"):
        run_log_import(engine, tmp_path / "absent.csv")


def test_moodle_event_prefers_relateduserid():
    fields = {"id": "1", "eventname": ASSIGNED, "userid": "2", "relateduserid": "8"}

    assert moodle_event(fields)["userid"] == "8"


@pytest.mark.parametrize(
    "fields",
    [
        {"userid": "7"},
        {"userid": "7", "relateduserid": ""},
        {"userid": "7", "relateduserid": None},
        {"userid": "7", "relateduserid": "0"},
        {"userid": 7, "relateduserid": 0},
    ],
)
def test_moodle_event_falls_back_to_userid(fields):
    assert str(moodle_event(fields)["userid"]) == "7"


def test_moodle_event_turns_empty_fields_into_null():
    event = moodle_event({"id": "5", "eventname": ASSIGNED, "userid": "7", "other": ""})

    assert event["other"] is None
    assert event["courseid"] is None
    assert event["id"] == "5"


def test_is_license_event_accepts_both_names():
    assert is_license_event(ASSIGNED)
    assert is_license_event(ASSIGNED.lstrip("\\"))
    assert is_license_event(ASSIGNED.replace("assigned", "unassigned"))
    assert not is_license_event("\\core\\event\\user_loggedin")
    assert not is_license_event(None)


def test_detect_format_by_suffix_and_content(tmp_path: Path):
    for name in ["a.jsonl", "b.ndjson", "c.JSON"]:
        path = tmp_path / name
        path.write_text("id,eventname\n")
        assert detect_format(str(path)) == "jsonl", name
    sniffed = tmp_path / "export.txt"
    sniffed.write_bytes(b"\xef\xbb\xbf\n  \n" + b'{"id": 1}\n')
    assert detect_format(str(sniffed)) == "jsonl"
    plain = tmp_path / "export.dat"
    plain.write_text("id,eventname\n")
    assert detect_format(str(plain)) == "csv"


# The SELECT of each PostgreSQL export in docs/moodle-import.md.
LOG_EXPORT_SQL = (
    "SELECT id, eventname, userid, courseid, relateduserid, other, timecreated "
    "FROM mdl_logstore_standard_log "
    "WHERE component = 'block_iomad_company_admin' AND target = 'user_license' "
    "AND action IN ('assigned', 'unassigned') ORDER BY id"
)
USER_EXPORT_SQL = (
    "SELECT id, firstname, lastname, email, suspended, deleted, timemodified "
    "FROM mdl_user ORDER BY id"
)


def copy_to_csv(engine: Engine, query: str, path: Path) -> None:
    """Write a query's rows as ``\\copy (...) TO file WITH CSV HEADER`` does."""
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        statement = f"COPY ({query}) TO STDOUT WITH CSV HEADER"
        with path.open("wb") as output, cursor.copy(statement) as copy:
            for chunk in copy:
                output.write(chunk)
    finally:
        raw.close()


def test_postgres_copy_export_imports(postgres_url: str, tmp_path: Path):
    engine = make_engine(postgres_url)
    other = '{"licenseid":3,"note":"a \\"quoted\\", comma\\nand newline"}'
    with engine.begin() as conn:
        conn.execute(
            text(
                "CREATE TABLE mdl_logstore_standard_log (id BIGINT PRIMARY KEY, "
                "eventname TEXT, component TEXT, action TEXT, target TEXT, "
                "userid BIGINT, courseid BIGINT, relateduserid BIGINT, other TEXT, "
                "timecreated BIGINT, ip TEXT)"
            )
        )
        conn.execute(
            text(
                "INSERT INTO mdl_logstore_standard_log VALUES "
                "(1, :assigned, 'block_iomad_company_admin', 'assigned', "
                "'user_license', 7, 11, NULL, :other, 1714564800, '127.0.0.1'), "
                "(2, :assigned, 'block_iomad_company_admin', 'assigned', "
                "'user_license', 2, 12, 8, :php, 1714568400, NULL), "
                "(3, '\\core\\event\\user_loggedin', 'core', 'loggedin', 'user', "
                "7, 0, NULL, NULL, 1714570000, NULL)"
            ),
            {
                "assigned": ASSIGNED,
                "other": other,
                "php": 'a:1:{s:9:"licenseid";s:1:"4";}',
            },
        )
        conn.execute(
            text(
                "CREATE TABLE mdl_user (id BIGINT PRIMARY KEY, firstname TEXT, "
                "lastname TEXT, email TEXT, suspended SMALLINT, deleted SMALLINT, "
                "timemodified BIGINT)"
            )
        )
        conn.execute(
            text(
                "INSERT INTO mdl_user VALUES "
                "(7, 'Ada', 'O''Neil, \"Jr.\"', 'ada@example.org', 0, 0, 1714000000),"
                " (8, 'Zoë', '', 'zoe@example.org', 1, 0, 0)"
            )
        )
    log_path = tmp_path / "logstore_standard_log.csv"
    user_path = tmp_path / "user.csv"
    try:
        copy_to_csv(engine, LOG_EXPORT_SQL, log_path)
        copy_to_csv(engine, USER_EXPORT_SQL, user_path)

        result = import_log_files(engine, [str(log_path)])
        import_reference_files(
            engine, {"user": str(user_path)}, default_time_us=FIRST_IMPORT_US
        )

        assert result.rows == 2
        assert result.applied == 2
        assert set(allocations(engine)) == {(7, 3, 11), (8, 4, 12)}
        users = rows_by_key(engine, "users", "user_id")
        assert users[(7,)]["lastname"] == 'O\'Neil, "Jr."'
        assert users[(8,)]["firstname"] == "Zoë"
        assert users[(8,)]["lastname"] == ""
        assert users[(8,)]["suspended"] is True
    finally:
        engine.dispose()


def import_reference(engine: Engine, files=None, time_us=FIRST_IMPORT_US):
    exports = REFERENCE_FILES if files is None else files
    paths = {table: str(path) for table, path in exports.items()}
    return import_reference_files(engine, paths, default_time_us=time_us)


def test_reference_csv_imports_expected_rows(engine: Engine):
    result = import_reference(engine)

    assert result.rows == 19
    assert result.applied == 18
    assert result.dead_letters == 1
    assert result.by_type["user.deleted"] == 1

    companies = rows_by_key(engine, "companies", "company_id")
    assert {key: row["name"] for key, row in companies.items()} == {
        (1,): "Acme",
        (2,): "Globex, Inc.",
    }

    departments = rows_by_key(engine, "departments", "department_id")
    assert set(departments) == {(20,), (21,), (30,)}
    assert departments[(20,)]["parent_id"] is None
    assert departments[(20,)]["company_id"] == 1
    assert departments[(21,)]["parent_id"] == 20
    assert departments[(21,)]["name"] == "Sales"
    assert departments[(30,)]["company_id"] == 2

    users = rows_by_key(engine, "users", "user_id")
    assert set(users) == {(7,), (8,), (9,), (10,)}
    assert users[(7,)]["lastname"] == "Lovelace"
    assert users[(7,)]["email"] == "ada@example.org"
    assert users[(7,)]["suspended"] is False
    assert users[(7,)]["version_time_us"] == us(1714000000)
    assert users[(8,)]["lastname"] == "Smith, Jr."
    assert users[(8,)]["suspended"] is True
    # timemodified 0: the import's time.
    assert users[(8,)]["version_time_us"] == FIRST_IMPORT_US
    assert users[(9,)]["deleted"] is True
    assert users[(9,)]["firstname"] is None
    assert users[(10,)]["firstname"] == "Zoë"
    assert users[(10,)]["lastname"] == ""

    memberships = rows_by_key(
        engine, "memberships", "user_id", "company_id", "department_id"
    )
    assert set(memberships) == {(7, 1, 20), (8, 1, 21), (10, 2, 30)}
    assert all(row["assigned"] for row in memberships.values())

    courses = rows_by_key(engine, "courses", "course_id")
    assert courses[(11,)]["name"] == "Safety basics"
    assert courses[(12,)]["name"] == 'Sales 101: "closing"'
    assert courses[(13,)]["version_time_us"] == FIRST_IMPORT_US

    licenses = rows_by_key(engine, "licenses", "license_id")
    assert licenses[(3,)]["name"] == "Safety 2024"
    assert licenses[(3,)]["company_id"] == 1
    assert licenses[(3,)]["reusable"] is True
    assert licenses[(3,)]["program"] is False
    assert licenses[(3,)]["start_us"] == parse_rfc3339("2024-01-01T00:00:00Z")
    assert licenses[(3,)]["expiry_us"] == parse_rfc3339("2025-01-01T00:00:00Z")
    assert licenses[(4,)]["reusable"] is False
    assert licenses[(4,)]["program"] is True
    assert licenses[(4,)]["start_us"] is None
    assert licenses[(4,)]["expiry_us"] is None
    # Type 3, educator reusable.
    assert licenses[(5,)]["reusable"] is True


def test_reference_bad_membership_is_dead_letter(engine: Engine):
    import_reference(engine)

    letters = dead_letters(engine)
    assert len(letters) == 1
    assert letters[0]["origin"] == (
        f"moodle-ref:company_users:{REFERENCE_FILES['company_users']}"
    )
    assert letters[0]["offset"] == 5
    assert "department_id" in letters[0]["reason"]


def test_reference_reimport_changes_nothing(engine: Engine):
    import_reference(engine)
    before = snapshot(engine)

    result = import_reference(engine, time_us=SECOND_IMPORT_US)

    assert snapshot(engine) == before
    assert result.applied == 0
    assert result.duplicates == 18


def test_reference_changed_row_wins(engine: Engine, tmp_path: Path):
    import_reference(engine)
    user = tmp_path / "user.csv"
    user.write_text(
        "id,firstname,lastname,email,suspended,deleted,timemodified\n"
        "7,Ada,King,ada@example.org,0,0,1714900000\n"
        '8,Bob,"Smith, Jr.",bob@example.org,1,0,0\n'
    )
    department = tmp_path / "department.csv"
    department.write_text("id,name,company,parent\n21,Sales EMEA,1,20\n")
    license_ = tmp_path / "companylicense.csv"
    license_.write_text(
        "id,name,companyid,type,reusable,program,startdate,expirydate\n"
        "3,Safety 2025,1,1,0,0,1735689600,1767225600\n"
    )

    result = import_reference(
        engine,
        {"user": user, "department": department, "companylicense": license_},
        time_us=SECOND_IMPORT_US,
    )

    assert result.applied == 3
    assert result.duplicates == 1
    users = rows_by_key(engine, "users", "user_id")
    assert users[(7,)]["lastname"] == "King"
    assert users[(7,)]["version_time_us"] == us(1714900000)
    # Unchanged, so its first version stays.
    assert users[(8,)]["version_time_us"] == FIRST_IMPORT_US
    departments = rows_by_key(engine, "departments", "department_id")
    assert departments[(21,)]["name"] == "Sales EMEA"
    assert departments[(21,)]["version_time_us"] == SECOND_IMPORT_US
    licenses = rows_by_key(engine, "licenses", "license_id")
    assert licenses[(3,)]["name"] == "Safety 2025"
    # The reusable column takes precedence over the type.
    assert licenses[(3,)]["reusable"] is False
    assert licenses[(3,)]["expiry_us"] == parse_rfc3339("2026-01-01T00:00:00Z")


def test_reference_reverted_row_wins(engine: Engine, tmp_path: Path):
    header = "id,fullname,timemodified\n"
    versions = [
        "11,Safety basics,1713000000\n",
        "11,Safety,1713100000\n",
        "11,Safety basics,1713200000\n",
    ]
    for number, version in enumerate(versions):
        path = tmp_path / f"course-{number}.csv"
        path.write_text(header + version)
        import_reference(engine, {"course": path})

    courses = rows_by_key(engine, "courses", "course_id")
    assert courses[(11,)]["name"] == "Safety basics"
    assert courses[(11,)]["version_time_us"] == us(1713200000)


def test_reference_null_names_become_empty(engine: Engine, tmp_path: Path):
    path = tmp_path / "user.jsonl"
    path.write_text(
        '{"id": 7, "firstname": "Ada", "lastname": null, "email": null, '
        '"suspended": null, "deleted": 0, "timemodified": null}\n'
    )

    result = import_reference(engine, {"user": path})

    assert result.applied == 1
    user = rows_by_key(engine, "users", "user_id")[(7,)]
    assert user["lastname"] == ""
    assert user["email"] == ""
    assert user["suspended"] is False
    assert user["version_time_us"] == FIRST_IMPORT_US


def test_reference_jsonl_matches_csv(engine: Engine):
    import_reference(engine, {"course": REFERENCE / "course.csv"})
    before = snapshot(engine)

    result = import_reference(engine, {"course": REFERENCE / "course.jsonl"})

    assert result.rows == 3
    assert result.duplicates == 3
    assert snapshot(engine) == before


def test_reference_invalid_flag_is_dead_letter(engine: Engine, tmp_path: Path):
    path = tmp_path / "user.jsonl"
    path.write_text(
        '{"id": 7, "firstname": "A", "lastname": "B", "email": "e", '
        '"suspended": 0, "deleted": "yes"}\n'
        '{"id": 8, "firstname": "C", "lastname": "D", "email": "f", "suspended": 0}\n'
    )

    result = import_reference(engine, {"user": path})

    assert result.applied == 0
    assert result.dead_letters == 2
    reasons = [letter["reason"] for letter in dead_letters(engine)]
    assert "deleted must be 0 or 1" in reasons[0]
    assert "lacks the column(s) deleted" in reasons[1]


def test_reference_missing_column_raises(engine: Engine, tmp_path: Path):
    path = tmp_path / "companylicense.csv"
    path.write_text("id,name,companyid,program,startdate,expirydate\n")

    with pytest.raises(MoodleImportError, match="reusable or type"):
        import_reference(engine, {"companylicense": path})


def test_reference_unknown_table_raises(engine: Engine):
    with pytest.raises(MoodleImportError, match="unknown Moodle table"):
        import_reference(engine, {"groups": REFERENCE / "course.csv"})


@pytest.mark.parametrize(
    ("type_", "reusable"), [("0", False), ("1", True), ("2", False), ("3", True)]
)
def test_license_type_sets_reusable(type_, reusable):
    fields = {
        "id": "3",
        "name": "L",
        "companyid": "1",
        "type": type_,
        "program": "0",
        "startdate": "0",
        "expirydate": "0",
    }

    change = TABLES["companylicense"].convert(fields)

    assert change.data["reusable"] is reusable


def test_reference_event_id_is_stable():
    convert = TABLES["course"].convert
    fields = {"id": "11", "fullname": "Safety basics", "timemodified": "0"}

    first = reference_event(convert(fields), "course", FIRST_IMPORT_US)
    again = reference_event(convert(dict(fields)), "course", SECOND_IMPORT_US)
    renamed = reference_event(
        convert({**fields, "fullname": "Safety"}), "course", FIRST_IMPORT_US
    )

    assert first["id"] == again["id"]
    assert first["id"].startswith("moodle-ref:course:11:")
    assert renamed["id"] != first["id"]
    assert first["time"] == format_us(FIRST_IMPORT_US)
    assert again["time"] == format_us(SECOND_IMPORT_US)


@pytest.fixture
def cli_database(tmp_path: Path):
    """A SQLite file for the command line, and the root logger put back after."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    runner = CliRunner()
    migrated = runner.invoke(app, ["migrate"], env={"LICENSE_REPORT_DATABASE_URL": url})
    assert migrated.exit_code == 0, migrated.output
    yield runner, url
    root.handlers[:] = handlers
    root.setLevel(level)


def test_cli_import_moodle_log_end_to_end(cli_database):
    runner, url = cli_database

    outcome = runner.invoke(
        app,
        ["import-moodle-log", str(LOG_CSV), str(LOG_JSONL)],
        env={"LICENSE_REPORT_DATABASE_URL": url},
    )

    assert outcome.exit_code == 0, outcome.output
    assert "rows=24 skipped=4 applied=7 duplicates=9 dead_letters=4" in outcome.stdout
    engine = make_engine(url)
    try:
        assert_log_projection(engine)
    finally:
        engine.dispose()


def test_cli_import_moodle_reference_end_to_end(cli_database):
    runner, url = cli_database
    arguments = ["import-moodle-reference", "--exported-at", "2024-06-01T00:00:00Z"]
    options = {
        "--users": "user",
        "--company-users": "company_users",
        "--departments": "department",
        "--licenses": "companylicense",
        "--courses": "course",
        "--companies": "company",
    }
    for option, table in options.items():
        arguments += [option, str(REFERENCE_FILES[table])]

    outcome = runner.invoke(app, arguments, env={"LICENSE_REPORT_DATABASE_URL": url})

    assert outcome.exit_code == 0, outcome.output
    assert "rows=19 applied=18 duplicates=0 dead_letters=1" in outcome.stdout
    engine = make_engine(url)
    try:
        users = rows_by_key(engine, "users", "user_id")
        assert users[(8,)]["version_time_us"] == FIRST_IMPORT_US
        memberships = rows_by_key(
            engine, "memberships", "user_id", "company_id", "department_id"
        )
        assert set(memberships) == {(7, 1, 20), (8, 1, 21), (10, 2, 30)}
    finally:
        engine.dispose()


def test_cli_import_moodle_reference_needs_a_file(cli_database):
    runner, url = cli_database

    outcome = runner.invoke(
        app, ["import-moodle-reference"], env={"LICENSE_REPORT_DATABASE_URL": url}
    )

    assert outcome.exit_code == 2
    assert "no export given" in outcome.stderr


def test_cli_import_moodle_log_reports_bad_header(cli_database, tmp_path: Path):
    runner, url = cli_database
    path = tmp_path / "bad.csv"
    path.write_text("id,eventname\n1,x\n")

    outcome = runner.invoke(
        app, ["import-moodle-log", str(path)], env={"LICENSE_REPORT_DATABASE_URL": url}
    )

    assert outcome.exit_code == 2
    assert "lacks the column(s) userid, courseid, other, timecreated" in (
        outcome.stderr
    )
