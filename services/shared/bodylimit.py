"""ASGI middleware that refuses a request body over a size limit with 413, before anything parses it.

Every service has it, outermost (`app.service_app`): before routing and before the admin
guard, so an unauthenticated request can never make a service read or parse a large body.

A declared `Content-Length` over the limit is refused without reading a byte; a body sent without
one (chunked) is read up to the limit and refused as soon as it goes over. A body within the limit
is handed to the app unchanged. It must never let the app see (or buffer) more than `max_bytes`.

    >>> from starlette.applications import Starlette
    >>> app = BodyLimit(Starlette(), max_bytes=1_048_576, service="prediction", setting="prediction.max_body_bytes")
"""

from __future__ import annotations

import json
from typing import Any, Awaitable, Callable

from . import metrics

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


async def _refuse(send: Send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    def __init__(self, app, max_bytes: int, service: str, setting: str = "max_body_bytes") -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.service = service
        self.setting = setting

    async def refuse(self, scope: Scope, send: Send, status: int, detail: str) -> None:
        # Refused before routing, so the route is not known: counted as "unmatched" like a 404.
        metrics.HTTP_REQUESTS.labels(self.service, "unmatched", scope["method"], str(status)).inc()
        await _refuse(send, status, detail)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE"):
            await self.app(scope, receive, send)
            return
        declared = None
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await self.refuse(scope, send, 400, "Content-Length is not a number")
                    return
        too_big = f"request body is larger than the limit of {self.max_bytes} bytes ({self.setting})"
        if declared is not None and declared > self.max_bytes:
            await self.refuse(scope, send, 413, too_big)
            return
        # Read the body here (bounded), then replay it: the app only ever sees an accepted body.
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self.refuse(scope, send, 413, too_big)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for the disconnect, as the server would

        await self.app(scope, replay, send)
