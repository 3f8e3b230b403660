"""Who may use the page and the API: the token a non-loopback bind requires, the session cookie a
signed-in browser carries, the CSRF check on every state-changing request, the size bound on
request bodies, and the security headers on every response."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import os
import secrets
from collections.abc import Mapping
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

__all__ = [
    "CSRF_COOKIE",
    "CSRF_HEADER",
    "MAX_BODY",
    "SESSION_COOKIE",
    "BadRequest",
    "Guard",
    "TokenRequiredError",
    "effective_token",
    "is_loopback",
    "read_json",
]

SESSION_COOKIE = "scanrestore_session"
CSRF_COOKIE = "scanrestore_csrf"
CSRF_HEADER = "x-csrf-token"
MAX_BODY = 64 * 1024  # bytes of a request body: decisions and notes are small
_SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}
_OPEN_PATHS = ("/static/", "/login")  # reachable without signing in

HEADERS = {
    "content-security-policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
        "frame-ancestors 'none'"
    ),
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "cross-origin-opener-policy": "same-origin",
    "cross-origin-resource-policy": "same-origin",
}


class TokenRequiredError(Exception):
    """A bind address other than loopback without a token."""


class BadRequest(Exception):
    """A request the API refuses with a 4xx status and a reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def effective_token(configured: str, environ: Mapping[str, str] = os.environ) -> str:
    """$SCANRESTORE_WEB_TOKEN wins over `[web] token`; empty means none."""
    return environ.get("SCANRESTORE_WEB_TOKEN") or configured


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str) -> None:
    if not is_loopback(host) and not token:
        raise TokenRequiredError(
            f"web: binding {host} (not loopback) requires a token: set [web] token or "
            "$SCANRESTORE_WEB_TOKEN (at least 16 characters)"
        )
    if token and len(token) < 16:
        raise TokenRequiredError("web: the token must be at least 16 characters")


def session_value(token: str) -> str:
    """The session cookie a signed-in browser carries: derived from the token, so it changes
    when the token does and proves knowledge of it without containing it."""
    return hmac.new(token.encode(), b"scanrestore web session", hashlib.sha256).hexdigest()


def _error(status: int, reason: str) -> JSONResponse:
    return JSONResponse({"error": reason}, status_code=status)


class Guard:
    """ASGI middleware: the host check, authentication, the CSRF check, the body bound and the
    security headers. `token` empty: no sign-in (loopback only)."""

    def __init__(self, app: ASGIApp, *, token: str, allowed_hosts: tuple[str, ...]) -> None:
        self.app = app
        self.token = token
        self.allowed_hosts = allowed_hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        refusal = self._refusal(request)

        async def send_with_headers(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                names = {name.lower() for name, _ in headers}
                headers += [
                    (name.encode(), value.encode())
                    for name, value in HEADERS.items()
                    if name.encode() not in names
                ]
                message = {**message, "headers": headers}
            await send(message)

        if refusal is not None:
            await refusal(scope, receive, send_with_headers)
            return
        await self.app(scope, receive, send_with_headers)

    def _refusal(self, request: Request) -> Response | None:
        host = (request.headers.get("host") or "").rsplit(":", 1)[0].strip("[]")
        if self.allowed_hosts and host not in self.allowed_hosts:
            return _error(400, f"host {host!r} is not served here")
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
            return _error(413, f"request body larger than {MAX_BODY} bytes")
        path = request.url.path
        bearer = self._bearer_ok(request)
        if bearer is False:
            return _error(401, "wrong token")
        session = self._session_ok(request)
        if self.token and not bearer and not session and not path.startswith(_OPEN_PATHS):
            if request.method in _SAFE_METHODS and not path.startswith(("/api/", "/metrics")):
                return Response(status_code=303, headers={"location": "/login"})
            return _error(401, "a token is required: Authorization: Bearer TOKEN")
        if request.method not in _SAFE_METHODS and not bearer:
            return self._csrf_refusal(request)
        return None

    def _bearer_ok(self, request: Request) -> bool | None:
        """True: the right token; False: a wrong one; None: none given."""
        header = request.headers.get("authorization")
        if header is None:
            return None
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not self.token:
            return False
        return hmac.compare_digest(value.strip().encode(), self.token.encode())

    def _session_ok(self, request: Request) -> bool:
        cookie = request.cookies.get(SESSION_COOKIE)
        if not self.token or not cookie:
            return False
        return hmac.compare_digest(cookie.encode(), session_value(self.token).encode())

    def _csrf_refusal(self, request: Request) -> Response | None:
        """A state change from a browser: same origin, and the CSRF header equal to the CSRF
        cookie (which another site can neither read nor set)."""
        origin = request.headers.get("origin")
        expected = f"{request.url.scheme}://{request.headers.get('host', '')}"
        if origin is not None and origin != expected:
            return _error(403, f"cross-origin request from {origin} refused")
        if request.url.path == "/login":
            return None  # the sign-in form carries the token itself
        cookie = request.cookies.get(CSRF_COOKIE, "")
        header = request.headers.get(CSRF_HEADER, "")
        if not cookie or not hmac.compare_digest(cookie.encode(), header.encode()):
            return _error(403, "CSRF check failed: the X-CSRF-Token header must match the cookie")
        return None


def new_csrf() -> str:
    return secrets.token_hex(16)


async def read_json(request: Request) -> dict[str, Any]:
    """The request's JSON object, its body read up to MAX_BODY bytes (a chunked body too)."""
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
        raise BadRequest(415, "send Content-Type: application/json")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise BadRequest(413, f"request body larger than {MAX_BODY} bytes")
    try:
        value = json.loads(body or b"{}")
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(400, f"malformed JSON: {exc}") from None
    if not isinstance(value, dict):
        raise BadRequest(400, "the body must be a JSON object")
    return value
