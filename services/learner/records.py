"""What the learner reads, decoded once into small typed records with where they were read.

    >>> codec = get_codec()
    >>> blob = codec.encode("Label", {"event_id": "e1", "label": "1", "ts": 5.0})
    >>> label = decode(codec, "labels.valid", "labels.valid", 0, 7, b"e1", blob, now=100.0)
    >>> label.event_id, label.ts, label.partition, label.offset, label.seen
    ('e1', 5.0, 0, 7, 100.0)

Kafka metadata travels in fields of these records, never in keys mixed into the decoded dicts;
they are plain picklable state (the learner's checkpoint holds the ones still waiting).
Decoding raises `DecodeError`; what to do with a bad message is the worker's business.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..shared.codec import AvroCodec, DecodeError, get_codec

__all__ = ["Event", "Label", "Control", "decode", "DecodeError", "get_codec"]


@dataclass(slots=True)
class Event:
    """A FeatureVector from `features`: an event to score, with its offset and when it was read."""

    event_id: str
    ts: float
    vector: dict[str, Any]  # the FeatureVector record (features, entity_id, published_ms, ...)
    topic: str
    partition: int
    offset: int
    seen: float  # wall time it was read
    raw: bytes = b""  # the message as read: what a checkpoint keeps of a held event (see checkpoint.py)

    @property
    def features(self) -> dict[str, float]:
        return self.vector["features"]


@dataclass(slots=True)
class Label:
    """A Label from `labels.valid`, with what a dead letter of it needs (its bytes, key, offset)."""

    event_id: str
    label: str
    ts: float
    seen: float  # wall time it was read: the grace and the hold count from here
    raw: bytes
    key: bytes | None
    partition: int
    offset: int
    retry_at: float = 0.0  # not looked up in Redis again before this (it was not there)


@dataclass(slots=True)
class Control:
    """A control-plane record: a RetrainRequest (`retrain`) or a ModelSwap (`swap`)."""

    kind: str
    value: dict[str, Any]


def decode(codec: AvroCodec, base: str, topic: str, partition: int, offset: int, key: Any, value: bytes | None,
           now: float) -> Event | Label | Control:
    """One message of one of the learner's topics (`base` = its name without namespace)."""
    if base == "features":
        fv = codec.decode(value, expect="FeatureVector")
        return Event(fv["event_id"], fv["ts"], fv, topic, partition, offset, now, value)
    if base == "labels.valid":
        lb = codec.decode(value, expect="Label")
        return Label(lb["event_id"], lb["label"], lb["ts"], now, value or b"", key, partition, offset)
    if base == "retrain.requests":
        return Control("retrain", codec.decode(value, expect="RetrainRequest"))
    if base == "model.swaps":
        return Control("swap", codec.decode(value, expect="ModelSwap"))
    raise DecodeError("wrong_schema", f"the learner does not read {base}")
