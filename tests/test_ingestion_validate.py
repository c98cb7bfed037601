"""Ingestion's rules, as pure functions: what becomes a valid Event or Label and what is rejected
with which reason. Both doors (Avro on Kafka, JSON over HTTP) share them."""

from __future__ import annotations

import math

import pytest

from driftline.ingestion import validate
from driftline.ingestion.validate import (
    REASONS,
    Rejection,
    check_event_avro,
    check_event_json,
    check_label_avro,
    check_label_json,
    to_avro,
)
from driftline.shared.codec import get_codec
from driftline.shared.settings import IngestionSettings

NOW = 1_700_000_000.0
LIMITS = IngestionSettings(max_event_bytes=4096, max_fields=8, max_id_chars=16, max_clock_skew_s=3600, min_ts=0.0)


def event(**changes):
    base = {"event_id": "e-1", "entity_id": "meter-7", "ts": NOW, "fields": {"price": 0.5, "demand": 2}}
    base.update(changes)
    return base


def avro_event(**changes) -> bytes:
    record = {"published_ms": None, **event(**changes)}
    record["fields"] = {k: float(v) for k, v in record["fields"].items()}
    return get_codec().encode("Event", record)


def reason(result) -> str:
    assert isinstance(result, Rejection), f"expected a rejection, got {result!r}"
    assert result.detail, "a rejection must say what is wrong"
    return result.reason


# -- valid inputs -------------------------------------------------------------------------------

def test_a_valid_json_event_becomes_an_event_record_with_float_fields():
    record = check_event_json(event(), LIMITS, NOW)
    assert record == {"event_id": "e-1", "entity_id": "meter-7", "ts": NOW,
                      "fields": {"price": 0.5, "demand": 2.0}, "published_ms": None}
    assert all(isinstance(v, float) for v in record["fields"].values())
    assert isinstance(to_avro("Event", record, LIMITS), bytes)


def test_a_valid_avro_event_decodes_to_the_same_record():
    assert check_event_avro(avro_event(), LIMITS, NOW)["fields"] == {"price": 0.5, "demand": 2.0}


def test_an_event_without_fields_and_one_at_the_skew_limit_are_valid():
    assert not isinstance(check_event_json(event(fields={}), LIMITS, NOW), Rejection)
    assert not isinstance(check_event_json(event(ts=NOW + 3600), LIMITS, NOW), Rejection)


def test_extra_json_keys_are_ignored_and_published_ms_is_not_taken_from_the_client():
    record = check_event_json(event(note="x", published_ms=5), LIMITS, NOW)
    assert "note" not in record and record["published_ms"] is None


@pytest.mark.parametrize("label, text", [("spam", "spam"), (1, "1"), (0, "0"), (True, "1"), (False, "0")])
def test_json_labels_become_text_the_way_the_learner_writes_predictions(label, text):
    assert check_label_json({"event_id": "e-1", "label": label, "ts": NOW}, LIMITS, NOW)["label"] == text


def test_a_valid_avro_label_decodes():
    blob = get_codec().encode("Label", {"event_id": "e-1", "label": "1", "ts": NOW})
    assert check_label_avro(blob, LIMITS, NOW) == {"event_id": "e-1", "label": "1", "ts": NOW}


# -- the JSON door's rejections -------------------------------------------------------------------

@pytest.mark.parametrize("item, expected", [
    (["not", "an", "object"], "not_an_object"),
    (42, "not_an_object"),
    (None, "not_an_object"),
    ({k: v for k, v in event().items() if k != "event_id"}, "missing_id"),
    (event(event_id=None), "missing_id"),
    (event(event_id=""), "missing_id"),
    (event(entity_id="   "), "missing_id"),
    (event(event_id=17), "bad_type"),
    (event(event_id="x" * 17), "id_too_long"),
    (event(entity_id="x" * 17), "id_too_long"),
    ({k: v for k, v in event().items() if k != "ts"}, "missing_field"),
    ({k: v for k, v in event().items() if k != "fields"}, "missing_field"),
    (event(ts="2024-01-01"), "bad_ts"),
    (event(ts=True), "bad_ts"),
    (event(ts=math.nan), "bad_ts"),
    (event(ts=math.inf), "bad_ts"),
    (event(ts=-1.0), "bad_ts"),
    (event(ts=NOW + 3601), "bad_ts"),
    (event(fields=[1.0, 2.0]), "bad_type"),
    (event(fields={"price": {"a": 1}}), "non_numeric"),
    (event(fields={"country": "K" * 129}), "category_too_long"),
    (event(fields={"country": "  "}), "category_too_long"),
    (event(fields={"price": None}), "non_numeric"),
    (event(fields={"price": True}), "non_numeric"),
    (event(fields={"price": [1]}), "non_numeric"),
    (event(fields={"price": math.nan}), "non_finite"),
    (event(fields={"price": -math.inf}), "non_finite"),
    (event(fields={"price": 10**400}), "non_finite"),
    (event(fields={"price": 1e200}), "number_out_of_range"),  # finite, but its square is not
    (event(fields={"price": -1.5e30}), "number_out_of_range"),
    (event(fields={f"f{i}": 1.0 for i in range(9)}), "too_many_fields"),
    (event(fields={"": 1.0}), "bad_field_name"),
    (event(fields={"y" * 17: 1.0}), "bad_field_name"),
])
def test_invalid_json_events_are_rejected_with_the_right_reason(item, expected):
    assert reason(check_event_json(item, LIMITS, NOW)) == expected


@pytest.mark.parametrize("item, expected", [
    ("1", "not_an_object"),
    ({"label": "1", "ts": NOW}, "missing_id"),
    ({"event_id": "", "label": "1", "ts": NOW}, "missing_id"),
    ({"event_id": 5, "label": "1", "ts": NOW}, "bad_type"),
    ({"event_id": "e", "ts": NOW}, "empty_label"),
    ({"event_id": "e", "label": None, "ts": NOW}, "empty_label"),
    ({"event_id": "e", "label": " ", "ts": NOW}, "empty_label"),
    ({"event_id": "e", "label": math.inf, "ts": NOW}, "bad_type"),
    ({"event_id": "e", "label": ["1"], "ts": NOW}, "bad_type"),
    ({"event_id": "e", "label": "z" * 17, "ts": NOW}, "label_too_long"),
    ({"event_id": "e", "label": "1"}, "missing_field"),
    ({"event_id": "e", "label": "1", "ts": None}, "bad_ts"),
    ({"event_id": "e", "label": "1", "ts": NOW * 2}, "bad_ts"),
])
def test_invalid_json_labels_are_rejected_with_the_right_reason(item, expected):
    assert reason(check_label_json(item, LIMITS, NOW)) == expected


def test_text_that_utf8_cannot_hold_is_rejected_when_encoded_not_crashing():
    record = check_event_json(event(entity_id="\ud800"), LIMITS, NOW)  # json.loads makes these from "\\ud800"
    assert reason(to_avro("Event", record, LIMITS)) == "bad_text"


def test_an_event_whose_avro_form_is_too_large_is_oversized():
    limits = LIMITS.model_copy(update={"max_event_bytes": 64})
    record = check_event_json(event(fields={f"field_{i}": 1.0 for i in range(8)}), limits, NOW)
    assert reason(to_avro("Event", record, limits)) == "oversized"


# -- the Avro door's rejections ---------------------------------------------------------------------

@pytest.mark.parametrize("blob, expected", [
    (None, "not_avro"),
    (b"", "not_avro"),
    (b'{"event_id": "e-1"}', "not_avro"),
    (b"\xc3\x01" + b"\x00" * 8 + b"body", "unknown_schema"),
    (get_codec().encode("Label", {"event_id": "e-1", "label": "1", "ts": NOW}), "wrong_schema"),
    (avro_event()[:-3], "corrupt_avro"),
    (avro_event() + b"\x00", "corrupt_avro"),
    (avro_event(fields={f"f{i}": 1.0 for i in range(8)}, event_id="x" * 16) + b"", None),  # control: valid
    (b"\xc3\x01" + b"x" * 5000, "oversized"),
    (avro_event(event_id=""), "missing_id"),
    (avro_event(event_id="x" * 17), "id_too_long"),
    (avro_event(ts=-5.0), "bad_ts"),
    (avro_event(ts=math.nan), "bad_ts"),
    (avro_event(fields={"price": math.inf}), "non_finite"),
    (avro_event(fields={"price": -1e300}), "number_out_of_range"),
    (avro_event(fields={f"f{i}": 1.0 for i in range(9)}), "too_many_fields"),
    (avro_event(fields={" ": 1.0}), "bad_field_name"),
])
def test_avro_events_are_checked_by_the_same_rules(blob, expected):
    result = check_event_avro(blob, LIMITS, NOW)
    if expected is None:
        assert not isinstance(result, Rejection), result
    else:
        assert reason(result) == expected


def test_an_event_on_the_labels_topic_is_the_wrong_schema():
    assert reason(check_label_avro(avro_event(), LIMITS, NOW)) == "wrong_schema"


def test_an_avro_label_with_an_empty_label_is_rejected():
    blob = get_codec().encode("Label", {"event_id": "e-1", "label": "", "ts": NOW})
    assert reason(check_label_avro(blob, LIMITS, NOW)) == "empty_label"


def test_every_reason_code_is_documented_and_nothing_else_can_be_made():
    assert all(text for text in REASONS.values())
    with pytest.raises(AssertionError):
        Rejection("made_up", "x")


def test_text_values_are_categories_through_the_json_door_and_avro():
    """A string field value is a category: kept as text, bounded, and encoded as Event v2."""
    limits = IngestionSettings()
    record = validate.check_event_json({"event_id": "e", "entity_id": "m", "ts": 1.7e9,
                                        "fields": {"country": "KR", "amount": 12}}, limits, 1.7e9)
    assert record["fields"] == {"country": "KR", "amount": 12.0}
    blob = validate.to_avro("Event", record, limits)
    assert validate.check_event_avro(blob, limits, 1.7e9)["fields"] == {"country": "KR", "amount": 12.0}


def test_numeric_json_labels_become_the_text_a_regressor_learns():
    limits = IngestionSettings()
    texts = [validate.check_label_json({"event_id": "e", "label": v, "ts": 1.7e9}, limits, 1.7e9)["label"]
             for v in (12.5, 3.0, -0.25, 7)]
    assert texts == ["12.5", "3", "-0.25", "7"]
