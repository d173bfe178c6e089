"""Service settings, read once from the environment (prefix ``LICENSE_REPORT_``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_DATABASE_URL = "sqlite:///./license-report.db"

CompanyScope = list[int] | Literal["*"]


class Settings(BaseSettings):
    """All settings of the consumer, the API and the operator commands."""

    model_config = SettingsConfigDict(
        env_prefix="LICENSE_REPORT_", env_file=None, extra="ignore"
    )

    database_url: str = DEFAULT_DATABASE_URL
    kafka_bootstrap_servers: str = "localhost:9092"
    kafka_topic: str = "license-events"
    kafka_group_id: str = "license-report"
    # Kafka consumer group timings in milliseconds; the defaults are kafka-python's.
    kafka_session_timeout_ms: int = Field(default=45_000, gt=0)
    kafka_heartbeat_interval_ms: int = Field(default=3_000, gt=0)
    kafka_max_poll_interval_ms: int = Field(default=300_000, gt=0)
    # Upper bounds of one batch: records per poll and milliseconds to wait for them.
    batch_max_records: int = Field(default=5_000, gt=0)
    batch_timeout_ms: int = Field(default=500, gt=0)
    # JSON object mapping each API key to a list of company ids or to "*".
    api_keys: SecretStr = SecretStr("{}")
    api_host: str = "127.0.0.1"
    api_port: int = Field(default=8000, gt=0, lt=65536)
    # The consumer's Prometheus endpoint; port 0 turns it off.
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(default=9464, ge=0, lt=65536)
    # Most events a point-in-time (as_of) report may replay from the event store.
    as_of_max_events: int = Field(default=500_000, gt=0)
    log_level: str = "INFO"

    @field_validator("api_keys")
    @classmethod
    def _check_api_keys(cls, value: SecretStr) -> SecretStr:
        parse_api_keys(value.get_secret_value())
        return value

    def key_scopes(self) -> dict[str, CompanyScope]:
        """Return the API keys and the companies each one may read."""
        return parse_api_keys(self.api_keys.get_secret_value())


def parse_api_keys(text: str) -> dict[str, CompanyScope]:
    """Parse ``LICENSE_REPORT_API_KEYS``; raise ValueError naming the bad entry."""
    import orjson

    try:
        raw = orjson.loads(text)
    except orjson.JSONDecodeError as error:
        raise ValueError(
            f"LICENSE_REPORT_API_KEYS is not valid JSON ({error}); expected an "
            'object such as {"key1": [101, 102], "key2": "*"}'
        ) from None
    if not isinstance(raw, dict):
        raise ValueError(
            "LICENSE_REPORT_API_KEYS must be a JSON object that maps each key to a "
            'list of company ids or to "*"'
        )
    scopes: dict[str, CompanyScope] = {}
    for key, scope in raw.items():
        if not key:
            raise ValueError("LICENSE_REPORT_API_KEYS contains an empty key")
        if scope == "*":
            scopes[key] = "*"
        elif isinstance(scope, list) and all(
            isinstance(c, int) and not isinstance(c, bool) for c in scope
        ):
            scopes[key] = list(scope)
        else:
            raise ValueError(
                "LICENSE_REPORT_API_KEYS maps a key to an invalid scope; each value "
                'must be a list of integer company ids or "*"'
            )
    return scopes
