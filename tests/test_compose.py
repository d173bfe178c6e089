"""docker-compose.yml cannot run here, so check that it matches the code."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from typer.main import get_command

from license_report.cli import app
from license_report.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
PREFIX = "LICENSE_REPORT_"


def _commands() -> set[str]:
    return set(get_command(app).commands)


def test_compose_has_required_services():
    assert {"kafka", "postgres", "consumer", "api"} <= set(SERVICES)


@pytest.mark.parametrize("name", ["kafka", "postgres", "api"])
def test_compose_service_has_healthcheck(name):
    assert "test" in SERVICES[name]["healthcheck"]


@pytest.mark.parametrize("name", ["migrate", "consumer", "api"])
def test_compose_commands_exist(name):
    command = SERVICES[name]["command"][0]
    assert command in _commands()


def test_compose_variables_are_settings():
    fields = set(Settings.model_fields)
    for name, service in SERVICES.items():
        for variable in service.get("environment", {}):
            if variable.startswith(PREFIX):
                field = variable.removeprefix(PREFIX).lower()
                assert field in fields, f"{name}: {variable} is not a setting"


def test_compose_kafka_runs_kraft():
    environment = SERVICES["kafka"]["environment"]
    assert "controller" in environment["KAFKA_PROCESS_ROLES"]
    assert SERVICES["kafka"]["image"].startswith("apache/kafka")


def test_compose_consumer_points_at_services():
    environment = SERVICES["consumer"]["environment"]
    broker_host = environment["LICENSE_REPORT_KAFKA_BOOTSTRAP_SERVERS"].split(":")[0]
    database_host = re.search(r"@([^:/]+)", environment["LICENSE_REPORT_DATABASE_URL"])
    assert broker_host in SERVICES
    assert database_host.group(1) in SERVICES


def test_compose_api_healthcheck_path_is_served():
    from fastapi.testclient import TestClient

    from api.app import create_app

    check = " ".join(SERVICES["api"]["healthcheck"]["test"])
    path = re.search(r"http://[^/]+(/[\w/-]*)", check).group(1)
    # Without a with-block the client skips startup, so no database is needed.
    client = TestClient(create_app(Settings()))
    assert client.get(path).status_code == 200
