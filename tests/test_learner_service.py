"""The learner against real Kafka and Redis, driven the way the features service drives it:
snapshots in Redis, FeatureVectors on `features`, Labels on `labels.valid`."""

from __future__ import annotations

import time
from collections import Counter

import httpx
import pytest
from river import dummy, linear_model, preprocessing

from driftline.infra import stack
from driftline.learner.labels import argmax, proba_to_text, to_river
from driftline.shared.keys import Keys
from driftline.shared.registry import ModelRegistry, TamperedArtifact, UnknownVersion
from driftline.shared.settings import FeatureSettings, Ports

from learner_harness import T0, Driver, champion_outcomes, make_rows, read_all, status, wait_for


def registry_of(settings, redis_client) -> ModelRegistry:
    return ModelRegistry(redis_client, Keys(settings.namespace), settings.learner.model_name,
                         settings.model_key.get_secret_value().encode())


def assert_once(outcomes: list[dict], n: int) -> None:
    """n labels learned, each exactly once per role, champion positions 0..n-1 in order."""
    per_role = Counter((o["event_id"], o["role"]) for o in outcomes)
    assert max(per_role.values()) == 1, [k for k, c in per_role.items() if c > 1][:5]
    assert [o["position"] for o in champion_outcomes(outcomes)] == list(range(n))


def in_process_accuracy(rows) -> float:
    """river's own test-then-train loop on the same rows (label delay 0)."""
    model = preprocessing.StandardScaler() | linear_model.LogisticRegression()
    hits = 0
    for _, x, y in rows:
        hits += argmax(proba_to_text(model.predict_proba_one(x))) == y
        model.learn_one(x, to_river(y))
    return hits / len(rows)


def test_labels_the_model_cannot_learn_go_to_the_dlq_and_the_learner_goes_on(settings, redis_client, run_service):
    # The default model is a binary classifier: river raises on "yes" (and would learn "7" as 1).
    learner = run_service("learner")
    driver = Driver(settings, redis_client)
    rows = make_rows(300)
    odd = {60: "yes", 150: "7", 240: "  spam"}
    rows = [(e, x, odd.get(i, y)) for i, (e, x, y) in enumerate(rows)]
    driver.send(rows)

    outcomes = read_all(settings, driver.topics.outcomes, "Outcome", until=lambda o: len(o) >= 297)
    assert len(outcomes) == 297 and not {f"e{i}" for i in odd} & {o["event_id"] for o in outcomes}
    assert [o["position"] for o in champion_outcomes(outcomes)] == list(range(297))
    dead = read_all(settings, driver.topics.labels_dlq, "DeadLetter", until=lambda d: len(d) >= 3)
    assert sorted(d["key"] for d in dead) == sorted(f"e{i}".encode() for i in odd)
    assert all(d["reason"] == "unlearnable_label" and "binary classifier" in d["detail"] for d in dead)
    live = wait_for(lambda: (s := status(learner)["live"])["champion"]["examples"] == 297 and s)
    assert live["state"] == "active"


def test_learner_learns_each_label_once_and_dead_letters_unknown_events(settings, redis_client, run_service):
    learner = run_service("learner", DRIFTLINE_LEARNER__LABEL_GRACE_S="1.0")
    driver = Driver(settings, redis_client)
    rows = make_rows(400)
    driver.send(rows)
    driver.label("never-seen", "1", 1.0)
    expired = Driver(settings.model_copy(update={"features": FeatureSettings(snapshot_ttl_s=1)}), redis_client)
    expired.send(make_rows(1, start=400), labels=False, publish=False)  # a snapshot that expires...
    time.sleep(1.5)
    driver.label("e400", "1", T0 + 400.001)  # ...before its label comes

    outcomes = read_all(settings, driver.topics.outcomes, "Outcome", until=lambda o: len(o) >= 400)
    assert_once(outcomes, 400)
    assert sorted(o["event_id"] for o in outcomes) == sorted(r[0] for r in rows)
    assert all(o["role"] == "champion" and o["model_version"] == 1 for o in outcomes)
    assert {o["y_true"] for o in outcomes} == {"0", "1"} and {o["y_pred"] for o in outcomes} <= {"0", "1"}
    late = outcomes[200:]
    assert sum(o["y_true"] == o["y_pred"] for o in late) / len(late) > 0.85  # it really learns

    dead = read_all(settings, driver.topics.labels_dlq, "DeadLetter", until=lambda d: len(d) >= 2)
    assert {d["key"] for d in dead} == {b"never-seen", b"e400"}
    assert all(d["reason"] == "unknown_event" and "snapshot" in d["detail"] for d in dead)

    predictions = read_all(settings, driver.topics.predictions, "Prediction", until=lambda p: len(p) >= 400)
    assert len({p["event_id"] for p in predictions}) == 400 and {p["source"] for p in predictions} == {"learner"}
    assert redis_client.hexists(driver.keys.snapshot("e0"), "p.champion")
    reg = registry_of(settings, redis_client)
    assert reg.champion() == 1 and reg.meta(1)["reason"] == "initial"
    swaps = read_all(settings, driver.topics.model_swaps, "ModelSwap", until=lambda s: len(s) >= 1)
    assert [(s["from_version"], s["to_version"], s["reason"]) for s in swaps] == [(None, 1, "initial")]
    live = wait_for(lambda: (s := status(learner)["live"])["champion"]["examples"] == 400 and s)
    assert live["state"] == "active" and live["position"] == 400
    updates = read_all(settings, driver.topics.model_updates, "ModelUpdate", until=lambda u: len(u) >= 1)
    assert updates[-1]["version"] == 1 and updates[-1]["examples_seen"] > 0
    metrics = httpx.get(learner.url + "/metrics").text
    assert 'driftline_model_accuracy{model="default",role="champion",version="1"}' in metrics


def test_kill9_mid_stream_then_restart_learns_every_label_exactly_once(settings, redis_client, run_service):
    # Only the first-start checkpoint exists when the learner is killed the first time: every
    # outcome it published must be re-learned on restart without being published again.
    learner = run_service("learner", DRIFTLINE_LEARNER__CHECKPOINT_EVERY="100000",
                          DRIFTLINE_LEARNER__CHECKPOINT_INTERVAL_S="3600")
    driver = Driver(settings, redis_client)
    rows = make_rows(1500, seed=11)
    driver.send(rows[:500])
    read_all(settings, driver.topics.outcomes, "Outcome", until=lambda o: len(o) >= 500)
    learner.kill9()
    learner.restart()
    driver.send(rows[500:])
    time.sleep(0.3)
    learner.kill9()  # this time somewhere in the middle of the stream
    learner.restart()
    read_all(settings, driver.topics.outcomes, "Outcome", until=lambda o: len(o) >= 1500)
    time.sleep(1.0)
    outcomes = read_all(settings, driver.topics.outcomes, "Outcome")
    assert_once(outcomes, 1500)
    assert {o["event_id"] for o in outcomes} == {r[0] for r in rows}
    live = wait_for(lambda: (s := status(learner)["live"])["champion"]["examples"] == 1500 and s)
    assert live["position"] == 1500
    accuracy = sum(o["y_true"] == o["y_pred"] for o in outcomes) / len(outcomes)
    assert abs(accuracy - in_process_accuracy(rows)) < 0.02, (accuracy, in_process_accuracy(rows))


def test_standby_takes_over_and_a_tampered_checkpoint_is_refused(settings, redis_client, run_service):
    fast = {"DRIFTLINE_LEARNER__LEASE_TTL_S": "1.5"}
    first = run_service("learner", **fast)
    standby_settings = settings.model_copy(update={"ports": Ports(learner=stack.free_port())})
    second = run_service("learner", settings_override=standby_settings, **fast)
    assert httpx.get(second.url + "/health").json()["state"] == "standby"
    driver = Driver(settings, redis_client)
    rows = make_rows(400, seed=3)
    driver.send(rows[:200])
    read_all(settings, driver.topics.outcomes, "Outcome", until=lambda o: len(o) >= 200)
    first.kill9()
    wait_for(lambda: httpx.get(second.url + "/health").json()["state"] == "active", what="standby takes over")
    driver.send(rows[200:])
    read_all(settings, driver.topics.outcomes, "Outcome", until=lambda o: len(o) >= 400)
    time.sleep(1.0)
    assert_once(read_all(settings, driver.topics.outcomes, "Outcome"), 400)

    second.stop()  # clean stop: final checkpoint
    key = Keys(settings.namespace).checkpoint("default")
    blob = bytearray(redis_client.get(key))
    blob[-10] ^= 0xFF
    redis_client.set(key, bytes(blob))
    second.restart(wait=False)
    wait_for(lambda: "REFUSED the checkpoint" in second.log_tail(200), what="the learner refuses the checkpoint")
    wait_for(lambda: httpx.get(second.url + "/health").status_code == 503, what="/health reports the dead worker")
    assert "TamperedArtifact" in httpx.get(second.url + "/health").json()["error"]


def test_a_tampered_registry_artifact_is_refused(settings, redis_client):
    reg = registry_of(settings, redis_client)
    version = reg.register(linear_model.LogisticRegression(), spec="linear_model.LogisticRegression()",
                           reason="initial")
    key = Keys(settings.namespace).registry_artifact("default", version)
    blob = bytearray(redis_client.get(key))
    blob[len(blob) // 2] ^= 0x01
    redis_client.set(key, bytes(blob))
    with pytest.raises(TamperedArtifact):
        reg.load(version)
    other_key = ModelRegistry(redis_client, Keys(settings.namespace), "default", b"another deployment's key")
    reg.register(linear_model.LogisticRegression(), spec="x", reason="initial")
    with pytest.raises(TamperedArtifact):
        other_key.load(version + 1)


def test_retrain_shadow_kill9_promote_and_rollback(settings, redis_client, run_service):
    # The champion is a majority-class guesser; the challenger built from the spec learns the concept.
    reg = registry_of(settings, redis_client)
    reg.set_role("champion", reg.register(dummy.PriorClassifier(), spec="dummy.PriorClassifier()", reason="initial"))
    env = {"DRIFTLINE_LEARNER__WARM_START": "100", "DRIFTLINE_LEARNER__PROMOTE_AFTER": "300",
           "DRIFTLINE_LEARNER__PROMOTE_MARGIN": "0.1", "DRIFTLINE_ADMIN_TOKEN": "s3cret-learner-admin-8c4f1a"}
    learner = run_service("learner", **env)
    driver = Driver(settings, redis_client)
    rows = make_rows(900, seed=5)
    driver.send(rows[:200])
    read_all(settings, driver.topics.outcomes, "Outcome", until=lambda o: len(o) >= 200)
    request_id = driver.retrain("concept_drift", drift_id="drift-42")
    wait_for(lambda: reg.challenger() == 2, what="a challenger is registered")
    meta = reg.meta(2)
    assert (meta["parent"], meta["reason"], meta["drift_id"], meta["request_id"]) == (1, "concept_drift", "drift-42",
                                                                                      request_id)
    assert meta["examples_seen"] == meta["warm_start"] == 100 and meta["position"] == 200

    driver.send(rows[200:350])  # shadowing: both score and learn, the champion alone answers
    shadowed = read_all(settings, driver.topics.outcomes, "Outcome", headers=True,
                        until=lambda o: sum(x["role"] == "challenger" for x in o) >= 100)
    # Whose each outcome is, in its headers too (a prediction worker skips the challenger's undecoded).
    assert all(o["_headers"] == {"driftline-model": o["model"].encode(), "driftline-role": o["role"].encode()}
               for o in shadowed)
    # The vector learned at a position travels once, on the champion's outcome.
    vectors = {o["position"]: o["features"] for o in shadowed if o["role"] == "champion"}
    challengers = [o for o in shadowed if o["role"] == "challenger"]
    assert all(o["features"] is None and vectors.get(o["position"]) for o in challengers if o["position"] in vectors)
    assert sum(o["position"] in vectors for o in challengers) >= 50
    learner.kill9()
    learner.restart()
    # Restored from the checkpoint, and the shared examples since then re-learned (not re-published).
    live = wait_for(lambda: (s := status(learner)["live"])["contest"] and s["contest"]["shared"] >= 100 and s)
    assert live["challenger"]["version"] == 2 and live["champion"]["version"] == 1

    driver.send(rows[350:])
    swaps = read_all(settings, driver.topics.model_swaps, "ModelSwap",
                     until=lambda s: any(x["reason"] == "promotion" for x in s))
    promotion = next(s for s in swaps if s["reason"] == "promotion")
    assert (promotion["from_version"], promotion["to_version"]) == (1, 2)
    outcomes = read_all(settings, driver.topics.outcomes, "Outcome", until=lambda o: len(champion_outcomes(o)) >= 900)
    assert_once(outcomes, 900)
    assert reg.champion() == 2 and reg.challenger() is None
    assert reg.meta(2)["replaced"] == 1 and reg.meta(2)["contest"]["challenger_accuracy"] > 0.6
    # The challenger learned its warm start and every label after its creation, once.
    live = wait_for(lambda: (s := status(learner)["live"])["position"] == 900 and s)
    assert live["champion"]["version"] == 2 and live["champion"]["examples"] == 100 + (900 - 200)

    assert httpx.post(learner.url + "/v1/models/rollback").status_code == 401
    assert httpx.post(learner.url + "/v1/models/rollback", headers={"Authorization": "Bearer nope"}).status_code == 401
    r = httpx.post(learner.url + "/v1/models/rollback", headers={"Authorization": "Bearer s3cret-learner-admin-8c4f1a"})
    assert r.status_code == 200 and r.json()["to_version"] == 1
    wait_for(lambda: status(learner)["live"]["champion"]["version"] == 1, what="the learner follows the rollback")
    assert reg.champion() == 1
    assert httpx.post(learner.url + "/v1/models/9/promote", headers={"Authorization": "Bearer s3cret-learner-admin-8c4f1a"}).status_code == 404


def test_a_challenger_learns_its_warm_start_and_is_promoted_on_what_it_answers_live(settings, redis_client,
                                                                                   run_service):
    # The retrain request comes late (here: 300 labels after the change point). The challenger
    # learns those labels first, but its contest counts only answers given at event time: the
    # warm-start examples are the ones on which the champion was seen to fail.
    reg = registry_of(settings, redis_client)
    reg.set_role("champion", reg.register(dummy.PriorClassifier(), spec="dummy.PriorClassifier()", reason="initial"))
    learner = run_service("learner", DRIFTLINE_LEARNER__WARM_START="1000")
    driver = Driver(settings, redis_client)
    rows = make_rows(700, seed=11)
    driver.send(rows[:300])
    read_all(settings, driver.topics.outcomes, "Outcome", until=lambda o: len(o) >= 300)
    driver.retrain("concept_drift", model_version=1, since_position=0)
    wait_for(lambda: reg.challenger() == 2, what="a challenger is registered")
    assert reg.meta(2)["warm_start"] == 300 and reg.champion() == 1  # taught, not yet promoted
    driver.send(rows[300:600])
    swaps = read_all(settings, driver.topics.model_swaps, "ModelSwap",
                     until=lambda s: any(x["reason"] == "promotion" for x in s))
    assert [(s["from_version"], s["to_version"]) for s in swaps if s["reason"] == "promotion"] == [(1, 2)]
    meta = reg.meta(2)
    contest = meta["contest"]
    assert contest["rule"] == "mcnemar" and 100 <= contest["shared"] <= 300 and contest["evidence"] >= 100
    assert meta["promoted_at"] == 300 + contest["shared"] and contest["challenger_wins"] > contest["champion_wins"]
    assert reg.meta(1).get("shadowing") is True  # the displaced champion shadows, for its way back

    # A drift alarm about v1 that arrives after v1 was replaced is stale: no challenger for v2.
    driver.retrain("concept_drift", model_version=1, since_position=0)
    on_demand = driver.retrain("demand", drift_id=None, model_version=1)
    wait_for(lambda: reg.challenger() == 3, what="the demand request builds a challenger")
    assert reg.meta(3)["request_id"] == on_demand and reg.champion() == 2
    driver.send(rows[600:])
    outcomes = read_all(settings, driver.topics.outcomes, "Outcome", until=lambda o: len(champion_outcomes(o)) >= 700)
    assert_once(outcomes, 700)
    assert status(learner)["live"]["champion"]["version"] == 2


def test_a_useless_challenger_is_dropped_and_retrains_while_shadowing_are_ignored(settings, redis_client,
                                                                                  run_service):
    env = {"DRIFTLINE_LEARNER__WARM_START": "0", "DRIFTLINE_LEARNER__PROMOTE_AFTER": "100",
           "DRIFTLINE_LEARNER__PROMOTE_MARGIN": "0.5", "DRIFTLINE_LEARNER__MAX_SHADOW": "150",
           "DRIFTLINE_LEARNER__KEEP_VERSIONS": "1", "DRIFTLINE_LEARNER__KEEP_RECORDS": "1"}
    learner = run_service("learner", **env)
    driver = Driver(settings, redis_client)
    rows = make_rows(500, seed=9)
    driver.send(rows[:100])
    read_all(settings, driver.topics.outcomes, "Outcome", until=lambda o: len(o) >= 100)
    driver.retrain("demand", drift_id=None)
    reg = registry_of(settings, redis_client)
    wait_for(lambda: reg.challenger() == 2, what="a challenger is registered")
    ignored = driver.retrain("schedule", drift_id=None)
    wait_for(lambda: reg.meta(2).get("ignored_requests"), what="the second request is recorded as ignored")
    assert reg.meta(2)["ignored_requests"][0]["request_id"] == ignored
    driver.send(rows[100:])
    wait_for(lambda: reg.meta(2).get("dropped_at"), what="the challenger is dropped")
    meta = reg.meta(2)
    assert reg.challenger() is None and reg.champion() == 1 and meta["contest"]["shared"] == 150
    assert "did not beat" in meta["drop_reason"]
    assert "driftline_challengers_dropped_total" in httpx.get(learner.url + "/metrics").text
    outcomes = read_all(settings, driver.topics.outcomes, "Outcome", until=lambda o: len(champion_outcomes(o)) >= 500)
    assert_once(outcomes, 500)
    assert sum(o["role"] == "challenger" for o in outcomes) == 150
    assert httpx.post(learner.url + "/v1/models/rollback").status_code == 403  # no admin token: closed
    assert "server" not in httpx.get(learner.url + "/health").headers  # the software is not advertised

    # Retention: the next challenger's registration prunes the dropped one's artifact (keep 1),
    # never the champion's, and then its lineage record (keep 1 record beside what is needed).
    driver.retrain("demand", drift_id=None)
    wait_for(lambda: reg.challenger() == 3, what="the next challenger is registered")
    wait_for(lambda: reg.count() == 2, what="the dropped challenger's record is deleted")
    with pytest.raises(UnknownVersion):
        reg.load(2)
    assert reg.load(1)[1]["version"] == 1 and reg.load(3)[1]["version"] == 3
    models = httpx.get(learner.url + "/v1/models", params={"limit": 1}).json()
    assert [v["version"] for v in models["versions"]] == [3] and models["versions_total"] == 2
