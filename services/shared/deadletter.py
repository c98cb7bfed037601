"""Dead letters: the one builder of a DeadLetter record, and the one list of reasons it may carry.

    >>> letter = dead_letter("labels.valid", "unknown_event", "no snapshot", "learner", "e1", b"...", 0, 7, ts=1.0)
    >>> get_codec().decode(letter, expect="DeadLetter")["key"]
    b'e1'

`source_topic` is where the input was read: the topic as the broker names it (with the
namespace), or the HTTP route (`http:/v1/events`). `REASONS` is closed so that the
`driftline_dead_letters_total{reason}` metric stays bounded; the HTTP API's docs list it.
"""

from __future__ import annotations

import time

from .codec import get_codec

REASONS: dict[str, str] = {
    # the bytes themselves (codec.DecodeError reasons; the Avro door and every consumer)
    "not_avro": "not an Avro single-object message (no C3 01 header, or empty)",
    "unknown_schema": "an Avro writer schema fingerprint that is no version in schemas/history/",
    "incompatible_schema": "a known older schema version that the current one cannot read (Avro's resolution rules)",
    "wrong_schema": "a record of another type than the topic carries (a Label on events, say)",
    "corrupt_avro": "the header is ours but the body does not decode",
    "oversized": "larger than ingestion.max_event_bytes",
    # the shape (JSON door)
    "not_an_object": "a JSON item that is not an object",
    "missing_field": "a required field is absent",
    "bad_type": "a field of the wrong JSON type",
    # the content (both doors)
    "missing_id": "event_id or entity_id absent, empty or blank",
    "id_too_long": "an id longer than ingestion.max_id_chars",
    "bad_ts": "a timestamp that is not finite, before ingestion.min_ts or too far in the future",
    "non_numeric": "a field value that is neither a number nor a string (a category)",
    "category_too_long": "a text (categorical) field value empty or longer than ingestion.max_category_chars",
    "non_finite": "a field value that is NaN or infinite",
    "number_out_of_range": "a field value beyond ±1e30 (ingestion.validate.MAX_ABS_NUMBER)",
    "too_many_fields": "more fields than ingestion.max_fields",
    "bad_field_name": "a field name that is empty or longer than ingestion.max_id_chars",
    "empty_label": "a label that is absent, empty or blank",
    "label_too_long": "a label longer than ingestion.max_id_chars",
    "bad_text": "a string that is not valid Unicode (a lone surrogate from a JSON escape)",
    "unknown_field": "a field name not in ingestion.allowed_fields (when that allow-list is set)",
    # bounds on state (features service)
    "too_many_feature_names": "a new field name when the model has features.max_feature_names already",
    "too_many_entity_fields": "a new field name when the entity tracks features.max_entity_fields already",
    "too_many_categories": "a new text value of a field that has features.max_categories distinct ones already",
    # the join (learner)
    "unknown_event": "a label whose event has no feature snapshot within learner.label_grace_s",
    "non_numeric_label": "a label that is not a finite number within ±1e30, for a regression model",
    "unlearnable_label": "a label the classifier cannot learn: not 0 or 1 for a binary one, or text where its "
                         "classes are numbers (or the reverse)",
    "too_many_classes": "a new label when the classifier has learned learner.max_classes already",
}


def dead_letter(source_topic: str, reason: str, detail: str, service: str, key: str | bytes | None,
                payload: bytes | None, partition: int | None = None, offset: int | None = None,
                ts: float | None = None, max_payload: int | None = None) -> bytes:
    """The encoded DeadLetter of one input. A payload over `max_payload` bytes is cut (the
    detail says so) so that the DLQ stays publishable."""
    assert reason in REASONS, reason
    payload, detail = fit_payload(payload or b"", detail, max_payload)
    if isinstance(key, str):
        key = key.encode("utf-8", "replace")
    return get_codec().encode("DeadLetter", {
        "source_topic": source_topic, "reason": reason, "detail": detail, "service": service, "key": key,
        "payload": payload, "partition": partition, "offset": offset, "ts": time.time() if ts is None else ts})


def fit_payload(payload: bytes, detail: str, max_payload: int | None) -> tuple[bytes, str]:
    """(payload, detail) with the payload cut to `max_payload` bytes, and the detail saying so."""
    if max_payload is not None and len(payload) > max_payload:
        return payload[:max_payload], detail + f" (payload cut to its first {max_payload} of {len(payload)} bytes)"
    return payload, detail
