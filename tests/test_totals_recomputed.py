"""The kept report totals, the shared statements and the date filters.

Each test compares a result with a plain recomputation: the kept totals with a
count of the rows, a date filter with a scan of the license events, a shared
statement's result with the same request run alone.
"""

from __future__ import annotations

import random
import threading
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import orjson
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, select, true

from api.app import create_app
from api.database import live_snapshot
from api.params import day_range, report_query
from api.report import fetch_report
from license_report.settings import Settings
from projections import rebuild
from projections.ordering import ALLOCATED, UNALLOCATED
from projections.rebuild import rebuild_from_store
from projections.registry import live_projection
from projections.verify import verify
from tests.api_data import ACME, GLOBEX, load_history
from tests.history import generate_history
from tests.test_projection import allocate, apply, event, unallocate
from tests.test_report_rows import SETUP, T0, T1, USER, apply_messages, totals

KEY = "totals-key"
REPORT = "/v1/companies/{company}/license-allocations"
T2 = "2024-03-03T09:00:00Z"
T3 = "2024-03-04T09:00:00Z"

pytestmark = pytest.mark.timeout(300)


def _client(engine: Engine) -> TestClient:
    settings = Settings(api_keys=orjson.dumps({KEY: "*"}).decode())
    return TestClient(create_app(settings, engine))


def _get(client: TestClient, company: int, **params) -> dict:
    response = client.get(
        REPORT.format(company=company),
        params={"per_page": 1000, **params},
        headers={"Authorization": f"Bearer {KEY}"},
    )
    assert response.status_code == 200, response.text
    return response.json()


def _keys(body: dict) -> set[tuple[int, int, int]]:
    return {(r["user_id"], r["license_id"], r["course_id"]) for r in body["rows"]}


def _listed_companies(engine: Engine) -> list[int]:
    with engine.connect() as conn:
        rows = live_projection(conn).license_allocations
        query = select(rows.c.company_id).where(rows.c.listed == true()).distinct()
        return sorted(conn.execute(query).scalars())


def _event_instants(engine: Engine) -> dict[tuple, dict[int, list[int]]]:
    """Return each report row's event instants per action, from license_events."""
    with engine.connect() as conn:
        events = live_projection(conn).license_events
        query = select(
            events.c.user_id,
            events.c.license_id,
            events.c.course_id,
            events.c.action,
            events.c.at_us,
        )
        found: dict[tuple, dict[int, list[int]]] = {}
        for user, license_, course, action, at_us in conn.execute(query):
            per_action = found.setdefault((user, license_, course), {})
            per_action.setdefault(action, []).append(at_us)
    return found


# Kept totals against a recount, through changes of a row's company, listing
# and suspension.

SECOND_COMPANY = [
    event("c2", "company.upserted", T0, {"company_id": 2, "name": "Globex"}),
    event(
        "d2",
        "department.upserted",
        T0,
        {"department_id": 6, "company_id": 2, "name": "Ops", "parent_id": None},
    ),
]
MEMBER_OF_SECOND = event(
    "m2",
    "user.department.assigned",
    T1,
    {"user_id": 1, "company_id": 2, "department_id": 6},
)
LICENSE_MOVED = event(
    "l2",
    "license.upserted",
    T1,
    {
        "license_id": 10,
        "company_id": 2,
        "name": "Safety",
        "reusable": False,
        "program": False,
    },
)


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        pytest.param([LICENSE_MOVED], {}, id="license-moved-to-non-member-company"),
        pytest.param(
            [MEMBER_OF_SECOND, LICENSE_MOVED],
            {2: (1, 0)},
            id="license-moved-to-member-company",
        ),
        pytest.param(
            [
                event("u2", "user.deleted", T1, {"user_id": 1}),
                event("u3", "user.upserted", T2, USER | {"suspended": True}),
            ],
            {1: (1, 1)},
            id="user-revived-suspended",
        ),
        pytest.param(
            [
                event("l3", "license.deleted", T1, {"license_id": 10}),
                event(
                    "l4",
                    "license.upserted",
                    T2,
                    {
                        "license_id": 10,
                        "company_id": 1,
                        "name": "Safety",
                        "reusable": False,
                        "program": False,
                    },
                ),
            ],
            {1: (1, 0)},
            id="license-revived",
        ),
        pytest.param(
            [
                event("u4", "user.upserted", T1, USER | {"suspended": True}),
                event("u5", "user.upserted", T2, USER),
            ],
            {1: (1, 0)},
            id="suspended-then-not",
        ),
    ],
)
@pytest.mark.parametrize("together", [False, True], ids=["batches", "one-batch"])
def test_totals_follow_row_changes(engine, changes, expected, together):
    apply(engine, SETUP + SECOND_COMPANY)
    if together:
        apply(engine, changes)
    else:
        for change in changes:
            apply(engine, [change])
    assert totals(engine) == expected
    assert totals(engine) == totals(engine, recount=True)


def test_totals_of_rows_created_with_references(engine):
    """A batch that creates rows and changes their users' references at once."""
    rows = [allocate(f"a{i}", T1, course=100 + i) for i in range(5)]
    suspend = event("u2", "user.upserted", T1, USER | {"suspended": True})
    apply(engine, SETUP[:-1])
    apply(engine, [*rows, suspend, LICENSE_MOVED, *SECOND_COMPANY, MEMBER_OF_SECOND])
    assert totals(engine) == {2: (5, 5)}
    assert totals(engine) == totals(engine, recount=True)


# A generated history: the API's unfiltered total and date filters against
# recomputations from the rows and the license events.


@pytest.fixture(scope="module")
def history():
    return generate_history(5, companies=3, users=60)


def test_history_unfiltered_totals_match_rows(engine, history):
    apply_messages(engine, history.messages, batch_size=29)
    companies = _listed_companies(engine)
    assert len(companies) >= 2
    with _client(engine) as client:
        for company in companies:
            for suspended in ("false", "true"):
                body = _get(client, company, include_suspended=suspended)
                assert body["total"] == len(body["rows"]), (company, suspended)
                # A filter that every row passes forces a count of the rows.
                counted = _get(client, company, include_suspended=suspended, search="@")
                assert body["total"] == counted["total"], (company, suspended)
    assert totals(engine) == totals(engine, recount=True)


def _expected_in_range(instants, visible, action, start_us, end_us):
    expected = set()
    for key in visible:
        for at_us in instants.get(key, {}).get(action, []):
            after_start = start_us is None or at_us >= start_us
            before_end = end_us is None or at_us < end_us
            if after_start and before_end:
                expected.add(key)
    return expected


def _date_of(micros: int, zone: ZoneInfo) -> date:
    return datetime.fromtimestamp(micros / 1_000_000, UTC).astimezone(zone).date()


def test_history_date_filters_match_events(engine, history):
    """Random day ranges around real event instants, closed and one-sided."""
    apply_messages(engine, history.messages, batch_size=101)
    instants = _event_instants(engine)
    all_instants = []
    for per_action in instants.values():
        for at_list in per_action.values():
            all_instants.extend(at_list)
    chooser = random.Random(17)
    mismatches = []
    matched = 0
    with _client(engine) as client:
        for company in _listed_companies(engine):
            visible = _keys(_get(client, company))
            for _ in range(25):
                tz = chooser.choice(["UTC", "Europe/Paris", "Pacific/Kiritimati"])
                zone = ZoneInfo(tz)
                day = _date_of(chooser.choice(all_instants), zone)
                first = day - timedelta(days=chooser.choice([0, 0, 1, 30]))
                last = day + timedelta(days=chooser.choice([0, 0, 1, 30]))
                kind = chooser.choice(["closed", "from", "to"])
                for prefix, action in (
                    ("allocated", ALLOCATED),
                    ("unallocated", UNALLOCATED),
                ):
                    params = {"tz": tz}
                    from_text = first.isoformat() if kind != "to" else None
                    to_text = last.isoformat() if kind != "from" else None
                    if from_text:
                        params[f"{prefix}_from"] = from_text
                    if to_text:
                        params[f"{prefix}_to"] = to_text
                    span = day_range(from_text, to_text, zone)
                    expected = _expected_in_range(
                        instants, visible, action, span.start_us, span.end_us
                    )
                    body = _get(client, company, **params)
                    if _keys(body) != expected or body["total"] != len(expected):
                        mismatches.append((company, params))
                    matched += len(expected)
    assert mismatches == []
    assert matched > 100


# Rebuild: interrupted after the totals' triggers were installed, then resumed
# after more events arrived.


class Interrupt(Exception):
    pass


def test_rebuild_resumed_after_install_keeps_totals(engine, history, monkeypatch):
    half = len(history.messages) // 2
    apply_messages(engine, history.messages[:half], batch_size=500)

    def fail(*args, **kwargs):
        raise Interrupt

    monkeypatch.setattr(rebuild, "create_indexes", fail)
    with pytest.raises(Interrupt):
        rebuild_from_store(engine, batch_size=300, switch_threshold=1)
    monkeypatch.undo()

    apply_messages(engine, history.messages[half:], batch_size=500)
    result = rebuild_from_store(engine, batch_size=300, switch_threshold=1)

    assert result.resumed is True
    assert verify(engine).differences == []
    assert totals(engine) == totals(engine, recount=True)


# Shared statements: concurrent requests of other companies and shapes.


REQUESTS = [
    (ACME, {}),
    (GLOBEX, {}),
    (ACME, {"search": "a"}),
    (GLOBEX, {"search": "o"}),
    (ACME, {"include_suspended": True}),
    (ACME, {"allocated_from": "2024-03-01", "allocated_to": "2024-03-31"}),
    (GLOBEX, {"allocated_from": "2024-03-01", "allocated_to": "2024-03-31"}),
    (ACME, {"per_page": 2, "page": 2}),
    (GLOBEX, {"per_page": 1, "page": 2}),
]


def _run(engine: Engine, company: int, params: dict):
    query = report_query(**params)
    with live_snapshot(engine) as (conn, tables):
        total, rows, _ = fetch_report(conn, tables, company, query)
    return total, [(r["user_id"], r["license_id"], r["course_id"]) for r in rows]


def test_shared_statements_under_concurrency(engine):
    load_history(engine)
    alone = [_run(engine, company, params) for company, params in REQUESTS]
    failures = []

    def worker(seed: int) -> None:
        chooser = random.Random(seed)
        for _ in range(40):
            index = chooser.randrange(len(REQUESTS))
            company, params = REQUESTS[index]
            try:
                result = _run(engine, company, params)
            except Exception as error:  # noqa: BLE001 - collected for the assert
                failures.append((index, repr(error)))
                continue
            if result != alone[index]:
                failures.append((index, result))

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []


def test_total_after_switch_reads_new_version(engine):
    """After a rebuild switches versions, the kept total is the new version's."""
    apply(engine, SETUP)
    with _client(engine) as client:
        assert _get(client, 1)["total"] == 1
        rebuild_from_store(engine)
        apply(engine, [allocate("a2", T1, course=101)])
        assert _get(client, 1)["total"] == 2
        rebuild_from_store(engine)
        apply(engine, [unallocate("a3", T3, course=101)])
        body = _get(client, 1)
        assert body["total"] == 2
        assert len(body["rows"]) == 2


def test_as_of_total_matches_rows(engine):
    apply(engine, SETUP + [allocate("a2", T2, course=101)])
    with _client(engine) as client:
        earlier = _get(client, 1, as_of="2024-03-02T00:00:00Z")
        later = _get(client, 1, as_of="2024-03-04T00:00:00Z")
    assert earlier["total"] == len(earlier["rows"]) == 1
    assert later["total"] == len(later["rows"]) == 2


def test_totals_with_concurrent_writers(engine):
    """Two writers create and suspend rows of one company at the same time."""
    apply(engine, SETUP)
    users = {1: range(2, 12), 2: range(12, 22)}
    errors = []

    def writer(worker: int) -> None:
        try:
            for user in users[worker]:
                person = USER | {"user_id": user, "suspended": user % 3 == 0}
                member = {"user_id": user, "company_id": 1, "department_id": 5}
                apply(
                    engine,
                    [
                        event(f"u{user}", "user.upserted", T1, person),
                        event(f"m{user}", "user.department.assigned", T1, member),
                        allocate(f"a{user}", T1, user=user),
                        allocate(f"b{user}", T2, user=user, course=101),
                    ],
                )
        except Exception as error:  # noqa: BLE001 - collected for the assert
            errors.append(repr(error))

    threads = [threading.Thread(target=writer, args=(w,)) for w in users]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert totals(engine) == totals(engine, recount=True)
    assert totals(engine)[1][0] == 41


COMBINATIONS = [
    {"sort": "department", "allocated_from": "2024-03-01"},
    {"sort": "last_allocated", "order": "desc", "unallocated_to": "2024-02-24"},
    {"sort": "course", "department_id": 11, "allocated_to": "2024-03-31"},
    {"page": 10**15, "per_page": 1000},
    {"page": 9223372036854775, "per_page": 1000, "search": "a"},
    {"include_suspended": "true", "allocated": "false", "page": 2, "per_page": 1},
    {"as_of": "2024-03-15T00:00:00Z", "department_id": 11},
    {"as_of": "2024-03-15T00:00:00Z", "page": 10**15, "per_page": 1000},
    {"allocated_from": "9000-12-31", "unallocated_to": "1900-01-01"},
    {"format": "csv"},
    {"format": "csv", "as_of": "2024-03-15T00:00:00Z"},
]


@pytest.mark.parametrize("params", COMBINATIONS)
def test_parameter_combinations_no_server_error(engine, params):
    load_history(engine)
    with _client(engine) as client:
        for company in (ACME, GLOBEX):
            response = client.get(
                REPORT.format(company=company),
                params=params,
                headers={"Authorization": f"Bearer {KEY}"},
            )
            assert response.status_code < 500, response.text
