"""Deleting a user removes their names and email from the projection and the store."""

from __future__ import annotations

import re

import orjson
import pytest
from alembic import command
from fastapi.testclient import TestClient
from sqlalchemy import Connection, Engine, MetaData, event, inspect, select, text
from typer.testing import CliRunner

from api.app import create_app
from consumer.decoding import decode
from license_report import cli
from license_report.cli import app as cli_app
from license_report.keys_cli import purge_user
from license_report.settings import Settings
from projections import migrate, schema
from projections.apply import IncomingEvent, apply_batch
from projections.privacy import scrub_deleted_users
from projections.rebuild import rebuild_from_store
from projections.verify import verify
from tests.api_data import (
    ACME,
    ALICE,
    BOB,
    EVE,
    GLOBEX,
    History,
    build_history,
    load_history,
)

KEY = "purge-test-key"
REPORT = "/v1/companies/{company}/license-allocations"
ALICE_DATA = ("Alice", "Able", "alice.able@example.com")
BOB_DATA = ("bob", "baker", "bob.baker@example.com")
EVE_DATA = ("Eve", "Evans", "eve.evans@example.com")


@pytest.fixture
def client(engine: Engine):
    load_history(engine)
    settings = Settings(api_keys=orjson.dumps({KEY: "*"}).decode())
    with TestClient(create_app(settings, engine)) as test_client:
        yield test_client


def report_rows(client: TestClient, company: int) -> list[dict]:
    response = client.get(
        REPORT.format(company=company),
        params={"per_page": 1000},
        headers={"Authorization": f"Bearer {KEY}"},
    )
    assert response.status_code == 200, response.text
    return response.json()["rows"]


def everything(engine: Engine) -> str:
    """Return the text of every row of every table in the database."""
    metadata = MetaData()
    metadata.reflect(engine)
    lines = []
    with engine.connect() as conn:
        for table in metadata.sorted_tables:
            for row in conn.execute(select(table)):
                lines.append(f"{table.name}: {' '.join(map(str, row))}")
    return "\n".join(lines)


def stored_payloads(engine: Engine, user_id: int) -> list[dict]:
    store = schema.event_store
    with engine.connect() as conn:
        payloads = conn.execute(
            select(store.c.payload)
            .where(store.c.subject_user_id == user_id, store.c.type == "user.upserted")
            .order_by(store.c.position)
        ).scalars()
        return [orjson.loads(payload) for payload in payloads]


def test_deleted_user_blanked_on_arrival(client, engine):
    text_of_tables = everything(engine)
    payloads = stored_payloads(engine, EVE)

    for value in EVE_DATA:
        assert value not in text_of_tables
    assert len(payloads) == 1
    assert payloads[0]["data"]["user_id"] == EVE
    assert payloads[0]["data"]["firstname"] == ""
    assert payloads[0]["data"]["lastname"] == ""
    assert payloads[0]["data"]["email"] == ""
    original = next(
        orjson.loads(value)
        for value in build_history().values
        if b'"user.upserted"' in value and orjson.loads(value)["data"]["user_id"] == EVE
    )
    assert payloads[0]["id"] == original["id"]
    assert payloads[0]["time"] == original["time"]
    assert payloads[0]["data"]["suspended"] is False


def test_purge_user_command(client, engine, database_url, monkeypatch):
    monkeypatch.setattr(cli, "configure_logging", lambda level: None)
    acme_before = report_rows(client, ACME)
    globex_before = report_rows(client, GLOBEX)
    for value in ALICE_DATA:
        assert value in everything(engine)

    result = CliRunner().invoke(
        cli_app,
        ["purge-user", str(ALICE), "--yes"],
        env={"LICENSE_REPORT_DATABASE_URL": database_url},
    )

    assert result.exit_code == 0, result.output
    assert f"user {ALICE} purged" in result.output
    assert "1 stored user.upserted events are blanked" in result.output
    text_of_tables = everything(engine)
    for value in ALICE_DATA:
        assert value not in text_of_tables
    acme_after = report_rows(client, ACME)
    assert [row for row in acme_before if row["user_id"] != ALICE] == acme_after
    assert report_rows(client, GLOBEX) == globex_before


def test_rebuild_after_purge_gives_same_report(client, engine):
    purge_user(engine, ALICE)
    acme = report_rows(client, ACME)
    globex = report_rows(client, GLOBEX)

    result = rebuild_from_store(engine)

    assert result.version == 2
    assert ALICE not in {row["user_id"] for row in acme}
    assert report_rows(client, ACME) == acme
    assert report_rows(client, GLOBEX) == globex
    assert verify(engine).differences == []


def test_purge_clears_retired_projection(client, engine):
    rebuild_from_store(engine)
    with engine.connect() as conn:
        retired = conn.execute(
            select(schema.projections.c.version).where(
                schema.projections.c.status == "retired"
            )
        ).scalar_one()
    assert BOB_DATA[2] in everything(engine)

    purge_user(engine, BOB)

    assert retired == 1
    text_of_tables = everything(engine)
    for value in BOB_DATA:
        assert value not in text_of_tables
    assert BOB not in {row["user_id"] for row in report_rows(client, ACME)}


def apply(engine: Engine, *events: tuple[str, dict, str]) -> None:
    """Apply (type, data, time) events with ids unused by tests/api_data.py."""
    values = [
        orjson.dumps(
            {
                "specversion": "1.0",
                "id": f"purge-test-{number}",
                "source": "/tests/purge",
                "type": type_,
                "time": time,
                "data": data,
            }
        )
        for number, (type_, data, time) in enumerate(events)
    ]
    with engine.begin() as conn:
        apply_batch(conn, [IncomingEvent(decode(value)) for value in values])


def test_late_older_upsert_blanked(client, engine):
    purge_user(engine, ALICE)
    late = {
        "user_id": ALICE,
        "firstname": "Alicia",
        "lastname": "Able-Late",
        "email": "alicia.late@example.com",
    }

    apply(engine, ("user.upserted", late, "2023-12-02T00:00:00Z"))

    payloads = stored_payloads(engine, ALICE)
    text_of_tables = everything(engine)
    assert len(payloads) == 2
    assert "Alicia" not in text_of_tables
    assert "alicia.late@example.com" not in text_of_tables
    assert ALICE not in {row["user_id"] for row in report_rows(client, ACME)}


def test_newer_upsert_recreates_user(client, engine):
    again = {
        "user_id": ALICE,
        "firstname": "Alice",
        "lastname": "Again",
        "email": "alice.again@example.com",
    }

    apply(
        engine,
        ("user.deleted", {"user_id": ALICE}, "2025-01-01T00:00:00Z"),
        ("user.upserted", again, "2025-02-01T00:00:00Z"),
    )

    payloads = stored_payloads(engine, ALICE)
    assert [payload["data"]["email"] for payload in payloads] == [
        "",
        "alice.again@example.com",
    ]
    rows = [row for row in report_rows(client, ACME) if row["user_id"] == ALICE]
    assert rows
    assert {row["lastname"] for row in rows} == {"Again"}
    assert rebuild_from_store(engine).version == 2
    assert [row for row in report_rows(client, ACME) if row["user_id"] == ALICE] == rows


def test_purge_unknown_user(client, engine):
    before = report_rows(client, ACME)

    result = purge_user(engine, 424242)

    assert result.superseded_upserts == 0
    assert report_rows(client, ACME) == before


def test_migration_blanks_deleted_users_already_stored(database_url, engine):
    config = migrate._config()
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.downgrade(config, "0002")
    assert "subject_user_id" not in {
        column["name"] for column in inspect(engine).get_columns("event_store")
    }
    old = History()
    old.user(ALICE, *ALICE_DATA)
    old.user(BOB, *BOB_DATA)
    old.add("user.deleted", {"user_id": ALICE})
    with engine.begin() as conn:
        for position, value in enumerate(old.values, start=1):
            document = orjson.loads(value)
            conn.execute(
                text(
                    "INSERT INTO event_store (event_id, type, source, time_us, "
                    "payload, recorded_at_us) VALUES (:id, :type, 's', :time, "
                    ":payload, 0)"
                ),
                {
                    "id": document["id"],
                    "type": document["type"],
                    "time": position,
                    "payload": value.decode(),
                },
            )

    migrate.upgrade(engine)

    store = schema.event_store
    with engine.connect() as conn:
        subjects = conn.execute(
            select(store.c.subject_user_id).order_by(store.c.position)
        ).scalars()
        assert list(subjects) == [ALICE, BOB, ALICE]
    alice = stored_payloads(engine, ALICE)[0]["data"]
    bob = stored_payloads(engine, BOB)[0]["data"]
    assert (alice["firstname"], alice["lastname"], alice["email"]) == ("", "", "")
    assert alice["user_id"] == ALICE
    assert (bob["firstname"], bob["lastname"], bob["email"]) == BOB_DATA


def query_plan(conn: Connection, statement: str, parameters) -> str:
    """Return the plan of a statement as the driver sent it, with its parameters.

    On PostgreSQL it is the generic plan, made once for all parameter values,
    which PostgreSQL may use after psycopg has prepared a statement that ran 5
    times. Sequential scans are off, so that the few rows of a test database
    still get an index. SQLite (3.40) plans with the bound values, so there a
    bound type would match the partial index too.
    """
    if conn.dialect.name == "sqlite":
        rows = conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}", parameters)
        return "\n".join(row[3] for row in rows)

    positions: dict[str, int] = {}

    def placeholder(match: re.Match) -> str:
        position = positions.setdefault(match.group(1), len(positions) + 1)
        return f"${position}"

    prepared = re.sub(r"%\((\w+)\)s", placeholder, statement)
    arguments = ", ".join(sql_literal(parameters[name]) for name in positions)
    conn.exec_driver_sql("SET LOCAL plan_cache_mode = force_generic_plan")
    conn.exec_driver_sql("SET LOCAL enable_seqscan = off")
    conn.exec_driver_sql(f"PREPARE planned AS {prepared}")
    try:
        rows = conn.exec_driver_sql(f"EXPLAIN EXECUTE planned({arguments})")
        return "\n".join(row[0] for row in rows)
    finally:
        conn.exec_driver_sql("DEALLOCATE planned")


def sql_literal(value: int | str) -> str:
    if isinstance(value, int):
        return str(value)
    return "'" + value.replace("'", "''") + "'"


def test_deleted_user_lookup_uses_partial_index(engine):
    load_history(engine)
    statements = []

    def record(conn, cursor, statement, parameters, context, executemany):
        statements.append((statement, parameters))

    with engine.connect() as conn:
        event.listen(conn, "before_cursor_execute", record)
        scrub_deleted_users(conn, [ALICE, BOB, EVE])
        event.remove(conn, "before_cursor_execute", record)
        lookup, parameters = statements[0]
        plan = query_plan(conn, lookup, parameters)
        conn.rollback()

    assert lookup.startswith("SELECT DISTINCT event_store.subject_user_id")
    assert "ix_event_store_user_deleted" in plan
