"""The Confluent wire format beside single-object encoding, without a broker or a registry: framing,
the codec reading driftline's own registered ids, a registry that does not answer (a real
connection refused, not a mock), and the settings that switch it on."""

from __future__ import annotations

import io
import time

import fastavro
import pytest

from driftline.infra import stack
from driftline.ingestion import validate
from driftline.shared.codec import AvroCodec, DecodeError
from driftline.shared.deps import DEPS
from driftline.shared.framing import OutputFraming, confluent_header, confluent_schema_id, framing_of, reframe
from driftline.shared.schema_registry import DEPENDENCY, RegistryUnavailable, SchemaRegistry
from driftline.shared.settings import IngestionSettings, Settings, settings_view

EVENT = {"event_id": "e-1", "entity_id": "m-7", "ts": 1.7e9, "fields": {"a": 1.5, "c": "KR"}, "published_ms": None}


def test_a_message_changes_framing_by_its_header_alone():
    codec = AvroCodec()
    single = codec.encode("Event", EVENT)
    confluent = reframe(single, confluent_header(42))
    assert framing_of(single) == "single-object" and framing_of(confluent) == "confluent"
    assert confluent[:5] == b"\x00\x00\x00\x00\x2a" and confluent[5:] == single[10:]
    assert confluent_schema_id(confluent) == 42
    assert reframe(confluent, codec.header("Event")) == single
    assert framing_of(b"{\"json\": 1}") is None


@pytest.mark.parametrize("bad", [-1, 2**31])
def test_a_schema_id_is_a_non_negative_java_int(bad):
    with pytest.raises(ValueError):
        confluent_header(bad)


def test_the_codec_reads_the_confluent_framing_of_its_own_registered_ids_only():
    codec = AvroCodec()
    blob = reframe(codec.encode("Event", EVENT), confluent_header(7))
    with pytest.raises(DecodeError) as err:  # nothing learned: refused, and the detail says why
        codec.decode(blob, expect="Event")
    assert err.value.reason == "not_avro" and "DRIFTLINE_SCHEMA_REGISTRY_URL" in err.value.detail
    codec.learn_confluent_id(7, "Event")
    assert codec.decode(blob, expect="Event") == EVENT
    with pytest.raises(DecodeError) as err:
        codec.decode(reframe(blob, confluent_header(8)), expect="Event")
    assert err.value.reason == "unknown_schema" and "8" in err.value.detail
    with pytest.raises(DecodeError) as err:
        codec.decode(blob, expect="Label")
    assert err.value.reason == "wrong_schema"
    with pytest.raises(DecodeError) as err:
        codec.decode(b"\x00\x00\x07")
    assert err.value.reason == "not_avro"


def test_output_framing_swaps_the_header_of_its_topics_only():
    codec, out = AvroCodec(), OutputFraming()
    blob = codec.encode("Prediction", {"event_id": "e", "entity_id": "m", "ts": 1.0, "model": "default",
                                       "model_version": 1, "role": "champion", "y_pred": "1", "proba": {},
                                       "source": "learner", "published_ms": None})
    assert out.frame("t.predictions", blob) is blob
    out.use("t.predictions", 3)
    framed = out.frame("t.predictions", blob)
    assert framed == confluent_header(3) + blob[10:]
    assert out.frame("t.features", blob) is blob


def test_the_confluent_body_is_plain_binary_avro():
    """The body after the 5-byte header is binary Avro, as Confluent's serializers write it."""
    codec = AvroCodec()
    framed = reframe(codec.encode("Event", EVENT), confluent_header(1))
    body = io.BytesIO()
    fastavro.schemaless_writer(body, codec.by_name["Event"].parsed, EVENT)
    assert framed[5:] == body.getvalue()


def unreachable_url() -> str:
    return f"http://127.0.0.1:{stack.free_port()}"  # nothing listens there: connection refused


def test_a_registry_that_does_not_answer_makes_the_message_wait_not_fail():
    registry = SchemaRegistry(unreachable_url(), timeout_s=1.0)
    blob = reframe(AvroCodec().encode("Event", EVENT), confluent_header(5))
    with pytest.raises(RegistryUnavailable):
        registry.decode(blob, expect="Event")
    assert DEPS.is_down(DEPENDENCY)
    # Within the backoff the registry is not asked again: the next messages fail at once.
    started = time.perf_counter()
    with pytest.raises(RegistryUnavailable, match="retried shortly"):
        registry.decode(blob, expect="Event")
    assert time.perf_counter() - started < 0.01
    # Validation does not turn it into a rejection: it is no verdict on the input.
    limits = IngestionSettings()
    with pytest.raises(RegistryUnavailable):
        time.sleep(max(0.0, registry.retry_at - time.monotonic()))
        validate.check_event_avro(blob, limits, 1.7e9, registry)
    # A single-object message needs no registry and is read all the same.
    assert validate.check_event_avro(AvroCodec().encode("Event", EVENT), limits, 1.7e9, registry)["event_id"] == "e-1"
    DEPS.up(DEPENDENCY)


def test_without_a_registry_a_confluent_framed_event_is_dead_lettered_with_a_reason_that_says_so():
    blob = reframe(AvroCodec().encode("Event", EVENT), confluent_header(5))
    rejected = validate.check_event_avro(blob, IngestionSettings(), 1.7e9)
    assert rejected.reason == "not_avro" and "schema registry" in rejected.detail


def test_output_framing_needs_a_registry_and_the_registry_password_is_never_shown():
    with pytest.raises(ValueError, match="needs schema_registry_url"):
        Settings(schema_registry_output=["outcomes"])
    with pytest.raises(ValueError):
        Settings(schema_registry_url="http://r:8081", schema_registry_output=["features"])  # not an output topic
    s = Settings(schema_registry_url="https://app:s3cret@registry:8081", schema_registry_output=["outcomes"])
    assert settings_view(s)["schema_registry_url"] == "https://app:***@registry:8081"
    assert "s3cret" not in str(settings_view(s))
