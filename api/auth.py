"""Authentication and tenancy scopes of the API.

A request authenticates with the first of these that it carries:

1. ``Authorization: Bearer <credential>``;
2. the cookie ``license_report_key``, which the web page's login sets;
3. the header named by ``LICENSE_REPORT_TRUSTED_PROXY_HEADER``, honoured only
   from an address in ``LICENSE_REPORT_TRUSTED_PROXIES``.

A credential is a key from ``LICENSE_REPORT_API_KEYS``, a key created with
``license-report keys create``, or a JWT when ``LICENSE_REPORT_JWT_KEY`` is set.
Its scope is every company, one company, or one department subtree of a
company. docs/access.md describes them for operators.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from ipaddress import ip_address
from typing import Annotated, Any, Literal

import jwt
from fastapi import Depends, Path, Request
from fastapi.security import APIKeyCookie, HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import Engine, func, select, update
from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool

from api.errors import ApiError, Problem
from consumer.timestamps import now_us
from license_report.settings import CompanyScope, Network, Settings
from projections import schema

logger = logging.getLogger(__name__)

# Ids are PostgreSQL BIGINT values, like the columns they are compared with.
MAX_ID = 2**63 - 1

COOKIE_NAME = "license_report_key"
ScopeKind = Literal["all", "company", "department"]
SCOPE_KINDS: tuple[ScopeKind, ...] = ("all", "company", "department")

_CHALLENGE = "Bearer"
_INVALID_KEY_CHALLENGE = 'Bearer error="invalid_token"'
# A stored key's last use is written at most this often per API process.
_LAST_USED_INTERVAL_US = 60_000_000


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller and the part of the data it may read."""

    scope: ScopeKind
    # The companies of a "company" scope (an environment key may list several)
    # or the one company of a "department" scope; empty for "all".
    company_ids: frozenset[int]
    department_id: int | None
    # Names the credential in rate limits and logs; never a key or a hash.
    identity: str

    def access(self, company_id: int) -> CompanyAccess | None:
        """Return what this principal may read of ``company_id``, or None."""
        if self.scope == "all":
            return CompanyAccess(company_id)
        if company_id not in self.company_ids:
            return None
        return CompanyAccess(company_id, self.department_id)

    def describe(self) -> str:
        """Return the scope in the form the proxy header uses, e.g. company=7."""
        if self.scope == "all":
            return "all"
        companies = ",".join(str(company) for company in sorted(self.company_ids))
        if self.department_id is None:
            return f"company={companies}"
        return f"company={companies};department={self.department_id}"


class CompanyAccess(int):
    """A company id that the request may read, possibly limited to a subtree.

    It is an int, so code that needs only the id uses it unchanged. When
    ``department_id`` is set, only users assigned to that department or one
    below it are visible: api.report_sql adds that condition to every report
    query built for a CompanyAccess, so downloads and selectors that pass it on
    stay within the subtree.
    """

    department_id: int | None

    def __new__(cls, company_id: int, department_id: int | None = None):
        value = super().__new__(cls, company_id)
        value.department_id = department_id
        return value


def department_limit(company_id: int) -> int | None:
    """Return the department subtree that ``company_id``'s access is limited to."""
    return company_id.department_id if isinstance(company_id, CompanyAccess) else None


def hash_key(key: str) -> str:
    """Return the hex SHA-256 digest under which a key is stored.

    A plain unsalted hash is enough, because every stored key contains 256
    random bits from ``secrets``. Salts and slow hashes defend low-entropy
    passwords against lists of guesses and precomputed tables, and none of
    those covers 256 bits. An unsalted hash also lets the lookup use the
    unique index on the hash.
    """
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class JwtVerifier:
    """Checks bearer JWTs signed with the configured key and turns them into scopes.

    A token must carry ``exp`` and ``scope`` ("all", "company" or
    "department"). A "company" scope needs ``company_id``, and a "department"
    scope ``company_id`` and ``department_id``. ``aud`` and ``iss`` are
    checked when configured.
    """

    def __init__(
        self,
        key: str,
        algorithm: str,
        audience: str | None = None,
        issuer: str | None = None,
    ) -> None:
        self._key = key
        self._algorithm = algorithm
        self._audience = audience
        self._issuer = issuer

    def principal(self, token: str) -> Principal | None:
        """Return the token's principal, or None when it is invalid or expired."""
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=[self._algorithm],
                audience=self._audience,
                issuer=self._issuer,
                options={"require": ["exp", "scope"]},
            )
        except jwt.PyJWTError as error:
            logger.debug("JWT rejected: %s", type(error).__name__)
            return None
        scope = _scope_from_claims(claims)
        if scope is None:
            logger.debug("JWT rejected: invalid scope claims")
            return None
        kind, company_id, department_id = scope
        subject = claims.get("sub")
        identity = f"jwt:{subject}" if isinstance(subject, str) else "jwt"
        companies = frozenset() if company_id is None else frozenset({company_id})
        return Principal(kind, companies, department_id, identity)


def _scope_from_claims(
    claims: Mapping[str, Any],
) -> tuple[ScopeKind, int | None, int | None] | None:
    kind = claims.get("scope")
    company_id = claims.get("company_id")
    department_id = claims.get("department_id")
    if kind == "all":
        return "all", None, None
    if kind not in ("company", "department") or not _is_id(company_id):
        return None
    if kind == "company":
        return "company", company_id, None
    if not _is_id(department_id):
        return None
    return "department", company_id, department_id


def _is_id(value: object) -> bool:
    return (
        isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_ID
    )


def parse_proxy_scope(value: str) -> tuple[ScopeKind, int | None, int | None]:
    """Parse a proxy scope header: ``all``, ``company=7`` or ``company=7;department=3``.

    Raises ValueError on any other value.
    """
    text = value.strip()
    if text == "all":
        return "all", None, None
    fields: dict[str, int] = {}
    for part in text.split(";"):
        name, separator, number = part.partition("=")
        name, number = name.strip(), number.strip()
        if (
            not separator
            or name not in ("company", "department")
            or name in fields
            or not number.isdigit()
            or not 1 <= int(number) <= MAX_ID
        ):
            raise ValueError(
                "expected all, company=<id> or company=<id>;department=<id>"
            )
        fields[name] = int(number)
    if "company" not in fields:
        raise ValueError("expected all, company=<id> or company=<id>;department=<id>")
    if "department" in fields:
        return "department", fields["company"], fields["department"]
    return "company", fields["company"], None


class ProxyScopes:
    """Scopes that a trusted reverse proxy asserts in a request header."""

    # Seconds between two warnings about the header from an untrusted address.
    WARNING_INTERVAL_S = 60.0

    def __init__(self, header: str, proxies: Sequence[Network]) -> None:
        self.header = header
        self._proxies = list(proxies)
        self._lock = threading.Lock()
        self._last_warning = -self.WARNING_INTERVAL_S
        self._suppressed = 0

    def trusts(self, address: str | None) -> bool:
        """Return whether ``address`` (the request's peer) is a trusted proxy."""
        if address is None:
            return False
        try:
            peer = ip_address(address)
        except ValueError:
            return False
        return any(peer in network for network in self._proxies)

    def warn_untrusted(self, address: str | None) -> None:
        """Log that the header came from an untrusted address, at most once a minute."""
        now = time.monotonic()
        with self._lock:
            if now - self._last_warning < self.WARNING_INTERVAL_S:
                self._suppressed += 1
                return
            suppressed, self._suppressed = self._suppressed, 0
            self._last_warning = now
        logger.warning(
            "ignored the %s header of a request from untrusted address %s "
            "(%d more such requests since the last warning)",
            self.header,
            address,
            suppressed,
        )


class KeyRing:
    """Checks credentials against environment keys, stored keys and JWTs.

    ``authenticate`` is the entry point for code that has a raw credential,
    such as the web page's login. It reads the database, so call it from a
    worker thread in async code, or await ``authenticate_async`` instead.
    """

    def __init__(
        self,
        environment_keys: Mapping[str, CompanyScope],
        engine: Engine | None = None,
        jwt_verifier: JwtVerifier | None = None,
        proxy: ProxyScopes | None = None,
    ) -> None:
        self._environment = [
            (key.encode("utf-8"), _environment_principal(number, scope))
            for number, (key, scope) in enumerate(environment_keys.items(), start=1)
        ]
        self._engine = engine
        self._jwt = jwt_verifier
        self.proxy = proxy
        self._last_recorded: dict[int, int] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings, engine: Engine) -> KeyRing:
        """Build the key ring that ``settings`` describe, reading stored keys from
        ``engine``."""
        verifier = None
        if settings.jwt_key is not None:
            verifier = JwtVerifier(
                settings.jwt_key.get_secret_value(),
                settings.jwt_algorithm,
                settings.jwt_audience,
                settings.jwt_issuer,
            )
        proxy = None
        if settings.trusted_proxy_header:
            proxy = ProxyScopes(settings.trusted_proxy_header, settings.trusted_proxies)
        return cls(settings.key_scopes(), engine, verifier, proxy)

    def __len__(self) -> int:
        """Return the number of environment keys."""
        return len(self._environment)

    @property
    def accepts_jwt(self) -> bool:
        return self._jwt is not None

    def authenticate(self, credential: str) -> Principal | None:
        """Return the principal of a raw credential, or None when it is not valid.

        A credential of three dot-separated parts is checked as a JWT when a JWT
        key is configured. Otherwise it is compared with every environment key
        in constant time, then looked up among the stored keys by its hash. A
        revoked stored key is not valid.
        """
        if not credential:
            return None
        if self._is_jwt(credential):
            return self._jwt.principal(credential)
        principal = self._environment_principal(credential)
        if principal is not None:
            return principal
        return self._stored_principal(credential)

    async def authenticate_async(self, credential: str) -> Principal | None:
        """Check a credential as ``authenticate`` does, without blocking the event loop.

        Only the lookup of stored keys runs in a worker thread, because JWTs
        and environment keys are checked in memory.
        """
        if not credential:
            return None
        if self._is_jwt(credential):
            return self._jwt.principal(credential)
        principal = self._environment_principal(credential)
        if principal is not None or self._engine is None:
            return principal
        return await run_in_threadpool(self._stored_principal, credential)

    def _is_jwt(self, credential: str) -> bool:
        """Return True when a JWT key is set and ``credential`` has three parts."""
        return self._jwt is not None and credential.count(".") == 2

    def stored_key_count(self) -> int:
        """Return the number of stored keys that are not revoked."""
        if self._engine is None:
            return 0
        table = schema.api_keys
        query = select(func.count()).where(table.c.revoked_at_us.is_(None))
        with self._engine.connect() as conn:
            return conn.execute(query).scalar_one()

    def _environment_principal(self, credential: str) -> Principal | None:
        # Every key is compared, so the time taken does not reveal which key
        # matched or how much of one did.
        candidate = credential.encode("utf-8")
        found: Principal | None = None
        for known, principal in self._environment:
            if hmac.compare_digest(known, candidate) and found is None:
                found = principal
        return found

    def _stored_principal(self, credential: str) -> Principal | None:
        # The lookup goes by the hash, so its timing depends on the hash only,
        # which reveals nothing about any stored key.
        if self._engine is None:
            return None
        table = schema.api_keys
        query = select(
            table.c.id,
            table.c.scope,
            table.c.company_id,
            table.c.department_id,
            table.c.revoked_at_us,
        ).where(table.c.key_hash == hash_key(credential))
        with self._engine.connect() as conn:
            row = conn.execute(query).first()
        if row is None or row.revoked_at_us is not None:
            return None
        self._record_use(row.id)
        companies = frozenset() if row.company_id is None else {row.company_id}
        return Principal(
            row.scope, frozenset(companies), row.department_id, f"key:{row.id}"
        )

    def _record_use(self, key_id: int) -> None:
        """Write the key's last use, at most once a minute per key."""
        now = now_us()
        with self._lock:
            last = self._last_recorded.get(key_id)
            if last is not None and now - last < _LAST_USED_INTERVAL_US:
                return
            self._last_recorded[key_id] = now
        table = schema.api_keys
        try:
            with self._engine.begin() as conn:
                conn.execute(
                    update(table)
                    .where(table.c.id == key_id)
                    .values(last_used_at_us=now)
                )
        except SQLAlchemyError as error:
            logger.warning(
                "recording the last use of API key id=%d failed: %s",
                key_id,
                type(error).__name__,
            )


def _environment_principal(number: int, scope: CompanyScope) -> Principal:
    identity = f"environment-key:{number}"
    if scope == "*":
        return Principal("all", frozenset(), None, identity)
    return Principal("company", frozenset(scope), None, identity)


_bearer = HTTPBearer(
    auto_error=False,
    description="An API key or, when configured, a JWT: Authorization: Bearer <key>",
)
_cookie = APIKeyCookie(
    name=COOKIE_NAME,
    auto_error=False,
    description="The API key, as the web page's login stores it",
)


async def require_principal(
    request: Request,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    cookie: Annotated[str | None, Depends(_cookie)],
) -> Principal:
    """Authenticate the request and count it against its rate limit.

    Raises 401 for a missing or invalid credential and 429 when the
    credential's rate limit is used up. It runs on the event loop, because a
    trip to a worker thread costs more than the checks in memory. Only the
    lookup of a stored key runs in a worker thread.
    """
    principal = await _authenticate_request(request, bearer, cookie)
    limiter = getattr(request.app.state, "rate_limiter", None)
    if limiter is not None:
        limiter.check(principal.identity)
    request.state.principal = principal
    return principal


async def _authenticate_request(
    request: Request,
    bearer: HTTPAuthorizationCredentials | None,
    cookie: str | None,
) -> Principal:
    key_ring: KeyRing = request.app.state.key_ring
    if bearer is not None:
        return await _checked(key_ring, bearer.credentials.strip())
    if request.headers.get("authorization") is not None:
        raise _unauthorized(
            "invalid Authorization header; send Authorization: Bearer <key> "
            "with a non-empty key",
            _INVALID_KEY_CHALLENGE,
        )
    if cookie:
        return await _checked(key_ring, cookie)
    principal = _proxy_principal(request, key_ring.proxy)
    if principal is not None:
        return principal
    raise _unauthorized(
        "missing API key; send the header Authorization: Bearer <key>", _CHALLENGE
    )


async def _checked(key_ring: KeyRing, credential: str) -> Principal:
    principal = await key_ring.authenticate_async(credential)
    if principal is None:
        raise _unauthorized(
            "invalid API key: it is unknown, revoked or expired; send a current key",
            _INVALID_KEY_CHALLENGE,
        )
    return principal


def _proxy_principal(request: Request, proxy: ProxyScopes | None) -> Principal | None:
    """Return the scope that a trusted proxy asserts, or None when there is none."""
    if proxy is None:
        return None
    value = request.headers.get(proxy.header)
    if value is None:
        return None
    address = request.client.host if request.client else None
    if not proxy.trusts(address):
        proxy.warn_untrusted(address)
        return None
    try:
        kind, company_id, department_id = parse_proxy_scope(value)
    except ValueError as error:
        raise _unauthorized(
            f"the trusted proxy sent an invalid {proxy.header} header: {error}",
            _CHALLENGE,
        ) from None
    companies = frozenset() if company_id is None else frozenset({company_id})
    principal = Principal(kind, companies, department_id, "proxy")
    # Every user behind the proxy with the same scope shares one rate limit.
    return replace(principal, identity=f"proxy:{principal.describe()}")


async def require_company(
    company_id: Annotated[int, Path(ge=1, le=MAX_ID)],
    principal: Annotated[Principal, Depends(require_principal)],
) -> CompanyAccess:
    """Return the company id with the request's access to it, or raise 403.

    It is async so that FastAPI calls it on the event loop, because it does no I/O.
    """
    access = principal.access(company_id)
    if access is None:
        problem = Problem(
            f"this credential may not read company {company_id}; use one whose "
            "scope includes it",
            "company_id",
            "path",
            "forbidden",
        )
        raise ApiError(403, [problem])
    return access


def _unauthorized(message: str, challenge: str) -> ApiError:
    return ApiError(401, [Problem(message)], headers={"WWW-Authenticate": challenge})


# The authenticated caller of a request (401 without a valid credential).
AuthenticatedPrincipal = Annotated[Principal, Depends(require_principal)]
# A company id from the path that the request may read, as a CompanyAccess.
AuthorizedCompany = Annotated[CompanyAccess, Depends(require_company)]
