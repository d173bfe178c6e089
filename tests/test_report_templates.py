"""The page statements that api.report_sql builds once per shape of request."""

from __future__ import annotations

import orjson
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine
from sqlalchemy.exc import StatementError

from api.app import create_app
from api.auth import CompanyAccess
from api.database import live_snapshot
from api.params import report_query
from api.report_sql import page_parameters, page_template
from license_report.settings import Settings
from tests.api_data import (
    ACME,
    ACME_HQ,
    ACME_ROWS,
    ALICE,
    BOB,
    GLOBEX,
    GLOBEX_ROWS,
    load_history,
)

KEY = "template-test-key"
REPORT = "/v1/companies/{company}/license-allocations"


@pytest.fixture
def client(engine: Engine):
    load_history(engine)
    settings = Settings(api_keys=orjson.dumps({KEY: "*"}).decode())
    with TestClient(create_app(settings, engine)) as test_client:
        yield test_client


def keys_of(client: TestClient, company: int, **params) -> set[tuple[int, int, int]]:
    response = client.get(
        REPORT.format(company=company),
        params={"per_page": 1000, **params},
        headers={"Authorization": f"Bearer {KEY}"},
    )
    assert response.status_code == 200, response.text
    rows = response.json()["rows"]
    return {(row["user_id"], row["license_id"], row["course_id"]) for row in rows}


def test_template_shared_by_shape(engine):
    load_history(engine)
    first = report_query(search="ali", page=1)
    second = report_query(search="bob", page=3, per_page=7)
    with live_snapshot(engine) as (_conn, tables):
        acme = page_template(tables, ACME, first)
        assert page_template(tables, GLOBEX, second) is acme
        assert page_template(tables, ACME, report_query(sort="email")) is not acme
        scoped = CompanyAccess(ACME, ACME_HQ)
        assert page_template(tables, scoped, first) is not acme


def test_template_requires_every_value(engine):
    load_history(engine)
    query = report_query(license_id=1)
    parameters = page_parameters(ACME, query)
    del parameters["license_id"]
    with (
        live_snapshot(engine) as (conn, tables),
        pytest.raises(StatementError, match="license_id"),
    ):
        conn.execute(page_template(tables, ACME, query), parameters)


def test_template_rows_follow_each_request(client):
    # The same shape, filled with another company's values, in one process.
    assert keys_of(client, ACME) == ACME_ROWS
    assert keys_of(client, GLOBEX) == GLOBEX_ROWS
    assert keys_of(client, ACME) == ACME_ROWS


def test_template_search_follows_each_request(client):
    alice = keys_of(client, ACME, search="alice")
    bob = keys_of(client, ACME, search="bob")
    assert alice == {key for key in ACME_ROWS if key[0] == ALICE}
    assert bob == {key for key in ACME_ROWS if key[0] == BOB}


def totals_of(client: TestClient, company: int, **params) -> int:
    response = client.get(
        REPORT.format(company=company),
        params=params,
        headers={"Authorization": f"Bearer {KEY}"},
    )
    assert response.status_code == 200, response.text
    return response.json()["total"]


@pytest.mark.parametrize("params", [{}, {"search": "a"}], ids=["kept", "counted"])
def test_count_follows_each_request(client, params):
    acme = totals_of(client, ACME, **params)
    globex = totals_of(client, GLOBEX, **params)
    assert acme == len(keys_of(client, ACME, **params))
    assert globex == len(keys_of(client, GLOBEX, **params))
    assert acme != globex
