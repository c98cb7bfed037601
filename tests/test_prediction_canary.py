"""Canary / A-B routing in the prediction service, against the real broker and Redis: a share of
/v1/predict goes to the challenger, sticky by entity id; each arm's served accuracy comes from the
labels; a canary worse by the margin is rolled back by itself; admin routes promote or roll back."""

from __future__ import annotations

import time
import uuid

import httpx
import pytest

from driftline.learner.spec import parse_model
from driftline.offline.train import enter_contest, registry_of
from driftline.prediction.canary import arm_of
from driftline.replay.datasets import load
from driftline.shared import kafka
from driftline.shared.codec import get_codec
from driftline.shared.topics import Topics
from pipeline import metric, replay_report, start_pipeline

TOKEN = "canary-admin-3b8e1f6d9c2a"
LINEAR = "preprocessing.StandardScaler() | linear_model.LogisticRegression()"


def predict(http: httpx.Client, body: dict) -> dict:
    """One answer; a 503 (Redis slow to answer on a loaded machine) is asked again, as a client would."""
    for _ in range(5):
        r = http.post("/v1/predict", json=body)
        if r.status_code != 503:
            break
        time.sleep(0.5)
    assert r.status_code == 200, r.text
    return r.json()


def test_the_arm_of_an_entity_is_sticky_and_follows_the_share():
    entities = [f"e{i}" for i in range(2000)]
    share = sum(arm_of(e, 0.2) == "challenger" for e in entities) / len(entities)
    assert 0.16 < share < 0.24
    # Raising the share only moves entities to the challenger, never back.
    assert all(arm_of(e, 0.5) == "challenger" for e in entities if arm_of(e, 0.2) == "challenger")


@pytest.mark.e2e
def test_a_worse_canary_is_rolled_back_by_itself_and_a_canary_can_be_promoted(settings, run_service):
    procs = start_pipeline(run_service, ("ingestion", "features", "learner", "prediction"), model=LINEAR,
                           features="raw", DRIFTLINE_ADMIN_TOKEN=TOKEN, DRIFTLINE_PREDICTION__CANARY_MIN_LABELS="60",
                           DRIFTLINE_PREDICTION__CANARY_WINDOW="200")
    replay_report(settings, "sea-abrupt", limit=400, label_delay=0)
    # A challenger that can only answer the majority class, entered the way `driftline train` does.
    registry = registry_of(settings)
    bad = registry.register(parse_model("dummy.PriorClassifier()"), spec="dummy.PriorClassifier()", reason="demand",
                            parent=1)
    request_id = uuid.uuid4().hex
    registry.annotate(bad, request_id=request_id)
    assert enter_contest(settings, "default", request_id, 1)
    deadline = time.monotonic() + 60
    while registry.challenger() != bad and time.monotonic() < deadline:
        time.sleep(0.3)
    assert registry.challenger() == bad

    url = procs["prediction"].url
    admin = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=url, timeout=10) as http:
        assert http.post("/v1/canary", json={"share": 0.5}).status_code in (401, 403)
        assert http.post("/v1/canary", json={"share": 1.5}, headers=admin).status_code == 422
        r = http.post("/v1/canary", json={"share": 0.5}, headers=admin)
        assert r.status_code == 200 and r.json()["share"] == 0.5, r.text
        deadline = time.monotonic() + 15
        while http.get("/v1/models").json()["canary"]["challenger"] != bad and time.monotonic() < deadline:
            time.sleep(0.3)

        codec, topics = get_codec(), Topics(settings.namespace)
        producer = kafka.producer(settings)
        rows = list(load("sea-abrupt").rows())[400:1000]
        seen: dict[str, tuple[str, int]] = {}
        for i, (fields, label, _entity) in enumerate(rows):
            entity = f"user-{i % 80}"
            event_id = f"canary-{i}"
            answer = predict(http, {"entity_id": entity, "fields": fields, "event_id": event_id})
            assert answer["arm"] == arm_of(entity, 0.5) or answer["arm"] == "champion", answer  # sticky (or rolled back)
            assert answer["model_version"] == (bad if answer["arm"] == "challenger" else 1)
            seen.setdefault(entity, (answer["arm"], answer["model_version"]))
            kafka.produce(producer, topics.labels_valid,
                          codec.encode("Label", {"event_id": event_id, "label": label, "ts": time.time()}), event_id)
            if i % 50 == 49:
                producer.flush(10)
                if http.get("/v1/models").json()["canary"]["rolled_back"]:
                    break
        producer.flush(10)
        assert {arm for arm, _ in seen.values()} == {"champion", "challenger"}
        deadline = time.monotonic() + 30
        while not http.get("/v1/models").json()["canary"]["rolled_back"] and time.monotonic() < deadline:
            time.sleep(0.5)
        state = http.get("/v1/models").json()["canary"]
        assert state["share"] == 0 and "served error rate" in state["rolled_back"], state
        assert state["served_accuracy"]["champion"] is not None
        assert metric(procs["prediction"], "driftline_canary_rollbacks_total") == 1
        assert metric(procs["prediction"], "driftline_canary_requests_total", arm="challenger") > 0
        assert "served error rate" in registry.meta(bad)["canary_rolled_back"]
        # Rolled back: everyone is on the champion again.
        challenger_entity = next(e for e, (arm, _) in seen.items() if arm == "challenger")
        again = predict(http, {"entity_id": challenger_entity, "fields": rows[0][0]})
        assert (again["arm"], again["model_version"]) == ("champion", 1)

        # Promote through the admin route: the challenger becomes the champion everywhere.
        assert http.post("/v1/canary", json={"share": 0.2}, headers=admin).status_code == 200
        r = http.post("/v1/canary/promote", headers=admin)
        assert r.status_code == 200 and r.json()["to_version"] == bad, r.text
        assert registry.champion() == bad
        after = predict(http, {"entity_id": challenger_entity, "fields": rows[0][0]})
        assert (after["arm"], after["model_version"]) == ("champion", bad)
        assert http.post("/v1/canary/rollback", headers=admin).json()["share"] == 0
