"""Ingestion's rules: what makes an incoming event or label usable, as pure functions.

Both doors use them: an Avro message from the `events` / `labels` topics, or one item of a JSON
body posted to `/v1/events` / `/v1/labels`. Each check returns either the record to publish (a
dict that `codec.encode("Event" | "Label", ...)` accepts) or a `Rejection` with a reason code from
`REASONS` (a fixed set, so metrics stay bounded) and a detail that tells a person what is wrong.

    >>> limits, now = IngestionSettings(), 1.7e9
    >>> check_event_json({"event_id": "e1", "entity_id": "m7", "ts": now, "fields": {"x": 1}}, limits, now)["fields"]
    {'x': 1.0}
    >>> check_event_json({"event_id": "", "entity_id": "m7", "ts": now, "fields": {}}, limits, now).reason
    'missing_id'

Nothing here does I/O, and nothing raises on bad input: every input ends as a record or a Rejection.
(An Avro message read through a schema registry, `reader`, may make the registry fetch its writer
schema once; a registry that does not answer raises `RegistryUnavailable`: that is no verdict on
the input, which waits.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

from ..shared.codec import DecodeError, get_codec
from ..shared.deadletter import REASONS
from ..shared.settings import IngestionSettings

Record = dict[str, Any]

# A number's magnitude that every model and statistic downstream can square (and square again)
# without leaving a double's range: river's trees, Gaussian estimators and error metrics raise
# OverflowError on a finite 1e200, which would stop the service that met it. No measurement of
# the physical world comes near (Avogadro's number is 6e23; a nanosecond epoch 1.8e18).
MAX_ABS_NUMBER = 1e30


class Reader(Protocol):
    """What reads an Avro message: the codec (single-object) or a `SchemaRegistry` (both framings)."""

    def decode(self, blob: bytes, expect: str | None = None) -> Record: ...


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why an input cannot be used: `reason` is a code from REASONS, `detail` is for a person."""

    reason: str
    detail: str

    def __post_init__(self) -> None:
        assert self.reason in REASONS, self.reason


# -- Avro door -----------------------------------------------------------------------------

def check_event_avro(blob: bytes | None, limits: IngestionSettings, now: float,
                     reader: Reader | None = None) -> Record | Rejection:
    """An `events` message -> the Event it holds, or why not."""
    record = _decode(blob, "Event", limits, reader)
    return record if isinstance(record, Rejection) else check_event(record, limits, now)


def check_label_avro(blob: bytes | None, limits: IngestionSettings, now: float,
                     reader: Reader | None = None) -> Record | Rejection:
    """A `labels` message -> the Label it holds, or why not."""
    record = _decode(blob, "Label", limits, reader)
    return record if isinstance(record, Rejection) else check_label(record, limits, now)


def _decode(blob: bytes | None, expect: str, limits: IngestionSettings, reader: Reader | None) -> Record | Rejection:
    if blob is None:
        return Rejection("not_avro", "empty message (no value)")
    if len(blob) > limits.max_event_bytes:
        return Rejection("oversized", f"{len(blob)} bytes, more than max_event_bytes={limits.max_event_bytes}")
    try:
        return (reader or get_codec()).decode(blob, expect=expect)
    except DecodeError as exc:
        return Rejection(exc.reason, exc.detail)


# -- JSON door: check the shape, then the same content rules ---------------------------------

def check_event_json(item: Any, limits: IngestionSettings, now: float) -> Record | Rejection:
    """One JSON item of POST /v1/events -> an Event, or why not. Numbers become floats."""
    if not isinstance(item, dict):
        return Rejection("not_an_object", f"an event is a JSON object, got {_json_type(item)}")
    for name in ("event_id", "entity_id"):
        if name not in item or item[name] is None:
            return Rejection("missing_id", f"{name} is missing")
        if not isinstance(item[name], str):
            return Rejection("bad_type", f"{name} must be a string, got {_json_type(item[name])}")
    for name in ("ts", "fields"):
        if name not in item:
            return Rejection("missing_field", f"{name} is missing")
    ts = _number(item["ts"])
    if ts is None:
        return Rejection("bad_ts", f"ts must be a number (epoch seconds), got {_json_type(item['ts'])}")
    fields = item["fields"]
    if not isinstance(fields, dict):
        return Rejection("bad_type", f"fields must be an object of name: number or string, got {_json_type(fields)}")
    if len(fields) > limits.max_fields:
        return Rejection("too_many_fields", f"{len(fields)} fields, more than max_fields={limits.max_fields}")
    numbers: dict[str, float | str] = {}
    for name, value in fields.items():
        number = value if isinstance(value, str) else _number(value)  # a string is a category
        if number is None:
            return Rejection("non_numeric", f"field {_short(name)!r} is {_json_type(value)}, not a number or a string")
        numbers[name] = number
    record = {"event_id": item["event_id"], "entity_id": item["entity_id"], "ts": ts, "fields": numbers,
              "published_ms": None}
    return check_event(record, limits, now)


def check_label_json(item: Any, limits: IngestionSettings, now: float) -> Record | Rejection:
    """One JSON item of POST /v1/labels -> a Label, or why not. Numeric and boolean labels become
    text the way the learner writes predictions (True -> "1", 3 -> "3", 12.5 -> "12.5")."""
    if not isinstance(item, dict):
        return Rejection("not_an_object", f"a label is a JSON object, got {_json_type(item)}")
    if item.get("event_id") is None:
        return Rejection("missing_id", "event_id is missing")
    if not isinstance(item["event_id"], str):
        return Rejection("bad_type", f"event_id must be a string, got {_json_type(item['event_id'])}")
    if "label" not in item or item["label"] is None:
        return Rejection("empty_label", "label is missing")
    label = item["label"]
    if isinstance(label, bool):
        label = str(int(label))
    elif isinstance(label, int):
        label = str(label)
    elif isinstance(label, float) and math.isfinite(label):  # a regression target
        label = str(int(label)) if label.is_integer() else repr(label)
    elif not isinstance(label, str):
        return Rejection("bad_type", f"label must be a string or a finite number, got {_json_type(label)}")
    if "ts" not in item:
        return Rejection("missing_field", "ts is missing")
    ts = _number(item["ts"])
    if ts is None:
        return Rejection("bad_ts", f"ts must be a number (epoch seconds), got {_json_type(item['ts'])}")
    return check_label({"event_id": item["event_id"], "label": label, "ts": ts}, limits, now)


def to_avro(record_name: str, record: Record, limits: IngestionSettings) -> bytes | Rejection:
    """Encode a checked record for the valid topic; a JSON item may still fail here (text that
    UTF-8 cannot hold, or an Avro form larger than max_event_bytes)."""
    try:
        blob = get_codec().encode(record_name, record)
    except UnicodeEncodeError as exc:
        return Rejection("bad_text", f"text is not valid Unicode: {exc.reason} at {exc.start}")
    if len(blob) > limits.max_event_bytes:
        return Rejection("oversized", f"{len(blob)} bytes as Avro, more than max_event_bytes={limits.max_event_bytes}")
    return blob


# -- content rules, on a record with the right types ------------------------------------------

def check_event(record: Record, limits: IngestionSettings, now: float) -> Record | Rejection:
    """The content rules of an Event (ids, time, fields). Returns the record itself when valid."""
    for name in ("event_id", "entity_id"):
        problem = _check_id(name, record[name], limits)
        if problem:
            return problem
    problem = _check_ts(record["ts"], limits, now)
    if problem:
        return problem
    return check_fields(record["fields"], limits) or record


def check_fields(fields: dict[str, float | str], limits: IngestionSettings) -> Rejection | None:
    """The field rules, shared by ingestion and the prediction service (`/v1/predict`): how many,
    which names (and, with `allowed_fields`, only those), finite numbers within ±MAX_ABS_NUMBER,
    bounded text values (categories: `{"country": "KR"}`).

        >>> check_fields({"x": 1.0}, IngestionSettings(allowed_fields=["y"])).reason
        'unknown_field'
        >>> check_fields({"x": -3e31}, IngestionSettings()).detail
        "field 'x' is -3e+31, beyond ±1e+30"
        >>> check_fields({"country": "K" * 200}, IngestionSettings(max_category_chars=128)).reason
        'category_too_long'
    """
    if len(fields) > limits.max_fields:
        return Rejection("too_many_fields", f"{len(fields)} fields, more than max_fields={limits.max_fields}")
    allowed = limits.allowed_set
    for name, value in fields.items():
        if not name.strip() or len(name) > limits.max_id_chars:
            return Rejection("bad_field_name",
                             f"field name {_short(name)!r} is empty or longer than {limits.max_id_chars} chars")
        if allowed is not None and name not in allowed:
            return Rejection("unknown_field", f"field {_short(name)!r} is not in ingestion.allowed_fields")
        if isinstance(value, str):
            if not value.strip() or len(value) > limits.max_category_chars:
                return Rejection("category_too_long", f"field {_short(name)!r} is text of {len(value)} chars: empty, "
                                 f"blank or longer than max_category_chars={limits.max_category_chars}")
        elif not math.isfinite(value):
            return Rejection("non_finite", f"field {_short(name)!r} is {value}")
        elif not -MAX_ABS_NUMBER <= value <= MAX_ABS_NUMBER:
            return Rejection("number_out_of_range", f"field {_short(name)!r} is {value:g}, beyond "
                             f"±{MAX_ABS_NUMBER:g}")
    return None


def check_label(record: Record, limits: IngestionSettings, now: float) -> Record | Rejection:
    """The content rules of a Label (its event's id, the label text, when it became known)."""
    problem = _check_id("event_id", record["event_id"], limits)
    if problem:
        return problem
    label = record["label"]
    if not label.strip():
        return Rejection("empty_label", "label is empty or blank")
    if len(label) > limits.max_id_chars:
        return Rejection("label_too_long", f"label has {len(label)} chars, more than {limits.max_id_chars}")
    return _check_ts(record["ts"], limits, now) or record


def _check_id(name: str, value: str, limits: IngestionSettings) -> Rejection | None:
    if not value.strip():
        return Rejection("missing_id", f"{name} is empty or blank")
    if len(value) > limits.max_id_chars:
        return Rejection("id_too_long", f"{name} has {len(value)} chars, more than max_id_chars={limits.max_id_chars}")
    return None


def _check_ts(ts: float, limits: IngestionSettings, now: float) -> Rejection | None:
    if not math.isfinite(ts):
        return Rejection("bad_ts", f"ts is {ts}")
    if ts < limits.min_ts:
        return Rejection("bad_ts", f"ts {ts} is before min_ts={limits.min_ts}")
    if ts > now + limits.max_clock_skew_s:
        return Rejection("bad_ts", f"ts {ts} is more than {limits.max_clock_skew_s}s in the future")
    return None


def _number(value: Any) -> float | None:
    """A JSON number as a float (bools are not numbers; huge integers become inf, caught later)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        return float(value)
    except OverflowError:
        return math.inf


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _short(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[:limit] + "..."
