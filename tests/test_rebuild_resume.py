"""Rebuilds on PostgreSQL interrupted at each stage after the fill, then resumed.

The fill leaves the license events without their primary key, and a second
connection adds it while the main one folds the events. These tests stop the
rebuild around those steps and check that a resumed rebuild still matches the
Python path and ends with the key.
"""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import inspect, select, text

from consumer.batch import decode_values
from projections import rebuild, schema
from projections.apply import apply_batch
from projections.rebuild import rebuild_from_store
from projections.registry import tables
from projections.sql import make_engine
from projections.verify import verify
from tests.history import generate_history

pytestmark = pytest.mark.timeout(300)


class Interrupt(Exception):
    pass


@pytest.fixture(scope="module")
def history():
    return generate_history(23, companies=3, users=60)


@pytest.fixture
def pg_engine(postgres_url):
    engine = make_engine(postgres_url)
    yield engine
    engine.dispose()


def _apply(engine, messages) -> None:
    values = (("test", None, i, value) for i, (_, value) in enumerate(messages))
    decoded = decode_values(values)
    with engine.begin() as conn:
        apply_batch(conn, decoded.events, decoded.dead_letters)


def _building(engine):
    registry = schema.projections
    with engine.connect() as conn:
        return conn.execute(
            select(registry.c.version, registry.c.position).where(
                registry.c.status == "building"
            )
        ).one()


def _event_key_columns(engine, version: int) -> list[str]:
    events = tables(version).license_events
    with engine.connect() as conn:
        return inspect(conn).get_pk_constraint(events.name)["constrained_columns"]


def _check_resumed(engine, version: int) -> None:
    result = rebuild_from_store(engine, batch_size=300, switch_threshold=1)
    assert result.resumed is True
    assert result.version == version
    assert _event_key_columns(engine, version) == ["event_id"]
    assert verify(engine).differences == []


def _stop_after_first_batch(engine):
    """Interrupt a rebuild once its first batch is committed; return its version."""

    def interrupt(done: int, total: int) -> None:
        if done > 0:
            raise Interrupt

    with pytest.raises(Interrupt):
        rebuild_from_store(
            engine, batch_size=300, progress=interrupt, switch_threshold=1
        )
    return _building(engine)


def test_refold_failure_then_resume(pg_engine, history, monkeypatch):
    half = len(history.messages) // 2
    _apply(pg_engine, history.messages[:half])

    def fail(conn, projection):
        raise Interrupt

    with monkeypatch.context() as patched:
        patched.setattr(rebuild, "refold", fail)
        with pytest.raises(Interrupt):
            rebuild_from_store(pg_engine, batch_size=300, switch_threshold=1)
    building = _building(pg_engine)
    # The indexer's transaction is separate, so it may have added the key.
    _apply(pg_engine, history.messages[half:])

    _check_resumed(pg_engine, building.version)


def test_indexer_failure_then_resume(pg_engine, history, monkeypatch):
    half = len(history.messages) // 2
    _apply(pg_engine, history.messages[:half])
    original = rebuild._create_event_key

    def fail_in_indexer(conn, events):
        if threading.current_thread().name.startswith("rebuild-indexer"):
            raise Interrupt
        original(conn, events)

    with monkeypatch.context() as patched:
        patched.setattr(rebuild, "_create_event_key", fail_in_indexer)
        with pytest.raises(Interrupt):
            rebuild_from_store(pg_engine, batch_size=300, switch_threshold=1)
    building = _building(pg_engine)
    assert _event_key_columns(pg_engine, building.version) == []
    _apply(pg_engine, history.messages[half:])

    _check_resumed(pg_engine, building.version)


def test_switch_failure_then_resume(pg_engine, history, monkeypatch):
    """A rebuild stopped after every index and trigger exists fills again."""
    half = len(history.messages) // 2
    _apply(pg_engine, history.messages[:half])

    def fail(engine, projection, position):
        raise Interrupt

    with monkeypatch.context() as patched:
        patched.setattr(rebuild, "_switch", fail)
        with pytest.raises(Interrupt):
            rebuild_from_store(pg_engine, batch_size=300, switch_threshold=1)
    building = _building(pg_engine)
    assert _event_key_columns(pg_engine, building.version) == ["event_id"]
    _apply(pg_engine, history.messages[half:])

    _check_resumed(pg_engine, building.version)


def test_resume_version_that_kept_key(pg_engine, history):
    """A building version made by code that kept the key during the fill resumes."""
    half = len(history.messages) // 2
    _apply(pg_engine, history.messages[:half])
    building = _stop_after_first_batch(pg_engine)
    assert building.position > 0
    events = tables(building.version).license_events
    key = events.primary_key
    with pg_engine.begin() as conn:
        conn.execute(
            text(
                f'ALTER TABLE "{events.name}" ADD CONSTRAINT "{key.name}" '
                "PRIMARY KEY (event_id)"
            )
        )
    _apply(pg_engine, history.messages[half:])

    _check_resumed(pg_engine, building.version)


def test_resume_mid_fill_without_key(pg_engine, history):
    half = len(history.messages) // 2
    _apply(pg_engine, history.messages[:half])
    building = _stop_after_first_batch(pg_engine)
    assert _event_key_columns(pg_engine, building.version) == []
    _apply(pg_engine, history.messages[half:])

    _check_resumed(pg_engine, building.version)


def test_ingestion_during_refold_is_caught_up(pg_engine, history, monkeypatch):
    """Events stored while the fold and the indexer run reach the new version."""
    half = len(history.messages) // 2
    _apply(pg_engine, history.messages[:half])
    original = rebuild.refold

    def ingest_then_refold(conn, projection):
        _apply(pg_engine, history.messages[half:])
        original(conn, projection)

    monkeypatch.setattr(rebuild, "refold", ingest_then_refold)
    # The fill copies the first half; the switch folds in the second.
    result = rebuild_from_store(pg_engine, batch_size=300, switch_threshold=1)

    assert result.resumed is False
    assert result.events == len(history.logical)
    assert _event_key_columns(pg_engine, result.version) == ["event_id"]
    assert verify(pg_engine).differences == []
