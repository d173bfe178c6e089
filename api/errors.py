"""Error responses of the API, all shaped as ``{"detail": [entry, ...]}``.

Each entry has a ``message`` that states what failed and how to fix it. Entries
about one request parameter also carry ``parameter`` (its name) and ``loc``
(FastAPI's location, such as ``["query", "per_page"]``). No response contains a
stack trace.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response

from license_report.errors import SchemaOutOfDate

logger = logging.getLogger(__name__)


class JsonResponse(JSONResponse):
    """A JSON response rendered with orjson."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


@dataclass(frozen=True, slots=True)
class Problem:
    """One entry of an error response."""

    message: str
    parameter: str | None = None
    location: str | None = None
    type: str | None = None

    def to_json(self) -> dict[str, Any]:
        entry: dict[str, Any] = {}
        if self.type is not None:
            entry["type"] = self.type
        if self.parameter is not None:
            entry["loc"] = [self.location or "query", self.parameter]
            entry["parameter"] = self.parameter
        entry["message"] = self.message
        return entry


class ApiError(Exception):
    """An error that the API returns to the client with ``status_code``."""

    def __init__(
        self,
        status_code: int,
        problems: Sequence[Problem],
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(problems[0].message)
        self.status_code = status_code
        self.problems = list(problems)
        self.headers = dict(headers or {})


def invalid_parameter(
    parameter: str, message: str, location: str = "query"
) -> ApiError:
    """Return a 422 error about one parameter."""
    problem = Problem(message, parameter, location, "value_error")
    return ApiError(422, [problem])


def not_found(parameter: str, message: str, location: str = "query") -> ApiError:
    """Return a 404 error about one parameter whose value names nothing known."""
    return ApiError(404, [Problem(message, parameter, location, "not_found")])


def error_response(
    status_code: int,
    problems: Sequence[Problem],
    headers: Mapping[str, str] | None = None,
) -> Response:
    body = {"detail": [problem.to_json() for problem in problems]}
    return JsonResponse(body, status_code=status_code, headers=dict(headers or {}))


def describe_validation_error(error: Mapping[str, Any]) -> Problem:
    """Turn one pydantic error of a request parameter into a Problem."""
    location = [str(part) for part in error.get("loc", ())]
    source = location[0] if location else "query"
    parameter = location[1] if len(location) > 1 else source
    return Problem(
        _validation_message(parameter, error), parameter, source, error.get("type")
    )


def _validation_message(parameter: str, error: Mapping[str, Any]) -> str:
    kind = error.get("type")
    context = error.get("ctx") or {}
    match kind:
        case "missing":
            return f"{parameter} is required"
        case "int_parsing" | "int_type" | "int_from_float":
            return f"{parameter} must be a whole number, such as 42"
        case "bool_parsing" | "bool_type":
            return f"{parameter} must be true or false"
        case "greater_than_equal":
            return f"{parameter} must be at least {context.get('ge')}"
        case "less_than_equal":
            return f"{parameter} must be at most {context.get('le')}"
        case "string_too_long":
            limit = context.get("max_length")
            return f"{parameter} must be at most {limit} characters long"
        case "literal_error":
            return f"{parameter} must be one of {context.get('expected')}"
        case "value_error":
            # The validators of api.params phrase their errors to follow the name.
            reason = str(context.get("error") or error.get("msg", "is invalid"))
            return f"{parameter} {reason}"
    return f"{parameter} is invalid: {error.get('msg', 'unexpected value')}"


async def _api_error_handler(request: Request, error: ApiError) -> Response:
    return error_response(error.status_code, error.problems, error.headers)


async def _validation_error_handler(
    request: Request, error: RequestValidationError
) -> Response:
    problems = [describe_validation_error(entry) for entry in error.errors()]
    return error_response(422, problems)


async def _http_error_handler(request: Request, error: HTTPException) -> Response:
    message = str(error.detail) if error.detail else "request failed"
    if error.status_code == 404:
        message = f"no endpoint at {request.url.path}; check the path"
    return error_response(error.status_code, [Problem(message)], error.headers)


async def _unexpected_error_handler(request: Request, error: Exception) -> Response:
    logger.error(
        "request failed with an unexpected error method=%s path=%s",
        request.method,
        request.url.path,
        exc_info=error,
    )
    problem = Problem("internal server error; the request was logged, retry later")
    return error_response(500, [problem])


async def _schema_error_handler(request: Request, error: SchemaOutOfDate) -> Response:
    logger.error("request rejected path=%s: %s", request.url.path, error)
    problem = Problem(
        "the report database is not ready (its schema or projection is not "
        "current); retry later"
    )
    return error_response(503, [problem])


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers that give every error the shape described above."""
    app.add_exception_handler(ApiError, _api_error_handler)
    app.add_exception_handler(RequestValidationError, _validation_error_handler)
    app.add_exception_handler(HTTPException, _http_error_handler)
    app.add_exception_handler(SchemaOutOfDate, _schema_error_handler)
    app.add_exception_handler(Exception, _unexpected_error_handler)
