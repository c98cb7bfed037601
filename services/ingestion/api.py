"""The HTTP door of ingestion: `POST /v1/events` and `POST /v1/labels`, for producers without a
Kafka client. Same rules, same dedup, same topics as the Kafka door (`service.Ingestor`).

    curl -X POST localhost:8001/v1/events -H 'content-type: application/json' \\
         -d '{"event_id": "e-1", "entity_id": "meter-7", "ts": 1700000000, "fields": {"price": 0.41}}'
    {"accepted": 1, "duplicates": 0, "rejected": []}

A body is one JSON object or an array of them. The whole body is refused before it costs memory
or work: 413 when it is larger than `ingestion.max_http_body_bytes` (by Content-Length, or while
it streams in) or holds more than `ingestion.max_http_items` items, 400 when it is not JSON, 422
when it is neither an object nor an array. Otherwise each item is decided on its own: the answer
counts the accepted and duplicate ones and says, for each rejected one, why (and it goes to the
DLQ with its JSON as payload, so the counts add up). Client input never causes a 5xx; a 503 means
Kafka or Redis did not answer, and nothing of that request was kept, so it is safe to retry.
When DRIFTLINE_INGEST_TOKENS is set, a request needs `Authorization: Bearer <one of them>` (401
otherwise, 429 over the client's rate limit), checked before its body is read (`shared/doors.py`).

Parsing, Redis and Kafka run in the threadpool: the event loop only moves bytes.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field

from ..shared import kafka, metrics, redis_clients
from ..shared.doors import DOOR_RESPONSES, DoorGuard
from ..shared.settings import Settings
from . import SERVICE
from .validate import REASONS

# A delivery Kafka has not confirmed within this long has definitely failed (librdkafka's
# message.timeout.ms), so a 503 can tell the client that nothing of its request was kept.
DELIVERY_TIMEOUT_MS = 10_000

EXAMPLE_TS = 1_700_000_000  # the event time shown in the API docs' examples


class EventIn(BaseModel):
    """One event. POST /v1/events takes one, or an array of them."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"event_id": "e-1", "entity_id": "meter-7", "ts": EXAMPLE_TS, "fields": {"price": 0.41, "demand": 0.62}}]})

    event_id: str = Field(description="unique; a re-sent event_id is counted as a duplicate and dropped")
    entity_id: str = Field(description="whose event (per-entity features, Kafka key)")
    ts: float = Field(description="event time, epoch seconds")
    fields: dict[str, float] = Field(description="numeric inputs, name: finite number")


class LabelIn(BaseModel):
    """The true label of an earlier event. POST /v1/labels takes one, or an array of them."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"event_id": "e-1", "label": "1", "ts": EXAMPLE_TS + 60}]})

    event_id: str = Field(description="the event this label belongs to")
    label: str | int | bool = Field(description="the class; integers and booleans are kept as text ('1')")
    ts: float = Field(description="when the label became known, epoch seconds")


class Rejected(BaseModel):
    index: int = Field(description="position of the item in the posted array (0 for a single object)")
    reason: str = Field(description="a code: " + ", ".join(REASONS))
    detail: str = Field(description="what exactly is wrong")


class IngestResult(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "accepted": 1, "duplicates": 1,
        "rejected": [{"index": 2, "reason": "non_finite", "detail": "field 'price' is nan"}]}]})

    accepted: int = Field(description="items published to events.valid / labels.valid")
    duplicates: int = Field(description="items whose event_id was already seen (dropped)")
    rejected: list[Rejected] = Field(description="items sent to the DLQ, with why")


class Problem(BaseModel):
    detail: str


class TooManyItems(ValueError):
    pass


_decoder = json.JSONDecoder()
_WS = " \t\n\r"


def iter_items(body: bytes, max_items: int):
    """The items of a JSON body (one object, or an array of them), decoded one by one with the
    standard library's `raw_decode`: TooManyItems is raised on item max_items + 1, before it is
    built. ValueError for malformed JSON, TypeError for a body that is neither object nor array.

        >>> list(iter_items(b'[{"a": 1}, {"b": 2}]', 10))
        [{'a': 1}, {'b': 2}]
        >>> list(iter_items(b'[{}, {}, {}]', 2))
        Traceback (most recent call last):
        ...
        driftline.ingestion.api.TooManyItems: more than 2 items
    """
    text = body.decode("utf-8")
    i = _skip(text, 0)
    if i < len(text) and text[i] == "[":
        i = _skip(text, i + 1)
        if i < len(text) and text[i] == "]":
            _end(text, i + 1)
            return
        count = 0
        while True:
            count += 1
            if count > max_items:
                raise TooManyItems(f"more than {max_items} items")
            item, i = _decoder.raw_decode(text, i)
            yield item
            i = _skip(text, i)
            if i < len(text) and text[i] == ",":
                i = _skip(text, i + 1)
                continue
            if i < len(text) and text[i] == "]":
                _end(text, i + 1)
                return
            raise json.JSONDecodeError("expected ',' or ']'", text, i)
    value, i = _decoder.raw_decode(text, i)
    _end(text, i)
    if not isinstance(value, dict):
        raise TypeError(f"the body must be a JSON object or an array of objects, got {type(value).__name__}")
    yield value


def _skip(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WS:
        i += 1
    return i


def _end(text: str, i: int) -> None:
    if _skip(text, i) != len(text):
        raise json.JSONDecodeError("extra data after the JSON value", text, _skip(text, i))


class HttpDoor:
    """Reads a body, decides on each item, publishes, waits for Kafka's acknowledgement."""

    def __init__(self, settings: Settings, ingestor: Any) -> None:
        """`ingestor`: the `service.Ingestor` both doors share, on a producer made by `producer()`."""
        self.limits = settings.ingestion
        self.ingestor = ingestor
        self.producer = ingestor.producer

    @staticmethod
    def producer(settings: Settings):
        """The HTTP door's producer: a delivery not confirmed in DELIVERY_TIMEOUT_MS has failed."""
        return kafka.producer(settings, **{"message.timeout.ms": DELIVERY_TIMEOUT_MS})

    async def read_body(self, request: Request) -> bytes:
        """The body, refused with 413 as soon as it is known to be too large."""
        cap = self.limits.max_http_body_bytes
        length = request.headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                raise HTTPException(400, f"Content-Length {length[:40]!r} is not a number")
            if int(length) > cap:
                raise HTTPException(413, f"body of {int(length)} bytes, more than max_http_body_bytes={cap}")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > cap:
                raise HTTPException(413, f"body larger than max_http_body_bytes={cap}")
        return bytes(body)

    def ingest(self, stream_name: str, body: bytes) -> IngestResult:
        """Parse, decide, publish, flush; runs in the threadpool."""
        items = self.parse(body)
        stream = self.ingestor.by_name[stream_name]
        metrics.MESSAGES_IN.labels(SERVICE, stream.name).inc(len(items))
        now, request_id = time.time(), uuid.uuid4().hex[:16]
        decisions = [self.ingestor.decide_item(stream, item, f"h{request_id}:{i}", now) for i, item in enumerate(items)]
        delivered: set[int] = set()
        try:
            outcomes = self.ingestor.publish(
                decisions, "http", on_delivery=lambda i, err: err is None and delivered.add(i))
        except redis_clients.UNAVAILABLE as exc:
            raise HTTPException(503, f"Redis did not answer ({exc}); nothing was kept, retry") from None
        self.producer.flush(DELIVERY_TIMEOUT_MS / 1000 + 5)
        lost = [i for i, o in enumerate(outcomes) if o != "duplicate" and i not in delivered]
        grace = time.monotonic() + 1.0  # a concurrent request's flush may be running our callbacks
        while lost and time.monotonic() < grace:
            self.producer.poll(0.05)
            lost = [i for i in lost if i not in delivered]
        if lost:
            self.ingestor.dedup.release([decisions[i].claim for i in lost if decisions[i].claim is not None])
            raise HTTPException(503, f"Kafka did not take {len(lost)} of {len(items)} items; retry the request "
                                     "(items it took count as duplicates then)")
        rejected = [Rejected(index=i, reason=d.reason, detail=d.detail)
                    for i, (d, o) in enumerate(zip(decisions, outcomes)) if o == "dead_letter"]
        return IngestResult(accepted=outcomes.count("valid"), duplicates=outcomes.count("duplicate"),
                            rejected=rejected)

    def parse(self, body: bytes) -> list[Any]:
        """The body's items, parsed one at a time: an array is refused (413) as soon as it holds
        one item more than max_http_items, so a body of many tiny items never costs more than
        that many parsed objects (json.loads of 4 MB of `{},` would build a million dicts first)."""
        try:
            return list(iter_items(body, self.limits.max_http_items))
        except TooManyItems:
            raise HTTPException(413, f"more than max_http_items={self.limits.max_http_items} items") from None
        except RecursionError:
            raise HTTPException(400, "malformed JSON: nested too deeply") from None
        except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, too many digits
            raise HTTPException(400, f"malformed JSON: {exc}") from None
        except TypeError as exc:
            raise HTTPException(422, str(exc)) from None

    def close(self) -> None:
        self.producer.flush(10)


def _body_doc(model: type[BaseModel], limit_items: int) -> dict:
    schema = model.model_json_schema()
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"anyOf": [schema, {"type": "array", "items": schema, "maxItems": limit_items}]},
        "examples": {
            "one": {"summary": "one item", "value": schema["examples"][0]},
            "many": {"summary": "an array", "value": [schema["examples"][0]]},
        }}}}}


ERRORS = {
    400: {"model": Problem, "description": "the body is not JSON"},
    **{status: {"model": Problem, **doc} for status, doc in DOOR_RESPONSES.items()},
    413: {"model": Problem, "description": "the body is too large or holds too many items"},
    422: {"model": Problem, "description": "the body is neither an object nor an array"},
    503: {"model": Problem, "description": "Kafka or Redis did not answer; nothing was kept, retry"},
}


def router(door: HttpDoor, guard: DoorGuard) -> APIRouter:
    """The two routes; `guard` lets a caller in (its token, its rate limit) before the body is read."""
    api = APIRouter(tags=["ingestion"])
    max_items = door.limits.max_http_items

    @api.post("/v1/events", response_model=IngestResult, responses=ERRORS, openapi_extra=_body_doc(EventIn, max_items),
              summary="Ingest events (one JSON object or an array)")
    async def post_events(request: Request) -> IngestResult:
        guard.admit(request.headers.get("authorization"))
        body = await door.read_body(request)
        return await run_in_threadpool(door.ingest, "events", body)

    @api.post("/v1/labels", response_model=IngestResult, responses=ERRORS, openapi_extra=_body_doc(LabelIn, max_items),
              summary="Ingest labels (one JSON object or an array)")
    async def post_labels(request: Request) -> IngestResult:
        guard.admit(request.headers.get("authorization"))
        body = await door.read_body(request)
        return await run_in_threadpool(door.ingest, "labels", body)

    return api
