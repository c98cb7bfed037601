"""The one admin guard of every driftline service: `Authorization: Bearer $DRIFTLINE_ADMIN_TOKEN`.

    >>> from pydantic import SecretStr
    >>> check_admin(Settings(admin_token=SecretStr("s3cret")), "Bearer s3cret")   # passes
    >>> check_admin(Settings(admin_token=SecretStr("")), "Bearer ")
    Traceback (most recent call last):
    ...
    fastapi.exceptions.HTTPException: 403: admin routes are closed: no DRIFTLINE_ADMIN_TOKEN is configured

The same answers everywhere (README, "Security"):
- 403 when no token is configured (unset or empty): the routes are closed, whatever is sent;
- 401 (with `WWW-Authenticate: Bearer`) when the header is missing, malformed or the token wrong.
The comparison is constant-time. It must never open a route on an empty token.
"""

from __future__ import annotations

import hmac

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .settings import Settings

CLOSED = "admin routes are closed: no DRIFTLINE_ADMIN_TOKEN is configured"
UNAUTHORIZED = "admin route: send 'Authorization: Bearer <DRIFTLINE_ADMIN_TOKEN>' with the right token"


def check_admin(settings: Settings, authorization: str | None) -> None:
    """Raise the HTTPException the request gets unless it carries the configured admin token."""
    token = settings.admin_token.get_secret_value().encode() if settings.admin_token else b""
    if not token:
        raise HTTPException(403, CLOSED)
    scheme, _, given = (authorization or "").partition(" ")
    # compare_digest on bytes takes the same time whatever matches; a wrong scheme is compared too
    ok = hmac.compare_digest(given.strip().encode("utf-8", "surrogateescape"), token)
    if not ok or scheme.lower() != "bearer":
        raise HTTPException(401, UNAUTHORIZED, headers={"WWW-Authenticate": "Bearer"})


# Declared for the OpenAPI docs (Swagger's "Authorize"); the check itself is check_admin's.
bearer = HTTPBearer(auto_error=False, description="the admin token (DRIFTLINE_ADMIN_TOKEN)")


def admin_dependency(settings: Settings):
    """The FastAPI dependency of admin routes: `dependencies=[Depends(admin_dependency(settings))]`."""

    def require_admin(request: Request, _doc: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        check_admin(settings, request.headers.get("authorization"))

    return require_admin


ADMIN_RESPONSES = {
    401: {"description": "no `Authorization: Bearer` header, or a wrong token"},
    403: {"description": "no admin token is configured: admin routes are closed"},
}
