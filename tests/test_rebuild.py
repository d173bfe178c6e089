"""Rebuilds beside the live projection, their switch, resumption, and verify."""

from __future__ import annotations

import threading
import time

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import inspect, select, text, update
from typer.testing import CliRunner

from api.app import create_app
from consumer.batch import decode_values
from license_report.cli import app as cli
from license_report.settings import Settings
from projections import schema
from projections.apply import apply_batch
from projections.rebuild import rebuild_from_store
from projections.registry import live_projection, tables
from projections.verify import verify
from tests.history import generate_history

KEY = "rebuild-key"

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def history():
    return generate_history(11, companies=3, users=80)


def _apply(engine, messages) -> None:
    values = (("test", None, i, value) for i, (_, value) in enumerate(messages))
    decoded = decode_values(values)
    with engine.begin() as conn:
        apply_batch(conn, decoded.events, decoded.dead_letters)


def _live_version(engine) -> int:
    with engine.connect() as conn:
        return live_projection(conn).version


def test_rebuild_matches_live_and_switches(engine, history):
    _apply(engine, history.messages)
    before = _live_version(engine)

    result = rebuild_from_store(engine, batch_size=500)

    assert result.previous_version == before
    assert _live_version(engine) == result.version
    assert result.events == len(history.logical)
    assert verify(engine).differences == []


def test_rebuild_restores_keys_and_indexes(engine, history):
    """A rebuild leaves out some keys and indexes while it fills, then adds them."""
    _apply(engine, history.messages)
    result = rebuild_from_store(engine, batch_size=500)

    projection = tables(result.version)
    with engine.connect() as conn:
        found = inspect(conn)
        for table in projection.metadata.sorted_tables:
            key = found.get_pk_constraint(table.name)
            assert key["constrained_columns"] == table.primary_key.columns.keys()
            names = {index["name"] for index in found.get_indexes(table.name)}
            assert names >= {index.name for index in table.indexes}


def test_rebuild_during_ingestion_loses_nothing(engine, database_url, history):
    """Readers and a writer keep going while the projection is rebuilt."""
    half = len(history.messages) // 2
    _apply(engine, history.messages[:half])
    rest = history.messages[half:]
    failures: list[str] = []
    requests = [0]
    stop = threading.Event()

    def ingest() -> None:
        try:
            for start in range(0, len(rest), 25):
                _apply(engine, rest[start : start + 25])
                time.sleep(0.01)
        except Exception as error:  # noqa: BLE001 - reported by the assertion below
            failures.append(f"writer failed: {error!r}")

    def read() -> None:
        settings = Settings(database_url=database_url, api_keys=f'{{"{KEY}": "*"}}')
        with TestClient(create_app(settings, engine)) as client:
            client.headers["Authorization"] = f"Bearer {KEY}"
            company = history.company_ids[0]
            while not stop.is_set():
                response = client.get(f"/v1/companies/{company}/license-allocations")
                requests[0] += 1
                if response.status_code != 200:
                    failures.append(f"{response.status_code} {response.text[:200]}")

    writer = threading.Thread(target=ingest)
    reader = threading.Thread(target=read)
    writer.start()
    reader.start()
    try:
        rebuild_from_store(engine, batch_size=200, switch_threshold=50)
    finally:
        writer.join(timeout=120)
        stop.set()
        reader.join(timeout=60)

    assert not writer.is_alive(), "the writer did not finish"
    assert failures == [], f"{len(failures)} of {requests[0]} requests failed"
    assert requests[0] > 0
    assert verify(engine).differences == []
    with engine.connect() as conn:
        projection = live_projection(conn)
        stored = conn.execute(select(schema.event_store.c.event_id)).scalars().all()
        applied = conn.execute(select(projection.state.c.events_applied)).scalar_one()
    assert len(stored) == len(history.logical)
    assert applied == len(history.logical)


class Interrupt(Exception):
    pass


def test_rebuild_interrupted_resumes(engine, history):
    _apply(engine, history.messages)
    calls = [0]

    def stop_after_first_batch(done: int, total: int) -> None:
        calls[0] += 1
        if done > 0:
            raise Interrupt

    with pytest.raises(Interrupt):
        rebuild_from_store(
            engine, batch_size=300, progress=stop_after_first_batch, switch_threshold=1
        )
    with engine.connect() as conn:
        building = conn.execute(
            select(schema.projections.c.version, schema.projections.c.position).where(
                schema.projections.c.status == "building"
            )
        ).one()
    assert building.position > 0

    result = rebuild_from_store(engine, batch_size=300)

    assert result.resumed is True
    assert result.version == building.version
    assert verify(engine).differences == []


def test_rebuild_discard_starts_over(engine, history):
    _apply(engine, history.messages)

    def interrupt(done: int, total: int) -> None:
        if done > 0:
            raise Interrupt

    with pytest.raises(Interrupt):
        rebuild_from_store(
            engine, batch_size=300, progress=interrupt, switch_threshold=1
        )
    result = rebuild_from_store(engine, batch_size=300, discard=True)

    assert result.resumed is False
    assert verify(engine).differences == []


def test_rebuild_twice_changes_nothing(engine, history):
    _apply(engine, history.messages)
    rebuild_from_store(engine)
    second = rebuild_from_store(engine)
    assert verify(engine).differences == []
    with engine.connect() as conn:
        versions = conn.execute(
            select(schema.projections.c.version, schema.projections.c.status)
        ).all()
    # The live version and the one it replaced; older ones are dropped.
    assert sorted(versions) == [
        (second.previous_version, "retired"),
        (second.version, "live"),
    ]


def test_verify_reports_tampered_row(engine, history):
    _apply(engine, history.messages)
    with engine.begin() as conn:
        table = live_projection(conn).license_allocations
        first = conn.execute(select(table).limit(1)).one()
        conn.execute(
            update(table)
            .where(
                table.c.user_id == first.user_id,
                table.c.license_id == first.license_id,
                table.c.course_id == first.course_id,
            )
            .values(allocations=first.allocations + 5)
        )

    differences = verify(engine).differences

    sides = sorted(d.side for d in differences if d.table == "license_allocations")
    assert sides == ["live", "recomputed"]


def test_verify_reports_tampered_totals(engine, history):
    _apply(engine, history.messages)
    with engine.begin() as conn:
        table = live_projection(conn).report_totals
        conn.execute(update(table).values(listed_rows=table.c.listed_rows + 1))

    differences = verify(engine).differences

    tables = {d.table for d in differences}
    assert tables == {"report_totals"}


def test_verify_command_exit_status(database_url, engine, history):
    _apply(engine, history.messages)
    runner = CliRunner()
    environment = {"LICENSE_REPORT_DATABASE_URL": database_url}

    clean = runner.invoke(cli, ["verify"], env=environment)
    with engine.begin() as conn:
        table = live_projection(conn).license_allocations
        conn.execute(update(table).values(allocated=~table.c.allocated))
    dirty = runner.invoke(cli, ["verify"], env=environment)

    assert clean.exit_code == 0, clean.output
    assert dirty.exit_code == 1, dirty.output
    assert "only in live: license_allocations" in dirty.output


def test_rebuild_command_from_file(database_url, engine, history, tmp_path):
    from tests.history import write_jsonl

    lines = tmp_path / "history.jsonl"
    write_jsonl(history, lines)
    runner = CliRunner()
    environment = {"LICENSE_REPORT_DATABASE_URL": database_url}

    result = runner.invoke(cli, ["rebuild", "--from", str(lines)], env=environment)

    assert result.exit_code == 0, result.output
    assert "is live" in result.output
    assert verify(engine).differences == []


def test_commands_refuse_old_schema(database_url, engine):
    with engine.begin() as conn:
        conn.execute(update(schema.projections).values(layout=0))
    runner = CliRunner()
    result = runner.invoke(
        cli, ["replay", "-"], env={"LICENSE_REPORT_DATABASE_URL": database_url}
    )
    assert result.exit_code == 2
    assert "license-report rebuild --from store" in result.output


def test_rebuild_replaces_older_layout(database_url, engine, history):
    """A live projection of layout 1: no copied columns, no totals."""
    from projections.report_rows import COPIED_COLUMNS
    from projections.report_totals import trigger_names

    _apply(engine, history.messages)
    with engine.begin() as conn:
        projection = live_projection(conn)
        table = projection.license_allocations
        on = f' ON "{table.name}"' if conn.dialect.name == "postgresql" else ""
        for trigger in trigger_names(projection):
            conn.execute(text(f'DROP TRIGGER "{trigger}"{on}'))
        projection.report_totals.drop(conn)
        for index in table.indexes:
            if index.name.endswith("_order"):
                index.drop(conn)
        for name in COPIED_COLUMNS:
            conn.execute(text(f'ALTER TABLE "{table.name}" DROP COLUMN "{name}"'))
        conn.execute(update(schema.projections).values(layout=1))
    runner = CliRunner()
    environment = {"LICENSE_REPORT_DATABASE_URL": database_url}
    rejected = runner.invoke(cli, ["replay", "-"], env=environment)

    rebuilt = runner.invoke(cli, ["rebuild", "--from", "store"], env=environment)

    assert rejected.exit_code == 2
    assert "layout 1" in rejected.output
    assert rebuilt.exit_code == 0, rebuilt.output
    with engine.connect() as conn:
        assert live_projection(conn).version == 2
    assert verify(engine).differences == []
    replayed = runner.invoke(cli, ["replay", "-"], input="", env=environment)
    assert replayed.exit_code == 0, replayed.output


def test_cli_batch_size_default_matches():
    from license_report.cli import REBUILD_BATCH_SIZE
    from projections.rebuild import DEFAULT_BATCH_SIZE

    assert REBUILD_BATCH_SIZE == DEFAULT_BATCH_SIZE
