"""End to end: a realistic history through Kafka, the consumer and the API.

The expected report comes from tests/oracle.py, computed from the history's
logical events without the project's code.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from api.app import create_app
from license_report.settings import Settings
from projections import schema
from projections.sql import make_engine
from tests.history import generate_history, write_jsonl
from tests.kafka_broker import GROUP_TIMINGS
from tests.oracle import expected_report, filter_rows

KEY = "end-to-end-key"
REPORT = "/v1/companies/{company}/license-allocations"
# Fields the oracle computes; the API's rows carry exactly these.
ROW_FIELDS = [
    "user_id",
    "firstname",
    "lastname",
    "email",
    "departments",
    "license_id",
    "license_name",
    "reusable",
    "course_id",
    "course_name",
    "allocated",
    "dates_allocated",
    "dates_unallocated",
    "allocations",
    "unallocations",
]

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def history():
    return generate_history(7, companies=3, users=60)


def test_end_to_end_consume_matches_oracle(
    history, database_url, another_database, kafka_broker, tmp_path
):
    topic = f"license-events-{uuid.uuid4().hex[:8]}"
    kafka_broker.create_topic(topic, partitions=3)
    kafka_broker.produce(topic, history.messages)

    consumer = _start_consumer(database_url, kafka_broker, topic, tmp_path)
    try:
        _wait_for_store(database_url, history, consumer, tmp_path)
    finally:
        consumer.send_signal(signal.SIGTERM)
        exit_code = consumer.wait(timeout=60)
    assert exit_code == 0, _tail(tmp_path / "consumer.log")

    consumed = _fetch_all_reports(database_url, history)
    for company in history.company_ids:
        expected = expected_report(history.logical, company)
        assert _rows(consumed[company]) == expected, f"company {company} differs"
        assert consumed[company]["total"] == len(expected)

    # The same history through replay gives the identical report.
    lines = tmp_path / "history.jsonl"
    write_jsonl(history, lines)
    _run_cli(["replay", str(lines)], another_database)
    replayed = _fetch_all_reports(another_database, history)
    for company in history.company_ids:
        assert replayed[company]["rows"] == consumed[company]["rows"]


def test_end_to_end_filters_match_oracle(history, database_url, tmp_path):
    lines = tmp_path / "history.jsonl"
    write_jsonl(history, lines)
    _run_cli(["replay", str(lines)], database_url)

    with _client(database_url) as client:
        for company in history.company_ids:
            expected = expected_report(history.logical, company)
            for params in _filter_cases(history, company, expected):
                response = _get_all(client, company, params)
                oracle_params = {
                    k: v
                    for k, v in params.items()
                    if k not in ("include_suspended", "sort", "order")
                }
                wanted = filter_rows(
                    expected,
                    logical_events=history.logical,
                    company_id=company,
                    **oracle_params,
                )
                assert _rows(response) == wanted, f"company {company} {params}"
                assert response["total"] == len(wanted), f"company {company} {params}"


def test_end_to_end_include_suspended_matches_oracle(history, database_url, tmp_path):
    lines = tmp_path / "history.jsonl"
    write_jsonl(history, lines)
    _run_cli(["replay", str(lines)], database_url)

    with _client(database_url) as client:
        for company in history.company_ids:
            expected = expected_report(history.logical, company, include_suspended=True)
            response = _get_all(client, company, {"include_suspended": "true"})
            assert _rows(response) == expected, f"company {company}"


def test_end_to_end_dead_letters_kept(history, database_url, tmp_path):
    lines = tmp_path / "history.jsonl"
    written = write_jsonl(history, lines, include_invalid_utf8=True)
    _run_cli(["replay", str(lines)], database_url)

    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            letters = conn.execute(select(schema.dead_letters)).all()
            stored = conn.execute(
                select(func.count()).select_from(schema.event_store)
            ).scalar_one()
    finally:
        engine.dispose()
    # Empty lines are skipped by replay, so their values leave no dead letter.
    nonempty = [m for m in history.malformed if m.value.strip()]
    assert len(letters) == len(nonempty)
    assert all(letter.reason for letter in letters)
    assert stored == len(history.logical)
    assert written >= len(history.logical)


def _filter_cases(history, company, expected):
    """A spread of filters built from the company's own data."""
    cases = [{"allocated": True}, {"allocated": False}]
    if expected:
        sample = expected[len(expected) // 2]
        cases += [
            {"license_id": sample["license_id"]},
            {"course_id": sample["course_id"]},
            {"search": sample["lastname"][1:4].upper()},
            {"search": sample["email"].split("@")[0][-5:]},
            {"first_initial": sample["firstname"][0].lower()},
            {"last_initial": sample["lastname"][0]},
            {"allocated_from": "2024-01-01", "allocated_to": "2024-06-30"},
            {"unallocated_from": "2024-03-01", "unallocated_to": "2025-12-31"},
        ]
    departments = _company_departments(history, company)
    for department_id in departments[:3]:
        cases.append({"department_id": department_id})
    return cases


def _company_departments(history, company):
    return sorted(
        {
            event.data["department_id"]
            for event in history.logical
            if event.type == "department.upserted"
            and event.data["company_id"] == company
        }
    )


def _rows(response):
    rows = [{field: row[field] for field in ROW_FIELDS} for row in response["rows"]]
    return sorted(rows, key=lambda r: (r["user_id"], r["license_id"], r["course_id"]))


def _client(url: str) -> TestClient:
    settings = Settings(database_url=url, api_keys=f'{{"{KEY}": "*"}}')
    client = TestClient(create_app(settings))
    client.headers["Authorization"] = f"Bearer {KEY}"
    return client


def _get_all(client: TestClient, company: int, params: dict) -> dict:
    """Fetch every page of a report; return the first page with all rows."""
    pages = []
    page = 1
    while True:
        query = {**_query(params), "page": page, "per_page": 100}
        response = client.get(REPORT.format(company=company), params=query)
        assert response.status_code == 200, response.text
        body = response.json()
        pages.append(body)
        if page * 100 >= body["total"]:
            break
        page += 1
    first = dict(pages[0])
    first["rows"] = [row for body in pages for row in body["rows"]]
    return first


def _query(params: dict) -> dict:
    return {k: str(v).lower() if isinstance(v, bool) else v for k, v in params.items()}


def _fetch_all_reports(url: str, history) -> dict[int, dict]:
    with _client(url) as client:
        return {
            company: _get_all(client, company, {}) for company in history.company_ids
        }


def _environment(url: str, **extra: str) -> dict[str, str]:
    environment = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("LICENSE_REPORT_")
    }
    environment.update(
        LICENSE_REPORT_DATABASE_URL=url,
        LICENSE_REPORT_METRICS_PORT="0",
        **extra,
    )
    return environment


def _cli() -> list[str]:
    return [sys.executable, "-m", "license_report.cli"]


def _run_cli(arguments: list[str], url: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [*_cli(), *arguments],
        env=_environment(url),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _start_consumer(url, broker, topic, tmp_path: Path) -> subprocess.Popen:
    log = (tmp_path / "consumer.log").open("w")
    timings = {
        "LICENSE_REPORT_KAFKA_SESSION_TIMEOUT_MS": str(
            GROUP_TIMINGS["session_timeout_ms"]
        ),
        "LICENSE_REPORT_KAFKA_HEARTBEAT_INTERVAL_MS": str(
            GROUP_TIMINGS["heartbeat_interval_ms"]
        ),
        "LICENSE_REPORT_KAFKA_MAX_POLL_INTERVAL_MS": str(
            GROUP_TIMINGS["max_poll_interval_ms"]
        ),
    }
    environment = _environment(
        url,
        LICENSE_REPORT_KAFKA_BOOTSTRAP_SERVERS=broker.bootstrap_servers,
        LICENSE_REPORT_KAFKA_TOPIC=topic,
        LICENSE_REPORT_KAFKA_GROUP_ID=f"group-{topic}",
        **timings,
    )
    return subprocess.Popen(
        [*_cli(), "consume"], env=environment, stdout=log, stderr=subprocess.STDOUT
    )


def _wait_for_store(url, history, consumer, tmp_path, timeout_s: float = 120) -> None:
    """Wait until every valid event and every malformed message is stored."""
    engine = make_engine(url)
    deadline = time.monotonic() + timeout_s
    seen = (0, 0)
    try:
        while time.monotonic() < deadline:
            assert consumer.poll() is None, _tail(tmp_path / "consumer.log")
            with engine.connect() as conn:
                events = conn.execute(
                    select(func.count()).select_from(schema.event_store)
                ).scalar_one()
                letters = conn.execute(
                    select(func.count()).select_from(schema.dead_letters)
                ).scalar_one()
            seen = (events, letters)
            if seen == (len(history.logical), len(history.malformed)):
                return
            time.sleep(0.5)
    finally:
        engine.dispose()
    pytest.fail(
        f"expected {len(history.logical)} events and {len(history.malformed)} dead "
        f"letters, saw {seen}; consumer log:\n{_tail(tmp_path / 'consumer.log')}"
    )


def _tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
