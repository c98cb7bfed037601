"""The wire format against implementations no one here wrote: Apache Avro's Java library
(BinaryMessageEncoder / BinaryMessageDecoder, the reference of single-object encoding) with the
Apache Kafka Java client, and Apache Avro's own Python package as a second, independent one.

Java writes events and labels that driftline's real services read; Java reads the predictions,
outcomes, drift events and model swaps that driftline's real services write."""

from __future__ import annotations

import io
import os
import re
import subprocess
import time

import avro.io
import avro.schema
import pytest
from interop_java import ERROR, JavaReference, close, event, parse_record, schema_path
from pipeline import metric, start_pipeline
from test_foundation_codec import SAMPLES

from driftline.client import Consumer
from driftline.shared.codec import MAGIC, SCHEMAS_DIR, get_codec


@pytest.fixture(scope="session")
def java(infra_settings) -> JavaReference:
    return JavaReference.build(infra_settings.cache_dir)


def test_java_binary_message_encoder_writes_the_very_bytes_driftline_writes(java):
    codec = get_codec()
    lines = java.run("encode", schema_path("Event"), schema_path("Label"), "60", "j-", "30", "1700000000.0")
    assert len(lines) == 120
    for i in range(60):
        expected_event, expected_label = event("j-", i, 30, 1.7e9)
        for line, record, expected in ((lines[2 * i], "Event", expected_event),
                                       (lines[2 * i + 1], "Label", expected_label)):
            blob = bytes.fromhex(line.split(" ", 1)[1])
            assert codec.decode(blob, expect=record) == expected
            assert codec.encode(record, expected) == blob  # byte for byte, header included


def test_java_binary_message_decoder_reads_every_record_driftline_writes(java):
    codec = get_codec()
    names = sorted(SAMPLES)
    stdin = "".join(f"{n} {codec.encode(n, SAMPLES[n]).hex()}\n" for n in names)
    # The layout driftline used before the fix (fingerprint bytes reversed) is refused by the reference.
    blob = codec.encode("Event", SAMPLES["Event"])
    stdin += f"Event {(blob[:2] + blob[2:10][::-1] + blob[10:]).hex()}\n"
    out = java.run("decode", *(schema_path(n) for n in names), stdin=stdin)
    assert len(out) == len(names) + 1
    for name, line in zip(names, out):
        assert not ERROR.match(line), (name, line)
        assert close(parse_record(line), SAMPLES[name]), (name, line)
    assert ERROR.match(out[-1]).group(1) == "MissingSchemaException"


@pytest.mark.parametrize("record", sorted(SAMPLES))
def test_apache_avro_python_agrees_on_header_and_body(record):
    """A second implementation: Avro's Python package (its fingerprint and its binary encoder;
    it has no single-object encoder of its own, so the 10-byte header is assembled per the spec)."""
    schema = avro.schema.parse((SCHEMAS_DIR / f"{record}.avsc").read_text())
    body = io.BytesIO()
    avro.io.DatumWriter(schema).write(SAMPLES[record], avro.io.BinaryEncoder(body))
    theirs = MAGIC + schema.fingerprint("CRC-64-AVRO") + body.getvalue()
    ours = get_codec().encode(record, SAMPLES[record])
    assert ours == theirs
    read = avro.io.DatumReader(schema).read(avro.io.BinaryDecoder(io.BytesIO(ours[10:])))
    assert read == SAMPLES[record]


@pytest.mark.e2e
def test_a_java_producer_feeds_the_real_services_and_a_java_consumer_reads_their_answers(
        java, settings, run_service):
    """2 x 600 events and labels from the Java producer, the concept flipping half way; the real
    ingestion, features, learner and drift services; then the Java consumer reads every prediction,
    outcome, drift event and model swap, and must see what driftline's own decoder sees."""
    n, flip = 1200, 600
    procs = start_pipeline(run_service, ("ingestion", "features", "learner", "drift"), features="raw")
    base_ts = float(int(time.time()) - 10 * n)
    out = java.run("produce", settings.kafka_bootstrap, schema_path("Event"), schema_path("Label"),
                   f"{settings.namespace}.events", f"{settings.namespace}.labels", str(n), "j-", str(flip),
                   repr(base_ts))
    assert out == [f"produced {n}"]

    deadline = time.monotonic() + 180
    while metric(procs["learner"], "driftline_examples_learned_total", role="champion") < n:
        assert time.monotonic() < deadline, procs["learner"].log_tail()
        time.sleep(0.5)
    ingestion = procs["ingestion"]
    assert metric(ingestion, "driftline_ingested_total", door="kafka", outcome="valid") == 2 * n
    assert metric(ingestion, "driftline_ingested_total", outcome="dead_letter") == 0

    wanted = ("predictions", "outcomes", "drift.events", "model.swaps")
    ours: dict[str, list[dict]] = {t: [] for t in wanted}
    with Consumer(*wanted, group="python-check", settings=settings) as consumer:
        quiet_since = time.monotonic()
        while time.monotonic() - quiet_since < 3.0 or not ours["drift.events"]:
            got = consumer.poll(0.5)
            for m in got:
                ours[m.topic].append(m.value)
            if got:
                quiet_since = time.monotonic()
            assert time.monotonic() < deadline + 60, {t: len(v) for t, v in ours.items()}
        assert consumer.refused == []
    champion = [o for o in ours["outcomes"] if o["role"] == "champion"]
    assert sorted(o["event_id"] for o in champion) == sorted(f"j-{i}" for i in range(n))
    assert ours["model.swaps"] and ours["model.swaps"][0]["reason"] == "initial"
    assert any(d["kind"] == "concept" for d in ours["drift.events"])

    total = sum(len(v) for v in ours.values())
    lines = java.run("consume", settings.kafka_bootstrap, "60", "java-check", str(total),
                     *(f"{settings.namespace}.{t}={schema_path(s)}" for t, s in
                       (("predictions", "Prediction"), ("outcomes", "Outcome"),
                        ("drift.events", "DriftEvent"), ("model.swaps", "ModelSwap"))))
    assert len(lines) >= total
    theirs: dict[tuple, list[dict]] = {}
    for line in lines:
        topic, headers, text = line.split("\t", 2)
        assert not ERROR.match(text), line
        record = parse_record(text)
        topic = topic.removeprefix(settings.namespace + ".")
        theirs.setdefault((topic, ident(record)), []).append(record)
        if topic == "outcomes":  # whose it is, in headers Kafka's own Java client reads
            assert headers == f"driftline-model={record['model']};driftline-role={record['role']};", line
    # Every record driftline's decoder saw, the Java decoder saw too, with the same values (later
    # messages the Python side did not wait for may come on top).
    for topic in wanted:
        for record in ours[topic]:
            assert any(close(record, other) for other in theirs.get((topic, ident(record)), [])), (topic, record)


def ident(record: dict) -> tuple:
    return tuple(str(record.get(k)) for k in ("event_id", "drift_id", "role", "model_version", "to_version",
                                              "source", "position"))


def docs_block(page: str, language: str, containing: str) -> str:
    text = (SCHEMAS_DIR.parent / "docs" / page).read_text()
    blocks = [b for b in re.findall(rf"```{language}\n(.*?)```", text, flags=re.S) if containing in b]
    assert len(blocks) == 1, f"one {language} block with {containing!r} in docs/{page}"
    return blocks[0]


def test_the_documented_java_snippet_publishes_an_event_that_driftline_reads(java, settings, tmp_path):
    source = docs_block("producers.md", "java", "BinaryMessageEncoder")
    source = (source.replace('"127.0.0.1:9092"', f'"{settings.kafka_bootstrap}"')
              .replace('"events"', f'"{settings.namespace}.events"')
              .replace('"schemas/Event.avsc"', f'"{schema_path("Event")}"'))
    (tmp_path / "Publish.java").write_text(source)
    classpath = f"{tmp_path}{os.pathsep}{java.home / 'lib' / '*'}"
    subprocess.run(["javac", "-d", str(tmp_path), "-cp", classpath, str(tmp_path / "Publish.java")],
                   check=True, capture_output=True, timeout=120)
    subprocess.run(["java", "-cp", classpath, "Publish"], check=True, capture_output=True, timeout=120)
    with Consumer("events", group="readme", settings=settings) as consumer:
        deadline, got = time.monotonic() + 30, []
        while not got:
            assert time.monotonic() < deadline and not consumer.refused, consumer.refused
            got = consumer.poll(0.5)
    assert got[0].key == "meter-7"
    assert got[0].value["event_id"] == "e-1" and got[0].value["fields"] == {"load": 0.42, "temp": 17.5}
