"""Stored API keys: the keys commands, hashed storage, revocation and logging."""

from __future__ import annotations

import logging
from pathlib import Path

import orjson
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, select, text
from sqlalchemy.exc import IntegrityError
from typer.testing import CliRunner

from api.app import create_app
from api.auth import KeyRing, hash_key
from license_report import cli
from license_report.cli import app as cli_app
from license_report.keys_cli import create_key, find_keys
from license_report.settings import Settings
from projections import schema
from tests.api_data import ACME, GLOBEX, SALES, load_history

REPORT = "/v1/companies/{company}/license-allocations"


@pytest.fixture
def run(database_url, monkeypatch):
    """Run a license-report command on the test database; return the result."""
    # The command line's logging set-up would replace pytest's capture handler.
    monkeypatch.setattr(cli, "configure_logging", lambda level: None)
    runner = CliRunner()
    environment = {"LICENSE_REPORT_DATABASE_URL": database_url}

    def invoke(*arguments: str):
        return runner.invoke(cli_app, list(arguments), env=environment)

    return invoke


def created_key(result) -> str:
    assert result.exit_code == 0, result.output
    return result.stdout.strip()


def stored_text(engine: Engine) -> str:
    """Return every column of every api_keys row as text."""
    with engine.connect() as conn:
        rows = conn.execute(select(schema.api_keys)).all()
    return "\n".join(" ".join(str(value) for value in row) for row in rows)


def database_files(database_url: str) -> list[Path]:
    path = Path(database_url.removeprefix("sqlite:///"))
    return [file for file in path.parent.iterdir() if file.name.startswith(path.name)]


def test_create_prints_key_once_and_stores_hash(run, engine, database_url, caplog):
    caplog.set_level(logging.DEBUG)
    result = run("keys", "create", "--name", "reporting", "--company", str(ACME))
    key = created_key(result)

    assert len(key) >= 43
    assert key not in result.stderr
    stored = stored_text(engine)
    assert key not in stored
    assert hash_key(key) in stored
    assert key[:8] in stored
    assert key not in caplog.text
    assert hash_key(key) not in caplog.text


def test_database_file_holds_no_plaintext_key(run, engine, database_url):
    if not database_url.startswith("sqlite"):
        pytest.skip("reads the bytes of the SQLite database file")
    key = created_key(run("keys", "create", "--name", "file scan", "--all"))
    engine.dispose()
    files = database_files(database_url)
    contents = b"".join(file.read_bytes() for file in files)

    assert files
    assert hash_key(key).encode() in contents
    assert key.encode() not in contents


def test_list_shows_no_key_or_hash(run, engine):
    key = created_key(
        run(
            "keys",
            "create",
            "--name",
            "sales team",
            "--company",
            str(ACME),
            "--department",
            str(SALES),
        )
    )
    result = run("keys", "list")

    assert result.exit_code == 0, result.output
    assert "sales team" in result.output
    assert f"company={ACME};department={SALES}" in result.output
    assert key[:8] in result.output
    assert key not in result.output
    assert hash_key(key) not in result.output


def test_create_rejects_inconsistent_scope(run):
    both = run("keys", "create", "--name", "x", "--all", "--company", "1")
    neither = run("keys", "create", "--name", "x")
    orphan = run("keys", "create", "--name", "x", "--all", "--department", "3")

    assert both.exit_code == 2
    assert neither.exit_code == 2
    assert orphan.exit_code == 2
    assert "--department needs --company" in orphan.stderr


def test_create_warns_about_unknown_department(run, engine):
    load_history(engine)
    result = run(
        "keys", "create", "--name", "x", "--company", str(GLOBEX), "--department", "11"
    )

    assert result.exit_code == 0, result.output
    assert "department 11 is not a live department of company 2" in result.stderr


def api_client(engine: Engine) -> TestClient:
    settings = Settings(
        api_keys=orjson.dumps({"secret-environment-value": "*"}).decode()
    )
    return TestClient(create_app(settings, engine))


def test_stored_key_reads_report(run, engine):
    load_history(engine)
    key = created_key(run("keys", "create", "--name", "acme", "--company", str(ACME)))
    with api_client(engine) as client:
        allowed = client.get(
            REPORT.format(company=ACME), headers={"Authorization": f"Bearer {key}"}
        )
        other = client.get(
            REPORT.format(company=GLOBEX), headers={"Authorization": f"Bearer {key}"}
        )

    assert allowed.status_code == 200
    assert other.status_code == 403
    with engine.connect() as conn:
        last_used = conn.execute(select(schema.api_keys.c.last_used_at_us)).scalar()
    assert last_used is not None


@pytest.mark.parametrize("by", ["id", "prefix"])
def test_revoked_key_rejected(run, engine, by):
    load_history(engine)
    key = created_key(run("keys", "create", "--name", "old", "--all"))
    stored = find_keys(engine, key[:8])[0]
    reference = str(stored.id) if by == "id" else stored.prefix
    with api_client(engine) as client:
        before = client.get(
            REPORT.format(company=ACME), headers={"Authorization": f"Bearer {key}"}
        )
        revoked = run("keys", "revoke", reference)
        after = client.get(
            REPORT.format(company=ACME), headers={"Authorization": f"Bearer {key}"}
        )
    again = run("keys", "revoke", reference)

    assert before.status_code == 200
    assert revoked.exit_code == 0, revoked.output
    assert f"revoked API key id={stored.id}" in revoked.output
    assert after.status_code == 401
    assert after.headers["www-authenticate"] == 'Bearer error="invalid_token"'
    assert again.exit_code == 0
    assert "was revoked already" in again.output
    listed = run("keys", "list").output.splitlines()[1].split("\t")
    assert listed[-1] != "-"


def test_revoke_unknown_and_ambiguous(run, engine):
    _, first = create_key(engine, "one", "all")
    _, second = create_key(engine, "two", "all")
    with engine.begin() as conn:
        conn.execute(
            schema.api_keys.update()
            .where(schema.api_keys.c.id == second.id)
            .values(prefix=first.prefix)
        )

    unknown = run("keys", "revoke", "nosuchkey")
    ambiguous = run("keys", "revoke", first.prefix)

    assert unknown.exit_code == 2
    assert "no API key has the id or prefix nosuchkey" in unknown.stderr
    assert ambiguous.exit_code == 2
    assert f"{first.id}, {second.id}" in ambiguous.stderr


def test_logs_never_contain_keys(run, engine, caplog):
    caplog.set_level(logging.DEBUG)
    load_history(engine)
    key = created_key(run("keys", "create", "--name", "logged", "--all"))
    with api_client(engine) as client:
        for credential in (
            key,
            key + "x",
            "secret-environment-value",
            "secret-environment-valuex",
        ):
            client.get(
                REPORT.format(company=ACME),
                headers={"Authorization": f"Bearer {credential}"},
            )
            client.cookies.set("license_report_key", credential)
            client.get(REPORT.format(company=ACME))
            client.cookies.clear()
    run("keys", "list")
    run("keys", "revoke", key[:8])

    assert caplog.records
    for secret in (key, hash_key(key), "secret-environment-value"):
        assert secret not in caplog.text


def test_key_ring_authenticate(engine):
    key, stored = create_key(engine, "ring", "department", ACME, SALES)
    ring = KeyRing({"secret-environment-value": [ACME, GLOBEX]}, engine)

    principal = ring.authenticate(key)
    environment = ring.authenticate("secret-environment-value")

    assert principal is not None
    assert principal.scope == "department"
    assert principal.company_ids == {ACME}
    assert principal.department_id == SALES
    assert principal.identity == f"key:{stored.id}"
    assert environment is not None
    assert environment.company_ids == {ACME, GLOBEX}
    assert ring.authenticate("secret-environment-valuex") is None
    assert ring.authenticate(key[:-1]) is None
    assert ring.authenticate("") is None


def test_scope_check_constraint(engine):
    with pytest.raises(IntegrityError), engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO api_keys (prefix, key_hash, name, scope, company_id, "
                "created_at_us) VALUES ('abcdefgh', 'x', 'n', 'department', 1, 0)"
            )
        )


@pytest.fixture
def serve(run, monkeypatch, caplog):
    """Run `license-report serve` through the app's start-up and shutdown only.

    uvicorn.run is replaced by a TestClient that runs the app's lifespan, so no
    port is opened. The returned function runs the command and returns its
    result and the messages of the warnings logged meanwhile.
    """
    import uvicorn

    for name in ("API_KEYS", "JWT_KEY", "TRUSTED_PROXY_HEADER"):
        monkeypatch.delenv(f"LICENSE_REPORT_{name}", raising=False)

    def start_and_stop(application, **_options):
        with TestClient(application):
            pass

    monkeypatch.setattr(uvicorn, "run", start_and_stop)

    def invoke():
        caplog.clear()
        caplog.set_level(logging.INFO)
        result = run("serve")
        warnings = [
            record.getMessage()
            for record in caplog.records
            if record.levelno == logging.WARNING
        ]
        return result, warnings

    return invoke


def test_serve_with_stored_key_does_not_warn(run, serve):
    created_key(run("keys", "create", "--name", "stored only", "--all"))

    result, warnings = serve()

    assert result.exit_code == 0, result.output
    assert warnings == []


def test_serve_warns_once_without_credentials(run, serve):
    key = created_key(run("keys", "create", "--name", "revoked", "--all"))
    assert run("keys", "revoke", key[:8]).exit_code == 0

    result, warnings = serve()

    assert result.exit_code == 0, result.output
    assert len(warnings) == 1
    assert "every report request is rejected with 401" in warnings[0]
