"""The one admin guard of every driftline service: `Authorization: Bearer $DRIFTLINE_ADMIN_TOKEN`,
and the audit record of every admin request.

    >>> from pydantic import SecretStr
    >>> check_admin(Settings(admin_token=SecretStr("s3cret")), "Bearer s3cret")
    'admin'
    >>> check_admin(Settings(admin_token=SecretStr("")), "Bearer ")
    Traceback (most recent call last):
    ...
    fastapi.exceptions.HTTPException: 403: admin routes are closed: no DRIFTLINE_ADMIN_TOKEN is configured

The same answers everywhere (docs/security.md):
- 403 when no token is configured (unset or empty): the routes are closed, whatever is sent;
- 401 (with `WWW-Authenticate: Bearer`) when the header is missing, malformed or the token wrong.
The comparison is constant-time (`tokens.TokenSet`). It must never open a route on an empty token.
DRIFTLINE_ADMIN_TOKEN may also be a JSON list of `{"name", "token"}` objects, one per operator:
the audit then says which of them acted.

An admin route takes `admin_action(...)` as a dependency: it checks the token before the body is
validated, hands the route an `AdminAction` to say what the request is about, and writes the
audit record (`audit.py`) with the answer, whatever it is, before the answer is sent.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import Depends, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from . import audit
from .settings import UNKNOWN_CLIENT, Settings
from .tokens import TokenSet

CLOSED = "admin routes are closed: no DRIFTLINE_ADMIN_TOKEN is configured"
UNAUTHORIZED = "admin route: send 'Authorization: Bearer <DRIFTLINE_ADMIN_TOKEN>' with the right token"


def check_admin(settings: Settings, authorization: str | None) -> str:
    """The name of the admin whose token the request carries; else the HTTPException it gets."""
    holders = settings.admin_holders
    if not holders:
        raise HTTPException(403, CLOSED)
    name = TokenSet(holders).identify(authorization)
    if name is None:
        raise HTTPException(401, UNAUTHORIZED, headers={"WWW-Authenticate": "Bearer"})
    return name


# Declared for the OpenAPI docs (Swagger's "Authorize"); the check itself is check_admin's.
bearer = HTTPBearer(auto_error=False, description="the admin token (DRIFTLINE_ADMIN_TOKEN)")


@dataclass
class AdminAction:
    """An admin request let in: who sent it, what it is about; the route says the rest.

        >>> act = AdminAction(who="alice")
        >>> act.about(share=0.1).answered({"share": 0.1})
        {'share': 0.1}
    """

    who: str
    target: dict[str, Any] = field(default_factory=dict)
    answer: Any = None

    def about(self, **target: Any) -> "AdminAction":
        """What the request acts on (a version, a share, a reason): said in the audit record."""
        self.target.update(target)
        return self

    def answered(self, result: Any) -> Any:
        """The route's answer, kept for the audit record; returns it."""
        self.answer = result
        return result


def admin_action(settings: Settings, service: str, action: str, success: int = 200) -> Any:
    """The dependency of an admin route: `act: AdminAction = admin_action(settings, "prediction",
    "promote")`. `success` is the route's status when it succeeds. The record is written before the
    answer leaves (the dependency's function scope), so a client that got its answer finds it."""
    trail = settings.audit_log
    audit.open_trail(trail)

    def require_admin(request: Request, _doc: HTTPAuthorizationCredentials | None = Depends(bearer),
                      ) -> Iterator[AdminAction]:
        def write(who: str, target: dict[str, Any], status: int, detail: str | None, answer: Any = None) -> None:
            audit.write(audit.record(service=service, action=action, who=who,
                                     client=request.client.host if request.client else None, path=request.url.path,
                                     target=target, status=status, detail=detail, answer=answer), trail)

        try:
            act = AdminAction(who=check_admin(settings, request.headers.get("authorization")),
                              target=dict(request.path_params))
        except HTTPException as exc:
            write(UNKNOWN_CLIENT, dict(request.path_params), exc.status_code, exc.detail)
            raise
        try:
            yield act
        except Exception as exc:  # the route's own answer (404, 409, ...) or a body that does not validate
            write(act.who, act.target, *_answer_of(exc))
            raise
        write(act.who, act.target, success, None, act.answer)

    return Depends(require_admin, scope="function")


def _answer_of(exc: Exception) -> tuple[int, str]:
    """The status and detail that an exception leaving an admin route turns into."""
    if isinstance(exc, HTTPException):
        return exc.status_code, str(exc.detail)
    if isinstance(exc, RequestValidationError):
        return 422, "; ".join(f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg', '')}" for e in exc.errors())[:500]
    status = getattr(exc, "status", None)  # the services' own admin errors carry theirs
    return (status if isinstance(status, int) else 500), str(exc)[:500]
