"""Schema migrations (Alembic) and the check that the schema is current."""

from __future__ import annotations

import logging

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine

from license_report.errors import SchemaOutOfDate
from projections.registry import ensure_live, live_projection

logger = logging.getLogger(__name__)


def _config() -> Config:
    config = Config()
    config.set_main_option("script_location", "projections:migrations")
    return config


def head_revision() -> str:
    """Return the newest schema revision this code knows."""
    return ScriptDirectory.from_config(_config()).get_current_head()


def current_revision(engine: Engine) -> str | None:
    """Return the schema revision the database is at, or None if it has none."""
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Migrate the database schema to ``revision``."""
    before = current_revision(engine)
    config = _config()
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, revision)
    ensure_live(engine)
    logger.info(
        "schema migrated from_revision=%s to_revision=%s",
        before,
        current_revision(engine),
    )


def check_current(engine: Engine, any_layout: bool = False) -> None:
    """Raise SchemaOutOfDate unless the schema and live projection are current.

    With ``any_layout``, a live projection of another layout passes too.
    """
    current = current_revision(engine)
    head = head_revision()
    if current != head:
        raise SchemaOutOfDate(
            f"the database schema is at revision {current or 'none'} but this "
            f"version of license-report needs {head}; run `license-report migrate` "
            "against the same LICENSE_REPORT_DATABASE_URL first"
        )
    with engine.connect() as conn:
        live_projection(conn, any_layout=any_layout)
