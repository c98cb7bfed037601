"""The Avro contracts: every schema round-trips, and a consumer refuses what it cannot read."""

from __future__ import annotations

import json
import math

import pytest
from confluent_kafka import Consumer

from driftline.shared import kafka
from driftline.shared.codec import SCHEMAS_DIR, DecodeError, get_codec
from driftline.shared.topics import TOPIC_SPECS, Topics

SAMPLES = {
    "Event": {"event_id": "e-1", "entity_id": "meter-7", "ts": 1.7e9, "fields": {"a": 1.5, "b": -2.0},
              "published_ms": 1_700_000_000_000},
    "Label": {"event_id": "e-1", "label": "1", "ts": 1.7e9 + 60},
    "FeatureVector": {"event_id": "e-1", "entity_id": "meter-7", "ts": 1.7e9, "features": {"a": 1.5},
                      "feature_set": "default@abcd1234", "published_ms": None},
    "Prediction": {"event_id": "e-1", "entity_id": "meter-7", "ts": 1.7e9, "model": "default",
                   "model_version": 3, "role": "champion", "y_pred": "1", "proba": {"0": 0.2, "1": 0.8},
                   "source": "learner", "published_ms": None},
    "Outcome": {"event_id": "e-1", "entity_id": "meter-7", "model": "default", "model_version": 3,
                "role": "champion", "y_true": "1", "y_pred": "0", "proba": {"0": 0.6, "1": 0.4},
                "position": 41, "ts": 1.7e9, "features": {"a": 1.5}, "feature_set": "default@abcd1234",
                "label_ts": 1.7e9 + 60, "label_partition": 2, "label_offset": 17, "error": None, "known": 41},
    "DriftEvent": {"drift_id": "d-1", "model": "default", "model_version": 3, "kind": "concept",
                   "level": "drift", "detector": "ADWIN", "feature": None, "position": 1200,
                   "error_before": 0.1, "error_after": 0.4, "statistic": None, "ts": 1.7e9},
    "RetrainRequest": {"request_id": "r-1", "model": "default", "reason": "concept_drift", "drift_id": "d-1",
                       "model_version": 3, "position": 1200, "since_position": 1100, "ts": 1.7e9},
    "ModelSwap": {"model": "default", "from_version": 3, "to_version": 4, "reason": "promotion",
                  "position": 1700, "ts": 1.7e9},
    "ModelUpdate": {"model": "default", "version": 4, "examples_seen": 2000, "revision": 7, "ts": 1.7e9},
    "KeyedEvents": {"mark": 1.7e9, "idle": False, "events": [
        {"order_ts": 1.7e9, "origin_partition": 2, "origin_offset": 17, "route": [4], "event_id": "e-1",
         "entity_id": "card-7", "ts": 1.7e9, "fields": {"merchant": "m-1"}, "published_ms": None,
         "features": {"_count": 0.0}, "vector": None},
        {"order_ts": 1.7e9, "origin_partition": 2, "origin_offset": 18, "route": [4, 1], "event_id": "e-2",
         "entity_id": "card-7", "ts": 1.7e9, "fields": {}, "published_ms": 1_700_000_000_000, "features": {},
         "vector": b"\xc3\x01vector"}]},
    "DeadLetter": {"source_topic": "events", "reason": "not_avro", "detail": "no magic", "service": "ingestion",
                   "key": b"k", "payload": b"\x00junk", "partition": 2, "offset": 17, "ts": 1.7e9},
}


def test_every_schema_file_has_a_sample_and_every_topic_a_schema():
    names = {json.loads(p.read_text())["name"] for p in SCHEMAS_DIR.glob("*.avsc")}
    assert names == set(SAMPLES)
    assert {spec.schema for spec in TOPIC_SPECS} <= names


@pytest.mark.parametrize("record", sorted(SAMPLES))
def test_every_schema_round_trips(record):
    codec = get_codec()
    blob = codec.encode(record, SAMPLES[record])
    assert blob[:2] == b"\xc3\x01"
    assert codec.decode(blob, expect=record) == SAMPLES[record]


@pytest.mark.parametrize("features", [{"a": 1.5, "kind": "card", "b": -2.0}, None, {}])
def test_a_nullable_map_is_written_with_its_branch_named_and_the_same_bytes(features):
    """Outcome's nullable `features`, written by the codec (its generated code; fastavro with the
    branch named for what that code leaves): exactly the bytes of fastavro choosing the branch by
    validating the whole map, and a bad value is still refused."""
    import io

    import fastavro

    codec = get_codec()
    outcome = {**SAMPLES["Outcome"], "features": features}
    plain = io.BytesIO()
    fastavro.schemaless_writer(plain, codec.by_name["Outcome"].parsed, outcome)
    assert codec.encode("Outcome", outcome) == codec.header("Outcome") + plain.getvalue()
    assert outcome["features"] is features  # the caller's record is not changed
    assert codec.decode(codec.encode("Outcome", outcome), expect="Outcome") == outcome
    with pytest.raises(ValueError):
        codec.encode("Outcome", {**outcome, "features": {"a": [1.0]}})


def test_a_record_of_another_type_is_refused():
    codec = get_codec()
    blob = codec.encode("Label", SAMPLES["Label"])
    with pytest.raises(DecodeError) as err:
        codec.decode(blob, expect="Event")
    assert err.value.reason == "wrong_schema"


def test_a_foreign_schema_fingerprint_is_refused():
    codec = get_codec()
    blob = bytearray(codec.encode("Event", SAMPLES["Event"]))
    blob[2:10] = b"\x01\x02\x03\x04\x05\x06\x07\x08"
    with pytest.raises(DecodeError) as err:
        codec.decode(bytes(blob))
    assert err.value.reason == "unknown_schema"


@pytest.mark.parametrize("blob", [b"", b"{\"event_id\": 1}", b"\xc3", b"\x00" * 40])
def test_bytes_that_are_not_our_avro_are_refused(blob):
    with pytest.raises(DecodeError) as err:
        get_codec().decode(blob)
    assert err.value.reason in {"not_avro", "unknown_schema"}


def test_a_corrupt_or_truncated_body_is_refused():
    codec = get_codec()
    blob = codec.encode("Event", SAMPLES["Event"])
    for broken in (blob[:-3], blob + b"\x00\x01"):
        with pytest.raises(DecodeError) as err:
            codec.decode(broken, expect="Event")
        assert err.value.reason == "corrupt_avro"


def test_non_finite_doubles_survive_the_codec_so_validation_can_see_them():
    codec = get_codec()
    event = dict(SAMPLES["Event"], fields={"a": math.nan, "b": math.inf})
    decoded = codec.decode(codec.encode("Event", event))
    assert math.isnan(decoded["fields"]["a"]) and math.isinf(decoded["fields"]["b"])


def test_produce_and_consume_through_the_real_broker_with_the_codec(settings):
    topics = Topics(settings.namespace)
    codec = get_codec()
    producer = kafka.producer(settings)
    events = [dict(SAMPLES["Event"], event_id=f"e-{i}", entity_id=f"ent-{i % 3}") for i in range(50)]
    for event in events:
        kafka.produce(producer, topics.events, codec.encode("Event", event), key=event["entity_id"])
    assert producer.flush(10) == 0

    consumer: Consumer = kafka.consumer(settings, topics.group("test"))
    consumer.subscribe([topics.events])
    got = []
    partitions_by_entity: dict[str, set[int]] = {}
    for _ in range(100):
        for msg in consumer.consume(100, timeout=0.5):
            assert msg.error() is None
            value = codec.decode(msg.value(), expect="Event")
            got.append(value)
            partitions_by_entity.setdefault(value["entity_id"], set()).add(msg.partition())
        if len(got) == len(events):
            break
    consumer.close()
    assert sorted(e["event_id"] for e in got) == sorted(e["event_id"] for e in events)
    # Keys are the entity id: one entity stays on one partition.
    assert all(len(parts) == 1 for parts in partitions_by_entity.values())
