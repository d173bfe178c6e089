"""Liveness, readiness and metrics endpoints of the API."""

from __future__ import annotations

from fastapi.testclient import TestClient
from sqlalchemy import text

from api.app import create_app
from license_report.settings import Settings
from projections.sql import make_engine


def _client(url: str) -> TestClient:
    return TestClient(create_app(Settings(database_url=url, api_keys='{"k": "*"}')))


def test_healthz_needs_no_key(database_url):
    with _client(database_url) as client:
        response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_readyz_ready_on_current_schema(database_url):
    with _client(database_url) as client:
        response = client.get("/readyz")
    assert response.status_code == 200
    assert response.json()["status"] == "ready"


def test_readyz_unavailable_on_old_schema(database_url):
    with _client(database_url) as client:
        engine = make_engine(database_url)
        with engine.begin() as conn:
            conn.execute(text("UPDATE alembic_version SET version_num = '0001'"))
        engine.dispose()
        response = client.get("/readyz")
    assert response.status_code == 503
    assert "license-report migrate" in response.json()["reason"]


def test_metrics_count_requests_by_route(database_url):
    with _client(database_url) as client:
        client.get("/v1/companies/5/license-allocations")
        body = client.get("/metrics").text
    assert 'route="/v1/companies/{company_id}/license-allocations"' in body
    assert 'status="401"' in body


def test_api_connections_without_jit(postgres_url):
    from api.app import create_app
    from license_report.settings import Settings

    app = create_app(Settings(database_url=postgres_url))
    engine = app.state.engine
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SHOW jit").scalar() == "off"
    finally:
        engine.dispose()
