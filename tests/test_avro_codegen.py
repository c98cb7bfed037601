"""The generated Avro codecs (avro_codegen.py) against fastavro, the reference implementation:
the same bytes written, the same values read, on records generated from every schema driftline
ships, on values off the generated code's road, and on corrupted bodies."""

from __future__ import annotations

import io
import json
import struct

import fastavro
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from driftline.shared.avro_codegen import Unsupported, compile_record, read_long, write_long
from driftline.shared.codec import SCHEMAS_DIR, get_codec

SCHEMAS = {json.loads(p.read_text())["name"]: json.loads(p.read_text()) for p in SCHEMAS_DIR.glob("*.avsc")}
NAMES = sorted(SCHEMAS)
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

finite = st.floats(allow_nan=False, width=64)
text = st.text(max_size=12) | st.sampled_from(["", "é", "x" * 70, "\U0001f600"])


def values(schema, named, off_road: bool):
    """Values of an Avro type; with `off_road`, also unusual ones (ints and bools for doubles, str
    subclasses, out-of-range ints, tuples, bytearrays), some of which the generated encoder leaves
    to fastavro."""
    if isinstance(schema, str) and schema in named:
        schema = named[schema]
    if isinstance(schema, dict) and schema["type"] in ("null", "boolean", "int", "long", "float", "double",
                                                       "bytes", "string"):
        schema = schema["type"]
    if isinstance(schema, list):
        return st.one_of(*(values(branch, named, off_road) for branch in schema))
    extra = st.nothing()
    if schema == "null":
        return st.none()
    if schema == "boolean":
        return st.booleans()
    if schema == "int":
        base = st.integers(-(1 << 31), (1 << 31) - 1)
        extra = st.sampled_from([1 << 31, True])
    elif schema == "long":
        base = st.integers(-(1 << 63), (1 << 63) - 1)
        extra = st.sampled_from([1 << 63, False, 2.0])
    elif schema in ("float", "double"):
        base = finite if schema == "double" else st.floats(allow_nan=False, width=32)
        extra = st.integers(-(1 << 53), 1 << 53) | st.booleans()
    elif schema == "string":
        base = text
        extra = st.builds(type("Text", (str,), {}), text)
    elif schema == "bytes":
        base = st.binary(max_size=80)
        extra = st.builds(bytearray, st.binary(max_size=4))
    elif schema["type"] == "map":
        base = st.dictionaries(text, values(schema["values"], named, off_road), max_size=5)
    elif schema["type"] == "array":
        base = st.lists(values(schema["items"], named, off_road), max_size=4)
        extra = st.tuples(values(schema["items"], named, off_road))
    elif schema["type"] == "record":
        named = {**named, schema["name"]: schema}
        fields = {f["name"]: values(f["type"], named, off_road) for f in schema["fields"]}
        base = st.fixed_dictionaries(fields)
        defaulted = [f["name"] for f in schema["fields"] if "default" in f]
        if defaulted:  # a field with a default may be left out
            base = st.tuples(base, st.sets(st.sampled_from(defaulted))).map(
                lambda pair: {k: v for k, v in pair[0].items() if k not in pair[1]})
    else:
        raise AssertionError(schema)
    return base | extra if off_road else base


def fastavro_bytes(name, value):
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, get_codec().by_name[name].parsed, value)
    return get_codec().header(name) + buf.getvalue()


def fastavro_value(name, body: bytes):
    buf = io.BytesIO(body)
    value = fastavro.schemaless_reader(buf, get_codec().by_name[name].parsed, None)
    return value, buf.tell()


@pytest.mark.parametrize("name", NAMES)
def test_every_current_schema_has_generated_code(name):
    assert get_codec().by_name[name].specific is not None


@pytest.mark.parametrize("name", NAMES)
@FAST
@given(data=st.data())
def test_the_same_bytes_and_values_as_fastavro(name, data):
    value = data.draw(values(SCHEMAS[name], {}, off_road=False))
    record = get_codec().by_name[name]
    blob = record.specific.encode(value)  # on the road: no fallback
    assert blob == fastavro_bytes(name, value)
    decoded, end = record.specific.decode(blob, 10)
    assert end == len(blob)
    assert decoded == fastavro_value(name, blob[10:])[0]
    assert list(decoded) == [f["name"] for f in SCHEMAS[name]["fields"]]  # fields in schema order, as fastavro


@pytest.mark.parametrize("name", NAMES)
@FAST
@given(data=st.data())
def test_off_the_road_the_codec_answers_as_fastavro(name, data):
    """Whatever the generated encoder leaves alone, `AvroCodec.encode` writes as fastavro does, or
    refuses as fastavro does."""
    value = data.draw(values(SCHEMAS[name], {}, off_road=True))
    try:
        expected = fastavro_bytes(name, value)
    except Exception as exc:  # noqa: BLE001
        with pytest.raises(type(exc)):
            get_codec().encode(name, value)
        return
    assert get_codec().encode(name, value) == expected


@pytest.mark.parametrize("name", NAMES)
@FAST
@given(data=st.data())
def test_a_corrupted_body_reads_as_fastavro_reads_it_or_not_at_all(name, data):
    """Bytes flipped, cut or added: a body the generated decoder reads to its end is one fastavro
    reads to the same value; anything else goes to fastavro (`AvroCodec.read`)."""
    value = data.draw(values(SCHEMAS[name], {}, off_road=False))
    body = bytearray(fastavro_bytes(name, value)[10:])
    for _ in range(data.draw(st.integers(1, 3))):
        action = data.draw(st.sampled_from(["flip", "cut", "add"]))
        if action == "flip" and body:
            at = data.draw(st.integers(0, len(body) - 1))
            body[at] = data.draw(st.integers(0, 255))
        elif action == "cut" and body:
            del body[data.draw(st.integers(0, len(body) - 1)):]
        else:
            body += data.draw(st.binary(min_size=1, max_size=3))
    blob = get_codec().header(name) + bytes(body)
    try:
        ours, end = get_codec().by_name[name].specific.decode(blob, 10)
    except Exception:  # noqa: BLE001 (left to fastavro)
        return
    assume(end == len(blob))
    theirs, their_end = fastavro_value(name, bytes(body))
    assert (exact(theirs), their_end + 10) == (exact(ours), end)


def exact(value):
    """A value with each float as its 8 bytes (a flipped byte can make a NaN, never equal to itself)."""
    if isinstance(value, float):
        return struct.pack("<d", value)
    if isinstance(value, dict):
        return {k: exact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [exact(v) for v in value]
    return value


def test_the_hot_records_take_the_generated_road():
    """What the services write every event stays on the generated code (a fallback would be
    correct but slow): the learner's Outcome with text and number features, a FeatureVector."""
    codec = get_codec()
    outcome = {"event_id": "e", "entity_id": "a", "model": "m", "model_version": 1, "role": "champion",
               "y_true": "1", "y_pred": "0", "proba": {"0": 0.5, "1": 0.5}, "position": 1 << 40, "ts": 1.7e9,
               "features": {"x": 1.0, "n": 3, "kind": "card"}, "feature_set": "f", "label_ts": 1.7e9,
               "label_partition": 0, "label_offset": 12, "error": None, "known": 1}
    assert codec.by_name["Outcome"].specific.encode(outcome) == fastavro_bytes("Outcome", outcome)
    vector = {"event_id": "e", "entity_id": "a", "ts": 1.0, "features": {"x": float("inf"), "k": "v"},
              "feature_set": "raw", "published_ms": 1_700_000_000_000}
    assert codec.by_name["FeatureVector"].specific.encode(vector) == fastavro_bytes("FeatureVector", vector)


@pytest.mark.parametrize("schema", [
    {"type": "record", "name": "E", "fields": [{"name": "e", "type": {"type": "enum", "name": "S", "symbols": ["A"]}}]},
    {"type": "record", "name": "F", "fields": [{"name": "f", "type": {"type": "fixed", "name": "X", "size": 2}}]},
    {"type": "record", "name": "U", "fields": [{"name": "u", "type": ["null", {"type": "record", "name": "In",
                                                                                "fields": []}]}]},
    {"type": "record", "name": "L", "fields": [{"name": "d", "type": {"type": "int", "logicalType": "date"}}]},
    {"type": "record", "name": "Node", "fields": [{"name": "next", "type": ["null", "Node"]}]},
    {"type": "record", "name": "Pair", "namespace": "a", "fields": [
        {"name": "x", "type": {"type": "record", "name": "V", "fields": []}},
        {"name": "y", "type": {"type": "record", "name": "V", "namespace": "b", "fields": []}}]},
], ids=["enum", "fixed", "record-in-union", "logical-type", "recursive", "one-short-name-two-records"])
def test_shapes_left_to_fastavro_are_refused_when_compiling(schema):
    with pytest.raises(Unsupported):
        compile_record(schema)


def test_a_varint_beyond_64_bits_is_left_to_fastavro():
    """Its tenth byte carries more than the long's last bit: the generated code does not read it
    (fastavro wraps it, Java's decoder refuses it), so the codec gives fastavro's answer."""
    with pytest.raises(ValueError):
        read_long(b"\x80" * 9 + b"\x02", 0)
    codec = get_codec()
    blob = bytearray(codec.encode("ModelUpdate", {"model": "m", "version": 1, "examples_seen": 1 << 62,
                                                  "revision": 0, "ts": 0.0}))
    blob[blob.index(b"\x01", 13)] = 0x02  # the varint's tenth byte
    assert codec.decode(bytes(blob)) == fastavro_value("ModelUpdate", bytes(blob[10:]))[0]


@given(st.integers(-(1 << 63), (1 << 63) - 1))
def test_varints_round_trip_as_fastavro_writes_them(n):
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, {"type": "long"}, n)
    assert write_long(n) == buf.getvalue()
    assert read_long(buf.getvalue(), 0) == (n, len(buf.getvalue()))


def test_map_keys_are_written_from_a_bounded_cache_with_the_same_bytes():
    from driftline.shared.avro_codegen import MAX_CACHED_KEYS

    schema = {"type": "record", "name": "M", "fields": [{"name": "x", "type": {"type": "map", "values": "double"}}]}
    codec = compile_record(schema)
    parsed = fastavro.parse_schema(schema)
    many = {f"f{i}": float(i) for i in range(MAX_CACHED_KEYS + 500)}  # more names than it keeps
    for value in ({"x": many}, {"x": many}, {"x": {"f1": 2.0, "é" * 70: 1.0}}, {"x": {"f1": 2.0, "é" * 70: 1.0}}):
        out = io.BytesIO()
        fastavro.schemaless_writer(out, parsed, value)
        assert codec.encode(value) == out.getvalue()
    assert len(codec.encode.__globals__["KEYS"]) == MAX_CACHED_KEYS
