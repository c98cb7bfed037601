"""The drift service through real Kafka and Redis: synthetic champion outcomes in, drift events and
retrain requests out, each trigger with its reason, the cooldown, the admin route and the CLI."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
import uuid

import httpx
from confluent_kafka import OFFSET_BEGINNING, TopicPartition
from pipeline import metric

from driftline.shared import kafka
from driftline.shared.codec import get_codec
from driftline.shared.settings import settings_env
from driftline.shared.topics import Topics

TOKEN = "drift-admin-token-4f9c2e7a1b"


def publish_outcomes(settings, segments, start=0, version=1, seed=11) -> int:
    """Champion outcomes, in order, for segments of (count, error rate); returns the next position."""
    codec, topics = get_codec(), Topics(settings.namespace)
    producer = kafka.producer(settings)
    rng = random.Random(seed)
    position = start
    for count, rate in segments:
        for _ in range(count):
            wrong = rng.random() < rate
            record = {"event_id": f"e{position}", "entity_id": "a", "model": settings.learner.model_name,
                      "model_version": version, "role": "champion", "y_true": "1", "y_pred": "0" if wrong else "1",
                      "proba": {"1": 0.4 if wrong else 0.9}, "position": position, "ts": float(position)}
            kafka.produce(producer, topics.outcomes, codec.encode("Outcome", record), key="a")
            position += 1
    assert producer.flush(30) == 0
    return position


def publish_features(settings, values) -> None:
    codec, topics = get_codec(), Topics(settings.namespace)
    producer = kafka.producer(settings)
    for i, x in enumerate(values):
        # One entity, so one partition: the service sees the values in the order they were made.
        record = {"event_id": f"f{i}", "entity_id": "n", "ts": float(i), "features": {"x": x, "one": 1.0},
                  "feature_set": "raw", "published_ms": None}
        kafka.produce(producer, topics.features, codec.encode("FeatureVector", record), key="n")
    assert producer.flush(30) == 0


def read_topic(settings, base: str, record: str, timeout: float = 30.0) -> list[dict]:
    """Every record on a topic so far: reads each partition up to its high watermark."""
    topic = Topics(settings.namespace).name(base)
    consumer = kafka.consumer(settings, f"reader-{uuid.uuid4().hex}")
    parts = kafka.partitions_of(settings, topic)
    todo = {}
    for tp in parts:
        _low, high = consumer.get_watermark_offsets(tp, timeout=10)
        if high > 0:
            todo[tp.partition] = high - 1
    consumer.assign([TopicPartition(tp.topic, tp.partition, OFFSET_BEGINNING) for tp in parts])
    out, deadline = [], time.monotonic() + timeout
    try:
        while todo and time.monotonic() < deadline:
            m = consumer.poll(0.2)
            if m is not None and m.error() is None:
                out.append(get_codec().decode(m.value(), expect=record))
                if m.offset() >= todo.get(m.partition(), -1):
                    todo.pop(m.partition(), None)
    finally:
        consumer.close()
    assert not todo, f"could not read {topic} to its end"
    return out


def wait_position(service, position: int, timeout: float = 60.0) -> dict:
    """Wait until the drift service has handled the champion outcome at `position`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = httpx.get(service.url + "/v1/drift", timeout=2).json()
        if state["position"] >= position:
            return state
        time.sleep(0.2)
    raise TimeoutError(f"drift service stuck at {state}:\n{service.log_tail()}")


def test_only_a_rising_error_rate_raises_a_concept_drift_near_the_change_and_one_retrain(settings, run_service):
    drift = run_service("drift", DRIFTLINE_DRIFT__DATA_DRIFT="false")
    # The error rate falls at 3000 (ADWIN alarms on that too): nothing to publish.
    middle = publish_outcomes(settings, [(3000, 0.40), (3000, 0.10)])
    wait_position(drift, middle - 1)
    assert read_topic(settings, "drift.events", "DriftEvent") == []
    assert read_topic(settings, "retrain.requests", "RetrainRequest") == []
    # It rises at 6000: one concept drift, one retrain request.
    end = publish_outcomes(settings, [(3000, 0.40)], start=middle, seed=12)
    wait_position(drift, end - 1)
    events = read_topic(settings, "drift.events", "DriftEvent")
    assert [(e["kind"], e["level"], e["detector"]) for e in events] == [("concept", "drift", "ADWIN")]
    event = events[0]
    assert middle <= event["position"] <= middle + 500
    assert event["error_before"] < 0.15 and event["error_after"] > 0.3 and event["model_version"] == 1
    requests = read_topic(settings, "retrain.requests", "RetrainRequest")
    assert [(r["reason"], r["drift_id"], r["model_version"]) for r in requests] == [
        ("concept_drift", event["drift_id"], 1)]
    assert metric(drift, "driftline_drift_events_total", kind="concept", level="drift") == 1
    assert metric(drift, "driftline_retrain_requests_total", reason="concept_drift") == 1
    assert 0.3 < metric(drift, "driftline_drift_error_rate", version="1") < 0.5


def test_each_trigger_produces_a_retrain_request_with_its_reason(settings, run_service):
    drift = run_service(
        "drift", DRIFTLINE_ADMIN_TOKEN=TOKEN, DRIFTLINE_DRIFT__COOLDOWN="0", DRIFTLINE_DRIFT__ON_NEW_DATA="2500",
        DRIFTLINE_DRIFT__ON_SCHEDULE_S="1", DRIFTLINE_DRIFT__ON_ACCURACY_BELOW="0.7",
        DRIFTLINE_DRIFT__ACCURACY_WINDOW="300", DRIFTLINE_DRIFT__DATA_DRIFT_RETRAINS="true",
        DRIFTLINE_DRIFT__DATA_DRIFT_SAMPLE="1", DRIFTLINE_DRIFT__DATA_DRIFT_WINDOW="300")
    # concept drift and performance (accuracy 0.9 -> 0.55 < 0.7), new data at position 2499
    end = publish_outcomes(settings, [(2000, 0.10), (1000, 0.45)])
    # data drift: feature x moves from around 0 to around 5
    rng = random.Random(5)
    publish_features(settings, [rng.gauss(0, 1) for _ in range(900)] + [rng.gauss(5, 1) for _ in range(600)])
    # on demand, over HTTP, with the admin token only
    url = drift.url + "/v1/retrain"
    assert httpx.post(url, timeout=5).status_code == 401
    assert httpx.post(url, headers={"Authorization": "Bearer wrong"}, timeout=5).status_code == 401
    assert httpx.post(url, headers={"Authorization": f"Bearer {TOKEN}"}, json={"reason": "whim"},
                      timeout=5).status_code == 422
    accepted = httpx.post(drift.url + "/v1/retrain", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
    assert accepted.status_code == 202, accepted.text
    wait_position(drift, end - 1)
    expected = {"concept_drift", "performance", "new_data", "data_drift", "schedule", "demand"}
    deadline = time.monotonic() + 30
    while True:  # the features are handled after the outcomes; the schedule fires every second
        requests = read_topic(settings, "retrain.requests", "RetrainRequest")
        if {r["reason"] for r in requests} >= expected or time.monotonic() > deadline:
            break
    assert {r["reason"] for r in requests} == expected, requests
    events = {e["drift_id"]: e for e in read_topic(settings, "drift.events", "DriftEvent")}
    for r in requests:
        if r["reason"] in ("concept_drift", "data_drift"):
            assert events[r["drift_id"]]["kind"] == r["reason"].split("_")[0]
    assert [r["position"] for r in requests if r["reason"] == "new_data"] == [2499]
    assert [r["request_id"] for r in requests if r["reason"] == "demand"] == [accepted.json()["request_id"]]
    data_events = [e for e in events.values() if e["kind"] == "data"]
    assert [e["feature"] for e in data_events] == ["x"] and data_events[0]["statistic"] >= 0.25


def test_cooldown_holds_a_burst_of_triggers_but_not_a_demand_and_survives_a_crash(settings, run_service):
    env = dict(DRIFTLINE_ADMIN_TOKEN=TOKEN, DRIFTLINE_DRIFT__COOLDOWN="100000", DRIFTLINE_DRIFT__ON_NEW_DATA="100",
               DRIFTLINE_DRIFT__DATA_DRIFT="false")
    drift = run_service("drift", **env)
    end = publish_outcomes(settings, [(1000, 0.1)])
    wait_position(drift, end - 1)
    assert metric(drift, "driftline_retrains_suppressed_total", reason="new_data") == 9
    drift.kill9()  # state was saved before the offsets were committed
    drift.restart()
    end = publish_outcomes(settings, [(1000, 0.1)], start=end)
    state = wait_position(drift, end - 1)
    assert state["last_retrain_position"] == 99 and state["cooling_down"]
    assert metric(drift, "driftline_retrains_suppressed_total", reason="new_data") == 10
    demand = httpx.post(drift.url + "/v1/retrain", json={"reason": "demand"},
                        headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
    assert demand.status_code == 202
    requests = read_topic(settings, "retrain.requests", "RetrainRequest")
    assert [(r["reason"], r["position"]) for r in requests] == [("new_data", 99), ("demand", end - 1)]


def test_driftline_retrain_command_publishes_an_on_demand_request(settings):
    env = {**os.environ, **settings_env(settings)}
    done = subprocess.run([sys.executable, "-m", "driftline.cli", "retrain"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    requests = read_topic(settings, "retrain.requests", "RetrainRequest")
    assert [(r["reason"], r["model"]) for r in requests] == [("demand", settings.learner.model_name)]
    assert requests[0]["request_id"] in done.stdout
