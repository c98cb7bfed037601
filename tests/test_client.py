"""driftline.client against the real broker and the real services: what a Python application uses
to publish events and labels and to read predictions and outcomes."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from pipeline import metric, start_pipeline

from driftline.client import Consumer, DeliveryError, Producer
from driftline.infra import stack
from driftline.shared import kafka


def drain(consumer: Consumer, until, timeout: float = 120.0) -> list:
    got, deadline = [], time.monotonic() + timeout
    while not until(got):
        assert time.monotonic() < deadline, f"only {len(got)} messages"
        got += consumer.poll(0.5)
    return got


@pytest.mark.e2e
def test_events_and_labels_sent_with_the_client_are_learned_and_answered(settings, run_service):
    procs = start_pipeline(run_service, ("ingestion", "features", "learner"), features="raw")
    n = 300
    with Producer(settings=settings) as producer:
        ids = []
        for i in range(n):
            x = (i * 37 % 100) / 100
            event_id = producer.send_event(f"meter-{i % 4}", {"x": x}, ts=time.time())
            producer.send_label(event_id, x > 0.5)  # a boolean label travels as "1" / "0"
            ids.append(event_id)
    assert producer.delivered == 2 * n and producer.failed == []
    assert len(set(ids)) == n

    with Consumer("predictions", "outcomes", group="app", settings=settings) as answers:
        got = drain(answers, lambda ms: sum(m.topic == "outcomes" and m.value["role"] == "champion"
                                            for m in ms) >= n)
    outcomes = [m.value for m in got if m.topic == "outcomes"]
    assert sorted(o["event_id"] for o in outcomes if o["role"] == "champion") == sorted(ids)
    assert {o["y_true"] for o in outcomes} == {"0", "1"}
    predictions = [m for m in got if m.topic == "predictions"]
    assert {m.value["event_id"] for m in predictions} <= set(ids) and predictions
    assert all(m.key == m.value["entity_id"] for m in predictions)
    assert metric(procs["ingestion"], "driftline_ingested_total", outcome="valid") == 2 * n


def test_client_keys_events_by_entity_and_labels_by_event(settings):
    with Producer(settings=settings) as producer:
        event_id = producer.send_event("meter-1", {"x": 1.0}, ts=1.7e9, event_id="e-42")
        producer.send_label(event_id, 3, ts=1.7e9 + 5)
    with Consumer("events", "labels", group="check", settings=settings) as c:
        got = {m.topic: m for m in drain(c, lambda ms: len(ms) >= 2, 30)}
    assert got["events"].key == "meter-1"
    assert got["events"].value == {"event_id": "e-42", "entity_id": "meter-1", "ts": 1.7e9,
                                   "fields": {"x": 1.0}, "published_ms": None}
    assert got["labels"].key == "e-42" and got["labels"].value["label"] == "3"


def test_a_failed_delivery_is_raised_by_flush_not_swallowed(settings):
    nobody = f"127.0.0.1:{stack.free_port()}"  # no broker listens there
    producer = Producer(nobody, namespace=settings.namespace, **{"message.timeout.ms": 1500})
    producer.send_event("meter-1", {"x": 1.0})
    producer.send_label("e-1", "1")
    with pytest.raises(DeliveryError) as err:
        producer.flush(15)
    assert len(err.value.failures) == 2
    assert {f.topic for f in err.value.failures} == {f"{settings.namespace}.events", f"{settings.namespace}.labels"}
    assert "timed out" in str(err.value).lower()
    producer.flush(1)  # reported once


def test_a_value_the_schema_cannot_hold_raises_at_send(settings):
    producer = Producer(settings=settings)
    with pytest.raises((TypeError, ValueError)):
        producer.send_event("meter-1", {"x": [1, 2]})
    producer.flush(5)


def test_the_consumer_keeps_what_it_refuses(settings):
    p = kafka.producer(settings)
    kafka.produce(p, f"{settings.namespace}.predictions", b"not avro at all", key="k")
    assert p.flush(10) == 0
    with Consumer("predictions", group="app", settings=settings) as c:
        deadline = time.monotonic() + 30
        while not c.refused:
            assert time.monotonic() < deadline
            assert c.poll(0.5) == []
    assert c.refused[0][0] == "predictions" and c.refused[0][3] == "not_avro"


def snippet(path: str, containing: str) -> str:
    """The one python block of README.md or a docs page that has `containing`."""
    text = (Path(__file__).parent.parent / path).read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if containing in b]
    assert len(blocks) == 1, f"one python block with {containing!r} in {path}"
    return blocks[0]


@pytest.mark.parametrize("path", ["README.md", "docs/producers.md"])
def test_the_documented_python_snippet_publishes_through_the_client(settings, path):
    source = snippet(path, "from driftline.client import")
    producing = source.split("\nwith Consumer")[0]  # the consuming half (docs) loops for ever
    exec(producing.replace('Producer("127.0.0.1:9092")',
                           f'Producer("{settings.kafka_bootstrap}", namespace="{settings.namespace}")'), {})
    with Consumer("events", "labels", group="readme", settings=settings) as c:
        got = {m.topic: m.value for m in drain(c, lambda ms: len(ms) >= 2, 30)}
    assert got["events"]["fields"] == {"load": 0.42, "temp": 17.5}
    assert got["labels"] == {"event_id": got["events"]["event_id"], "label": "1", "ts": got["labels"]["ts"]}
