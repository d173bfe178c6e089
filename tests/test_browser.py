"""The report page in headless Chromium, against the real app served by uvicorn.

The server runs in a background thread on a free 127.0.0.1 port over a SQLite
database filled with a generated history. Playwright drives Debian's
/usr/bin/chromium (``playwright install`` is never needed). Every check
compares the rows that the page shows with the JSON report for the page's own
query string. Screenshots go to test-artifacts/.
"""

from __future__ import annotations

import csv
import io
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import httpx
import openpyxl
import orjson
import pytest
import uvicorn
from playwright.sync_api import Browser, Page, expect, sync_playwright

from api.app import create_app
from consumer.replay import replay_files
from license_report.settings import Settings
from projections.migrate import upgrade
from projections.sql import make_engine
from tests.history import generate_history, write_jsonl

CHROMIUM = "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(),
    reason=f"{CHROMIUM} is missing; install Debian's chromium package",
)

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
KEY = "browser-test-key"
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
# Playwright's default of 30 s would let a hung page eat the whole budget.
TIMEOUT_MS = 10_000


def _free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[dict]:
    """Serve the app over a generated history; yield its address and a company."""
    folder = tmp_path_factory.mktemp("browser")
    history = generate_history(11, companies=3, users=150)
    events = folder / "history.jsonl"
    write_jsonl(history, events)
    engine = make_engine(f"sqlite:///{folder / 'report.db'}")
    upgrade(engine)
    replay_files(engine, [str(events)])

    settings = Settings(
        api_keys=orjson.dumps({KEY: "*"}).decode(),
        rate_limit_per_minute=0,
        completion_url_template="https://lms.example/completion?course={course_id}",
    )
    app = create_app(settings, engine)

    sock = _free_socket()
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="on")
    uvicorn_server = uvicorn.Server(config)
    thread = threading.Thread(
        target=uvicorn_server.run, kwargs={"sockets": [sock]}, daemon=True
    )
    thread.start()

    deadline = time.monotonic() + 20
    while not uvicorn_server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start within 20 s")
        time.sleep(0.05)
    base_url = f"http://127.0.0.1:{port}"
    company_id = _busiest_company(base_url, history.company_ids)
    try:
        yield {"base_url": base_url, "company_id": company_id}
    finally:
        uvicorn_server.should_exit = True
        thread.join(timeout=10)
        sock.close()
        engine.dispose()


def _busiest_company(base_url: str, company_ids: list[int]) -> int:
    totals = {}
    for company_id in company_ids:
        response = httpx.get(
            f"{base_url}/v1/companies/{company_id}/license-allocations",
            headers={"Authorization": f"Bearer {KEY}"},
        )
        totals[company_id] = response.json()["total"]
    return max(totals, key=totals.get)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True
        )
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Browser, server: dict) -> Iterator[Page]:
    """A signed-in page of the report in a fresh browser context."""
    context = browser.new_context(
        base_url=server["base_url"],
        accept_downloads=True,
        viewport={"width": 1440, "height": 1000},
    )
    context.set_default_timeout(TIMEOUT_MS)
    tab = context.new_page()
    tab.goto(report_path(server))
    sign_in(tab)
    yield tab
    context.close()


def report_path(server: dict) -> str:
    return f"/companies/{server['company_id']}/license-allocations"


def sign_in(tab: Page) -> None:
    tab.get_by_label("API key").fill(KEY)
    tab.get_by_role("button", name="Sign in").click()
    expect(tab.get_by_role("heading", name="User license allocations")).to_be_visible()
    # The heading can show before the deferred report.js has run; the load
    # event comes after it, so the form's handlers are in place.
    tab.wait_for_load_state("load")


def screenshot(tab: Page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    tab.screenshot(path=str(ARTIFACTS / f"{name}.png"))


def query_of(tab: Page) -> dict[str, str]:
    return dict(parse_qsl(urlsplit(tab.url).query, keep_blank_values=True))


def api_report(server: dict, params: dict[str, str]) -> dict:
    """Return the JSON report for ``params``, less any empty fields of a GET form."""
    query = {name: value for name, value in params.items() if value != ""}
    response = httpx.get(
        f"{server['base_url']}/v1{report_path(server)}",
        params=query,
        headers={"Authorization": f"Bearer {KEY}"},
    )
    assert response.status_code == 200, response.text
    return response.json()


def shown_keys(tab: Page) -> list[list[int]]:
    return tab.locator("table.report tbody tr").evaluate_all(
        """rows => rows.map(row => [
            Number(row.dataset.userId),
            Number(row.dataset.licenseId),
            Number(row.dataset.courseId),
        ])"""
    )


def assert_rows_match_api(tab: Page, server: dict) -> dict:
    """Check that the page shows the API's rows for the page's query string."""
    body = api_report(server, query_of(tab))
    expected = [[r["user_id"], r["license_id"], r["course_id"]] for r in body["rows"]]
    assert shown_keys(tab) == expected
    heading = tab.locator("#results-title")
    if body["total"]:
        expect(heading).to_contain_text(f"of {body['total']}")
    else:
        expect(heading).to_have_text("No matching rows")
    return body


def select_and_wait(tab: Page, label: str, value: str) -> None:
    """Choose an option; report.js submits the form, which loads a new page."""
    with tab.expect_navigation():
        tab.get_by_label(label, exact=True).select_option(value)


def apply_filters(tab: Page) -> None:
    with tab.expect_navigation():
        tab.get_by_role("button", name="Apply filters").click()


def option_values(tab: Page, label: str) -> list[str]:
    return (
        tab.get_by_label(label, exact=True)
        .locator("option")
        .evaluate_all("options => options.map(option => option.value)")
    )


# Tests.


def test_login_form_and_first_page(browser, server):
    context = browser.new_context(
        base_url=server["base_url"], viewport={"width": 1440, "height": 1000}
    )
    context.set_default_timeout(TIMEOUT_MS)
    tab = context.new_page()
    tab.goto(report_path(server) + "?sort=email")
    expect(tab.get_by_role("heading", name="Sign in")).to_be_visible()
    screenshot(tab, "login")
    tab.get_by_label("API key").fill("not-a-key")
    tab.get_by_role("button", name="Sign in").click()
    expect(tab.get_by_role("alert")).to_contain_text("not valid")
    sign_in(tab)
    assert query_of(tab) == {"sort": "email"}
    assert_rows_match_api(tab, server)
    expect(tab.locator(".freshness")).to_contain_text("Data includes events up to")
    screenshot(tab, "report")
    context.close()


def test_license_narrows_courses(page, server):
    licenses = [value for value in option_values(page, "License") if value]
    license_id = licenses[0]
    select_and_wait(page, "License", license_id)
    assert query_of(page)["license_id"] == license_id
    assert_rows_match_api(page, server)
    courses = httpx.get(
        f"{server['base_url']}/v1/companies/{server['company_id']}/courses",
        params={"license_id": license_id},
        headers={"Authorization": f"Bearer {KEY}"},
    ).json()["courses"]
    expected = ["", *(str(course["course_id"]) for course in courses)]
    assert option_values(page, "Course") == expected
    if len(expected) > 1:
        select_and_wait(page, "Course", expected[1])
        assert query_of(page)["course_id"] == expected[1]
        assert_rows_match_api(page, server)


def test_department_filter(page, server):
    label = "Department and sub-departments"
    departments = option_values(page, label)
    assert departments[0] == ""
    select_and_wait(page, label, departments[1])
    assert query_of(page)["department_id"] == departments[1]
    body = assert_rows_match_api(page, server)
    assert body["total"] > 0


def test_initial_bars(page, server):
    bar = page.get_by_role("navigation", name="Last name")
    with page.expect_navigation():
        bar.get_by_role("link", name="A", exact=True).click()
    assert query_of(page)["last_initial"] == "A"
    expect(bar.locator('[aria-current="true"]')).to_have_text("A")
    assert_rows_match_api(page, server)
    first_bar = page.get_by_role("navigation", name="First name")
    with page.expect_navigation():
        first_bar.get_by_role("link", name="All", exact=True).click()
    assert query_of(page)["last_initial"] == "A"
    with page.expect_navigation():
        bar.get_by_role("link", name="All", exact=True).click()
    assert "last_initial" not in query_of(page)
    assert_rows_match_api(page, server)


@pytest.mark.parametrize(
    ("label", "value"),
    [
        ("Search name or email", "an"),
        ("First name contains", "a"),
        ("Last name contains", "er"),
        ("Email contains", "example"),
    ],
)
def test_text_filters(page, server, label, value):
    page.get_by_label(label, exact=True).fill(value)
    with page.expect_navigation():
        page.get_by_label(label, exact=True).press("Enter")
    query = query_of(page)
    assert value in query.values()
    # report.js leaves the empty fields out of the address.
    assert "" not in query.values()
    assert_rows_match_api(page, server)


def test_allocated_and_date_filters(page, server):
    select_and_wait(page, "License allocated", "false")
    assert query_of(page)["allocated"] == "false"
    assert_rows_match_api(page, server)
    page.get_by_label("Allocated from", exact=True).fill("2024-01-01")
    page.get_by_label("Allocated to", exact=True).fill("2024-12-31")
    apply_filters(page)
    query = query_of(page)
    assert (query["allocated_from"], query["allocated_to"]) == (
        "2024-01-01",
        "2024-12-31",
    )
    assert_rows_match_api(page, server)
    page.get_by_label("Unallocated from", exact=True).fill("2024-03-01")
    page.get_by_label("Unallocated to", exact=True).fill("2025-06-30")
    apply_filters(page)
    query = query_of(page)
    assert (query["unallocated_from"], query["unallocated_to"]) == (
        "2024-03-01",
        "2025-06-30",
    )
    assert_rows_match_api(page, server)
    screenshot(page, "report-filtered")


def test_include_suspended(page, server):
    before = api_report(server, query_of(page))["total"]
    with page.expect_navigation():
        page.get_by_label("Include suspended users").check()
    assert query_of(page)["include_suspended"] == "true"
    body = assert_rows_match_api(page, server)
    assert body["total"] >= before


def test_sort_and_pages(page, server):
    header = page.locator("th.col-email")
    with page.expect_navigation():
        header.get_by_role("link").click()
    expect(header).to_have_attribute("aria-sort", "ascending")
    assert_rows_match_api(page, server)
    with page.expect_navigation():
        header.get_by_role("link").click()
    expect(header).to_have_attribute("aria-sort", "descending")
    assert query_of(page) == {"sort": "email", "order": "desc"}
    select_and_wait(page, "Rows per page", "25")
    pages = page.get_by_role("navigation", name="Pages")
    with page.expect_navigation():
        pages.get_by_role("link", name="Next").click()
    assert query_of(page)["page"] == "2"
    expect(pages.locator('[aria-current="page"]')).to_contain_text("2")
    assert_rows_match_api(page, server)


def test_downloads_match_api(page, server):
    select_and_wait(page, "License allocated", "true")
    page.get_by_label("Search name or email").fill("a")
    apply_filters(page)
    query = query_of(page)
    reference = httpx.get(
        f"{server['base_url']}/v1{report_path(server)}",
        params={**query, "format": "csv"},
        headers={"Authorization": f"Bearer {KEY}"},
    )
    expected = list(csv.reader(io.StringIO(reference.content.decode("utf-8-sig"))))
    assert len(expected) > 1

    with page.expect_download() as csv_download:
        page.get_by_role("link", name="CSV", exact=True).click()
    assert csv_download.value.suggested_filename.endswith(".csv")
    content = Path(csv_download.value.path()).read_bytes()
    assert content.startswith(b"\xef\xbb\xbf")
    assert list(csv.reader(io.StringIO(content.decode("utf-8-sig")))) == expected

    with page.expect_download() as xlsx_download:
        page.get_by_role("link", name="XLSX", exact=True).click()
    assert xlsx_download.value.suggested_filename.endswith(".xlsx")
    workbook = Path(xlsx_download.value.path()).read_bytes()
    sheet = openpyxl.load_workbook(io.BytesIO(workbook), read_only=True).active
    cells = [
        ["" if value is None else str(value) for value in row]
        for row in sheet.iter_rows(values_only=True)
    ]
    assert cells == expected


def test_long_date_lists_fold(page, server):
    select_and_wait(page, "Rows per page", "1000")
    folded = page.locator("td.col-dates details")
    if folded.count() == 0:
        pytest.skip("the generated history has no row with more than two dates")
    first = folded.first
    expect(first.locator("ul")).to_be_hidden()
    first.locator("summary").click()
    expect(first.locator("ul")).to_be_visible()


def test_completion_links(page, server):
    link = page.locator("table.report tbody tr").first.get_by_role("link")
    course_id = page.locator("table.report tbody tr").first.get_attribute(
        "data-course-id"
    )
    expect(link).to_have_attribute(
        "href", f"https://lms.example/completion?course={course_id}"
    )


def test_page_without_javascript(browser, server):
    context = browser.new_context(
        base_url=server["base_url"], java_script_enabled=False
    )
    context.set_default_timeout(TIMEOUT_MS)
    tab = context.new_page()
    tab.goto(report_path(server))
    sign_in(tab)
    licenses = [value for value in option_values(tab, "License") if value]
    tab.get_by_label("License", exact=True).select_option(licenses[-1])
    tab.get_by_label("Last name contains").fill("e")
    apply_filters(tab)
    query = query_of(tab)
    assert query["license_id"] == licenses[-1]
    assert query["lastname"] == "e"
    # Without report.js the form sends its empty fields too; the page ignores them.
    assert query["search"] == ""
    assert_rows_match_api(tab, server)
    screenshot(tab, "report-without-javascript")
    context.close()


def test_keyboard_focus_visible(page, server):
    page.keyboard.press("Tab")
    expect(page.locator(".skip-link")).to_be_focused()
    page.keyboard.press("Tab")
    page.keyboard.press("Tab")
    focused = page.evaluate(
        "() => getComputedStyle(document.activeElement).outlineStyle"
    )
    assert focused != "none"
