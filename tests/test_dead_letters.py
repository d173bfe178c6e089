"""Listing and re-driving dead letters."""

from __future__ import annotations

import orjson
from sqlalchemy import func, select
from typer.testing import CliRunner

from consumer.redrive import redrive
from license_report.cli import app as cli
from projections import schema
from projections.apply import DeadLetter, apply_batch
from projections.registry import live_projection

VALID = orjson.dumps(
    {
        "specversion": "1.0",
        "id": "late-fix-1",
        "source": "/test",
        "type": "license.allocated",
        "time": "2024-05-01T12:00:00Z",
        "data": {"user_id": 7, "license_id": 3, "course_id": 11},
    }
)
BROKEN = b'{"specversion": "1.0"'


def _store_letters(engine) -> None:
    letters = [
        # As if an older version had rejected a value that is valid now.
        DeadLetter("license-events", 0, 41, VALID, "unknown event type"),
        DeadLetter("license-events", 0, 42, BROKEN, "not valid JSON"),
    ]
    with engine.begin() as conn:
        apply_batch(conn, [], letters)


def test_redrive_applies_now_valid_letters(engine):
    _store_letters(engine)

    result = redrive(engine)

    assert result.accepted == 1
    assert result.applied == 1
    assert [reason for _, reason in result.still_rejected] == [
        "not valid JSON: unexpected end of data: line 1 column 22 (char 21)"
    ]
    with engine.connect() as conn:
        rows = conn.execute(live_projection(conn).license_allocations.select()).all()
        marked = conn.execute(
            select(schema.dead_letters.c.redriven_event_id).where(
                schema.dead_letters.c.offset == 41
            )
        ).scalar_one()
    assert len(rows) == 1
    assert marked == "late-fix-1"


def test_redrive_twice_changes_nothing(engine):
    _store_letters(engine)
    redrive(engine)

    again = redrive(engine)

    assert again.accepted == 0
    with engine.connect() as conn:
        stored = conn.execute(
            select(func.count()).select_from(schema.event_store)
        ).scalar_one()
    assert stored == 1


def test_dead_letters_command_lists_and_redrives(database_url, engine):
    _store_letters(engine)
    runner = CliRunner()
    environment = {"LICENSE_REPORT_DATABASE_URL": database_url}

    listed = runner.invoke(cli, ["dead-letters"], env=environment)
    redriven = runner.invoke(cli, ["dead-letters", "redrive", "1"], env=environment)
    listed_after = runner.invoke(cli, ["dead-letters"], env=environment)

    assert listed.exit_code == 0, listed.output
    assert "offset=42" in listed.output
    assert "not valid JSON" in listed.output
    assert redriven.exit_code == 0, redriven.output
    assert "accepted=1" in redriven.output
    assert "redriven as late-fix-1" in listed_after.output
