"""Training from history and rebuilding from lineage: `driftline train` builds a candidate from the
offline store, registers it with the selection it learned, and enters the learner's contest;
`driftline reproduce` rebuilds it from that lineage and proves it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from driftline.offline.reproduce import NotReproducible, reproduce
from driftline.offline.store import OfflineStore
from driftline.offline.train import registry_of, train
from driftline.shared.settings import settings_env
from driftline.shared.topics import Topics
from learner_harness import read_all
from pipeline import PIPELINE, replay_report, start_pipeline
from test_offline_store import read_rows

TREE = "tree.HoeffdingTreeClassifier(grace_period=50)"  # unseeded: its rng state differs between two builds
LINEAR = "preprocessing.StandardScaler() | linear_model.LogisticRegression()"  # deterministic


def wait_rows(store: OfflineStore, n: int, timeout: float = 60.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = [r for r in read_rows(store) if r["role"] == "champion"]
        if len(rows) >= n:
            return rows
        time.sleep(0.5)
    raise TimeoutError(f"{len(rows)} champion rows in the store, waiting for {n}")


@pytest.mark.e2e
@pytest.mark.order_given_up("a second replay starts its event times over, before the labels the first one taught")
def test_a_candidate_trained_from_history_enters_the_contest_and_is_reproduced(settings, run_service):
    start_pipeline(run_service, (*PIPELINE, "offline"), model=TREE, features="raw",
                   DRIFTLINE_OFFLINE__FLUSH_INTERVAL_S="0.5")
    replay_report(settings, "sea-abrupt", limit=900, label_delay=5)
    store = OfflineStore.from_settings(settings)
    rows = sorted(wait_rows(store, 900), key=lambda r: (r["event_ts"], r["position"]))
    since, until = rows[100]["event_ts"], rows[800]["event_ts"]

    result = train(settings, since=since, until=until, spec=LINEAR, challenge=True)
    version = result["version"]
    assert result["lineage"]["rows"] == 700 and result["parent"] == 1
    assert result["lineage"]["files"] and result["metrics"]["n"] == 700
    registry = registry_of(settings)
    meta = registry.meta(version)
    assert meta["reason"] == "offline" and meta["spec"] == LINEAR and meta["environment"]["river"]
    deadline = time.monotonic() + 60
    while registry.challenger() != version and time.monotonic() < deadline:
        time.sleep(0.3)
    assert registry.challenger() == version, "the learner did not take the candidate up as its challenger"

    # It shadows the champion on new examples, like a drift-triggered challenger.
    replay_report(settings, "sea-abrupt", limit=200, label_delay=5)
    outcomes = read_all(settings, Topics(settings.namespace).outcomes, "Outcome",
                        until=lambda o: any(x["model_version"] == version for x in o))
    assert any(o["role"] == "challenger" and o["model_version"] == version for o in outcomes)

    # Rebuilt from its lineage (the 700 stored examples, then the 200 it learned since, as
    # challenger and, if it won its contest, as champion: the first labels after a promotion are
    # of events the champion before it answered, stored under that version): the same bytes, the
    # model being deterministic. Its last artifact first: the learner saves it as it learns.
    wait_rows(store, 1100)
    deadline = time.monotonic() + 60
    while registry.meta(version)["examples_seen"] < 900 and time.monotonic() < deadline:
        time.sleep(0.3)
    proof = reproduce(settings, "default", version)
    assert proof["reproduced"] and proof["identical_bytes"], proof
    assert proof["examples"] == 700 + proof["after_registration"] == registry.meta(version)["examples_seen"] == 900
    # The live champion too (fresh, then every example it learned, as far as its last checkpoint):
    # an unseeded tree's rng differs, so the proof is its answers on the examples that came next.
    v1 = reproduce(settings, "default", 1)
    assert v1["reproduced"] and v1["before_registration"] == "fresh" and not v1["identical_bytes"], json.dumps(v1)
    assert v1["compared_on"] > 0 and v1["identical_predictions"] == v1["compared_on"]
    cli = subprocess.run([sys.executable, "-m", "driftline.cli", "reproduce", "default", str(version)],
                         env={**os.environ, **settings_env(settings)}, capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout)["proof"] == "identical pickle bytes"

    # Take away stored examples it learned: the lineage no longer matches, and reproduce says so.
    file = OfflineStore(result["lineage"]["store"]).root / result["lineage"]["files"][0]
    file.unlink()
    with pytest.raises(NotReproducible, match="stored examples changed"):
        reproduce(settings, "default", version)


@pytest.mark.e2e
@pytest.mark.order_given_up("a second replay starts its event times over, before the labels the first one taught")
def test_a_drift_style_challenger_is_rebuilt_from_its_warm_start_and_what_it_learned_since(settings, run_service):
    """A challenger the learner built itself (warm-started on the last examples before its
    request) is rebuilt from the store alone, to the same bytes."""
    from driftline.drift.policy import retrain_request
    from driftline.shared import kafka
    from driftline.shared.codec import get_codec

    start_pipeline(run_service, (*PIPELINE, "offline"), model=LINEAR, features="raw",
                   DRIFTLINE_OFFLINE__FLUSH_INTERVAL_S="0.5", DRIFTLINE_LEARNER__WARM_START="300")
    replay_report(settings, "sea-abrupt", limit=500, label_delay=5)
    producer = kafka.producer(settings)
    kafka.produce(producer, Topics(settings.namespace).retrain_requests, get_codec().encode(
        "RetrainRequest", retrain_request("default", "demand", version=1, position=0)), key="default")
    producer.flush(10)
    registry = registry_of(settings)
    deadline = time.monotonic() + 60
    while registry.challenger() is None and time.monotonic() < deadline:
        time.sleep(0.3)
    version = registry.challenger()
    assert version is not None and registry.meta(version)["warm_start"] == 300
    replay_report(settings, "sea-abrupt", limit=200, label_delay=5)
    wait_rows(OfflineStore.from_settings(settings), 700)
    proof = reproduce(settings, "default", version)
    assert proof["before_registration"] == "warm start of 300 examples", proof
    assert proof["reproduced"] and proof["identical_bytes"], json.dumps(proof)


@pytest.mark.e2e
@pytest.mark.order_given_up("a second replay starts its event times over, before the labels the first one taught")
def test_a_dropped_challenger_is_rebuilt_with_the_labels_it_learned_without_an_answer_of_its_own(settings,
                                                                                                 run_service):
    """A challenger learns every label from its request on, the first ones of events the champion
    answered before it existed: once it is dropped, the learner no longer learns it, and it is
    rebuilt from the positions its last artifact learned, not only from its own rows."""
    import threading

    from driftline.drift.policy import retrain_request
    from driftline.shared import kafka
    from driftline.shared.codec import get_codec

    # A margin no challenger can lead by: dropped after 100 shared examples, whatever it learned;
    # snapshots for serving save its artifact while it shadows (~0.7 s), every 0.2 s: never paced
    # by what the last one cost (on a loaded host, 40 ms of pickling put the next one 0.76 s off).
    start_pipeline(run_service, (*PIPELINE, "offline"), model=LINEAR, features="raw",
                   DRIFTLINE_OFFLINE__FLUSH_INTERVAL_S="0.5", DRIFTLINE_LEARNER__WARM_START="300",
                   DRIFTLINE_LEARNER__PROMOTION_RULE="margin", DRIFTLINE_LEARNER__PROMOTE_MARGIN="2",
                   DRIFTLINE_LEARNER__MAX_SHADOW="100", DRIFTLINE_LEARNER__UPDATE_INTERVAL_S="0.2",
                   DRIFTLINE_LEARNER__UPDATE_MAX_SHARE="1")
    replay_report(settings, "sea-abrupt", limit=500, label_delay=5)
    registry = registry_of(settings)
    # The request comes while events wait for their labels (20 behind): the challenger's first
    # labels are of events only the champion answered.
    later = threading.Thread(target=replay_report, args=(settings, "sea-abrupt"),
                             kwargs={"limit": 400, "label_delay": 20, "rate": 150})
    later.start()
    try:
        deadline = time.monotonic() + 30
        while registry.meta(1)["examples_seen"] < 560 and time.monotonic() < deadline:
            time.sleep(0.05)
        producer = kafka.producer(settings)
        kafka.produce(producer, Topics(settings.namespace).retrain_requests, get_codec().encode(
            "RetrainRequest", retrain_request("default", "demand", version=1, position=0)), key="default")
        producer.flush(10)
        deadline = time.monotonic() + 60
        while registry.challenger() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        version = registry.challenger()
        assert version is not None
    finally:
        later.join(120)
    deadline = time.monotonic() + 60
    while "dropped_at" not in registry.meta(version) and time.monotonic() < deadline:
        time.sleep(0.3)
    meta = registry.meta(version)
    assert "dropped_at" in meta and meta["next_position"] is None, meta
    assert meta["examples_seen"] > 300 + 20, meta  # it had learned in the stream when last saved
    wait_rows(OfflineStore.from_settings(settings), 900)
    proof = reproduce(settings, "default", version)
    assert proof["examples"] == meta["examples_seen"], proof
    assert proof["reproduced"] and proof["identical_bytes"], json.dumps(proof)
    with pytest.raises(NotReproducible, match="no version 99 in the registry"):
        reproduce(settings, "default", 99)
