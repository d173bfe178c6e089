"""The report's web page, its login form and its static files.

The page takes the same query parameters as the JSON report and renders it on
the server, with the same functions that the API's endpoints call. It works
without JavaScript; ``static/report.js`` only submits the filter form when a
selector changes and leaves empty fields out of the address.

Access goes through the API's own dependency (``AuthorizedCompany``). When it
rejects a request for lack of credentials, the page shows a login form whose
key goes into the ``license_report_key`` cookie.
"""

from __future__ import annotations

import logging
import string
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute, APIRouter
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import URL
from starlette.exceptions import HTTPException
from starlette.responses import RedirectResponse, Response

from api.auth import COOKIE_NAME, AuthorizedCompany
from api.errors import ApiError, Problem, describe_validation_error
from api.page_view import report_context
from api.params import ReportQuery, report_query
from api.reference import list_courses, list_departments, list_licenses
from api.report import fetch_report, report_source
from license_report.settings import Settings

logger = logging.getLogger(__name__)

PAGE_PATH = "/companies/{company_id}/license-allocations"
# The redirect target of a login whose ``next`` is missing or not a path here.
DEFAULT_NEXT = "/"
# Largest login form body read, in bytes; a key and a path fit easily.
MAX_FORM_BYTES = 16 * 1024
COMPLETION_PLACEHOLDERS = frozenset({"course_id", "user_id", "license_id"})

_HERE = Path(__file__).parent
templates = Jinja2Templates(directory=_HERE / "templates")
# Problems with query parameters that the page ignored, kept in the request scope.
_PROBLEMS_KEY = "license_report.page_problems"
_RAW_PARAMS_KEY = "license_report.page_raw_params"

Endpoint = Callable[[Request], Awaitable[Response]]


class PageRoute(APIRoute):
    """An API route whose errors become HTML pages.

    A rejection for missing or invalid credentials (401) shows the login form.
    An invalid query parameter, or an id that names nothing of the company, is
    dropped from the request, which then runs again. The page shows the
    problem beside the rest of the report.
    """

    def get_route_handler(self) -> Endpoint:
        handler = super().get_route_handler()

        async def handle_page(request: Request) -> Response:
            raw_params = dict(request.query_params)
            request = _with_query(request, _non_empty(request.query_params))
            problems: list[Problem] = []
            # Each retry drops at least one parameter, so this ends.
            for _ in range(len(raw_params) + 1):
                request.scope[_PROBLEMS_KEY] = problems
                request.scope[_RAW_PARAMS_KEY] = raw_params
                try:
                    return await handler(request)
                except RequestValidationError as error:
                    found = [describe_validation_error(e) for e in error.errors()]
                except ApiError as error:
                    if not _is_query_problem(error):
                        return error_page(
                            request, error.status_code, error.problems, error.headers
                        )
                    found = error.problems
                except HTTPException as error:
                    if error.status_code == 401:
                        return login_page(request, status_code=401)
                    raise
                if not all(_is_query(problem) for problem in found):
                    return error_page(request, 422, found)
                problems = [*problems, *found]
                dropped = {problem.parameter for problem in found}
                params = request.query_params.multi_items()
                remaining = [
                    (name, value) for name, value in params if name not in dropped
                ]
                if len(remaining) == len(params):
                    return error_page(request, 422, problems)
                request = _with_query(request, remaining)
            return error_page(request, 422, problems)

        return handle_page


def sentence(message: str) -> str:
    """Capitalise the first letter of an error message and end it with a period."""
    if not message:
        return message
    text = message[0].upper() + message[1:]
    return text if text.endswith((".", "?", "!")) else text + "."


templates.env.filters["sentence"] = sentence

router = APIRouter(route_class=PageRoute)
login_router = APIRouter()


def install_page(app: FastAPI, settings: Settings) -> None:
    """Serve the web page, the login and logout routes and the static files."""
    app.state.completion_url_template = check_completion_template(
        settings.completion_url_template
    )
    app.mount("/static", StaticFiles(directory=_HERE / "static"), name="static")
    app.include_router(router)
    app.include_router(login_router)


def check_completion_template(template: str | None) -> str | None:
    """Return a usable completion report URL template; raise ValueError if invalid."""
    if template is None or not template.strip():
        return None
    setting = "LICENSE_REPORT_COMPLETION_URL_TEMPLATE"
    if not template.startswith(("https://", "http://", "/")):
        raise ValueError(
            f"{setting} must start with https://, http:// or /, got {template!r}"
        )
    try:
        fields = [field for _, field, _, _ in string.Formatter().parse(template)]
    except ValueError as error:
        raise ValueError(f"{setting} is not a valid template: {error}") from None
    for field in fields:
        if field is not None and field not in COMPLETION_PLACEHOLDERS:
            raise ValueError(
                f"{setting} contains the unknown placeholder {{{field}}}; use "
                "{course_id}, {user_id} or {license_id}"
            )
    return template


@router.get(PAGE_PATH, include_in_schema=False)
def report_page(
    request: Request,
    company_id: AuthorizedCompany,
    query: Annotated[ReportQuery, Depends(report_query)],
) -> Response:
    """Render the company's report with its filters, selectors and pages."""
    # The page links pages by number; a cursor from the JSON API does not apply.
    query = replace(query, after=None)
    with report_source(request, query) as (conn, tables):
        total, rows, freshness = fetch_report(conn, tables, company_id, query)
        licenses = list_licenses(conn, tables, company_id)
        courses = list_courses(
            conn, tables, company_id, query.license_id, query.include_suspended
        )
        departments = list_departments(conn, tables, company_id)
    problems: list[Problem] = request.scope.get(_PROBLEMS_KEY, [])
    context = report_context(
        company_id=company_id,
        query=query,
        params=dict(request.query_params),
        raw_params=request.scope.get(_RAW_PARAMS_KEY, {}),
        problems=problems,
        total=total,
        rows=rows,
        freshness=freshness,
        licenses=licenses,
        courses=courses,
        departments=departments,
        completion_url_template=request.app.state.completion_url_template,
    )
    status_code = 422 if problems else 200
    return templates.TemplateResponse(
        request, "report.html", context, status_code=status_code
    )


@login_router.post("/login", include_in_schema=False)
async def login(request: Request) -> Response:
    """Check the submitted key and keep it in a cookie, then go to ``next``."""
    if _is_cross_site(request):
        return error_page(request, 403, [Problem(_CROSS_SITE_MESSAGE)])
    form = await _read_form(request)
    next_path = safe_next_path(form.get("next"))
    key = form.get("key", "").strip()
    if not key:
        message = "enter an API key"
        return login_page(request, 401, next_path=next_path, message=message)
    principal = await run_in_threadpool(request.app.state.key_ring.authenticate, key)
    if principal is None:
        logger.info("page login rejected: unknown API key")
        message = "this API key is not valid; check it and try again"
        return login_page(request, 401, next_path=next_path, message=message)
    response = RedirectResponse(next_path, status_code=303)
    response.set_cookie(
        COOKIE_NAME,
        key,
        path="/",
        secure=request.url.scheme == "https",
        httponly=True,
        samesite="strict",
    )
    return response


@login_router.post("/logout", include_in_schema=False)
async def logout(request: Request) -> Response:
    """Delete the key cookie, then go to ``next``."""
    if _is_cross_site(request):
        return error_page(request, 403, [Problem(_CROSS_SITE_MESSAGE)])
    form = await _read_form(request)
    response = RedirectResponse(safe_next_path(form.get("next")), status_code=303)
    response.delete_cookie(
        COOKIE_NAME,
        path="/",
        secure=request.url.scheme == "https",
        httponly=True,
        samesite="strict",
    )
    return response


_CROSS_SITE_MESSAGE = (
    "this form was sent from another site and is rejected; sign in from the "
    "report page itself"
)


def safe_next_path(value: str | None) -> str:
    """Return ``value`` if it is a path on this site, else ``DEFAULT_NEXT``.

    Only a path that starts with one ``/`` passes. Browsers read ``//host``
    and ``/\\host`` as another site, so backslashes and control characters
    are rejected too, which rules out an open redirect.
    """
    if not value or not value.startswith("/") or value.startswith("//"):
        return DEFAULT_NEXT
    if "\\" in value or any(ord(character) < 0x20 for character in value):
        return DEFAULT_NEXT
    parts = urlsplit(value)
    if parts.scheme or parts.netloc:
        return DEFAULT_NEXT
    return value


def login_page(
    request: Request,
    status_code: int = 401,
    *,
    next_path: str | None = None,
    message: str | None = None,
) -> Response:
    """Render the login form, which returns to ``next_path`` or to this request."""
    if next_path is None:
        raw_query = request.scope.get(_RAW_PARAMS_KEY)
        url = request.url if raw_query is None else _page_url(request, raw_query)
        next_path = safe_next_path(_path_and_query(url))
    context = {"next_path": next_path, "message": message}
    response = templates.TemplateResponse(
        request, "login.html", context, status_code=status_code
    )
    if status_code == 401:
        response.headers["WWW-Authenticate"] = "Bearer"
    return response


def error_page(
    request: Request,
    status_code: int,
    problems: list[Problem],
    headers: Mapping[str, str] | None = None,
) -> Response:
    """Render an error page that lists ``problems``; a 401 shows the login form."""
    if status_code == 401:
        return login_page(request, status_code=401)
    context = {
        "status_code": status_code,
        "messages": [problem.message for problem in problems],
        "next_path": safe_next_path(_path_and_query(request.url)),
        "forbidden": status_code == 403,
    }
    return templates.TemplateResponse(
        request, "error.html", context, status_code=status_code, headers=headers
    )


def _is_query(problem: Problem) -> bool:
    return problem.parameter is not None and problem.location in (None, "query")


def _is_query_problem(error: ApiError) -> bool:
    # 403 is a department_id outside the credential's department subtree.
    return error.status_code in (403, 404, 422) and all(
        _is_query(problem) for problem in error.problems
    )


def _non_empty(params: Any) -> list[tuple[str, str]]:
    """Drop the empty fields that a GET form sends for blank inputs."""
    return [(name, value) for name, value in params.multi_items() if value != ""]


def _with_query(request: Request, items: Iterable[tuple[str, str]]) -> Request:
    scope = dict(request.scope)
    scope["query_string"] = urlencode(list(items)).encode("ascii")
    return Request(scope, request.receive)


def _page_url(request: Request, params: dict[str, str]) -> URL:
    return request.url.replace(query=urlencode(params))


def _path_and_query(url: URL) -> str:
    return url.path + (f"?{url.query}" if url.query else "")


def _is_cross_site(request: Request) -> bool:
    """Tell whether a browser reports the request as sent from another site.

    Browsers that send Sec-Fetch-Site (Chromium, Firefox, Safari 16.4 and
    later) mark a form posted from another origin as ``cross-site`` or
    ``same-site``. Clients without the header, such as curl, pass.
    """
    site = request.headers.get("sec-fetch-site")
    return site is not None and site not in ("same-origin", "none")


async def _read_form(request: Request) -> dict[str, str]:
    """Parse an application/x-www-form-urlencoded body of at most MAX_FORM_BYTES."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            return {}
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return {}
    return dict(parse_qsl(text, keep_blank_values=True))
