"""The FastAPI application that serves the report from the projection tables.

Run it with ``uvicorn --factory api.app:app_from_environment``, which reads the
``LICENSE_REPORT_`` settings from the environment.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from sqlalchemy import Engine
from starlette.concurrency import run_in_threadpool

from api import health, reference, report
from api.auth import KeyRing
from api.errors import install_error_handlers
from api.health import MetricsMiddleware
from api.openapi import OPENAPI_URL, install_openapi
from api.page import install_page
from api.security import install_security
from license_report.settings import Settings
from projections.as_of import SnapshotCache
from projections.migrate import check_current
from projections.sql import make_engine, without_jit

logger = logging.getLogger(__name__)


def create_app(settings: Settings, engine: Engine | None = None) -> FastAPI:
    """Build the application.

    Without ``engine`` the app creates one from ``settings.database_url`` and
    disposes of it at shutdown. A given engine stays the caller's to dispose.
    Startup raises SchemaOutOfDate unless the schema and the live projection are
    current.
    """
    owns_engine = engine is None
    if engine is None:
        engine = without_jit(make_engine(settings.database_url))
    key_ring = KeyRing.from_settings(settings, engine)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await run_in_threadpool(check_current, engine)
        stored_keys = await run_in_threadpool(key_ring.stored_key_count)
        if not (key_ring or stored_keys or key_ring.proxy or key_ring.accepts_jwt):
            logger.warning(
                "no API keys, trusted proxy or JWT key are configured, so every "
                "report request is rejected with 401"
            )
        logger.info(
            "API started database=%s environment_keys=%d stored_keys=%d",
            engine.dialect.name,
            len(key_ring),
            stored_keys,
        )
        try:
            yield
        finally:
            app.state.snapshots.close()
            if owns_engine:
                engine.dispose()
            logger.info("API stopped")

    app = FastAPI(
        title="license-report",
        lifespan=lifespan,
        # The OpenAPI schema is public, because it contains no key or setting
        # value. The documentation pages stay off, because they load scripts
        # from a CDN.
        docs_url=None,
        redoc_url=None,
        openapi_url=OPENAPI_URL,
    )
    app.state.engine = engine
    app.state.snapshots = SnapshotCache(engine, settings.as_of_max_events)
    app.state.key_ring = key_ring
    install_error_handlers(app)
    app.include_router(report.router)
    app.include_router(reference.router)
    app.include_router(health.router)
    # The HTML report page, its login and logout, and /static.
    install_page(app, settings)
    install_openapi(app)
    install_security(app, settings)
    app.add_middleware(MetricsMiddleware)
    return app


def app_from_environment() -> FastAPI:
    """Build the application from the ``LICENSE_REPORT_`` environment settings."""
    return create_app(Settings())
