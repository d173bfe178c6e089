"""Fixtures that start real components: SQLite and PostgreSQL databases."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, text

from projections.migrate import upgrade
from projections.sql import make_engine

# An administrative connection used to create and drop one database per test.
POSTGRES_ADMIN_URL = os.environ.get(
    "LICENSE_REPORT_TEST_POSTGRES_URL",
    "postgresql+psycopg://postgres@127.0.0.1:5432/postgres",
)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path) -> Iterator[str]:
    """A migrated, empty database of each supported kind."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'license-report.db'}"
        _migrate(url)
        yield url
        return
    yield from _postgres_database()


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A migrated, empty PostgreSQL database."""
    yield from _postgres_database()


@pytest.fixture
def another_database(database_url: str, tmp_path) -> Iterator[str]:
    """A second migrated, empty database of the same kind as ``database_url``."""
    if database_url.startswith("sqlite"):
        url = f"sqlite:///{tmp_path / 'another.db'}"
        _migrate(url)
        yield url
        return
    yield from _postgres_database()


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = make_engine(database_url)
    yield engine
    engine.dispose()


def _postgres_database() -> Iterator[str]:
    name = f"license_report_test_{uuid.uuid4().hex[:12]}"
    admin = make_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = admin.url.set(database=name).render_as_string(hide_password=False)
    try:
        _migrate(url)
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def _migrate(url: str) -> None:
    engine = make_engine(url)
    try:
        upgrade(engine)
    finally:
        engine.dispose()


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory):
    """A Kafka-protocol broker (Tansu, in memory) on a free loopback port.

    One broker serves the whole session, so each test should use its own topics
    and consumer group ids. The broker's output goes to broker.log in the
    fixture's temporary directory.
    """
    from tests.kafka_broker import KafkaBroker

    log_path = tmp_path_factory.mktemp("kafka") / "broker.log"
    broker = KafkaBroker.start(log_path)
    try:
        yield broker
    finally:
        broker.stop()
