"""What bounds the consumer's memory: its imports and its Kafka fetch sizes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from sqlalchemy import create_engine

from api.auth import MAX_ID as API_MAX_ID
from consumer import loop as consumer_loop
from consumer import topic_reader
from license_report.keys_cli import MAX_ID as CLI_MAX_ID
from license_report.settings import Settings

# Packages that only the API, the downloads or the benchmarks use.
NOT_FOR_CONSUME = (
    "api",
    "bench",
    "cryptography",
    "fastapi",
    "jinja2",
    "jwt",
    "openpyxl",
    "starlette",
    "uvicorn",
    "xlsxwriter",
)


class _KafkaCreated(Exception):
    """Raised by the stand-in KafkaConsumer once it has stored its arguments."""


def test_consume_imports_no_api_packages():
    script = (
        "import json, sys\n"
        "import license_report.cli, consumer.loop\n"
        "print(json.dumps(sorted({name.split('.')[0] for name in sys.modules})))\n"
    )
    output = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    loaded = set(json.loads(output))
    for package in NOT_FOR_CONSUME:
        assert package not in loaded, f"license-report consume imports {package}"


def test_keys_cli_max_id_matches_api():
    assert CLI_MAX_ID == API_MAX_ID


@pytest.mark.parametrize(
    "module", [consumer_loop, topic_reader], ids=lambda m: m.__name__
)
def test_kafka_fetch_sizes_from_settings(module, monkeypatch):
    created: dict[str, object] = {}

    def create(**config):
        created.update(config)
        raise _KafkaCreated

    monkeypatch.setattr(module, "KafkaConsumer", create)
    settings = Settings(
        kafka_fetch_max_bytes=300_000,
        kafka_max_partition_fetch_bytes=200_000,
        metrics_port=0,
    )
    engine = create_engine("sqlite://")
    with pytest.raises(_KafkaCreated):
        if module is consumer_loop:
            consumer_loop.LicenseEventConsumer(settings, engine).run()
        else:
            next(topic_reader.read_topic(settings))

    assert created["fetch_max_bytes"] == 300_000
    assert created["max_partition_fetch_bytes"] == 200_000


def test_fetch_max_bytes_default():
    assert Settings().kafka_fetch_max_bytes == 2_097_152
