"""Fresh serving (issue 17, part 4): the served model lags the learner by a bounded, configured
amount. The pacing rule is pure logic (fast tests); the bound itself is checked end to end through
the HTTP-only loop an application would run: predict with an event_id, post the label."""

from __future__ import annotations

import time

import httpx
import pytest

from driftline.bench.serving import bananas, http_loop
from driftline.learner.updates import UpdatePacer
from driftline.shared.settings import Settings
from pipeline import start_pipeline


# -- the pacing rule ----------------------------------------------------------------------------
def test_an_update_is_due_once_the_interval_has_passed_after_a_label_and_never_without_one():
    pacer = UpdatePacer(every=1000, interval_s=0.25, max_share=0.2, now=0.0)
    assert not pacer.due(0, now=100.0)  # nothing learned: nothing to ship, however long it was
    assert not pacer.due(3, now=0.2)
    assert pacer.due(3, now=0.26)


def test_enough_labels_make_an_update_due_before_the_interval():
    pacer = UpdatePacer(every=10, interval_s=5.0, max_share=0.2, now=0.0)
    assert not pacer.due(9, now=0.01)
    assert pacer.due(10, now=0.01)


def test_an_expensive_publish_spaces_the_next_one_so_shipping_stays_under_its_share():
    pacer = UpdatePacer(every=1, interval_s=0.0, max_share=0.25, now=0.0)
    pacer.done(started=0.0, now=0.1)  # a 100 ms pickle: the next waits 300 ms (100 / 0.25 - 100)
    assert not pacer.due(50, now=0.39)
    assert pacer.due(50, now=0.41)
    pacer.publish(lambda: None)  # a cheap one lifts the pacing again
    assert pacer.cost_s < 0.05


def test_the_default_staleness_bound_is_small():
    cfg = Settings().learner
    assert cfg.update_interval_s <= 0.5
    assert 0 < cfg.update_max_share < 1


# -- end to end: the bound holds through the services -------------------------------------------
BOUND_S = 0.5  # learner.update_interval_s in this test
SLACK_S = 3.0  # one follower poll, one load, a busy shared machine


@pytest.mark.e2e
def test_the_served_model_has_learned_every_label_within_the_bound_after_the_learner(settings, run_service):
    rows = list(bananas(300))
    procs = start_pipeline(run_service, services=("ingestion", "learner", "prediction"),
                           model="tree.HoeffdingTreeClassifier()", features="raw",
                           DRIFTLINE_LEARNER__UPDATE_INTERVAL_S=str(BOUND_S))
    url = {name: proc.url for name, proc in procs.items()}
    deadline = time.monotonic() + 60
    while httpx.get(url["prediction"] + "/ready", timeout=5).status_code != 200:
        assert time.monotonic() < deadline, "prediction never became ready"
        time.sleep(0.2)

    loop = http_loop(url["prediction"], url["ingestion"], rows, run_id="fresh", sample_every=50)
    assert loop["served_lag_examples"]["samples"] == 6

    def learner_examples() -> int:
        return int((httpx.get(url["learner"] + "/health", timeout=5).json().get("champion") or {})
                   .get("examples", 0))

    deadline = time.monotonic() + 60
    while learner_examples() < len(rows):
        assert time.monotonic() < deadline, f"the learner learned {learner_examples()} of {len(rows)} labels"
        time.sleep(0.05)
    learned_at = time.monotonic()
    served = None
    while time.monotonic() - learned_at < BOUND_S + SLACK_S:
        served = httpx.get(url["prediction"] + "/v1/models", timeout=5).json()
        if served["serving_examples_seen"] == len(rows):
            break
        time.sleep(0.05)
    assert served is not None and served["serving_examples_seen"] == len(rows), (
        f"{BOUND_S + SLACK_S}s after the learner had learned {len(rows)} labels, the prediction service "
        f"served a model that had learned {served and served['serving_examples_seen']}")
    # and the model that answers now is that one
    answer = httpx.post(url["prediction"] + "/v1/predict", json={"entity_id": "bananas", "fields": rows[0][0]},
                        timeout=5).json()
    assert answer["model_version"] == served["serving"]
