"""Serving as fresh as the learner: every prediction worker learns the learner's outcomes in the
learner's order (prediction/replica.py, follower.py), so the model it serves is the learner's,
state for state, which a content hash proves (shared/digest.py).

The rules are pure logic and run as unit tests; the end-to-end test runs the services (a learner
that promotes, restores, is rolled back and shadows a canary; a prediction service with two
uvicorn workers and a second replica) and compares every worker's model with the learner's."""

from __future__ import annotations

import copy
import itertools
import pickle
import random
import re
import subprocess
import sys
import threading
import time

import httpx
import pytest
import redis as redis_lib

from driftline.drift.policy import retrain_request
from driftline.infra import stack
from driftline.learner.labels import answer, learn
from driftline.learner.spec import parse_model
from driftline.prediction.canary import Canary
from driftline.prediction.follower import ModelFollower
from driftline.prediction.models import ModelHolder
from driftline.prediction.replica import Gap, Replica
from driftline.replay.datasets import Dataset, load
from driftline.shared import kafka
from driftline.shared.codec import get_codec
from driftline.shared.digest import model_digest
from driftline.shared.keys import Keys
from driftline.shared.registry import ModelRegistry
from driftline.shared.settings import Ports, Settings
from driftline.shared.topics import Topics
from pipeline import replay_report, start_pipeline

CODEC = get_codec()
LINEAR = "preprocessing.StandardScaler() | linear_model.LogisticRegression()"


def rows(n: int, seed: int = 1, text: bool = True) -> list[tuple[dict, str]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.uniform(-1, 1), rng.uniform(-1, 1)
        x = {"a": a, "b": b, **({"colour": rng.choice(["red", "green", "blue"])} if text else {})}
        out.append((x, "1" if a + 0.5 * b > 0 else "0"))
    return out


def through(schema: str, x: dict) -> dict:
    """`x` as a service reads it back from Avro (the learner: a FeatureVector; a replica: an Outcome)."""
    if schema == "FeatureVector":
        record = {"event_id": "e", "entity_id": "e", "ts": 0.0, "features": x, "feature_set": "raw",
                  "published_ms": None}
    else:
        record = {"event_id": "e", "entity_id": "e", "model": "m", "model_version": 1, "role": "champion",
                  "y_true": "1", "y_pred": None, "proba": {}, "position": 0, "ts": 0.0, "features": x}
    return CODEC.decode(CODEC.encode(schema, record), expect=schema)["features"]


def learner_history(spec: str, data: list, delay: int = 7, checkpoint_at: int | None = None):
    """A model taught as the learner teaches it: vectors read from FeatureVectors, each event
    scored when it comes and its label learned `delay` events later, through a checkpoint (a
    pickle round trip) on the way. Returns the model and the artifact saved at `checkpoint_at`."""
    model, artifact, pending = parse_model(spec), None, []
    for i, (x, y) in enumerate(data + [(None, None)] * delay):
        if x is not None:
            pending.append((through("FeatureVector", x), y))
            answer(model, pending[-1][0])
        if i >= delay:
            learn(model, *pending.pop(0))
            if i - delay + 1 == checkpoint_at:
                artifact = pickle.dumps(model)
                model = pickle.loads(artifact)
    return model, artifact


# -- the content hash -------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", [LINEAR, "tree.HoeffdingTreeClassifier(grace_period=50)",
                                  "forest.ARFClassifier(seed=3, n_models=3)"])
def test_a_replica_that_learns_the_outcomes_after_an_artifact_has_the_learners_digest(spec):
    data = rows(1200)
    learned, artifact = learner_history(spec, data, checkpoint_at=500)
    for start, blob in ((0, pickle.dumps(parse_model(spec))), (500, artifact)):
        replica = Replica(pickle.loads(blob), version=1, position=start)
        for position, (x, y) in enumerate(data):
            replica.learns(position, through("Outcome", x), y)
        assert replica.position == len(data)
        assert replica.digest() == model_digest(learned), f"from position {start}"


def test_the_digest_differs_as_soon_as_one_example_differs():
    data = rows(600)
    a, b = parse_model(LINEAR), parse_model(LINEAR)
    for x, y in data[:-1]:
        learn(a, x, y)
        learn(b, x, y)
    learn(a, *data[-1])
    learn(b, data[-1][0], "1" if data[-1][1] == "0" else "0")
    assert model_digest(a) != model_digest(b)
    assert model_digest(a) == model_digest(pickle.loads(pickle.dumps(a))) == model_digest(copy.deepcopy(a))


def test_the_digest_is_the_same_in_every_process_whatever_its_string_hashes():
    """Sets of text (a tree's categories and classes) iterate in an order that changes with the
    process' hash seed; the digest does not."""
    code = ("from driftline.learner.labels import learn; from driftline.learner.spec import parse_model;"
            "from driftline.shared.digest import model_digest; import random; rng = random.Random(5);"
            "m = parse_model('tree.HoeffdingTreeClassifier(grace_period=30)')\n"
            "for _ in range(400):\n"
            "    c = rng.choice(['red', 'green', 'blue', 'cyan', 'teal']); learn(m, {'c': c, 'a': rng.random()},"
            " rng.choice(['spam', 'ham', 'eggs']))\n"
            "print(model_digest(m))")
    digests = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              env={"PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")}
    assert len(digests) == 1


def test_a_scaler_meeting_its_first_text_learns_that_example_once():
    """The encoding is decided on a copy: learn_one on the model itself would update the numbers,
    fail at the text, and learn them again one-hot (and a model that had failed in a prediction
    first would not: a replica, which only learns, would differ from the learner)."""
    model = parse_model(LINEAR)
    learn(model, {"a": 1.0, "b": 2.0, "colour": "red"}, "1")
    assert dict(model["StandardScaler"].counts) == {"a": 1, "b": 1, "colour=red": 1}
    assert answer(model, {"a": 1.0, "b": 2.0, "colour": "blue"})[0] == "1"  # an unknown category: ignored


# -- a replica and the follower's rules -----------------------------------------------------------
def test_a_replica_learns_only_the_next_example_and_never_guesses_past_a_gap():
    replica = Replica(parse_model(LINEAR), version=4, position=10)
    x, y = rows(1)[0]
    assert replica.learns(10, x, y) and not replica.learns(10, x, y) and not replica.learns(3, x, y)
    with pytest.raises(Gap):
        replica.learns(12, x, y)
    assert (replica.position, replica.examples) == (11, 1)
    frozen = Replica(parse_model(LINEAR), version=5, position=None)  # the learner does not learn it
    assert not frozen.learns(0, x, y) and frozen.examples == 0


def follower(model_name: str = "m") -> ModelFollower:
    """A follower whose rules run without its thread: no broker, no Redis is touched."""
    settings = Settings(learner={"model_name": model_name})
    canary = Canary(settings, redis_lib.Redis(), None, model_name)
    return ModelFollower(settings, ModelHolder(model_name), None, canary)


def outcome(position: int, x: dict, y: str, model: str = "m", role: str = "champion") -> dict:
    return {"model": model, "role": role, "position": position, "features": x, "y_true": y}


def test_the_follower_teaches_each_served_model_the_champions_outcomes_in_order():
    f = follower()
    champion = Replica(parse_model(LINEAR), version=1, position=0, saved_at=100.0)
    f.holders["champion"].swap(champion)
    data = rows(50)
    for position, (x, y) in enumerate(data):
        f.outcome(outcome(position, x, y), 100.0 + position)
        f.outcome(outcome(position, x, "0", role="challenger"), 100.0 + position)  # the same example again
        f.outcome(outcome(position, x, "0", model="other"), 100.0 + position)  # another model's
    expected = parse_model(LINEAR)
    for x, y in data:
        learn(expected, x, y)
    assert champion.position == 50 and champion.digest() == model_digest(expected)
    assert champion.lag(f.newest, 200.0) == (0, 0.0)


def test_the_follower_skips_outcomes_from_before_the_artifact_and_seeks_back_once_at_a_gap():
    f = follower()
    replica = Replica(parse_model(LINEAR), version=1, position=5, saved_at=100.0)
    f.holders["champion"].swap(replica)
    (x, y), = rows(1)
    f.outcome(outcome(7, x, y), 99.0)  # other history: older than the artifact, whatever its position
    assert replica.position == 5 and f.seek_s is None
    f.outcome(outcome(8, x, y), 101.0)  # beyond the next: seek back to where its examples start
    assert f.seek_s == 100.0 and replica.following
    f.seek_s = None  # (the seek done)
    f.outcome(outcome(8, x, y), 101.0)  # still missing after the seek: it stops learning, never guesses
    assert not replica.following and replica.lag(f.newest, 103.0) == (4, 2.0)


def test_positions_going_back_stop_every_replica_until_an_artifact_saved_after_them():
    f = follower()
    replica = Replica(parse_model(LINEAR), version=1, position=0, saved_at=100.0)
    f.holders["champion"].swap(replica)
    data = rows(20)
    for position, (x, y) in enumerate(data):
        f.outcome(outcome(position, x, y), 100.0 + position)
    f.outcome(outcome(3, *data[3]), 130.0)  # the learner's history again, from 3
    assert not replica.following and f.not_before == 130.0
    assert not f.worth_reloading(replica, {"revision": 5, "next_position": 3, "updated_at": 129.0})
    assert f.worth_reloading(replica, {"revision": 5, "next_position": 4, "updated_at": 131.0})


def test_a_worker_far_behind_loads_a_newer_artifact_only_when_that_is_quicker():
    f = follower()
    replica = Replica(parse_model(LINEAR), version=1, revision=2, position=100)
    f.apply_s, f.load_s[1] = 0.001, 0.05  # learning 50 examples costs what one load does
    assert not f.worth_reloading(replica, {"revision": 3, "next_position": 140})
    assert f.worth_reloading(replica, {"revision": 3, "next_position": 200})
    assert not f.worth_reloading(replica, {"revision": 2, "next_position": 900})  # the artifact it has
    f.settings.prediction.catch_up_from_snapshots = False
    assert not f.worth_reloading(replica, {"revision": 3, "next_position": 900})


# -- end to end: every worker serves the learner's model ------------------------------------------
CHURN = {  # a stream where challengers come, win, lose and come back, every few hundred labels
    "DRIFTLINE_DRIFT__ON_NEW_DATA": "200", "DRIFTLINE_DRIFT__COOLDOWN": "200", "DRIFTLINE_DRIFT__DATA_DRIFT": "false",
    "DRIFTLINE_LEARNER__PROMOTION_RULE": "margin", "DRIFTLINE_LEARNER__PROMOTE_AFTER": "20",
    "DRIFTLINE_LEARNER__PROMOTE_WINDOW": "20", "DRIFTLINE_LEARNER__PROMOTE_MARGIN": "0.05",
    "DRIFTLINE_LEARNER__MAX_SHADOW": "400", "DRIFTLINE_LEARNER__WARM_START": "300",
    # snapshots often (the learner's digest at each), but no worker loads one to catch up: each
    # must get there by learning the outcomes (only a new champion is loaded, as it must be)
    "DRIFTLINE_LEARNER__UPDATE_INTERVAL_S": "0.3", "DRIFTLINE_PREDICTION__CATCH_UP_FROM_SNAPSHOTS": "false",
}
TOKEN = "fresh-admin-5c1d8e2b7f4a9e03"
# How far behind the learner a worker may be while the learner learns as fast as it can: the
# outcome's way through Kafka and the worker learning it (milliseconds on an idle machine), with
# room for a shared, loaded one.
LAG_BOUND_S = 3.0


def stretch(start: int, n: int) -> Dataset:
    """Rows start..start+n of the hyperplane stream, timed after the ones before them (a replay
    times rows from the same start: a second one would go back in event time)."""
    def rows():
        for i, row in enumerate(itertools.islice(load("hyperplane").rows(), start, start + n)):
            yield (*row[:3], float(start + i))

    return Dataset(f"hyperplane-{start}", rows, n, timed=True)


def samples(url: str, name: str, **labels) -> list[float]:
    """A metric's values on a service's /metrics (one per worker, several workers) with these labels."""
    text = httpx.get(url + "/metrics", timeout=10).text
    return [float(v) for found, v in re.findall(rf"^{name}(?:\{{([^}}]*)\}})? (\S+)$", text, re.M)
            if all(f'{k}="{want}"' in (found or "") for k, want in labels.items())]


def lag_seconds(url: str, role: str = "champion") -> float:
    """The largest `driftline_serving_lag_seconds` of `role` over a service's workers."""
    return max(samples(url, "driftline_serving_lag_seconds", role=role), default=0.0)


class LagSampler(threading.Thread):
    """The served models' lag behind the learner, as every service exports it, every 0.1 s."""

    def __init__(self, urls) -> None:
        super().__init__(daemon=True)
        self.urls, self.samples, self.done = list(urls), [], threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.1):
            for url in self.urls:
                self.samples.append(lag_seconds(url))

    def stop(self) -> float:
        self.done.set()
        self.join(10)
        return max(self.samples, default=0.0)


def workers_state(url: str, count: int, role: str, position: int, timeout: float = 60.0) -> dict[int, dict]:
    """{worker pid: its `role` replica (with digest)} once `count` workers are seen at `position`;
    a new connection each time, so that the kernel hands it to any of the workers."""
    seen: dict[int, dict] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = httpx.get(url + "/v1/models", params={"digest": True}, timeout=10).json()
        state = body["replicas"].get(role) or {}
        if state.get("position") == position:
            seen[body["worker"]] = state
            if len(seen) >= count:
                return seen
        time.sleep(0.05)
    raise AssertionError(f"{count} workers at position {position} as {role}: only {sorted(seen)}; last {body}")


@pytest.mark.e2e
def test_every_worker_and_replica_serves_exactly_the_learners_model_through_swaps_rollback_and_canary(
        settings, run_service):
    procs = start_pipeline(run_service, ("ingestion", "features", "learner", "prediction"), model=LINEAR,
                           features="raw", DRIFTLINE_PREDICTION__WORKERS="2", DRIFTLINE_ADMIN_TOKEN=TOKEN, **CHURN)
    other = settings.model_copy(update={"ports": Ports(**{**settings.ports.model_dump(),
                                                          "prediction": stack.free_port()})})
    replica = run_service("prediction", settings_override=other, DRIFTLINE_ADMIN_TOKEN=TOKEN, **CHURN)
    services = {procs["prediction"].url: 2, replica.url: 1}
    learner_url = procs["learner"].url
    r = redis_lib.Redis.from_url(settings.redis_url)
    registry = ModelRegistry(r, Keys(settings.namespace), "default", settings.model_key.get_secret_value().encode())

    def learner_snapshot() -> tuple[int, dict[str, dict]]:
        """The learner's position once idle, and its artifacts of each role at that position."""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            position = httpx.get(learner_url + "/health", timeout=10).json()["position"]
            roles = {role: registry.role(role) for role in ("champion", "challenger")}
            metas = {role: registry.meta(v) for role, v in roles.items() if v is not None}
            if all(m.get("next_position") == position for m in metas.values()):
                time.sleep(0.5)
                if httpx.get(learner_url + "/health", timeout=10).json()["position"] == position:
                    return position, metas
            time.sleep(0.2)
        raise AssertionError("the learner saved no artifact at its position")

    def compare(roles=("champion",)) -> int:
        position, metas = learner_snapshot()
        for role in roles:
            for url, count in services.items():
                states = workers_state(url, count, role, position)
                for pid, state in states.items():
                    assert (state["version"], state["digest"]) == (metas[role]["version"], metas[role]["digest"]), (
                        f"{url} worker {pid}, {role} at position {position}: {state} against the learner's "
                        f"v{metas[role]['version']} {metas[role]['digest']}")
        return position

    # promotions and restorations all along the stream, learned as fast as it goes: the workers
    # keep within LAG_BOUND_S of the learner all along, and are level with it once it stops
    sampler = LagSampler(services)
    sampler.start()
    report = replay_report(settings, stretch(0, 2000), label_delay=0)
    assert report["examples_learned"] == 2000
    compare()
    worst = sampler.stop()
    assert sampler.samples and worst <= LAG_BOUND_S, f"the served models were up to {worst:.2f}s behind the learner"
    assert all(lag_seconds(url) == 0 for url in services)
    for url in services:  # the workers learned the examples themselves, no artifact loaded to catch up
        assert sum(samples(url, "driftline_serving_learn_delay_seconds_count")) > 0
        assert sum(samples(url, "driftline_serving_reloads_total", reason="update")) == 0
    lineage = registry.versions()
    assert any("promoted_at" in v for v in lineage) and any("restored_at" in v for v in lineage), lineage

    # an operator rolls back to a version the learner no longer learns: the learner takes it up where
    # it is, from its artifact as saved, and every worker with it
    admin = {"Authorization": f"Bearer {TOKEN}"}
    retired = max(v["version"] for v in lineage if v["version"] not in (registry.champion(), registry.challenger())
                  and v.get("next_position") is None)
    back = httpx.post(procs["prediction"].url + "/v1/models/rollback", json={"version": retired}, headers=admin,
                      timeout=30)
    assert back.status_code == 200, back.text
    deadline = time.monotonic() + 30
    while registry.meta(retired).get("next_position") is None:  # taken up, saved where it resumes
        assert time.monotonic() < deadline, "the learner did not take the rolled-back version up"
        time.sleep(0.2)
    replay_report(settings, stretch(2000, 300), label_delay=0)
    compare()

    # a challenger for the canary: every worker routes to it and follows it, then promotes it
    producer = kafka.producer(settings)
    request = retrain_request("default", "demand", version=registry.champion(), position=0)
    kafka.produce(producer, Topics(settings.namespace).retrain_requests, CODEC.encode("RetrainRequest", request),
                  key="default")
    producer.flush(10)
    deadline = time.monotonic() + 30
    while registry.challenger() is None:
        assert time.monotonic() < deadline, "the learner started no challenger"
        time.sleep(0.2)
    for url in services:
        canary = httpx.post(url + "/v1/canary", json={"share": 1.0}, headers=admin, timeout=30)
        assert canary.status_code == 200 and canary.json()["challenger"] == registry.challenger(), canary.text
    replay_report(settings, stretch(2300, 300), label_delay=0)
    compare(roles=("champion", "challenger") if registry.challenger() is not None else ("champion",))
    if registry.challenger() is not None:
        promoted = httpx.post(procs["prediction"].url + "/v1/canary/promote", headers=admin, timeout=30)
        assert promoted.status_code == 200, promoted.text
    replay_report(settings, stretch(2600, 200), label_delay=0)
    compare()
    r.close()
