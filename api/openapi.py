"""The public OpenAPI schema, with the API's error responses documented.

FastAPI documents only the 422 of its own validation errors, in a shape this
API does not use. ``install_openapi`` documents the errors that every route can
return, all shaped as api.errors describes. The schema names no key, host or
setting value, so it is served without a key.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

OPENAPI_URL = "/openapi.json"


class ErrorEntry(BaseModel):
    """One entry of an error response."""

    message: str
    type: str | None = None
    loc: list[str] | None = None
    parameter: str | None = None


class ErrorBody(BaseModel):
    """An error response: what failed and how to fix it."""

    detail: list[ErrorEntry]


_ANY_ROUTE = {
    "413": "The request body is larger than 16 KiB.",
    "414": "The path and query string are longer than 8 KiB.",
}
_AUTHENTICATED_ROUTE = {
    "401": "The credential is missing, unknown, revoked or expired.",
    "403": "The company or department is outside the credential's scope.",
    "404": "The company, or a license or department of a filter, is not known.",
    "429": "The credential's rate limit is used up; see Retry-After.",
    "503": "The report database is not ready; retry later.",
}
_VALIDATED_ROUTE = {"422": "A parameter is invalid."}
_HEADERS = {
    "401": {
        "WWW-Authenticate": {
            "description": "The Bearer challenge.",
            "schema": {"type": "string"},
        }
    },
    "429": {
        "Retry-After": {
            "description": "Seconds until the credential may send a request again.",
            "schema": {"type": "integer", "minimum": 1},
        }
    },
}


def install_openapi(app: FastAPI) -> None:
    """Make ``app`` serve its schema with the error responses documented."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_schema(app)
        return app.openapi_schema

    app.openapi = openapi


def build_schema(app: FastAPI) -> dict[str, Any]:
    """Return the application's OpenAPI document with error responses added."""
    document = get_openapi(
        title=app.title,
        version=app.version,
        description=app.description,
        routes=app.routes,
    )
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    definition = ErrorBody.model_json_schema(
        ref_template="#/components/schemas/{model}"
    )
    schemas.update(definition.pop("$defs", {}))
    schemas["ErrorBody"] = definition
    reference = {"$ref": "#/components/schemas/ErrorBody"}
    for operations in document.get("paths", {}).values():
        for operation in operations.values():
            _add_errors(operation, reference)
    # FastAPI's own validation error schemas are no longer referenced.
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    return document


def _add_errors(operation: dict[str, Any], reference: dict[str, str]) -> None:
    responses = operation.setdefault("responses", {})
    statuses = dict(_ANY_ROUTE)
    if operation.get("security"):
        statuses |= _AUTHENTICATED_ROUTE
    if operation.get("parameters"):
        statuses |= _VALIDATED_ROUTE
    for status, description in statuses.items():
        responses[status] = {
            "description": description,
            "content": {"application/json": {"schema": reference}},
        }
        if status in _HEADERS:
            responses[status]["headers"] = _HEADERS[status]
