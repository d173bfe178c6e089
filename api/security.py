"""HTTP hardening: security headers, request size limits, CORS and rate limits.

``install_security`` adds the middleware to an application. The rate limiter
is called by ``api.auth.require_principal`` once a request has authenticated,
because the limit is per credential.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

from fastapi import FastAPI
from starlette.datastructures import MutableHeaders
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import ApiError, Problem, error_response
from license_report.settings import Settings

CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; "
    "img-src 'self' data:; frame-ancestors 'none'; form-action 'self'; "
    "base-uri 'none'"
)
# Added to every response that does not set the header itself, so a route
# may choose its own Cache-Control (a static asset, say). Data responses
# never do.
SECURITY_HEADERS = {
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    "content-security-policy": CONTENT_SECURITY_POLICY,
    "cache-control": "no-store",
}
MAX_BODY_BYTES = 16 * 1024
# The request target (path, "?" and query string), as sent on the request line.
MAX_URL_BYTES = 8 * 1024
# Matches api.errors' handler of unexpected errors, which logs the error.
_INTERNAL_ERROR = "internal server error; the request was logged, retry later"


def install_security(app: FastAPI, settings: Settings) -> None:
    """Add the rate limiter and the hardening middleware to ``app``.

    Starlette runs the middleware added last first, so the security headers
    also reach the responses of the CORS and size-limit middleware.
    """
    if settings.rate_limit_per_minute > 0:
        app.state.rate_limiter = RateLimiter(settings.rate_limit_per_minute)
    else:
        app.state.rate_limiter = None
    app.add_middleware(RequestLimitsMiddleware)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET"],
            allow_headers=["Authorization"],
            expose_headers=["Retry-After"],
            allow_credentials=False,
            max_age=600,
        )
    app.add_middleware(SecurityHeadersMiddleware)


class SecurityHeadersMiddleware:
    """Add SECURITY_HEADERS to every HTTP response, 500 responses included."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_with_headers(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers.setdefault(name, value)
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        except Exception:
            # Starlette sends the response to an unexpected error from outside
            # all middleware, so it would lack these headers. Sending it here
            # first makes Starlette log the error and skip its own response.
            if not started:
                response = error_response(500, [Problem(_INTERNAL_ERROR)])
                await response(scope, receive, send_with_headers)
            raise


class RequestLimitsMiddleware:
    """Reject long URLs with 414 and bodies over MAX_BODY_BYTES with 413.

    The body is read up front, so the limit holds for chunked requests without
    a Content-Length too, and is then handed to the application unchanged.
    """

    def __init__(
        self,
        app: ASGIApp,
        max_body_bytes: int = MAX_BODY_BYTES,
        max_url_bytes: int = MAX_URL_BYTES,
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_url_bytes = max_url_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("raw_path") or scope["path"].encode("utf-8")
        query = scope.get("query_string", b"")
        if len(path) + (len(query) + 1 if query else 0) > self.max_url_bytes:
            message = (
                f"the URL is longer than {self.max_url_bytes} bytes; send fewer or "
                "shorter query parameters"
            )
            await error_response(414, [Problem(message)])(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_body_bytes:
            await self._too_large(scope, receive, send)
            return

        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":
                # The client disconnected, and the application receives that.
                await self.app(scope, _replay([message], receive), send)
                return
            body += message.get("body", b"")
            if len(body) > self.max_body_bytes:
                await self._too_large(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        whole = {"type": "http.request", "body": bytes(body), "more_body": False}
        await self.app(scope, _replay([whole], receive), send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = f"the request body is larger than {self.max_body_bytes} bytes"
        await error_response(413, [Problem(message)])(scope, receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            text = value.decode("latin-1").strip()
            return int(text) if text.isdigit() else None
    return None


def _replay(messages: list[Message], receive: Receive) -> Receive:
    """Return a receive callable that yields ``messages``, then reads ``receive``."""
    pending = list(messages)

    async def replayed() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replayed


class RateLimiter:
    """A token bucket per credential, held in this process's memory.

    Each bucket holds up to ``per_minute`` requests and refills at
    ``per_minute`` a minute, so a credential may send a burst of a minute's
    requests at once and then ``per_minute / 60`` a second. Every API process
    keeps its own buckets: with N processes a credential gets N times the
    limit.
    """

    # Past this many buckets, full ones are dropped: a full bucket is the same
    # as a new one.
    MAX_BUCKETS = 10_000

    def __init__(
        self, per_minute: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.per_minute = per_minute
        self._rate = per_minute / 60.0
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def check(self, identity: str) -> None:
        """Take one request from ``identity``'s bucket, or raise 429."""
        wait = self.acquire(identity)
        if wait > 0:
            seconds = max(1, math.ceil(wait))
            message = (
                f"rate limit exceeded: a credential may make {self.per_minute} "
                f"requests per minute (LICENSE_REPORT_RATE_LIMIT_PER_MINUTE); "
                f"retry after {seconds} s"
            )
            raise ApiError(429, [Problem(message)], {"Retry-After": str(seconds)})

    def acquire(self, identity: str) -> float:
        """Take one request; return 0, or the seconds until one is available."""
        now = self._clock()
        with self._lock:
            tokens, updated = self._buckets.get(identity, (self.per_minute, now))
            tokens = min(self.per_minute, tokens + (now - updated) * self._rate)
            if tokens >= 1:
                self._buckets[identity] = (tokens - 1, now)
                if len(self._buckets) > self.MAX_BUCKETS:
                    self._drop_full(now)
                return 0.0
            self._buckets[identity] = (tokens, now)
            return (1 - tokens) / self._rate

    def _drop_full(self, now: float) -> None:
        for identity, (tokens, updated) in list(self._buckets.items()):
            if tokens + (now - updated) * self._rate >= self.per_minute:
                del self._buckets[identity]
