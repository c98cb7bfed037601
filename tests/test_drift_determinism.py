"""The drift loop is deterministic: the same stream gives the same drift positions, retrain
requests, swaps and predictions, run after run, at any speed and behind any backlog, and the same
as the in-process reference `driftline bench drift` runs (`bench.drift.simulate`, the learner's own
`Adaptation` over the rows in memory).

SEA with an abrupt drift at row 10,000, a Hoeffding tree, label delay 50: the loop raises three
concept drifts, promotes two challengers and brings a displaced champion back, so every kind of
decision is on the line. Each run goes through the real services in a fresh namespace, as fast as
the replay publishes: once with everything up; once with the learner started only after the whole
stream is on the broker (a backlog: it reads everything in chunks, paused and resumed by flow
control); once killed with -9 in the middle and restarted (it re-learns from its checkpoint)."""

from __future__ import annotations

import threading
import time

import pytest
from learner_harness import read_all, wait_for
from pipeline import metric, replay_report, start_pipeline

from driftline.bench.drift import LOGREG, TREE, simulate
from driftline.replay.datasets import load
from driftline.shared import kafka
from driftline.shared.keys import Keys
from driftline.shared.registry import ModelRegistry
from driftline.shared.swaps import rollback_target
from driftline.shared.topics import Topics

pytestmark = pytest.mark.e2e
DATASET, DELAY = "sea-abrupt", 50
SERVICES = ("ingestion", "features", "drift", "prediction")
REASONS = {"promoted": "promotion", "restored": "restored"}


@pytest.fixture(scope="module")
def reference() -> dict:
    sim = simulate(DATASET, TREE, label_delay=DELAY)
    return {
        "alarms": [(a["kind"], a["position"], a["feature"]) for a in sim["alarms"] if a["level"] == "drift"],
        "swaps": [(s["position"], s["from_version"], s["to_version"], REASONS[s["reason"]]) for s in sim["swaps"]],
        "predictions": sim["predictions"],
    }


def decisions(report: dict) -> dict:
    """The report's decisions and the champion's prediction for each row, as the reference has them."""
    by_row: dict[int, str | None] = {}
    for o in report["_outcomes"]:
        by_row.setdefault(int(o["event_id"].rsplit("-", 1)[1]), o["y_pred"])
    return {
        "alarms": [(d["kind"], d["position"], d["feature"]) for d in report["drift_events"]],
        "swaps": [(s["position"], s["from_version"], s["to_version"], s["reason"]) for s in report["model_swaps"]
                  if s["reason"] != "initial"],
        "predictions": [by_row.get(i) for i in range(len(by_row))],
    }


def assert_same(got: dict, reference: dict) -> None:
    assert len(reference["swaps"]) >= 3 and reference["alarms"], reference  # the stream exercises the loop
    assert got["alarms"] == reference["alarms"]
    assert got["swaps"] == reference["swaps"]
    differ = [i for i, (a, b) in enumerate(zip(got["predictions"], reference["predictions"])) if a != b]
    assert len(got["predictions"]) == len(reference["predictions"]) and not differ, (
        f"{len(differ)} predictions differ, first at rows {differ[:10]}")


def test_full_speed_with_every_service_up_decides_as_in_process(settings, run_service, reference):
    start_pipeline(run_service, SERVICES + ("learner",), model=TREE, features="raw")
    report = replay_report(settings, DATASET, label_delay=DELAY, model=TREE, features="raw", stall_timeout_s=180)
    assert report["examples_learned"] == load(DATASET).size
    assert_same(decisions(report), reference)


def test_the_never_retrained_model_comes_back_through_the_services_as_in_process(settings, run_service):
    """Raw Elec2 with logistic regression and labels at once: two promotions, then the model the
    loop started from (the baseline, shadowing since the first) wins its contest and is restored,
    through the registry, model.swaps and the prediction service, at the position the in-process
    loop restores it."""
    rows = 20_000
    sim = simulate("elec2", LOGREG, label_delay=0, limit=rows)
    reference = {"alarms": [(a["kind"], a["position"], a["feature"]) for a in sim["alarms"] if a["level"] == "drift"],
                 "swaps": [(s["position"], s["from_version"], s["to_version"], REASONS[s["reason"]])
                           for s in sim["swaps"]],
                 "predictions": sim["predictions"]}
    assert any(to == 1 and reason == "restored" for _, _, to, reason in reference["swaps"]), reference["swaps"]
    start_pipeline(run_service, SERVICES + ("learner",), model=LOGREG, features="raw")
    report = replay_report(settings, "elec2", limit=rows, label_delay=0, model=LOGREG, features="raw",
                           stall_timeout_s=180)
    assert report["examples_learned"] == rows
    assert_same(decisions(report), reference)


def featurized(settings, n: int) -> None:
    """Wait until the features topic holds `n` vectors: the learner started then is behind all of them."""
    client, parts = kafka.admin(settings), kafka.partitions_of(settings, Topics(settings.namespace).features)
    wait_for(lambda: sum(kafka.ends(client, parts, 10).values()) >= n, 180, f"{n} vectors on the features topic")


def test_a_learner_behind_the_whole_stream_decides_as_in_process(settings, run_service, reference):
    start_pipeline(run_service, SERVICES, model=TREE, features="raw")
    report: dict = {}
    replaying = threading.Thread(target=lambda: report.update(replay_report(
        settings, DATASET, label_delay=DELAY, model=TREE, features="raw", stall_timeout_s=300)))
    replaying.start()
    featurized(settings, load(DATASET).size)  # the whole stream, while no learner reads it
    start_pipeline(run_service, ("learner",), model=TREE, features="raw",
                   DRIFTLINE_LEARNER__MAX_HELD_EVENTS="2000", DRIFTLINE_LEARNER__MAX_WAITING_LABELS="2000")
    replaying.join(600)
    assert report["examples_learned"] == load(DATASET).size
    assert_same(decisions(report), reference)


@pytest.mark.parametrize("behind,checkpoint_interval_s", [(False, "1"), (True, "1"), (False, "600")],
                         ids=["at-full-speed", "behind-a-backlog", "every-decision-since-the-start"])
def test_a_learner_killed_mid_stream_and_restarted_decides_as_in_process(settings, redis_client, run_service, reference,
                                                                          behind, checkpoint_interval_s):
    """Behind a backlog one batch releases thousands of events: checkpoints are still taken as it
    goes, and what a crash leaves published is re-learned from stored snapshots, in order. A role
    change the loop decides is not checkpointed at once: with no checkpoint since the start, the
    restarted learner takes every decision again, at the same positions, and the registry and
    model.swaps see each once, as do drift.events and retrain.requests. Retention keeps one
    artifact beyond what is needed meanwhile (a replayed decision saves a pruned version again;
    tests/test_learner_service.py sees it prune)."""
    learner_env = dict(DRIFTLINE_LEARNER__CHECKPOINT_INTERVAL_S=checkpoint_interval_s,
                       DRIFTLINE_LEARNER__CHECKPOINT_EVERY="1000000", DRIFTLINE_LEARNER__KEEP_VERSIONS="1")
    procs = start_pipeline(run_service, SERVICES if behind else SERVICES + ("learner",), model=TREE,
                           features="raw", **({} if behind else learner_env))
    report: dict = {}
    replaying = threading.Thread(target=lambda: report.update(replay_report(
        settings, DATASET, label_delay=DELAY, model=TREE, features="raw", stall_timeout_s=300)))
    replaying.start()
    if behind:
        featurized(settings, load(DATASET).size)  # the whole stream, while no learner reads it
        procs.update(start_pipeline(run_service, ("learner",), model=TREE, features="raw", **learner_env))
    learner = procs["learner"]
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and learner_position(learner) < 12_000:  # after the first promotion
        time.sleep(0.2)
    learner.kill9()
    learner.restart()
    replaying.join(600)
    assert report["examples_learned"] == load(DATASET).size and report["outcome_duplicates"] == 0
    assert_same(decisions(report), reference)
    assert metric(learner, "driftline_scored_ahead_of_labels_total") == 0
    assert "giving up the ordered replay" not in learner.log_tail(10_000)
    registry = ModelRegistry(redis_client, Keys(settings.namespace), settings.learner.model_name,
                             settings.model_key.get_secret_value().encode())
    for version in (registry.champion(), rollback_target(registry)):
        registry.load(version)  # what serves and what a rollback goes back to are never pruned
    # The restarted learner takes its decisions again but publishes none of them twice.
    topics = Topics(settings.namespace)
    alarms = [d["drift_id"] for d in read_all(settings, topics.drift_events, "DriftEvent")]
    requests = [r["request_id"] for r in read_all(settings, topics.retrain_requests, "RetrainRequest")]
    assert alarms and len(alarms) == len(set(alarms)) and len(requests) == len(set(requests))


def learner_position(learner) -> int:
    import httpx

    try:
        return int(httpx.get(learner.url + "/health", timeout=2).json().get("position", 0))
    except (httpx.HTTPError, ValueError):
        return 0
