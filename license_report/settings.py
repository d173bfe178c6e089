"""Service settings, read once from the environment (prefix ``LICENSE_REPORT_``)."""

from __future__ import annotations

import re
from ipaddress import IPv4Network, IPv6Network, ip_network
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_DATABASE_URL = "sqlite:///./license-report.db"

CompanyScope = list[int] | Literal["*"]
Network = IPv4Network | IPv6Network

_HEADER_NAME = re.compile(r"[A-Za-z0-9-]+")
# Headers that carry other credentials or that proxies rewrite themselves.
_RESERVED_HEADERS = {"authorization", "cookie", "host", "x-forwarded-for"}


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
    # Bytes of records that one fetch response may carry per partition and in
    # all. kafka-python's fetch_max_bytes default is 50 MiB, and
    # docs/operations.md gives the measurements behind the 2 MiB default.
    kafka_max_partition_fetch_bytes: int = Field(default=1_048_576, gt=0)
    kafka_fetch_max_bytes: int = Field(default=2_097_152, gt=0)
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
    # LMS completion report URL of a page row: {course_id}, {user_id}, {license_id}.
    completion_url_template: str | None = None
    log_level: str = "INFO"
    # Access control of the API: see docs/access.md.
    # Request header through which a trusted reverse proxy passes the caller's
    # scope, such as X-License-Report-Scope; unset turns proxy authentication off.
    trusted_proxy_header: str | None = None
    # Comma-separated addresses or networks (CIDR) of the proxies whose scope
    # header the API honours.
    trusted_proxies: Annotated[list[Network], NoDecode] = []
    # HS256 shared secret or RS256 public key (PEM) that bearer JWTs are signed
    # with; unset turns JWT authentication off.
    jwt_key: SecretStr | None = None
    jwt_algorithm: Literal["HS256", "RS256"] = "HS256"
    # When set, a JWT must carry this aud or iss claim.
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    # Requests per minute that one credential may make to one API process; 0
    # turns the limit off.
    rate_limit_per_minute: int = Field(default=600, ge=0)
    # Comma-separated origins that browsers may call the API from; empty keeps
    # cross-origin requests off.
    cors_origins: Annotated[list[str], NoDecode] = []

    @field_validator("api_keys")
    @classmethod
    def _check_api_keys(cls, value: SecretStr) -> SecretStr:
        parse_api_keys(value.get_secret_value())
        return value

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _parse_trusted_proxies(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        networks = []
        for item in _split_list(value):
            try:
                networks.append(ip_network(item, strict=False))
            except ValueError:
                raise ValueError(
                    f"{item!r} is not an IP address or CIDR network, such as "
                    "10.0.0.5 or 10.0.0.0/24"
                ) from None
        return networks

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _parse_cors_origins(cls, value: object) -> object:
        return _split_list(value) if isinstance(value, str) else value

    @field_validator("trusted_proxy_header")
    @classmethod
    def _check_proxy_header(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        value = value.strip()
        if not _HEADER_NAME.fullmatch(value):
            raise ValueError(
                f"{value!r} is not an HTTP header name; use letters, digits and "
                "hyphens, such as X-License-Report-Scope"
            )
        if value.lower() in _RESERVED_HEADERS:
            raise ValueError(f"{value} cannot carry the proxy's scope; name another")
        return value

    @model_validator(mode="after")
    def _check_proxy_settings(self) -> Settings:
        if self.trusted_proxy_header and not self.trusted_proxies:
            raise ValueError(
                "LICENSE_REPORT_TRUSTED_PROXY_HEADER is set but "
                "LICENSE_REPORT_TRUSTED_PROXIES is empty; list the proxies' addresses"
            )
        return self

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


def _split_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]
