"""The drift loop through real Kafka and Redis: features and labels into a real learner, which
detects drift where it learns and publishes drift events and retrain requests, each trigger with
its reason, the cooldown across a crash; and the drift service, which asks for retraining on
demand (admin route, `driftline retrain`) and on a schedule, and shows what the loop sees.

The champion is river's NoChangeClassifier (it answers the last label it learned), so its error at
each example is whether the label changed: a label sequence sets the error rate exactly."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import httpx
from learner_harness import Driver, read_all, wait_for
from pipeline import metric

from driftline.shared.settings import settings_env
from driftline.shared.topics import Topics

TOKEN = "drift-admin-token-4f9c2e7a1b"
NO_CHANGE = "dummy.NoChangeClassifier()"


def rows_with_error_rates(segments, start: int = 0, seed: int = 11, x=lambda i, rng: rng.gauss(0, 1)):
    """(event_id, fields, label) whose label changes with the given probability in each (count, rate)
    segment: the NoChange champion's error rate there."""
    rng, rows, label, i = random.Random(seed), [], "0", start
    for count, rate in segments:
        for _ in range(count):
            if rng.random() < rate:
                label = "1" if label == "0" else "0"
            rows.append((f"e{i}", {"x": x(i, rng)}, label))
            i += 1
    return rows


def learned(learner) -> int:
    return int(httpx.get(learner.url + "/health", timeout=5).json()["position"])


def wait_learned(learner, n: int, timeout: float = 120.0) -> None:
    wait_for(lambda: learned(learner) >= n, timeout, f"{n} labels learned:\n{learner.log_tail()}")


def test_only_a_rising_error_rate_raises_a_concept_drift_near_the_change_and_one_retrain(settings, redis_client,
                                                                                         run_service):
    learner = run_service("learner", DRIFTLINE_LEARNER__MODEL=NO_CHANGE, DRIFTLINE_DRIFT__DATA_DRIFT="false")
    driver = Driver(settings, redis_client)
    # The error rate falls at 3000 (ADWIN alarms on that too): nothing to publish.
    driver.send(rows_with_error_rates([(3000, 0.40), (3000, 0.10)]), entities=1)
    wait_learned(learner, 6000)
    assert read_all(settings, driver.topics.drift_events, "DriftEvent") == []
    assert read_all(settings, driver.topics.retrain_requests, "RetrainRequest") == []
    # It rises at 6000: one concept drift, one retrain request, both from the learner.
    driver.send(rows_with_error_rates([(3000, 0.40)], start=6000, seed=12), entities=1)
    wait_learned(learner, 9000)
    events = read_all(settings, driver.topics.drift_events, "DriftEvent")
    assert [(e["kind"], e["level"], e["detector"]) for e in events] == [("concept", "drift", "ADWIN")]
    event = events[0]
    assert 6000 <= event["position"] <= 6500
    assert event["error_before"] < 0.15 and event["error_after"] > 0.3 and event["model_version"] == 1
    requests = read_all(settings, driver.topics.retrain_requests, "RetrainRequest")
    assert [(r["reason"], r["drift_id"], r["model_version"], r["position"]) for r in requests] == [
        ("concept_drift", event["drift_id"], 1, event["position"])]
    assert metric(learner, "driftline_drift_events_total", kind="concept", level="drift") == 1
    assert metric(learner, "driftline_retrain_requests_total", reason="concept_drift") == 1
    assert 0.3 < metric(learner, "driftline_drift_error_rate", version="1") < 0.5
    # The learner acted on its own request where it made it, and did not take it again from the topic.
    models = httpx.get(learner.url + "/v1/models", timeout=5).json()
    assert models["live"]["challenger"]["version"] == 2, models


def test_each_trigger_produces_a_retrain_request_with_its_reason(settings, redis_client, run_service):
    learner = run_service(
        "learner", DRIFTLINE_LEARNER__MODEL=NO_CHANGE, DRIFTLINE_LEARNER__MAX_SHADOW="50",
        DRIFTLINE_DRIFT__COOLDOWN="0", DRIFTLINE_DRIFT__ON_NEW_DATA="2500",
        DRIFTLINE_DRIFT__ON_ACCURACY_BELOW="0.7", DRIFTLINE_DRIFT__ACCURACY_WINDOW="300",
        DRIFTLINE_DRIFT__DATA_DRIFT_RETRAINS="true", DRIFTLINE_DRIFT__DATA_DRIFT_SAMPLE="1",
        DRIFTLINE_DRIFT__DATA_DRIFT_WINDOW="300")
    drift = run_service("drift", DRIFTLINE_ADMIN_TOKEN=TOKEN, DRIFTLINE_DRIFT__ON_SCHEDULE_S="1")
    driver = Driver(settings, redis_client)
    # concept drift and performance (accuracy 0.9 -> 0.55 < 0.7), new data at position 2499, and
    # data drift: feature x moves from around 0 to around 5 at row 2000
    shifted = lambda i, rng: rng.gauss(5 if i >= 2000 else 0, 1)  # noqa: E731
    driver.send(rows_with_error_rates([(2000, 0.10), (1000, 0.45)], x=shifted), entities=1)
    # on demand, over HTTP, with the admin token only
    url = drift.url + "/v1/retrain"
    assert httpx.post(url, timeout=5).status_code == 401
    assert httpx.post(url, headers={"Authorization": "Bearer wrong"}, timeout=5).status_code == 401
    assert httpx.post(url, headers={"Authorization": f"Bearer {TOKEN}"}, json={"reason": "whim"},
                      timeout=5).status_code == 422
    accepted = httpx.post(url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
    assert accepted.status_code == 202, accepted.text
    wait_learned(learner, 3000)
    expected = {"concept_drift", "performance", "new_data", "data_drift", "schedule", "demand"}
    requests = read_all(settings, driver.topics.retrain_requests, "RetrainRequest",
                        until=lambda rs: {r["reason"] for r in rs} >= expected, timeout=30)
    assert {r["reason"] for r in requests} == expected, requests
    events = {e["drift_id"]: e for e in read_all(settings, driver.topics.drift_events, "DriftEvent")}
    for r in requests:
        if r["reason"] in ("concept_drift", "data_drift"):
            assert events[r["drift_id"]]["kind"] == r["reason"].split("_")[0]
    assert [r["position"] for r in requests if r["reason"] == "new_data"] == [2499]
    assert [r["request_id"] for r in requests if r["reason"] == "demand"] == [accepted.json()["request_id"]]
    data_events = [e for e in events.values() if e["kind"] == "data"]
    assert [e["feature"] for e in data_events] == ["x"] and data_events[0]["statistic"] >= 0.25
    assert 2000 <= data_events[0]["position"] <= 2400
    # /v1/drift shows what the learner's loop sees, and the alarms it raised.
    view = httpx.get(drift.url + "/v1/drift", timeout=5).json()
    assert view["model_version"] == 1 and {a["kind"] for a in view["recent_alarms"]} == {"concept", "data"}


def test_cooldown_holds_a_burst_of_triggers_but_not_a_demand_and_survives_a_crash(settings, redis_client,
                                                                                    run_service):
    env = dict(DRIFTLINE_LEARNER__MODEL=NO_CHANGE, DRIFTLINE_DRIFT__COOLDOWN="100000",
               DRIFTLINE_DRIFT__ON_NEW_DATA="100", DRIFTLINE_DRIFT__DATA_DRIFT="false")
    learner = run_service("learner", **env)
    driver = Driver(settings, redis_client)
    driver.send(rows_with_error_rates([(1000, 0.1)]), entities=1)
    wait_learned(learner, 1000)
    assert metric(learner, "driftline_retrains_suppressed_total", reason="new_data") == 9
    learner.kill9()  # the policy's state rides in the checkpoint, with the offsets
    learner.restart()
    driver.send(rows_with_error_rates([(1000, 0.1)], start=1000, seed=12), entities=1)
    wait_learned(learner, 2000)
    state = httpx.get(learner.url + "/health", timeout=5).json()
    assert state["position"] == 2000
    requests = read_all(settings, driver.topics.retrain_requests, "RetrainRequest")
    assert [(r["reason"], r["position"]) for r in requests] == [("new_data", 99)]
    drift = run_service("drift", DRIFTLINE_ADMIN_TOKEN=TOKEN)
    demand = httpx.post(drift.url + "/v1/retrain", json={"reason": "demand"},
                        headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
    assert demand.status_code == 202
    requests = read_all(settings, driver.topics.retrain_requests, "RetrainRequest",
                        until=lambda rs: len(rs) == 2)
    assert [r["reason"] for r in requests] == ["new_data", "demand"]


def test_driftline_retrain_command_publishes_an_on_demand_request(settings):
    env = {**os.environ, **settings_env(settings)}
    done = subprocess.run([sys.executable, "-m", "driftline.cli", "retrain"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    requests = read_all(settings, Topics(settings.namespace).retrain_requests, "RetrainRequest",
                        until=lambda rs: len(rs) >= 1)
    assert [(r["reason"], r["model"]) for r in requests] == [("demand", settings.learner.model_name)]
    assert requests[0]["request_id"] in done.stdout
