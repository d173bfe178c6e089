"""HTTP hardening: security headers, size limits, rate limits, CORS, OpenAPI."""

from __future__ import annotations

import orjson
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, text

from api.app import create_app
from api.errors import ApiError
from api.security import (
    CONTENT_SECURITY_POLICY,
    MAX_BODY_BYTES,
    MAX_URL_BYTES,
    RateLimiter,
)
from license_report.settings import Settings
from tests.api_data import ACME, load_history

KEY = "security-test-key"
OTHER_KEY = "security-test-other-key"
REPORT = f"/v1/companies/{ACME}/license-allocations"
AUTHORIZED = {"Authorization": f"Bearer {KEY}"}
EXPECTED_HEADERS = {
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    "content-security-policy": CONTENT_SECURITY_POLICY,
    "cache-control": "no-store",
}


def settings(**values) -> Settings:
    keys = orjson.dumps({KEY: "*", OTHER_KEY: "*"}).decode()
    return Settings(api_keys=keys, **values)


@pytest.fixture
def client(engine: Engine):
    load_history(engine)
    with TestClient(create_app(settings(), engine)) as test_client:
        yield test_client


def assert_security_headers(response) -> None:
    for name, value in EXPECTED_HEADERS.items():
        assert response.headers.get(name) == value, (name, response.status_code)


def test_csp_allows_self_hosted_only():
    assert CONTENT_SECURITY_POLICY == (
        "default-src 'self'; script-src 'self'; style-src 'self'; "
        "img-src 'self' data:; frame-ancestors 'none'; form-action 'self'; "
        "base-uri 'none'"
    )


@pytest.mark.parametrize(
    ("method", "path", "headers", "status"),
    [
        ("GET", REPORT, AUTHORIZED, 200),
        ("GET", f"/v1/companies/{ACME}/licenses", AUTHORIZED, 200),
        ("GET", f"/v1/companies/{ACME}/courses", AUTHORIZED, 200),
        ("GET", f"/v1/companies/{ACME}/departments", AUTHORIZED, 200),
        ("GET", REPORT, {}, 401),
        ("GET", "/v1/companies/99/license-allocations", AUTHORIZED, 404),
        ("GET", REPORT + "?per_page=0", AUTHORIZED, 422),
        ("GET", "/no/such/path", {}, 404),
        ("POST", REPORT, AUTHORIZED, 405),
        ("GET", "/healthz", {}, 200),
        ("GET", "/openapi.json", {}, 200),
    ],
)
def test_security_headers(client, method, path, headers, status):
    response = client.request(method, path, headers=headers)

    assert response.status_code == status
    assert_security_headers(response)


def test_security_headers_on_server_error(engine):
    load_history(engine)
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE license_events_v1"))
    app = create_app(settings(), engine)
    with TestClient(app, raise_server_exceptions=False) as test_client:
        response = test_client.get(REPORT, headers=AUTHORIZED)

    assert response.status_code == 500
    assert_security_headers(response)
    assert response.json()["detail"][0]["message"].startswith("internal server error")
    assert "Traceback" not in response.text


def test_body_over_limit_rejected(client):
    response = client.post(
        REPORT, headers=AUTHORIZED, content=b"x" * (MAX_BODY_BYTES + 1)
    )

    assert response.status_code == 413
    assert "16384 bytes" in response.json()["detail"][0]["message"]
    assert_security_headers(response)


def test_chunked_body_over_limit_rejected(client):
    def chunks():
        for _ in range(5):
            yield b"x" * 4096

    response = client.post(REPORT, headers=AUTHORIZED, content=chunks())

    assert response.status_code == 413


def test_body_at_limit_reaches_application(client):
    response = client.post(REPORT, headers=AUTHORIZED, content=b"x" * MAX_BODY_BYTES)

    # The report accepts no POST, so the router's 405 shows the body passed.
    assert response.status_code == 405


def test_long_url_rejected(client):
    padding = "x" * (MAX_URL_BYTES - len(REPORT) - len("?pad=") + 1)
    response = client.get(f"{REPORT}?pad={padding}", headers=AUTHORIZED)

    assert response.status_code == 414
    assert "8192 bytes" in response.json()["detail"][0]["message"]
    assert_security_headers(response)


def test_url_at_limit_accepted(client):
    padding = "x" * (MAX_URL_BYTES - len(REPORT) - len("?pad="))
    response = client.get(f"{REPORT}?pad={padding}", headers=AUTHORIZED)

    assert response.status_code == 200


def test_rate_limit_per_key(engine):
    load_history(engine)
    app = create_app(settings(rate_limit_per_minute=3), engine)
    with TestClient(app) as test_client:
        allowed = [test_client.get(REPORT, headers=AUTHORIZED) for _ in range(3)]
        limited = test_client.get(REPORT, headers=AUTHORIZED)
        other = test_client.get(
            REPORT, headers={"Authorization": f"Bearer {OTHER_KEY}"}
        )
        unauthenticated = [test_client.get(REPORT) for _ in range(5)]

    assert [response.status_code for response in allowed] == [200, 200, 200]
    assert limited.status_code == 429
    assert int(limited.headers["retry-after"]) >= 1
    assert "3 requests per minute" in limited.json()["detail"][0]["message"]
    assert_security_headers(limited)
    assert other.status_code == 200
    assert [response.status_code for response in unauthenticated] == [401] * 5


def test_rate_limit_off(engine):
    load_history(engine)
    app = create_app(settings(rate_limit_per_minute=0), engine)
    with TestClient(app) as test_client:
        statuses = {
            test_client.get(REPORT, headers=AUTHORIZED).status_code for _ in range(20)
        }

    assert statuses == {200}


def test_rate_limiter_refills():
    now = [1000.0]
    limiter = RateLimiter(60, clock=lambda: now[0])

    burst = [limiter.acquire("key:1") for _ in range(60)]
    empty = limiter.acquire("key:1")
    now[0] += 1.0
    refilled = limiter.acquire("key:1")
    after = limiter.acquire("key:1")

    assert burst == [0.0] * 60
    assert empty == pytest.approx(1.0)
    assert refilled == 0.0
    assert after > 0
    with pytest.raises(ApiError) as raised:
        limiter.check("key:1")
    assert raised.value.status_code == 429
    assert raised.value.headers["Retry-After"] == "1"


def test_rate_limiter_drops_full_buckets():
    now = [0.0]
    limiter = RateLimiter(1, clock=lambda: now[0])
    for number in range(RateLimiter.MAX_BUCKETS + 1):
        limiter.acquire(f"key:{number}")
    now[0] += 120.0
    limiter.acquire("key:late")

    assert len(limiter._buckets) <= 2


def test_cors_off_by_default(client):
    origin = {"Origin": "https://elsewhere.example"}
    simple = client.get(REPORT, headers={**AUTHORIZED, **origin})
    preflight = client.options(
        REPORT,
        headers={
            **origin,
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "authorization",
        },
    )

    assert simple.status_code == 200
    assert "access-control-allow-origin" not in simple.headers
    assert preflight.status_code == 405
    assert "access-control-allow-origin" not in preflight.headers


def test_cors_allows_configured_origin(engine):
    load_history(engine)
    app = create_app(settings(cors_origins="https://reports.example"), engine)
    with TestClient(app) as test_client:
        allowed = test_client.get(
            REPORT, headers={**AUTHORIZED, "Origin": "https://reports.example"}
        )
        other = test_client.get(
            REPORT, headers={**AUTHORIZED, "Origin": "https://elsewhere.example"}
        )
        preflight = test_client.options(
            REPORT,
            headers={
                "Origin": "https://reports.example",
                "Access-Control-Request-Method": "GET",
                "Access-Control-Request-Headers": "authorization",
            },
        )

    assert allowed.headers["access-control-allow-origin"] == "https://reports.example"
    assert "access-control-allow-origin" not in other.headers
    assert preflight.status_code == 200
    assert_security_headers(preflight)


def test_openapi_is_public_and_holds_no_secret(client):
    response = client.get("/openapi.json")
    document = response.json()
    operation = document["paths"]["/v1/companies/{company_id}/license-allocations"]
    responses = operation["get"]["responses"]

    assert response.status_code == 200
    assert KEY not in response.text
    assert OTHER_KEY not in response.text
    assert set(document["components"]["securitySchemes"]) == {
        "HTTPBearer",
        "APIKeyCookie",
    }
    assert {"401", "403", "404", "413", "414", "422", "429"} <= set(responses)
    assert responses["422"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ErrorBody"
    }
    assert "HTTPValidationError" not in document["components"]["schemas"]
