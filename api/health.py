"""Liveness, readiness and Prometheus metrics endpoints (no key needed)."""

from __future__ import annotations

import logging
import time
from typing import Annotated

import prometheus_client
from fastapi import APIRouter, Depends
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from api.database import get_engine
from api.errors import JsonResponse
from license_report.errors import SchemaOutOfDate
from projections.migrate import check_current

logger = logging.getLogger(__name__)

router = APIRouter()

REQUESTS = prometheus_client.Counter(
    "license_report_http_requests",
    "HTTP requests served, by route template and status code.",
    ["route", "status"],
)
REQUEST_SECONDS = prometheus_client.Histogram(
    "license_report_http_request_duration_seconds",
    "Time to serve an HTTP request, by route template.",
    ["route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
)


@router.get("/healthz")
def healthz() -> JsonResponse:
    """Return ``{"status": "ok"}`` while the process runs (a liveness check)."""
    return JsonResponse({"status": "ok"})


@router.get("/readyz")
def readyz(engine: Annotated[Engine, Depends(get_engine)]) -> JsonResponse:
    """Check that the database answers and its schema and projection are current."""
    try:
        check_current(engine)
    except SchemaOutOfDate as error:
        return JsonResponse({"status": "unavailable", "reason": str(error)}, 503)
    except SQLAlchemyError as error:
        logger.warning("readiness check failed error=%s", type(error).__name__)
        reason = "the database is unreachable or failing"
        return JsonResponse({"status": "unavailable", "reason": reason}, 503)
    return JsonResponse({"status": "ready"})


@router.get("/metrics")
def metrics() -> Response:
    """Serve the process's Prometheus metrics."""
    return Response(
        prometheus_client.generate_latest(),
        media_type=prometheus_client.CONTENT_TYPE_LATEST,
    )


class MetricsMiddleware:
    """Count requests and time them by route template (never by raw path)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = {"code": 500}

        async def send_and_record(message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            route = _route_template(scope)
            REQUESTS.labels(route=route, status=str(status["code"])).inc()
            REQUEST_SECONDS.labels(route=route).observe(time.perf_counter() - started)


def _route_template(scope: Scope) -> str:
    route = scope.get("route")
    return getattr(route, "path", None) or "unmatched"
