"""The HTML report page and its login, in-process on SQLite and PostgreSQL.

The page must show the rows of the JSON report for the same query string, so
most checks compare the two.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from html.parser import HTMLParser
from urllib.parse import parse_qs, urlsplit

import orjson
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from api.app import create_app
from license_report.settings import Settings
from tests.api_data import (
    ACME,
    ALICE,
    COMPLIANCE,
    ETHICS,
    FIRE_SAFETY,
    FIRST_AID,
    FUTURE_SKILLS,
    GLOBEX,
    SAFETY,
    SALES,
    SALES_EAST,
    UNKNOWN_COURSE,
    build_history,
    load_history,
)

KEY = "page-test-key"
ACME_KEY = "page-acme-key"
PAGE = "/companies/{company}/license-allocations"
REPORT = "/v1/companies/{company}/license-allocations"
COMPLETION = (
    "https://lms.example/report/completion/index.php?course={course_id}&user={user_id}"
)
ROW = re.compile(
    r'<tr data-user-id="(\d+)" data-license-id="(\d+)" data-course-id="(\d+)">'
)
# A user with four allocations of one license, to fold the older dates.
FREQUENT = 310
SCRIPT_NAME = "<script>alert(1)</script>"


def _settings(**overrides) -> Settings:
    keys = {KEY: "*", ACME_KEY: [ACME]}
    return Settings(
        api_keys=orjson.dumps(keys).decode(), rate_limit_per_minute=0, **overrides
    )


def _history():
    history = build_history()
    history.user(FREQUENT, SCRIPT_NAME, "Often", "often@example.com")
    history.member(FREQUENT, ACME, SALES)
    for month in range(1, 5):
        day = f"2024-0{month}-15T08:00:00Z"
        history.allocate(FREQUENT, SAFETY, FIRST_AID, day)
        history.unallocate(FREQUENT, SAFETY, FIRST_AID, f"2024-0{month}-20T08:00:00Z")
    return history


@pytest.fixture
def app_engine(engine: Engine) -> Engine:
    load_history(engine, _history())
    return engine


@pytest.fixture
def client(app_engine: Engine) -> Iterator[TestClient]:
    app = create_app(_settings(completion_url_template=COMPLETION), app_engine)
    with TestClient(app) as test_client:
        test_client.cookies.set("license_report_key", KEY)
        yield test_client


@pytest.fixture
def anonymous(app_engine: Engine) -> Iterator[TestClient]:
    with TestClient(create_app(_settings(), app_engine)) as test_client:
        yield test_client


def page(client: TestClient, company: int = ACME, **params):
    return client.get(PAGE.format(company=company), params=params)


def shown_keys(html: str) -> list[tuple[int, int, int]]:
    return [tuple(int(part) for part in match) for match in ROW.findall(html)]


def api_keys(client: TestClient, company: int = ACME, **params) -> list[tuple]:
    response = client.get(
        REPORT.format(company=company),
        params=params,
        headers={"Authorization": f"Bearer {KEY}"},
    )
    assert response.status_code == 200, response.text
    rows = response.json()["rows"]
    return [(row["user_id"], row["license_id"], row["course_id"]) for row in rows]


def options_of(html: str, name: str) -> list[tuple[str, str, bool]]:
    """Return (value, label, selected) of the options of the select ``name``."""
    match = re.search(
        rf'<select id="field-{name}" name="{name}".*?</select>', html, re.S
    )
    assert match, f"no select named {name}"
    found = re.findall(
        r'<option value="([^"]*)"( selected)?>([^<]*)</option>', match.group(0)
    )
    return [(value, label, bool(selected)) for value, selected, label in found]


def row_html(html: str, key: tuple[int, int, int]) -> str:
    start = html.index(
        f'<tr data-user-id="{key[0]}" data-license-id="{key[1]}" '
        f'data-course-id="{key[2]}">'
    )
    return html[start : html.index("</tr>", start)]


def cells(row: str) -> list[str]:
    return re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", row, re.S)


class FormControls(HTMLParser):
    """Collect the visible form controls' ids and the labels' ``for`` values."""

    def __init__(self) -> None:
        super().__init__()
        self.controls: list[str] = []
        self.labels: set[str] = set()

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        visible = attributes.get("type") != "hidden"
        if tag in ("input", "select", "textarea") and visible:
            self.controls.append(attributes.get("id") or "")
        if tag == "label" and attributes.get("for"):
            self.labels.add(attributes["for"])


# Rows against the JSON report.


@pytest.mark.parametrize(
    "params",
    [
        pytest.param({}, id="default"),
        pytest.param({"license_id": str(SAFETY)}, id="license"),
        pytest.param({"course_id": str(ETHICS)}, id="course"),
        pytest.param({"department_id": str(SALES)}, id="department"),
        pytest.param({"first_initial": "a"}, id="first-initial"),
        pytest.param({"last_initial": "C"}, id="last-initial"),
        pytest.param({"search": "ob"}, id="search"),
        pytest.param({"firstname": "car"}, id="firstname"),
        pytest.param({"lastname": "BAK"}, id="lastname"),
        pytest.param({"email": "hopper"}, id="email"),
        pytest.param({"allocated": "false"}, id="allocated"),
        pytest.param(
            {"allocated_from": "2024-02-01", "allocated_to": "2024-03-31"},
            id="allocated-range",
        ),
        pytest.param(
            {"unallocated_from": "2024-02-01", "unallocated_to": "2024-02-28"},
            id="unallocated-range",
        ),
        pytest.param({"include_suspended": "true"}, id="suspended"),
        pytest.param({"sort": "email", "order": "desc"}, id="sort"),
        pytest.param({"per_page": "2", "page": "2"}, id="page"),
        pytest.param({"as_of": "2024-02-22T00:00:00Z"}, id="as-of"),
    ],
)
def test_page_rows_equal_api(client, params):
    response = page(client, **params)
    assert response.status_code == 200, response.text
    assert shown_keys(response.text) == api_keys(client, **params)


def test_page_ignores_empty_fields(client):
    response = page(client, license_id="", course_id="", search="", allocated="")
    assert response.status_code == 200
    assert shown_keys(response.text) == api_keys(client)


def test_page_row_cells(client):
    html = page(client).text
    row = cells(row_html(html, (ALICE, SAFETY, FIRE_SAFETY)))
    assert row[0] == "Alice"
    assert row[1] == "Able"
    assert "<li>Research</li><li>Sales East</li>" in row[2]
    assert row[4] == "Safety 101"
    assert row[5] == "Fire Safety"
    assert row[6] == "Yes"
    assert '<time datetime="2024-03-05T12:00:00Z">2024-03-05 12:00</time>' in row[7]
    assert row[9] == "2"
    assert row[10] == "1"


def test_page_unknown_course_named(client):
    html = page(client).text
    row = cells(row_html(html, (101, SAFETY, UNKNOWN_COURSE)))
    assert f"Unknown course {UNKNOWN_COURSE}" in row[5]


def test_page_non_reusable_cells_blank(client):
    html = page(client).text
    row = cells(row_html(html, (ALICE, COMPLIANCE, ETHICS)))
    assert "2024-01-15 08:00" in row[7]
    assert row[8].strip() == ""
    assert row[9] == ""
    assert row[10] == ""


def test_page_folds_older_dates(client):
    html = page(client).text
    row = cells(row_html(html, (FREQUENT, SAFETY, FIRST_AID)))
    visible, folded = row[7].split("<details>")
    assert "2024-04-15 08:00" in visible
    assert "2024-03-15 08:00" in visible
    assert "2024-02-15" not in visible
    assert "<summary>2 earlier</summary>" in folded
    assert "2024-01-15 08:00" in folded


def test_page_shows_dates_in_zone(client):
    html = page(client, tz="America/New_York").text
    row = cells(row_html(html, (101, SAFETY, FIRE_SAFETY)))
    assert '<time datetime="2024-03-10T03:30:00Z">2024-03-09 22:30</time>' in row[7]


def test_page_escapes_names(client):
    html = page(client).text
    assert SCRIPT_NAME not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html


def test_page_freshness_line(client):
    html = page(client).text
    match = re.search(r'<p class="freshness">([^<]*)</p>', html)
    assert match
    assert match.group(1).startswith("Data includes events up to ")
    assert "last updated" in match.group(1)


# Selectors.


def test_license_options_mark_dates(client):
    options = options_of(page(client).text, "license_id")
    labels = {value: label for value, label, _ in options}
    assert options[0] == ("", "All licenses", True)
    assert labels[str(COMPLIANCE)] == "Compliance (expired 2020-06-30)"
    assert labels[str(FUTURE_SKILLS)] == "Future Skills (valid from 2999-01-01)"
    assert labels[str(SAFETY)] == "Safety 101"


def test_license_option_selected(client):
    options = options_of(page(client, license_id=SAFETY).text, "license_id")
    selected = [value for value, _, chosen in options if chosen]
    assert selected == [str(SAFETY)]


def test_course_options_narrowed_by_license(client):
    everything = options_of(page(client).text, "course_id")
    narrowed = options_of(page(client, license_id=COMPLIANCE).text, "course_id")
    assert [label for _, label, _ in narrowed] == ["All courses", "Ethics", "First Aid"]
    assert len(everything) > len(narrowed)


def test_department_options_indented(client):
    options = options_of(page(client).text, "department_id")
    labels = {value: label for value, label, _ in options}
    indent = "\u00a0\u00a0\u00a0"
    assert options[0][1] == "All departments"
    assert labels["10"] == "Acme HQ"
    assert labels[str(SALES)] == indent + "Sales"
    assert labels[str(SALES_EAST)] == indent * 2 + "Sales East"
    order = [value for value, _, _ in options]
    assert order.index(str(SALES)) < order.index(str(SALES_EAST))


def test_department_filter_includes_subdepartments(client):
    keys = shown_keys(page(client, department_id=SALES).text)
    assert (ALICE, SAFETY, FIRE_SAFETY) in keys


# Initials, sorting and paging.


def test_initial_bars(client):
    html = page(client, last_initial="C", search="a").text
    nav = re.search(
        r'<nav class="initials" aria-label="Last name">.*?</nav>', html, re.S
    )
    assert nav
    links = re.findall(r'<a href="([^"]*)"( aria-current="true")?>([^<]*)</a>', nav[0])
    texts = [text for _, _, text in links]
    assert texts == ["All", *"ABCDEFGHIJKLMNOPQRSTUVWXYZ"]
    current = [text for _, marked, text in links if marked]
    assert current == ["C"]
    all_href = links[0][0].replace("&amp;", "&")
    assert parse_qs(urlsplit(all_href).query) == {"search": ["a"]}
    b_href = links[2][0].replace("&amp;", "&")
    assert parse_qs(urlsplit(b_href).query) == {"last_initial": ["B"], "search": ["a"]}
    assert '<nav class="initials" aria-label="First name">' in html


def test_sort_headers(client):
    html = page(client, sort="email").text
    headers = re.findall(
        r'<th scope="col" class="col-(\w+)"( aria-sort="(\w+)")?>', html
    )
    sorted_columns = [(key, value) for key, _, value in headers if value]
    assert sorted_columns == [("email", "ascending")]
    assert len(headers) == 11
    email_link = re.search(
        r'class="col-email" aria-sort="ascending">\s*<a href="([^"]*)"', html
    )
    assert email_link
    query = parse_qs(urlsplit(email_link.group(1).replace("&amp;", "&")).query)
    assert query == {"sort": ["email"], "order": ["desc"]}


def test_sort_descending_marked(client):
    html = page(client, sort="lastname", order="desc").text
    assert 'class="col-lastname" aria-sort="descending"' in html


def test_pagination_links(client):
    html = page(client, per_page=2, page=2).text
    nav = re.search(r'<nav class="pagination" aria-label="Pages">.*?</nav>', html, re.S)
    assert nav
    assert 'rel="prev"' in nav[0]
    assert 'rel="next"' in nav[0]
    assert 'aria-current="page"><span class="visually-hidden">Page </span>2<' in nav[0]
    total = len(api_keys(client, per_page=1000))
    assert f"Rows 3–4 of {total}" in html


def test_page_past_last_page(client):
    html = page(client, page=99).text
    assert shown_keys(html) == []
    assert "is past the last page" in html


def test_download_links_carry_filters(client):
    html = page(client, license_id=SAFETY, sort="email", page=2, per_page=2).text
    links = re.findall(r'<a href="([^"]*)" download>(CSV|XLSX)</a>', html)
    assert [text for _, text in links] == ["CSV", "XLSX"]
    for href, text in links:
        parts = urlsplit(href.replace("&amp;", "&"))
        assert parts.path == REPORT.format(company=ACME)
        assert parse_qs(parts.query) == {
            "license_id": [str(SAFETY)],
            "sort": ["email"],
            "format": [text.lower()],
        }


def test_completion_links(client):
    html = page(client).text
    row = row_html(html, (ALICE, SAFETY, FIRE_SAFETY))
    expected = (
        "https://lms.example/report/completion/index.php?"
        f"course={FIRE_SAFETY}&amp;user={ALICE}"
    )
    assert f'<a href="{expected}">' in row


def test_no_completion_links_by_default(anonymous):
    anonymous.cookies.set("license_report_key", KEY)
    html = page(anonymous).text
    assert "Completion report" not in html
    assert shown_keys(html)


@pytest.mark.parametrize(
    "template",
    [
        "https://lms.example/?course={course}",
        "javascript:alert({course_id})",
        "https://lms.example/?course={course_id.real}",
        "https://lms.example/?course={course_id",
    ],
)
def test_invalid_completion_template_rejected(app_engine, template):
    with pytest.raises(ValueError, match="LICENSE_REPORT_COMPLETION_URL_TEMPLATE"):
        create_app(_settings(completion_url_template=template), app_engine)


# Form and accessibility.


def test_every_control_has_label(client):
    parser = FormControls()
    parser.feed(page(client).text)
    assert len(parser.controls) == 16
    assert all(parser.controls)
    assert set(parser.controls) <= parser.labels


def test_form_works_without_script(client):
    html = page(client, sort="email", last_initial="B").text
    form = re.search(
        r'<form class="filters" method="get" id="filters">.*?</form>', html, re.S
    )
    assert form
    assert '<button type="submit">Apply filters</button>' in form[0]
    assert '<input type="hidden" name="sort" value="email">' in form[0]
    assert '<input type="hidden" name="last_initial" value="B">' in form[0]
    for name in (
        "license_id",
        "course_id",
        "department_id",
        "search",
        "firstname",
        "lastname",
        "email",
        "allocated",
        "allocated_from",
        "allocated_to",
        "unallocated_from",
        "unallocated_to",
        "include_suspended",
        "per_page",
        "tz",
        "as_of",
    ):
        assert f'name="{name}"' in form[0], name


def test_table_structure(client):
    html = page(client).text
    assert '<caption id="report-caption">' in html
    assert '<th scope="row">Alice</th>' in html
    assert html.count('<th scope="col"') == 12


def test_static_files(client):
    css = client.get("/static/report.css")
    script = client.get("/static/report.js")
    assert css.status_code == 200
    assert "position: sticky" in css.text
    assert script.status_code == 200
    assert "requestSubmit" in script.text


# Invalid filters.


def test_invalid_date_shown_and_ignored(client):
    response = page(client, allocated_from="2024-02-30", search="a")
    assert response.status_code == 422
    html = response.text
    assert "Some filters were ignored" in html
    assert "Allocated from must be a real calendar date" in html
    assert 'value="2024-02-30" aria-invalid="true"' in html
    assert shown_keys(html) == api_keys(client, search="a")


def test_reversed_range_ignored(client):
    response = page(client, allocated_from="2024-05-01", allocated_to="2024-01-01")
    assert response.status_code == 422
    assert "Allocated from (2024-05-01) is after allocated_to" in response.text
    assert shown_keys(response.text) == api_keys(client, allocated_to="2024-01-01")


def test_unknown_license_ignored(client):
    response = page(client, license_id=123456)
    assert response.status_code == 422
    assert "123456 is not a license of company" in response.text
    assert shown_keys(response.text) == api_keys(client)


def test_several_invalid_filters(client):
    response = page(client, sort="salary", per_page="0", first_initial="ab")
    assert response.status_code == 422
    html = response.text
    assert html.count('<li id="problem-') == 3
    assert shown_keys(html) == api_keys(client)


def test_unknown_company_page(client):
    response = page(client, company=999)
    assert response.status_code == 404
    assert "text/html" in response.headers["content-type"]
    assert "Company 999 is not known." in response.text


# Login and logout.


def test_page_without_key_shows_login(anonymous):
    response = page(anonymous, license_id=SAFETY, search="")
    assert response.status_code == 401
    assert "text/html" in response.headers["content-type"]
    assert '<form method="post" action="/login">' in response.text
    assert '<input type="password" id="key" name="key"' in response.text
    next_path = f"/companies/{ACME}/license-allocations?license_id={SAFETY}&amp;search="
    assert f'name="next" value="{next_path}"' in response.text


def test_page_with_invalid_cookie_shows_login(anonymous):
    anonymous.cookies.set("license_report_key", "not-a-key")
    response = page(anonymous)
    assert response.status_code == 401
    assert 'action="/login"' in response.text


def test_page_accepts_bearer_header(anonymous):
    response = anonymous.get(
        PAGE.format(company=ACME), headers={"Authorization": f"Bearer {KEY}"}
    )
    assert response.status_code == 200
    assert shown_keys(response.text)


def test_login_sets_cookie_and_redirects(anonymous):
    target = f"/companies/{ACME}/license-allocations?license_id={SAFETY}"
    response = anonymous.post(
        "/login", data={"key": KEY, "next": target}, follow_redirects=False
    )
    assert response.status_code == 303
    assert response.headers["location"] == target
    cookie = response.headers["set-cookie"]
    assert cookie.startswith(f"license_report_key={KEY};")
    assert "HttpOnly" in cookie
    assert "SameSite=strict" in cookie
    assert "Path=/" in cookie
    assert "Secure" not in cookie
    followed = anonymous.get(target)
    assert followed.status_code == 200
    assert shown_keys(followed.text) == api_keys(anonymous, license_id=SAFETY)


def test_login_cookie_secure_on_https(app_engine):
    app = create_app(_settings(), app_engine)
    with TestClient(app, base_url="https://testserver") as client:
        response = client.post(
            "/login", data={"key": KEY, "next": "/"}, follow_redirects=False
        )
    assert response.status_code == 303
    assert "Secure" in response.headers["set-cookie"]


def test_login_rejects_wrong_key(anonymous):
    response = anonymous.post(
        "/login", data={"key": "wrong", "next": "/companies/1/license-allocations"}
    )
    assert response.status_code == 401
    assert "This API key is not valid" in response.text
    assert "set-cookie" not in response.headers
    assert 'value="/companies/1/license-allocations"' in response.text


def test_login_rejects_empty_key(anonymous):
    response = anonymous.post("/login", data={"key": "", "next": "/"})
    assert response.status_code == 401
    assert "Enter an API key." in response.text


@pytest.mark.parametrize(
    "next_path",
    [
        "https://evil.example/",
        "//evil.example/path",
        "/\\evil.example",
        "\\\\evil.example",
        "javascript:alert(1)",
        "evil.example",
        "/ok\r\nLocation: https://evil.example",
        "",
    ],
)
def test_login_next_never_leaves_site(anonymous, next_path):
    response = anonymous.post(
        "/login", data={"key": KEY, "next": next_path}, follow_redirects=False
    )
    assert response.status_code == 303
    assert response.headers["location"] == "/"


def test_login_rejects_cross_site_post(anonymous):
    response = anonymous.post(
        "/login",
        data={"key": KEY, "next": "/"},
        headers={"Sec-Fetch-Site": "cross-site"},
        follow_redirects=False,
    )
    assert response.status_code == 403
    assert "set-cookie" not in response.headers


def test_logout_clears_cookie(client):
    target = f"/companies/{ACME}/license-allocations"
    response = client.post("/logout", data={"next": target}, follow_redirects=False)
    assert response.status_code == 303
    assert response.headers["location"] == target
    cookie = response.headers["set-cookie"]
    assert cookie.startswith('license_report_key="";')
    assert "Max-Age=0" in cookie
    client.cookies.clear()
    assert page(client).status_code == 401


def test_forbidden_company_page(anonymous):
    anonymous.cookies.set("license_report_key", ACME_KEY)
    response = page(anonymous, company=GLOBEX)
    assert response.status_code == 403
    assert "may not read company 2" in response.text
    assert "Sign in with another key" in response.text
