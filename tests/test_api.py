"""The HTTP API on SQLite and PostgreSQL, driven in-process over the history in
tests/api_data.py."""

from __future__ import annotations

from collections.abc import Iterator

import orjson
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, event, text, update

from api.app import create_app
from api.reference import department_tree
from consumer.timestamps import parse_rfc3339
from license_report.settings import Settings
from projections import schema
from tests.api_data import (
    ACME,
    ACME_HQ,
    ACME_ROWS,
    ACME_SUSPENDED_ROW,
    ALICE,
    BOB,
    CAROL,
    COMPLIANCE,
    DAN,
    EMILE,
    ETHICS,
    EVE,
    FIRE_SAFETY,
    FIRST_AID,
    FRANK,
    FUTURE_SKILLS,
    GLOBEX,
    GLOBEX_MAIN,
    GLOBEX_OPS,
    GLOBEX_ROWS,
    GLOBEX_TRAINING,
    GRACE,
    HENRY,
    OLD_LICENSE,
    OLD_UNIT,
    RESEARCH,
    SAFETY,
    SALES,
    SALES_EAST,
    UNKNOWN_COMPANY,
    UNKNOWN_COURSE,
    UNKNOWN_USER,
    load_history,
)

ALL_KEY = "key-for-every-company"
ACME_KEY = "key-for-acme-only"
REPORT = "/v1/companies/{company}/license-allocations"
SORT_KEYS = [
    "lastname",
    "firstname",
    "email",
    "department",
    "license",
    "course",
    "allocated",
    "allocations",
    "unallocations",
    "last_allocated",
    "last_unallocated",
]

# (user_id, license_id, course_id) of company 1's report rows.
ALICE_SAFETY = (ALICE, SAFETY, FIRE_SAFETY)
ALICE_COMPLIANCE = (ALICE, COMPLIANCE, ETHICS)
BOB_SAFETY = (BOB, SAFETY, FIRE_SAFETY)
BOB_UNKNOWN_COURSE = (BOB, SAFETY, UNKNOWN_COURSE)
CAROL_ROW = (CAROL, SAFETY, ETHICS)
GRACE_ROW = (GRACE, COMPLIANCE, FIRST_AID)
ALICE_ROWS = {ALICE_SAFETY, ALICE_COMPLIANCE}
BOB_ROWS = {BOB_SAFETY, BOB_UNKNOWN_COURSE}


def _settings() -> Settings:
    keys = {ALL_KEY: "*", ACME_KEY: [ACME]}
    return Settings(api_keys=orjson.dumps(keys).decode())


@pytest.fixture
def client(engine: Engine) -> Iterator[TestClient]:
    load_history(engine)
    with TestClient(create_app(_settings(), engine)) as test_client:
        yield test_client


def get(client: TestClient, path: str, key: str | None = ALL_KEY, **params):
    headers = {} if key is None else {"Authorization": f"Bearer {key}"}
    return client.get(path, params=params, headers=headers)


def report(client: TestClient, company: int = ACME, **params) -> dict:
    """Return the report's JSON body, or fail with the error body."""
    params.setdefault("per_page", 1000)
    response = get(client, REPORT.format(company=company), **params)
    assert response.status_code == 200, response.text
    return response.json()


def keys_of(body: dict) -> list[tuple[int, int, int]]:
    return [
        (row["user_id"], row["license_id"], row["course_id"]) for row in body["rows"]
    ]


def row_of(body: dict, key: tuple[int, int, int]) -> dict:
    for row in body["rows"]:
        if (row["user_id"], row["license_id"], row["course_id"]) == key:
            return row
    raise AssertionError(f"row {key} is not in the report")


def parameters_of(response) -> list[str | None]:
    return [entry.get("parameter") for entry in response.json()["detail"]]


# Visibility and tenancy.


def test_report_default_rows(client):
    assert set(keys_of(report(client))) == ACME_ROWS


def test_report_total_counts_all_rows(client):
    assert report(client, per_page=2)["total"] == len(ACME_ROWS)


def test_report_total_with_suspended(client):
    total = report(client, per_page=2, include_suspended="true")["total"]
    assert total == len(ACME_ROWS) + 1


def test_unfiltered_total_reads_the_kept_totals(client, engine):
    """The kept totals serve the unfiltered total; any filter counts rows."""
    with engine.begin() as conn:
        table = schema.projection_tables(1).report_totals
        conn.execute(update(table).values(listed_rows=table.c.listed_rows + 100))
    assert report(client, per_page=2)["total"] == len(ACME_ROWS) + 100
    filtered = report(client, per_page=2, allocated="true")["total"]
    assert filtered < len(ACME_ROWS) + 100


@pytest.mark.parametrize(
    "key",
    [
        pytest.param((DAN, SAFETY, FIRST_AID), id="suspended-user"),
        pytest.param((EVE, SAFETY, FIRE_SAFETY), id="deleted-user"),
        pytest.param((FRANK, SAFETY, FIRE_SAFETY), id="user-of-other-company"),
        pytest.param((HENRY, SAFETY, FIRE_SAFETY), id="membership-withdrawn"),
        pytest.param((UNKNOWN_USER, SAFETY, FIRE_SAFETY), id="unknown-user"),
        pytest.param((GRACE, OLD_LICENSE, FIRE_SAFETY), id="deleted-license"),
        pytest.param((CAROL, GLOBEX_TRAINING, FIRE_SAFETY), id="other-company-license"),
    ],
)
def test_report_hides_row(client, key):
    assert key not in keys_of(report(client))


def test_report_other_company_rows(client):
    assert set(keys_of(report(client, company=GLOBEX))) == GLOBEX_ROWS


def test_report_include_suspended(client):
    rows = keys_of(report(client, include_suspended="true"))
    assert set(rows) == ACME_ROWS | {ACME_SUSPENDED_ROW}


def test_report_departments_of_this_company_only(client):
    acme = row_of(report(client), (CAROL, SAFETY, ETHICS))
    globex = row_of(
        report(client, company=GLOBEX), (CAROL, GLOBEX_TRAINING, FIRE_SAFETY)
    )
    assert acme["departments"] == ["Acme HQ"]
    assert globex["departments"] == ["Globex Ops"]


def test_report_departments_sorted_by_name(client):
    row = row_of(report(client), ALICE_SAFETY)
    assert row["departments"] == ["Research", "Sales East"]


def test_report_departments_skip_deleted(client):
    row = row_of(report(client), (GRACE, COMPLIANCE, FIRST_AID))
    assert row["departments"] == ["Sales"]


# Row contents.


def test_report_row_fields(client):
    row = row_of(report(client), ALICE_SAFETY)
    assert row == {
        "user_id": ALICE,
        "firstname": "Alice",
        "lastname": "Able",
        "email": "alice.able@example.com",
        "departments": ["Research", "Sales East"],
        "license_id": SAFETY,
        "license_name": "Safety 101",
        "reusable": True,
        "course_id": FIRE_SAFETY,
        "course_name": "Fire Safety",
        "allocated": True,
        "dates_allocated": ["2024-01-10T09:00:00Z", "2024-03-05T12:00:00Z"],
        "dates_unallocated": ["2024-02-01T10:00:00Z"],
        "allocations": 2,
        "unallocations": 1,
    }


def test_report_keeps_equal_allocation_instants(client):
    row = row_of(report(client), (GRACE, COMPLIANCE, FIRST_AID))
    assert row["dates_allocated"] == ["2024-05-01T12:00:00Z", "2024-05-01T12:00:00Z"]
    assert row["allocations"] == 2


def test_report_unallocated_row(client):
    row = row_of(report(client), (CAROL, SAFETY, ETHICS))
    assert row["allocated"] is False
    assert row["dates_unallocated"] == ["2024-02-25T12:00:00Z"]


def test_report_unknown_course_has_no_name(client):
    row = row_of(report(client), BOB_UNKNOWN_COURSE)
    assert row["course_name"] is None


def test_report_non_reusable_license(client):
    row = row_of(report(client), (GRACE, COMPLIANCE, FIRST_AID))
    assert row["reusable"] is False


def test_report_freshness(client):
    body = report(client)
    assert body["newest_event_time"] == "2024-05-03T12:00:00Z"
    assert parse_rfc3339(body["updated_at"]) > parse_rfc3339("2024-05-03T12:00:00Z")


def test_report_echoes_page_parameters(client):
    body = report(client)
    assert (body["company_id"], body["page"], body["per_page"]) == (ACME, 1, 1000)


# Filters.

FILTER_CASES = [
    pytest.param(
        {"license_id": COMPLIANCE}, {ALICE_COMPLIANCE, GRACE_ROW}, id="license"
    ),
    pytest.param({"course_id": FIRE_SAFETY}, {ALICE_SAFETY, BOB_SAFETY}, id="course"),
    pytest.param(
        {"course_id": UNKNOWN_COURSE}, {BOB_UNKNOWN_COURSE}, id="unknown-course"
    ),
    pytest.param({"course_id": 123456}, set(), id="course-without-rows"),
    pytest.param(
        {"department_id": SALES},
        ALICE_ROWS | BOB_ROWS | {GRACE_ROW},
        id="department-subtree",
    ),
    pytest.param({"department_id": SALES_EAST}, ALICE_ROWS, id="department-leaf"),
    pytest.param({"department_id": ACME_HQ}, ACME_ROWS, id="department-root"),
    pytest.param(
        {"department_id": RESEARCH, "include_suspended": "true"},
        ALICE_ROWS | {ACME_SUSPENDED_ROW},
        id="department-suspended",
    ),
    pytest.param({"first_initial": "b"}, BOB_ROWS, id="first-initial-lower"),
    pytest.param({"first_initial": "B"}, BOB_ROWS, id="first-initial-upper"),
    pytest.param({"last_initial": "h"}, {GRACE_ROW}, id="last-initial"),
    pytest.param({"search": "carol c"}, {CAROL_ROW}, id="search-full-name"),
    pytest.param({"search": "CLARK"}, {CAROL_ROW}, id="search-last-name"),
    pytest.param({"search": "@EXAMPLE.com"}, ACME_ROWS, id="search-email"),
    pytest.param({"search": "_"}, {GRACE_ROW}, id="search-underscore-literal"),
    pytest.param({"search": "%"}, set(), id="search-percent-literal"),
    pytest.param({"firstname": "LIC"}, ALICE_ROWS, id="firstname"),
    pytest.param({"lastname": "AKE"}, BOB_ROWS, id="lastname"),
    pytest.param({"email": "grace_"}, {GRACE_ROW}, id="email"),
    pytest.param({"search": ""}, ACME_ROWS, id="empty-text-filter"),
    pytest.param({"allocated": "false"}, {CAROL_ROW}, id="allocated-false"),
    pytest.param({"allocated": "true"}, ACME_ROWS - {CAROL_ROW}, id="allocated-true"),
    pytest.param(
        {"allocated_from": "2024-03-01", "allocated_to": "2024-03-31"},
        {ALICE_SAFETY, BOB_SAFETY},
        id="allocated-range",
    ),
    pytest.param(
        # Alice's safety row has allocations before and after, none inside.
        {"allocated_from": "2024-02-01", "allocated_to": "2024-02-29"},
        {CAROL_ROW},
        id="allocated-range-between-events",
    ),
    pytest.param(
        {"allocated_from": "2024-04-01"},
        {BOB_UNKNOWN_COURSE, GRACE_ROW},
        id="allocated-from-only",
    ),
    pytest.param(
        {"allocated_to": "2024-01-10"}, {ALICE_SAFETY}, id="allocated-to-only"
    ),
    pytest.param(
        {"allocated_from": "2024-03-10", "allocated_to": "2024-03-10"},
        {BOB_SAFETY},
        id="allocated-day-utc",
    ),
    pytest.param(
        {"allocated_from": "2024-03-09", "allocated_to": "2024-03-09"},
        set(),
        id="allocated-day-before-utc",
    ),
    pytest.param(
        {
            "allocated_from": "2024-03-09",
            "allocated_to": "2024-03-09",
            "tz": "America/New_York",
        },
        {BOB_SAFETY},
        id="allocated-day-new-york",
    ),
    pytest.param(
        {
            "allocated_from": "2024-03-10",
            "allocated_to": "2024-03-10",
            "tz": "America/New_York",
        },
        set(),
        id="allocated-next-day-new-york",
    ),
    pytest.param(
        {"unallocated_from": "2024-02-01", "unallocated_to": "2024-02-01"},
        {ALICE_SAFETY},
        id="unallocated-one-day",
    ),
    pytest.param(
        {"unallocated_from": "2024-02-02"},
        {CAROL_ROW, GRACE_ROW},
        id="unallocated-from-only",
    ),
    pytest.param(
        {"unallocated_to": "2024-02-24"}, {ALICE_SAFETY}, id="unallocated-to-only"
    ),
    # Alice's unallocation at 2024-02-01T10:00Z is midnight of 2024-02-02 at +14:00.
    pytest.param(
        {
            "unallocated_from": "2024-02-02",
            "unallocated_to": "2024-02-02",
            "tz": "Pacific/Kiritimati",
        },
        {ALICE_SAFETY},
        id="unallocated-day-start-inclusive",
    ),
    pytest.param(
        {
            "unallocated_from": "2024-02-01",
            "unallocated_to": "2024-02-01",
            "tz": "Pacific/Kiritimati",
        },
        set(),
        id="unallocated-day-end-exclusive",
    ),
    pytest.param(
        {"license_id": SAFETY, "allocated": "true", "department_id": SALES},
        BOB_ROWS | {ALICE_SAFETY},
        id="combined",
    ),
]


@pytest.mark.parametrize(
    "params, expected",
    FILTER_CASES,
)
def test_report_filter(client, params, expected):
    assert set(keys_of(report(client, **params))) == expected


def test_report_filter_total_matches_rows(client):
    body = report(client, license_id=COMPLIANCE)
    assert body["total"] == len(body["rows"])


def test_report_first_initial_non_ascii(client):
    rows = keys_of(report(client, company=GLOBEX, first_initial="é"))
    assert rows == [(EMILE, GLOBEX_TRAINING, FIRST_AID)]


# Sorting and pagination.


def test_report_sort_lastname_case_insensitive(client):
    assert keys_of(report(client)) == [
        ALICE_SAFETY,
        ALICE_COMPLIANCE,
        BOB_SAFETY,
        BOB_UNKNOWN_COURSE,
        CAROL_ROW,
        GRACE_ROW,
    ]


def test_report_sort_allocations_descending(client):
    body = report(client, sort="allocations", order="desc")
    assert keys_of(body)[:2] == [ALICE_SAFETY, GRACE_ROW]


def test_report_sort_department(client):
    body = report(client, sort="department")
    assert [row["user_id"] for row in body["rows"]] == [
        CAROL,
        ALICE,
        ALICE,
        BOB,
        BOB,
        GRACE,
    ]


def _sort_value(row: dict, sort: str):
    match sort:
        case "lastname" | "firstname" | "email":
            return row[sort].lower()
        case "department":
            return min((name.lower() for name in row["departments"]), default=None)
        case "license":
            return row["license_name"].lower()
        case "course":
            return None if row["course_name"] is None else row["course_name"].lower()
        case "last_allocated" | "last_unallocated":
            dates = row["dates_" + sort.removeprefix("last_")]
            return max((parse_rfc3339(date) for date in dates), default=None)
    return row[sort]


def _expected_order(rows: list[dict], sort: str, descending: bool) -> list[tuple]:
    """Sort as the API promises: NULL last, ties by name, then by the row's key."""
    ties = sorted(
        rows,
        key=lambda row: (
            row["lastname"].lower(),
            row["firstname"].lower(),
            row["user_id"],
            row["license_id"],
            row["course_id"],
        ),
    )
    present = [row for row in ties if _sort_value(row, sort) is not None]
    missing = [row for row in ties if _sort_value(row, sort) is None]
    present.sort(key=lambda row: _sort_value(row, sort), reverse=descending)
    return keys_of({"rows": present + missing})


@pytest.mark.parametrize("order", ["asc", "desc"])
@pytest.mark.parametrize("sort", SORT_KEYS)
def test_report_sort(client, sort, order):
    rows = report(client, include_suspended="true")["rows"]
    body = report(client, include_suspended="true", sort=sort, order=order)
    assert keys_of(body) == _expected_order(rows, sort, order == "desc")


@pytest.mark.parametrize("order", ["asc", "desc"])
@pytest.mark.parametrize("sort", ["course", "last_unallocated"])
def test_report_sort_nulls_last(client, sort, order):
    body = report(client, sort=sort, order=order)
    assert _sort_value(body["rows"][-1], sort) is None


@pytest.mark.parametrize("sort", ["allocated", "unallocations", "last_unallocated"])
@pytest.mark.parametrize("per_page", [1, 2, 4])
def test_report_pages_cover_rows_once(client, sort, per_page):
    everything = keys_of(report(client, sort=sort, order="desc"))
    paged = []
    for page in range(1, len(everything) // per_page + 2):
        path = REPORT.format(company=ACME)
        params = {"sort": sort, "order": "desc", "page": page, "per_page": per_page}
        paged.extend(keys_of(get(client, path, **params).json()))
    assert paged == everything


def test_report_page_past_end_is_empty(client):
    response = get(client, REPORT.format(company=ACME), page=50, per_page=10)
    assert response.json()["rows"] == []
    assert response.json()["total"] == len(ACME_ROWS)


@pytest.mark.parametrize("per_page", [1, 1000])
def test_report_runs_three_statements(client, engine, per_page):
    statements = []

    def record(conn, cursor, statement, parameters, context, executemany):
        if statement.strip().upper() != "BEGIN":
            statements.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    try:
        get(client, REPORT.format(company=ACME), per_page=per_page, sort="department")
    finally:
        event.remove(engine, "before_cursor_execute", record)
    assert len(statements) == 3


# Access control and errors.


def test_auth_missing_key(client):
    response = get(client, REPORT.format(company=ACME), key=None)
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")


def test_auth_wrong_key(client):
    response = get(client, REPORT.format(company=ACME), key="not-a-key")
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")


def test_auth_other_scheme(client):
    path = REPORT.format(company=ACME)
    response = client.get(path, headers={"Authorization": f"Basic {ALL_KEY}"})
    assert response.status_code == 401


def test_auth_before_validation(client):
    response = get(client, REPORT.format(company=ACME), key=None, per_page=5000)
    assert response.status_code == 401


@pytest.mark.parametrize(
    "path",
    [
        REPORT,
        "/v1/companies/{company}/licenses",
        "/v1/companies/{company}/courses",
        "/v1/companies/{company}/departments",
    ],
)
def test_auth_every_endpoint_needs_key(client, path):
    assert get(client, path.format(company=ACME), key=None).status_code == 401


def test_auth_scoped_key_reads_own_company(client):
    response = get(client, REPORT.format(company=ACME), key=ACME_KEY)
    assert response.status_code == 200


def test_auth_scoped_key_other_company(client):
    response = get(client, REPORT.format(company=GLOBEX), key=ACME_KEY)
    assert response.status_code == 403
    assert parameters_of(response) == ["company_id"]


def test_auth_forbidden_before_not_found(client):
    response = get(client, REPORT.format(company=UNKNOWN_COMPANY), key=ACME_KEY)
    assert response.status_code == 403


def test_auth_forbidden_before_validation(client):
    path = REPORT.format(company=GLOBEX)
    response = get(client, path, key=ACME_KEY, per_page=5000)
    assert response.status_code == 403


def test_healthz_needs_no_key(client):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_api_docs_pages_not_served(client):
    # The OpenAPI schema is public (tests/test_security.py); the pages are not.
    assert client.get("/docs").status_code == 404
    assert client.get("/redoc").status_code == 404


@pytest.mark.parametrize(
    "path",
    [
        REPORT,
        "/v1/companies/{company}/licenses",
        "/v1/companies/{company}/courses",
        "/v1/companies/{company}/departments",
    ],
)
def test_not_found_unknown_company(client, path):
    response = get(client, path.format(company=UNKNOWN_COMPANY))
    assert response.status_code == 404
    assert parameters_of(response) == ["company_id"]


@pytest.mark.parametrize(
    "params, parameter",
    [
        pytest.param({"license_id": GLOBEX_TRAINING}, "license_id", id="other-license"),
        pytest.param({"license_id": OLD_LICENSE}, "license_id", id="deleted-license"),
        pytest.param({"license_id": 424242}, "license_id", id="unknown-license"),
        pytest.param({"department_id": GLOBEX_MAIN}, "department_id", id="other-dept"),
        pytest.param({"department_id": OLD_UNIT}, "department_id", id="deleted-dept"),
        pytest.param({"department_id": 424242}, "department_id", id="unknown-dept"),
    ],
)
def test_not_found_foreign_id(client, params, parameter):
    response = get(client, REPORT.format(company=ACME), **params)
    assert response.status_code == 404
    assert parameters_of(response) == [parameter]


INVALID_CASES = [
    pytest.param({"per_page": "0"}, "per_page", id="per_page-zero"),
    pytest.param({"per_page": "1001"}, "per_page", id="per_page-too-large"),
    pytest.param({"page": "0"}, "page", id="page-zero"),
    pytest.param({"page": "two"}, "page", id="page-not-number"),
    pytest.param(
        {"page": str(2**62), "per_page": "1000"}, "page", id="page-offset-overflow"
    ),
    pytest.param({"sort": "salary"}, "sort", id="sort-unknown"),
    pytest.param({"order": "up"}, "order", id="order-unknown"),
    pytest.param({"tz": "Mars/Olympus"}, "tz", id="tz-unknown"),
    pytest.param({"tz": "../../etc/passwd"}, "tz", id="tz-path"),
    pytest.param(
        {"first_initial": "ab"}, "first_initial", id="first-initial-two-letters"
    ),
    pytest.param({"first_initial": "1"}, "first_initial", id="first-initial-digit"),
    pytest.param({"last_initial": "%"}, "last_initial", id="last-initial-wildcard"),
    pytest.param(
        {"allocated_from": "2024-13-01"}, "allocated_from", id="date-impossible"
    ),
    pytest.param({"allocated_to": "20240501"}, "allocated_to", id="date-compact"),
    pytest.param(
        {"unallocated_from": "2024-05-01T00:00:00Z"},
        "unallocated_from",
        id="date-with-time",
    ),
    pytest.param(
        {"unallocated_to": "0999-01-01"}, "unallocated_to", id="date-too-early"
    ),
    pytest.param(
        {"allocated_from": "2024-05-02", "allocated_to": "2024-05-01"},
        "allocated_from",
        id="allocated-range-reversed",
    ),
    pytest.param(
        {"unallocated_from": "2024-05-02", "unallocated_to": "2024-05-01"},
        "unallocated_from",
        id="unallocated-range-reversed",
    ),
    pytest.param({"allocated": "maybe"}, "allocated", id="allocated-not-boolean"),
    pytest.param(
        {"include_suspended": "sometimes"},
        "include_suspended",
        id="include-suspended-not-boolean",
    ),
    pytest.param({"license_id": "abc"}, "license_id", id="license-id-not-number"),
    pytest.param({"search": "x" * 1001}, "search", id="search-too-long"),
    pytest.param({"department_id": "0"}, "department_id", id="department-id-zero"),
    pytest.param({"course_id": str(2**63)}, "course_id", id="course-id-too-large"),
]


@pytest.mark.parametrize(
    "params, parameter",
    INVALID_CASES,
)
def test_invalid_parameter(client, params, parameter):
    response = get(client, REPORT.format(company=ACME), **params)
    assert response.status_code == 422
    assert parameter in parameters_of(response)
    assert all(parameter in entry["message"] for entry in response.json()["detail"])


def test_invalid_sort_lists_allowed_values(client):
    response = get(client, REPORT.format(company=ACME), sort="salary")
    message = response.json()["detail"][0]["message"]
    assert all(key in message for key in SORT_KEYS)


def test_invalid_per_page_states_maximum(client):
    response = get(client, REPORT.format(company=ACME), per_page="1001")
    assert response.json()["detail"][0]["message"] == "per_page must be at most 1000"


def test_invalid_company_id_in_path(client):
    response = get(client, "/v1/companies/acme/license-allocations")
    assert response.status_code == 422
    assert parameters_of(response) == ["company_id"]


def test_invalid_parameters_reported_together(client):
    response = get(client, REPORT.format(company=ACME), per_page="0", sort="salary")
    assert set(parameters_of(response)) == {"per_page", "sort"}


def test_server_error_hides_details(engine):
    load_history(engine)
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE license_events_v1"))
    app = create_app(_settings(), engine)
    with TestClient(app, raise_server_exceptions=False) as test_client:
        response = get(test_client, REPORT.format(company=ACME))
    assert response.status_code == 500
    assert "license_events" not in response.text
    assert "Traceback" not in response.text


def test_missing_live_projection_is_unavailable(client, engine):
    with engine.begin() as conn:
        conn.execute(update(schema.projections).values(status="retired"))
    response = get(client, REPORT.format(company=ACME))
    assert response.status_code == 503


# Selector endpoints.


def test_licenses_of_company(client):
    body = get(client, f"/v1/companies/{ACME}/licenses").json()
    licenses = {item["license_id"]: item for item in body["licenses"]}
    assert [item["license_id"] for item in body["licenses"]] == [
        COMPLIANCE,
        FUTURE_SKILLS,
        SAFETY,
    ]
    assert licenses[COMPLIANCE]["expired"] is True
    assert licenses[COMPLIANCE]["reusable"] is False
    assert licenses[FUTURE_SKILLS]["not_yet_valid"] is True
    assert licenses[FUTURE_SKILLS]["expiry_date"] == "2999-12-31T00:00:00Z"
    assert licenses[SAFETY]["start_date"] == "2020-01-01T00:00:00Z"
    assert licenses[SAFETY]["expired"] is False
    assert licenses[SAFETY]["not_yet_valid"] is False


def test_licenses_exclude_other_company(client):
    body = get(client, f"/v1/companies/{GLOBEX}/licenses").json()
    assert [item["license_id"] for item in body["licenses"]] == [GLOBEX_TRAINING]


def test_courses_of_report(client):
    body = get(client, f"/v1/companies/{ACME}/courses").json()
    assert body["courses"] == [
        {"course_id": ETHICS, "course_name": "Ethics"},
        {"course_id": FIRE_SAFETY, "course_name": "Fire Safety"},
        {"course_id": FIRST_AID, "course_name": "First Aid"},
        {"course_id": UNKNOWN_COURSE, "course_name": None},
    ]


def test_courses_of_one_license(client):
    body = get(client, f"/v1/companies/{ACME}/courses", license_id=SAFETY).json()
    ids = [course["course_id"] for course in body["courses"]]
    assert ids == [ETHICS, FIRE_SAFETY, UNKNOWN_COURSE]


def test_courses_include_suspended(client):
    path = f"/v1/companies/{ACME}/courses"
    body = get(client, path, license_id=SAFETY, include_suspended="true").json()
    ids = [course["course_id"] for course in body["courses"]]
    assert ids == [ETHICS, FIRE_SAFETY, FIRST_AID, UNKNOWN_COURSE]


def test_courses_foreign_license(client):
    path = f"/v1/companies/{ACME}/courses"
    response = get(client, path, license_id=GLOBEX_TRAINING)
    assert response.status_code == 404
    assert parameters_of(response) == ["license_id"]


def test_departments_tree(client):
    body = get(client, f"/v1/companies/{ACME}/departments").json()
    assert body["departments"] == [
        {
            "department_id": ACME_HQ,
            "name": "Acme HQ",
            "parent_id": None,
            "children": [
                {
                    "department_id": RESEARCH,
                    "name": "Research",
                    "parent_id": ACME_HQ,
                    "children": [],
                },
                {
                    "department_id": SALES,
                    "name": "Sales",
                    "parent_id": ACME_HQ,
                    "children": [
                        {
                            "department_id": SALES_EAST,
                            "name": "Sales East",
                            "parent_id": SALES,
                            "children": [],
                        }
                    ],
                },
            ],
        }
    ]


def test_departments_of_other_company(client):
    body = get(client, f"/v1/companies/{GLOBEX}/departments").json()
    assert [root["department_id"] for root in body["departments"]] == [GLOBEX_MAIN]
    root = body["departments"][0]
    assert [child["department_id"] for child in root["children"]] == [GLOBEX_OPS]


def test_department_tree_orphan_is_root():
    tree = department_tree([(1, "Top", None), (2, "Orphan", 99)])
    assert [node["department_id"] for node in tree] == [2, 1]


def test_department_tree_cuts_cycle():
    tree = department_tree([(1, "A", 2), (2, "B", 1), (3, "C", None)])
    assert [node["department_id"] for node in tree] == [1, 3]
    assert [child["department_id"] for child in tree[0]["children"]] == [2]


def cursor_pages(client, per_page: int, **params) -> tuple[list, list[dict]]:
    """Follow next_cursor from the first page; return the keys and the bodies."""
    keys, bodies, cursor = [], [], None
    while True:
        page_params = dict(params, per_page=per_page)
        if cursor is not None:
            page_params["cursor"] = cursor
        body = report(client, **page_params)
        keys.extend(keys_of(body))
        bodies.append(body)
        cursor = body["next_cursor"]
        if cursor is None:
            return keys, bodies
        assert len(bodies) <= len(ACME_ROWS) + 1


@pytest.mark.parametrize("order", ["asc", "desc"])
@pytest.mark.parametrize("sort", SORT_KEYS)
def test_report_cursor_pages_follow_the_order(client, sort, order):
    params = {"include_suspended": "true", "sort": sort, "order": order}
    everything = keys_of(report(client, **params))

    paged, bodies = cursor_pages(client, per_page=2, **params)

    assert paged == everything
    assert bodies[0]["page"] == 1
    assert all(body["page"] is None for body in bodies[1:])
    assert all(body["total"] == len(everything) for body in bodies)


@pytest.mark.parametrize(
    "params",
    [
        pytest.param({"license_id": SAFETY}, id="license"),
        pytest.param({"department_id": SALES, "sort": "department"}, id="department"),
        pytest.param({"search": "a", "sort": "last_unallocated"}, id="search"),
    ],
)
def test_report_cursor_pages_with_filters(client, params):
    everything = keys_of(report(client, **params))
    paged, _ = cursor_pages(client, per_page=1, **params)
    assert paged == everything


def test_report_cursor_ends_on_a_short_page(client):
    body = report(client, per_page=1000)
    assert body["next_cursor"] is None
    first = report(client, per_page=1)
    assert first["next_cursor"] is not None


def test_report_cursor_from_a_page_number(client):
    everything = keys_of(report(client))
    second = report(client, per_page=2, page=2)
    rest = report(client, per_page=1000, cursor=second["next_cursor"])
    assert keys_of(second) + keys_of(rest) == everything[2:]


@pytest.mark.parametrize(
    "cursor",
    ["", "not base64!", "WzEsMl0", "eyJ1IjogMX0", "WyJhIiwyLDNd", "Wy0xLDIsM10"],
    ids=["empty", "not-base64", "two-ids", "object", "text-id", "negative"],
)
def test_report_cursor_malformed(client, cursor):
    response = get(client, REPORT.format(company=ACME), cursor=cursor)
    assert response.status_code == 422
    assert parameters_of(response) == ["cursor"]


def test_report_cursor_with_page_number(client):
    cursor = report(client, per_page=1)["next_cursor"]
    response = get(client, REPORT.format(company=ACME), cursor=cursor, page=2)
    assert response.status_code == 422
    assert parameters_of(response) == ["page"]


def test_report_cursor_of_another_company(client):
    cursor = report(client, company=GLOBEX, per_page=1)["next_cursor"]
    response = get(client, REPORT.format(company=ACME), cursor=cursor)
    assert response.status_code == 422
    assert parameters_of(response) == ["cursor"]
    assert "no longer in the report of company" in response.text


def test_report_cursor_of_a_missing_row(client):
    from api.params import RowKey, encode_cursor

    cursor = encode_cursor(RowKey(999_999, SAFETY, FIRE_SAFETY))
    response = get(client, REPORT.format(company=ACME), cursor=cursor)
    assert response.status_code == 422
    assert parameters_of(response) == ["cursor"]
