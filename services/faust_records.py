"""faust on driftline's topics: record types and a codec, so a faust app publishes events and labels
and consumes predictions, outcomes, drift events and model swaps in driftline's wire format.

    import faust
    from driftline.faust_records import Event, Label, driftline_topic

    app = faust.App("shop", broker="kafka://127.0.0.1:9092")
    events, labels = driftline_topic(app, "events"), driftline_topic(app, "labels")
    predictions = driftline_topic(app, "predictions")

    @app.agent(predictions)
    async def act(stream):
        async for p in stream:                      # p is a Prediction record
            print(p.event_id, p.y_pred, p.model_version)

    # in an agent, a task or a web view:
    await events.send(key="meter-7", value=Event(event_id="e1", entity_id="meter-7", ts=1.7e9, fields={"x": 1.0}))

The record types are made from the current `schemas/*.avsc` (so they follow schema evolution):
one faust Record per Avro record, the same field names, `Optional` with the schema's default where
the schema has one. Build them with keywords (faust puts fields with defaults last). Their codec,
registered with faust as `driftline.<Name>`, is driftline's own Avro single-object codec: what a faust
app writes is byte for byte what driftline's services write, and a message that is not a record of
the topic's schema raises faust's ValueDecodeError (faust logs it and skips the message) instead
of being misread.
"""

from __future__ import annotations

from typing import Any, Optional

import faust
from faust.serializers import codecs

from .shared.codec import get_codec
from .shared.topics import SPEC_BY_NAME, Topics

__all__ = ["AvroSingleObject", "record_type", "driftline_topic", "RECORDS",
           "Event", "Label", "Prediction", "Outcome", "DriftEvent", "ModelSwap"]

_PRIMITIVE: dict[str, Any] = {"string": str, "bytes": bytes, "boolean": bool, "int": int, "long": int,
                              "float": float, "double": float, "null": type(None)}


def _annotation(avro_type: Any) -> Any:
    if isinstance(avro_type, str):
        return _PRIMITIVE.get(avro_type, Any)
    if isinstance(avro_type, list):  # a union: ["null", X] is Optional[X]; wider ones stay open
        rest = [t for t in avro_type if t != "null"]
        inner = _annotation(rest[0]) if len(rest) == 1 else Any
        return Optional[inner] if "null" in avro_type else inner
    kind = avro_type.get("type")
    if kind == "map":
        return dict
    if kind == "array":
        return list
    return _PRIMITIVE.get(kind, Any)


class AvroSingleObject(codecs.Codec):
    """faust codec for one driftline record type: Avro single-object encoding with the current schema;
    decoding resolves any released version of it (see driftline.shared.codec)."""

    def __init__(self, record: str, **kwargs: Any) -> None:
        self.record = record
        super().__init__(record=record, **kwargs)

    def _dumps(self, obj: Any) -> bytes:
        if isinstance(obj, faust.Record):
            obj = obj.to_representation()
        return get_codec().encode(self.record, {k: v for k, v in obj.items() if not k.startswith("__")})

    def _loads(self, s: bytes) -> Any:
        return get_codec().decode(s, expect=self.record)


def record_type(name: str) -> type[faust.Record]:
    """A faust Record class with the fields of the current `schemas/<name>.avsc`."""
    schema = get_codec().by_name[name].parsed
    required, optional, defaults = {}, {}, {}
    for field in schema["fields"]:
        if "default" in field:
            optional[field["name"]] = _annotation(field["type"])
            defaults[field["name"]] = field["default"]
        else:
            required[field["name"]] = _annotation(field["type"])
    namespace = {"__annotations__": {**required, **optional}, **defaults,
                 "__doc__": schema.get("doc", name), "__module__": __name__}
    codec_name = f"driftline.{name}"
    if codec_name not in codecs.codecs:
        codecs.register(codec_name, AvroSingleObject(name))
    return type(name, (faust.Record,), namespace, serializer=codec_name, include_metadata=False)


RECORDS: dict[str, type[faust.Record]] = {name: record_type(name) for name in get_codec().by_name}
Event = RECORDS["Event"]
Label = RECORDS["Label"]
Prediction = RECORDS["Prediction"]
Outcome = RECORDS["Outcome"]
DriftEvent = RECORDS["DriftEvent"]
ModelSwap = RECORDS["ModelSwap"]


def driftline_topic(app: faust.App, topic: str, namespace: str = "", **kwargs: Any) -> faust.TopicT:
    """The faust topic for one of driftline's topics ("events", "predictions", "drift.events", ...):
    its record type, its codec, string keys. The topic must exist (`driftline infra up` creates
    them); faust does not create or change it."""
    record = SPEC_BY_NAME[topic].schema
    return app.topic(Topics(namespace).name(topic), value_type=RECORDS[record],
                     value_serializer=f"driftline.{record}", key_type=str, key_serializer="raw", **kwargs)
