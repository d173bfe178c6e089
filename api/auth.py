"""Bearer-key access control: which companies each API key may read."""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from typing import Annotated

from fastapi import Depends, Path, Request

from api.errors import ApiError, Problem
from license_report.settings import CompanyScope

# Ids are PostgreSQL BIGINT values, like the columns they are compared with.
MAX_ID = 2**63 - 1

_CHALLENGE = "Bearer"
_INVALID_KEY_CHALLENGE = 'Bearer error="invalid_token"'


class KeyRing:
    """The API keys and the scope of each, compared in constant time."""

    def __init__(self, scopes: Mapping[str, CompanyScope]) -> None:
        self._entries = [(key.encode("utf-8"), scope) for key, scope in scopes.items()]

    def __len__(self) -> int:
        return len(self._entries)

    def scope_of(self, key: str) -> CompanyScope | None:
        """Return the scope of ``key``, or None when it is not a known key.

        Every known key is compared, so the time taken does not reveal which
        key matched or how much of one did.
        """
        candidate = key.encode("utf-8")
        found: CompanyScope | None = None
        for known, scope in self._entries:
            if hmac.compare_digest(known, candidate) and found is None:
                found = scope
        return found


def require_key(request: Request) -> CompanyScope:
    """Return the scope of the request's bearer key, or raise 401."""
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        raise _unauthorized(
            "missing API key; send the header Authorization: Bearer <key>",
            _CHALLENGE,
        )
    scope = request.app.state.key_ring.scope_of(key)
    if scope is None:
        raise _unauthorized(
            "invalid API key; send a key that is configured in LICENSE_REPORT_API_KEYS",
            _INVALID_KEY_CHALLENGE,
        )
    return scope


def require_company(
    company_id: Annotated[int, Path(ge=1, le=MAX_ID)],
    scope: Annotated[CompanyScope, Depends(require_key)],
) -> int:
    """Return ``company_id`` when the request's key may read it, or raise 403."""
    if scope != "*" and company_id not in scope:
        problem = Problem(
            f"this API key may not read company {company_id}; use a key whose "
            "scope includes it",
            "company_id",
            "path",
            "forbidden",
        )
        raise ApiError(403, [problem])
    return company_id


def _unauthorized(message: str, challenge: str) -> ApiError:
    return ApiError(401, [Problem(message)], headers={"WWW-Authenticate": challenge})


# A company id from the path that the request's key may read.
AuthorizedCompany = Annotated[int, Depends(require_company)]
