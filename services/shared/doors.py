"""The guard at a client door (ingestion's POST /v1/events and /v1/labels, prediction's /v1/predict
and /v1/predict/batch): who may come in, how often, counted per client.

    >>> from driftline.shared.settings import ClientToken, Settings
    >>> guard = DoorGuard("prediction", [ClientToken(name="shop", token="k7Qx-2mZ9pL4vR8sT1wY6uE3")], None)
    >>> guard.admit("Bearer k7Qx-2mZ9pL4vR8sT1wY6uE3")
    'shop'
    >>> guard.admit("Bearer nope")
    Traceback (most recent call last):
    ...
    fastapi.exceptions.HTTPException: 401: send 'Authorization: Bearer <token>' with a token of DRIFTLINE_PREDICT_TOKENS: the one sent is not known

With no token list (DRIFTLINE_INGEST_TOKENS / DRIFTLINE_PREDICT_TOKENS unset) the door is open:
every caller comes in as `anonymous`, and the service's log says so at start. A rate limit
(`ingestion.rate_limit`, `prediction.rate_limit`, or a client's own `rate_limit`) is counted per
client name in this process (the `limits` package's sliding window counter; its state is one
entry per name, and names come from the settings, never from a request); beyond it the answer
is 429 with `Retry-After`. The check runs before the body is read, and costs a few microseconds
(tests/test_doors.py measures it).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from fastapi import HTTPException
from limits import RateLimitItem, parse
from limits.storage import MemoryStorage
from limits.strategies import SlidingWindowCounterRateLimiter

from . import metrics
from .settings import ANONYMOUS_CLIENT, UNKNOWN_CLIENT, ClientToken, Settings
from .tokens import TokenSet

log = logging.getLogger(__name__)

DOORS = {  # service -> (the setting of its token list, its variable, the routes it guards)
    "ingestion": ("ingest_tokens", "DRIFTLINE_INGEST_TOKENS", "POST /v1/events and /v1/labels"),
    "prediction": ("predict_tokens", "DRIFTLINE_PREDICT_TOKENS", "POST /v1/predict and /v1/predict/batch"),
}


class DoorGuard:
    def __init__(self, service: str, holders: list[ClientToken] | None, rate_limit: str | None) -> None:
        self.service = service
        _, self.variable, self.routes = DOORS[service]
        self.tokens = None if holders is None else TokenSet(holders)
        names = self.tokens.names if self.tokens is not None else (ANONYMOUS_CLIENT,)
        own: dict[str, str | None] = {}
        for holder in holders or []:  # one name listed twice has one limit (settings.check_tokens)
            own.setdefault(holder.name, holder.rate_limit)
        self.limits: dict[str, RateLimitItem] = {}
        for name in names:
            rate = own.get(name) or rate_limit
            if rate:
                self.limits[name] = parse(rate)
        self.limiter = SlidingWindowCounterRateLimiter(MemoryStorage())
        # The counters' children, made once (a labelled lookup per request costs more than the check)
        # and exported at 0 from the start.
        self.admitted = {name: metrics.CLIENT_REQUESTS.labels(service, name) for name in names}
        self.limited = {name: metrics.CLIENT_REJECTIONS.labels(service, name, "rate_limited") for name in names}
        self.missing = metrics.CLIENT_REJECTIONS.labels(service, UNKNOWN_CLIENT, "missing")
        self.invalid = metrics.CLIENT_REJECTIONS.labels(service, UNKNOWN_CLIENT, "invalid")

    @classmethod
    def of(cls, service: str, settings: Settings) -> "DoorGuard":
        """The guard of `service`'s door as the settings say, announced in the log."""
        tokens = getattr(settings, DOORS[service][0])
        guard = cls(service, tokens, getattr(settings, service).rate_limit)
        guard.announce()
        return guard

    def announce(self) -> None:
        if self.tokens is None:
            log.warning("%s: %s are open to any caller (%s is not set)", self.service, self.routes, self.variable)
        else:
            log.info("%s: %s need a bearer token of %s (%d tokens: %s)%s", self.service, self.routes, self.variable,
                     len(self.tokens), ", ".join(self.tokens.names),
                     f"; rate limits: {', '.join(f'{n} {i}' for n, i in self.limits.items())}" if self.limits else "")

    def admit(self, authorization: str | None) -> str:
        """The caller's name (`anonymous` at an open door); else the HTTPException it gets: 401 without
        a known token, 429 (with Retry-After) beyond its rate limit."""
        if self.tokens is None:
            name = ANONYMOUS_CLIENT
        else:
            name = self.tokens.identify(authorization)
            if name is None:
                (self.invalid if authorization else self.missing).inc()
                sent = "the one sent is not known" if authorization else "none was sent"
                raise HTTPException(401, f"send 'Authorization: Bearer <token>' with a token of {self.variable}: {sent}",
                                    headers={"WWW-Authenticate": "Bearer"})
        item = self.limits.get(name)
        if item is not None and not self.limiter.hit(item, self.service, name):
            self.limited[name].inc()
            retry = self.retry_after(item, name)
            raise HTTPException(429, f"{name} is over its rate limit of {item}: retry in {retry} s",
                                headers={"Retry-After": str(retry)})
        self.admitted[name].inc()
        return name

    def retry_after(self, item: RateLimitItem, name: str) -> int:
        """Whole seconds until the window lets `name` in again (at least 1)."""
        reset = self.limiter.get_window_stats(item, self.service, name).reset_time
        return max(1, math.ceil(reset - time.time()))

    def document(self, app: Any, paths: tuple[str, ...]) -> None:
        """Say in the app's OpenAPI that `paths` take a bearer token (the check is `admit`'s, inside
        the routes, not a dependency: the prediction route stays free of dependency solving)."""
        if self.tokens is None:
            return
        generate = app.openapi

        def openapi() -> dict[str, Any]:
            schema = generate()  # FastAPI builds it once and keeps it: this edits the kept one
            schemes = schema.setdefault("components", {}).setdefault("securitySchemes", {})
            if "ClientToken" not in schemes:
                schemes["ClientToken"] = {"type": "http", "scheme": "bearer",
                                          "description": f"a client token ({self.variable})"}
                for path in paths:
                    schema["paths"][path]["post"]["security"] = [{"ClientToken": []}]
            return schema

        app.openapi = openapi


DOOR_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"description": "the door takes client tokens, and none or an unknown one was sent"},
    429: {"description": "the client is over its rate limit; `Retry-After` says when to come back"},
}
