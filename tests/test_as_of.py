"""Point-in-time reports computed from the event store."""

from __future__ import annotations

import orjson
from fastapi.testclient import TestClient

from api.app import create_app
from consumer.batch import decode_values
from license_report.settings import Settings
from projections.apply import apply_batch
from projections.sql import make_engine

KEY = "as-of-key"
URL = "/v1/companies/1/license-allocations"


def event(event_id, type_, time, data) -> bytes:
    return orjson.dumps(
        {
            "specversion": "1.0",
            "id": event_id,
            "source": "/test",
            "type": type_,
            "time": time,
            "data": data,
        }
    )


ROW = {"user_id": 7, "license_id": 3, "course_id": 11}
HISTORY = [
    event(
        "c", "company.upserted", "2024-01-01T00:00:00Z", {"company_id": 1, "name": "A"}
    ),
    event(
        "u",
        "user.upserted",
        "2024-01-01T00:00:00Z",
        {"user_id": 7, "firstname": "Ana", "lastname": "Silva", "email": "a@x.org"},
    ),
    event(
        "m",
        "user.department.assigned",
        "2024-01-01T00:00:00Z",
        {"user_id": 7, "company_id": 1, "department_id": 2},
    ),
    event(
        "l",
        "license.upserted",
        "2024-01-01T00:00:00Z",
        {"license_id": 3, "company_id": 1, "name": "L", "reusable": True},
    ),
    event("a1", "license.allocated", "2024-02-01T00:00:00Z", ROW),
    event("x1", "license.unallocated", "2024-03-01T00:00:00Z", ROW),
    event("a2", "license.allocated", "2024-04-01T00:00:00Z", ROW),
    event(
        "u2",
        "user.upserted",
        "2024-05-01T00:00:00Z",
        {"user_id": 7, "firstname": "Ana", "lastname": "Costa", "email": "a@x.org"},
    ),
]


def _client(url: str, max_events: int = 1000) -> TestClient:
    engine = make_engine(url)
    decoded = decode_values(("test", None, i, v) for i, v in enumerate(HISTORY))
    with engine.begin() as conn:
        apply_batch(conn, decoded.events)
    engine.dispose()
    settings = Settings(
        database_url=url, api_keys=f'{{"{KEY}": "*"}}', as_of_max_events=max_events
    )
    client = TestClient(create_app(settings))
    client.headers["Authorization"] = f"Bearer {KEY}"
    return client


def test_as_of_returns_earlier_state(database_url):
    with _client(database_url) as client:
        body = client.get(URL, params={"as_of": "2024-03-15T00:00:00Z"}).json()
    (row,) = body["rows"]
    assert row["allocated"] is False
    assert row["allocations"] == 1
    assert row["unallocations"] == 1
    assert row["lastname"] == "Silva"
    assert body["newest_event_time"] == "2024-03-01T00:00:00Z"


def test_as_of_now_matches_live(database_url):
    with _client(database_url) as client:
        live = client.get(URL).json()
        later = client.get(URL, params={"as_of": "2030-01-01T00:00:00Z"}).json()
    assert later["rows"] == live["rows"]
    assert live["rows"][0]["lastname"] == "Costa"


def test_as_of_before_history_is_404(database_url):
    with _client(database_url) as client:
        response = client.get(URL, params={"as_of": "2023-01-01T00:00:00Z"})
    assert response.status_code == 404


def test_as_of_invalid_names_parameter(database_url):
    with _client(database_url) as client:
        response = client.get(URL, params={"as_of": "yesterday"})
    assert response.status_code == 422
    assert response.json()["detail"][0]["parameter"] == "as_of"


def test_as_of_over_limit_is_rejected(database_url):
    with _client(database_url, max_events=3) as client:
        response = client.get(URL, params={"as_of": "2030-01-01T00:00:00Z"})
    assert response.status_code == 422
    assert "LICENSE_REPORT_AS_OF_MAX_EVENTS" in response.json()["detail"][0]["message"]
