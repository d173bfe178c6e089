"""Tenancy matrix: every kind of credential against every company and department.

The history is tests/api_data.py's. The expected rows are derived here from
the history's memberships and department tree, independently of the SQL.
"""

from __future__ import annotations

import base64
import codecs
import csv
import hashlib
import hmac
import io
import time
from collections.abc import Iterator
from dataclasses import dataclass

import jwt
import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from api.app import create_app
from api.auth import COOKIE_NAME
from api.params import RowKey, encode_cursor
from license_report.keys_cli import create_key, revoke_key
from license_report.settings import Settings
from tests.api_data import (
    ACME,
    ACME_HQ,
    ACME_ROWS,
    ALICE,
    BOB,
    CAROL,
    COMPLIANCE,
    EMILE,
    FRANK,
    FUTURE_SKILLS,
    GLOBEX,
    GLOBEX_MAIN,
    GLOBEX_OPS,
    GLOBEX_ROWS,
    GLOBEX_TRAINING,
    GRACE,
    OLD_UNIT,
    RESEARCH,
    SAFETY,
    SALES,
    SALES_EAST,
    UNKNOWN_COMPANY,
    load_history,
)

REPORT = "/v1/companies/{company}/license-allocations"
COMPANIES = [ACME, GLOBEX, UNKNOWN_COMPANY]
UNKNOWN_DEPARTMENT = 999
DEPARTMENT_FILTERS = [
    None,
    ACME_HQ,
    SALES,
    SALES_EAST,
    RESEARCH,
    OLD_UNIT,
    GLOBEX_MAIN,
    GLOBEX_OPS,
    UNKNOWN_DEPARTMENT,
]
ENVIRONMENT_KEY = "environment-key-for-acme-and-globex"
WRONG_KEY = "not-a-key-of-this-service"
PROXY_HEADER = "X-License-Report-Scope"
JWT_SECRET = "a-test-secret-that-is-long-enough-for-hs256"

# Live departments: id -> (company, parent). OLD_UNIT is deleted.
DEPARTMENTS = {
    ACME_HQ: (ACME, None),
    SALES: (ACME, ACME_HQ),
    SALES_EAST: (ACME, SALES),
    RESEARCH: (ACME, ACME_HQ),
    GLOBEX_MAIN: (GLOBEX, None),
    GLOBEX_OPS: (GLOBEX, GLOBEX_MAIN),
}
DEPARTMENT_NAMES = {
    ACME_HQ: "Acme HQ",
    SALES: "Sales",
    SALES_EAST: "Sales East",
    RESEARCH: "Research",
    OLD_UNIT: "Old Unit",
    GLOBEX_MAIN: "Globex Main",
    GLOBEX_OPS: "Globex Ops",
}
# Assigned memberships of the users who have report rows, per company.
MEMBERSHIPS = {
    ACME: {
        ALICE: {SALES_EAST, RESEARCH},
        BOB: {SALES},
        CAROL: {ACME_HQ},
        GRACE: {SALES, OLD_UNIT},
    },
    GLOBEX: {CAROL: {GLOBEX_OPS}, FRANK: {GLOBEX_MAIN}, EMILE: {GLOBEX_MAIN}},
}
ROWS = {ACME: ACME_ROWS, GLOBEX: GLOBEX_ROWS}
LICENSES = {ACME: {SAFETY, COMPLIANCE, FUTURE_SKILLS}, GLOBEX: {GLOBEX_TRAINING}}
EMAILS = {
    ALICE: "alice.able@example.com",
    BOB: "bob.baker@example.com",
    CAROL: "carol.clark@example.com",
    GRACE: "grace_hopper@example.com",
    FRANK: "frank.fox@example.com",
    EMILE: "emile.zola@example.com",
}


@dataclass(frozen=True)
class Scope:
    """What a credential may read: companies (None for all), a department."""

    name: str
    companies: frozenset[int] | None
    department: int | None = None
    valid: bool = True


ALL = Scope("all", None)
ONLY_ACME = Scope("company A", frozenset({ACME}))
ONLY_GLOBEX = Scope("company B", frozenset({GLOBEX}))
SALES_SUBTREE = Scope("department subtree of A", frozenset({ACME}), SALES)
LEAF = Scope("leaf department of A", frozenset({ACME}), SALES_EAST)
BOTH = Scope("environment key for A and B", frozenset({ACME, GLOBEX}))
REVOKED = Scope("revoked", None, valid=False)
WRONG = Scope("wrong", None, valid=False)


def subtree(department: int) -> set[int]:
    """Return the live department and the live departments below it."""
    if department not in DEPARTMENTS:
        return set()
    found = {department}
    changed = True
    while changed:
        changed = False
        for child, (_, parent) in DEPARTMENTS.items():
            if parent in found and child not in found:
                found.add(child)
                changed = True
    return found


def expected_report(
    scope: Scope, company: int, department: int | None
) -> tuple[int, set[tuple[int, int, int]]]:
    """Return the status and rows that the report must give."""
    if not scope.valid:
        return 401, set()
    if scope.companies is not None and company not in scope.companies:
        return 403, set()
    if company not in ROWS:
        return 404, set()
    if department is not None:
        if scope.department is not None and department not in subtree(scope.department):
            return 403, set()
        if DEPARTMENTS.get(department, (None,))[0] != company:
            return 404, set()
    allowed = None
    for limit in (scope.department, department):
        if limit is not None:
            allowed = subtree(limit) if allowed is None else allowed & subtree(limit)
    members = MEMBERSHIPS[company]
    rows = {
        row for row in ROWS[company] if allowed is None or members[row[0]] & allowed
    }
    return 200, rows


def expected_status(scope: Scope, company: int) -> int:
    """Return the status of a selector, which takes no department filter."""
    return expected_report(scope, company, None)[0]


@dataclass
class Tenancy:
    client: TestClient
    keys: dict[Scope, str]


@pytest.fixture
def tenancy(engine: Engine) -> Iterator[Tenancy]:
    load_history(engine)
    keys = {
        ALL: create_key(engine, "all", "all")[0],
        ONLY_ACME: create_key(engine, "acme", "company", ACME)[0],
        ONLY_GLOBEX: create_key(engine, "globex", "company", GLOBEX)[0],
        SALES_SUBTREE: create_key(engine, "sales", "department", ACME, SALES)[0],
        LEAF: create_key(engine, "sales east", "department", ACME, SALES_EAST)[0],
        BOTH: ENVIRONMENT_KEY,
        WRONG: WRONG_KEY,
    }
    revoked, stored = create_key(engine, "revoked", "all")
    revoke_key(engine, stored.id)
    keys[REVOKED] = revoked
    settings = Settings(api_keys=orjson.dumps({ENVIRONMENT_KEY: [ACME, GLOBEX]}))
    with TestClient(create_app(settings, engine)) as client:
        yield Tenancy(client, keys)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def row_keys(body: dict) -> set[tuple[int, int, int]]:
    return {
        (row["user_id"], row["license_id"], row["course_id"]) for row in body["rows"]
    }


def tree_ids(nodes: list[dict]) -> set[int]:
    found = set()
    for node in nodes:
        found.add(node["department_id"])
        found |= tree_ids(node["children"])
    return found


def check_report(response, scope: Scope, company: int, department: int | None):
    case = f"{scope.name}, company {company}, department_id {department}"
    status, rows = expected_report(scope, company, department)
    assert response.status_code == status, f"{case}: {response.text}"
    if status == 401:
        assert response.headers["www-authenticate"].startswith("Bearer"), case
        return
    if status != 200:
        assert response.json()["detail"][0]["message"], case
        return
    body = response.json()
    assert row_keys(body) == rows, case
    assert body["total"] == len(rows), case
    if scope.department is not None:
        names = {DEPARTMENT_NAMES[d] for d in subtree(scope.department)}
        for row in body["rows"]:
            assert set(row["departments"]) <= names, f"{case}: {row}"


def test_report_matrix(tenancy):
    for scope, key in tenancy.keys.items():
        for company in COMPANIES:
            for department in DEPARTMENT_FILTERS:
                params = {"per_page": 1000}
                if department is not None:
                    params["department_id"] = department
                response = tenancy.client.get(
                    REPORT.format(company=company), params=params, headers=bearer(key)
                )
                check_report(response, scope, company, department)


def test_report_matrix_with_suspended_users(tenancy):
    # The suspended user Dan is a member of Research, outside both department
    # scopes, so including suspended users adds no row to them.
    for scope in (SALES_SUBTREE, LEAF):
        response = tenancy.client.get(
            REPORT.format(company=ACME),
            params={"per_page": 1000, "include_suspended": "true"},
            headers=bearer(tenancy.keys[scope]),
        )
        assert response.status_code == 200
        assert row_keys(response.json()) == expected_report(scope, ACME, None)[1]


def test_report_sorted_by_department_in_scope(tenancy):
    response = tenancy.client.get(
        REPORT.format(company=ACME),
        params={"per_page": 1000, "sort": "department"},
        headers=bearer(tenancy.keys[SALES_SUBTREE]),
    )
    assert response.status_code == 200
    assert row_keys(response.json()) == expected_report(SALES_SUBTREE, ACME, None)[1]


def test_pages_stay_in_scope(tenancy):
    _, rows = expected_report(SALES_SUBTREE, ACME, None)
    seen = set()
    for page in range(1, len(rows) + 2):
        response = tenancy.client.get(
            REPORT.format(company=ACME),
            params={"per_page": 1, "page": page},
            headers=bearer(tenancy.keys[SALES_SUBTREE]),
        )
        assert response.status_code == 200
        body = response.json()
        assert body["total"] == len(rows)
        seen |= row_keys(body)
    assert seen == rows


def test_point_in_time_report_stays_in_scope(tenancy):
    for scope in (ALL, SALES_SUBTREE, LEAF):
        for department in (None, SALES, RESEARCH):
            params = {"per_page": 1000, "as_of": "2030-01-01T00:00:00Z"}
            if department is not None:
                params["department_id"] = department
            response = tenancy.client.get(
                REPORT.format(company=ACME),
                params=params,
                headers=bearer(tenancy.keys[scope]),
            )
            check_report(response, scope, ACME, department)


def test_licenses_matrix(tenancy):
    for scope, key in tenancy.keys.items():
        for company in COMPANIES:
            case = f"{scope.name}, company {company}"
            path = f"/v1/companies/{company}/licenses"
            response = tenancy.client.get(path, headers=bearer(key))
            status = expected_status(scope, company)
            assert response.status_code == status, f"{case}: {response.text}"
            if status == 200:
                found = {item["license_id"] for item in response.json()["licenses"]}
                assert found == LICENSES[company], case


def test_courses_matrix(tenancy):
    for scope, key in tenancy.keys.items():
        for company in COMPANIES:
            case = f"{scope.name}, company {company}"
            path = f"/v1/companies/{company}/courses"
            response = tenancy.client.get(path, headers=bearer(key))
            status, rows = expected_report(scope, company, None)
            assert response.status_code == status, f"{case}: {response.text}"
            if status == 200:
                found = {item["course_id"] for item in response.json()["courses"]}
                assert found == {course for _, _, course in rows}, case


def test_departments_matrix(tenancy):
    for scope, key in tenancy.keys.items():
        for company in COMPANIES:
            case = f"{scope.name}, company {company}"
            path = f"/v1/companies/{company}/departments"
            response = tenancy.client.get(path, headers=bearer(key))
            status = expected_status(scope, company)
            assert response.status_code == status, f"{case}: {response.text}"
            if status != 200:
                continue
            tree = response.json()["departments"]
            live = {d for d, (owner, _) in DEPARTMENTS.items() if owner == company}
            if scope.department is not None:
                live &= subtree(scope.department)
                assert [node["department_id"] for node in tree] == [scope.department], (
                    case
                )
            assert tree_ids(tree) == live, case


def csv_emails(response) -> set[str]:
    text = codecs.decode(response.content, "utf-8-sig")
    reader = csv.DictReader(io.StringIO(text))
    return {row["Email"] for row in reader}


def test_csv_download_matrix(tenancy):
    for scope, key in tenancy.keys.items():
        for company in COMPANIES:
            for department in (None, SALES, RESEARCH, GLOBEX_MAIN):
                case = f"{scope.name}, company {company}, department_id {department}"
                params = {"format": "csv"}
                if department is not None:
                    params["department_id"] = department
                response = tenancy.client.get(
                    REPORT.format(company=company), params=params, headers=bearer(key)
                )
                status, rows = expected_report(scope, company, department)
                assert response.status_code == status, f"{case}: {response.text}"
                if status == 200:
                    expected = {EMAILS[user] for user, _, _ in rows}
                    assert csv_emails(response) == expected, case


def test_csv_departments_match_json(tenancy):
    """A download lists the departments that the JSON report shows, in each scope."""
    for scope, key in tenancy.keys.items():
        for company in COMPANIES:
            case = f"{scope.name}, company {company}"
            path = REPORT.format(company=company)
            report = tenancy.client.get(
                path, params={"per_page": 1000}, headers=bearer(key)
            )
            if report.status_code != 200:
                continue
            download = tenancy.client.get(
                path, params={"format": "csv"}, headers=bearer(key)
            )
            assert download.status_code == 200, f"{case}: {download.text}"
            expected = [
                (row["email"], "; ".join(row["departments"]))
                for row in report.json()["rows"]
            ]
            text = codecs.decode(download.content, "utf-8-sig")
            reader = csv.DictReader(io.StringIO(text))
            actual = [(row["Email"], row["Department"]) for row in reader]
            assert actual == expected, case


def test_cookie_credential(tenancy):
    for scope in (ALL, ONLY_ACME, SALES_SUBTREE, LEAF, REVOKED, WRONG):
        for company in COMPANIES:
            for department in (None, SALES, RESEARCH):
                params = {"per_page": 1000}
                if department is not None:
                    params["department_id"] = department
                tenancy.client.cookies.set(COOKIE_NAME, tenancy.keys[scope])
                try:
                    response = tenancy.client.get(
                        REPORT.format(company=company), params=params
                    )
                finally:
                    tenancy.client.cookies.clear()
                check_report(response, scope, company, department)


def test_bearer_header_wins_over_cookie(tenancy):
    tenancy.client.cookies.set(COOKIE_NAME, tenancy.keys[ALL])
    try:
        response = tenancy.client.get(
            REPORT.format(company=ACME), headers=bearer(WRONG_KEY)
        )
    finally:
        tenancy.client.cookies.clear()
    assert response.status_code == 401


def test_other_authorization_scheme_rejected(tenancy):
    response = tenancy.client.get(
        REPORT.format(company=ACME), headers={"Authorization": "Basic dXNlcjpwYXNz"}
    )
    assert response.status_code == 401
    assert "Bearer" in response.json()["detail"][0]["message"]


def test_missing_credential_rejected(tenancy):
    response = tenancy.client.get(REPORT.format(company=ACME))
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"


def proxy_client(engine: Engine, address: str) -> TestClient:
    settings = Settings(
        trusted_proxy_header=PROXY_HEADER, trusted_proxies="127.0.0.1,10.9.0.0/16"
    )
    return TestClient(create_app(settings, engine), client=(address, 50000))


PROXY_SCOPES = {
    "all": ALL,
    "company=1": ONLY_ACME,
    "company=2": ONLY_GLOBEX,
    "company=1;department=11": SALES_SUBTREE,
    " company = 1 ; department = 12 ": LEAF,
}


def test_proxy_header_from_trusted_proxy(engine):
    load_history(engine)
    for address in ("127.0.0.1", "10.9.3.4"):
        with proxy_client(engine, address) as client:
            for value, scope in PROXY_SCOPES.items():
                for company in COMPANIES:
                    for department in (None, SALES, SALES_EAST, RESEARCH):
                        params = {"per_page": 1000}
                        if department is not None:
                            params["department_id"] = department
                        response = client.get(
                            REPORT.format(company=company),
                            params=params,
                            headers={PROXY_HEADER: value},
                        )
                        check_report(response, scope, company, department)


def test_proxy_header_from_untrusted_address(engine, caplog):
    load_history(engine)
    with proxy_client(engine, "10.10.0.1") as client:
        responses = [
            client.get(REPORT.format(company=ACME), headers={PROXY_HEADER: "all"})
            for _ in range(3)
        ]
    warnings = [r for r in caplog.records if "untrusted address" in r.getMessage()]

    assert [response.status_code for response in responses] == [401] * 3
    assert len(warnings) == 1
    assert "10.10.0.1" in warnings[0].getMessage()


@pytest.mark.parametrize(
    "value",
    ["", "everything", "company=", "company=abc", "department=11", "company=1;x=2"],
)
def test_proxy_header_invalid_value(engine, value):
    load_history(engine)
    with proxy_client(engine, "127.0.0.1") as client:
        response = client.get(
            REPORT.format(company=ACME), headers={PROXY_HEADER: value}
        )
    assert response.status_code == 401
    assert PROXY_HEADER in response.json()["detail"][0]["message"]


def test_proxy_header_ignored_when_not_configured(tenancy):
    response = tenancy.client.get(
        REPORT.format(company=ACME), headers={PROXY_HEADER: "all"}
    )
    assert response.status_code == 401


def hs256_client(engine: Engine) -> TestClient:
    settings = Settings(jwt_key=JWT_SECRET, jwt_audience="license-report")
    return TestClient(create_app(settings, engine))


def hs256_token(**claims) -> str:
    claims.setdefault("exp", int(time.time()) + 300)
    claims.setdefault("aud", "license-report")
    return jwt.encode(claims, JWT_SECRET, algorithm="HS256")


JWT_SCOPES = {
    ALL: {"scope": "all"},
    ONLY_ACME: {"scope": "company", "company_id": ACME},
    ONLY_GLOBEX: {"scope": "company", "company_id": GLOBEX},
    SALES_SUBTREE: {"scope": "department", "company_id": ACME, "department_id": SALES},
    LEAF: {"scope": "department", "company_id": ACME, "department_id": SALES_EAST},
}


def test_jwt_scopes(engine):
    load_history(engine)
    with hs256_client(engine) as client:
        for scope, claims in JWT_SCOPES.items():
            token = hs256_token(sub="user-7", **claims)
            for company in COMPANIES:
                for department in (None, SALES, RESEARCH):
                    params = {"per_page": 1000}
                    if department is not None:
                        params["department_id"] = department
                    response = client.get(
                        REPORT.format(company=company),
                        params=params,
                        headers=bearer(token),
                    )
                    check_report(response, scope, company, department)


@pytest.mark.parametrize(
    "claims",
    [
        {"scope": "all", "exp": int(time.time()) - 10},
        {"scope": "all", "aud": "another-service"},
        {"scope": "company"},
        {"scope": "department", "company_id": ACME},
        {"scope": "company", "company_id": "1"},
        {"scope": "everything"},
    ],
)
def test_jwt_invalid_claims(engine, claims):
    load_history(engine)
    with hs256_client(engine) as client:
        response = client.get(
            REPORT.format(company=ACME), headers=bearer(hs256_token(**claims))
        )
    assert response.status_code == 401


def test_jwt_without_exp_rejected(engine):
    load_history(engine)
    token = jwt.encode(
        {"scope": "all", "aud": "license-report"}, JWT_SECRET, algorithm="HS256"
    )
    with hs256_client(engine) as client:
        response = client.get(REPORT.format(company=ACME), headers=bearer(token))
    assert response.status_code == 401


def test_jwt_with_other_secret_rejected(engine):
    load_history(engine)
    token = jwt.encode(
        {"scope": "all", "aud": "license-report", "exp": int(time.time()) + 60},
        "another-secret-of-sufficient-length-here",
        algorithm="HS256",
    )
    with hs256_client(engine) as client:
        response = client.get(REPORT.format(company=ACME), headers=bearer(token))
    assert response.status_code == 401


def test_jwt_rs256(engine):
    load_history(engine)
    private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_pem = private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    settings = Settings(jwt_key=public_pem.decode(), jwt_algorithm="RS256")
    claims = {**JWT_SCOPES[LEAF], "exp": int(time.time()) + 60}
    token = jwt.encode(claims, private_key, algorithm="RS256")
    # The algorithm confusion attack: HS256 with the public key as the secret.
    forged = hs256_signed({**JWT_SCOPES[ALL], "exp": claims["exp"]}, public_pem)
    with TestClient(create_app(settings, engine)) as client:
        response = client.get(
            REPORT.format(company=ACME),
            params={"per_page": 1000},
            headers=bearer(token),
        )
        check_report(response, LEAF, ACME, None)
        response = client.get(REPORT.format(company=GLOBEX), headers=bearer(token))
        assert response.status_code == 403
        response = client.get(REPORT.format(company=ACME), headers=bearer(forged))
        assert response.status_code == 401


def hs256_signed(claims: dict, secret: bytes) -> str:
    """Sign a JWT by hand, because PyJWT refuses a PEM key as an HMAC secret."""

    def encode(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    header = encode(orjson.dumps({"alg": "HS256", "typ": "JWT"}))
    payload = encode(orjson.dumps(claims))
    signing_input = f"{header}.{payload}".encode()
    signature = hmac.new(secret, signing_input, hashlib.sha256).digest()
    return f"{header}.{payload}.{encode(signature)}"


def test_cursor_pages_stay_in_scope(tenancy):
    _, rows = expected_report(SALES_SUBTREE, ACME, None)
    params = {"per_page": 1, "sort": "department", "order": "desc"}
    headers = bearer(tenancy.keys[SALES_SUBTREE])
    everything = tenancy.client.get(
        REPORT.format(company=ACME), params=dict(params, per_page=1000), headers=headers
    ).json()["rows"]
    seen = []
    cursor = None
    for _ in range(len(rows) + 1):
        page_params = dict(params) if cursor is None else dict(params, cursor=cursor)
        response = tenancy.client.get(
            REPORT.format(company=ACME), params=page_params, headers=headers
        )
        assert response.status_code == 200
        body = response.json()
        seen.extend(row_keys(body))
        cursor = body["next_cursor"]
        if cursor is None:
            break
    ordered = [(r["user_id"], r["license_id"], r["course_id"]) for r in everything]
    assert seen == ordered
    assert set(seen) == rows


def test_cursor_outside_scope_rejected(tenancy):
    """A cursor of a row the credential cannot read would tell where it sorts."""
    _, visible = expected_report(SALES_SUBTREE, ACME, None)
    _, everything = expected_report(ALL, ACME, None)
    hidden = sorted(everything - visible)[0]
    response = tenancy.client.get(
        REPORT.format(company=ACME),
        params={"cursor": encode_cursor(RowKey(*hidden))},
        headers=bearer(tenancy.keys[SALES_SUBTREE]),
    )
    assert response.status_code == 422
    assert response.json()["detail"][0]["parameter"] == "cursor"
