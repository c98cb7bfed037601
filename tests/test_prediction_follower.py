"""A prediction worker follows the learner state for state (prediction/follower.py, replica.py),
against the real broker and Redis: the app runs in-process, and the test publishes what a learner
publishes (outcomes in its learning order, artifacts saved at a position, model.updates and
model.swaps) while it teaches its own copy of each model the same examples with the learner's own
wrapper. The served model must then be that copy, by content hash, at the same position."""

from __future__ import annotations

import random
import time
import uuid

import pytest
import redis as redis_lib
from fastapi.testclient import TestClient
from pydantic import SecretStr

from driftline.learner.labels import answer, learn
from driftline.learner.spec import parse_model
from driftline.prediction.app import create_app
from driftline.shared import kafka
from driftline.shared.codec import get_codec
from driftline.shared.digest import model_digest
from driftline.shared.keys import Keys
from driftline.shared.registry import ModelRegistry
from driftline.shared.swaps import publish_swap
from driftline.shared.topics import Topics
from conftest import make_settings
from test_prediction_api import create_topics, wait_for

TOKEN = "follow-admin-2e7b4c9a1d6f8035"
TREE = "tree.HoeffdingTreeClassifier()"
LINEAR = "preprocessing.StandardScaler() | linear_model.LogisticRegression()"


def rows(n: int, seed: int) -> list[tuple[dict, str]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.uniform(-1, 1), rng.uniform(-1, 1)
        out.append(({"a": a, "b": b, "colour": rng.choice(["red", "blue"])}, "1" if a + 0.3 * b > 0 else "0"))
    return out


class Learner:
    """What a learner publishes, for a test: every version it holds learns each example, whose
    champion outcome is published at its position; artifacts are saved at the position reached."""

    def __init__(self, settings, redis_client, spec: str = TREE) -> None:
        self.settings = settings
        self.spec = spec
        self.name = settings.learner.model_name
        self.topics = Topics(settings.namespace)
        self.codec = get_codec()
        self.producer = kafka.producer(settings)
        self.registry = ModelRegistry(redis_client, Keys(settings.namespace), self.name,
                                      settings.model_key.get_secret_value().encode())
        self.models: dict[int, object] = {}  # the versions it learns
        self.position = 0

    def register(self, champion: bool = False, model=None) -> int:
        model = model if model is not None else parse_model(self.spec)
        version = self.registry.register(model, spec=self.spec, reason="test", next_position=self.position)
        self.models[version] = model
        if champion:
            self.registry.set_role("champion", version)
        return version

    def learn(self, examples, publish: bool = True) -> None:
        for x, y in examples:
            for model in self.models.values():
                learn(model, x, y)
            if publish:
                self.outcome(self.position, x, y)
            self.position += 1
        self.producer.flush(10)

    def outcome(self, position: int, x: dict, y: str) -> None:
        record = {"event_id": uuid.uuid4().hex, "entity_id": "e", "model": self.name, "model_version": 1,
                  "role": "champion", "y_true": y, "y_pred": None, "proba": {}, "position": position, "ts": 0.0,
                  "features": x}
        kafka.produce(self.producer, self.topics.outcomes, self.codec.encode("Outcome", record), "e")

    def save(self, version: int, following: bool = True) -> None:
        """An artifact of `version` at the position reached, and the ModelUpdate that says so."""
        revision = self.registry.update(version, self.models[version], examples_seen=self.position,
                                        next_position=self.position if following else None)
        if not following:
            self.models.pop(version)
        update = {"model": self.name, "version": version, "examples_seen": self.position, "revision": revision,
                  "ts": time.time()}
        kafka.produce(self.producer, self.topics.model_updates, self.codec.encode("ModelUpdate", update), self.name)
        self.producer.flush(10)

    def swap(self, version: int, reason: str = "promotion") -> None:
        previous = self.registry.champion()
        self.registry.set_role("champion", version)
        publish_swap(self.producer, self.topics, model=self.name, from_version=previous, to_version=version,
                     reason=reason, position=self.position)

    def digest(self, version: int) -> str:
        return model_digest(self.models[version])


@pytest.fixture(scope="module")
def pipeline(infra, tmp_path_factory):
    s = make_settings(infra, tmp_path_factory.mktemp("follower"), admin_token=SecretStr(TOKEN))
    create_topics(s)
    return s


@pytest.fixture
def settings(pipeline):
    """This test's model name in the module's namespace: a registry and outcomes of its own."""
    return pipeline.model_copy(update={"learner": pipeline.learner.model_copy(
        update={"model_name": f"m{uuid.uuid4().hex[:8]}"})})


@pytest.fixture
def redis_client(pipeline):
    client = redis_lib.Redis.from_url(pipeline.redis_url)
    yield client
    client.close()


@pytest.fixture
def app(settings):
    opened = []

    def start() -> TestClient:
        client = TestClient(create_app(settings), raise_server_exceptions=False)
        client.__enter__()
        opened.append(client)
        wait_for(lambda: client.app.state.predictor.follower.assigned, timeout=30, what="the follower")
        return client

    yield start
    for client in opened:
        client.__exit__(None, None, None)


def served(client, role: str = "champion", digest: bool = False) -> dict:
    return client.get("/v1/models", params={"digest": digest}).json()["replicas"].get(role) or {}


def caught_up(client, learner: Learner, version: int, role: str = "champion", timeout: float = 30.0) -> dict:
    """Wait until the worker serves `version` at the learner's position; its state then, digest included."""
    wait_for(lambda: (s := served(client, role)).get("version") == version and s.get("position") == learner.position,
             timeout=timeout, what=f"{role} v{version} at position {learner.position}: {served(client, role)}")
    return served(client, role, digest=True)


def test_a_worker_learns_every_outcome_and_serves_the_learners_model(settings, redis_client, app):
    learner = Learner(settings, redis_client)
    v1 = learner.register(champion=True)
    client = app()
    data = rows(400, seed=1)
    learner.learn(data)
    state = caught_up(client, learner, v1)
    assert state["digest"] == learner.digest(v1)
    assert state["following"] and state["examples"] == 400 and state["lag_examples"] == 0
    x = {"a": 0.2, "b": -0.7, "colour": "red"}
    proba = client.post("/v1/predict", json={"entity_id": "e", "fields": x}).json()["proba"]
    assert proba == answer(learner.models[v1], x)[1]


def test_a_worker_started_late_learns_the_outcomes_after_the_artifact_it_loads(settings, redis_client, app):
    learner = Learner(settings, redis_client, LINEAR)  # categories: the one-hot fallback, decided alike
    v1 = learner.register(champion=True)
    data = rows(600, seed=2)
    learner.learn(data[:250])
    learner.save(v1)  # the artifact at 250; the outcomes before it are in the topic too
    learner.learn(data[250:])
    client = app()
    state = caught_up(client, learner, v1)
    assert state["digest"] == learner.digest(v1)
    assert state["revision"] == 1  # from that artifact, not from the first


def test_a_swap_serves_the_new_champion_from_its_position_on(settings, redis_client, app):
    learner = Learner(settings, redis_client)
    v1 = learner.register(champion=True)
    client = app()
    data = rows(600, seed=3)
    learner.learn(data[:200])
    v2 = learner.register()  # a challenger from here: it learns what follows, as the champion does
    learner.learn(data[200:400])
    learner.save(v2)
    learner.swap(v2)
    learner.learn(data[400:])
    state = caught_up(client, learner, v2)
    assert state["digest"] == learner.digest(v2) != learner.digest(v1)


def test_a_version_the_learner_does_not_learn_is_served_as_saved_until_the_learner_takes_it_up(
        settings, redis_client, app):
    learner = Learner(settings, redis_client)
    v1 = learner.register(champion=True)
    data = rows(700, seed=4)
    learner.learn(data[:100])
    frozen = learner.register()
    learner.learn(data[100:200])
    learner.save(frozen, following=False)  # dropped: the learner stops learning it
    client = app()
    learner.learn(data[200:300])
    caught_up(client, learner, v1)
    r = client.post(f"/v1/models/{frozen}/promote", headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200, r.text
    assert served(client)["version"] == frozen and not served(client)["following"]
    learner.learn(data[300:400])  # the learner has not taken it up yet: the worker must not learn these
    wait_for(lambda: served(client)["lag_examples"] >= 100, what="the lag of a model the learner does not learn")
    assert served(client, digest=True)["digest"] == model_digest(learner.registry.load(frozen)[0])
    # the learner takes it up at its position, from its artifact as saved
    learner.models[frozen] = learner.registry.load(frozen)[0]
    learner.save(frozen)
    learner.learn(data[400:])
    state = caught_up(client, learner, frozen)
    assert state["digest"] == learner.digest(frozen)


def test_a_missing_example_stops_the_worker_learning_until_a_newer_artifact(settings, redis_client, app):
    learner = Learner(settings, redis_client)
    v1 = learner.register(champion=True)
    client = app()
    data = rows(500, seed=5)
    learner.learn(data[:100])
    learner.learn(data[100:101], publish=False)  # position 100 never reaches the topic
    learner.learn(data[101:300])
    wait_for(lambda: served(client)["lag_examples"] >= 199, what="the lag at the gap")
    assert served(client)["position"] is None or served(client)["position"] == 100  # never past the gap
    assert served(client, digest=True)["digest"] != learner.digest(v1)
    learner.save(v1)  # the next artifact lets it follow again
    learner.learn(data[300:])
    state = caught_up(client, learner, v1)
    assert state["digest"] == learner.digest(v1)


def test_a_learner_that_starts_over_is_followed_from_its_new_artifact_not_the_old_outcomes(
        settings, redis_client, app):
    """Positions start again from 0 (a learner without its checkpoint): a worker must follow the
    new history from its artifact, never take the old history's outcomes at the same positions."""
    old = Learner(settings, redis_client)
    v1 = old.register(champion=True)
    client = app()
    old.learn(rows(300, seed=6))
    caught_up(client, old, v1)
    time.sleep(0.05)
    learner = Learner(settings, redis_client)
    v2 = learner.register()  # next_position 0, saved after the old outcomes
    learner.swap(v2, reason="manual")
    wait_for(lambda: served(client).get("version") == v2, what="the new champion")
    learner.learn(rows(200, seed=7))
    state = caught_up(client, learner, v2)
    assert state["digest"] == learner.digest(v2)


def test_the_canary_challenger_follows_the_learner_too_and_is_promoted_without_a_load(
        settings, redis_client, app):
    learner = Learner(settings, redis_client)
    v1 = learner.register(champion=True)
    data = rows(600, seed=8)
    learner.learn(data[:150])
    v2 = learner.register()
    learner.registry.set_role("challenger", v2)
    client = app()
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert client.post("/v1/canary", json={"share": 0.5}, headers=auth).status_code == 200
    learner.learn(data[150:400])
    state = caught_up(client, learner, v2, role="challenger")
    assert state["digest"] == learner.digest(v2)
    assert caught_up(client, learner, v1)["digest"] == learner.digest(v1)
    learner.registry.set_role("challenger", None)
    learner.swap(v2)
    learner.learn(data[400:])
    state = caught_up(client, learner, v2)
    assert state["digest"] == learner.digest(v2)
    metrics = client.get("/metrics").text
    assert f'driftline_serving_reloads_total{{model="{settings.learner.model_name}",reason="promotion"}} 1.0' in metrics
