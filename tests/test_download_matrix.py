"""Downloads against the JSON report for every sort, order and credential scope.

Each case downloads a CSV and compares it, row for row, with every page of the
JSON report for the same query and credential, on SQLite and PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Iterator

import orjson
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from api.app import create_app
from api.params import SORT_KEYS
from license_report.keys_cli import create_key
from license_report.settings import Settings
from tests.api_data import (
    ACME,
    FIRE_SAFETY,
    RESEARCH,
    SAFETY,
    SALES,
    SALES_EAST,
    load_history,
)
from tests.test_downloads import csv_rows, expected_cells, special_history

REPORT = f"/v1/companies/{ACME}/license-allocations"
# Users added here: two whose lower-cased names tie, and one more in Sales.
TWIN_A = 400
TWIN_B = 401
LONE = 402


def tie_history():
    history = special_history()
    history.user(TWIN_A, "Sam", "Same", "twin.a@example.com")
    history.user(TWIN_B, "sam", "same", "twin.b@example.com")
    history.user(LONE, "Lone", "Wolf", "lone@example.com")
    history.member(TWIN_A, ACME, SALES_EAST)
    history.member(TWIN_B, ACME, RESEARCH)
    history.member(TWIN_B, ACME, SALES_EAST)
    history.member(LONE, ACME, SALES)
    for user in (TWIN_A, TWIN_B, LONE):
        history.allocate(user, SAFETY, FIRE_SAFETY, "2024-07-01T12:00:00Z")
    return history


@pytest.fixture
def scoped_clients(engine: Engine) -> Iterator[tuple[TestClient, dict[str, str]]]:
    load_history(engine, tie_history())
    keys = {
        "all": create_key(engine, "all", "all")[0],
        "sales": create_key(engine, "sales", "department", ACME, SALES)[0],
        "leaf": create_key(engine, "leaf", "department", ACME, SALES_EAST)[0],
    }
    settings = Settings(api_keys=orjson.dumps({}).decode(), rate_limit_per_minute=0)
    with TestClient(create_app(settings, engine)) as client:
        yield client, keys


def all_json_rows(client: TestClient, key: str, **params) -> list[dict]:
    rows: list[dict] = []
    page = 1
    headers = {"Authorization": f"Bearer {key}"}
    while True:
        response = client.get(
            REPORT, params={**params, "page": page, "per_page": 3}, headers=headers
        )
        assert response.status_code == 200, response.text
        body = response.json()
        rows.extend(body["rows"])
        if page * 3 >= body["total"]:
            return rows
        page += 1


def test_csv_equals_json_every_sort_and_scope(scoped_clients):
    client, keys = scoped_clients
    mismatches = []
    for scope, key in keys.items():
        for sort in SORT_KEYS:
            for order in ("asc", "desc"):
                for extra in ({}, {"include_suspended": "true"}):
                    params = {"sort": sort, "order": order, **extra}
                    expected = [
                        expected_cells(row)
                        for row in all_json_rows(client, key, **params)
                    ]
                    response = client.get(
                        REPORT,
                        params={**params, "format": "csv"},
                        headers={"Authorization": f"Bearer {key}"},
                    )
                    assert response.status_code == 200, response.text
                    if csv_rows(response.content)[1:] != expected:
                        mismatches.append((scope, params))
    assert mismatches == []
